"""Integration tests of the tracker against a real nats-server and a real Postgres.

The tracker runs in-process on the library runtime; the tests publish real lifecycle
events to the real streams with the library Publisher and observe the tracker only
through its query API, its watch subjects, and (for the SQL-versus-fold check) its tables.
"""

from __future__ import annotations

import asyncio
import random
import signal
import uuid

import asyncpg
import msgspec
import nats
import pytest

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.ids import event_id
from jobmesh.contract.messages.v1 import (
    AttemptError,
    ErrorReply,
    JobBound,
    JobCancelled,
    JobCancelling,
    JobError,
    JobFailed,
    JobGaveUp,
    JobGetRequest,
    JobListReply,
    JobListRequest,
    JobLost,
    JobReady,
    JobRetrying,
    JobSpec,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    JobUnplaceable,
    JobUpdate,
    JobView,
    NoopRuntime,
)
from jobmesh.runtime.db import connect_pool
from jobmesh.runtime.outcomes import Ack, Reject
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.service import Envelope, Runtime
from jobmesh.runtime.settings import Settings
from jobmesh.tracker.fold import AttemptState, fold
from jobmesh.tracker.handlers import EventsHandler, QueryHandler
from jobmesh.tracker.service import consumers, open_store, responders
from jobmesh.tracker.store import DDL, Store
from tests.helpers import eventually

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
_reply = msgspec.json.Decoder(JobView | ErrorReply)
_list_reply = msgspec.json.Decoder(JobListReply | ErrorReply)


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def tracker(nats_server, database_url):
    """A tracker on the library runtime, serving until the module's tests are done."""
    settings = Settings(nats_url=nats_server.url, database_url=database_url, service="tracker", instance="test-1")
    rt = Runtime(settings)
    await rt.connect()
    store, pool = await open_store(settings)
    serving = asyncio.ensure_future(
        rt.serve(
            consumers=consumers(settings, EventsHandler(store, rt.nc)),
            responders=responders(QueryHandler(store)),
            on_stop=pool.close,
        )
    )
    client = await nats.connect(nats_server.url)
    # serve() answers health checks once its consumers and responders are up.
    await eventually(lambda: _answers(client, subjects.health("tracker")), what="the tracker to answer health checks")
    yield rt
    await client.close()
    rt.stop()
    await serving
    # serve() took SIGINT/SIGTERM for the runtime; give them back to pytest.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


@pytest.fixture
async def nc(nats_server, tracker):
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
def publish(nc):
    """Publish lifecycle events where their producers would: Bound on dispatch, the rest on jobs."""
    publisher = Publisher(nc.jetstream())

    async def send(*events, msg_id_suffix: str = "") -> None:
        await publisher.publish(Outgoing(_subject(e), e, _msg_id(e) + msg_id_suffix) for e in events)

    return send


async def _answers(client, subject: str) -> bool:
    try:
        await client.request(subject, b"", timeout=0.5)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return False
    return True


def _subject(event) -> str:
    if isinstance(event, JobBound):
        return subjects.node_dispatch(event.node_id)
    kind = {
        JobSubmitted: subjects.SUBMITTED,
        JobReady: subjects.READY,
        JobUnplaceable: subjects.UNPLACEABLE,
        JobStarted: subjects.STARTED,
        JobSucceeded: subjects.SUCCEEDED,
        JobFailed: subjects.FAILED,
        JobLost: subjects.LOST,
        JobRetrying: subjects.RETRYING,
        JobGaveUp: subjects.GAVE_UP,
        JobCancelling: subjects.CANCELLING,
        JobCancelled: subjects.CANCELLED,
    }[type(event)]
    return subjects.job_event(event.partition, kind)


def _msg_id(event) -> str:
    return event_id(event.job_id, getattr(event, "attempt", 0), _subject(event).rsplit(".", 1)[-1])


# --- events ----------------------------------------------------------------------------


def new_job() -> str:
    return uuid.uuid4().hex


def spec(queue: str = "default") -> JobSpec:
    return JobSpec(runtime=NoopRuntime(), name="it", queue=queue)


def submitted(
    job: str, queue: str = "default", at: float = 0.0, partition: int = 0, fallback_of: str = ""
) -> JobSubmitted:
    return JobSubmitted(
        job_id=job,
        partition=partition,
        spec=spec(queue),
        idempotency_key=job,
        submitted_at=T0 + at,
        fallback_of=fallback_of,
    )


def ready(
    job: str, attempt: int = 1, at: float = 1.0, queue: str = "default", release: int = 1, partition: int = 0
) -> JobReady:
    return JobReady(
        job_id=job,
        attempt=attempt,
        partition=partition,
        spec=spec(queue),
        candidates=["n1", "n2"],
        submitted_at=T0,
        ready_at=T0 + at,
        release=release,
    )


def unplaceable(job: str, attempt: int = 1, at: float = 1.5, release: int = 1) -> JobUnplaceable:
    return JobUnplaceable(job_id=job, attempt=attempt, partition=0, reason="nothing fits", at=T0 + at, release=release)


def bound(job: str, attempt: int = 1, node: str = "n1", at: float = 2.0) -> JobBound:
    return JobBound(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=node,
        spec=spec(),
        scratch_dir="/scratch",
        submitted_at=T0,
        bound_at=T0 + at,
    )


def started(job: str, attempt: int = 1, node: str = "n1", at: float = 3.0) -> JobStarted:
    return JobStarted(job_id=job, attempt=attempt, partition=0, node_id=node, at=T0 + at)


def succeeded(
    job: str, attempt: int = 1, node: str = "n1", at: float = 4.0, result: str = "", result_ref: str = ""
) -> JobSucceeded:
    return JobSucceeded(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=node,
        exit_code=0,
        output_tail="all good\n",
        submitted_at=T0,
        started_at=T0 + 3,
        at=T0 + at,
        result=result,
        result_ref=result_ref,
        result_bytes=len(result.encode()) if result else (5_000_000 if result_ref else 0),
    )


def failed(
    job: str,
    exit_code: int | None,
    at: float = 4.0,
    attempt: int = 1,
    node: str = "n1",
    error: JobError | None = None,
) -> JobFailed:
    return JobFailed(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=node,
        exit_code=exit_code,
        error=error or JobError(code="nonzero_exit", message=f"exited with {exit_code}"),
        output_tail="oops\n",
        submitted_at=T0,
        started_at=T0 + at - 1,
        at=T0 + at,
    )


def lost(job: str, attempt: int = 1, at: float = 5.0, reason: str = "") -> JobLost:
    return JobLost(job_id=job, attempt=attempt, partition=0, node_id="n1", at=T0 + at, reason=reason)


def retrying(job: str, attempt: int = 1, at: float = 4.5, avoid: tuple[str, ...] = ("n1",)) -> JobRetrying:
    return JobRetrying(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id="n1",
        error=JobError(code="nonzero_exit", message="exited with 7"),
        next_attempt=attempt + 1,
        delay=1.8,
        not_before=T0 + at + 1.8,
        avoid=list(avoid),
        at=T0 + at,
    )


def gave_up(job: str, errors: list[AttemptError], at: float = 9.5, fallback: str = "") -> JobGaveUp:
    last = errors[-1]
    return JobGaveUp(
        job_id=job,
        attempt=last.attempt,
        partition=0,
        state="lost" if last.error.code == "lost" else "failed",
        node_id=last.node_id,
        error=last.error,
        reason=f"all {len(errors)} attempts failed",
        errors=errors,
        fallback_job_id=fallback,
        at=T0 + at,
    )


def cancelling(job: str, attempt: int = 1, at: float = 3.5) -> JobCancelling:
    return JobCancelling(job_id=job, attempt=attempt, partition=0, reason="wrong input", at=T0 + at)


def cancelled(job: str, attempt: int = 1, at: float = 4.5, node: str = "n1") -> JobCancelled:
    return JobCancelled(job_id=job, attempt=attempt, partition=0, reason="wrong input", node_id=node, at=T0 + at)


# --- queries ---------------------------------------------------------------------------


async def get(nc, job: str) -> JobView | ErrorReply:
    msg = await nc.request(subjects.API_JOB_GET, encode(JobGetRequest(job_id=job)), timeout=5)
    return _reply.decode(msg.data)


async def list_jobs(nc, **filters) -> JobListReply:
    msg = await nc.request(subjects.API_JOB_LIST, encode(JobListRequest(**filters)), timeout=5)
    reply = _list_reply.decode(msg.data)
    assert isinstance(reply, JobListReply), reply
    return reply


async def until(nc, job: str, predicate, what: str) -> JobView:
    async def probe():
        view = await get(nc, job)
        return view if isinstance(view, JobView) and predicate(view) else None

    return await eventually(probe, what=what)


async def drained(nc, publish) -> None:
    """Wait until the tracker has handled everything published so far on both streams.

    Each stream is consumed in order, so once a marker job published after everything else
    is visible on both, whatever came before it has been handled.
    """
    marker = new_job()
    await publish(submitted(marker), bound(marker))
    await until(nc, marker, lambda v: {"submitted", "bound"} <= {e.kind for e in v.events}, "the tracker to catch up")


# --- tests -----------------------------------------------------------------------------


async def test_a_successful_job_is_recorded_and_announced(nc, publish) -> None:
    job = new_job()
    seen: list[JobUpdate] = []
    watch_codec = msgspec.json.Decoder(JobUpdate)

    async def on_update(msg) -> None:
        seen.append(watch_codec.decode(msg.data))

    await nc.subscribe(subjects.job_watch(job), cb=on_update)
    await nc.flush()

    await publish(submitted(job), ready(job), bound(job), started(job), succeeded(job))

    view = await until(nc, job, lambda v: v.state == "succeeded" and len(v.events) == 5, "the job to succeed")
    assert (view.attempt, view.node_id, view.queue, view.name) == (1, "n1", "default", "it")
    assert view.spec == spec()
    assert view.submitted_at == T0 and view.updated_at == T0 + 4
    assert [e.kind for e in view.events] == ["submitted", "ready", "bound", "started", "succeeded"]
    [attempt] = view.attempts
    assert (attempt.attempt, attempt.state, attempt.node_id, attempt.exit_code) == (1, "succeeded", "n1", 0)
    assert (attempt.started_at, attempt.finished_at, attempt.output_tail) == (T0 + 3, T0 + 4, "all good\n")
    await eventually(lambda: _has(seen, "succeeded"), what="a watch update saying succeeded")
    assert seen[-1].state == "succeeded" and seen[-1].attempt == 1


async def _has(updates: list[JobUpdate], state: str) -> bool:
    return any(u.state == state for u in updates)


async def test_a_failure_keeps_its_exit_code(nc, publish) -> None:
    job = new_job()
    await publish(submitted(job), ready(job), bound(job), started(job), failed(job, exit_code=7))

    view = await until(nc, job, lambda v: v.state == "failed", "the job to fail")
    [attempt] = view.attempts
    assert attempt.exit_code == 7
    assert attempt.error == JobError(code="nonzero_exit", message="exited with 7")
    assert attempt.output_tail == "oops\n"
    assert view.reason == "nonzero_exit: exited with 7"
    assert view.events[-1].kind == "failed" and "exit 7" in view.events[-1].detail


async def test_a_redelivered_event_changes_nothing(nc, publish) -> None:
    job = new_job()
    await publish(submitted(job), ready(job), bound(job), started(job), succeeded(job))
    before = await until(nc, job, lambda v: v.state == "succeeded" and len(v.events) == 5, "the job to succeed")

    # New message ids, so JetStream stores them again: the tracker sees true duplicates.
    await publish(succeeded(job), started(job), ready(job), bound(job), msg_id_suffix=":again")
    await drained(nc, publish)

    assert await get(nc, job) == before


async def test_events_out_of_order_end_in_the_right_state(nc, publish) -> None:
    job = new_job()
    await publish(succeeded(job))
    await publish(started(job))
    # Nothing has carried the spec yet: get says so rather than inventing one.
    reply = await eventually(
        lambda: _not_found_with(nc, job, "submission is not recorded yet"), what="the partial job to be reported"
    )
    assert reply.code == "not_found"

    await publish(bound(job))
    await publish(ready(job))
    await publish(submitted(job))
    view = await until(nc, job, lambda v: len(v.events) == 5, "every event to be recorded")
    assert view.state == "succeeded"
    assert [e.kind for e in view.events] == ["submitted", "ready", "bound", "started", "succeeded"]
    [attempt] = view.attempts
    assert (attempt.state, attempt.node_id, attempt.started_at) == ("succeeded", "n1", T0 + 3)


async def _not_found_with(nc, job: str, text: str) -> ErrorReply | None:
    reply = await get(nc, job)
    return reply if isinstance(reply, ErrorReply) and text in reply.message else None


async def test_an_unknown_job_is_not_found(nc) -> None:
    reply = await get(nc, "no-such-job")
    assert isinstance(reply, ErrorReply)
    assert reply.code == "not_found" and "no-such-job" in reply.message


async def test_a_stale_attempt_is_fenced(nc, publish) -> None:
    job = new_job()
    await publish(submitted(job), ready(job), bound(job), started(job), lost(job))
    await publish(ready(job, 2, at=6), bound(job, 2, node="n2", at=7), started(job, 2, node="n2", at=8))
    await until(nc, job, lambda v: v.state == "running" and v.attempt == 2, "attempt 2 to run")

    await publish(succeeded(job, attempt=1, at=9))  # the lost attempt reports back late

    view = await until(
        nc, job, lambda v: any((e.kind, e.attempt) == ("succeeded", 1) for e in v.events), "the late event"
    )
    assert (view.state, view.attempt, view.node_id) == ("running", 2, "n2")
    assert [(a.attempt, a.state, a.node_id) for a in view.attempts] == [(1, "lost", "n1"), (2, "running", "n2")]


async def test_list_is_newest_first_and_filters(nc, publish) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    jobs = [new_job() for _ in range(3)]
    for i, job in enumerate(jobs):
        await publish(submitted(job, queue=queue, at=100 + i))
    await publish(ready(jobs[2], queue=queue))

    async def listed():
        reply = await list_jobs(nc, queue=queue)
        return reply if len(reply.jobs) == 3 and reply.jobs[0].state == "ready" else None

    reply = await eventually(listed, what="three jobs in the queue")
    assert [j.job_id for j in reply.jobs] == list(reversed(jobs))
    assert [j.submitted_at for j in reply.jobs] == [T0 + 102, T0 + 101, T0 + 100]

    queued = await list_jobs(nc, queue=queue, state="queued")
    assert [j.job_id for j in queued.jobs] == [jobs[1], jobs[0]]
    assert [j.job_id for j in (await list_jobs(nc, queue=queue, limit=1)).jobs] == [jobs[2]]
    assert jobs[2] in [j.job_id for j in (await list_jobs(nc, state="ready", limit=1000)).jobs]
    assert (await list_jobs(nc, queue=f"{queue}-none")).jobs == []


async def watching(nc, job: str) -> list[JobUpdate]:
    """Collect the watch updates of ``job`` from now on."""
    seen: list[JobUpdate] = []
    decoder = msgspec.json.Decoder(JobUpdate)

    async def on_update(msg) -> None:
        seen.append(decoder.decode(msg.data))

    await nc.subscribe(subjects.job_watch(job), cb=on_update)
    await nc.flush()
    return seen


async def test_a_retry_shows_the_next_attempt_retrying(nc, publish) -> None:
    job = new_job()
    await publish(submitted(job), ready(job), bound(job), started(job), failed(job, exit_code=7), retrying(job))

    view = await until(nc, job, lambda v: v.attempt == 2, "the job to move to attempt 2")
    assert (view.state, view.final, view.partition) == ("retrying", False, 0)
    assert view.reason == "after attempt 1: nonzero_exit: exited with 7"
    assert [(a.attempt, a.state) for a in view.attempts] == [(1, "failed"), (2, "retrying")]
    [retry] = [e for e in view.events if e.kind == "retrying"]
    assert (retry.attempt, retry.detail) == (1, "attempt 2 in 1.8s, avoiding n1")
    # The next attempt's own events move it on.
    await publish(ready(job, 2, at=6.3))
    await until(nc, job, lambda v: v.state == "ready" and v.attempt == 2, "attempt 2 to be released")


async def test_a_job_that_gives_up_lists_every_error_and_links_its_fallback(nc, publish) -> None:
    job, fallback = new_job(), new_job()
    seen = await watching(nc, job)
    lost_reason = "no lease renewal for 10s"
    errors = [
        AttemptError(attempt=1, node_id="n1", error=JobError(code="nonzero_exit", message="exited with 7"), at=T0 + 4),
        AttemptError(attempt=2, node_id="n1", error=JobError(code="lost", message=lost_reason), at=T0 + 9),
    ]
    # The give-up comes before attempt 2's own JobLost: the record is the same either way.
    await publish(submitted(job), ready(job), bound(job), started(job), failed(job, exit_code=7), retrying(job))
    await publish(ready(job, 2, at=6.3), bound(job, 2, at=7), started(job, 2, at=8))
    await publish(gave_up(job, errors, fallback=fallback), submitted(fallback, partition=3, fallback_of=job))

    view = await until(nc, job, lambda v: v.final, "the job to be final")
    assert (view.state, view.attempt, view.reason, view.fallback_job_id) == ("lost", 2, lost_reason, fallback)
    await publish(lost(job, 2, at=9, reason=lost_reason))
    view = await until(nc, job, lambda v: len(v.events) == 11, "the attempt's own JobLost to be recorded")
    assert (view.state, view.final, view.reason) == ("lost", True, lost_reason)
    assert [(a.attempt, a.state, a.node_id, a.error) for a in view.attempts] == [
        (e.attempt, s, e.node_id, e.error) for e, s in zip(errors, ("failed", "lost"), strict=True)
    ]
    assert view.attempts[1].reason == lost_reason and view.attempts[1].finished_at == T0 + 9
    [gave] = [e for e in view.events if e.kind == "gave_up"]
    assert (gave.attempt, gave.detail) == (2, f"all 2 attempts failed; fallback job {fallback}")
    assert [e.kind for e in view.events][-3:] == ["started", "lost", "gave_up"]

    other = await until(nc, fallback, lambda v: v.fallback_of == job, "the fallback to name its original")
    assert (other.partition, other.state, other.final, other.fallback_job_id) == (3, "queued", False, "")
    assert "fallback of " + job in other.events[0].detail
    await eventually(lambda: _any(seen, lambda u: u.final and u.state == "lost"), what="a final watch update")


async def _any(updates: list[JobUpdate], predicate) -> bool:
    return any(predicate(u) for u in updates)


async def test_a_cancel_while_running_ends_cancelled(nc, publish) -> None:
    job = new_job()
    seen = await watching(nc, job)
    await publish(submitted(job), ready(job), bound(job), started(job), cancelling(job))

    view = await until(nc, job, lambda v: any(e.kind == "cancelling" for e in v.events), "the cancel to be recorded")
    assert (view.state, view.reason, view.final) == ("running", "cancelling: wrong input", False)
    assert view.attempts[0].reason == "cancelling: wrong input"
    await eventually(lambda: _any(seen, lambda u: u.reason == "cancelling: wrong input"), what="the cancel announced")

    await publish(failed(job, exit_code=-15, at=4, error=JobError(code="cancelled", message="wrong input")))
    await publish(cancelled(job))
    view = await until(nc, job, lambda v: v.final, "the job to be final")
    assert (view.state, view.attempt, view.reason, view.node_id) == ("cancelled", 1, "wrong input", "n1")
    [attempt] = view.attempts
    assert (attempt.state, attempt.reason, attempt.started_at) == ("cancelled", "wrong input", T0 + 3)
    kinds = ["submitted", "ready", "bound", "started", "cancelling", "failed", "cancelled"]
    assert [e.kind for e in view.events] == kinds
    await eventually(lambda: _any(seen, lambda u: u.final and u.state == "cancelled"), what="a final watch update")


async def test_a_cancel_before_any_release_ends_the_job_at_once(nc, publish) -> None:
    job = new_job()
    await publish(submitted(job), cancelled(job, attempt=0, at=1, node=""))
    view = await until(nc, job, lambda v: v.final, "the job to be final")
    assert (view.state, view.attempt, view.reason, view.attempts) == ("cancelled", 0, "wrong input", [])
    assert [(e.kind, e.attempt, e.detail) for e in view.events] == [
        ("submitted", 0, "queue default, tenant default"),
        ("cancelled", 0, "wrong input"),
    ]


async def test_a_success_is_final_and_keeps_its_result(nc, publish) -> None:
    inline, stored = new_job(), new_job()
    await publish(submitted(inline), ready(inline), bound(inline), started(inline), succeeded(inline, result="42\n"))
    await publish(submitted(stored), started(stored), succeeded(stored, result_ref=f"{stored}/1"))

    view = await until(nc, inline, lambda v: v.state == "succeeded", "the job to succeed")
    assert view.final and view.partition == 0
    [attempt] = view.attempts
    assert (attempt.result, attempt.result_ref, attempt.result_bytes) == ("42\n", "", 3)
    assert view.events[-1].detail == "exit 0, result of 3 bytes inline"
    view = await until(nc, stored, lambda v: v.state == "succeeded", "the job to succeed")
    [attempt] = view.attempts
    assert (attempt.result, attempt.result_ref, attempt.result_bytes) == ("", f"{stored}/1", 5_000_000)

    listed = {j.job_id: j for j in (await list_jobs(nc, state="succeeded", limit=1000)).jobs}
    assert listed[inline].final and listed[stored].final


async def test_a_failed_attempt_is_not_final_until_the_scheduler_says(nc, publish) -> None:
    job = new_job()
    await publish(submitted(job), ready(job), bound(job), started(job), failed(job, exit_code=3))
    view = await until(nc, job, lambda v: v.state == "failed", "the attempt to fail")
    assert not view.final
    [summary] = [j for j in (await list_jobs(nc, state="failed", limit=1000)).jobs if j.job_id == job]
    assert not summary.final
    await publish(gave_up(job, [AttemptError(attempt=1, node_id="n1", error=view.attempts[0].error, at=T0 + 4)]))
    view = await until(nc, job, lambda v: v.final, "the give-up to make it final")
    assert (view.state, view.fallback_job_id, view.attempts[0].exit_code) == ("failed", "", 3)


# --- the store on its own --------------------------------------------------------------


@pytest.fixture(scope="module")
async def store(tracker, database_url):
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4, server_settings={"search_path": "tracker"})
    yield Store(pool)
    await pool.close()


class _NoWatchers:
    async def publish(self, subject: str, payload: bytes, headers=None) -> None:
        pass


def _env(message) -> Envelope:
    return Envelope(message, "test", {}, None)


async def test_sql_joins_agree_with_the_fold(store, database_url) -> None:
    """Random orders and batchings, written concurrently, end in what one fold computes.

    Besides, some jobs' events arrive last first, one per batch, so that every fact that
    fills a gap comes after the row exists.
    """
    rng = random.Random(11)
    jobs = [new_job() for _ in range(40)]
    events = []
    backwards = []
    fallbacks = []
    for i, job in enumerate(jobs):
        story = _story(job, i % 4, fallbacks)
        if i < 8:
            backwards += reversed(story)
        else:
            events += story
    jobs += fallbacks
    rng.shuffle(events)
    events += rng.sample(events, 40)  # redeliveries
    handler = EventsHandler(store, _NoWatchers())

    async def writer(part):
        i = 0
        while i < len(part):
            n = rng.randint(1, 25)
            assert await handler([_env(e) for e in part[i : i + n]]) is None
            i += n

    async def one_by_one(part):
        for event in part:
            assert await handler([_env(event)]) is None

    half = len(events) // 2
    await asyncio.gather(writer(events[:half]), writer(events[half:]), one_by_one(backwards))

    expected = fold(events + backwards)
    conn = await asyncpg.connect(database_url, server_settings={"search_path": "tracker"})
    try:
        rows = {r["job_id"]: r for r in await conn.fetch("SELECT * FROM jobs WHERE job_id = ANY($1)", jobs)}
        records = await conn.fetch("SELECT * FROM attempts WHERE job_id = ANY($1)", jobs)
        attempts = {(r["job_id"], r["attempt"]): _state_of(r) for r in records}
        n_events = await conn.fetchval("SELECT count(*) FROM events WHERE job_id = ANY($1)", jobs)
    finally:
        await conn.close()
    assert n_events == len(expected.events)
    for job in expected.jobs:
        row = rows[job.job_id]
        assert _state_of(row) == job.current
        assert (row["name"], row["queue"], row["submitted_at"], row["updated_at"]) == (
            job.name,
            job.queue,
            job.submitted_at,
            job.updated_at,
        )
        assert (row["partition"], row["fallback_job_id"], row["fallback_of"]) == (
            job.partition,
            job.fallback_job_id,
            job.fallback_of,
        )
    assert attempts == {(a.job_id, a.record.attempt): a.record for a in expected.attempts}


# The tables as the tracker made them before the fields of issue 7 (final, partition,
# fallback links, results, cancelling).
_OLD_SCHEMA = """
CREATE TABLE jobs (
    job_id text COLLATE "C" PRIMARY KEY, name text NOT NULL DEFAULT '', queue text NOT NULL DEFAULT '',
    tenant text NOT NULL DEFAULT '', spec json, submitted_at double precision, attempt integer NOT NULL,
    state text NOT NULL, state_rank smallint NOT NULL, state_seq integer NOT NULL DEFAULT 0,
    state_at double precision NOT NULL, reason text NOT NULL DEFAULT '', exit_code integer,
    error_code text NOT NULL DEFAULT '', error_message text NOT NULL DEFAULT '',
    output_tail text NOT NULL DEFAULT '', finished_at double precision, node_id text NOT NULL DEFAULT '',
    bound_at double precision, started_at double precision, updated_at double precision NOT NULL
);
CREATE TABLE attempts (
    job_id text COLLATE "C" NOT NULL, attempt integer NOT NULL, state text NOT NULL,
    state_rank smallint NOT NULL, state_seq integer NOT NULL DEFAULT 0, state_at double precision NOT NULL,
    reason text NOT NULL DEFAULT '', exit_code integer, error_code text NOT NULL DEFAULT '',
    error_message text NOT NULL DEFAULT '', output_tail text NOT NULL DEFAULT '',
    finished_at double precision, node_id text NOT NULL DEFAULT '', bound_at double precision,
    started_at double precision, PRIMARY KEY (job_id, attempt)
);
CREATE TABLE events (
    event_id text COLLATE "C" PRIMARY KEY, job_id text COLLATE "C" NOT NULL, attempt integer NOT NULL,
    kind text NOT NULL, at double precision NOT NULL, detail text NOT NULL DEFAULT ''
);
CREATE FUNCTION advances(old_rank smallint, old_seq integer, old_at double precision,
                         new_rank smallint, new_seq integer, new_at double precision)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT old_rank < 5
       AND (new_rank - (new_rank >= 2)::int, new_seq, new_at, new_rank)
         > (old_rank - (old_rank >= 2)::int, old_seq, old_at, old_rank)
$$;
"""


async def test_a_tracker_starts_on_the_tables_an_older_tracker_made(database_url) -> None:
    schema = f"tracker_old_{uuid.uuid4().hex[:8]}"
    old, done = new_job(), new_job()
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            await conn.execute(f'SET LOCAL search_path TO "{schema}"')
            await conn.execute(_OLD_SCHEMA)
            # A running job and a finished one, as the older tracker recorded them.
            for job, state, rank in ((old, "running", 4), (done, "succeeded", 5)):
                await conn.execute(
                    "INSERT INTO jobs (job_id, spec, submitted_at, attempt, state, state_rank, state_at, node_id,"
                    " updated_at) VALUES ($1, $2::json, $3::float8, 1, $4, $5, $3::float8 + 3, 'n1', $3::float8 + 3)",
                    job,
                    msgspec.json.encode(spec()).decode(),
                    T0,
                    state,
                    rank,
                )
                await conn.execute(
                    "INSERT INTO attempts (job_id, attempt, state, state_rank, state_at, node_id)"
                    " VALUES ($1, 1, $2, $3, $4, 'n1')",
                    job,
                    state,
                    rank,
                    T0 + 3,
                )
    finally:
        await conn.close()
    # Started twice: the second start finds every column there already.
    for _ in range(2):
        pool = await connect_pool(database_url, schema, DDL)
        await pool.close()
    pool = await connect_pool(database_url, schema, DDL)
    try:
        store = Store(pool)
        view, _ = await store.get(old)
        assert view is not None
        assert (view.state, view.final, view.partition, view.fallback_job_id) == ("running", False, -1, "")
        assert view.attempts[0].result == "" and view.attempts[0].reason == ""
        finished, _ = await store.get(done)
        assert finished is not None and finished.final  # an old success reads as final
        # New events land on the old rows.
        cancel = JobError(code="cancelled", message="wrong input")
        await store.write(fold([cancelling(old), failed(old, -15, at=4, error=cancel), cancelled(old)]))
        view, _ = await store.get(old)
        assert view is not None
        assert (view.state, view.final, view.partition, view.node_id) == ("cancelled", True, 0, "n1")
        assert [e.kind for e in view.events] == ["cancelling", "failed", "cancelled"]
        # And a terminal row of the old tracker still keeps its first ending.
        await store.write(fold([failed(done, 1, at=5)]))
        finished, _ = await store.get(done)
        assert finished is not None and finished.state == "succeeded"
    finally:
        async with pool.acquire() as conn:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await pool.close()


def _story(job: str, path: int, fallbacks: list[str]) -> list:
    """One job's events along one of four paths (a fallback job's id goes to ``fallbacks``)."""
    events = [submitted(job), ready(job), bound(job), started(job)]
    if path == 0:  # lost, retried, waiting, released again, bound
        events += [lost(job), ready(job, 2, at=6), unplaceable(job, 2, at=6.5), ready(job, 2, at=7, release=2)]
        events += [bound(job, 2, node="n2", at=8)]
    elif path == 1:  # succeeded with a result
        events += [succeeded(job, result="ok")]
    elif path == 2:  # failed, retried elsewhere, failed again, given up with a fallback
        fallback = new_job()
        error = JobError(code="nonzero_exit", message="exited with 7")
        errors = [AttemptError(attempt=n, node_id=f"n{n}", error=error, at=T0 + 4 * n) for n in (1, 2)]
        events += [failed(job, exit_code=7), retrying(job), ready(job, 2, at=6)]
        events += [bound(job, 2, node="n2", at=7), failed(job, 7, at=8, attempt=2, node="n2")]
        events += [gave_up(job, errors, fallback=fallback), submitted(fallback, partition=3, fallback_of=job)]
        events += [ready(fallback, at=10, partition=3)]
        fallbacks.append(fallback)
    else:  # cancelled while it ran
        cancel = JobError(code="cancelled", message="wrong input")
        events += [cancelling(job), failed(job, -15, at=4, error=cancel), cancelled(job)]
    return events


def _state_of(r) -> AttemptState:
    return AttemptState(
        attempt=r["attempt"],
        state=r["state"],
        rank=r["state_rank"],
        seq=r["state_seq"],
        state_at=r["state_at"],
        reason=r["reason"],
        exit_code=r["exit_code"],
        error_code=r["error_code"],
        error_message=r["error_message"],
        output_tail=r["output_tail"],
        finished_at=r["finished_at"],
        result=r["result"],
        result_ref=r["result_ref"],
        result_bytes=r["result_bytes"],
        node_id=r["node_id"],
        bound_at=r["bound_at"],
        started_at=r["started_at"],
        ends_job=r["ends_job"],
        cancelling=r["cancelling"],
    )


async def test_an_unstorable_event_is_rejected_alone(store, nc) -> None:
    good, bad = new_job(), new_job()
    handler = EventsHandler(store, _NoWatchers())
    # The runtime decides every message's fate, splitting a batch that fails for its content.
    rt = Runtime(Settings.from_env("tracker", {}))
    spec = consumers(Settings.from_env("tracker", {}), handler)[0]
    # Valid on the wire, but beyond what the attempts column holds.
    outcomes = await rt.handle(spec, [_env(submitted(good)), _env(ready(bad, attempt=2**40)), _env(ready(good))])
    assert [type(o) for o in outcomes] == [Ack, Reject, Ack]
    view = await get(nc, good)
    assert isinstance(view, JobView) and view.state == "ready"
