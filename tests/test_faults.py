"""Fault tests that kill real processes mid-flow: every accepted job still ends exactly once."""

from __future__ import annotations

import signal

import asyncpg
import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobSpec, NoopRuntime, ProcessRuntime, Resources, Submission
from tests.cluster_fixtures import dead_letters, tracker_settled
from tests.helpers import eventually
from tests.natsauth_fixtures import AuthNats
from tests.proxy import CuttableProxy

pytestmark = pytest.mark.integration

NODE_ENV = {
    "JOBMESH_NODE_ID": "fault-node",
    "JOBMESH_NODE_CPU_MILLI": "100000000",
    "JOBMESH_NODE_MEMORY_MB": "100000000",
    "JOBMESH_LOG_LEVEL": "WARNING",
}


async def _count(conn, sql: str) -> int:
    return await conn.fetchval(sql)


async def _succeeded(conn, ids: list[str]) -> int:
    """How many of ``ids`` the tracker has recorded as succeeded."""
    return await conn.fetchval(
        "SELECT count(*) FROM tracker.jobs WHERE job_id = ANY($1::text[]) AND state = 'succeeded'", ids
    )


async def _started(conn, ids: list[str]) -> int:
    """How many Started events of ``ids`` the tracker has recorded."""
    return await conn.fetchval(
        "SELECT count(*) FROM tracker.events WHERE job_id = ANY($1::text[]) AND kind = 'started'", ids
    )


async def _submit(url: str, n: int, spec: JobSpec) -> list[str]:
    client = await Client.connect(url, timeout=30)
    try:
        ids: list[str] = []
        for _ in range(n // 250):
            ids.extend((await client.submit([Submission(spec=spec) for _ in range(250)])).job_ids)
        return ids
    finally:
        await client.close()


async def test_kill_9_binder_executor_and_tracker_mid_flow(nats_server, database_url, make_cluster):
    cluster = await make_cluster(env=NODE_ENV, name="faults")
    conn = await asyncpg.connect(database_url)
    try:
        spec = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=1, memory_mb=0))
        ids = await _submit(nats_server.url, 3000, spec)

        async def some_done():
            return await _count(conn, "SELECT count(*) FROM tracker.jobs WHERE state = 'succeeded'") >= 300

        await eventually(some_done, timeout=60, what="the first jobs to finish")
        for name in ("binder", "executor", "tracker"):
            cluster.kill(name)  # SIGKILL: no drain, whatever was in hand is unacked
        for name in ("binder", "executor", "tracker"):
            cluster.start_service(name, tag="-restarted")
        await cluster.wait_healthy(("binder", "executor", "tracker"))

        async def all_done():
            return await _count(conn, "SELECT count(*) FROM tracker.jobs WHERE state = 'succeeded'") == len(ids)

        await eventually(all_done, timeout=120, what="every job to succeed after the restarts")
        await tracker_settled(nats_server.url)  # the killed tracker's in-hand events come back last
        # Exactly one attempt per job, and every reservation given back.
        assert await _count(conn, "SELECT count(*) FROM tracker.attempts") == len(ids)
        assert await _count(conn, "SELECT count(*) FROM tracker.events WHERE kind = 'started'") == len(ids)
        client = await Client.connect(nats_server.url)
        try:

            async def released():
                return all(v.reservations == 0 for v in (await client.nodes()).nodes)

            await eventually(released, timeout=30, what="every reservation to be released")
        finally:
            await client.close()
        cluster.check_alive()
    finally:
        await conn.close()


async def test_nats_server_killed_and_restarted_mid_flow(tmp_path_factory, database_url, make_cluster):
    store = tmp_path_factory.mktemp("nats-fault")
    server = AuthNats(store).start()
    conn = await asyncpg.connect(database_url)
    try:
        cluster = await make_cluster(
            env={**NODE_ENV, "JOBMESH_NODE_ID": "nats-fault-node"}, server=server, name="nats-fault"
        )
        # Processes that take a while, so the outage hits running, bound and queued jobs.
        spec = JobSpec(
            runtime=ProcessRuntime(argv=["sh", "-c", "sleep 0.2"]), resources=Resources(cpu_milli=1, memory_mb=0)
        )
        ids = await _submit(server.url, 500, spec)

        async def some_done():
            return await _succeeded(conn, ids) >= 50

        await eventually(some_done, timeout=60, what="the first jobs to finish")
        server.restart(kill=True)  # SIGKILL the only NATS server, then start it again

        async def all_done():
            return await _succeeded(conn, ids) == len(ids)

        await eventually(all_done, timeout=120, what="every job to succeed after the NATS restart")
        await tracker_settled(server.url)
        assert await _started(conn, ids) == len(ids)
        cluster.check_alive()
    finally:
        await conn.close()
        make_cluster.close()  # the services go before their NATS server
        server.stop()


async def test_postgres_link_cut_and_restored_loses_nothing_and_dead_letters_nothing(
    nats_server, database_url, make_cluster
):
    proxy = await CuttableProxy(database_url).start()
    conn = await asyncpg.connect(database_url)  # the test itself reads past the proxy
    nc = await nats.connect(nats_server.url)
    try:
        cluster = await make_cluster(
            env={**NODE_ENV, "JOBMESH_NODE_ID": "pgcut-node"}, database_url=proxy.url(), name="pgcut"
        )
        js = nc.jetstream()
        letters_before = len(await dead_letters(js))
        spec = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=1, memory_mb=0))
        first = await _submit(nats_server.url, 250, spec)
        proxy.cut()  # scheduler and tracker lose Postgres mid-flow
        second = await _submit(nats_server.url, 250, spec)  # still accepted: submits need NATS only

        async def failures_seen():
            infos = [await js.consumer_info(subjects.STREAM_JOBS, f"scheduler-p{p}") for p in range(4)]
            tracker = await js.consumer_info(subjects.STREAM_JOBS, "tracker-jobs")
            return tracker.num_redelivered > 0 and any(i.num_redelivered > 0 or i.num_ack_pending > 0 for i in infos)

        await eventually(failures_seen, timeout=30, what="the services to hit the outage")
        proxy.restore()
        ids = first + second

        async def all_done():
            return await _succeeded(conn, ids) == len(ids)

        await eventually(all_done, timeout=120, what="every job to succeed once Postgres is back")
        await tracker_settled(nats_server.url)
        assert await _started(conn, ids) == len(ids)
        assert len(await dead_letters(js)) == letters_before, "an outage produced dead letters"
        cluster.check_alive()
    finally:
        await nc.close()
        await conn.close()
        make_cluster.close()  # the services go before the proxy they reach Postgres through
        await proxy.close()


async def test_sigterm_drains_services_mid_flow_and_they_exit_cleanly(nats_server, database_url, make_cluster):
    env = {**NODE_ENV, "JOBMESH_NODE_ID": "drain-node", "JOBMESH_DRAIN_SECONDS": "10", "JOBMESH_LOG_LEVEL": "INFO"}
    cluster = await make_cluster(env=env, name="drain")
    conn = await asyncpg.connect(database_url)
    try:
        spec = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=1, memory_mb=0))
        ids = await _submit(nats_server.url, 2000, spec)

        async def some_done():
            return await _succeeded(conn, ids) >= 200

        await eventually(some_done, timeout=60, what="the first jobs to finish")
        draining = [sp for sp in cluster.procs if sp.name in ("scheduler", "binder", "tracker")]
        for sp in draining:
            sp.proc.send_signal(signal.SIGTERM)
        for sp in draining:
            assert sp.proc.wait(20) == 0, f"{sp.name} did not exit cleanly; see {sp.log_path}"
            assert "stopped:" in sp.log_path.read_text(), f"{sp.name} did not report its drain"
            cluster.procs.remove(sp)
        for name in ("scheduler", "binder", "tracker"):
            cluster.start_service(name, tag="-after-drain")
        await cluster.wait_healthy(("scheduler", "binder", "tracker"))

        async def all_done():
            return await _succeeded(conn, ids) == len(ids)

        await eventually(all_done, timeout=120, what="every job to succeed after the restart")
        # The drained tracker gave back what it held; those events come back behind newer ones.
        await tracker_settled(nats_server.url)
        assert await _started(conn, ids) == len(ids)
        cluster.check_alive()
    finally:
        await conn.close()
