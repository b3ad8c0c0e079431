"""Dependencies and mapped steps in the scheduler's backlog, driven without I/O."""

from __future__ import annotations

from jobmesh.contract.messages.v1 import (
    Dependency,
    JobSpec,
    JobSubmitted,
    MapSpec,
    NoopRuntime,
    StepRef,
    Timeouts,
)
from jobmesh.scheduler import mapsteps
from jobmesh.scheduler.backlog import DEPS, Backlog, Expire, Job, Release
from jobmesh.scheduler.dependencies import satisfied, waiting_reason

_seq = iter(range(1, 10**9))


def job(job_id: str, after=(), **spec_fields) -> Job:
    spec = JobSpec(runtime=NoopRuntime(), after=list(after), **spec_fields)
    return Job.of(
        JobSubmitted(job_id=job_id, partition=0, spec=spec, idempotency_key=job_id, submitted_at=0.0), next(_seq)
    )


def anywhere(job):
    return ["n1"], [0], ""


def released(backlog: Backlog, now: float = 0.0) -> list[str]:
    return [d.job.job_id for d in backlog.plan(now, anywhere) if isinstance(d, Release)]


def test_conditions_are_slurms_afterok_afternotok_afterany():
    assert satisfied("succeeded", "succeeded") and not satisfied("succeeded", "failed")
    assert satisfied("failed", "failed") and satisfied("failed", "expired") and not satisfied("failed", "succeeded")
    assert not satisfied("failed", "cancelled")
    assert all(satisfied("ended", o) for o in ("succeeded", "failed", "cancelled", "expired"))


def test_a_job_waits_until_every_dependency_succeeded_and_says_for_what():
    b = Backlog()
    b.add(job("a"), 0)
    b.add(job("b"), 0)
    d = job("d", after=[Dependency(job_id="a", step="extract"), Dependency(job_id="b", step="transform")])
    b.add(d, 0)
    assert d.where == DEPS
    assert d.reason == "waiting for: extract, transform"
    assert b.explain("d", 0) == "waiting for: extract, transform"
    assert released(b) == ["a", "b"]
    b.finish("a", 1, 1.0)
    b.dependency_ended("a", "succeeded", 1.0)
    assert d.reason == "waiting for: transform"
    assert released(b, 1.0) == []
    b.finish("b", 1, 2.0)
    b.dependency_ended("b", "succeeded", 2.0)
    assert released(b, 2.0) == ["d"]


def test_a_failed_dependency_skips_its_waiter_and_an_on_failure_job_runs():
    b = Backlog()
    b.add(job("a"), 0)
    b.add(job("next", after=[Dependency(job_id="a", step="a")]), 0)
    b.add(job("cleanup", after=[Dependency(job_id="a", step="a", when="failed")]), 0)
    b.dependency_ended("a", "failed", 1.0)
    skipped = b.take_skipped()
    assert [(j.job_id, r) for j, r in skipped] == [("next", "skipped: a failed, and it runs only after success")]
    assert "next" not in b.jobs
    assert "cleanup" in released(b, 1.0)


def test_an_on_failure_job_is_skipped_when_its_dependency_succeeds():
    b = Backlog()
    b.add(job("cleanup", after=[Dependency(job_id="a", step="a", when="failed")]), 0)
    b.dependency_ended("a", "succeeded", 1.0)
    assert [j.job_id for j, _ in b.take_skipped()] == ["cleanup"]
    assert b.stats()["default"]["pending"] == 0


def test_dependencies_that_ended_before_the_job_came_are_decided_at_once():
    b = Backlog()
    b.add(
        job("x", after=[Dependency(job_id="a"), Dependency(job_id="b", when="ended")]),
        0,
        {"a": "succeeded", "b": "cancelled"},
    )
    assert released(b) == ["x"]
    b.add(job("y", after=[Dependency(job_id="a", when="failed")]), 0, {"a": "succeeded"})
    assert [j.job_id for j, _ in b.take_skipped()] == ["y"]


def test_the_queue_timeout_of_a_waiting_job_counts_from_when_its_dependencies_are_met():
    b = Backlog()
    w = job("w", after=[Dependency(job_id="a")], timeouts=Timeouts(queue=10))
    b.add(w, 0)
    assert not any(isinstance(d, Expire) for d in b.plan(100, lambda j: ([], [], "no node")))
    b.dependency_ended("a", "succeeded", 100)
    expired = [d for d in b.plan(111, lambda j: ([], [], "no node")) if isinstance(d, Expire)]
    assert [d.job.job_id for d in expired] == ["w"]


def test_a_cancelled_waiter_is_forgotten_and_a_later_end_ignores_it():
    b = Backlog()
    b.add(job("w", after=[Dependency(job_id="a")]), 0)
    assert b.cancel_held("w", 1.0) is not None
    b.dependency_ended("a", "succeeded", 2.0)
    assert released(b, 2.0) == [] and not b.take_skipped()


def test_a_waiting_reason_names_five_steps_then_counts():
    deps = {f"j{i}": ("succeeded", f"s{i}") for i in range(8)}
    assert waiting_reason(deps) == "waiting for: s0, s1, s2, s3, s4 and 3 more"


def mapped(job_id: str, after=(), keep_result=True) -> Job:
    return job(
        job_id,
        after=after,
        keep_result=keep_result,
        step=StepRef(workflow_id="w", step="train"),
        map=MapSpec(over="${steps.prep.result.items}", source="prep", path=["items"], concurrency=2),
    )


def test_a_mapped_step_is_expanded_once_its_dependencies_are_met_and_ends_with_its_items():
    b = Backlog()
    m = mapped("m", after=[Dependency(job_id="prep", step="prep")])
    b.add(m, 0)
    assert b.take_expand() == []
    b.dependency_ended("prep", "succeeded", 1.0)
    assert b.take_expand() == [m]
    assert released(b, 1.0) == []  # a mapped step itself never runs
    b.expanded("m", ["i0", "i1", "i2"], {"i0": "succeeded"}, 1.0)
    assert m.reason == "waiting for its 3 items"
    b.dependency_ended("i1", "succeeded", 2.0)
    assert b.take_items_done() == []
    b.dependency_ended("i2", "failed", 3.0)
    done = b.take_items_done()
    assert done == [m] and m.items == 3 and m.items_failed == 1
    assert "m" not in b.jobs


def test_an_empty_list_ends_the_mapped_step_at_once():
    b = Backlog()
    m = mapped("m")
    b.add(m, 0)
    assert b.take_expand() == [m]
    b.expanded("m", [], {}, 0)
    assert b.take_items_done() == [m]


def test_items_of_a_mapped_step_know_their_item_by_reference_and_share_a_cap():
    m = mapped("m")
    items = mapsteps.item_jobs(m.submitted, 3, 0, 5.0)
    assert [i.spec.step.index for i in items] == [0, 1, 2]
    assert {i.spec.concurrency_key for i in items} == {"map:m"}
    assert all(i.spec.concurrency_limit == 2 and i.spec.map is None and i.spec.keep_result for i in items)
    assert items[2].spec.step.item.job_id == "prep" and items[2].spec.step.item.path == ["items"]
    assert len({i.job_id for i in items}) == 3
    assert [i.job_id for i in mapsteps.item_jobs(m.submitted, 3, 0, 9.0)] == [i.job_id for i in items]
    # Items of a step nobody reads keep nothing (a write per item saved).
    unread = mapsteps.item_jobs(mapped("u", keep_result=False).submitted, 2, 0, 5.0)
    assert not any(i.spec.keep_result for i in unread)


def test_items_of_refuses_what_is_not_a_list():
    import pytest

    assert mapsteps.items_of({"a": {"b": [1, 2]}}, ["a", "b"]) == [1, 2]
    with pytest.raises(mapsteps.MapError, match=r"no field result\.a\.c"):
        mapsteps.items_of({"a": {}}, ["a", "c"])
    with pytest.raises(mapsteps.MapError, match="not a list"):
        mapsteps.items_of({"a": 3}, ["a"])


def test_queue_stats_count_every_waiting_job_under_one_reason():
    b = Backlog()
    b.add(job("x", after=[Dependency(job_id="a", step="a")]), 0)
    b.add(job("y", after=[Dependency(job_id="b", step="b")]), 0)
    stats = b.stats(0)["default"]
    assert stats["waiting"] == {"deps": 2}
    assert stats["reasons"] == {"waiting for other jobs": 2}
