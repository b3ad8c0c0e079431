"""Gangs as pure decisions: which nodes the scheduler offers (services/scheduler/gangs.py),
where the binder puts each member and how it reserves them (services/binder/gangs.py), and
how a gang's lease follows its members (services/scheduler/attemptleases.py)."""

from __future__ import annotations

import msgspec
import pytest

from jobmesh.binder.gangs import choose_gang, peers, reserve_member
from jobmesh.contract.ids import member_event_id
from jobmesh.contract.messages.v1 import (
    Allocation,
    AttemptLease,
    GpuDevice,
    JobReady,
    JobSpec,
    NodeInfo,
    NoopRuntime,
    Reservation,
    Resources,
)
from jobmesh.contract.validation import validate_spec
from jobmesh.errors import InvalidSpec
from jobmesh.scheduler.attemptleases import AttemptLeases
from jobmesh.scheduler.gangs import gang_candidates

SMALL = Resources(cpu_milli=1000, memory_mb=1024)
H100 = Resources(cpu_milli=1000, memory_mb=1024, gpu=1, gpu_kind="h100")


def node(node_id: str, **kw) -> NodeInfo:
    base = dict(node_id=node_id, cpu_milli=4000, memory_mb=8192, heartbeat_at=0.0)
    base.update(kw)
    return NodeInfo(**base)


def ready(replicas: int, candidates: list[str], res: Resources = SMALL, **kw) -> JobReady:
    spec = JobSpec(runtime=NoopRuntime(), resources=res, replicas=replicas, **kw)
    return JobReady(
        job_id="a" * 32, attempt=1, partition=0, spec=spec, candidates=candidates, submitted_at=0.0, ready_at=0.0
    )


def busy(node_id: str, cpu: int, key: str = "b" * 32 + ":1") -> Allocation:
    held = Reservation(resources=Resources(cpu_milli=cpu, memory_mb=0), scratch_dir="", at=0.0)
    return Allocation(node_id=node_id, reservations={key: held})


# --- the scheduler: which nodes a gang may use at all ------------------------------------


def test_the_scheduler_offers_only_groups_large_enough_and_says_what_is_missing():
    nodes = {f"a{i}": node(f"a{i}", zone="a") for i in range(3)} | {f"b{i}": node(f"b{i}", zone="b") for i in range(4)}
    fitting = sorted(nodes)
    picked, reason = gang_candidates(fitting, nodes, 4, "zone", SMALL)
    assert picked == ["b0", "b1", "b2", "b3"] and reason == ""
    picked, reason = gang_candidates(fitting, nodes, 5, "zone", SMALL)
    assert picked == []
    assert reason == "needs 5 nodes with 1000m cpu and 1024 MiB in one zone; 4 fit"
    # Without the constraint every fitting node counts.
    assert gang_candidates(fitting, nodes, 7, "", SMALL) == (fitting, "")
    assert gang_candidates(fitting, nodes, 8, "", SMALL) == ([], "needs 8 nodes with 1000m cpu and 1024 MiB; 7 fit")


def test_a_label_gang_skips_nodes_without_the_label_and_names_it_when_none_has_it():
    nodes = {
        "r1": node("r1", labels={"rack": "r1"}),
        "r2": node("r2", labels={"rack": "r1"}),
        "x": node("x"),
    }
    assert gang_candidates(["r1", "r2", "x"], nodes, 2, "label:rack", H100) == (["r1", "r2"], "")
    picked, reason = gang_candidates(["x"], nodes, 2, "label:rack", H100)
    assert picked == [] and reason.endswith("no node that fits has label rack")
    assert reason.startswith("needs 2 nodes with gpu kind h100 sharing one value of label rack")


# --- the binder: where each member goes ------------------------------------------------


def test_spread_takes_the_roomiest_nodes_and_pack_the_fullest_that_fit():
    nodes = {f"n{i}": node(f"n{i}") for i in range(4)}
    allocs = {"n0": busy("n0", 2500), "n1": busy("n1", 500), "n2": busy("n2", 3500)}  # n3 is empty
    spread = choose_gang(ready(2, list(nodes)), nodes, allocs, 0.0)
    assert not isinstance(spread, str) and spread.nodes == ("n3", "n1")
    pack = choose_gang(ready(2, list(nodes), spread="pack"), nodes, allocs, 0.0)
    # n2 has 500m left: too little for a member, so the fullest that fit are n0 and n1.
    assert not isinstance(pack, str) and pack.nodes == ("n0", "n1")


def test_a_gang_without_room_for_every_member_is_refused_with_what_it_needs_and_has():
    nodes = {f"n{i}": node(f"n{i}") for i in range(4)}
    allocs = {"n0": busy("n0", 3500)}
    reason = choose_gang(ready(4, list(nodes)), nodes, allocs, 0.0)
    assert reason == "needs 4 nodes with 1000m cpu and 1024 MiB; 3 free"
    draining = {**nodes, "n1": node("n1", draining=True)}
    assert choose_gang(ready(3, list(nodes)), draining, allocs, 0.0) == (
        "needs 3 nodes with 1000m cpu and 1024 MiB; 2 free"
    )


def test_the_tightest_zone_that_holds_the_gang_is_chosen_so_larger_zones_stay_whole():
    nodes = {f"a{i}": node(f"a{i}", zone="a") for i in range(6)} | {f"b{i}": node(f"b{i}", zone="b") for i in range(3)}
    plan = choose_gang(ready(3, list(nodes), same="zone"), nodes, {}, 0.0)
    assert not isinstance(plan, str) and sorted(plan.nodes) == ["b0", "b1", "b2"]
    plan = choose_gang(ready(4, list(nodes), same="zone"), nodes, {}, 0.0)
    assert not isinstance(plan, str) and {n[0] for n in plan.nodes} == {"a"}


def test_gpus_of_another_kind_do_not_count_as_free():
    mixed = node(
        "m",
        gpu=2,
        gpu_kind="h100",
        gpu_devices=[GpuDevice(index=0, kind="h100"), GpuDevice(index=1, kind="a10")],
    )
    nodes = {"m": mixed, "h": node("h", gpu=1, gpu_kind="h100")}
    taken = Allocation(
        node_id="m",
        reservations={
            "c" * 32 + ":1": Reservation(
                resources=Resources(cpu_milli=0, memory_mb=0, gpu=1), scratch_dir="", at=0.0, gpu_devices=[0]
            )
        },
    )
    plan = choose_gang(ready(2, ["m", "h"], H100), nodes, {}, 0.0)
    assert not isinstance(plan, str) and sorted(plan.nodes) == ["h", "m"]
    assert choose_gang(ready(2, ["m", "h"], H100), nodes, {"m": taken}, 0.0) == (
        "needs 2 nodes with gpu kind h100; 1 free"
    )


def test_a_member_reservation_carries_its_rank_and_a_redelivery_keeps_it():
    n = node("n0", work_dir="/w")
    job = ready(3, ["n0"])
    alloc, held = reserve_member(Allocation(node_id="n0"), n, job=job, rank=2, now=5.0)
    assert alloc is not None and held is not None
    assert (held.rank, held.world_size, held.scratch_dir, held.at) == (2, 3, "/w/" + "a" * 32 + "-1", 5.0)
    again, same = reserve_member(alloc, n, job=job, rank=0, now=9.0)
    assert again is None and same == held  # already ours: nothing written, the same rank


def test_a_member_loses_its_step_when_the_room_went_meanwhile():
    n = node("n0")
    alloc, held = reserve_member(busy("n0", 3500), n, job=ready(2, ["n0"]), rank=0, now=0.0)
    assert alloc is None and held is None


def test_peers_are_every_member_address_by_rank_on_ports_of_one_attempt():
    nodes = [node("n0", address="10.0.0.5"), None, node("n2")]
    out = peers("k:1", nodes, ["n0", "n1", "n2"])
    hosts = [p.rsplit(":", 1)[0] for p in out]
    ports = [int(p.rsplit(":", 1)[1]) for p in out]
    assert hosts == ["10.0.0.5", "n1", "n2"]  # a node that advertises no address: its id
    assert ports == [ports[0], ports[0] + 1, ports[0] + 2] and 20000 <= ports[0] < 40000
    assert peers("k:1", nodes, ["n0", "n1", "n2"]) == out  # the same on a redelivery
    assert peers("k:2", nodes, ["n0", "n1", "n2"]) != out  # the next attempt elsewhere, mostly


def test_member_ids_keep_rank_0_as_a_plain_job_and_tell_the_others_apart():
    assert member_event_id("j", 1, "started", 0) == "j:1:started"
    assert member_event_id("j", 1, "started", 3) == "j:1:started:3"


# --- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"replicas": 3, "same": "rack"}, "spec.same"),
        ({"replicas": 3, "same": "label:"}, "spec.same"),
        ({"replicas": 1, "same": "zone"}, "spec.same"),
    ],
)
def test_a_gang_on_an_unknown_attribute_is_refused_naming_the_field(spec, field):
    decoded = msgspec.convert({"runtime": {"kind": "noop"}, **spec}, JobSpec)
    with pytest.raises(InvalidSpec) as err:
        validate_spec(decoded)
    assert err.value.field == field


def test_a_gang_bigger_than_any_cluster_jobmesh_places_is_refused_naming_the_field():
    with pytest.raises(msgspec.ValidationError, match=r"<= 1024 - at `\$.replicas`"):
        msgspec.convert({"runtime": {"kind": "noop"}, "replicas": 5000}, JobSpec)


# --- the scheduler: a gang's lease ------------------------------------------------------


def record(node_id: str, *leases: AttemptLease, ended: list[str] | None = None, incarnation: str = "i") -> NodeInfo:
    return node(node_id, attempts=list(leases), ended=ended or [], incarnation=incarnation)


def lease(rank: int) -> AttemptLease:
    return AttemptLease(job_id="j", attempt=1, partition=0, started_at=0.0, rank=rank, world_size=3)


def test_one_silent_member_loses_the_gang_while_its_peers_renew():
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 1, heartbeat=10.0, now=0.0, size=3)
    for t in (1.0, 2.0):
        for n, name in enumerate(("n0", "n1", "n2")):
            leases.observe(record(name, lease(n)), t)
    assert leases.expired(11.9) == []
    for t in (5.0, 9.0, 13.0):  # n0 and n1 go on renewing; n2 fell silent at 2.0
        leases.observe(record("n0", lease(0)), t)
        leases.observe(record("n1", lease(1)), t)
    [expiry] = leases.expired(12.5)
    assert (expiry.kind, expiry.node_id) == ("lost", "n2")
    assert "n2 (a gang member)" in expiry.reason


def test_a_member_that_never_shows_up_loses_the_gang_at_the_bind_deadline():
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 1, heartbeat=10.0, now=0.0, size=3)
    for t in range(1, 40, 5):
        leases.observe(record("n0", lease(0)), float(t))
        leases.observe(record("n1", lease(1)), float(t))
    [expiry] = leases.expired(40.0)
    assert expiry.kind == "lost" and expiry.reason == "only 2 of 3 gang members running 30s after its release"


def test_an_ended_member_leaves_the_lease_to_its_peers_and_a_restart_loses_the_gang():
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 1, heartbeat=10.0, now=0.0, size=3)
    for n, name in enumerate(("n0", "n1", "n2")):
        leases.observe(record(name, lease(n)), 1.0)
    leases.observe(record("n1", ended=["j:1"]), 2.0)  # member 1 is done
    assert "j" in leases.leases
    for t in (5.0, 9.0, 13.0):
        leases.observe(record("n0", lease(0)), t)
        leases.observe(record("n2", lease(2)), t)
    assert leases.expired(14.0) == []  # n1's silence is no loss: it ended
    leases.observe(record("n2", incarnation="new"), 15.0)  # n2's executor restarted without it
    [expiry] = leases.expired(15.0)
    assert (expiry.kind, expiry.node_id, expiry.restarted) == ("lost", "n2", True)


def test_every_member_ended_keeps_the_lease_from_expiring_before_the_ends_arrive():
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 1, heartbeat=10.0, now=0.0, size=2)
    leases.observe(record("n0", lease(0)), 1.0)
    leases.observe(record("n1", lease(1)), 1.0)
    leases.observe(record("n0", ended=["j:1"]), 2.0)
    leases.observe(record("n1", ended=["j:1"]), 2.0)
    assert leases.expired(1000.0) == []


def test_a_gpu_member_gets_the_lowest_free_devices_of_its_kind_on_its_node():
    n = node(
        "g",
        gpu=4,
        gpu_kind="h100",
        gpu_devices=[GpuDevice(index=i, kind="a10" if i == 0 else "h100") for i in range(4)],
    )
    taken = Reservation(resources=Resources(cpu_milli=0, memory_mb=0, gpu=1), scratch_dir="", at=0.0, gpu_devices=[1])
    alloc = Allocation(node_id="g", reservations={"c" * 32 + ":1": taken})
    two = Resources(cpu_milli=100, memory_mb=64, gpu=2, gpu_kind="h100")
    _, held = reserve_member(alloc, n, job=ready(2, ["g"], two), rank=1, now=0.0)
    assert held is not None and held.gpu_devices == [2, 3]  # not the a10 at 0, nor 1 (taken)
    _, none = reserve_member(alloc, n, job=ready(2, ["g"], Resources(gpu=3, gpu_kind="h100")), rank=0, now=0.0)
    assert none is None  # only two h100s are free


def test_a_reloaded_gang_lease_counts_the_members_that_succeeded_before():
    # A new owner reloads the attempt: member 0 ended before, so no record lists it again.
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 1, heartbeat=10.0, now=0.0, grace=30.0, size=3, done=frozenset({0}))
    for t in range(1, 80, 5):
        leases.observe(record("n1", lease(1)), float(t))
        leases.observe(record("n2", lease(2)), float(t))
    assert leases.expired(80.0) == []
    # Without what the owner kept, the same records would lose it at the bind deadline.
    forgetful = AttemptLeases(partition=0, bind_timeout=30.0)
    forgetful.track("j", 1, heartbeat=10.0, now=0.0, grace=30.0, size=3)
    for t in range(1, 80, 5):
        forgetful.observe(record("n1", lease(1)), float(t))
        forgetful.observe(record("n2", lease(2)), float(t))
    [expiry] = forgetful.expired(80.0)
    assert expiry.reason == "only 2 of 3 gang members running 30s after its release"


def test_a_member_that_succeeded_between_two_records_is_accounted_for():
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 1, heartbeat=10.0, now=0.0, size=2)
    leases.member_done("j", 1, 1)  # its MemberSucceeded came; no record ever listed it
    for t in range(1, 60, 5):
        leases.observe(record("n0", lease(0)), float(t))
    assert leases.expired(60.0) == []
