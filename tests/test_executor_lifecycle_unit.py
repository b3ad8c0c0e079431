"""The executor's lifecycle parts without NATS: leases, progress lines, results, restart,
the record writer, and the handler's cancel / supersede / restart decisions.

Processes are real (``sh``); the publisher, the KV bucket and the object store are fakes that
record what they were given.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import time

import msgspec
import nats.errors
import pytest
from nats.js.errors import APIError, KeyNotFoundError
from opentelemetry import trace

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import (
    AttemptCancel,
    AttemptLease,
    JobFailed,
    JobLost,
    JobStarted,
    JobSucceeded,
    NodeInfo,
    ProcessRuntime,
)
from jobmesh.errors import Overloaded, Unavailable
from jobmesh.executor.attempts import Attempts, stop_code
from jobmesh.executor.handlers import CANCEL_WAIT_DELIVERIES, DispatchHandler
from jobmesh.executor.leases import LeaseBook, fit_record
from jobmesh.executor.outcomes import EXECUTOR_ERROR, Outcome, failed_outcome, terminal_message
from jobmesh.executor.progress import (
    CHECKPOINT_MAX_BYTES,
    Checkpoint,
    LineSplitter,
    Progress,
    ProgressChannel,
    ProgressRecorder,
    parse_line,
)
from jobmesh.executor.registration import Registration
from jobmesh.executor.reporter import Reporter
from jobmesh.executor.restart import (
    LEASE_FILE,
    LOST_REASON,
    OUTCOME_FILE,
    kill_leftovers,
    left_behind,
    leftover_groups,
    lost_messages,
    orphaned_attempts,
    private_dir_of,
    read_outcome,
    reports_of,
    write_lease,
    write_outcome,
)
from jobmesh.executor.results import Result, ResultLimits, ResultStore, plan_result
from jobmesh.executor.runner import AbortSignal, ProcessRunner
from jobmesh.executor.secrets import write_secret_files
from jobmesh.executor.service import job_base_env
from jobmesh.runtime.outcomes import ACK, Retry
from jobmesh.runtime.service import Envelope
from jobmesh.runtime.tracing import carried as extract
from tests.helpers import eventually
from tests.test_executor_unit import NODE, FakePublisher, FakeRecord, bound, envelope


# --- progress.py ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("progress 0.5 half", Progress(0.5, "half")),
        ("progress 1", Progress(1.0, "")),
        ("progress 0   spaced  out ", Progress(0.0, "spaced  out")),
        ("checkpoint step-7", Checkpoint("step-7")),
        ("checkpoint  two spaces kept", Checkpoint(" two spaces kept")),
        ("checkpoint", Checkpoint("")),
    ],
)
def test_progress_lines_in_the_documented_format(line, parsed):
    assert parse_line(line) == parsed


@pytest.mark.parametrize("line", ["progress", "progress 1.5", "progress -0.1", "progress nan", "progress x", "50%", ""])
def test_other_lines_are_not_progress(line):
    assert parse_line(line) is None


def test_a_long_checkpoint_is_cut_on_a_character_boundary():
    parsed = parse_line("checkpoint " + "é" * CHECKPOINT_MAX_BYTES)
    assert isinstance(parsed, Checkpoint) and parsed.cut
    assert len(parsed.text.encode()) <= CHECKPOINT_MAX_BYTES and set(parsed.text) == {"é"}


def test_line_splitter_bounds_lines_and_drops_the_rest_of_a_long_one():
    splitter = LineSplitter(limit=8)
    assert splitter.feed(b"progress") == []
    assert splitter.feed(b" 0.5\nshort\r\n") == ["progress", "short"]  # the first was cut at 8 bytes
    assert splitter.feed(b"0123456789abc") == ["01234567"]
    assert splitter.feed(b"still the same line\nnext") == []
    assert splitter.finish() == ["next"]


def test_recorder_updates_the_lease_and_warns_once_per_kind(caplog):
    lease = LeaseBook().add("j", 1, 0, 1.0)
    recorder = ProgressRecorder(lease, "job j attempt 1")
    for line in ["progress 0.25 a", "bogus", "also bogus", "", "checkpoint c1", "progress 0.75 b"]:
        recorder.line(line)
    assert (lease.progress, lease.message, lease.checkpoint) == (0.75, "b", "c1")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "job j attempt 1" in warnings[0] and "'bogus'" in warnings[0]


async def test_a_process_reports_progress_through_its_fd(tmp_path):
    lease = LeaseBook().add("j", 1, 0, 1.0)
    runner = ProcessRunner(job_base_env(os.environ), kill_grace=0.5, pipe_grace=0.5)
    channel = ProgressChannel(ProgressRecorder(lease, "job j attempt 1").line)
    runtime = ProcessRuntime(
        argv=["sh", "-c", 'echo "progress 0.4 copying" > /dev/fd/$F; echo "checkpoint 17" >/dev/fd/$F']
    )
    env = runner.environment(runtime, tmp_path, {"F": str(channel.child_fd)})

    async def no_lines(_stream, _line):
        return None

    outcome = await runner.run(
        runtime, tmp_path, env, 10.0, AbortSignal(), no_lines, pass_fds=(channel.child_fd,), on_spawned=channel.spawned
    )
    await channel.close()
    assert outcome.error is None
    assert (lease.progress, lease.message, lease.checkpoint) == (0.4, "copying", "17")


def test_the_progress_pipe_closes_its_read_end_once_and_not_through_a_pipe_transport(tmp_path, monkeypatch):
    # uvloop's pipe transport closes a descriptor through libuv and again through the file
    # object (MagicStack/uvloop#763): a number handed out in between, such as another
    # attempt's result file being read in a thread, was closed under its reader. The channel
    # owns its read end: watched with add_reader, closed once, by itself.
    import uvloop

    from jobmesh.executor import progress

    closed: list[int] = []
    real_close = os.close

    def counting_close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    monkeypatch.setattr(progress.os, "close", counting_close)

    async def main() -> tuple[int, list[str]]:
        loop = asyncio.get_running_loop()

        async def refused(*_args, **_kwargs):
            raise AssertionError("connect_read_pipe closes the descriptor twice under uvloop")

        loop.connect_read_pipe = refused  # type: ignore[method-assign]
        runner = ProcessRunner(job_base_env(os.environ), kill_grace=0.5, pipe_grace=0.5)
        lines: list[str] = []
        channel = ProgressChannel(lines.append)
        read_fd = channel._read_fd
        runtime = ProcessRuntime(argv=["sh", "-c", 'echo "progress 0.5" > /dev/fd/$F'])
        env = runner.environment(runtime, tmp_path, {"F": str(channel.child_fd)})

        async def no_lines(_stream, _line):
            return None

        await runner.run(
            runtime,
            tmp_path,
            env,
            10.0,
            AbortSignal(),
            no_lines,
            pass_fds=(channel.child_fd,),
            on_spawned=channel.spawned,
        )
        await channel.close()
        await channel.close()  # twice is harmless
        return read_fd, lines

    read_fd, lines = uvloop.run(main())
    assert lines == ["progress 0.5"]
    assert closed.count(read_fd) == 1


async def test_an_abort_before_the_spawn_starts_nothing(tmp_path):
    runner = ProcessRunner(job_base_env(os.environ))
    abort = AbortSignal()
    abort.set("cancelled", "too late")
    marker = tmp_path / "ran"
    runtime = ProcessRuntime(argv=["sh", "-c", f"touch {marker}"])

    async def no_lines(_stream, _line):
        return None

    outcome = await runner.run(runtime, tmp_path, runner.environment(runtime, tmp_path, {}), 10.0, abort, no_lines)
    assert outcome.error.code == "cancelled" and outcome.error.message == "too late"
    assert not marker.exists()


# --- leases.py -----------------------------------------------------------------------------
def test_lease_book_lists_running_then_ended_for_a_while():
    book = LeaseBook(keep_ended=60.0)
    lease = book.add("j", 2, 3, 100.0, checkpoint="c0")
    lease.progress, lease.message = 0.5, "half"
    running, ended = book.snapshot(101.0)
    assert running == [
        AttemptLease(
            job_id="j", attempt=2, partition=3, started_at=100.0, progress=0.5, message="half", checkpoint="c0"
        )
    ]
    assert ended == []
    book.end("j:2", 110.0)
    assert book.snapshot(111.0) == ([], ["j:2"])
    assert book.snapshot(170.0) == ([], ["j:2"])
    assert book.snapshot(170.1) == ([], [])


def test_lease_book_lists_at_most_the_newest_ended():
    book = LeaseBook(max_ended=3)
    for i in range(5):
        book.end(f"j{i}:1", float(i))
    assert book.snapshot(5.0)[1] == ["j2:1", "j3:1", "j4:1"]


def test_a_record_over_its_budget_drops_ended_then_checkpoints_never_attempts():
    leases = [
        AttemptLease(job_id=f"j{i}", attempt=1, partition=0, started_at=1.0, checkpoint="x" * 3000) for i in range(4)
    ]
    info = NodeInfo(node_id="n", cpu_milli=1, memory_mb=1, attempts=leases, ended=[f"e{i}:1" for i in range(200)])
    small = msgspec.json.decode(fit_record(info, budget=100_000), type=NodeInfo)
    assert small == info
    trimmed = msgspec.json.decode(fit_record(info, budget=8_000), type=NodeInfo)
    assert [a.job_id for a in trimmed.attempts] == ["j0", "j1", "j2", "j3"]
    assert trimmed.ended == [] and sum(1 for a in trimmed.attempts if a.checkpoint) <= 2
    assert len(fit_record(info, budget=8_000)) <= 8_000


# --- results.py ----------------------------------------------------------------------------
def test_plan_result_by_size():
    limits = ResultLimits(inline_bytes=10, max_bytes=100)
    assert [plan_result(n, limits) for n in (0, 10, 11, 100, 101)] == [
        "inline",
        "inline",
        "store",
        "store",
        "too_large",
    ]


class FakeStore:
    """An object store that keeps what is put; fails the first ``failures`` puts with ``error``."""

    def __init__(self, failures: int = 0, error: Exception | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.failures = failures
        self.error = error or nats.errors.TimeoutError()

    async def put(self, name: str, data: bytes | io.BufferedIOBase) -> object:
        content = data if isinstance(data, bytes) else data.read()
        if self.failures:
            self.failures -= 1
            raise self.error
        self.objects[name] = content
        return None


async def test_results_inline_stored_binary_too_large_and_missing(tmp_path):
    store = FakeStore()
    results = ResultStore(store, ResultLimits(inline_bytes=16, max_bytes=64))
    path = tmp_path / "result"
    assert await results.collect("j", 1, path) is None
    path.write_text("ok ✓")
    assert await results.collect("j", 1, path) == Result(6, text="ok ✓")
    path.write_bytes(b"\xff\xfe binary")
    binary = await results.collect("j", 2, path)
    assert binary.ref == "j/2" and binary.text == "" and store.objects["j/2"] == b"\xff\xfe binary"
    path.write_bytes(b"y" * 40)
    assert (await results.collect("j", 3, path)).ref == "j/3" and store.objects["j/3"] == b"y" * 40
    path.write_bytes(b"z" * 65)
    big = await results.collect("j", 4, path)
    assert big.too_large and big.size == 65 and "j/4" not in store.objects


async def test_a_result_link_or_directory_is_not_followed(tmp_path):
    results = ResultStore(FakeStore(), ResultLimits())
    secret = tmp_path / "secret"
    secret.write_text("executor's own file")
    link = tmp_path / "link"
    link.symlink_to(secret)
    assert await results.collect("j", 1, link) is None
    (tmp_path / "dir").mkdir()
    assert await results.collect("j", 1, tmp_path / "dir") is None


async def test_result_upload_retries_an_outage_and_fails_a_full_store(tmp_path):
    path = tmp_path / "result"
    path.write_bytes(b"x" * 100)
    store = FakeStore(failures=2, error=Unavailable("down"))
    results = ResultStore(store, ResultLimits(inline_bytes=10), retry_base=0.001, retry_max=0.01)
    assert (await results.collect("j", 1, path)).ref == "j/1" and store.objects["j/1"] == b"x" * 100
    full = ResultStore(FakeStore(failures=1, error=APIError(description="maximum bytes exceeded")), ResultLimits(1))
    with pytest.raises(Overloaded, match="full"):
        await full.collect("j", 2, path)


# --- restart.py ----------------------------------------------------------------------------
def test_orphans_are_the_attempts_of_another_incarnation():
    lease = AttemptLease(job_id="j", attempt=2, partition=1, started_at=1.0)
    old = NodeInfo(node_id="n", cpu_milli=1, memory_mb=1, incarnation="old", attempts=[lease])
    assert orphaned_attempts(None, "new") == []
    assert orphaned_attempts(old, "old") == []
    assert orphaned_attempts(old, "new") == [lease]
    (lost,) = lost_messages([lease], "n", 5.0)
    assert lost.subject == subjects.node_event(1, subjects.LOST, "n") and lost.msg_id == "j:2:lost"
    assert lost.message == JobLost(job_id="j", attempt=2, partition=1, node_id="n", at=5.0, reason=LOST_REASON)


def test_lease_files_name_the_attempts_no_record_accounts_for(tmp_path):
    root = tmp_path / "node"
    lease = AttemptLease(job_id="j1", attempt=2, partition=5, started_at=1.0)
    write_lease(root / ".j1-2", lease)
    (root / "j1-2").mkdir()
    write_lease(root / ".j2-1", AttemptLease(job_id="j2", attempt=1, partition=0, started_at=1.0))
    (root / ".j3-1").mkdir()  # cut off before its lease was written
    (root / ".j4-1").mkdir()
    (root / ".j4-1" / LEASE_FILE).write_bytes(b"{not json")
    (root / "unrelated").mkdir()
    # A lease that names another attempt than its directory (a job wrote it): not believed.
    write_lease(root / ".j5-1", AttemptLease(job_id="other", attempt=9, partition=1, started_at=1.0))
    found, workdirs = left_behind(root, accounted={"j2:1"})
    assert found == [lease]  # j2 attempt 1 is its record's business
    assert sorted(p.name for p in workdirs) == ["j1-2", "j2-1", "j3-1", "j4-1", "j5-1"]  # all are cleared
    assert oct((root / ".j1-2").stat().st_mode & 0o777) == "0o700"
    assert not list((root / ".j1-2").glob("*.partial"))
    assert left_behind(tmp_path / "missing", accounted=set()) == ([], [])


def test_an_attempt_that_kept_its_outcome_is_reported_ended_and_the_others_lost(tmp_path):
    root = tmp_path / "node"
    ended = AttemptLease(job_id="j1", attempt=2, partition=2, started_at=1.0)
    running = AttemptLease(job_id="j2", attempt=1, partition=2, started_at=1.0)
    failed = AttemptLease(job_id="j3", attempt=1, partition=2, started_at=1.0)
    outcome = Outcome(0, None, result="42")
    succeeded = terminal_message(bound("j1", attempt=2), NODE, outcome, 1.5, 3.0, None)
    write_outcome(root / ".j1-2", succeeded)  # the private directory is made when missing
    write_lease(root / ".j2-1", running)
    refused = terminal_message(bound("j3"), NODE, failed_outcome(EXECUTOR_ERROR, "boom"), 0.0, 3.0, None)
    write_outcome(root / ".j3-1", refused)
    assert oct((root / ".j1-2").stat().st_mode & 0o777) == "0o700"
    assert not list((root / ".j1-2").glob("*.partial"))

    reports, kept = reports_of(root, [ended, running, failed], NODE, 9.0)
    assert kept == 2
    first, second, third = reports
    assert (first.subject, first.msg_id) == (succeeded.subject, "j1:2:succeeded")
    assert isinstance(first.message, JobSucceeded) and first.message.result == "42"
    assert first.message == succeeded.message
    assert isinstance(second.message, JobLost) and second.msg_id == "j2:1:lost"
    assert isinstance(third.message, JobFailed) and third.message.error.code == EXECUTOR_ERROR
    assert third.msg_id == refused.msg_id and third.subject == refused.subject


def test_a_kept_outcome_cut_off_or_not_of_this_attempt_on_this_node_is_not_believed(tmp_path):
    root = tmp_path / "node"
    lease = AttemptLease(job_id="j1", attempt=1, partition=2, started_at=1.0)
    (root / ".j1-1").mkdir(parents=True)
    (root / ".j1-1" / OUTCOME_FILE).write_bytes(b'{"succeeded": {"job_')
    assert read_outcome(root / ".j1-1", lease, NODE) is None
    # A job that could write its private directory must not end another attempt, report
    # for another node or partition.
    for other in (
        terminal_message(bound("other"), NODE, Outcome(0, None), 1.0, 2.0, None),
        terminal_message(bound("j1", attempt=2), NODE, Outcome(0, None), 1.0, 2.0, None),
        terminal_message(bound("j1", node_id="elsewhere"), "elsewhere", Outcome(0, None), 1.0, 2.0, None),
    ):
        write_outcome(root / ".j1-1", other)
        assert read_outcome(root / ".j1-1", lease, NODE) is None
    moved = AttemptLease(job_id="j1", attempt=1, partition=7, started_at=1.0)
    write_outcome(root / ".j1-1", terminal_message(bound("j1"), NODE, Outcome(0, None), 1.0, 2.0, None))
    assert read_outcome(root / ".j1-1", moved, NODE) is None
    # Its subject and message id come from the attempt, never from the file.
    again = read_outcome(root / ".j1-1", lease, NODE)
    assert again is not None and again.subject == subjects.node_event(2, subjects.SUCCEEDED, NODE)
    assert again.msg_id == "j1:1:succeeded"
    assert read_outcome(root / ".missing", lease, NODE) is None
    # A new run of the same attempt id does not inherit an outcome left from an earlier one.
    write_lease(root / ".j1-1", lease)
    assert not (root / ".j1-1" / OUTCOME_FILE).exists()
    reports, kept = reports_of(root, [lease], NODE, 9.0)
    assert kept == 0 and [r.msg_id for r in reports] == ["j1:1:lost"]


def test_leftover_processes_in_an_orphaned_attempts_directory_are_killed(tmp_path):
    workdir = tmp_path / "j-1"
    (workdir / "sub").mkdir(parents=True)
    other = tmp_path / "j-2"
    other.mkdir()
    leftover = subprocess.Popen(["sleep", "30"], cwd=workdir / "sub", start_new_session=True)
    bystander = subprocess.Popen(["sleep", "30"], cwd=other, start_new_session=True)
    try:
        groups = leftover_groups([workdir])
        assert groups == {leftover.pid: workdir}
        assert kill_leftovers([workdir]) == 1
        assert leftover.wait(5) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for proc in (leftover, bystander):
            proc.kill()
            proc.wait(5)


def left_attempt(work_root, name: str):
    """What an attempt that was running when its executor died leaves, as Attempt makes it."""
    workdir = work_root / name
    (workdir / "out").mkdir(parents=True)
    (workdir / "out" / "partial.csv").write_text("1,2\n")
    private = work_root / f".{name}"
    private.mkdir(0o700)
    (private / "stdin").write_bytes(b"what the job reads")
    write_secret_files({"db-password": "hunter2"}, private / "secrets", 65534, 65534)
    return workdir, private


def test_the_cleanup_of_an_orphaned_attempt_removes_its_private_directory_and_secrets_too(tmp_path):
    work_root = tmp_path / "node-1"
    workdir, private = left_attempt(work_root, "j-1")
    other_workdir, other_private = left_attempt(work_root, "j-2")  # not an orphan: left alone
    assert private_dir_of(workdir) == private
    assert (private / "secrets").stat().st_mode & 0o777 == 0o500  # read-only: a plain rmtree may fail
    leftover = subprocess.Popen(["sleep", "30"], cwd=workdir / "out", start_new_session=True)
    try:
        assert kill_leftovers([workdir]) == 1
        assert leftover.wait(5) == -signal.SIGKILL
    finally:
        leftover.kill()
        leftover.wait(5)
    assert not workdir.exists() and not private.exists()  # the secret file is gone with it
    assert (other_private / "secrets" / "db-password").read_text() == "hunter2" and other_workdir.exists()
    # The attempt dispatched again makes its directories afresh, as Attempt does.
    workdir.mkdir(parents=True)
    private.mkdir(0o700)


def test_the_cleanup_of_an_orphan_whose_directories_are_gone_or_half_gone_is_fine(tmp_path):
    work_root = tmp_path / "node-1"
    workdir, private = left_attempt(work_root, "j-3")
    shutil.rmtree(workdir)  # the executor died between removing the two
    assert kill_leftovers([workdir, work_root / "never-there-1"]) == 0
    assert not private.exists() and sorted(work_root.iterdir()) == []


# --- registration.py -----------------------------------------------------------------------
class FakeKV:
    """A KV bucket of one process: puts are recorded (decoded); ``fail`` puts raise."""

    def __init__(self, previous: bytes | None = None) -> None:
        self.value = previous
        self.puts: list[NodeInfo] = []
        self.fail = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()  # a put began

    async def get(self, key: str):
        if self.value is None:
            raise KeyNotFoundError()
        return type("Entry", (), {"value": self.value})()

    async def put(self, key: str, value: bytes) -> int:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise nats.errors.TimeoutError()
        self.value = value
        self.puts.append(msgspec.json.decode(value, type=NodeInfo))
        return len(self.puts)

    async def delete(self, key: str) -> None:
        self.value = None


def registration(kv: FakeKV, book: LeaseBook, interval: float = 60.0) -> Registration:
    info = NodeInfo(node_id="n", cpu_milli=1, memory_mb=1, incarnation="inc")
    return Registration(kv, info, book, interval)  # type: ignore[arg-type]


async def test_put_requests_during_a_put_are_answered_by_one_more():
    kv, book = FakeKV(), LeaseBook()
    reg = registration(kv, book)
    writer = asyncio.ensure_future(reg.run(lambda: False, lambda: None))
    try:
        kv.gate = asyncio.Event()
        book.add("a", 1, 0, 1.0)
        first = reg.put_soon()
        await asyncio.wait_for(kv.entered.wait(), 2)  # the first put is in flight, held at the gate
        book.add("b", 1, 0, 1.0)
        later = [reg.put_soon() for _ in range(5)]
        kv.gate.set()
        await asyncio.wait_for(asyncio.gather(first, *later), 2)
        assert [[a.job_id for a in put.attempts] for put in kv.puts] == [["a"], ["a", "b"]]
        assert all(put.incarnation == "inc" for put in kv.puts)
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


async def test_a_failed_put_is_retried_until_the_request_is_answered():
    kv, book = FakeKV(), LeaseBook()
    reg = registration(kv, book)
    writer = asyncio.ensure_future(reg.run(lambda: False, lambda: None))
    try:
        kv.fail = 2
        await asyncio.wait_for(reg.put_soon(), 5)
        assert len(kv.puts) == 1 and reg.problem() is None
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


async def test_the_previous_record_is_read_before_the_first_put():
    old = NodeInfo(node_id="n", cpu_milli=1, memory_mb=1, incarnation="old")
    assert await registration(FakeKV(), LeaseBook()).read_previous() is None
    assert await registration(FakeKV(msgspec.json.encode(old)), LeaseBook()).read_previous() == old
    assert await registration(FakeKV(b"not json"), LeaseBook()).read_previous() is None


# --- the handler: cancel, supersede, restart -----------------------------------------------
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
    yield publisher, reporter, attempts, handler, record
    await attempts.drain(0)
    await reporter.close(1)


def cancel_envelope(job_id: str, reason: str = "stop", attempt: int = 1, deliveries: int = 1) -> Envelope:
    message = AttemptCancel(job_id=job_id, attempt=attempt, partition=2, node_id=NODE, reason=reason, at=1.0)
    env = Envelope(message, subjects.node_cancel(NODE), {}, extract({}))
    if deliveries > 1:
        env.raw = type("Raw", (), {"metadata": type("Meta", (), {"num_delivered": deliveries})()})()
    return env


def sleeper(job_id: str, attempt: int = 1):
    return msgspec.structs.replace(bound(job_id, ProcessRuntime(argv=["sleep", "30"])), attempt=attempt)


async def ended(attempts: Attempts) -> bool:
    return attempts.running == 0


async def test_one_record_put_per_batch_lists_its_process_attempts_and_none_for_noops(node):
    publisher, _, _, handler, record = node
    await handler([envelope(bound("n1")), envelope(bound("n2"))])
    assert record.puts == []
    await handler([envelope(sleeper("p1")), envelope(sleeper("p2")), envelope(bound("n3"))])
    assert record.puts == [["p1:1", "p2:1"]]
    started = [m for m in publisher.messages if isinstance(m, JobStarted)]
    assert {s.incarnation for s in started} == {"inc-1"}


async def test_a_process_starts_only_once_the_record_listing_it_is_durable(node, tmp_path):
    publisher, _, attempts, handler, record = node
    record.hold = True
    handling = asyncio.ensure_future(handler([envelope(bound("p", ProcessRuntime(argv=["sh", "-c", "echo hi"])))]))

    async def started():
        return [m for m in publisher.messages if isinstance(m, JobStarted)]

    await eventually(started, what="the Started to be durable")
    assert not handling.done()  # not acked: the record is not durable yet
    assert not (tmp_path / "p-1").exists()  # and the process has not started
    record.release()
    assert await asyncio.wait_for(handling, 2) is None
    await eventually(lambda: ended(attempts), what="the attempt to finish")


async def test_cancel_in_the_same_batch_stops_the_attempt_before_it_runs(node, tmp_path):
    publisher, reporter, attempts, handler, _ = node
    marker = tmp_path / "ran"
    job = bound("c", ProcessRuntime(argv=["sh", "-c", f"touch {marker}"]))
    outcomes = await handler([envelope(job), cancel_envelope("c", "user said so")])
    assert outcomes[0] == ACK and isinstance(outcomes[1], Retry)
    await eventually(lambda: ended(attempts), what="the attempt to end")
    await reporter.flush()
    (failed,) = [m for m in publisher.messages if isinstance(m, JobFailed)]
    assert failed.error.code == "cancelled" and failed.error.message == "user said so"
    assert not marker.exists()
    assert await handler([cancel_envelope("c", "user said so", deliveries=2)]) is None  # now acked


async def test_cancel_of_a_running_attempt_stops_its_process(node):
    publisher, reporter, attempts, handler, _ = node
    await handler([envelope(sleeper("r"))])
    (outcome,) = await handler([cancel_envelope("r", "superseded by attempt 2")])
    assert isinstance(outcome, Retry)
    await eventually(lambda: ended(attempts), timeout=5, what="the attempt to end")
    await reporter.flush()
    (failed,) = [m for m in publisher.messages if isinstance(m, JobFailed)]
    assert failed.error.code == "superseded"
    assert stop_code("whatever") == "cancelled"


async def test_cancel_before_the_dispatch_refuses_it_without_a_start(node):
    publisher, reporter, _, handler, record = node
    (held,) = await handler([cancel_envelope("early", "not needed")])
    assert isinstance(held, Retry)
    assert await handler([cancel_envelope("early", "not needed", deliveries=CANCEL_WAIT_DELIVERIES)]) is None
    assert await handler([envelope(sleeper("early"))]) is None
    await reporter.flush()
    assert [type(m) for m in publisher.messages] == [JobFailed]
    failed = publisher.messages[0]
    assert failed.error.code == "cancelled" and failed.error.message == "not needed" and failed.started_at == 0.0
    assert record.puts == []
    assert await handler([envelope(sleeper("early"))]) is None  # a redelivery changes nothing
    await reporter.flush()
    assert len(publisher.messages) == 1


async def test_a_newer_attempt_supersedes_the_running_one_and_an_older_one_is_refused(node):
    publisher, reporter, attempts, handler, _ = node
    await handler([envelope(sleeper("s", attempt=2))])
    await handler([envelope(sleeper("s", attempt=1))])  # stale: refused
    await handler([envelope(msgspec.structs.replace(bound("s"), attempt=3))])  # a no-op: it ends at once
    await eventually(lambda: ended(attempts), timeout=5, what="attempt 2 to be stopped")
    await reporter.flush()
    ends = {m.attempt: m for m in publisher.messages if isinstance(m, JobFailed | JobSucceeded)}
    assert ends[1].error.code == "superseded" and ends[1].started_at == 0.0
    assert ends[2].error.code == "superseded" and "attempt 3" in ends[2].error.message
    assert isinstance(ends[3], JobSucceeded)


async def test_attempts_of_the_previous_incarnation_are_acked_without_running(node):
    publisher, reporter, attempts, handler, record = node
    attempts.adopt_previous(["old:1"], ["done:1"])
    assert await handler([envelope(sleeper("old")), envelope(sleeper("done"))]) is None
    await reporter.flush()
    assert publisher.messages == [] and record.puts == [] and attempts.running == 0
    assert await handler([cancel_envelope("old")]) is None  # nothing to stop


async def test_the_lease_ends_once_the_terminal_event_is_durable(node):
    _, _, attempts, handler, _ = node
    await handler([envelope(bound("e", ProcessRuntime(argv=["true"])))])
    await eventually(lambda: ended(attempts), what="the attempt to end")
    running, ended_keys = attempts.leases.snapshot(time.time())
    assert running == [] and ended_keys == ["e:1"]


async def test_an_ended_attempt_keeps_its_lease_and_outcome_until_a_record_lists_it_ended(node, tmp_path):
    _, reporter, attempts, handler, _ = node
    recorded: list[asyncio.Future[None]] = []

    def record_put() -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        recorded.append(future)
        return future

    attempts.record_put = record_put
    await handler([envelope(bound("k", ProcessRuntime(argv=["sh", "-c", "echo hi > note"])))])
    await eventually(lambda: ended(attempts), what="the attempt to end")
    await reporter.flush()
    private, workdir = tmp_path / ".k-1", tmp_path / "k-1"

    async def stripped():
        return not workdir.exists() and private.exists() and sorted(p.name for p in private.iterdir())

    # The record put it asked for is not durable yet: what a next executor needs stays, and
    # nothing else does (the working directory goes as always).
    assert await eventually(stripped, what="the clean-up") == [LEASE_FILE, OUTCOME_FILE]
    assert len(recorded) == 1
    kept = read_outcome(private, AttemptLease(job_id="k", attempt=1, partition=2, started_at=0.0), NODE)
    assert kept is not None and isinstance(kept.message, JobSucceeded)
    recorded[0].set_result(None)

    async def gone():
        return not private.exists()

    await eventually(gone, what="the private directory once the record lists the attempt as ended")


async def test_an_ended_attempt_whose_record_put_is_cancelled_leaves_its_evidence_for_the_next_start(node, tmp_path):
    _, _, attempts, handler, _ = node
    recorded: list[asyncio.Future[None]] = []

    def record_put() -> asyncio.Future[None]:
        recorded.append(asyncio.get_running_loop().create_future())
        return recorded[-1]

    attempts.record_put = record_put
    await handler([envelope(bound("c", ProcessRuntime(argv=["true"])))])
    await eventually(lambda: ended(attempts), what="the attempt to end")

    async def asked():
        return recorded

    await eventually(asked, what="the record put")
    recorded[0].cancel()  # the record writer stopped (a stop of the executor)
    await attempts.drain(1.0)
    assert sorted(p.name for p in (tmp_path / ".c-1").iterdir()) == [LEASE_FILE, OUTCOME_FILE]
