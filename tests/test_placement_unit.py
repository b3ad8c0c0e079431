"""Pure placement and binding decisions (no I/O)."""

from __future__ import annotations

from jobmesh.binder.allocation import free_on, overbooked, plan, reserve, without
from jobmesh.contract.ids import attempt_key as reservation_key
from jobmesh.contract.messages.v1 import (
    Allocation,
    Constraints,
    JobReady,
    JobSpec,
    Locality,
    NodeInfo,
    NoopRuntime,
    ProcessRuntime,
    Reservation,
    Resources,
    ZoneMap,
)
from jobmesh.scheduler import placement
from jobmesh.scheduler.placement import Placement


def rank(spec: JobSpec, nodes: list[NodeInfo]) -> tuple[list[str], str]:
    ids, _, reason = Placement(nodes).place(spec)
    return ids, reason


def node(node_id: str, **kw) -> NodeInfo:
    base = dict(node_id=node_id, cpu_milli=4000, memory_mb=8192, heartbeat_at=0.0)
    base.update(kw)
    return NodeInfo(**base)


def spec(**kw) -> JobSpec:
    return JobSpec(runtime=ProcessRuntime(argv=["true"]), **kw)


def test_hard_constraints_filter_and_name_the_reason():
    nodes = [node("a", arch="x86_64"), node("b", arch="aarch64", gpu=2, gpu_kind="a100")]
    assert rank(spec(constraints=Constraints(arch="aarch64")), nodes)[0] == ["b"]
    cands, reason = rank(spec(resources=Resources(gpu=1, gpu_kind="h100")), nodes)
    assert cands == [] and reason == "no node with gpu kind h100"
    cands, reason = rank(spec(resources=Resources(cpu_milli=64_000)), nodes)
    assert cands == [] and "cpu" in reason
    assert rank(spec(), []) == ([], "no executor node registered")
    cands, reason = rank(spec(constraints=Constraints(labels={"team": "ml"})), nodes)
    assert cands == [] and reason == "no node with label team=ml"
    cands, reason = rank(spec(constraints=Constraints(isolation="vm")), nodes)
    assert cands == [] and reason == "no node with isolation vm"
    assert rank(spec(constraints=Constraints(handler="embed")), [node("h", handlers=["embed"])])[0] == ["h"]


def test_draining_nodes_are_not_candidates():
    assert rank(spec(), [node("a", draining=True)])[0] == []


def test_zone_distance_orders_candidates_into_tiers():
    zones = ZoneMap(distances={"eu-west": {"eu-central": 1, "us-east": 5}})
    nodes = [node("us", zone="us-east"), node("euc", zone="eu-central"), node("euw", zone="eu-west")]
    ids, tiers, _ = Placement(nodes, zones).place(spec(locality=Locality(zone="eu-west")))
    assert ids == ["euw", "euc", "us"] and tiers == [0, 1, 5]


def test_dataset_locality_prefers_holders_then_nearest_zone():
    zones = ZoneMap(distances={"a": {"b": 1, "c": 9}})
    nodes = [node("c1", zone="c"), node("b1", zone="b"), node("a1", zone="a", datasets=["imagenet"])]
    ids, tiers, _ = Placement(nodes, zones).place(spec(locality=Locality(dataset="imagenet")))
    assert ids[0] == "a1" and tiers[0] == 0
    assert ids.index("b1") < ids.index("c1")


def test_spread_rotates_the_first_candidate_and_pack_prefers_small_nodes():
    nodes = [node(f"n{i}") for i in range(4)]
    p = Placement(nodes, strategy="spread")
    firsts = {p.place(spec())[0][0] for _ in range(4)}
    assert firsts == {"n0", "n1", "n2", "n3"}
    packed = Placement([node("big", cpu_milli=64000), node("small", cpu_milli=2000)], strategy="pack")
    assert packed.place(spec())[0] == ["small", "big"]


def test_placement_is_cached_per_signature():
    p = Placement([node(f"n{i}") for i in range(1000)], strategy="pack")
    first = p.place(spec())
    assert len(first[0]) == placement.CANDIDATES
    assert p.place(spec()) == first
    assert len(p._cache) == 1


def test_noop_jobs_need_a_node_offering_the_noop_runtime():
    nodes = [node("a", runtimes=["process"])]
    assert rank(JobSpec(runtime=NoopRuntime()), nodes) == ([], "no node with runtime noop")


def _ready(job_id: str, cpu: int, candidates: list[str], tiers: list[int] | None = None) -> JobReady:
    return JobReady(
        job_id=job_id,
        attempt=1,
        partition=0,
        spec=spec(resources=Resources(cpu_milli=cpu, memory_mb=1)),
        candidates=candidates,
        tiers=tiers or [],
        submitted_at=0.0,
        ready_at=0.0,
    )


def test_binding_plan_never_overbooks_and_falls_back_to_next_candidate():
    nodes = {"a": node("a", cpu_milli=1000), "b": node("b", cpu_milli=1000)}
    jobs = [_ready(f"j{i}", 400, ["a", "b"]) for i in range(6)]
    p = plan(jobs, nodes, {}, strategy="pack")
    assert [j.job_id for j in p.assign["a"]] == ["j0", "j1"]
    assert [j.job_id for j in p.assign["b"]] == ["j2", "j3"]
    assert [j.job_id for j, _ in p.refused] == ["j4", "j5"]
    assert p.refused[0][1] == "no free capacity on candidate nodes"


def test_binding_spread_takes_the_freest_node_of_the_best_tier():
    nodes = {"a": node("a", cpu_milli=1000), "b": node("b", cpu_milli=1000), "far": node("far", cpu_milli=9000)}
    jobs = [_ready(f"j{i}", 100, ["a", "b", "far"], [0, 0, 3]) for i in range(4)]
    p = plan(jobs, nodes, {}, strategy="spread")
    assert sorted(len(v) for v in p.assign.values()) == [2, 2] and "far" not in p.assign
    full = {"a": node("a", cpu_milli=100), "b": node("b", cpu_milli=100), "far": node("far", cpu_milli=9000)}
    p = plan([_ready("x", 500, ["a", "b", "far"], [0, 0, 3])], full, {})
    assert list(p.assign) == ["far"]  # the near tier is full: fall back to the next


def test_free_capacity_counts_existing_reservations():
    n = node("a", cpu_milli=1000)
    alloc = Allocation(
        node_id="a",
        reservations={
            reservation_key("x", 1): Reservation(
                resources=Resources(cpu_milli=700, memory_mb=1), scratch_dir="", at=0.0
            )
        },
    )
    assert free_on(n, alloc).cpu_milli == 300
    assert not overbooked(n, alloc)
    p = plan([_ready("j", 400, ["a"])], {"a": n}, {"a": alloc})
    assert p.assign == {} and len(p.refused) == 1
    skip = plan([_ready("j", 100, ["a"])], {"a": n}, {"a": alloc}, skip={"j": {"a"}})
    assert skip.assign == {}


def test_retries_walk_past_the_first_candidates():
    from types import SimpleNamespace

    from jobmesh.scheduler.placement import signature

    p = Placement([node(f"n{i:02d}") for i in range(40)], strategy="pack", limit=16)
    s = spec()
    seen: set[str] = set()
    for releases in range(1, 4):
        ids, _, _ = p.place_job(
            SimpleNamespace(
                sig=signature(s), spec=s, releases=releases, avoid=frozenset(), avoid_zones=frozenset(), replicas=1
            )
        )
        seen.update(ids)
    assert len(seen) == 40  # every fitting node is reached over the retries


# --- the binder's compare-and-set step ------------------------------------------------
def _ready_on_a(job_id: str, cpu: int) -> JobReady:
    return JobReady(
        job_id=job_id,
        attempt=1,
        partition=0,
        spec=spec(resources=Resources(cpu_milli=cpu, memory_mb=1)),
        candidates=["a"],
        submitted_at=0.0,
        ready_at=0.0,
    )


def test_reserve_takes_what_fits_and_recognises_a_redelivery():
    a = node("a", cpu_milli=1000, work_dir="/w")
    new, won, lost = reserve(a, Allocation(node_id="a"), [_ready_on_a("x", 600), _ready_on_a("y", 600)], now=5.0)
    assert [b.job.job_id for b in won] == ["x"] and [j.job_id for j in lost] == ["y"]
    assert won[0].new and won[0].scratch_dir == "/w/x-1"
    assert new is not None and new.reservations["x:1"].at == 5.0 and not overbooked(a, new)
    # The same job again (a redelivery after a crash before the ack): no second reservation.
    again, won2, lost2 = reserve(a, new, [_ready_on_a("x", 600)], now=6.0)
    assert again is None and not won2[0].new and lost2 == []


def test_without_removes_only_named_reservations():
    alloc = Allocation(
        node_id="a",
        reservations={
            "x:1": Reservation(resources=Resources(), scratch_dir="", at=0.0),
            "y:1": Reservation(resources=Resources(), scratch_dir="", at=0.0),
        },
    )
    assert without(alloc, {"z:1"}) is None  # nothing to write
    kept = without(alloc, {"x:1"})
    assert kept is not None and set(kept.reservations) == {"y:1"}


def test_a_runtime_is_placed_only_where_it_can_run_at_the_level_it_asks():
    from jobmesh.contract.messages.v1 import HandlerRuntime

    container_node = node("c", isolation="container", runtimes=["process", "noop", "container"])
    sandbox_node = node("s", isolation="sandbox")
    # A process runs at most in a sandbox: a container-level node does not make it a container.
    cands, reason = rank(spec(constraints=Constraints(isolation="container")), [container_node, sandbox_node])
    assert cands == [] and reason == "no node with isolation container"
    assert rank(spec(constraints=Constraints(isolation="sandbox")), [container_node, sandbox_node])[0] == ["c", "s"]
    # Handler workers in a sandbox have no network: a handler job that asks for it goes to a process-level node.
    handler = JobSpec(runtime=HandlerRuntime(handler="embed"), network=True)
    hosts = [node("hs", isolation="sandbox", handlers=["embed"], runtimes=["handler"])]
    cands, reason = rank(handler, hosts)
    assert cands == [] and "handler workers may use the network" in reason
    hosts.append(node("hp", isolation="process", handlers=["embed"], runtimes=["handler"]))
    assert rank(handler, hosts)[0] == ["hp"]
    assert rank(JobSpec(runtime=HandlerRuntime(handler="embed")), hosts)[0] in (["hs", "hp"], ["hp", "hs"])


def test_a_node_with_gpus_of_several_kinds_places_by_the_kinds_of_its_devices():
    from jobmesh.contract.messages.v1 import GpuDevice

    mixed = node(
        "m",
        gpu=3,
        gpu_devices=[GpuDevice(index=0, kind="a100"), GpuDevice(index=1, kind="h100"), GpuDevice(index=2, kind="h100")],
    )
    assert rank(spec(resources=Resources(gpu=2, gpu_kind="h100")), [mixed])[0] == ["m"]
    cands, reason = rank(spec(resources=Resources(gpu=2, gpu_kind="a100")), [mixed])
    assert cands == [] and reason == "no node with 2 gpu of kind a100"
    cands, reason = rank(spec(resources=Resources(gpu=1, gpu_kind="l4")), [mixed])
    assert cands == [] and reason == "no node with gpu kind l4"
    assert rank(spec(resources=Resources(gpu=3)), [mixed])[0] == ["m"]
