"""The tracker and workflows, against a real nats-server and a real Postgres: a run's jobs
listed in submission order with their steps, the skip mark of a cancel, the reason in every
list, and the schedulers' dependency messages acked without a trace.

The tracker runs in-process as in ``tests/test_tracker.py``, whose fixtures and event
builders these tests share.
"""

from __future__ import annotations

import random

import asyncpg
import pytest

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import (
    DependencyEnded,
    DependencyWatch,
    ErrorReply,
    JobBound,
    JobCancelled,
    JobReady,
    JobSpec,
    JobSubmitted,
    NoopRuntime,
    StepRef,
    UpstreamRef,
)
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.tracker.fold import fold, recorded
from jobmesh.tracker.handlers import EventsHandler
from tests import test_tracker as tracker_tests
from tests.cluster_fixtures import dead_letters
from tests.helpers import eventually
from tests.test_tracker import (
    T0,
    _env,
    _NoWatchers,
    cancelling,
    drained,
    get,
    list_jobs,
    new_job,
    ready,
    started,
    submitted,
    succeeded,
    until,
)

pytestmark = pytest.mark.integration

# The fixtures of tests/test_tracker.py: a tracker in this process, a client, a publisher.
tracker = tracker_tests.tracker
nc = tracker_tests.nc
publish = tracker_tests.publish
store = tracker_tests.store


def step_spec(run: str, step: str, index: int = -1, queue: str = "default") -> JobSpec:
    upstream = {"extract": UpstreamRef(job_id="j-extract")} if step != "extract" else {}
    return JobSpec(
        runtime=NoopRuntime(),
        name=f"{run}-{step}",
        queue=queue,
        keep_result=True,
        step=StepRef(workflow_id=run, step=step, index=index, upstream=upstream),
    )


def step_submitted(job: str, run: str, step: str, index: int = -1, at: float = 0.0) -> JobSubmitted:
    spec = step_spec(run, step, index)
    return JobSubmitted(job_id=job, partition=0, spec=spec, idempotency_key=job, submitted_at=T0 + at)


def step_ready(job: str, run: str, step: str, index: int = -1, at: float = 0.0) -> JobReady:
    spec = step_spec(run, step, index)
    return JobReady(
        job_id=job, attempt=1, partition=0, spec=spec, candidates=["n1"], submitted_at=T0 + at, ready_at=T0 + 1
    )


def step_bound(job: str, run: str, step: str, index: int = -1, at: float = 0.0) -> JobBound:
    spec = step_spec(run, step, index)
    return JobBound(
        job_id=job,
        attempt=1,
        partition=0,
        node_id="n1",
        spec=spec,
        scratch_dir="",
        submitted_at=T0 + at,
        bound_at=T0 + 2,
    )


def skipped_cancel(job: str, attempt: int = 0, at: float = 5.0) -> JobCancelled:
    return JobCancelled(
        job_id=job, attempt=attempt, partition=0, reason="skipped: extract failed", at=T0 + at, skipped=True
    )


def watch(job: str, partition: int = 0, watcher: int = 3) -> DependencyWatch:
    return DependencyWatch(job_id=job, partition=partition, watcher=watcher, at=T0 + 2)


def dep_ended(job: str, partition: int = 3) -> DependencyEnded:
    return DependencyEnded(job_id=job, partition=partition, outcome="succeeded", at=T0 + 5)


async def publish_dependency(nc, *messages: DependencyWatch | DependencyEnded) -> None:
    """Publish where the schedulers do: each on its partition's own kind subject."""
    publisher = Publisher(nc.jetstream())
    outgoing = []
    for m in messages:
        kind = subjects.DEP_WATCH if isinstance(m, DependencyWatch) else subjects.DEP_ENDED
        outgoing.append(Outgoing(subjects.job_event(m.partition, kind), m, f"{m.job_id}:{kind}:{m.partition}"))
    await publisher.publish(outgoing)


# --- the fold --------------------------------------------------------------------------


def test_dependency_messages_fold_to_nothing() -> None:
    job = new_job()
    assert not recorded(watch(job)) and not recorded(dep_ended(job))
    folded = fold([watch(job), dep_ended(job)])
    assert (folded.jobs, folded.attempts, folded.events) == ([], [], [])
    # Among a job's own events they change nothing, whatever partition they carry.
    mine = fold([submitted(job), ready(job)])
    assert fold([watch(job), submitted(job), dep_ended(job, partition=7), ready(job)]) == mine


def test_the_step_comes_with_the_spec_and_the_skip_mark_stays() -> None:
    job = new_job()
    # The dispatch stream's JobBound may come first: its spec brings the step too.
    late = fold([step_ready(job, "w1", "load", 2), step_submitted(job, "w1", "load", 2)]).jobs[0]
    assert (late.workflow_id, late.step, late.index, late.skipped) == ("w1", "load", 2, False)
    ended = fold([step_submitted(job, "w1", "load"), skipped_cancel(job), cancelling(job, 1)]).jobs[0]
    assert (ended.step, ended.index, ended.skipped) == ("load", -1, True)
    plain = fold([submitted(job)]).jobs[0]
    assert (plain.workflow_id, plain.step, plain.index, plain.skipped) == ("", "", -1, False)


# --- recording and listing -------------------------------------------------------------


async def test_a_runs_jobs_list_in_submission_order_with_their_steps(nc, publish) -> None:
    run, other = f"w-{new_job()[:10]}", f"w-{new_job()[:10]}"
    extract, load0, load1, report, stray, plain = (new_job() for _ in range(6))
    await publish(
        # Out of submission order on the wire: the list orders by submission.
        step_submitted(load1, run, "load", index=1, at=3),
        step_submitted(extract, run, "extract", at=1),
        step_submitted(report, run, "report", at=4),
        step_submitted(load0, run, "load", index=0, at=2),
        step_submitted(stray, other, "extract", at=1),
        submitted(plain, at=1),
        step_ready(extract, run, "extract"),
        step_bound(extract, run, "extract"),
        started(extract),
        succeeded(extract, result='{"items": [1, 2]}'),
        skipped_cancel(report),
    )
    # A cancel under way shows as the reason, as the job's own view has it.
    await publish(step_ready(load0, run, "load", 0), cancelling(load0))
    await until(nc, report, lambda v: v.state == "cancelled", "the skipped step to be recorded")
    await until(nc, load0, lambda v: v.reason.startswith("cancelling"), "the cancel under way to be recorded")
    listed = (await list_jobs(nc, workflow=run, limit=5_000)).jobs
    assert [j.job_id for j in listed] == [extract, load0, load1, report]
    assert [(j.step, j.index, j.skipped) for j in listed] == [
        ("extract", -1, False),
        ("load", 0, False),
        ("load", 1, False),
        ("report", -1, True),
    ]
    assert [j.state for j in listed] == ["succeeded", "ready", "queued", "cancelled"]
    view = await get(nc, load0)
    assert listed[1].reason == view.reason == "cancelling: wrong input"
    assert listed[3].reason == "skipped: extract failed" and listed[3].final
    # The other run's job, and the plain one, stay out; the state filter applies within a run.
    assert [j.job_id for j in (await list_jobs(nc, workflow=other)).jobs] == [stray]
    assert [j.job_id for j in (await list_jobs(nc, workflow=run, states=["cancelled"])).jobs] == [report]
    assert (await list_jobs(nc, workflow="w-no-such-run")).jobs == []
    # Every list fills the step fields and the reason, not only a run's.
    recent = {j.job_id: j for j in (await list_jobs(nc, limit=200)).jobs}
    assert (recent[report].step, recent[report].skipped, recent[report].reason) == (
        "report",
        True,
        "skipped: extract failed",
    )
    assert (recent[plain].step, recent[plain].index, recent[plain].skipped) == ("", -1, False)


async def test_dependency_messages_are_acked_and_leave_no_row(nc, publish) -> None:
    known, unknown = new_job(), new_job()
    await publish(submitted(known), ready(known))
    await publish_dependency(nc, watch(known), dep_ended(known, partition=5), watch(unknown), dep_ended(unknown))
    await drained(nc, publish)
    # Nothing of the unknown job is recorded, not even "its events came first".
    missing = await get(nc, unknown)
    assert isinstance(missing, ErrorReply) and missing.message == f"job {unknown} is not known"
    view = await get(nc, known)
    assert [e.kind for e in view.events] == ["submitted", "ready"]
    assert view.partition == 0  # not DependencyEnded's partition, which is the watcher's
    js = nc.jetstream()
    assert await dead_letters(js) == []

    async def all_acked() -> bool:
        # Acked once the batch committed, not left to be redelivered.
        info = await js.consumer_info(subjects.STREAM_JOBS, subjects.durable("tracker", "jobs"))
        return (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)

    await eventually(all_acked, what="every message of JM_JOBS acked by the tracker")


async def test_the_stored_step_fields_agree_with_the_fold(store, database_url) -> None:
    """Step fields and skip marks land as the fold says, in any order and batching, with
    the facts that fill gaps coming after the row exists."""
    rng = random.Random(7)
    run = f"w-{new_job()[:10]}"
    jobs = [new_job() for _ in range(12)]
    events: list = []
    for i, job in enumerate(jobs):
        # Every event of a job carries the same submission time, whichever comes first.
        first = step_bound(job, run, "load", i, at=i) if i % 3 else step_ready(job, run, "load", i, at=i)
        story = [first, step_submitted(job, run, "load", i, at=i)]
        story += [skipped_cancel(job)] if i % 2 else [step_ready(job, run, "load", i, at=i), succeeded(job)]
        story += [watch(job), dep_ended(job, partition=9)]
        events += story
    rng.shuffle(events)
    handler = EventsHandler(store, _NoWatchers())
    for i in range(0, len(events), 5):
        assert await handler([_env(e) for e in events[i : i + 5]]) is None
    expected = {j.job_id: j for j in fold(events).jobs}
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "tracker"})
    try:
        rows = await conn.fetch(
            "SELECT job_id, workflow_id, step, step_index, skipped, partition FROM jobs WHERE job_id = ANY($1)", jobs
        )
    finally:
        await conn.close()
    assert len(rows) == len(jobs)
    for r in rows:
        job = expected[r["job_id"]]
        assert (r["workflow_id"], r["step"], r["step_index"], r["skipped"], r["partition"]) == (
            job.workflow_id,
            job.step,
            job.index,
            job.skipped,
            0,
        )
    listed = await store.list(100, workflow=run)
    assert [j.job_id for j in listed] == jobs  # submitted one second apart, in order
    assert [j.skipped for j in listed] == [bool(i % 2) for i in range(len(jobs))]


async def test_a_run_lists_its_jobs_beyond_the_usual_limit_in_pages(store) -> None:
    run = f"w-{new_job()[:10]}"
    jobs = [new_job() for _ in range(1200)]
    batch = [step_submitted(job, run, "map", index=i, at=i / 1000) for i, job in enumerate(jobs)]
    await store.write(fold(batch))
    listed = await store.list(5_000, workflow=run)
    assert [j.index for j in listed] == list(range(len(jobs)))
    pages = [await store.list(500, workflow=run, offset=offset) for offset in (0, 500, 1000)]
    assert [len(p) for p in pages] == [500, 500, 200]
    assert [j.job_id for p in pages for j in p] == [j.job_id for j in listed]
