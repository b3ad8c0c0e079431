"""Pure placement, backlog and binding decisions (no I/O)."""

from __future__ import annotations

from jobmesh.binder.allocation import free_on, overbooked, plan, reservation_key
from jobmesh.messages.v1 import (
    Allocation, Constraints, JobReady, JobSpec, JobSubmitted, Locality, NodeInfo, NoopRuntime, ProcessRuntime,
    Reservation, Resources,
)
from jobmesh.scheduler import placement
from jobmesh.scheduler.backlog import Backlog, Job, Park, Release


def node(node_id: str, **kw) -> NodeInfo:
    base = dict(node_id=node_id, cpu_milli=4000, memory_mb=8192, heartbeat_at=0.0)
    base.update(kw)
    return NodeInfo(**base)


def spec(**kw) -> JobSpec:
    return JobSpec(runtime=ProcessRuntime(argv=["true"]), **kw)


def test_hard_constraints_filter_and_name_the_reason():
    nodes = [node("a", arch="x86_64"), node("b", arch="aarch64", gpu=2, gpu_kind="a100")]
    assert placement.rank(spec(constraints=Constraints(arch="aarch64")), nodes)[0] == ["b"]
    cands, reason = placement.rank(spec(resources=Resources(gpu=1, gpu_kind="h100")), nodes)
    assert cands == [] and reason == "no node with gpu kind h100"
    cands, reason = placement.rank(spec(resources=Resources(cpu_milli=64_000)), nodes)
    assert cands == [] and "cpu" in reason
    assert placement.rank(spec(), []) == ([], "no executor node registered")
    cands, reason = placement.rank(spec(constraints=Constraints(labels={"team": "ml"})), nodes)
    assert cands == [] and reason == "no node with label team=ml"


def test_zone_hint_prefers_nodes_in_that_zone():
    nodes = [node("a", zone="eu", cpu_milli=8000), node("b", zone="us")]
    assert placement.rank(spec(locality=Locality(zone="us")), nodes)[0] == ["b", "a"]


def test_noop_jobs_need_a_node_offering_the_noop_runtime():
    nodes = [node("a", runtimes=["process"])]
    assert placement.rank(JobSpec(runtime=NoopRuntime()), nodes) == ([], "no node with runtime noop")


def _job(i: int, priority: int = 5) -> Job:
    s = spec(priority=priority)
    return Job(f"j{i}", i, JobSubmitted(job_id=f"j{i}", partition=0, spec=s, idempotency_key=f"k{i}", submitted_at=0.0))


def test_backlog_orders_by_priority_then_fifo_and_parks_unplaceable():
    backlog = Backlog()
    for i, prio in enumerate([5, 9, 5, 0, 9]):
        backlog.add(_job(i, prio))
    decisions = backlog.plan([node("a")])
    assert [d.job.job_id for d in decisions] == ["j1", "j4", "j0", "j2", "j3"]
    assert all(isinstance(d, Release) for d in decisions)
    backlog.apply(decisions)
    assert backlog.plan([node("a")]) == []


def test_parked_job_waits_until_nodes_change():
    backlog = Backlog()
    backlog.add(_job(1))
    [park] = backlog.plan([])
    assert isinstance(park, Park) and park.reason == "no executor node registered"
    backlog.apply([park])
    assert backlog.plan([node("a")]) == []  # parked: not looked at again ...
    backlog.unpark(nodes_changed=True)  # ... until the node set changes
    [release] = backlog.plan([node("a")])
    assert isinstance(release, Release) and release.candidates == ["a"]


def _ready(job_id: str, cpu: int, candidates: list[str]) -> JobReady:
    return JobReady(
        job_id=job_id, attempt=1, partition=0, spec=spec(resources=Resources(cpu_milli=cpu, memory_mb=1)),
        candidates=candidates, submitted_at=0.0, ready_at=0.0,
    )


def test_binding_plan_never_overbooks_and_falls_back_to_next_candidate():
    nodes = {"a": node("a", cpu_milli=1000), "b": node("b", cpu_milli=1000)}
    jobs = [_ready(f"j{i}", 400, ["a", "b"]) for i in range(6)]
    p = plan(jobs, nodes, {})
    assert [j.job_id for j in p.assign["a"]] == ["j0", "j1"]
    assert [j.job_id for j in p.assign["b"]] == ["j2", "j3"]
    assert [j.job_id for j, _ in p.refused] == ["j4", "j5"]
    assert p.refused[0][1] == "no free capacity on candidate nodes"


def test_free_capacity_counts_existing_reservations():
    n = node("a", cpu_milli=1000)
    alloc = Allocation(node_id="a", reservations={
        reservation_key("x", 1): Reservation(resources=Resources(cpu_milli=700, memory_mb=1), scratch_dir="", at=0.0)
    })
    assert free_on(n, alloc).cpu_milli == 300
    assert not overbooked(n, alloc)
    p = plan([_ready("j", 400, ["a"])], {"a": n}, {"a": alloc})
    assert p.assign == {} and len(p.refused) == 1
    skip = plan([_ready("j", 100, ["a"])], {"a": n}, {"a": alloc}, skip={"j": {"a"}})
    assert skip.assign == {}
