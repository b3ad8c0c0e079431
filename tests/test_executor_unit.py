"""Executor parts without NATS: node facts, the reporter, the process runner, the handler.

The reporter runs against a fake publisher; processes are real (``sh``), since starting
one costs milliseconds and a fake would hide exactly what these tests are for.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import msgspec
import pytest
from opentelemetry import trace

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import (
    Constraints,
    ContainerRuntime,
    GpuDevice,
    HandlerRuntime,
    JobBound,
    JobFailed,
    JobLost,
    JobSpec,
    JobStarted,
    JobSucceeded,
    LogLine,
    NoopRuntime,
    ProcessRuntime,
    Resources,
    Timeouts,
)
from jobmesh.errors import InvalidSpec, Overloaded, Unavailable
from jobmesh.executor.attempts import Attempts, AttemptSetup
from jobmesh.executor.handlers import DispatchHandler
from jobmesh.executor.isolation.probe import NodeIsolation
from jobmesh.executor.leases import LeaseBook
from jobmesh.executor.node import (
    MachineFacts,
    build_node_info,
    parse_labels,
    parse_meminfo,
    resolve_node_id,
    sanitize_node_id,
)
from jobmesh.executor.outcomes import Outcome, exit_outcome, failed_outcome
from jobmesh.executor.quota import directory_bytes, outcome_after_exit, quota_error
from jobmesh.executor.reporter import Reporter
from jobmesh.executor.runner import MAX_LINE_BYTES, AbortSignal, OutputTail, ProcessRunner
from jobmesh.executor.runrequest import RunRequest
from jobmesh.executor.secrets import SecretSource
from jobmesh.executor.service import check_settings, job_base_env
from jobmesh.runtime.outcomes import ACK, Reject
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.service import Envelope
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import carried as extract
from tests.helpers import eventually

FACTS = MachineFacts(hostname="build-01.example.com", cpu_count=8, memory_mb=16_000, arch="aarch64")
NODE = "n1"


# --- node.py ---------------------------------------------------------------------------
def test_parse_labels_accepts_spacing_trailing_commas_and_equals_in_values():
    assert parse_labels("") == {}
    assert parse_labels(" disk=ssd , tier = gold,") == {"disk": "ssd", "tier": "gold"}
    assert parse_labels("expr=a=b,empty=") == {"expr": "a=b", "empty": ""}
    assert parse_labels("topology.kubernetes.io/zone=z1") == {"topology.kubernetes.io/zone": "z1"}


@pytest.mark.parametrize("text", ["disk", "=ssd", "disk=ssd,disk=hdd", "bad key=1", "a=1,,b"])
def test_parse_labels_refuses_bad_input_naming_the_variable(text):
    with pytest.raises(InvalidSpec) as info:
        parse_labels(text)
    assert "JOBMESH_NODE_LABELS" in str(info.value)
    assert info.value.field == "node_labels"


def test_bad_labels_in_the_environment_fail_clearly():
    settings = Settings.from_env("executor", {"JOBMESH_NODE_LABELS": "gpu"})
    with pytest.raises(InvalidSpec, match="JOBMESH_NODE_LABELS"):
        build_node_info(settings, FACTS, 1.0)


def test_parse_meminfo():
    text = "MemTotal:       24684092 kB\nMemFree:        22324704 kB\n"
    assert parse_meminfo(text) == 24684092 // 1024
    assert parse_meminfo("nothing here") == 0


@pytest.mark.parametrize(
    ("hostname", "node_id"),
    [
        ("build-01.example.com", "build-01-example-com"),
        ("worker_7", "worker_7"),
        ("..weird host!!", "weird-host"),
        ("", "node"),
        ("x" * 100, "x" * 64),
    ],
)
def test_sanitize_node_id(hostname, node_id):
    assert sanitize_node_id(hostname) == node_id


def test_node_id_from_settings_must_be_valid():
    assert resolve_node_id(Settings(node_id="gpu-3"), FACTS) == "gpu-3"
    with pytest.raises(InvalidSpec, match="JOBMESH_NODE_ID"):
        resolve_node_id(Settings(node_id="a.b"), FACTS)


def test_node_info_defaults_come_from_the_machine():
    info = build_node_info(Settings(), FACTS, 123.0)
    assert info.node_id == "build-01-example-com"
    assert info.cpu_milli == 8000 and info.memory_mb == 16_000
    assert info.arch == "aarch64"
    assert info.runtimes == ["process", "noop"]
    assert info.work_dir.endswith("/build-01-example-com")
    assert info.started_at == info.heartbeat_at == 123.0 and not info.draining


def test_node_info_settings_win():
    settings = Settings.from_env(
        "executor",
        {
            "JOBMESH_NODE_ID": "n9",
            "JOBMESH_NODE_CPU_MILLI": "1500",
            "JOBMESH_NODE_MEMORY_MB": "512",
            "JOBMESH_NODE_GPU": "2",
            "JOBMESH_NODE_GPU_KIND": "a100",
            "JOBMESH_NODE_DISK_MB": "99",
            "JOBMESH_NODE_ZONE": "eu-1",
            "JOBMESH_NODE_ISOLATION": "sandbox",
            "JOBMESH_NODE_LABELS": "disk=ssd",
            "JOBMESH_WORK_DIR": "/srv/jm",
        },
    )
    info = build_node_info(settings, FACTS, 1.0)
    assert (info.node_id, info.cpu_milli, info.memory_mb, info.gpu, info.gpu_kind) == ("n9", 1500, 512, 2, "a100")
    assert (info.disk_mb, info.zone, info.isolation, info.labels) == (99, "eu-1", "sandbox", {"disk": "ssd"})
    assert info.work_dir == "/srv/jm/n9"


def test_heartbeat_must_fit_well_within_the_ttl():
    check_settings(Settings(heartbeat_seconds=2, node_ttl_seconds=10))
    with pytest.raises(InvalidSpec, match="JOBMESH_HEARTBEAT_SECONDS"):
        check_settings(Settings(heartbeat_seconds=6, node_ttl_seconds=10))


def test_job_base_env_has_only_path_and_lang():
    assert job_base_env({"PATH": "/x", "SECRET": "s"}) == {"PATH": "/x", "LANG": "C.UTF-8"}
    assert job_base_env({})["PATH"] == "/usr/local/bin:/usr/bin:/bin"


# --- runner.py and outcomes.py: pure parts ---------------------------------------------
def test_output_tail_keeps_the_last_characters():
    tail = OutputTail(limit=10)
    for i in range(100):
        tail.add(f"line{i}\n")
    assert tail.text() == "98\nline99\n"[-10:]
    assert len(tail.text()) == 10
    small = OutputTail(limit=100)
    small.add("hi\n")
    assert small.text() == "hi\n"


def test_exit_outcomes():
    assert exit_outcome(0).error is None
    failed = exit_outcome(7)
    assert failed.exit_code == 7 and failed.error.code == "exit_code"
    assert failed.error.message == "exited with code 7"
    killed = exit_outcome(-9)
    assert killed.exit_code == -9 and "SIGKILL" in killed.error.message


# --- quota.py ----------------------------------------------------------------------------
MIB = 1024 * 1024


def test_directory_bytes_counts_files_below_and_follows_no_links(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "b").write_bytes(b"y" * 24)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"z" * 5000)
    (tmp_path / "link").symlink_to(outside, target_is_directory=True)
    assert directory_bytes(tmp_path) == 1024
    assert directory_bytes(tmp_path / "missing") == 0


def test_quota_error_only_past_the_quota():
    assert quota_error(MIB, 1) is None  # exactly the quota is within it
    over = quota_error(MIB + 1, 1)
    assert over is not None and over.code == "disk_quota_exceeded"
    assert over.message == "used 1.0 MiB of its 1 MiB disk quota"
    assert quota_error(10**12, 0) is None  # disk_mb 0: no quota, not measured


def test_a_process_that_exited_past_its_quota_fails_with_its_exit_code_kept():
    judged = outcome_after_exit(exit_outcome(0, "written\n"), 20 * MIB, 5)
    assert judged.error is not None and judged.error.code == "disk_quota_exceeded"
    assert judged.exit_code == 0 and judged.output_tail == "written\n"
    assert "5 MiB disk quota" in judged.error.message
    failed = outcome_after_exit(exit_outcome(1), 20 * MIB, 5)  # e.g. "no space left": the quota is the cause
    assert failed.error is not None and failed.error.code == "disk_quota_exceeded" and failed.exit_code == 1


def test_within_quota_or_stopped_for_another_reason_keeps_the_outcome():
    ok = exit_outcome(0)
    assert outcome_after_exit(ok, 4 * MIB, 5) is ok
    assert outcome_after_exit(ok, 20 * MIB, 0) is ok
    for code in ("timeout", "node_drained", "disk_quota_exceeded", "spawn_failed"):
        stopped = failed_outcome(code, "why")
        assert outcome_after_exit(stopped, 20 * MIB, 5) is stopped


# --- reporter.py -------------------------------------------------------------------------
class FakePublisher:
    """Records each publish call; fails the first ``failures`` calls with ``error``."""

    def __init__(self, failures: int = 0, error: Exception | None = None, delay: float = 0.0) -> None:
        self.calls: list[list[Outgoing]] = []
        self.failures = failures
        self.error = error or Unavailable("no PubAck")
        self.delay = delay
        self.gate: asyncio.Event | None = None

    async def publish(self, items):
        items = list(items)
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)  # simulates a slow publisher (a deliberate sleep: noqa)
        if self.failures:
            self.failures -= 1
            raise self.error
        self.calls.append(items)
        return [None] * len(items)

    @property
    def messages(self) -> list:
        return [item.message for call in self.calls for item in call]


def outgoing(n: int) -> Outgoing:
    return Outgoing(f"test.{n}", n, f"id-{n}")


async def test_reporter_batches_in_order_up_to_max_batch():
    publisher = FakePublisher()
    reporter = Reporter(publisher, max_batch=100)
    reporter.start()
    try:
        await reporter.emit([outgoing(i) for i in range(250)])
        assert publisher.messages == list(range(250))
        assert [len(call) for call in publisher.calls] == [100, 100, 50]
    finally:
        await reporter.close(1)


async def test_reporter_publishes_what_is_there_without_waiting_for_a_full_batch():
    publisher = FakePublisher()
    reporter = Reporter(publisher, max_batch=500)
    reporter.start()
    try:
        await asyncio.wait_for(reporter.emit([outgoing(1)]), 1)
        assert publisher.calls == [[outgoing(1)]]
    finally:
        await reporter.close(1)


async def test_reporter_collects_while_a_flush_is_in_flight():
    publisher = FakePublisher()
    publisher.gate = asyncio.Event()
    reporter = Reporter(publisher, max_batch=500)
    reporter.start()
    try:
        first = reporter.emit([outgoing(0)])
        await asyncio.sleep(0)  # the flusher takes item 0 and blocks on the gate (a deliberate sleep: noqa)
        later = [reporter.emit([outgoing(i)]) for i in range(1, 6)]
        publisher.gate.set()
        await asyncio.gather(first, *later)
        assert [len(call) for call in publisher.calls] == [1, 5]
    finally:
        await reporter.close(1)


@pytest.mark.parametrize("error", [Unavailable("down"), Overloaded("full")])
async def test_reporter_retries_without_losing_or_reordering(error):
    publisher = FakePublisher(failures=3, error=error)
    reporter = Reporter(publisher, max_batch=10, retry_base=0.001, retry_max=0.01)
    reporter.start()
    try:
        durable = reporter.emit([outgoing(i) for i in range(25)])
        await asyncio.sleep(0)  # one loop turn, then a negative check (a deliberate sleep: noqa)
        assert not durable.done()
        await asyncio.wait_for(durable, 2)
        assert publisher.messages == list(range(25))
        assert reporter.retries == 3
        assert reporter.problem() is None
    finally:
        await reporter.close(1)


async def test_reporter_reports_a_problem_while_publishing_fails():
    publisher = FakePublisher(failures=10_000)
    reporter = Reporter(publisher, retry_base=0.001, retry_max=0.001)
    reporter.start()
    try:
        reporter.post([outgoing(1)])

        async def problem():
            return reporter.problem()

        assert "unavailable" in await eventually(problem, timeout=2, what="a health problem")
    finally:
        publisher.failures = 0
        await reporter.close(1)


async def test_reporter_holds_back_log_lines_when_the_backlog_is_full():
    publisher = FakePublisher()
    publisher.gate = asyncio.Event()
    reporter = Reporter(publisher, max_batch=2, max_backlog=4)
    reporter.start()
    try:
        await reporter.emit_log(outgoing(0))
        await asyncio.sleep(0.01)  # the flusher takes it and waits on the gate (a deliberate sleep: noqa)
        for i in range(1, 5):  # fills the backlog
            await asyncio.wait_for(reporter.emit_log(outgoing(i)), 1)
        blocked = asyncio.ensure_future(reporter.emit_log(outgoing(5)))
        await asyncio.sleep(0.01)  # a negative check needs time to be wrong in (a deliberate sleep: noqa)
        assert not blocked.done()
        publisher.gate.set()
        await asyncio.wait_for(blocked, 1)
        await reporter.flush()
        assert publisher.messages == list(range(6))
    finally:
        await reporter.close(1)


async def test_reporter_close_flushes_what_is_queued():
    publisher = FakePublisher(delay=0.01)
    reporter = Reporter(publisher, max_batch=3)
    reporter.start()
    reporter.post([outgoing(i) for i in range(10)])
    await reporter.close(2)
    assert publisher.messages == list(range(10))


# --- runner.py: running real processes ---------------------------------------------------
class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    async def __call__(self, stream: str, line: str) -> None:
        self.lines.append((stream, line))


async def run_process(argv, tmp_path, timeout=10.0, runner=None, env=None, abort=None):
    runner = runner or ProcessRunner(job_base_env(os.environ), kill_grace=0.5, pipe_grace=0.5)
    runtime = ProcessRuntime(argv=argv, env=env or {})
    lines = Lines()
    full_env = runner.environment(runtime, tmp_path, {"JOBMESH_JOB_ID": "j1", "JOBMESH_ATTEMPT": "1"})
    outcome = await runner.run(runtime, tmp_path, full_env, timeout, abort or AbortSignal(), lines)
    return outcome, lines.lines


async def test_process_output_is_split_into_lines_with_a_tail(tmp_path):
    outcome, lines = await run_process(["sh", "-c", "echo one; echo two >&2; printf 'three'"], tmp_path)
    assert outcome.error is None and outcome.exit_code == 0
    assert sorted(lines) == [("stderr", "two"), ("stdout", "one"), ("stdout", "three")]
    assert "one\n" in outcome.output_tail and "three\n" in outcome.output_tail


async def test_process_gets_a_minimal_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EXECUTOR_SECRET", "leak")
    _outcome, lines = await run_process(
        ["sh", "-c", 'echo "$HOME|$JOBMESH_JOB_ID|$JOBMESH_ATTEMPT|$MINE|${EXECUTOR_SECRET:-none}|$(pwd)"'],
        tmp_path,
        env={"MINE": "yes", "JOBMESH_JOB_ID": "spoofed"},
    )
    assert lines == [("stdout", f"{tmp_path}|j1|1|yes|none|{tmp_path}")]


async def test_long_lines_are_split(tmp_path):
    size = MAX_LINE_BYTES * 2 + 10
    outcome, lines = await run_process(["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x; echo"], tmp_path)
    assert [len(line) for _, line in lines] == [MAX_LINE_BYTES, MAX_LINE_BYTES, 10]
    assert len(outcome.output_tail) <= 4096


async def test_a_line_ending_at_a_piece_boundary_adds_no_empty_line(tmp_path):
    size = MAX_LINE_BYTES * 8  # several reads; ends exactly on a boundary
    _, lines = await run_process(["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x; echo; echo end"], tmp_path)
    assert [len(line) for _, line in lines] == [MAX_LINE_BYTES] * 8 + [3]


async def test_an_escaped_process_holding_the_pipe_does_not_hold_the_attempt(tmp_path):
    started = time.monotonic()
    outcome, lines = await run_process(["sh", "-c", "setsid sh -c 'echo $$; exec sleep 30' & sleep 0.2"], tmp_path)
    escaped = int(lines[0][1])
    try:
        assert outcome.error is None
        assert time.monotonic() - started < 5  # pipe_grace is 0.5s
    finally:
        os.kill(escaped, 9)


async def test_slow_hand_over_after_exit_loses_no_lines(tmp_path):
    runner = ProcessRunner(job_base_env(os.environ), pipe_grace=0.05)
    runtime = ProcessRuntime(argv=["sh", "-c", "for i in 1 2 3 4 5; do echo $i; done"])
    seen = []

    async def slow(stream, line):  # a reporter that is out of room
        await asyncio.sleep(0.05)  # simulates a reporter out of room (a deliberate sleep: noqa)
        seen.append(line)

    env = runner.environment(runtime, tmp_path, {})
    outcome = await runner.run(runtime, tmp_path, env, 10.0, AbortSignal(), slow)
    assert outcome.error is None
    assert seen == ["1", "2", "3", "4", "5"]


async def test_exit_code_is_reported(tmp_path):
    outcome, _ = await run_process(["sh", "-c", "exit 7"], tmp_path)
    assert outcome.exit_code == 7 and outcome.error.code == "exit_code"


async def test_spawn_failure_names_the_command(tmp_path):
    outcome, _ = await run_process(["/nonexistent/tool", "x"], tmp_path)
    assert outcome.exit_code is None and outcome.error.code == "spawn_failed"
    assert "/nonexistent/tool" in outcome.error.message
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")  # not executable
    outcome, _ = await run_process([str(script)], tmp_path)
    assert outcome.error.code == "spawn_failed" and "script.sh" in outcome.error.message


async def test_timeout_kills_a_process_that_ignores_sigterm(tmp_path):
    started = time.monotonic()
    outcome, lines = await run_process(
        ["sh", "-c", "trap '' TERM; echo $$; while :; do sleep 0.05; done"], tmp_path, timeout=0.3
    )
    assert outcome.error.code == "timeout" and outcome.exit_code is None
    assert time.monotonic() - started < 5
    pid = int(lines[0][1])
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


async def test_abort_stops_the_process_with_its_reason(tmp_path):
    abort = AbortSignal()
    task = asyncio.ensure_future(run_process(["sleep", "30"], tmp_path, abort=abort))
    await asyncio.sleep(0.05)  # lets the process start; abort works at any moment (a deliberate sleep: noqa)
    abort.set("node_drained", "bye")
    outcome, _ = await asyncio.wait_for(task, 5)
    assert outcome.error.code == "node_drained" and outcome.error.message == "bye"


# --- handlers.py and the attempt register ------------------------------------------------
def bound(job_id: str, runtime=None, node_id: str = NODE, run: float = 30.0, attempt: int = 1) -> JobBound:
    return JobBound(
        job_id=job_id,
        attempt=attempt,
        partition=2,
        node_id=node_id,
        spec=JobSpec(runtime=runtime or NoopRuntime(), timeouts=Timeouts(run=run)),
        scratch_dir="",
        submitted_at=1.0,
        bound_at=2.0,
    )


def envelope(message: JobBound) -> Envelope:
    return Envelope(message, subjects.node_dispatch(NODE), {}, extract({}))


class FakeRecord:
    """Stands in for the node record: each put request notes the leases it would carry and
    resolves at once, unless ``hold`` is set (then :meth:`release` resolves them)."""

    def __init__(self, leases: LeaseBook) -> None:
        self._leases = leases
        self.puts: list[list[str]] = []  # the attempt keys each requested put lists
        self.hold = False
        self._pending: list[asyncio.Future[None]] = []

    def put_soon(self) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        running, _ = self._leases.snapshot(time.time())
        self.puts.append([f"{lease.job_id}:{lease.attempt}" for lease in running])
        if self.hold:
            self._pending.append(future)
        else:
            future.set_result(None)
        return future

    def release(self) -> None:
        for future in self._pending:
            future.set_result(None)
        self._pending.clear()


@pytest.fixture
async def node(tmp_path):
    publisher = FakePublisher()
    reporter = Reporter(publisher)
    reporter.start()
    runner = ProcessRunner(job_base_env(os.environ), kill_grace=0.5, pipe_grace=0.5)
    leases = LeaseBook()
    attempts = Attempts(NODE, tmp_path, reporter, runner, trace.get_tracer("test"), leases=leases)
    record = FakeRecord(leases)
    handler = DispatchHandler(NODE, attempts, reporter, record, incarnation="inc-1")
    yield publisher, reporter, attempts, handler
    await reporter.close(1)


async def test_handler_acks_once_started_is_published(node):
    publisher, reporter, _, handler = node
    assert await handler([envelope(bound("a")), envelope(bound("b"))]) is None
    started = [m for m in publisher.messages if isinstance(m, JobStarted)]
    assert [s.job_id for s in started] == ["a", "b"]
    assert publisher.calls[0][0].msg_id == "a:1:started"
    assert publisher.calls[0][0].subject == subjects.node_event(2, subjects.STARTED, NODE)
    await reporter.flush()
    done = [m for m in publisher.messages if isinstance(m, JobSucceeded)]
    assert [d.job_id for d in done] == ["a", "b"]
    assert all(d.submitted_at == 1.0 and d.node_id == NODE for d in done)


async def test_noop_started_and_succeeded_share_a_flush(node):
    publisher, _, _, handler = node
    await handler([envelope(bound("a"))])
    assert [type(item.message) for item in publisher.calls[0]] == [JobStarted, JobSucceeded]
    assert publisher.calls[0][1].msg_id == "a:1:succeeded"


async def test_handler_ignores_redeliveries_and_copies_in_a_batch(node):
    publisher, reporter, _, handler = node
    assert await handler([envelope(bound("a")), envelope(bound("a"))]) is None
    assert await handler([envelope(bound("a"))]) is None
    await reporter.flush()
    assert [type(m) for m in publisher.messages] == [JobStarted, JobSucceeded]
    assert handler.duplicates == 2


async def test_handler_refuses_another_nodes_job(node):
    _, _, _, handler = node
    outcomes = await handler([envelope(bound("a")), envelope(bound("b", node_id="other"))])
    assert outcomes[0] == ACK
    assert isinstance(outcomes[1], Reject) and outcomes[1].code == "wrong_node"


async def test_handler_does_not_wait_for_a_process_to_finish(node, tmp_path):
    publisher, reporter, attempts, handler = node
    await asyncio.wait_for(handler([envelope(bound("slow", ProcessRuntime(argv=["sleep", "30"])))]), 2)
    assert attempts.running == 1
    assert (tmp_path / "slow-1").is_dir()
    assert await attempts.drain(grace=0.05) == 1
    await reporter.flush()
    (failed,) = [m for m in publisher.messages if isinstance(m, JobFailed)]
    assert failed.error.code == "node_drained" and failed.exit_code is None
    assert not (tmp_path / "slow-1").exists()


async def test_a_job_that_writes_past_its_quota_and_exits_at_once_fails(node, tmp_path):
    publisher, reporter, attempts, handler = node
    writer = ProcessRuntime(argv=["sh", "-c", "head -c 3000000 /dev/zero > big"])  # 2.9 MiB, then exit 0
    over = msgspec.structs.replace(bound("q", writer), spec=JobSpec(runtime=writer, resources=Resources(disk_mb=1)))
    await handler([envelope(over)])

    async def finished():
        return attempts.running == 0

    await eventually(finished, timeout=10, what="the attempt to finish")
    await reporter.flush()
    (failed,) = [m for m in publisher.messages if isinstance(m, JobFailed)]
    assert failed.error.code == "disk_quota_exceeded" and "1 MiB disk quota" in failed.error.message
    assert failed.exit_code == 0  # it exited on its own: judged at exit, not stopped by the watchdog
    assert not [m for m in publisher.messages if isinstance(m, JobSucceeded)]
    assert not (tmp_path / "q-1").exists()


async def test_process_attempt_reports_lines_then_its_end(node, tmp_path):
    publisher, reporter, attempts, handler = node
    await handler([envelope(bound("p", ProcessRuntime(argv=["sh", "-c", "ls; echo done"])))])

    async def finished():
        return attempts.running == 0

    await eventually(finished, timeout=5, what="the attempt to finish")
    await reporter.flush()
    kinds = [type(m) for m in publisher.messages]
    assert kinds == [JobStarted, LogLine, JobSucceeded]  # the directory was empty: only "done" printed
    line = publisher.messages[1]
    assert line.line == "done" and line.stream == "stdout"
    assert publisher.calls[-1][-1].msg_id == "p:1:succeeded"
    assert not (tmp_path / "p-1").exists()


async def test_an_attempt_whose_directory_an_earlier_executor_left_is_lost_not_run_again(node, tmp_path):
    # Until issue 7 the leftover was removed and the command ran a second time under the same
    # attempt number (the stream's duplicate window then hid the second run's events).
    publisher, reporter, attempts, handler = node
    leftover = tmp_path / "p-1"
    leftover.mkdir()
    (leftover / "stale").write_text("from a crashed run")
    marker = tmp_path / "ran"
    assert await handler([envelope(bound("p", ProcessRuntime(argv=["sh", "-c", f"touch {marker}"])))]) is None
    await reporter.flush()
    assert [type(m) for m in publisher.messages] == [JobLost]
    assert publisher.calls[0][0].msg_id == "p:1:lost"
    assert attempts.running == 0 and not marker.exists()

    async def cleared():
        return not leftover.exists()

    # Removed once the report is durable (and recorded): the evidence outlasts a kill meanwhile.
    await eventually(cleared, timeout=5, what="the leftover directory to be removed")


# --- attempts.py: what an attempt hands its runner, refusals, secrets --------------------------
class RecordingRunner:
    """A runner that notes the RunRequest it got, says something and ends as told."""

    def __init__(self, say: str = "", result: str = "") -> None:
        self.requests: list[RunRequest] = []
        self.say = say
        self.result = result

    async def run(self, request: RunRequest) -> Outcome:
        self.requests.append(request)
        if request.on_spawned is not None:
            await request.on_spawned()
        stdin = request.stdin.read_text() if request.stdin is not None else ""
        await request.on_line("stdout", f"{self.say} {stdin}".strip())
        if self.result:
            (request.workdir / "result").write_text(self.result)
        return Outcome(0, None, f"tail: {self.say}\n")


@pytest.fixture
async def recorded(tmp_path):
    publisher = FakePublisher()
    reporter = Reporter(publisher)
    reporter.start()
    runner = RecordingRunner(say="token=hunter2-secret", result='{"echo": "hunter2-secret"}')
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "api-key").write_text("hunter2-secret\n")
    setup = AttemptSetup(
        {"process": runner},
        {"PATH": "/usr/bin", "LANG": "C.UTF-8"},
        NodeIsolation(level="sandbox", network=False),
        SecretSource(tmp_path / "secrets", "JOBMESH_SECRET_", {}),
    )
    leases = LeaseBook()
    work = tmp_path / "work"
    attempts = Attempts(NODE, work, reporter, setup.runners, trace.get_tracer("test"), leases=leases, setup=setup)
    handler = DispatchHandler(NODE, attempts, reporter, FakeRecord(leases), incarnation="inc-1")
    yield publisher, reporter, attempts, handler, runner
    await reporter.close(1)


async def ended_with(publisher, reporter, attempts, job_id: str):
    await eventually(lambda: asyncio.sleep(0, attempts.running == 0), what="the attempt to end")
    await reporter.flush()
    return [m for m in publisher.messages if isinstance(m, JobSucceeded | JobFailed) and m.job_id == job_id]


def with_spec(job_id: str, runtime, **spec) -> JobBound:
    return msgspec.structs.replace(bound(job_id, runtime), spec=JobSpec(runtime=runtime, **spec))


async def test_an_attempt_hands_its_runner_a_cleared_environment_stdin_and_masks_its_secrets(recorded, monkeypatch):
    publisher, reporter, attempts, handler, runner = recorded
    monkeypatch.setenv("EXECUTOR_ONLY", "leak")
    runtime = ProcessRuntime(argv=["x"], env={"MINE": "1", "JOBMESH_JOB_ID": "spoof"})
    job = with_spec("s", runtime, secrets=["api-key"], secrets_as="env", stdin="typed in")
    await handler([envelope(job)])
    (done,) = await ended_with(publisher, reporter, attempts, "s")
    (request,) = runner.requests
    workdir = attempts.workdir_of(job)
    assert request.env["MINE"] == "1" and request.env["JOBMESH_JOB_ID"] == "s" and request.env["HOME"] == str(workdir)
    assert request.env["API_KEY"] == "hunter2-secret"  # asked for as a variable
    assert "EXECUTOR_ONLY" not in request.env and request.env["PATH"] == "/usr/bin"
    assert request.network is False and request.secrets_dir is None and request.workdir == workdir
    lines = [m.line for m in publisher.messages if isinstance(m, LogLine) and m.job_id == "s"]
    assert lines == ["token=*** typed in"]
    assert isinstance(done, JobSucceeded) and done.output_tail == "tail: token=***\n"
    assert not workdir.exists() and not (workdir.parent / ".s-1").exists()


async def test_attempts_the_node_cannot_isolate_or_run_are_refused(recorded):
    publisher, reporter, attempts, handler, _ = recorded
    await handler([envelope(with_spec("net", ProcessRuntime(argv=["x"]), network=True))])
    await handler([envelope(with_spec("vm", ProcessRuntime(argv=["x"]), constraints=Constraints(isolation="vm")))])
    await handler([envelope(with_spec("h", HandlerRuntime(handler="digits")))])
    await handler([envelope(with_spec("c", ContainerRuntime(image="busybox")))])
    await handler([envelope(with_spec("sec", ProcessRuntime(argv=["x"]), secrets=["nope"]))])
    codes = {}
    for job_id in ("net", "vm", "h", "c", "sec"):
        (done,) = await ended_with(publisher, reporter, attempts, job_id)
        codes[job_id] = (done.error.code, done.error.message)
    assert codes["net"] == (
        "isolation_refused",
        "the job asks for the network; this node allows none (JOBMESH_NODE_NETWORK=false)",
    )
    assert codes["vm"] == ("isolation_refused", "the job asks for isolation vm; this node enforces sandbox")
    assert codes["h"][0] == "handler_missing" and "'digits'" in codes["h"][1]
    assert codes["c"] == ("isolation_refused", "this node cannot run a container runtime")
    assert codes["sec"][0] == "secret_missing" and "nope" in codes["sec"][1]


def test_the_node_record_says_what_the_probes_found():
    gpus = [GpuDevice(index=0, kind="a100", memory_mb=40_000), GpuDevice(index=1, kind="a100", memory_mb=40_000)]
    info = build_node_info(
        Settings(node_handlers="fixed", node_network=False),
        FACTS,
        1.0,
        isolation="sandbox",
        probe={"sandbox": "bubblewrap 0.8.0"},
        runtimes=["process", "noop", "handler"],
        handlers=["digits", "fixed"],
        gpu_devices=gpus,
    )
    assert (info.isolation, info.network, info.probe) == ("sandbox", False, {"sandbox": "bubblewrap 0.8.0"})
    assert info.runtimes == ["process", "noop", "handler"] and info.handlers == ["fixed", "digits"]
    assert (info.gpu, info.gpu_kind, info.gpu_devices) == (2, "a100", gpus)


def test_a_failure_carries_the_attempts_last_checkpoint_to_the_scheduler() -> None:
    from jobmesh.executor.outcomes import exit_outcome, terminal_event

    # A job that checkpoints and fails at once may end before a node record with its
    # checkpoint reaches the scheduler: the failure itself carries it.
    failed = terminal_event(bound("cp"), NODE, exit_outcome(1), 1.0, 2.0, checkpoint="step-7")
    assert isinstance(failed, JobFailed) and failed.checkpoint == "step-7"
    plain = terminal_event(bound("cp"), NODE, exit_outcome(1), 1.0, 2.0)
    assert isinstance(plain, JobFailed) and plain.checkpoint == ""
