"""Running bound attempts: the process and no-op runtimes, output, timeouts, and drain.

One :class:`Attempt` takes a ``JobBound`` from start to its published terminal event.
:class:`ProcessRunner` runs a ``ProcessRuntime`` in its own process group, streams its
output line by line and enforces the run timeout. :class:`Attempts` is this node's register
of attempts: which are running (for drain) and which ran recently (so a redelivered
``JobBound`` is not run twice).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Mapping

from opentelemetry import trace

from jobmesh.contract import subjects
from jobmesh.contract.ids import attempt_key, event_id, log_id
from jobmesh.contract.messages.v1 import (
    JobBound,
    JobError,
    JobFailed,
    JobSucceeded,
    LogLine,
    NoopRuntime,
    ProcessRuntime,
)
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.tracing import Context

from jobmesh.executor.reporter import Reporter

log = logging.getLogger("jobmesh.executor.attempts")

TAIL_CHARS = 4096  # output kept for the terminal event
MAX_LINE_BYTES = 16 * 1024  # a longer line is split: one LogLine stays far below max_msg_size
READ_CHUNK = 64 * 1024

# Stable error codes in JobFailed.error.code (the scheduler's retry policy matches on them).
EXIT_CODE = "exit_code"
TIMEOUT = "timeout"
SPAWN_FAILED = "spawn_failed"
WORKDIR_FAILED = "workdir_failed"
NODE_DRAINED = "node_drained"
EXECUTOR_ERROR = "executor_error"
DISK_QUOTA = "disk_quota_exceeded"
QUOTA_CHECK_SECONDS = 1.0  # how often a job's scratch directory is measured

LineSink = Callable[[str, str], Awaitable[None]]


class OutputTail:
    """The last ``limit`` characters of an attempt's combined output.

    Args:
        limit: characters to keep.
    """

    def __init__(self, limit: int = TAIL_CHARS) -> None:
        self._limit = limit
        self._parts: deque[str] = deque()
        self._size = 0

    def add(self, text: str) -> None:
        """Append ``text``, dropping whole old pieces no longer needed for the tail."""
        self._parts.append(text)
        self._size += len(text)
        while self._parts and self._size - len(self._parts[0]) >= self._limit:
            self._size -= len(self._parts.popleft())

    def text(self) -> str:
        """The tail itself, at most ``limit`` characters."""
        return "".join(self._parts)[-self._limit :]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended: ``error`` is None exactly when it succeeded."""

    exit_code: int | None
    error: JobError | None
    output_tail: str = ""


def directory_bytes(path: Path) -> int:
    """Bytes held by regular files under ``path`` (links are not followed)."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue  # removed while we looked: nothing to count
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


class AbortSignal:
    """Tells a running attempt to stop now, and why (drain, and later cancellation)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.error: JobError | None = None

    def set(self, code: str, message: str) -> None:
        if self.error is None:
            self.error = JobError(code=code, message=message)
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


def exit_outcome(returncode: int, output_tail: str = "") -> Outcome:
    """The outcome of a process that ended on its own with ``returncode``."""
    if returncode == 0:
        return Outcome(0, None, output_tail)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        message = f"killed by {name} (exit code {returncode})"
    else:
        message = f"exited with code {returncode}"
    return Outcome(returncode, JobError(code=EXIT_CODE, message=message), output_tail)


def noop_outcome(runtime: NoopRuntime) -> Outcome:
    """The outcome of a no-op attempt: whatever exit code it asked for."""
    return exit_outcome(runtime.exit_code)


def terminal_message(
    bound: JobBound, node_id: str, outcome: Outcome, started_at: float, at: float, context: Context | None
) -> Outgoing:
    """The terminal event of an attempt, addressed and with its deterministic message id."""
    kind = subjects.SUCCEEDED if outcome.error is None else subjects.FAILED
    return Outgoing(
        subjects.job_event(bound.partition, kind),
        terminal_event(bound, node_id, outcome, started_at, at),
        event_id(bound.job_id, bound.attempt, kind),
        context,
    )


def terminal_event(
    bound: JobBound, node_id: str, outcome: Outcome, started_at: float, at: float
) -> JobSucceeded | JobFailed:
    """The Succeeded or Failed event reporting ``outcome``."""
    if outcome.error is None:
        return JobSucceeded(
            job_id=bound.job_id,
            attempt=bound.attempt,
            partition=bound.partition,
            node_id=node_id,
            exit_code=outcome.exit_code or 0,
            output_tail=outcome.output_tail,
            submitted_at=bound.submitted_at,
            started_at=started_at,
            at=at,
        )
    return JobFailed(
        job_id=bound.job_id,
        attempt=bound.attempt,
        partition=bound.partition,
        node_id=node_id,
        exit_code=outcome.exit_code,
        error=outcome.error,
        output_tail=outcome.output_tail,
        submitted_at=bound.submitted_at,
        started_at=started_at,
        at=at,
    )


class ProcessRunner:
    """Runs one ``ProcessRuntime`` to its end in a prepared working directory.

    The process gets a session (and so a process group) of its own, so a timeout or drain
    stops everything it started, not just the first process.

    Args:
        base_env: the variables every job gets (PATH, LANG); HOME is the working directory.
        kill_grace: seconds between SIGTERM and SIGKILL when stopping a process group.
        pipe_grace: seconds to keep reading output after the process ended (a detached
            grandchild may hold the pipes open forever).
    """

    def __init__(self, base_env: Mapping[str, str], kill_grace: float = 3.0, pipe_grace: float = 2.0) -> None:
        self._base_env = dict(base_env)
        self._kill_grace = kill_grace
        self._pipe_grace = pipe_grace

    def environment(self, runtime: ProcessRuntime, workdir: Path, job_vars: Mapping[str, str]) -> dict[str, str]:
        """The job's whole environment: minimal base, then its own, then jobmesh's."""
        env = {**self._base_env, "HOME": str(workdir)}
        env.update(runtime.env)
        env.update(job_vars)  # last, so a job cannot claim another job's identity
        return env

    async def run(
        self,
        runtime: ProcessRuntime,
        workdir: Path,
        env: Mapping[str, str],
        timeout: float,
        abort: AbortSignal,
        on_line: LineSink,
    ) -> Outcome:
        """Run the process and return how it ended.

        Args:
            runtime: argv and env of the job.
            workdir: an existing, empty directory; the process's cwd and HOME.
            env: the complete environment (see :meth:`environment`).
            timeout: the run timeout in seconds.
            abort: stops the process early when set (drain).
            on_line: awaited with (``"stdout"``/``"stderr"``, line) for each output line.

        Returns:
            The outcome, with the last output as its tail.
        """
        tail = OutputTail()
        loop = asyncio.get_running_loop()
        try:
            # What asyncio.create_subprocess_exec does, with a protocol that says when the
            # process exits: on Python 3.11's own event loop Process.wait() returns only
            # once every pipe is closed, which a detached grandchild can put off forever.
            transport, protocol = await loop.subprocess_exec(
                lambda: _ExitAwareProtocol(loop),
                *runtime.argv,
                cwd=str(workdir),
                env=dict(env),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:  # not found, not executable, bad interpreter line...
            reason = exc.strerror or str(exc)
            return Outcome(None, JobError(code=SPAWN_FAILED, message=f"cannot start {runtime.argv[0]!r}: {reason}"))
        pid = transport.get_pid()
        pumps = [
            _OutputPump(protocol.stdout, "stdout", tail, on_line),
            _OutputPump(protocol.stderr, "stderr", tail, on_line),
        ]
        exited = protocol.exited
        aborted = asyncio.ensure_future(abort.wait())
        try:
            await asyncio.wait({exited, aborted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            stopped_by: JobError | None = None
            if not exited.done():
                stopped_by = abort.error or JobError(
                    code=TIMEOUT, message=f"ran longer than its run timeout of {timeout:g}s"
                )
                await self._stop_group(pid, exited)
            # Whatever the job left running in its group must not outlive the attempt.
            _signal_group(pid, signal.SIGKILL)
            await self._finish_pumps(pumps)
        finally:
            aborted.cancel()
            if not exited.done():  # cancelled: take the whole group down with us
                _signal_group(pid, signal.SIGKILL)
            transport.close()  # frees the pipes an escaped grandchild may still hold
        if stopped_by is not None:
            return Outcome(None, stopped_by, tail.text())
        return exit_outcome(transport.get_returncode(), tail.text())

    async def _stop_group(self, pgid: int, exited: asyncio.Future) -> None:
        """SIGTERM the group, then SIGKILL it if the leader has not exited after the grace."""
        _signal_group(pgid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), self._kill_grace)
        except asyncio.TimeoutError:
            _signal_group(pgid, signal.SIGKILL)
            await exited

    async def _finish_pumps(self, pumps: list[_OutputPump]) -> None:
        """Wait for the output readers once the process group is gone.

        A reader still waiting on its pipe after ``pipe_grace`` is stopped: only a process
        that escaped the group (a new session) can hold the pipe open now. A reader that
        is waiting for room in the reporter keeps going: that output is real and the
        reporter will take it.
        """
        pending = {pump.task for pump in pumps}
        while pending:
            _, pending = await asyncio.wait(pending, timeout=self._pipe_grace)
            for pump in pumps:
                if pump.task in pending and pump.reading:
                    pump.task.cancel()
        for pump in pumps:
            if not pump.task.cancelled() and pump.task.exception() is not None:
                # Losing the rest of the output must not lose the outcome; say so, loudly.
                log.error("reading a job's %s failed", pump.stream, exc_info=pump.task.exception())


class _ExitAwareProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's stream protocol for a subprocess, plus a future set when it exits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=READ_CHUNK, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class _OutputPump:
    """Reads one pipe, splits it into lines (long ones into pieces) and hands them over."""

    def __init__(self, reader: asyncio.StreamReader, stream: str, tail: OutputTail, on_line: LineSink) -> None:
        self.stream = stream
        self.reading = False  # waiting on the pipe, as opposed to handing a line over
        self._reader = reader
        self._tail = tail
        self._on_line = on_line
        self.task = asyncio.ensure_future(self._run())

    async def _emit(self, raw: bytes) -> None:
        for start in range(0, max(len(raw), 1), MAX_LINE_BYTES):
            text = raw[start : start + MAX_LINE_BYTES].decode("utf-8", "replace").rstrip("\r")
            self._tail.add(text + "\n")
            await self._on_line(self.stream, text)

    async def _run(self) -> None:
        buffer = b""
        while True:
            self.reading = True
            chunk = await self._reader.read(READ_CHUNK)
            self.reading = False
            if not chunk:
                break
            buffer += chunk
            if b"\n" in chunk:
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    await self._emit(raw)
            if len(buffer) > MAX_LINE_BYTES:
                # No newline in sight: hand over full pieces now, and keep a non-empty
                # remainder, so a line ending right at a piece boundary adds no empty line.
                cut = (len(buffer) - 1) // MAX_LINE_BYTES * MAX_LINE_BYTES
                await self._emit(buffer[:cut])
                buffer = buffer[cut:]
        if buffer:
            await self._emit(buffer)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group is already gone


class Attempt:
    """One process attempt on this node, from start to its published terminal event.

    (A no-op attempt needs none of this; :meth:`Attempts.launch` reports it directly.)

    Args:
        bound: the dispatch message.
        context: the dispatch envelope's trace context, carried by everything it reports.
        started_at: when the executor started it (the JobStarted ``at``).
        node_id: this node.
        work_root: the node's work directory; the attempt's own is a fresh subdirectory.
        reporter: where log lines and the terminal event go.
        runner: runs process runtimes.
        tracer: for the attempt's span.
        clock: epoch seconds.
    """

    def __init__(
        self,
        bound: JobBound,
        context: Context,
        started_at: float,
        *,
        node_id: str,
        work_root: Path,
        reporter: Reporter,
        runner: ProcessRunner,
        tracer: trace.Tracer,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bound = bound
        self.context = context
        self.started_at = started_at
        self.key = attempt_key(bound.job_id, bound.attempt)
        self._node_id = node_id
        self._work_root = work_root
        self._reporter = reporter
        self._runner = runner
        self._tracer = tracer
        self._clock = clock
        self._abort = AbortSignal()
        self._log_seq = 0

    @property
    def workdir(self) -> Path:
        return self._work_root / f"{self.bound.job_id}-{self.bound.attempt}"

    def abort(self, code: str, message: str) -> None:
        """Stop the attempt's process now; it is reported as failed with ``code``."""
        self._abort.set(code, message)

    async def run(self) -> None:
        """Run to the end and publish the terminal event; never raises for a job's failure."""
        span = self._tracer.start_span("execute jobmesh.job", context=self.context)
        try:
            try:
                outcome = await self._run_process(self.bound.spec.runtime)
            except Exception as exc:  # noqa: BLE001 - fate: the attempt fails with the reason
                log.exception("attempt %s failed inside the executor", self.key)
                outcome = Outcome(None, JobError(code=EXECUTOR_ERROR, message=f"{type(exc).__name__}: {exc}"))
            if outcome.error is not None:
                span.set_attribute("jobmesh.error.code", outcome.error.code)
            durable = self._reporter.emit(
                [terminal_message(self.bound, self._node_id, outcome, self.started_at, self._clock(), self.context)]
            )
            # The directory stays until the outcome is durable, for whoever debugs a loss.
            await durable
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)
        finally:
            span.end()

    async def _run_process(self, runtime: ProcessRuntime) -> Outcome:
        workdir = self.workdir
        try:
            # A leftover from an earlier run of this attempt (executor crash) goes first.
            if workdir.exists():
                await asyncio.to_thread(shutil.rmtree, workdir, True)
            workdir.mkdir(parents=True)
        except OSError as exc:
            return Outcome(None, JobError(code=WORKDIR_FAILED, message=f"cannot create {workdir}: {exc}"))
        job_vars = {"JOBMESH_JOB_ID": self.bound.job_id, "JOBMESH_ATTEMPT": str(self.bound.attempt)}
        if self.bound.scratch_dir:
            job_vars["JOBMESH_SCRATCH_DIR"] = self.bound.scratch_dir
        env = self._runner.environment(runtime, workdir, job_vars)
        timeout = self.bound.spec.timeouts.run
        quota_mb = self.bound.spec.resources.disk_mb
        watchdog = asyncio.ensure_future(self._watch_quota(workdir, quota_mb)) if quota_mb else None
        try:
            return await self._runner.run(runtime, workdir, env, timeout, self._abort, self._publish_line)
        finally:
            if watchdog is not None:
                watchdog.cancel()

    async def _watch_quota(self, workdir: Path, quota_mb: int) -> None:
        """Stop the attempt when its scratch directory outgrows the disk it reserved.

        The binder reserved ``disk_mb`` on this node for the job; a job that writes more
        would eat into other jobs' reservations, so it is stopped and fails with
        ``disk_quota_exceeded``. Measured by walking the directory, so a burst between two
        checks can overshoot briefly.
        """
        limit = quota_mb * 1024 * 1024
        while True:
            await asyncio.sleep(QUOTA_CHECK_SECONDS)
            used = await asyncio.to_thread(directory_bytes, workdir)
            if used > limit:
                self.abort(DISK_QUOTA, f"used {used / 2**20:.1f} MiB of its {quota_mb} MiB disk quota")
                return

    async def _publish_line(self, stream: str, line: str) -> None:
        self._log_seq += 1
        bound = self.bound
        message = LogLine(job_id=bound.job_id, attempt=bound.attempt, stream=stream, line=line, at=self._clock())
        await self._reporter.emit_log(
            Outgoing(subjects.job_log(bound.job_id), message, log_id(bound.job_id, bound.attempt, self._log_seq), self.context)
        )


class Attempts:
    """This node's attempts: the running ones, and a bounded memory of recent ones.

    Args:
        node_id: this node.
        work_root: the node's work directory (``<work_dir>/<node_id>``).
        reporter: where attempts report.
        runner: runs process runtimes.
        tracer: for attempt spans.
        clock: epoch seconds.
        remember: how many recent attempts to remember for deduplication; a redelivery
            comes within ``ack_wait`` seconds, so this only has to cover that long a burst.
    """

    def __init__(
        self,
        node_id: str,
        work_root: Path,
        reporter: Reporter,
        runner: ProcessRunner,
        tracer: trace.Tracer,
        clock: Callable[[], float] = time.time,
        remember: int = 100_000,
    ) -> None:
        self._node_id = node_id
        self._work_root = work_root
        self._reporter = reporter
        self._runner = runner
        self._tracer = tracer
        self._clock = clock
        self._remember = remember
        # key -> the future of its JobStarted being durable (what a redelivery waits on).
        self._recent: OrderedDict[str, asyncio.Future[None]] = OrderedDict()
        self._running: dict[str, tuple[Attempt, asyncio.Task]] = {}

    def started_future(self, key: str) -> asyncio.Future[None] | None:
        """The Started future of a known attempt, or None if this node never saw it."""
        return self._recent.get(key)

    def launch(
        self, bound: JobBound, context: Context, started_at: float, started: asyncio.Future[None]
    ) -> Attempt | None:
        """Remember the attempt and start running it as a background task.

        A no-op attempt has nothing to run or wait for, so its terminal event is queued at
        once, right behind its Started, without a task (None is returned): this is the
        benchmark path, and a task per job there costs a tenth of the executor's time.
        """
        self._recent[attempt_key(bound.job_id, bound.attempt)] = started
        if len(self._recent) > self._remember:
            self._recent.popitem(last=False)
        runtime = bound.spec.runtime
        if isinstance(runtime, NoopRuntime):
            self._reporter.post(
                [terminal_message(bound, self._node_id, noop_outcome(runtime), started_at, self._clock(), context)]
            )
            return None
        attempt = Attempt(
            bound,
            context,
            started_at,
            node_id=self._node_id,
            work_root=self._work_root,
            reporter=self._reporter,
            runner=self._runner,
            tracer=self._tracer,
            clock=self._clock,
        )
        task = asyncio.get_running_loop().create_task(attempt.run(), name=f"attempt:{attempt.key}")
        self._running[attempt.key] = (attempt, task)
        task.add_done_callback(lambda _t, key=attempt.key: self._running.pop(key, None))
        return attempt

    @property
    def running(self) -> int:
        """How many attempts have not yet finished."""
        return len(self._running)

    async def drain(self, grace: float, settle: float = 10.0) -> int:
        """Let running attempts finish for ``grace`` seconds, then stop the rest.

        Args:
            grace: seconds the running attempts may still take.
            settle: seconds the stopped ones get to be killed and reported.

        Returns:
            How many attempts were stopped.
        """
        tasks = [task for _, task in self._running.values()]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        left = list(self._running.values())
        for attempt, _ in left:
            attempt.abort(NODE_DRAINED, f"node {self._node_id} was drained before the attempt finished")
        if left:
            log.warning("drain: stopping %d attempts that did not finish in %.0fs", len(left), grace)
            _, pending = await asyncio.wait([task for _, task in left], timeout=settle)
            for task in pending:
                task.cancel()
        return len(left)
