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
    ErrorReply,
    JobBound,
    JobError,
    JobFailed,
    JobGetRequest,
    JobListReply,
    JobListRequest,
    JobLost,
    JobReady,
    JobSpec,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    JobUnplaceable,
    JobUpdate,
    JobView,
    NoopRuntime,
)
from jobmesh.runtime.outcomes import Ack, Reject
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.service import Envelope, Runtime
from jobmesh.runtime.settings import Settings
from jobmesh.tracker.fold import AttemptState, fold
from jobmesh.tracker.handlers import EventsHandler, QueryHandler
from jobmesh.tracker.service import consumers, open_store, responders
from jobmesh.tracker.store import Store
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
    }[type(event)]
    return subjects.job_event(event.partition, kind)


def _msg_id(event) -> str:
    return event_id(event.job_id, getattr(event, "attempt", 0), _subject(event).rsplit(".", 1)[-1])


# --- events ----------------------------------------------------------------------------


def new_job() -> str:
    return uuid.uuid4().hex


def spec(queue: str = "default") -> JobSpec:
    return JobSpec(runtime=NoopRuntime(), name="it", queue=queue)


def submitted(job: str, queue: str = "default", at: float = 0.0) -> JobSubmitted:
    return JobSubmitted(job_id=job, partition=0, spec=spec(queue), idempotency_key=job, submitted_at=T0 + at)


def ready(job: str, attempt: int = 1, at: float = 1.0, queue: str = "default", release: int = 1) -> JobReady:
    return JobReady(
        job_id=job,
        attempt=attempt,
        partition=0,
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


def succeeded(job: str, attempt: int = 1, node: str = "n1", at: float = 4.0) -> JobSucceeded:
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
    )


def failed(job: str, exit_code: int, at: float = 4.0) -> JobFailed:
    return JobFailed(
        job_id=job,
        attempt=1,
        partition=0,
        node_id="n1",
        exit_code=exit_code,
        error=JobError(code="nonzero_exit", message=f"exited with {exit_code}"),
        output_tail="oops\n",
        submitted_at=T0,
        started_at=T0 + 3,
        at=T0 + at,
    )


def lost(job: str, attempt: int = 1, at: float = 5.0) -> JobLost:
    return JobLost(job_id=job, attempt=attempt, partition=0, node_id="n1", at=T0 + at)


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
    """Random orders and batchings, written concurrently, end in what one fold computes."""
    rng = random.Random(11)
    jobs = [new_job() for _ in range(30)]
    events = []
    for job in jobs:
        events += [submitted(job), ready(job), bound(job), started(job)]
        if rng.random() < 0.5:
            events += [lost(job), ready(job, 2, at=6), unplaceable(job, 2, at=6.5), ready(job, 2, at=7, release=2)]
            events += [bound(job, 2, node="n2", at=8)]
        else:
            events += [succeeded(job)]
    rng.shuffle(events)
    events += rng.sample(events, 40)  # redeliveries
    handler = EventsHandler(store, _NoWatchers())

    async def writer(part):
        i = 0
        while i < len(part):
            n = rng.randint(1, 25)
            assert await handler([_env(e) for e in part[i : i + n]]) is None
            i += n

    half = len(events) // 2
    await asyncio.gather(writer(events[:half]), writer(events[half:]))

    expected = fold(events)
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
    assert attempts == {(a.job_id, a.record.attempt): a.record for a in expected.attempts}


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
        node_id=r["node_id"],
        bound_at=r["bound_at"],
        started_at=r["started_at"],
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
