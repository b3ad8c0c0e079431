"""History retention against a real nats-server and a real Postgres.

A tracker runs on the library runtime, with a pruner whose clock the test moves: finished
jobs older than the retention go in batches while new jobs keep arriving, jobs still
running stay, `jobs.list` and `jobs.get` keep answering, and the log lines of a pruned job
go with it. The last test is the idempotency case: a key whose job was pruned and then ran
again shows the new run, never the old one.
"""

from __future__ import annotations

import asyncio
import signal
import uuid

import msgspec
import nats
import pytest
from nats.js.errors import NotFoundError

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.ids import event_id
from jobmesh.contract.messages.v1 import (
    ErrorReply,
    JobBound,
    JobGetRequest,
    JobListReply,
    JobListRequest,
    JobReady,
    JobSpec,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    JobView,
    NoopRuntime,
)
from jobmesh.runtime.db import connect_pool
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.service import Runtime
from jobmesh.runtime.settings import Settings
from jobmesh.tracker.handlers import EventsHandler, QueryHandler
from jobmesh.tracker.retention import Pruner, log_purger
from jobmesh.tracker.service import consumers, open_store, responders
from jobmesh.tracker.store import DDL
from tests.helpers import eventually

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
RETENTION = 3_600.0
_reply = msgspec.json.Decoder(JobView | ErrorReply)
_list_reply = msgspec.json.Decoder(JobListReply | ErrorReply)


class Clock:
    """The pruner's clock, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
async def tracker(nats_server, database_url):
    """A tracker serving, and a pruner on its own pool with an injected clock."""
    settings = Settings(nats_url=nats_server.url, database_url=database_url, service="tracker", instance="ret-1")
    rt = Runtime(settings)
    await rt.connect()
    store, pool = await open_store(settings)
    prune_pool = await connect_pool(database_url, "tracker", DDL, max_size=1)
    clock = Clock(T0)
    pruner = Pruner(prune_pool, RETENTION, batch=7, clock=clock, purge=log_purger(rt.js), pause=0.0)

    async def close() -> None:
        await prune_pool.close()
        await pool.close()

    serving = asyncio.ensure_future(
        rt.serve(
            consumers=consumers(settings, EventsHandler(store, rt.nc)),
            responders=responders(QueryHandler(store)),
            on_stop=close,
        )
    )
    client = await nats.connect(nats_server.url)
    await eventually(lambda: _answers(client, subjects.health("tracker")), what="the tracker to answer health checks")
    yield pruner, clock
    await client.close()
    rt.stop()
    await serving
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


@pytest.fixture
async def nc(nats_server, tracker):
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


async def _answers(client, subject: str) -> bool:
    try:
        await client.request(subject, b"", timeout=0.5)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return False
    return True


# --- events ----------------------------------------------------------------------------

SPEC = JobSpec(runtime=NoopRuntime(), name="ret", queue="ret")


def lifecycle(job: str, at: float, end: bool = True, result: str = "") -> list:
    """A job's events as its producers send them, starting at ``at``; ``end``: it succeeded."""
    events: list = [
        JobSubmitted(job_id=job, partition=0, spec=SPEC, idempotency_key=job, submitted_at=at),
        JobReady(job_id=job, attempt=1, partition=0, spec=SPEC, candidates=["n1"], submitted_at=at, ready_at=at + 1),
        JobBound(
            job_id=job,
            attempt=1,
            partition=0,
            node_id="n1",
            spec=SPEC,
            scratch_dir="/s",
            submitted_at=at,
            bound_at=at + 2,
        ),
        JobStarted(job_id=job, attempt=1, partition=0, node_id="n1", at=at + 3),
    ]
    if end:
        events.append(
            JobSucceeded(
                job_id=job,
                attempt=1,
                partition=0,
                node_id="n1",
                exit_code=0,
                output_tail="",
                submitted_at=at,
                started_at=at + 3,
                at=at + 4,
                result=result,
                result_bytes=len(result),
            )
        )
    return events


_KIND = {
    JobSubmitted: subjects.SUBMITTED,
    JobReady: subjects.READY,
    JobStarted: subjects.STARTED,
    JobSucceeded: subjects.SUCCEEDED,
}


def _subject(event) -> str:
    if isinstance(event, JobBound):
        return subjects.node_dispatch(event.node_id)
    return subjects.job_event(event.partition, _KIND[type(event)])


async def publish(nc, events, suffix: str = "") -> None:
    """Publish where the producers would; ``suffix`` stands for a repeat after the window."""
    out = (
        Outgoing(_subject(e), e, event_id(e.job_id, getattr(e, "attempt", 0), _subject(e).rsplit(".", 1)[-1]) + suffix)
        for e in events
    )
    await Publisher(nc.jetstream()).publish(out)


async def get(nc, job: str) -> JobView | ErrorReply:
    msg = await nc.request(subjects.API_JOB_GET, encode(JobGetRequest(job_id=job)), timeout=5)
    return _reply.decode(msg.data)


async def listed(nc, **kw) -> list[str]:
    msg = await nc.request(subjects.API_JOB_LIST, encode(JobListRequest(limit=1000, **kw)), timeout=5)
    reply = _list_reply.decode(msg.data)
    assert isinstance(reply, JobListReply), reply
    return [j.job_id for j in reply.jobs]


def jobs(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


async def recorded(nc, ids: list[str], final: bool) -> bool:
    views = await asyncio.gather(*(get(nc, j) for j in ids))
    return all(isinstance(v, JobView) and v.final == final for v in views)


# --- tests -----------------------------------------------------------------------------


async def test_old_finished_jobs_are_pruned_in_batches_while_new_jobs_flow(nc, tracker):
    pruner, clock = tracker
    old_done, old_running = jobs(40), jobs(3)
    for job in old_done:
        await publish(nc, lifecycle(job, T0))
    for job in old_running:
        await publish(nc, lifecycle(job, T0, end=False))
    js = nc.jetstream()
    await js.publish(subjects.job_log(old_done[0]), b"a line of output")
    await js.publish(subjects.job_log(old_running[0]), b"still running")
    await eventually(lambda: recorded(nc, old_done, True), what="the old jobs to be recorded as final")
    await eventually(lambda: recorded(nc, old_running, False), what="the running jobs to be recorded")

    # Within the retention, nothing goes.
    clock.now = T0 + RETENTION - 1
    assert await pruner.round() == 0

    # Past it, the finished ones go in batches of 7 while new jobs keep arriving.
    clock.now = T0 + RETENTION + 10
    new = jobs(30)

    async def flow() -> None:
        for job in new:
            await publish(nc, lifecycle(job, clock.now - 5))

    before = pruner.batches
    pruned, _ = await asyncio.gather(pruner.round(), flow())
    assert pruned == len(old_done)
    assert pruner.batches - before >= len(old_done) // 7
    await eventually(lambda: recorded(nc, new, True), what="the new jobs to be recorded while pruning")

    for job in old_done[:5]:
        reply = await get(nc, job)
        assert isinstance(reply, ErrorReply) and reply.code == "not_found", reply
    assert await recorded(nc, old_running, False)
    shown = await listed(nc, queue="ret")
    assert set(shown) == set(old_running) | set(new)
    assert set(await listed(nc, states=["running"])) >= set(old_running)

    # The pruned job's log lines went with it; a running job's stay.
    with pytest.raises(NotFoundError):
        await js.get_last_msg(subjects.STREAM_LOGS, subjects.job_log(old_done[0]))
    assert (await js.get_last_msg(subjects.STREAM_LOGS, subjects.job_log(old_running[0]))).data == b"still running"

    # The new jobs are not old yet; a second round finds nothing.
    assert await pruner.round() == 0


async def test_a_key_run_again_after_its_job_was_pruned_shows_the_new_run(nc, tracker):
    pruner, clock = tracker
    pruned_key, kept_key = jobs(2)
    first = T0 + 100_000
    for job in (pruned_key, kept_key):
        await publish(nc, lifecycle(job, first, result="first run"))
    await eventually(lambda: recorded(nc, [pruned_key, kept_key], True), what="the first runs to end")

    # Only the first job is old enough: the second ended after the cutoff.
    clock.now = first + 4 + RETENTION + 1
    await publish(nc, lifecycle(kept_key, first + 10, result="first run"), suffix=":again")  # a late repeat
    # Recorded before the round, so the kept job's last change is after the cutoff.
    await eventually(lambda: _has_events(nc, kept_key, first + 10), what="the late repeat to be recorded")
    # The scheduler runs the pruned key again (it forgot the job one round after the
    # tracker did, JOBMESH_DONE_RETENTION_SECONDS); a repeat inside the window is deduped.
    assert await pruner.round() >= 1
    again = clock.now + 50
    await publish(nc, lifecycle(pruned_key, again, result="second run"), suffix=":rerun")

    async def shows_second() -> JobView | None:
        view = await get(nc, pruned_key)
        return view if isinstance(view, JobView) and view.final else None

    view = await eventually(shows_second, what="the re-run to be recorded")
    assert view.submitted_at == again
    assert [a.result for a in view.attempts] == ["second run"]
    assert {e.at for e in view.events} == {again + d for d in range(5)}

    # The hazard the ordering of the windows prevents: a re-run that merges into a row the
    # tracker still holds keeps showing the first outcome.
    await publish(nc, lifecycle(kept_key, again, result="second run"), suffix=":rerun")
    await eventually(lambda: _has_events(nc, kept_key, again), what="the late re-run's events to be recorded")
    kept = await get(nc, kept_key)
    assert isinstance(kept, JobView)
    assert [a.result for a in kept.attempts] == ["first run"]


async def _has_events(nc, job: str, at: float) -> bool:
    view = await get(nc, job)
    # Event ids repeat in a re-run, so its events are dropped: its JobSubmitted time is not
    # kept either. What the tracker did take is the row's last change time.
    return isinstance(view, JobView) and view.updated_at >= at + 4
