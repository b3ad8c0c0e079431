"""Victim selection for preemption (services/binder/preemption.py): a pure rule."""

from __future__ import annotations

import random

from jobmesh.binder.preemption import (
    OVER_SHARE_MARGIN,
    UNDER_SHARE_MARGIN,
    PendingJob,
    RunningAttempt,
    choose_victims,
)
from jobmesh.contract.messages.v1 import Resources

NOW = 1000.0


def run(
    job_id: str,
    priority: int = 1,
    node_id: str = "n",
    *,
    cpu: int = 1000,
    gpu: int = 0,
    disk: int = 0,
    age: float = 10.0,
    **kw,
):
    base = dict(
        job_id=job_id,
        attempt=1,
        node_id=node_id,
        priority=priority,
        tenant="t",
        resources=Resources(cpu_milli=cpu, memory_mb=0, gpu=gpu, disk_mb=disk),
        started_at=NOW - age,
        preemptible=True,
        queue="q",
    )
    base.update(kw)
    return RunningAttempt(**base)


def pending(
    priority: int = 9, cpu: int = 1000, gpu: int = 0, tenant: str = "p", *, disk: int = 0, kind: str = ""
) -> PendingJob:
    res = Resources(cpu_milli=cpu, memory_mb=0, gpu=gpu, gpu_kind=kind, disk_mb=disk)
    return PendingJob(priority=priority, tenant=tenant, resources=res)


def choose(running, job, over=None, caps=None, **kw):
    return choose_victims(running, job, over or {}, caps or {}, NOW, **kw)


def frees_enough(victims, job, have=(0, 0, 0, 0)) -> bool:
    res = job.resources
    return (
        have[0] + sum(v.resources.cpu_milli for v in victims) >= res.cpu_milli
        and have[1] + sum(v.resources.memory_mb for v in victims) >= res.memory_mb
        and have[2] + sum(v.resources.gpu for v in victims if not res.gpu_kind or v.gpu_kind == res.gpu_kind) >= res.gpu
        and have[3] + sum(v.resources.disk_mb for v in victims) >= res.disk_mb
    )


def test_lowest_priority_first_then_least_work_lost():
    running = [run("p3", 3), run("p1-old", 1, age=500), run("p1-young", 1, age=5), run("p2", 2)]
    d = choose(running, pending(cpu=1000))
    assert d is not None and [v.job_id for v in d.victims] == ["p1-young"]
    d = choose(running, pending(cpu=2000))
    assert [v.job_id for v in d.victims] == ["p1-young", "p1-old"]


def test_victims_never_include_a_higher_or_equal_priority_job():
    running = [run("same", 7, cpu=4000), run("higher", 8, cpu=4000)]
    assert choose(running, pending(priority=7, cpu=1000), over={"t": True}) is None
    rng = random.Random(7)
    for _ in range(200):
        running = [run(f"j{i}", rng.randrange(10), f"n{i % 3}", cpu=rng.choice((500, 1000, 2000))) for i in range(12)]
        job = pending(priority=rng.randrange(10), cpu=rng.choice((1000, 3000)))
        d = choose(running, job, over={"t": True})
        if d is not None:
            assert all(v.priority < job.priority for v in d.victims)


def test_the_under_share_margin():
    assert UNDER_SHARE_MARGIN == 2 and OVER_SHARE_MARGIN == 1
    running = [run("v", 4)]
    # Under (or unknown) share: one level is not enough, two are.
    assert choose(running, pending(priority=5)) is None
    assert choose(running, pending(priority=5), over={"t": False}) is None
    assert choose(running, pending(priority=6)) is not None
    # Over its share: one level is enough.
    assert choose(running, pending(priority=5), over={"t": True}) is not None


def test_not_preemptible_is_never_a_victim():
    running = [run("keep", 0, cpu=8000, preemptible=False), run("small", 1, cpu=500)]
    assert choose(running, pending(cpu=1000)) is None
    assert [v.job_id for v in choose(running, pending(cpu=500)).victims] == ["small"]


def test_victims_are_on_one_node_and_free_capacity_there_counts():
    running = [run("a1", 1, "a", cpu=600), run("b1", 1, "b", cpu=600)]
    assert choose(running, pending(cpu=1000)) is None  # 600 + 600 only across nodes
    d = choose(running, pending(cpu=1000), free={"b": (500, 0, 0, 0)})
    assert d.node_id == "b" and [v.job_id for v in d.victims] == ["b1"]


def test_only_candidate_nodes_are_considered():
    running = [run("a1", 1, "a"), run("b1", 1, "b")]
    assert choose(running, pending(), nodes={"b"}).node_id == "b"
    assert choose(running, pending(), nodes=set()) is None


def test_an_attempt_that_frees_nothing_short_is_not_taken():
    running = [run("cpu-only", 0, cpu=4000), run("gpu", 2, cpu=0, gpu=1)]
    d = choose(running, pending(cpu=0, gpu=1))
    assert [v.job_id for v in d.victims] == ["gpu"]


def test_queue_caps_are_respected():
    running = [run(f"v{i}", 1, queue="batch") for i in range(4)] + [run("other", 1, "m", queue="batch")]
    # 5 running in batch; a cap of 0.2 allows one victim, and this job needs two.
    assert choose(running, pending(cpu=2000), caps={"batch": 0.2}) is None
    assert len(choose(running, pending(cpu=2000), caps={"batch": 0.4}).victims) == 2
    assert choose(running, pending(cpu=1000), caps={"batch": 0.0}) is None
    # A capped-out queue does not stop victims from another one on the node.
    mixed = [*running, run("free-queue", 1, queue="scavenger")]
    d = choose(mixed, pending(cpu=2000), caps={"batch": 0.2})
    assert sorted(v.queue for v in d.victims) == ["batch", "scavenger"]


def test_the_cheapest_node_wins():
    running = [run("a", 3, "a"), run("b", 1, "b", age=100), run("c", 1, "c", age=50)]
    assert choose(running, pending()).node_id == "c"


def test_minimal_no_victim_can_be_removed_and_still_free_enough():
    rng = random.Random(13)
    checked = 0
    for _ in range(300):
        running = [
            run(
                f"j{i}",
                rng.randrange(6),
                f"n{i % 2}",
                cpu=rng.choice((100, 500, 1000, 3000)),
                gpu=rng.choice((0, 0, 1)),
                disk=rng.choice((0, 0, 500)),
                age=rng.uniform(1, 100),
                gpu_kind=rng.choice(("h100", "t4")),
            )
            for i in range(10)
        ]
        job = pending(
            cpu=rng.choice((500, 2000, 4000)),
            gpu=rng.choice((0, 1, 2)),
            disk=rng.choice((0, 0, 800)),
            kind=rng.choice(("", "h100")),
        )
        d = choose(running, job)
        if d is None:
            continue
        checked += 1
        assert len({v.node_id for v in d.victims}) == 1 and frees_enough(d.victims, job)
        for k in range(len(d.victims)):
            assert not frees_enough(d.victims[:k] + d.victims[k + 1 :], job)
    assert checked > 50


def test_never_more_than_needed_after_greedy_overshoot():
    # Greedy by cost takes the small p0 first, then the big p1; the big one alone suffices.
    running = [run("small", 0, cpu=500), run("big", 1, cpu=2000)]
    assert [v.job_id for v in choose(running, pending(cpu=2000)).victims] == ["big"]


def test_deterministic_whatever_the_input_order():
    running = [run(f"j{i}", i % 3, f"n{i % 4}", cpu=700, age=10 + i % 5) for i in range(24)]
    results = {choose(running, pending(cpu=2000))}
    shuffled = list(running)
    random.Random(1).shuffle(shuffled)
    results.add(choose(shuffled, pending(cpu=2000)))
    results.add(choose(list(reversed(running)), pending(cpu=2000)))
    assert len(results) == 1


def test_a_cap_spent_on_a_victim_the_pruning_drops_does_not_hide_a_fit():
    # Two running in q, cap 0.5: one victim. The young small one comes first by cost, but
    # only the big one frees enough, and alone it is within the cap.
    running = [run("small", 1, cpu=500, age=5), run("big", 1, cpu=2000, age=500)]
    d = choose(running, pending(cpu=2000), caps={"q": 0.5})
    assert d is not None and [v.job_id for v in d.victims] == ["big"]


def test_over_a_cap_after_pruning_the_queue_gives_its_largest():
    running = [
        run("small", 1, cpu=1000, age=5, queue="batch"),
        run("scav", 1, cpu=600, age=50, queue="scavenger"),
        run("big", 1, cpu=2000, age=500, queue="batch"),
    ]
    # Without caps: small and big (scav pruned). One batch victim allowed: big, with scav.
    assert [v.job_id for v in choose(running, pending(cpu=2500)).victims] == ["small", "big"]
    d = choose(running, pending(cpu=2500), caps={"batch": 0.5})
    assert d is not None and [v.job_id for v in d.victims] == ["scav", "big"]
    assert choose(running, pending(cpu=2700), caps={"batch": 0.5}) is None  # 2600 within the cap


def test_disk_is_short_too():
    running = [run("cpu-only", 0, cpu=2000), run("disk", 1, cpu=0, disk=1000)]
    d = choose(running, pending(cpu=500, disk=800), free={"n": (4000, 0, 0, 0)})
    assert d is not None and [v.job_id for v in d.victims] == ["disk"]
    assert choose(running, pending(cpu=500, disk=800), free={"n": (4000, 0, 0, 800)}) is None  # fits already


def test_only_gpus_of_the_asked_kind_count():
    running = [
        run("t4", 0, cpu=0, gpu=1, gpu_kind="t4"),
        run("unknown", 0, cpu=0, gpu=1),
        run("h100", 1, cpu=0, gpu=1, gpu_kind="h100"),
    ]
    d = choose(running, pending(cpu=0, gpu=1, kind="h100"))
    assert d is not None and [v.job_id for v in d.victims] == ["h100"]
    assert choose(running[:2], pending(cpu=0, gpu=1, kind="h100")) is None
    # A job that names no kind takes any: the cheapest (equal cost: the job id decides).
    assert [v.job_id for v in choose(running, pending(cpu=0, gpu=1)).victims] == ["t4"]


def test_candidate_nodes_may_come_as_any_collection():
    running = [run("a1", 1, "a"), run("b1", 1, "b")]
    assert choose(running, pending(), nodes=["b"]).node_id == "b"
    assert choose(running, pending(), nodes=("a",)).node_id == "a"


def test_with_caps_the_set_is_within_them_minimal_and_independent_of_input_order():
    rng = random.Random(29)
    checked = 0
    for _ in range(200):
        running = [
            run(
                f"j{i}",
                rng.randrange(4),
                f"n{i % 3}",
                cpu=rng.choice((200, 500, 1000, 2500)),
                age=rng.uniform(1, 100),
                queue=rng.choice(("a", "b", "c")),
            )
            for i in range(15)
        ]
        caps = {"a": rng.choice((0.0, 0.2, 0.5)), "b": rng.choice((0.3, 1.0))}
        job = pending(cpu=rng.choice((1000, 2500, 4000)))
        d = choose(running, job, caps=caps)
        shuffled = list(running)
        rng.shuffle(shuffled)
        assert choose(shuffled, job, caps=caps) == d
        if d is None:
            continue
        checked += 1
        sizes = {q: sum(1 for a in running if a.queue == q) for q in caps}
        for queue, cap in caps.items():
            assert sum(1 for v in d.victims if v.queue == queue) <= int(cap * sizes[queue])
        assert frees_enough(d.victims, job)
        for k in range(len(d.victims)):
            assert not frees_enough(d.victims[:k] + d.victims[k + 1 :], job)
    assert checked > 50
