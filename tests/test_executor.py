"""The executor against a real nats-server: a real ``python -m jobmesh.executor`` process.

Tests publish ``JobBound`` on the node's dispatch subject and watch what comes out on the
JM_JOBS and JM_LOGS streams and in the ``jm_nodes`` KV bucket.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import nats
import pytest
from nats.js.errors import KeyNotFoundError

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import (
    AttemptCancel,
    JobBound,
    JobFailed,
    JobSpec,
    JobStarted,
    JobSucceeded,
    LifecycleEvent,
    LogLine,
    NodeInfo,
    NoopRuntime,
    ProcessRuntime,
    Resources,
    Timeouts,
)
from jobmesh.runtime.provisioning import provision
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.tracing import carried as extract
from jobmesh.runtime.tracing import trace_id_of
from tests.helpers import eventually

pytestmark = pytest.mark.integration

NODE = "exec-test-1"
TTL = 3.0


class Collector:
    """Every message on a stream since the test module started, decoded, with headers."""

    def __init__(self, kind) -> None:
        self._decoder = msgspec.json.Decoder(kind)
        self.items: list[tuple[object, dict[str, str]]] = []

    async def on_message(self, msg) -> None:
        self.items.append((self._decoder.decode(msg.data), dict(msg.headers or {})))

    def of(self, job_id: str, kind: type | None = None) -> list:
        return [m for m, _ in self.items if m.job_id == job_id and (kind is None or isinstance(m, kind))]

    def headers_of(self, job_id: str, kind: type) -> list[dict[str, str]]:
        return [h for m, h in self.items if m.job_id == job_id and isinstance(m, kind)]


def start_executor(nats_url: str, node_id: str, work_dir: Path, **extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "JOBMESH_NATS_URL": nats_url,
        "JOBMESH_NODE_ID": node_id,
        "JOBMESH_WORK_DIR": str(work_dir),
        "JOBMESH_NODE_TTL_SECONDS": str(TTL),
        # These tests watch host pids and marker files: no pid or mount namespace.
        "JOBMESH_NODE_ISOLATION": "process",
        **extra,
    }
    return subprocess.Popen([sys.executable, "-m", "jobmesh.executor"], env=env, start_new_session=True)


def stop_process(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


class Harness:
    """A NATS client, the stream collectors and a way to dispatch jobs to a node."""

    def __init__(self, nc, js, jobs: Collector, logs: Collector, work_dir: Path) -> None:
        self.nc, self.js, self.jobs, self.logs, self.work_dir = nc, js, jobs, logs, work_dir
        self.publisher = Publisher(js)

    async def node_record(self, node_id: str = NODE) -> NodeInfo | None:
        kv = await self.js.key_value(subjects.KV_NODES)
        try:
            entry = await kv.get(node_id)
        except KeyNotFoundError:
            return None
        return msgspec.json.decode(entry.value, type=NodeInfo) if entry.value else None

    async def dispatch(
        self,
        runtime,
        node_id: str = NODE,
        run_timeout: float = 60.0,
        msg_id: str | None = None,
        job_id: str | None = None,
        context=None,
        disk_mb: int = 0,
        attempt: int = 1,
        checkpoint: str = "",
        total_timeout: float = 0.0,
        submitted_at: float | None = None,
    ) -> JobBound:
        bound = JobBound(
            job_id=job_id or f"j-{uuid.uuid4().hex[:12]}",
            attempt=attempt,
            partition=0,
            node_id=node_id,
            spec=JobSpec(
                runtime=runtime,
                timeouts=Timeouts(run=run_timeout, total=total_timeout),
                resources=Resources(disk_mb=disk_mb),
            ),
            scratch_dir="",
            submitted_at=time.time() if submitted_at is None else submitted_at,
            bound_at=time.time(),
            checkpoint=checkpoint,
        )
        msg_id = msg_id or f"{bound.job_id}:{bound.attempt}:bound"
        await self.publisher.publish([Outgoing(subjects.node_dispatch(node_id), bound, msg_id, context)])
        return bound

    async def redispatch(self, bound: JobBound, msg_id: str) -> None:
        """Publish ``bound`` again under another message id, as a redelivery would bring it."""
        await self.publisher.publish([Outgoing(subjects.node_dispatch(bound.node_id), bound, msg_id)])

    async def cancel(self, job_id: str, attempt: int = 1, node_id: str = NODE, reason: str = "test cancel") -> None:
        message = AttemptCancel(
            job_id=job_id, attempt=attempt, partition=0, node_id=node_id, reason=reason, at=time.time()
        )
        msg_id = f"{job_id}:{attempt}:cancel"
        await self.publisher.publish([Outgoing(subjects.node_cancel(node_id), message, msg_id)])

    async def all_acked(self, node_id: str = NODE) -> bool:
        """Whether the node's durable has acked everything in JM_DISPATCH it was given."""
        info = await self.js.consumer_info(subjects.STREAM_DISPATCH, subjects.durable("executor", node_id))
        stream = await self.js.stream_info(subjects.STREAM_DISPATCH)
        return info.ack_floor.stream_seq >= stream.state.last_seq and info.num_ack_pending == 0

    async def terminal(self, job_id: str, timeout: float = 20.0):
        async def probe():
            found = self.jobs.of(job_id, JobSucceeded) + self.jobs.of(job_id, JobFailed)
            return found[0] if found else None

        return await eventually(probe, timeout=timeout, what=f"a terminal event of {job_id}")


@pytest.fixture(scope="module")
async def harness(nats_server, work_dir):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await provision(js, node_ttl=TTL)
    jobs, logs = Collector(LifecycleEvent), Collector(LogLine)
    sub_jobs = await js.subscribe(subjects.JOBS_ALL, cb=jobs.on_message, ordered_consumer=True)
    sub_logs = await js.subscribe(subjects.LOGS_ALL, cb=logs.on_message, ordered_consumer=True)
    yield Harness(nc, js, jobs, logs, work_dir)
    await sub_jobs.unsubscribe()
    await sub_logs.unsubscribe()
    await nc.close()


@pytest.fixture(scope="module")
async def executor(harness, nats_server, work_dir):
    proc = start_executor(
        nats_server.url,
        NODE,
        work_dir,
        JOBMESH_HEARTBEAT_SECONDS="0.3",
        JOBMESH_NODE_CPU_MILLI="4000",
        JOBMESH_NODE_MEMORY_MB="2048",
        JOBMESH_NODE_LABELS="disk=ssd, tier=gold",
        JOBMESH_NODE_ZONE="z1",
    )
    await eventually(harness.node_record, what="the node record in KV")
    yield proc
    assert stop_process(proc) == 0


async def test_node_record_has_capacity_and_is_refreshed(harness, executor, work_dir):
    first = await harness.node_record()
    assert first.node_id == NODE
    assert first.cpu_milli == 4000 and first.memory_mb == 2048
    assert first.labels == {"disk": "ssd", "tier": "gold"}
    assert first.zone == "z1"
    assert first.runtimes == ["process", "noop"]
    assert first.work_dir == str(work_dir / NODE)
    assert not first.draining
    assert len(first.incarnation) == 32 and first.attempts == [] and first.ended == []

    async def refreshed():
        record = await harness.node_record()
        return record is not None and record.heartbeat_at > first.heartbeat_at

    await eventually(refreshed, what="a newer heartbeat_at")


async def test_echo_succeeds_with_output_and_log_line(harness, executor, work_dir):
    bound = await harness.dispatch(
        ProcessRuntime(argv=["sh", "-c", 'echo hi; echo "home=$HOME id=$JOBMESH_JOB_ID"; exit 0'])
    )
    done = await harness.terminal(bound.job_id)
    assert isinstance(done, JobSucceeded), done
    assert done.exit_code == 0 and done.node_id == NODE
    assert "hi" in done.output_tail
    workdir = work_dir / NODE / f"{bound.job_id}-1"
    assert f"home={workdir} id={bound.job_id}" in done.output_tail
    assert done.submitted_at == bound.submitted_at and done.started_at <= done.at
    started = harness.jobs.of(bound.job_id, JobStarted)
    assert len(started) == 1 and started[0].node_id == NODE

    async def log_line():
        return [line for line in harness.logs.of(bound.job_id) if line.line == "hi"]

    lines = await eventually(log_line, what="LogLine 'hi' in JM_LOGS")
    assert lines[0].stream == "stdout" and lines[0].attempt == 1

    async def workdir_removed():
        return not workdir.exists()

    await eventually(workdir_removed, what="the working directory to be removed")


async def test_stderr_is_streamed_too(harness, executor):
    bound = await harness.dispatch(ProcessRuntime(argv=["sh", "-c", "echo oops >&2"]))
    await harness.terminal(bound.job_id)

    async def line():
        return [entry for entry in harness.logs.of(bound.job_id) if entry.stream == "stderr" and entry.line == "oops"]

    await eventually(line, what="the stderr line")


async def test_nonzero_exit_fails_with_its_code(harness, executor):
    bound = await harness.dispatch(ProcessRuntime(argv=["sh", "-c", "exit 7"]))
    done = await harness.terminal(bound.job_id)
    assert isinstance(done, JobFailed)
    assert done.exit_code == 7
    assert done.error.code == "exit_code" and done.error.message == "exited with code 7"


async def test_run_timeout_kills_the_process_group(harness, executor):
    # The child in the background proves the whole group is killed, not just the shell.
    bound = await harness.dispatch(ProcessRuntime(argv=["sh", "-c", "sleep 30 & echo $!; wait"]), run_timeout=1.0)

    async def child_pid():
        lines = harness.logs.of(bound.job_id)
        return int(lines[0].line) if lines else None

    pid = await eventually(child_pid, what="the child's pid")
    done = await harness.terminal(bound.job_id)
    assert isinstance(done, JobFailed)
    assert done.error.code == "timeout" and done.exit_code is None

    async def gone():
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # only a zombie left
        except FileNotFoundError:
            return True

    await eventually(gone, timeout=10, what=f"process {pid} to be gone")


async def test_an_attempt_gets_only_what_is_left_of_the_total_timeout(harness, executor):
    # Submitted 9 s ago with a total of 10 s: this attempt may run one second more.
    bound = await harness.dispatch(
        ProcessRuntime(argv=["sleep", "30"]), total_timeout=10.0, submitted_at=time.time() - 9.0
    )
    started = time.monotonic()
    done = await harness.terminal(bound.job_id)
    assert isinstance(done, JobFailed) and done.error.code == "timeout"
    assert "total timeout of 10s" in done.error.message
    assert time.monotonic() - started < 8.0  # not the run timeout of 60 s


async def test_scratch_directory_over_its_disk_quota_fails_the_attempt(harness, executor):
    bound = await harness.dispatch(
        ProcessRuntime(argv=["sh", "-c", "head -c 3000000 /dev/zero > big; echo written; sleep 30"]), disk_mb=1
    )
    done = await harness.terminal(bound.job_id)
    assert isinstance(done, JobFailed)
    assert done.error.code == "disk_quota_exceeded" and "1 MiB disk quota" in done.error.message
    within = await harness.dispatch(
        ProcessRuntime(argv=["sh", "-c", "head -c 100000 /dev/zero > small; sleep 1.5"]), disk_mb=1
    )
    assert isinstance(await harness.terminal(within.job_id), JobSucceeded)


async def test_writing_past_the_quota_and_exiting_at_once_fails_the_attempt(harness, executor):
    # Exits well within the watchdog's first second: only the check at exit can catch it.
    bound = await harness.dispatch(
        ProcessRuntime(argv=["sh", "-c", "dd if=/dev/zero of=big bs=1M count=20 2>/dev/null; echo written"]),
        disk_mb=5,
    )
    done = await harness.terminal(bound.job_id)
    assert isinstance(done, JobFailed)
    assert done.error.code == "disk_quota_exceeded" and "of its 5 MiB disk quota" in done.error.message
    assert done.exit_code == 0 and "written" in done.output_tail
    assert not harness.jobs.of(bound.job_id, JobSucceeded)


async def test_missing_command_is_spawn_failed(harness, executor):
    bound = await harness.dispatch(ProcessRuntime(argv=["no-such-command-jobmesh"]))
    done = await harness.terminal(bound.job_id)
    assert isinstance(done, JobFailed)
    assert done.exit_code is None
    assert done.error.code == "spawn_failed"
    assert "no-such-command-jobmesh" in done.error.message


async def test_duplicate_job_bound_runs_once(harness, executor, shared_dir):
    marker = shared_dir / "runs"
    runtime = ProcessRuntime(argv=["sh", "-c", f"echo run >> {marker}"])
    job_id = f"dup-{uuid.uuid4().hex[:8]}"
    # Different Nats-Msg-Ids, so the stream keeps both copies and the executor sees both.
    await harness.dispatch(runtime, job_id=job_id, msg_id=f"{job_id}:a")
    await harness.dispatch(runtime, job_id=job_id, msg_id=f"{job_id}:b")
    await harness.terminal(job_id)

    await eventually(harness.all_acked, what="both copies to be acked")
    assert marker.read_text() == "run\n"
    assert len(harness.jobs.of(job_id, JobStarted)) == 1
    assert len(harness.jobs.of(job_id, JobSucceeded)) == 1


async def test_noop_succeeds_and_fails_on_request(harness, executor):
    ok = await harness.dispatch(NoopRuntime())
    bad = await harness.dispatch(NoopRuntime(exit_code=3))
    done_ok = await harness.terminal(ok.job_id)
    done_bad = await harness.terminal(bad.job_id)
    assert isinstance(done_ok, JobSucceeded) and done_ok.exit_code == 0
    assert isinstance(done_bad, JobFailed) and done_bad.exit_code == 3 and done_bad.error.code == "exit_code"
    assert len(harness.jobs.of(ok.job_id, JobStarted)) == 1


async def test_trace_context_continues_through_the_executor(harness, executor):
    trace_id = uuid.uuid4().hex
    context = extract({"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"})
    bound = await harness.dispatch(NoopRuntime(), context=context)
    await harness.terminal(bound.job_id)
    for kind in (JobStarted, JobSucceeded):
        (headers,) = harness.jobs.headers_of(bound.job_id, kind)
        assert trace_id_of(headers) == trace_id, kind.__name__


async def test_sigterm_drains_running_attempts(harness, nats_server, work_dir):
    node = "exec-test-drain"
    proc = start_executor(nats_server.url, node, work_dir, JOBMESH_DRAIN_SECONDS="1", JOBMESH_HEARTBEAT_SECONDS="0.3")
    try:
        await eventually(lambda: harness.node_record(node), what="the draining node's record")
        kv = await harness.js.key_value(subjects.KV_NODES)
        seen: list[NodeInfo | None] = []
        watcher = await kv.watch(node)

        async def watch() -> None:
            async for entry in watcher:
                if entry is not None:
                    seen.append(msgspec.json.decode(entry.value, type=NodeInfo) if entry.value else None)

        watching = asyncio.ensure_future(watch())
        bound = await harness.dispatch(ProcessRuntime(argv=["sleep", "30"]), node_id=node)
        await eventually(lambda: _async(harness.jobs.of(bound.job_id, JobStarted)), what="Started")
        proc.send_signal(signal.SIGTERM)
        done = await harness.terminal(bound.job_id)
        assert isinstance(done, JobFailed) and done.error.code == "node_drained"
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert await harness.node_record(node) is None

        async def drained_then_deleted():
            return any(info is not None and info.draining for info in seen) and seen[-1] is None

        await eventually(drained_then_deleted, what="a draining record, then a delete")
        watching.cancel()
        await watcher.stop()
    finally:
        stop_process(proc)


async def _async(value):
    return value
