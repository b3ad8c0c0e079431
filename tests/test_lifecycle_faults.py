"""The job lifecycle across real processes: leases, retries, migration, fallback, cancel.

Each test starts its own services on the module's NATS server and database, kills or
stops real processes, and waits on what the tracker records (never on the clock).
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import asyncpg
import msgspec
import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import (
    Allocation,
    FallbackSpec,
    JobSpec,
    JobView,
    NoopRuntime,
    ProcessRuntime,
    QueueConfig,
    Resources,
    RetryPolicy,
    Submission,
    Timeouts,
)
from jobmesh.errors import NotFound
from tests.cluster_fixtures import Service, node_record
from tests.helpers import eventually

pytestmark = pytest.mark.integration

# Short leases, so a lost attempt is noticed within seconds; the node view has to have
# been current for one node TTL before the scheduler decides on a lease.
FAST = {
    "JOBMESH_HEARTBEAT_SECONDS": "0.5",
    "JOBMESH_NODE_TTL_SECONDS": "2",
    "JOBMESH_LOG_LEVEL": "INFO",
}
HEARTBEAT_TIMEOUT = 3.0


# These tests count runs in a file outside the work directory and watch host pids: their
# executors run at the process level, in a work directory the job uid can reach.
OPEN_WORK = Path(tempfile.mkdtemp(prefix="jobmesh-faults-work-"))
os.chmod(OPEN_WORK, 0o755)
atexit.register(shutil.rmtree, OPEN_WORK, True)


def executor(node: str, **env: str) -> Service:
    return Service(
        "executor",
        {
            "JOBMESH_NODE_ID": node,
            "JOBMESH_NODE_CPU_MILLI": "4000",
            "JOBMESH_NODE_MEMORY_MB": "4096",
            "JOBMESH_NODE_ISOLATION": "process",
            "JOBMESH_WORK_DIR": str(OPEN_WORK),
            **env,
        },
        tag=f"-{node}",
    )


CONTROL = ("trigger", "scheduler", "binder", "tracker")


async def view(client: Client, job_id: str) -> JobView | None:
    try:
        return await client.get(job_id)
    except NotFound:
        return None


async def final_view(client: Client, job_id: str, timeout: float = 60.0) -> JobView:
    async def ended() -> JobView | None:
        v = await view(client, job_id)
        return v if v is not None and v.final else None

    return await eventually(ended, timeout=timeout, what=f"job {job_id} to end")


async def reservations(nats_url: str) -> dict[str, int]:
    """How many reservations each node's allocation record holds."""
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(subjects.KV_ALLOC)
        out = {}
        try:
            keys = await kv.keys()
        except Exception:  # noqa: BLE001 - nats-py raises NoKeysError for an empty bucket
            return {}
        for key in keys:
            entry = await kv.get(key)
            out[key] = len(msgspec.json.decode(entry.value, type=Allocation).reservations) if entry.value else 0
        return out
    finally:
        await nc.close()


def runs_file(shared_dir: Path) -> Path:
    path = shared_dir / "runs"
    path.write_text("")
    os.chmod(path, 0o666)
    return path


def counting(path: Path, then: str) -> ProcessRuntime:
    """A command that appends one line per run (outside its working directory), then ``then``."""
    return ProcessRuntime(argv=["sh", "-c", f'echo "$JOBMESH_JOB_ID $JOBMESH_ATTEMPT" >> {path}; {then}'])


async def test_a_killed_executor_s_job_is_retried_elsewhere_within_the_heartbeat_timeout(
    make_cluster, nats_server, shared_dir
):
    cluster = await make_cluster([*CONTROL, executor("a"), executor("b")], env=FAST, name="kill-exec")
    runs = runs_file(shared_dir)
    client = await Client.connect(nats_server.url)
    try:
        # Each attempt says where it started from, then checkpoints.
        then = 'echo "from:$JOBMESH_CHECKPOINT"; echo "checkpoint step-$JOBMESH_ATTEMPT" > /dev/fd/$JOBMESH_PROGRESS_FD; sleep 2'
        spec = JobSpec(
            runtime=counting(runs, then),
            timeouts=Timeouts(heartbeat=HEARTBEAT_TIMEOUT),
            retry=RetryPolicy(max_attempts=3, backoff=0.1),
        )
        [job_id] = (await client.submit([Submission(spec=spec)])).job_ids

        async def running() -> JobView | None:
            v = await view(client, job_id)
            return v if v is not None and v.state == "running" else None

        first = await eventually(running, what="the first attempt to run")

        async def checkpointed() -> bool:
            node = await node_record(nats_server.url, first.node_id)
            return node is not None and any(a.checkpoint == "step-1" for a in node.attempts)

        await eventually(checkpointed, what="attempt 1's checkpoint in its node's lease record")
        victim = [
            sp for sp in cluster.procs if sp.name == "executor" and sp.log_path.name == f"executor-{first.node_id}.log"
        ]
        assert victim, [sp.log_path.name for sp in cluster.procs]
        killed_at = time.monotonic()
        victim[0].proc.kill()
        cluster.procs.remove(victim[0])

        async def moved() -> JobView | None:
            v = await view(client, job_id)
            return v if v is not None and v.attempt == 2 and v.state == "running" else None

        second = await eventually(moved, timeout=30, what="attempt 2 to run on the other node")
        recovery = time.monotonic() - killed_at
        print(f"kill -9 of the executor: attempt 2 running on {second.node_id} after {recovery:.2f}s")
        assert second.node_id != first.node_id
        # Lost within the heartbeat timeout, then released at once (backoff 0.1 s): the
        # retry runs within heartbeat_timeout + the settle of the view + 1 s.
        assert recovery < HEARTBEAT_TIMEOUT + 2.0 + 1.0 + 2.0
        done = await final_view(client, job_id)
        assert done.state == "succeeded" and [a.state for a in done.attempts] == ["lost", "succeeded"]
        assert len(runs.read_text().splitlines()) == 2  # one run per recorded attempt
        # The retry started from what the lost attempt checkpointed.
        assert "from:step-1" in done.attempts[1].output_tail, done.attempts[1].output_tail
    finally:
        await client.close()


async def test_a_stopped_executor_s_late_result_changes_nothing(make_cluster, nats_server, tmp_path):
    cluster = await make_cluster([*CONTROL, executor("a"), executor("b")], env=FAST, name="sigstop")
    client = await Client.connect(nats_server.url)
    try:
        spec = JobSpec(
            runtime=ProcessRuntime(argv=["sh", "-c", "sleep 1; echo done"]),
            timeouts=Timeouts(heartbeat=HEARTBEAT_TIMEOUT),
            retry=RetryPolicy(max_attempts=3, backoff=0.1),
        )
        [job_id] = (await client.submit([Submission(spec=spec)])).job_ids

        async def running() -> JobView | None:
            v = await view(client, job_id)
            return v if v is not None and v.state == "running" else None

        first = await eventually(running, what="the first attempt to run")
        [stopped] = [sp for sp in cluster.procs if sp.log_path.name == f"executor-{first.node_id}.log"]
        os.kill(stopped.proc.pid, signal.SIGSTOP)
        try:
            done = await final_view(client, job_id, timeout=40)
        finally:
            os.kill(stopped.proc.pid, signal.SIGCONT)
        assert done.state == "succeeded" and done.attempt == 2 and done.node_id != first.node_id

        # The stopped executor wakes up and reports attempt 1 late (its process finished
        # meanwhile, or the scheduler's "superseded" stop ended it): that changes nothing.
        async def late_report() -> JobView | None:
            v = await view(client, job_id)
            late = [e for e in (v.events if v else []) if e.attempt == 1 and e.kind in ("succeeded", "failed")]
            return v if late else None

        v = await eventually(late_report, timeout=30, what="attempt 1's late terminal event")
        assert (v.state, v.attempt, v.node_id, v.final) == ("succeeded", 2, done.node_id, True)
        assert v.attempts[0].state == "lost"
    finally:
        await client.close()


async def test_migrate_after_moves_the_third_attempt_and_a_fallback_runs_in_place(make_cluster, nats_server):
    cluster = await make_cluster([*CONTROL, executor("a")], env=FAST, name="migrate")
    client = await Client.connect(nats_server.url)
    try:
        policy = RetryPolicy(max_attempts=3, backoff=0.2, migrate_after=2)
        fails_twice = JobSpec(runtime=ProcessRuntime(argv=["sh", "-c", '[ "$JOBMESH_ATTEMPT" -ge 3 ]']), retry=policy)
        [job_id] = (await client.submit([Submission(spec=fails_twice)])).job_ids

        async def two_failed() -> JobView | None:
            v = await view(client, job_id)
            return v if v is not None and sum(a.state == "failed" for a in v.attempts) == 2 else None

        await eventually(two_failed, what="two failures on node a")
        cluster.start_service("executor", dict(executor("b").env), tag="-b")
        done = await final_view(client, job_id)
        assert done.state == "succeeded"
        assert [(a.attempt, a.node_id, a.state) for a in done.attempts] == [
            (1, "a", "failed"),
            (2, "a", "failed"),
            (3, "b", "succeeded"),
        ]

        always_fails = JobSpec(
            runtime=ProcessRuntime(argv=["sh", "-c", "exit 9"]),
            retry=RetryPolicy(
                max_attempts=2,
                backoff=0.1,
                fallback=FallbackSpec(runtime=ProcessRuntime(argv=["sh", "-c", "echo plan b"])),
            ),
        )
        [original] = (await client.submit([Submission(spec=always_fails)])).job_ids
        ended = await final_view(client, original)
        assert ended.state == "failed" and ended.fallback_job_id
        assert [a.error.code for a in ended.attempts if a.error] == ["exit_code", "exit_code"]
        fallback = await final_view(client, ended.fallback_job_id)
        assert fallback.state == "succeeded" and fallback.fallback_of == original
    finally:
        await client.close()


async def test_cancel_a_queued_a_waiting_and_a_running_job(make_cluster, nats_server):
    await make_cluster([*CONTROL, executor("a")], env=FAST, name="cancel")
    client = await Client.connect(nats_server.url)
    try:
        queued = JobSpec(runtime=NoopRuntime(), not_before=time.time() + 600)
        holder = JobSpec(
            runtime=ProcessRuntime(argv=["sh", "-c", "echo $$ > pid; exec sleep 60"]),
            concurrency_key="db",
            concurrency_limit=1,
        )
        waiter = JobSpec(runtime=NoopRuntime(), concurrency_key="db", concurrency_limit=1)
        [queued_id] = (await client.submit([Submission(spec=queued)])).job_ids
        [running_id] = (await client.submit([Submission(spec=holder)])).job_ids

        async def running() -> JobView | None:
            v = await view(client, running_id)
            return v if v is not None and v.state == "running" else None

        await eventually(running, what="the key holder to run")
        [waiting_id] = (await client.submit([Submission(spec=waiter)])).job_ids
        await eventually(lambda: view(client, waiting_id), what="the waiter to be recorded")
        # The running job's process: its pid file is in its working directory on node a.
        work = OPEN_WORK / "a"
        pid_files = list(work.glob(f"{running_id}-1/pid"))
        assert pid_files, list(work.glob("*"))
        pid = int(pid_files[0].read_text())

        for job_id in (queued_id, waiting_id):
            reply = await client.cancel(job_id, reason="not needed")
            assert reply.state == "cancelled", reply
        started = time.monotonic()
        reply = await client.cancel(running_id, reason="stop it")
        assert reply.state == "cancelling", reply
        for job_id in (queued_id, waiting_id, running_id):
            v = await final_view(client, job_id, timeout=20)
            assert v.state == "cancelled", (job_id, v.state)

        def gone() -> bool:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except FileNotFoundError:
                return True
            return stat.split()[2] == "Z"

        async def process_gone() -> bool:
            return gone()

        await eventually(process_gone, timeout=5, what="the cancelled process to be gone")
        print(f"cancel of a running job: process gone and job cancelled after {time.monotonic() - started:.2f}s")
        assert time.monotonic() - started < 3.0  # SIGTERM ends sleep at once

        async def released() -> bool:
            return sum((await reservations(nats_server.url)).values()) == 0

        await eventually(released, what="the cancelled attempt's reservation to be released")
        # Cancelling a job that has ended is a no-op that says so.
        again = await client.cancel(running_id)
        assert again.state == "ended" and "already ended cancelled" in again.message, again
    finally:
        await client.close()


async def test_an_executor_killed_just_after_a_start_and_restarted_reports_the_attempt_lost(
    make_cluster, nats_server, shared_dir
):
    cluster = await make_cluster([*CONTROL, executor("a")], env=FAST, name="restart")
    runs = runs_file(shared_dir)
    client = await Client.connect(nats_server.url)
    try:
        spec = JobSpec(runtime=counting(runs, "sleep 1"), retry=RetryPolicy(max_attempts=3, backoff=0.1))
        [job_id] = (await client.submit([Submission(spec=spec)])).job_ids

        async def started() -> bool:
            return bool(runs.read_text())

        await eventually(started, what="the command to start")
        [proc] = [sp for sp in cluster.procs if sp.name == "executor"]
        proc.proc.kill()
        cluster.procs.remove(proc)
        restarted_at = time.monotonic()
        cluster.start_service("executor", dict(executor("a").env), tag="-a-again")
        done = await final_view(client, job_id, timeout=60)
        print(f"executor restarted under the same node id: job ended after {time.monotonic() - restarted_at:.2f}s")
        assert done.state == "succeeded"
        first = done.attempts[0]
        said = first.reason + (first.error.message if first.error else "")
        assert first.state == "lost" and "restart" in said, first
        # Every run of the command is a recorded attempt: none ran twice unseen.
        assert len(runs.read_text().splitlines()) == len(done.attempts)
    finally:
        await client.close()


async def test_a_burst_survives_kill_9_of_scheduler_binder_and_tracker(make_cluster, nats_server, database_url):
    cluster = await make_cluster(
        [*CONTROL, executor("a", JOBMESH_NODE_CPU_MILLI="100000000", JOBMESH_NODE_MEMORY_MB="100000000")],
        env={"JOBMESH_LOG_LEVEL": "WARNING"},
        name="burst",
    )
    client = await Client.connect(nats_server.url, timeout=30)
    conn = await asyncpg.connect(database_url)
    try:
        # Released at 200/s, so the burst lasts about ten seconds and every kill lands in it.
        await client.put_config("queue.default", QueueConfig(rate=200, burst=50))
        spec = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=1, memory_mb=0))
        ids: list[str] = []
        for _ in range(8):
            ids.extend((await client.submit([Submission(spec=spec) for _ in range(250)])).job_ids)

        async def finished() -> int:
            return await conn.fetchval(
                "SELECT count(*) FROM tracker.jobs WHERE job_id = ANY($1::text[]) AND (state = 'succeeded' OR ends_job)",
                ids,
            )

        for name in ("scheduler", "binder", "tracker"):
            before = await finished()
            assert before < len(ids), f"the burst ended before the kill of the {name}: nothing was tested"
            cluster.kill(name)
            cluster.start_service(name, tag=f"-{name}-again")
            await cluster.wait_healthy((name,))

            async def progressed(before: int = before) -> bool:
                return await finished() > before

            await eventually(progressed, timeout=60, what=f"jobs to finish after kill -9 of the {name}")

        async def all_final() -> bool:
            return await finished() == len(ids)

        await eventually(all_final, timeout=120, what="every job of the burst to end")
        states = await conn.fetch(
            "SELECT state, count(*) AS n FROM tracker.jobs WHERE job_id = ANY($1::text[]) GROUP BY state", ids
        )
        assert {r["state"]: r["n"] for r in states} == {"succeeded": len(ids)}
        # Exactly one terminal attempt per job, and no reservation left behind.
        assert await conn.fetchval("SELECT count(*) FROM tracker.attempts WHERE job_id = ANY($1::text[])", ids) == len(
            ids
        )

        async def released() -> bool:
            return sum((await reservations(nats_server.url)).values()) == 0

        await eventually(released, what="every reservation to be released")
    finally:
        await client.put_config("queue.default", QueueConfig())  # the module's other tests run unlimited
        await conn.close()
        await client.close()
