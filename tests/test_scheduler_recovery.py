"""The backlog survives kill -9 of the scheduler: every queued job still runs exactly once."""

from __future__ import annotations

import asyncpg
import msgspec
import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobSpec, NoopRuntime, QueueConfig, Resources, Submission
from jobmesh.runtime.clusterconfig import put_config
from tests.helpers import eventually

pytestmark = pytest.mark.integration

JOBS = 10_000
NODE_ENV = {
    "JOBMESH_NODE_ID": "recovery-node",
    "JOBMESH_NODE_CPU_MILLI": "100000000",
    "JOBMESH_NODE_MEMORY_MB": "100000000",
}


class _Counter:
    """Counts lifecycle events per job from the stream itself (an ordered consumer)."""

    def __init__(self) -> None:
        self.per_job: dict[str, int] = {}
        self.total = 0

    async def count(self, msg) -> None:
        job_id = msgspec.json.decode(msg.data)["job_id"]
        self.per_job[job_id] = self.per_job.get(job_id, 0) + 1
        self.total += 1


async def test_kill_9_scheduler_with_10000_queued_runs_each_job_exactly_once(nats_server, database_url, make_cluster):
    cluster = await make_cluster(env={**NODE_ENV, "JOBMESH_LOG_LEVEL": "WARNING"}, name="recovery")
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        # A rate-limited queue keeps most of the 10,000 queued while the scheduler dies.
        await put_config(js, "queue.bulk", QueueConfig(rate=800, burst=100))
        ready, started, succeeded = _Counter(), _Counter(), _Counter()
        await js.subscribe(subjects.job_event("*", subjects.READY), cb=ready.count, ordered_consumer=True)
        # Executors report on the node form of the subjects (every node: "*").
        started_on, succeeded_on = (subjects.node_event("*", k, "*") for k in (subjects.STARTED, subjects.SUCCEEDED))
        await js.subscribe(started_on, cb=started.count, ordered_consumer=True)
        await js.subscribe(succeeded_on, cb=succeeded.count, ordered_consumer=True)

        client = await Client.connect(nats_server.url, timeout=30)
        spec = JobSpec(runtime=NoopRuntime(), queue="bulk", resources=Resources(cpu_milli=1, memory_mb=0))
        job_ids: list[str] = []
        for _ in range(JOBS // 500):
            reply = await client.submit([Submission(spec=spec) for _ in range(500)])
            job_ids.extend(reply.job_ids)
        await client.close()
        assert len(set(job_ids)) == JOBS

        async def some_released():
            return ready.total >= 1500

        await eventually(some_released, timeout=60, what="the first releases")
        cluster.kill("scheduler")  # SIGKILL, mid-release
        released_before = ready.total
        assert released_before < JOBS, "everything was released before the kill; the test proves nothing"
        cluster.start_service("scheduler", tag="-restarted")
        await cluster.wait_healthy(("scheduler",))

        async def all_succeeded():
            return len(succeeded.per_job) >= JOBS

        await eventually(all_succeeded, timeout=180, what="all 10,000 jobs to succeed")
        assert set(succeeded.per_job) == set(job_ids)
        assert max(started.per_job.values()) == 1, "a job ran twice"
        assert set(started.per_job) == set(job_ids)

        conn = await asyncpg.connect(database_url)
        try:

            async def tracker_done():
                return await conn.fetchval("SELECT count(*) FROM tracker.jobs WHERE state = 'succeeded'") == JOBS

            await eventually(tracker_done, timeout=60, what="the tracker to record every success")
            assert await conn.fetchval("SELECT count(*) FROM tracker.attempts") == JOBS

            async def scheduler_done():
                # The scheduler learns of the same terminal events on its own consumer.
                return await conn.fetchval("SELECT count(*) FROM scheduler.backlog WHERE state <> 'done'") == 0

            await eventually(scheduler_done, timeout=60, what="the scheduler to retire every job")
        finally:
            await conn.close()
        cluster.check_alive()
    finally:
        await nc.close()


async def test_finished_jobs_are_pruned_after_the_retention(database_url):
    from jobmesh.runtime.db import connect_pool
    from jobmesh.scheduler import store

    pool = await connect_pool(database_url, "scheduler", store.DDL)
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO backlog (job_id, partition, queue, tenant, priority, state, submitted, submitted_at, updated_at)"
                " VALUES ('old', 3, 'q', 't', 5, 'done', '\\x7b7d', 0, 100), ('new', 3, 'q', 't', 5, 'done', '\\x7b7d', 0, 900),"
                " ('live', 3, 'q', 't', 5, 'pending', '\\x7b7d', 0, 100)"
            )
        assert await store.prune_done(pool, 3, older_than=500) == 1
        left = {r["job_id"] for r in await pool.fetch("SELECT job_id FROM backlog WHERE partition = 3")}
        assert left == {"new", "live"}
    finally:
        await pool.close()
