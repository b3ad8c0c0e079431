"""Preemption's inputs read off the allocation records, the queue policy that gates it, and
the binder's memory of preemptions under way (services/binder/preempting.py; no I/O)."""

from __future__ import annotations

from jobmesh.binder.allocation import free_on, reserve
from jobmesh.binder.preempting import (
    bound_hold,
    claimed_victims,
    describe,
    hold,
    over_share,
    plan_preemption,
    running_attempts,
    waiting_on,
)
from jobmesh.contract.messages.v1 import (
    Allocation,
    GpuDevice,
    JobReady,
    JobSpec,
    NodeInfo,
    NoopRuntime,
    QueueConfig,
    Reservation,
    Resources,
)

NOW = 1_000.0


def node(node_id: str, cpu: int = 4000, **kw) -> NodeInfo:
    return NodeInfo(node_id=node_id, cpu_milli=cpu, memory_mb=8192, heartbeat_at=NOW, started_at=0.0, **kw)


def held(cpu: int, priority: int, at: float, tenant: str = "t", queue: str = "batch", **kw) -> Reservation:
    return Reservation(
        resources=Resources(cpu_milli=cpu, memory_mb=0, **kw.pop("res", {})),
        scratch_dir="",
        at=at,
        priority=priority,
        tenant=tenant,
        queue=queue,
        **kw,
    )


def ready(job_id: str, cpu: int, priority: int, *, preempt: bool = True, queue: str = "urgent", candidates=("n1",)):
    spec = JobSpec(
        runtime=NoopRuntime(),
        resources=Resources(cpu_milli=cpu, memory_mb=0),
        priority=priority,
        preempt=preempt,
        queue=queue,
        tenant="t",
    )
    return JobReady(
        job_id=job_id,
        attempt=1,
        partition=0,
        spec=spec,
        candidates=list(candidates),
        submitted_at=NOW,
        ready_at=NOW,
    )


def queues(**configs: QueueConfig):
    return lambda name: configs.get(name, QueueConfig())


URGENT = QueueConfig(preempt_min_priority=8)
FULL = {
    "n1": Allocation(
        node_id="n1",
        reservations={
            "old:1": held(2000, priority=2, at=NOW - 600),
            "young:1": held(2000, priority=2, at=NOW - 5),
        },
    )
}
NODES = {"n1": node("n1")}


def test_a_reservation_records_what_preemption_weighs() -> None:
    job = ready("j", 1000, priority=3, queue="batch")
    alloc, won, _ = reserve(node("n1"), Allocation(node_id="n1"), [job], NOW)
    assert alloc is not None and len(won) == 1
    r = alloc.reservations["j:1"]
    assert (r.priority, r.tenant, r.queue, r.preemptible) == (3, "t", "batch", True)


def test_a_job_that_does_not_ask_or_whose_queue_forbids_it_preempts_nothing() -> None:
    urgent = queues(urgent=URGENT)
    assert plan_preemption(ready("p", 2000, 9, preempt=False), urgent, lambda t: 1.0, FULL, NODES, NOW) is None
    # The queue allows it from priority 8; this job has 7.
    assert plan_preemption(ready("p", 2000, 7), urgent, lambda t: 1.0, FULL, NODES, NOW) is None
    # A queue without a policy: never.
    assert plan_preemption(ready("p", 2000, 9), queues(), lambda t: 1.0, FULL, NODES, NOW) is None


def test_the_youngest_low_priority_attempt_is_the_one_stopped() -> None:
    choice = plan_preemption(ready("p", 2000, 9), queues(urgent=URGENT), lambda t: 1.0, FULL, NODES, NOW)
    assert choice is not None and choice.node_id == "n1"
    assert [(v.job_id, v.attempt) for v in choice.victims] == [("young", 1)]  # least work lost, and only one
    assert describe(choice) == (
        "preempting 1 attempt of priority 2 or lower on n1; the room is held for it and it starts when they have"
        " stopped"
    )


def test_victims_another_preemption_claimed_are_not_chosen_again() -> None:
    # Another job (it needs no cpu of its own here) holds the room of "young" already.
    other, _ = hold(NODES["n1"], FULL["n1"], ready("other", 0, 9), ["young:1"], NOW)
    assert other is not None
    choice = plan_preemption(ready("p", 2000, 9), queues(urgent=URGENT), lambda t: 1.0, {"n1": other}, NODES, NOW)
    assert choice is not None and [v.job_id for v in choice.victims] == ["old"]
    # A hold that books the room it frees: what is left cannot make enough room.
    big, _ = hold(NODES["n1"], FULL["n1"], ready("big", 2000, 9), ["young:1"], NOW)
    assert big is not None
    assert plan_preemption(ready("p", 2000, 9), queues(urgent=URGENT), lambda t: 1.0, {"n1": big}, NODES, NOW) is None


def test_an_opted_out_attempt_and_a_capped_queue_are_respected() -> None:
    allocs = {
        "n1": Allocation(
            node_id="n1",
            reservations={
                "pinned:1": held(2000, priority=1, at=NOW - 5, preemptible=False),
                "other:1": held(2000, priority=1, at=NOW - 9, queue="capped"),
            },
        )
    }
    choice = plan_preemption(ready("p", 2000, 9), queues(urgent=URGENT), lambda t: 1.0, allocs, NODES, NOW)
    assert choice is not None and [v.job_id for v in choice.victims] == ["other"]
    capped = queues(urgent=URGENT, capped=QueueConfig(preemptible_fraction=0.0))
    assert plan_preemption(ready("p", 2000, 9), capped, lambda t: 1.0, allocs, NODES, NOW) is None


def test_a_draining_or_gone_candidate_is_not_freed() -> None:
    draining = {"n1": node("n1", draining=True)}
    urgent = queues(urgent=URGENT)
    assert plan_preemption(ready("p", 2000, 9), urgent, lambda t: 1.0, FULL, draining, NOW) is None
    assert plan_preemption(ready("p", 2000, 9), urgent, lambda t: 1.0, FULL, {}, NOW) is None


def test_over_share_weighs_reserved_cpu_by_tenant_weight() -> None:
    allocs = {
        "n1": Allocation(
            node_id="n1",
            reservations={"a:1": held(3000, 2, NOW, tenant="big"), "b:1": held(1000, 2, NOW, tenant="small")},
        )
    }
    # Equal weights: big holds 75% of a 50% share.
    assert over_share(allocs, lambda t: 1.0, "small") == {"big": True, "small": False}
    # Big's weight 4 gives it 80%: under; small's 20% is then below the 25% it holds.
    assert over_share(allocs, lambda t: 4.0 if t == "big" else 1.0, "small") == {"big": False, "small": True}
    # The asking tenant counts among the shares even when it holds nothing.
    assert over_share(allocs, lambda t: 1.0, "new")["big"] is True


def test_a_tenant_under_its_share_needs_two_levels_more() -> None:
    allocs = {
        "n1": Allocation(
            node_id="n1",
            reservations={
                "over:1": held(3000, priority=7, at=NOW - 100, tenant="a"),
                "under:1": held(1000, priority=7, at=NOW, tenant="u"),
            },
        )
    }
    # With the asker "t" three tenants share equally: "a" holds 75% (over its third), "u"
    # 25% (under). "under" is the cheaper victim (younger, and enough), but one level
    # (8 over 7) does not take an under-share tenant's attempt: "over" goes instead.
    urgent = queues(urgent=URGENT)
    choice = plan_preemption(ready("p", 1000, 8), urgent, lambda t: 1.0, allocs, NODES, NOW)
    assert choice is not None and [v.job_id for v in choice.victims] == ["over"]
    # Two levels (9 over 7) may take it, and it is the cheapest.
    choice = plan_preemption(ready("p", 1000, 9), urgent, lambda t: 1.0, allocs, NODES, NOW)
    assert choice is not None and [v.job_id for v in choice.victims] == ["under"]


def test_gpu_victims_count_only_gpus_of_the_asked_kind() -> None:
    gpu_node = node(
        "g1",
        gpu=2,
        gpu_devices=[GpuDevice(index=0, kind="a100"), GpuDevice(index=1, kind="h100")],
    )
    allocs = {
        "g1": Allocation(
            node_id="g1",
            reservations={
                "a:1": held(100, 1, NOW, res={"gpu": 1, "gpu_kind": "a100"}, gpu_devices=[0]),
                "h:1": held(100, 1, NOW - 1, res={"gpu": 1, "gpu_kind": "h100"}, gpu_devices=[1]),
            },
        )
    }
    attempts = {a.job_id: a.gpu_kind for a in running_attempts(allocs, {"g1": gpu_node}, set())}
    assert attempts == {"a": "a100", "h": "h100"}
    spec = JobSpec(
        runtime=NoopRuntime(),
        resources=Resources(cpu_milli=100, memory_mb=0, gpu=1, gpu_kind="h100"),
        priority=9,
        preempt=True,
        queue="urgent",
    )
    job = JobReady(job_id="p", attempt=1, partition=0, spec=spec, candidates=["g1"], submitted_at=NOW, ready_at=NOW)
    choice = plan_preemption(job, queues(urgent=URGENT), lambda t: 1.0, allocs, {"g1": gpu_node}, NOW)
    assert choice is not None and [v.job_id for v in choice.victims] == ["h"]


def test_a_hold_books_the_room_beside_its_victims_and_claims_them() -> None:
    job = ready("p", 2000, 9)
    alloc, held = hold(NODES["n1"], FULL["n1"], job, ["young:1"], NOW)
    assert held == ["young:1"] and alloc is not None
    r = alloc.reservations["p:1"]
    assert r.waiting_for == ["young:1"] and r.priority == 9 and r.resources.cpu_milli == 2000
    # Booked beyond capacity by exactly the victim, until it goes.
    assert free_on(NODES["n1"], alloc).cpu_milli == -2000
    assert waiting_on(alloc, r) == ["young:1"]
    assert claimed_victims({"n1": alloc}) == {"young:1"}
    # A hold is no running attempt: the rule never picks it (nor its victim) again.
    assert {a.job_id for a in running_attempts({"n1": alloc}, NODES, claimed_victims({"n1": alloc}))} == {"old"}
    # The victim gone: the hold is the job's plain reservation, and nothing is claimed.
    gone = Allocation(node_id="n1", reservations={k: v for k, v in alloc.reservations.items() if k != "young:1"})
    assert waiting_on(gone, gone.reservations["p:1"]) == []
    assert claimed_victims({"n1": gone}) == set()
    assert free_on(NODES["n1"], gone).cpu_milli == 0


def test_a_hold_is_not_written_when_a_victim_has_gone_or_written_twice() -> None:
    job = ready("p", 2000, 9)
    assert hold(NODES["n1"], FULL["n1"], job, ["young:1", "gone:1"], NOW) == (None, None)
    alloc, _ = hold(NODES["n1"], FULL["n1"], job, ["young:1"], NOW)
    assert alloc is not None
    # Held already (an earlier delivery, another replica): its stored victims, whatever
    # this delivery would have chosen, and no write.
    assert hold(NODES["n1"], alloc, job, ["old:1"], NOW) == (None, ["young:1"])


def test_a_hold_never_claims_a_victim_twice_nor_overbooks_once_they_have_gone() -> None:
    # Another replica's hold waits for "young" already (its lost race re-runs this step on
    # the record that replica wrote).
    first, _ = hold(NODES["n1"], FULL["n1"], ready("j1", 2000, 9), ["young:1"], NOW)
    assert first is not None
    assert hold(NODES["n1"], first, ready("j2", 2000, 9), ["young:1"], NOW) == (None, None)
    # A reservation made since the plan: once "young" has gone, 2000 are not free any more.
    busier = Allocation(node_id="n1", reservations={**FULL["n1"].reservations, "new:1": held(1000, priority=5, at=NOW)})
    assert hold(NODES["n1"], busier, ready("p", 2000, 9), ["young:1"], NOW) == (None, None)
    # With "old" too, the room is there again.
    new, victims = hold(NODES["n1"], busier, ready("p", 2000, 9), ["young:1", "old:1"], NOW)
    assert new is not None and victims == ["young:1", "old:1"]


def test_a_bound_hold_becomes_a_plain_reservation_that_may_be_a_victim() -> None:
    alloc, _ = hold(NODES["n1"], FULL["n1"], ready("p", 2000, 9), ["young:1"], NOW)
    assert alloc is not None
    gone = Allocation(node_id="n1", reservations={k: v for k, v in alloc.reservations.items() if k != "young:1"})
    # Before it is bound it is never a victim, though its victims have gone.
    assert {a.job_id for a in running_attempts({"n1": gone}, NODES, set())} == {"old"}
    plain, _ = bound_hold(gone, "p:1", NOW + 5)
    assert plain is not None and plain.reservations["p:1"].waiting_for == []
    # Its bound moves to the binding: the run timeout's clock starts now.
    assert plain.reservations["p:1"].ends_by == alloc.reservations["p:1"].ends_by + 5
    assert {a.job_id for a in running_attempts({"n1": plain}, NODES, set())} == {"old", "p"}
    assert bound_hold(plain, "p:1", NOW + 5) == (None, None)  # nothing left to clear


def test_a_gpu_hold_takes_the_devices_its_victims_free() -> None:
    gpu_node = node("g1", gpu=2, gpu_kind="h100")
    alloc = Allocation(
        node_id="g1",
        reservations={
            "keep:1": held(100, 8, NOW, res={"gpu": 1}, gpu_devices=[0], preemptible=False),
            "victim:1": held(100, 1, NOW, res={"gpu": 1}, gpu_devices=[1]),
        },
    )
    spec = JobSpec(
        runtime=NoopRuntime(),
        resources=Resources(cpu_milli=100, memory_mb=0, gpu=1),
        priority=9,
        preempt=True,
        queue="urgent",
    )
    job = JobReady(job_id="p", attempt=1, partition=0, spec=spec, candidates=["g1"], submitted_at=NOW, ready_at=NOW)
    new, victims = hold(gpu_node, alloc, job, ["victim:1"], NOW)
    assert victims == ["victim:1"] and new is not None and new.reservations["p:1"].gpu_devices == [1]


def test_victims_earlier_preemptions_claimed_count_against_their_queues_cap() -> None:
    capped = queues(urgent=URGENT, batch=QueueConfig(preemptible_fraction=0.5))
    n1 = Allocation(node_id="n1", reservations={f"b{i}:1": held(1000, priority=1, at=NOW - i) for i in range(4)})
    n2 = Allocation(node_id="n2", reservations={"b9:1": held(1000, priority=1, at=NOW)})
    nodes = {"n1": node("n1"), "n2": node("n2")}
    # Five running in batch: a cap of half lets one decision take two, what p needs on n1.
    choice = plan_preemption(ready("p", 2000, 9), capped, lambda t: 1.0, {"n1": n1, "n2": n2}, nodes, NOW)
    assert choice is not None and len(choice.victims) == 2
    # An earlier preemption is stopping one of batch's attempts on n2: one is left to take.
    n2_held, _ = hold(nodes["n2"], n2, ready("q", 1000, 9, candidates=("n2",)), ["b9:1"], NOW)
    assert n2_held is not None
    assert plan_preemption(ready("p", 2000, 9), capped, lambda t: 1.0, {"n1": n1, "n2": n2_held}, nodes, NOW) is None


def test_a_job_with_a_future_hold_is_no_preemption_hold() -> None:
    backfill = Reservation(resources=Resources(cpu_milli=2000, memory_mb=0), scratch_dir="", at=NOW, starts_at=NOW + 60)
    record = Allocation(node_id="n1", reservations={**FULL["n1"].reservations, "p:1": backfill})
    assert hold(NODES["n1"], record, ready("p", 2000, 9), ["young:1"], NOW) == (None, None)
