"""Running one process: spawn, output pumps, the output tail, the run timeout, and killing its group.

:class:`ProcessRunner` runs a ``ProcessRuntime`` in a process group of its own, hands its
output over line by line and returns the :class:`~jobmesh.executor.outcomes.Outcome` of the
process. :class:`AbortSignal` is how the attempt around it stops the process early (drain,
disk quota, cancel, superseded), with the reason it is then reported with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from jobmesh.contract.messages.v1 import JobError, ProcessRuntime
from jobmesh.contract.messages.v1.jobs import FailureCode
from jobmesh.executor.outcomes import SPAWN_FAILED, TIMEOUT, Outcome, exit_outcome, failed_outcome

log = logging.getLogger("jobmesh.executor.runner")

TAIL_CHARS = 4096  # output kept for the terminal event
MAX_LINE_BYTES = 16 * 1024  # a longer line is split: one LogLine stays far below max_msg_size
READ_CHUNK = 64 * 1024

OutputStream = Literal["stdout", "stderr"]
LineSink = Callable[[OutputStream, str], Awaitable[None]]


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


class AbortSignal:
    """Tells a running process to stop now, and why (drain, disk quota, cancel, superseded).

    The first reason set wins: it is why the process was stopped.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.error: JobError | None = None

    def set(self, code: FailureCode, message: str) -> None:
        """Ask the process to stop; it is reported as failed with ``code`` and ``message``.

        Args:
            code: the failure code the attempt is reported with.
            message: the human explanation.
        """
        if self.error is None:
            self.error = JobError(code=code, message=message)
        self._event.set()

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self._event.is_set()

    async def wait(self) -> None:
        """Return once a stop is asked for."""
        await self._event.wait()


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
        """The job's whole environment: minimal base, then its own, then jobmesh's.

        Args:
            runtime: the job's runtime, with its own ``env``.
            workdir: the attempt's working directory (its HOME).
            job_vars: jobmesh's variables (job id, attempt, scratch directory).

        Returns:
            The complete environment.
        """
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
        pass_fds: Sequence[int] = (),
        on_spawned: Callable[[], Awaitable[None]] | None = None,
        name: str = "a job",
    ) -> Outcome:
        """Run the process and return how it ended.

        Args:
            runtime: argv and env of the job.
            workdir: an existing, empty directory; the process's cwd and HOME.
            env: the complete environment (see :meth:`environment`).
            timeout: the run timeout in seconds.
            abort: stops the process early when set (drain, disk quota, cancel); one set
                before the spawn keeps the process from starting at all.
            on_line: awaited with (``"stdout"``/``"stderr"``, line) for each output line.
            pass_fds: descriptors the process inherits (the progress pipe), same numbers.
            on_spawned: awaited once the process started, or failed to (the caller closes
                its copy of what it passed).
            name: how log lines name the attempt (``job <id> attempt <n>``).

        Returns:
            The outcome, with the last output as its tail.
        """
        tail = OutputTail()
        loop = asyncio.get_running_loop()
        if abort.error is not None:
            if on_spawned is not None:
                await on_spawned()
            return Outcome(None, abort.error)
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
                pass_fds=tuple(pass_fds),
            )
        except OSError as exc:  # not found, not executable, bad interpreter line...
            if on_spawned is not None:
                await on_spawned()
            reason = exc.strerror or str(exc)
            return failed_outcome(SPAWN_FAILED, f"cannot start {runtime.argv[0]!r}: {reason}")
        pid = transport.get_pid()
        # Both pipes were asked for above, so asyncio made a reader for each.
        assert protocol.stdout is not None and protocol.stderr is not None
        pumps = [
            _OutputPump(protocol.stdout, "stdout", tail, on_line),
            _OutputPump(protocol.stderr, "stderr", tail, on_line),
        ]
        exited = protocol.exited
        aborted = asyncio.ensure_future(abort.wait())
        try:
            if on_spawned is not None:
                await on_spawned()
            await asyncio.wait({exited, aborted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            stopped_by: JobError | None = None
            if not exited.done():
                stopped_by = abort.error or JobError(
                    code=TIMEOUT, message=f"ran longer than its run timeout of {timeout:g}s"
                )
                await self._stop_group(pid, exited)
            # Whatever the job left running in its group must not outlive the attempt.
            _signal_group(pid, signal.SIGKILL)
            await self._finish_pumps(pumps, name)
        finally:
            aborted.cancel()
            if not exited.done():  # cancelled: take the whole group down with us
                _signal_group(pid, signal.SIGKILL)
            transport.close()  # frees the pipes an escaped grandchild may still hold
        if stopped_by is not None:
            return Outcome(None, stopped_by, tail.text())
        returncode = transport.get_returncode()
        assert returncode is not None  # set before process_exited resolved ``exited``
        return exit_outcome(returncode, tail.text())

    async def _stop_group(self, pgid: int, exited: asyncio.Future[None]) -> None:
        """SIGTERM the group, then SIGKILL it if the leader has not exited after the grace."""
        _signal_group(pgid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), self._kill_grace)
        except TimeoutError:
            _signal_group(pgid, signal.SIGKILL)
            await exited

    async def _finish_pumps(self, pumps: list[_OutputPump], name: str) -> None:
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
                log.error("%s: reading its %s failed", name, pump.stream, exc_info=pump.task.exception())


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

    def __init__(self, reader: asyncio.StreamReader, stream: OutputStream, tail: OutputTail, on_line: LineSink) -> None:
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
