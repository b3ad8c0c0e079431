"""Running one process: spawn, output pumps, the output tail, the run timeout, and killing all of it.

:class:`ProcessRunner` is the :class:`~jobmesh.executor.runrequest.Runner` of ``ProcessRuntime``:
it runs the request's process inside the node's boundaries
(:mod:`jobmesh.executor.isolation`: its cgroup, rlimits, the sandbox uid, bubblewrap at the
sandbox level), in a session of its own, hands its output over line by line and returns
the :class:`~jobmesh.executor.outcomes.Outcome` of the process, with ``oom`` and
``pids_exceeded`` where its cgroup says so. Every process of the attempt is killed at its
end (the cgroup's, else the process group). :class:`AbortSignal` is how the attempt around
it stops the process early (drain, disk quota, cancel, superseded, the pids limit), with
the reason it is then reported with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from jobmesh.contract.messages.v1 import JobError, ProcessRuntime
from jobmesh.contract.messages.v1.jobs import FailureCode
from jobmesh.executor.childprocess import READ_CHUNK, start_piped
from jobmesh.executor.isolation.cgroups import MIN_MEMORY_MB
from jobmesh.executor.isolation.environment import job_environment
from jobmesh.executor.isolation.launch import Launch, LaunchSpec, command_problem, prepare_launch
from jobmesh.executor.isolation.probe import NodeIsolation
from jobmesh.executor.isolation.rlimits import NODE_CPUS, cpu_limit
from jobmesh.executor.isolation.sandbox import sandbox_path
from jobmesh.executor.outcomes import (
    EXECUTOR_ERROR,
    PIDS_EXCEEDED,
    SPAWN_FAILED,
    TIMEOUT,
    Outcome,
    cpu_limit_outcome,
    exit_outcome,
    failed_outcome,
    limit_outcome,
)

if TYPE_CHECKING:  # runrequest imports this module for AbortSignal and LineSink
    from jobmesh.executor.runrequest import RunRequest

log = logging.getLogger("jobmesh.executor.runner")

TAIL_CHARS = 4096  # output kept for the terminal event
MAX_LINE_BYTES = 16 * 1024  # a longer line is split: one LogLine stays far below max_msg_size
PIDS_POLL_SECONDS = 0.25  # how often a running attempt's cgroup is asked whether a fork was refused

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

    The process gets a session (and so a process group) of its own, and with an isolation
    also the node's boundaries (see the module docstring), so a timeout or drain stops
    everything it started, not just the first process.

    Args:
        base_env: the variables every job gets (the allow-list); HOME is the working directory.
        kill_grace: seconds between SIGTERM and SIGKILL when stopping a process group.
        pipe_grace: seconds to keep reading output after the process ended (a detached
            grandchild may hold the pipes open forever).
        isolation: the node's isolation (None: a plain process, as the executor's own user,
            without limits; for tests of the runner alone).
        device_nodes: the device nodes of reserved GPU indices, bound into a sandbox
            (H-GPU's ``gpus.gpu_device_nodes``; none by default).
    """

    def __init__(
        self,
        base_env: Mapping[str, str],
        kill_grace: float = 3.0,
        pipe_grace: float = 2.0,
        isolation: NodeIsolation | None = None,
        device_nodes: Callable[[Sequence[int]], Sequence[str]] | None = None,
    ) -> None:
        self._base_env = dict(base_env)
        self._kill_grace = kill_grace
        self._pipe_grace = pipe_grace
        self.isolation = isolation
        self._device_nodes = device_nodes

    @property
    def base_env(self) -> dict[str, str]:
        """The allow-listed variables every job gets."""
        return dict(self._base_env)

    def environment(self, runtime: ProcessRuntime, workdir: Path, job_vars: Mapping[str, str]) -> dict[str, str]:
        """The job's whole environment: the allow-list, then its own, then jobmesh's.

        Args:
            runtime: the job's runtime, with its own ``env``.
            workdir: the attempt's working directory (its HOME).
            job_vars: jobmesh's variables (job id, attempt, scratch directory).

        Returns:
            The complete environment.
        """
        return job_environment(self._base_env, workdir, runtime.env, job_vars)

    @overload
    async def run(self, request: RunRequest) -> Outcome: ...

    @overload
    async def run(
        self,
        request: ProcessRuntime,
        workdir: Path,
        env: Mapping[str, str],
        timeout: float,
        abort: AbortSignal,
        on_line: LineSink,
        pass_fds: Sequence[int] = (),
        on_spawned: Callable[[], Awaitable[None]] | None = None,
        name: str = "a job",
    ) -> Outcome: ...

    async def run(self, request: Any, *args: Any, **kwargs: Any) -> Outcome:
        """Run the request's process and return how it ended.

        The second form, ``run(runtime, workdir, env, timeout, abort, on_line, pass_fds=(),
        on_spawned=None, name=...)``, is the one from before :class:`RunRequest`, kept for
        the callers written against it.

        Args:
            request: the attempt (:class:`~jobmesh.executor.runrequest.RunRequest`); its
                ``abort`` set before the spawn keeps the process from starting at all.

        Returns:
            The outcome, with the last output as its tail.
        """
        if isinstance(request, ProcessRuntime):
            from jobmesh.executor.runrequest import RunRequest

            request = _legacy_request(RunRequest, request, *args, **kwargs)
        return await self._run(request)

    async def _run(self, request: RunRequest) -> Outcome:
        runtime = request.runtime
        if not isinstance(runtime, ProcessRuntime):
            raise TypeError(f"a ProcessRunner runs process runtimes, not {type(runtime).__name__}")
        abort, on_spawned = request.abort, request.on_spawned
        if abort.error is not None:
            if on_spawned is not None:
                await on_spawned()
            return Outcome(None, abort.error)
        launch: Launch | None = None
        env = dict(request.env)
        if self.isolation is not None and self.isolation.sandbox is not None:
            env["PATH"] = sandbox_path(env.get("PATH", ""), self.isolation.sandbox)
            problem = command_problem(runtime.argv[0], env["PATH"], request.workdir)
            if problem is not None:
                if on_spawned is not None:
                    await on_spawned()
                return failed_outcome(SPAWN_FAILED, f"cannot start {runtime.argv[0]!r}: {problem}")
        if self.isolation is not None:
            spec = LaunchSpec(
                argv=runtime.argv,
                workdir=request.workdir,
                cgroup_name=request.workdir.name,
                memory_mb=request.resources.memory_mb,
                cpu_milli=request.resources.cpu_milli,
                timeout=request.timeout,
                network=request.network,
                secrets_dir=str(request.secrets_dir or ""),
                devices=self._device_nodes(request.gpu_devices)
                if self._device_nodes is not None and request.gpu_devices
                else (),
                pass_fds=request.pass_fds,
            )
            try:
                own = self.isolation
                if request.uid is not None:  # a uid of the attempt's own (isolation/uids.py)
                    own = dataclasses.replace(own, uid=request.uid, gid=request.gid)
                launch = prepare_launch(own, spec)
            except OSError as exc:
                if on_spawned is not None:
                    await on_spawned()
                log.error("%s: its isolation cannot be set up: %s", request.name, exc)
                return failed_outcome(EXECUTOR_ERROR, f"cannot set up the attempt's isolation: {exc}")
        started = time.monotonic()
        try:
            outcome = await self._spawn_and_wait(request, runtime, launch, env)
            elapsed = time.monotonic() - started  # what the process had to use up its CPU time in
        finally:
            events = await asyncio.to_thread(launch.finish) if launch is not None else None
        if launch is None:
            return outcome
        if events is not None and launch.cgroup is not None:
            isolation = self.isolation
            assert isolation is not None
            memory = max(request.resources.memory_mb, MIN_MEMORY_MB)
            outcome = limit_outcome(outcome, events.oom_kills, events.pids_refused, memory, isolation.pids_max)
        cpu = cpu_limit(launch.rlimits)
        if cpu is None:
            return outcome
        # After the cgroup's verdict: a process the OOM killer ended is ``oom``, not this.
        return cpu_limit_outcome(outcome, cpu.soft, cpu.hard, elapsed, NODE_CPUS)

    async def _spawn_and_wait(
        self, request: RunRequest, runtime: ProcessRuntime, launch: Launch | None, env: dict[str, str]
    ) -> Outcome:
        tail = OutputTail()
        abort, on_spawned, timeout = request.abort, request.on_spawned, request.timeout
        stdin_fd: int | None = None
        try:
            if request.stdin is not None:
                stdin_fd = os.open(request.stdin, os.O_RDONLY | os.O_CLOEXEC)  # a small local file
            transport, protocol = await start_piped(
                launch.argv if launch is not None else runtime.argv,
                cwd=request.workdir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL if stdin_fd is None else stdin_fd,
                pass_fds=request.pass_fds,
                preexec=launch.preexec if launch is not None else None,
            )
        except subprocess.SubprocessError as exc:  # the child's set-up (cgroup, rlimits, uid) failed
            if on_spawned is not None:
                await on_spawned()
            log.error("%s: the child could not enter its isolation: %s", request.name, exc)
            return failed_outcome(EXECUTOR_ERROR, f"the attempt's process could not enter its isolation: {exc}")
        except OSError as exc:  # not found, not executable, bad interpreter line...
            if on_spawned is not None:
                await on_spawned()
            reason = exc.strerror or str(exc)
            return failed_outcome(SPAWN_FAILED, f"cannot start {runtime.argv[0]!r}: {reason}")
        finally:
            if stdin_fd is not None:
                os.close(stdin_fd)
        pid = transport.get_pid()
        # Both pipes were asked for above, so asyncio made a reader for each.
        assert protocol.stdout is not None and protocol.stderr is not None
        pumps = [
            _OutputPump(protocol.stdout, "stdout", tail, request.on_line),
            _OutputPump(protocol.stderr, "stderr", tail, request.on_line),
        ]
        exited = protocol.exited
        aborted = asyncio.ensure_future(abort.wait())
        watch = (
            asyncio.ensure_future(_watch_pids(launch, abort, self.isolation))
            if launch is not None and launch.cgroup is not None and self.isolation is not None
            else None
        )
        try:
            if on_spawned is not None:
                await on_spawned()
            await asyncio.wait({exited, aborted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            stopped_by: JobError | None = None
            if not exited.done():
                stopped_by = abort.error or JobError(
                    code=TIMEOUT, message=f"ran longer than its run timeout of {timeout:g}s"
                )
                await self._stop_group(pid, exited, launch)
            # Whatever the job left running in its group must not outlive the attempt.
            _signal_all(pid, signal.SIGKILL, launch)
            await self._finish_pumps(pumps, request.name)
        finally:
            aborted.cancel()
            if watch is not None:
                watch.cancel()
            if not exited.done():  # cancelled: take the whole group down with us
                _signal_all(pid, signal.SIGKILL, launch)
            transport.close()  # frees the pipes an escaped grandchild may still hold
        if stopped_by is not None:
            return Outcome(None, stopped_by, tail.text())
        returncode = transport.get_returncode()
        assert returncode is not None  # set before process_exited resolved ``exited``
        return exit_outcome(returncode, tail.text())

    async def _stop_group(self, pgid: int, exited: asyncio.Future[None], launch: Launch | None) -> None:
        """SIGTERM the group, then SIGKILL it if the leader has not exited after the grace."""
        _signal_all(pgid, signal.SIGTERM, launch)
        try:
            await asyncio.wait_for(asyncio.shield(exited), self._kill_grace)
        except TimeoutError:
            _signal_all(pgid, signal.SIGKILL, launch)
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


async def _watch_pids(launch: Launch, abort: AbortSignal, isolation: NodeIsolation) -> None:
    """Stop the attempt the first time its cgroup refuses it a fork: a fork bomb never ends on
    its own, and the limit is the attempt's, not a hint."""
    assert launch.cgroup is not None
    cgroup = launch.cgroup
    while not abort.is_set():
        await asyncio.sleep(PIDS_POLL_SECONDS)  # a poll interval, as quota.watch_quota's
        if cgroup.events().pids_refused:
            abort.set(
                PIDS_EXCEEDED,
                f"started more processes than its limit of {isolation.pids_max} (JOBMESH_ATTEMPT_PIDS_MAX)",
            )
            return


def _legacy_request(
    request_type: type[RunRequest],
    runtime: ProcessRuntime,
    workdir: Path,
    env: Mapping[str, str],
    timeout: float,
    abort: AbortSignal,
    on_line: LineSink,
    pass_fds: Sequence[int] = (),
    on_spawned: Callable[[], Awaitable[None]] | None = None,
    name: str = "a job",
) -> RunRequest:
    return request_type(
        job_id="",
        attempt=0,
        name=name,
        runtime=runtime,
        workdir=workdir,
        env=env,
        timeout=timeout,
        abort=abort,
        on_line=on_line,
        pass_fds=tuple(pass_fds),
        on_spawned=on_spawned,
    )


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


def _signal_all(pgid: int, sig: int, launch: Launch | None) -> None:
    if launch is not None:
        launch.signal_all(pgid, sig)
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group is already gone
