"""A scheduler partition's workflow state survives a new owner: mapped steps, met
dependencies, steps' children and queue clocks are rebuilt from Postgres (a real database),
with the partition driven directly (a recording publisher, no NATS)."""

from __future__ import annotations

import msgspec
import pytest

from jobmesh.contract.ids import job_id_for, map_item_key
from jobmesh.contract.messages.v1 import (
    CancelRequest,
    ChildAdded,
    Dependency,
    JobCancelled,
    JobExpired,
    JobGaveUp,
    JobReady,
    JobSpec,
    JobSubmitted,
    JobSucceeded,
    JobUnplaceable,
    MapSpec,
    NoopRuntime,
    QueueConfig,
    StepRef,
    Timeouts,
)
from jobmesh.errors import Unavailable
from jobmesh.runtime.db import connect_pool
from jobmesh.runtime.service import Envelope
from jobmesh.runtime.tracing import Tracing
from jobmesh.scheduler import store
from jobmesh.scheduler.handlers import PartitionScheduler, Round
from tests.helpers import eventually

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Publisher:
    def __init__(self) -> None:
        self.sent: list = []

    async def publish(self, items):
        items = list(items)
        self.sent.extend(items)
        return [type("Ack", (), {"duplicate": False})() for _ in items]

    def of(self, kind: type) -> list:
        return [o.message for o in self.sent if isinstance(o.message, kind)]


class Placements:
    class _Anywhere:
        def place_job(self, job):
            return ["n1"], [0], ""

        def zone_of(self, node):
            return ""

    _p = _Anywhere()

    def current(self):
        return self._p


class Config:
    zones = None  # read only for its identity (a new map rebuilds placements)

    def queue(self, name):
        return QueueConfig()

    def weight(self, tenant):
        return 1.0


class Results:
    def __init__(self, kept: dict) -> None:
        self.kept_results = kept
        self.manifests: dict = {}

    async def kept(self, job_id):
        return self.kept_results[job_id]

    async def put_manifest(self, job_id, data):
        self.manifests[job_id] = data


@pytest.fixture
async def pool(database_url):
    pool = await connect_pool(database_url, "scheduler", store.DDL)
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE backlog, dep_ends, dep_watches, dep_children, dep_edges")
    yield pool
    await pool.close()


def partition(pool, publisher, clock, results=None) -> PartitionScheduler:
    return PartitionScheduler(
        0, pool, publisher, Placements(), Config(), Tracing.off(), clock=clock, results=results, partitions=1
    )


async def plan_round(part: PartitionScheduler, pool, now: float) -> None:
    """One planning round, as the partition's planner runs it."""
    async with pool.acquire() as conn, conn.transaction():
        await part._publish_and_record(conn, part._plan(now), Round(now))


def env(message) -> Envelope:
    return Envelope(message=message, subject="x", headers={}, context=None)


def submitted(job_id: str, **fields) -> JobSubmitted:
    spec = JobSpec(runtime=NoopRuntime(), **fields)
    return JobSubmitted(job_id=job_id, partition=0, spec=spec, idempotency_key=job_id, submitted_at=1000.0)


def succeeded(job_id: str, at: float = 1001.0) -> JobSucceeded:
    return JobSucceeded(
        job_id=job_id, attempt=1, partition=0, node_id="n1", exit_code=0, output_tail="",
        submitted_at=1000.0, started_at=at, at=at,
    )  # fmt: skip


def mapped_step() -> JobSubmitted:
    return submitted(
        "step",
        step=StepRef(workflow_id="run", step="train"),
        map=MapSpec(over="${steps.prep.result.items}", source="prep", path=["items"]),
        after=[Dependency(job_id="prep", step="prep")],
        keep_result=True,
    )


ITEMS = [job_id_for(map_item_key("step", i)) for i in range(2)]


async def expanded(pool, clock):
    """A partition that ran prep and expanded the mapped step into its two items."""
    pub = Publisher()
    part = partition(pool, pub, clock, Results({"prep": {"items": ["a", "b"]}}))
    await part.load()
    await part.handle([env(submitted("prep")), env(mapped_step())])
    await part.handle([env(succeeded("prep"))])
    assert [m.job_id for m in pub.of(JobSubmitted)] == ITEMS
    return part, pub


async def test_a_new_owner_finds_a_mapped_steps_items_and_ends_it_with_them(pool):
    clock = Clock()
    await expanded(pool, clock)
    pub = Publisher()
    again = partition(pool, pub, clock, Results({}))  # a new owner: it must not read the list again
    await again.load()
    # The first batch after the take-over ends both items at once.
    await again.handle([env(succeeded(ITEMS[0])), env(succeeded(ITEMS[1]))])
    assert pub.of(JobSubmitted) == []  # nothing submitted again
    [done] = pub.of(JobSucceeded)
    assert done.job_id == "step" and done.node_id == ""


async def test_cancelling_a_mapped_step_just_expanded_cancels_its_items(pool):
    clock = Clock()
    part, pub = await expanded(pool, clock)
    reply = await part.cancel(CancelRequest(job_id="step", reason="test"))
    assert reply.state == "cancelled"
    cancelled = {m.job_id for m in pub.of(JobCancelled)}
    assert cancelled == {"step", *ITEMS}


async def test_a_met_dependency_is_not_waited_for_again_after_its_row_is_pruned(pool):
    clock = Clock()
    pub = Publisher()
    part = partition(pool, pub, clock)
    await part.load()
    waiter = submitted("w", after=[Dependency(job_id="a"), Dependency(job_id="b")])
    await part.handle([env(submitted("a")), env(submitted("b")), env(waiter)])
    await part.handle([env(succeeded("a"))])
    # a's row is kept while w waits for b, however old it is.
    assert await store.prune_done(pool, 0, older_than=10**12) == 0
    pub2 = Publisher()
    again = partition(pool, pub2, clock)
    await again.load()
    await again.handle([env(succeeded("b"))])
    await plan_round(again, pool, clock.now)
    assert "w" in {m.job_id for m in pub2.of(JobReady)}
    # Once w has its dependencies, nothing keeps a and b any more.
    await again.handle([env(succeeded("w", at=1002.0))])
    assert await store.prune_done(pool, 0, older_than=10**12) == 3


async def test_the_queue_timeout_of_a_waiter_counts_from_when_its_dependencies_were_met(pool):
    clock = Clock()
    pub = Publisher()
    part = partition(pool, pub, clock)
    await part.load()
    waiter = submitted("w", after=[Dependency(job_id="a")], timeouts=Timeouts(queue=10), queue="q")
    part._config = type("Paused", (Config,), {"queue": lambda self, name: QueueConfig(max_in_flight=1)})()
    part.backlog = part._new_backlog()
    await part.handle([env(submitted("a", queue="q")), env(submitted("blocker", queue="q")), env(waiter)])
    await part.handle([env(succeeded("a"))])  # w's dependencies met at 1000; the blocker holds the slot
    clock.now = 1005.0
    pub2 = Publisher()
    again = partition(pool, pub2, clock)
    again._config = part._config
    await again.load()  # a new owner at 1005 must not restart w's clock
    clock.now = 1011.0
    async with pool.acquire() as conn, conn.transaction():
        decisions = again._plan(clock.now)
        await again._publish_and_record(
            conn, decisions, __import__("jobmesh.scheduler.handlers").scheduler.handlers.Round(clock.now)
        )
    assert "w" in {m.job_id for m in pub2.of(JobExpired)}


async def test_a_child_added_after_its_step_ended_changes_nothing(pool):
    clock = Clock()
    pub = Publisher()
    part = partition(pool, pub, clock)
    await part.load()
    await part.handle([env(submitted("parent")), env(submitted("next", after=[Dependency(job_id="parent")]))])
    await part.handle([env(succeeded("parent"))])
    late = ChildAdded(job_id="parent", partition=0, child="kid", child_partition=0, at=1002.0)
    await part.handle([env(late)])
    again = partition(pool, Publisher(), clock)
    await again.load()
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM dep_children") == 0
        assert await conn.fetchval("SELECT outcome FROM backlog WHERE job_id = 'parent'") == "succeeded"
    assert not pub.of(JobGaveUp)


def test_messages_used_here_decode():
    # The envelopes above carry structs; what a real consumer decodes is the same.
    assert msgspec.json.decode(msgspec.json.encode(succeeded("x")), type=JobSucceeded).job_id == "x"


class FlakyResults(Results):
    """jm_results times out on the first read, then answers."""

    def __init__(self, kept: dict) -> None:
        super().__init__(kept)
        self.reads = 0

    async def kept(self, job_id):
        self.reads += 1
        if self.reads == 1:
            raise TimeoutError("jm_results did not answer")
        return await super().kept(job_id)


async def test_an_object_store_timeout_while_expanding_retries_the_step_and_the_batch_commits(pool):
    clock = Clock()
    pub = Publisher()
    results = FlakyResults({"prep": {"items": ["a", "b"]}})
    part = partition(pool, pub, clock, results)
    await part.load()
    await part.handle([env(submitted("prep")), env(mapped_step())])
    await part.handle([env(succeeded("prep"))])  # the read times out: the batch still commits
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT outcome FROM backlog WHERE job_id = 'prep'") == "succeeded"
    assert pub.of(JobSubmitted) == [] and not part._dirty

    async def expanded_later():
        await plan_round(part, pool, clock.now)
        return [m.job_id for m in pub.of(JobSubmitted)] == ITEMS

    await eventually(expanded_later, timeout=10, what="the step to be expanded on its retry")


async def test_a_batch_that_reaches_a_given_up_partition_is_left_to_its_next_owner(pool):
    # Owner A pulled the binder's refusal just before giving the partition up; its batch
    # reaches the partition's lock only after A quiesced and B loaded the job as released.
    # A must not apply (and ack) it: B would then wait for an answer that never comes.
    clock = Clock()
    pub_a = Publisher()
    a = partition(pool, pub_a, clock)
    await a.load()
    await a.handle([env(submitted("r"))])
    [ready] = pub_a.of(JobReady)
    await a.quiesce()
    b = partition(pool, Publisher(), clock)
    await b.load()
    refusal = JobUnplaceable(
        job_id="r", attempt=1, partition=0, reason="no free capacity on candidate nodes", at=1000.0,
        release=ready.release,
    )  # fmt: skip
    with pytest.raises(Unavailable, match="given up"):
        await a.handle([env(refusal)])
    with pytest.raises(Unavailable, match="given up"):
        await a.cancel(CancelRequest(job_id="r"))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT state FROM backlog WHERE job_id = 'r'") == "released"
    await b.handle([env(refusal)])  # redelivered to the new owner, which takes it
    assert b.backlog.jobs["r"].where == "room"
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT state FROM backlog WHERE job_id = 'r'") == "pending"
