"""Gangs in the tracker: each member's events kept apart, the members of each attempt in the
job's view, and ``jobmesh status`` showing them.

The integration tests run a tracker in-process against a real nats-server and a real
Postgres, publish the members' events where their producers would (JobBound on each node's
dispatch subject, the executors' events on the node form of the job subjects) and read
the job through the client the CLI uses. The last tests render ``status`` from a view.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import uuid

import asyncpg
import msgspec
import nats
import pytest

from jobmesh.client import jobstate
from jobmesh.client.cli import render
from jobmesh.client.client import Client
from jobmesh.client.jobstate import Seen
from jobmesh.client.timeline import last_refusal, timeline
from jobmesh.contract import subjects
from jobmesh.contract.ids import event_id, member_event_id
from jobmesh.contract.messages.v1 import (
    AttemptError,
    AttemptView,
    EventView,
    ExplainReply,
    JobBound,
    JobError,
    JobFailed,
    JobGaveUp,
    JobReady,
    JobRetrying,
    JobSpec,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    JobUnplaceable,
    JobView,
    MemberSucceeded,
    MemberView,
    NoopRuntime,
)
from jobmesh.errors import NotFound
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.service import Envelope, Runtime
from jobmesh.runtime.settings import Settings
from jobmesh.tracker.fold import fold
from jobmesh.tracker.handlers import EventsHandler, QueryHandler
from jobmesh.tracker.service import consumers, open_store, responders
from jobmesh.tracker.store import Store, prune, write_args, write_query
from tests.helpers import eventually

T0 = 1_700_000_000.0
NODES = ("n1", "n2", "n3")
EXIT_7 = JobError(code="nonzero_exit", message="exited with 7")
STOPPED = JobError(code="cancelled", message="another member of the gang failed")

# --- events ----------------------------------------------------------------------------


def gang(replicas: int = 3) -> JobSpec:
    return JobSpec(runtime=NoopRuntime(), name="train", replicas=replicas)


def plain() -> JobSpec:
    return JobSpec(runtime=NoopRuntime(), name="plain")


def new_job() -> str:
    return uuid.uuid4().hex


def submitted(job: str, spec: JobSpec | None = None, t0: float = T0) -> JobSubmitted:
    return JobSubmitted(job_id=job, partition=0, spec=spec or gang(), idempotency_key=job, submitted_at=t0)


def ready(job: str, spec: JobSpec | None = None, attempt: int = 1, t0: float = T0) -> JobReady:
    return JobReady(
        job_id=job,
        attempt=attempt,
        partition=0,
        spec=spec or gang(),
        candidates=list(NODES),
        submitted_at=t0,
        ready_at=t0 + 1,
    )


def bound(job: str, rank: int, attempt: int = 1, t0: float = T0, world_size: int = 3) -> JobBound:
    return JobBound(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=NODES[rank],
        spec=gang(world_size) if world_size > 1 else plain(),
        scratch_dir="/scratch",
        submitted_at=t0,
        bound_at=t0 + 2 + rank / 10,
        rank=rank,
        world_size=world_size,
        peers=[f"{n}:7000" for n in NODES[:world_size]] if world_size > 1 else [],
    )


def started(job: str, rank: int, attempt: int = 1, t0: float = T0, world_size: int = 3) -> JobStarted:
    return JobStarted(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=NODES[rank],
        at=t0 + 3 + rank / 10,
        rank=rank,
        world_size=world_size,
    )


def member_succeeded(job: str, rank: int, attempt: int = 1, t0: float = T0) -> MemberSucceeded:
    return MemberSucceeded(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=NODES[rank],
        rank=rank,
        world_size=3,
        exit_code=0,
        output_tail=f"rank {rank} done\n",
        started_at=t0 + 3 + rank / 10,
        at=t0 + 5 + rank / 10,
    )


def failed(job: str, rank: int, attempt: int = 1, t0: float = T0, error: JobError = EXIT_7) -> JobFailed:
    return JobFailed(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=NODES[rank],
        exit_code=7 if error is EXIT_7 else -15,
        error=error,
        output_tail="oops\n",
        submitted_at=t0,
        started_at=t0 + 3,
        at=t0 + 6 + rank / 10,
        rank=rank,
        world_size=3,
    )


def retrying(job: str, t0: float = T0) -> JobRetrying:
    return JobRetrying(
        job_id=job,
        attempt=1,
        partition=0,
        node_id=NODES[2],
        error=EXIT_7,
        next_attempt=2,
        delay=1.0,
        not_before=t0 + 8,
        avoid=[NODES[2]],
        at=t0 + 7,
    )


def gave_up(job: str, t0: float = T0) -> JobGaveUp:
    error = AttemptError(attempt=1, node_id=NODES[2], error=EXIT_7, at=t0 + 6.2)
    return JobGaveUp(
        job_id=job,
        attempt=1,
        partition=0,
        state="failed",
        node_id=NODES[2],
        error=EXIT_7,
        reason="all 1 attempts failed",
        errors=[error],
        at=t0 + 7,
    )


def succeeded(job: str, t0: float = T0) -> JobSucceeded:
    return JobSucceeded(
        job_id=job,
        attempt=1,
        partition=0,
        node_id=NODES[0],
        exit_code=0,
        output_tail="rank 0 done\n",
        submitted_at=t0,
        started_at=t0 + 3,
        at=t0 + 5.2,
    )


# The kinds executors publish on the node form of the job subjects.
_NODE_FORM = {JobStarted: subjects.STARTED, JobFailed: subjects.FAILED, MemberSucceeded: subjects.MEMBER_SUCCEEDED}
_PARTITION_FORM = {
    JobSubmitted: subjects.SUBMITTED,
    JobReady: subjects.READY,
    JobUnplaceable: subjects.UNPLACEABLE,
    JobSucceeded: subjects.SUCCEEDED,
    JobRetrying: subjects.RETRYING,
    JobGaveUp: subjects.GAVE_UP,
}


def _outgoing(event, suffix: str = "") -> Outgoing:
    n = getattr(event, "attempt", 0)
    if isinstance(event, JobBound):
        subject, kind = subjects.node_dispatch(event.node_id), subjects.BOUND
    elif type(event) in _NODE_FORM:
        kind = _NODE_FORM[type(event)]
        subject = subjects.node_event(event.partition, kind, event.node_id)
    else:
        kind = _PARTITION_FORM[type(event)]
        subject = subjects.job_event(event.partition, kind)
    rank = getattr(event, "rank", 0)
    msg_id = member_event_id(event.job_id, n, kind, rank) if rank else event_id(event.job_id, n, kind)
    return Outgoing(subject, event, msg_id + suffix)


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def tracker(nats_server, database_url):
    """A tracker on the library runtime, serving until the module's tests are done."""
    settings = Settings(nats_url=nats_server.url, database_url=database_url, service="tracker", instance="gangs-1")
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
    probe = await nats.connect(nats_server.url)

    async def answers() -> bool:
        try:
            await probe.request(subjects.health("tracker"), b"", timeout=0.5)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return False
        return True

    await eventually(answers, what="the tracker to answer health checks")
    yield rt
    await probe.close()
    rt.stop()
    await serving
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


@pytest.fixture
async def client(nats_server, tracker):
    """The client the CLI uses (``Client.get`` is what ``jobmesh status`` asks)."""
    nc = await nats.connect(nats_server.url)
    yield Client(nc, timeout=5)
    await nc.close()


@pytest.fixture
def publish(client):
    publisher = Publisher(client.nc.jetstream())

    async def send(*events, suffix: str = "") -> None:
        await publisher.publish(_outgoing(e, suffix) for e in events)

    return send


@pytest.fixture(scope="module")
async def pool(tracker, database_url):
    """A pool on the tracker's tables (made by the tracker's start)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4, server_settings={"search_path": "tracker"})
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
def store(pool) -> Store:
    return Store(pool)


async def until(client: Client, job: str, predicate, what: str) -> JobView:
    async def probe() -> JobView | None:
        try:
            view = await client.get(job)
        except NotFound:
            return None
        return view if predicate(view) else None

    return await eventually(probe, what=what)


def members(view: JobView, attempt: int = 1) -> list[tuple[int, str, str]]:
    [a] = [a for a in view.attempts if a.attempt == attempt]
    return [(m.rank, m.node_id, m.state) for m in a.members]


async def drained(client: Client, publish) -> None:
    """Wait until the tracker has handled everything published so far on both streams."""
    marker = new_job()
    await publish(submitted(marker, plain()), bound(marker, 0, world_size=1))
    await until(
        client, marker, lambda v: {"submitted", "bound"} <= {e.kind for e in v.events}, "the tracker to catch up"
    )


class _NoWatchers:
    async def publish(self, subject: str, payload: bytes, headers=None) -> None:
        pass


def _env(message) -> Envelope:
    return Envelope(message, "test", {}, None)


# --- against a tracker -----------------------------------------------------------------


@pytest.mark.integration
async def test_the_view_shows_each_member_of_a_gangs_attempt(client, publish) -> None:
    job = new_job()
    await publish(submitted(job), ready(job), *(bound(job, r) for r in range(3)), *(started(job, r) for r in range(3)))
    # Bound events come through the tracker's dispatch consumer, which may lag the other.
    view = await until(
        client,
        job,
        lambda v: (
            v.attempts
            and [m[2] for m in members(v)] == ["running"] * 3
            and sum(e.kind == "bound" for e in v.events) == 3
        ),
        "three members bound and running",
    )
    assert members(view) == [(0, "n1", "running"), (1, "n2", "running"), (2, "n3", "running")]
    assert (view.state, view.node_id) == ("running", "n1")  # the attempt shows rank 0's node

    # Two members done: the attempt goes on.
    await publish(member_succeeded(job, 0), member_succeeded(job, 1))
    view = await until(
        client, job, lambda v: [m[2] for m in members(v)][:2] == ["succeeded"] * 2, "two members to succeed"
    )
    assert (view.state, view.final, view.attempts[0].state) == ("running", False, "running")
    assert members(view)[2] == (2, "n3", "running")

    # One member fails: so does the attempt, and the member says why.
    await publish(failed(job, 2))
    view = await until(client, job, lambda v: v.state == "failed", "the attempt to fail")
    assert not view.final
    assert members(view) == [(0, "n1", "succeeded"), (1, "n2", "succeeded"), (2, "n3", "failed")]
    [attempt] = view.attempts
    assert [m.detail for m in attempt.members] == ["", "", "nonzero_exit: exited with 7 (exit 7)"]
    assert [m.at for m in attempt.members] == [T0 + 5, T0 + 5.1, T0 + 6.2]
    assert (attempt.node_id, attempt.error) == ("n1", EXIT_7)
    kinds = [e.kind for e in view.events]
    assert {k: kinds.count(k) for k in ("bound", "started", "member_succeeded", "failed")} == {
        "bound": 3,
        "started": 3,
        "member_succeeded": 2,
        "failed": 1,
    }
    details = [(e.kind, e.detail) for e in view.events if e.attempt == 1 and e.kind != "ready"]
    assert details == [
        ("bound", "member 0 on node n1"),
        ("bound", "member 1 on node n2"),
        ("bound", "member 2 on node n3"),
        ("started", "member 0 on node n1"),
        ("started", "member 1 on node n2"),
        ("started", "member 2 on node n3"),
        ("member_succeeded", "member 0 on node n1 succeeded"),
        ("member_succeeded", "member 1 on node n2 succeeded"),
        ("failed", "member 2 on node n3: nonzero_exit: exited with 7 (exit 7)"),
    ]

    # Earlier states arriving late (redelivered under new ids) change nothing.
    await publish(bound(job, 1), started(job, 0), member_succeeded(job, 1), suffix=":again")
    await drained(client, publish)
    assert await client.get(job) == view

    # The retry moves the job on; the old attempt keeps its members.
    await publish(retrying(job))
    view = await until(client, job, lambda v: v.attempt == 2, "attempt 2")
    assert (view.state, [a.attempt for a in view.attempts]) == ("retrying", [1, 2])
    assert members(view, 1)[2] == (2, "n3", "failed") and members(view, 2) == []


@pytest.mark.integration
async def test_a_gang_that_succeeds_ends_with_the_schedulers_success(client, publish) -> None:
    job = new_job()
    await publish(submitted(job), ready(job), *(bound(job, r) for r in range(3)), *(started(job, r) for r in range(3)))
    await publish(*(member_succeeded(job, r) for r in range(3)))
    view = await until(
        client, job, lambda v: v.attempts and {m[2] for m in members(v)} == {"succeeded"}, "every member to succeed"
    )
    assert (view.state, view.final) == ("running", False)
    await publish(succeeded(job))
    view = await until(client, job, lambda v: v.final, "the job to be final")
    assert (view.state, view.node_id, view.attempts[0].output_tail) == ("succeeded", "n1", "rank 0 done\n")


@pytest.mark.integration
async def test_a_plain_job_writes_no_member_and_runs_the_statement_it_always_ran(client, publish, pool) -> None:
    job = new_job()
    events = [submitted(job, plain()), ready(job, plain()), bound(job, 0, world_size=1), started(job, 0, world_size=1)]
    folded = fold(events)
    assert folded.members == [] and "members" not in write_query(folded) and len(write_args(folded)) == 3
    gang_batch = fold([bound("g", 1)])
    assert "INSERT INTO members" in write_query(gang_batch) and len(write_args(gang_batch)) == 4

    await publish(*events)
    # The JobBound comes through the tracker's dispatch consumer, which may lag the other.
    view = await until(
        client,
        job,
        lambda v: v.state == "running" and sum(e.kind in ("bound", "started") for e in v.events) == 2,
        "the plain job to run, bound and started",
    )
    assert view.attempts[0].members == []
    assert [e.detail for e in view.events if e.kind in ("bound", "started")] == ["node n1", "node n1"]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM members WHERE job_id = $1", job) == 0


@pytest.mark.integration
async def test_the_sql_upsert_of_members_agrees_with_the_fold(store, pool) -> None:
    """Random orders and batchings of gang stories, written concurrently, end in the rows
    one fold computes: jobs, attempts, members and events."""
    rng = random.Random(23)
    jobs = [new_job() for _ in range(12)]
    events: list = []
    gave_up_jobs: set[str] = set()
    for i, job in enumerate(jobs):
        story = [submitted(job), ready(job), *(bound(job, r) for r in range(3)), *(started(job, r) for r in range(3))]
        if i % 3 == 0:  # one member fails, another is stopped for it, the scheduler retries
            story += [member_succeeded(job, 0), failed(job, 2), failed(job, 1, error=STOPPED), retrying(job)]
        elif i % 3 == 1:  # every member succeeds
            story += [*(member_succeeded(job, r) for r in range(3)), succeeded(job)]
        else:  # one fails and the scheduler gives up
            story += [failed(job, 1), gave_up(job)]
            gave_up_jobs.add(job)
        events += story
    rng.shuffle(events)
    events += rng.sample(events, 30)  # redeliveries
    handler = EventsHandler(store, _NoWatchers())

    async def writer(part: list) -> None:
        i = 0
        while i < len(part):
            n = rng.randint(1, 8)
            await handler([_env(e) for e in part[i : i + n]])
            i += n

    half = len(events) // 2
    await asyncio.gather(writer(events[:half]), writer(events[half:]))

    expected = fold(events)
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM members WHERE job_id = ANY($1) ORDER BY job_id, attempt, rank", jobs)
        records = await conn.fetch("SELECT * FROM attempts WHERE job_id = ANY($1)", jobs)
        n_events = await conn.fetchval("SELECT count(*) FROM events WHERE job_id = ANY($1)", jobs)
    assert [(r["job_id"], r["attempt"], r["rank"], r["node_id"], r["state"], r["at"], r["detail"]) for r in rows] == [
        (m.job_id, m.attempt, m.rank, m.node_id, m.state, m.at, m.detail) for m in expected.members
    ]

    def columns(record: dict, job: str) -> dict:
        # The one fact that depends on the order: a give-up that comes before every event
        # of rank 0 fills the attempt's node with the node the scheduler names.
        return {k: v for k, v in record.items() if not (k == "node_id" and job in gave_up_jobs)}

    stored = {(r["job_id"], r["attempt"]): columns(dict(r), r["job_id"]) for r in records}
    assert stored == {
        (a.job_id, a.record.attempt): columns({"job_id": a.job_id, **msgspec.to_builtins(a.record)}, a.job_id)
        for a in expected.attempts
    }
    assert n_events == len(expected.events)
    for job in jobs:
        view, _ = await store.get(job)
        assert view is not None
        assert [(m.rank, m.state) for m in view.attempts[0].members] == [
            (m.rank, m.state) for m in expected.members if m.job_id == job and m.attempt == 1
        ]


@pytest.mark.integration
async def test_pruning_a_gang_deletes_its_members_too(store, pool) -> None:
    old = T0 - 10_000_000  # older than anything else in this module
    job = new_job()
    events = [submitted(job, t0=old), ready(job, t0=old), *(bound(job, r, t0=old) for r in range(3))]
    events += [*(member_succeeded(job, r, t0=old) for r in range(3)), succeeded(job, t0=old)]
    await store.write(fold(events))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM members WHERE job_id = $1", job) == 3
    gone = await prune(pool, old + 100, 100)
    assert gone == [job]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM members WHERE job_id = $1", job) == 0
    assert await store.get(job) == (None, False)


# --- what `jobmesh status` prints -------------------------------------------------------


def _view(**fields) -> JobView:
    base = dict(
        job_id="a" * 32,
        name="train",
        queue="default",
        tenant="default",
        state="failed",
        reason="nonzero_exit: exited with 7",
        attempt=1,
        node_id="n1",
        submitted_at=T0,
        updated_at=T0 + 7,
        spec=gang(),
    )
    base.update(fields)
    return JobView(**base)


def test_status_shows_one_line_per_member_with_why_one_failed(capsys) -> None:
    gang_members = [
        MemberView(rank=0, node_id="n1", state="succeeded", at=T0 + 5),
        MemberView(rank=1, node_id="node-22", state="failed", at=T0 + 6.5, detail="cancelled: stopped"),
        MemberView(rank=2, node_id="n3", state="failed", at=T0 + 6, detail="nonzero_exit: exited with 7 (exit 7)"),
    ]
    attempt = AttemptView(
        attempt=1,
        state="failed",
        node_id="n1",
        exit_code=7,
        error=EXIT_7,
        started_at=T0 + 3,
        finished_at=T0 + 6,
        members=list(reversed(gang_members)),  # by rank whatever the order
    )
    shown = _view(attempts=[attempt])
    render.job_status(shown, Seen("failed", "nonzero_exit: exited with 7", 1, "n1", 7), as_json=False)
    out = capsys.readouterr().out.splitlines()
    assert "gang     3 members, one per node" in out
    at = out.index("      error: nonzero_exit: exited with 7")
    assert out[at + 1 : at + 4] == [
        "      member 0  n1       succeeded",
        "      member 1  node-22  failed     cancelled: stopped",
        "      member 2  n3       failed     nonzero_exit: exited with 7 (exit 7)",
    ]
    # A plain job's attempt has no member lines.
    render.job_status(_view(spec=plain(), attempts=[AttemptView(attempt=1, state="running")]), Seen("running"), False)
    assert "member" not in capsys.readouterr().out
    assert [s.members for s in timeline(shown)] == [tuple(gang_members)]
    # --json carries the members as the view does.
    render.job_status(shown, Seen("failed"), as_json=True)
    out_json = json.loads(capsys.readouterr().out)
    assert [m["rank"] for m in out_json["attempts"][0]["members"]] == [2, 1, 0]
    assert out_json["attempts"][0]["members"][0]["detail"] == "nonzero_exit: exited with 7 (exit 7)"


def test_a_pending_gang_shows_why_the_binder_refused_it(capsys) -> None:
    refusal = "needs 4 nodes with 100m cpu and 64 MiB; 3 free"
    events = [
        EventView(kind="submitted", attempt=0, at=T0),
        EventView(kind="ready", attempt=1, at=T0 + 1),
        EventView(kind="unplaceable", attempt=1, at=T0 + 1.5, detail="needs 4 nodes; 2 free"),
        EventView(kind="ready", attempt=1, at=T0 + 2),
        EventView(kind="unplaceable", attempt=1, at=T0 + 2.5, detail=refusal),
        EventView(kind="ready", attempt=1, at=T0 + 3),
    ]
    pending = _view(state="ready", reason="", node_id="", spec=gang(4), events=events, attempts=[])
    assert last_refusal(pending) == events[4]
    # Released again, the scheduler says only that: the refusal still shows.
    seen = jobstate.seen_in_view(
        pending, ExplainReply(job_id=pending.job_id, where="released", reason="released to the binder")
    )
    render.job_status(pending, seen, as_json=False)
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "state    ready (released to the binder)"
    assert out[2].startswith(f"refused  {refusal} (")
    # Held for room, the scheduler's reason is the refusal: said once.
    waiting = _view(state="waiting", reason=refusal, node_id="", spec=gang(4), events=events, attempts=[])
    seen = jobstate.seen_in_view(waiting, ExplainReply(job_id=waiting.job_id, where="room", reason=refusal))
    render.job_status(waiting, seen, as_json=False)
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"state    waiting ({refusal})" and not any(line.startswith("refused") for line in out)
    # A scheduler without words leaves the tracker's reason standing.
    assert jobstate.resolve("waiting", refusal, ExplainReply(job_id="x", where="room", reason="")) == (
        "waiting",
        refusal,
    )
    # Once bound, or of an earlier attempt, a refusal is history.
    assert last_refusal(_view(state="running", events=events)) is None
    assert last_refusal(_view(state="ready", attempt=2, events=events)) is None
