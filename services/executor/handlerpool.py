"""The handler runtime: a pool of long-lived worker processes that run ``@handler`` functions.

:class:`HandlerPool` starts ``workers`` processes (``python -m jobmesh.sdk.worker``) when
the executor starts, so the first job finds them warm; each imports the handler modules
once and serves one job at a time, so a model loaded at import or cached by a handler
serves every later job of that worker. It is the :class:`~jobmesh.executor.runrequest.Runner`
of the ``handler`` runtime.

How a job ends:

- the handler returns: its output (JSON, checked against its type) becomes the attempt's
  result file, which the attempt collects as it does a process's;
- input that does not match the handler's type: ``input_invalid``, the field named as
  ``$.runtime.input.<field>``; no handler code ran, so the worker stays;
- a handler the pool does not host: ``handler_missing``;
- the handler raises: ``handler_failed``, its traceback in the job's log and output tail;
- the worker dies (``os._exit``, a signal, the OOM killer): ``handler_crashed``; but a
  worker that died before it accepted the job (no ``Accepted`` for it: it exited while
  idle, before the pool noticed) never ran any of it, so the job goes to another worker
  once (:func:`hand_off`) and only a second such death fails it;
- the run timeout passes, or the attempt is aborted (cancel, drain): the worker is told
  (``ctx.cancelled``), killed with its whole process group after ``kill_grace`` seconds,
  and the attempt fails ``timeout`` or with the abort's reason.

After a crash, a timeout or an abort the worker is killed and a fresh one started in its
place: it may be wedged or half way through something. After a raise (``handler_failed``),
``input_invalid`` and ``handler_missing`` it serves the next job: the exception unwound in
a healthy process, and a handler that can leave its state broken should catch that itself
(or exit, ``os._exit``, to be replaced).

The worker's stdout and stderr are the current job's log lines (lines between jobs go to
the executor's log). How workers are started is injectable (``spawn``): the executor passes
one that starts them inside the node's isolation; :func:`spawn_plain` is a plain process in
a session of its own with a cleared environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import msgspec

from jobmesh.contract.messages.v1 import HandlerInfo, HandlerRuntime, JobError, JobSpec, ParentRef
from jobmesh.contract.messages.v1.jobs import FailureCode
from jobmesh.errors import InvalidMessage, JobmeshError, Unavailable
from jobmesh.executor.childprocess import READ_CHUNK, PipedProcess, start_piped
from jobmesh.executor.fdpipes import PipeReadTransport, PipeWriter
from jobmesh.executor.outcomes import EXECUTOR_ERROR, NODE_DRAINED, TIMEOUT, Outcome, failed_outcome
from jobmesh.executor.results import RESULT_FILE
from jobmesh.executor.runner import MAX_LINE_BYTES, AbortSignal, OutputStream, OutputTail
from jobmesh.executor.runrequest import RunRequest
from jobmesh.sdk import protocol
from jobmesh.sdk.modules import is_path

log = logging.getLogger("jobmesh.executor.handlerpool")

INPUT_INVALID: FailureCode = "input_invalid"
HANDLER_FAILED: FailureCode = "handler_failed"
HANDLER_CRASHED: FailureCode = "handler_crashed"
HANDLER_MISSING: FailureCode = "handler_missing"
# Failures after which the worker is kept: the handler's code never ran, or it raised (or
# returned output of the wrong type) and the exception unwound in a healthy worker, which
# serves on as Celery's and RQ's workers do. Each replacement is a new sandboxed Python
# process: in make chaos, one per failed attempt kept bwrap and Python start-ups running
# all the time (seen in top, not measured).
_KEEPS_WORKER = frozenset({INPUT_INVALID, HANDLER_MISSING, HANDLER_FAILED})
# How often a job whose worker died before accepting it goes to another worker.
MAX_HANDOFFS = 1
# The executor's variables a worker keeps: enough to find Python, its packages and a locale.
WORKER_ENV_KEEP = ("PATH", "LANG", "PYTHONPATH")


class WorkerProcess(Protocol):
    """A started worker process, as a spawn returns it."""

    @property
    def pid(self) -> int:
        """Its process id (the leader of its process group)."""
        ...

    @property
    def stdout(self) -> asyncio.StreamReader:
        """Its standard output."""
        ...

    @property
    def stderr(self) -> asyncio.StreamReader:
        """Its standard error."""
        ...

    async def wait(self) -> int:
        """Its exit code once it exited; negative for a signal."""
        ...

    def kill(self) -> None:
        """SIGKILL every process the worker started (its group, its cgroup); never raises."""
        ...

    async def close(self) -> None:
        """Release what the spawn holds for it (pipes, cgroup); called once, after it exited.

        It must not block the event loop (a cgroup's removal waits for it to empty: run
        such work in a thread), since the pool's other workers keep being served meanwhile.
        """
        ...


# spawn(argv, env, cwd, pass_fds): start argv with exactly env in cwd, stdin /dev/null,
# stdout and stderr piped, inheriting pass_fds under the same numbers.
Spawn = Callable[[Sequence[str], Mapping[str, str], Path, Sequence[int]], Awaitable[WorkerProcess]]
# submit(spec, idempotency_key) -> job id; raises JobmeshError when the cluster refuses.
# submit(spec, idempotency_key, parent) -> job id; the parent is the submitting workflow step.
SubmitFollowup = Callable[[JobSpec, str, ParentRef | None], Awaitable[str]]


class HandlerLoadError(Exception):
    """Raised by :meth:`HandlerPool.start` when a worker cannot load the handler modules.

    Attributes:
        module: the module that failed to import ("" when the worker failed otherwise).
    """

    def __init__(self, message: str, module: str = "") -> None:
        super().__init__(message)
        self.module = module


class PlainWorkerProcess(PipedProcess):
    """A worker started by :func:`spawn_plain`: a process leading a session of its own."""

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group is gone already

    async def close(self) -> None:
        self._transport.close()


async def spawn_plain(argv: Sequence[str], env: Mapping[str, str], cwd: Path, pass_fds: Sequence[int]) -> WorkerProcess:
    """Start a worker as a plain process in a new session (its own process group).

    Args:
        argv: the command line.
        env: its whole environment.
        cwd: its working directory.
        pass_fds: descriptors it inherits under the same numbers.

    Returns:
        The started process.
    """
    return PlainWorkerProcess(*await start_piped(argv, cwd=cwd, env=env, pass_fds=pass_fds))


def worker_environment(environ: Mapping[str, str], home: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a worker: the executor's PATH, LANG and PYTHONPATH, HOME, ``extra``.

    Args:
        environ: the executor's environment.
        home: the workers' home directory.
        extra: more variables for every worker (they win).

    Returns:
        The environment.
    """
    env = {key: environ[key] for key in WORKER_ENV_KEEP if key in environ}
    env["HOME"] = str(home)
    env.update(extra)
    return env


class _Job:
    """The attempt a worker serves: where its lines go, its tail, its sequence number."""

    def __init__(self, request: RunRequest, seq: int) -> None:
        self.request = request
        self.seq = seq
        self.tail = OutputTail()
        self.accepted = False  # the worker said Accepted (or anything else of this job)

    async def line(self, stream: OutputStream, text: str) -> None:
        self.tail.add(text + "\n")
        await self.request.on_line(stream, text)


class _Worker:
    """One worker process, its pipes, and the job it serves."""

    def __init__(self, process: WorkerProcess, commands: PipeWriter, events: asyncio.StreamReader) -> None:
        self.process = process
        self.pid = process.pid
        self._commands = commands
        self._frames = protocol.FrameReader(events, protocol.Event)
        self.events: asyncio.Queue[protocol.Event | None] = asyncio.Queue()
        self.job: _Job | None = None
        self.handlers: list[HandlerInfo] = []
        self.seq = 0
        self.ready = False
        self.dead = False  # its event pipe ended: it exited, or is about to
        self.retired = False  # killed (or dying) and replaced; never handed a job again
        self.marks: dict[OutputStream, int] = {"stdout": 0, "stderr": 0}
        self.mark_seen = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.events_pipe: PipeReadTransport | None = None  # the read end of its events

    async def send(self, message: protocol.Command) -> bool:
        """Send a command; False when the worker is gone."""
        if self._commands.is_closing():
            return False
        try:
            await self._commands.send(protocol.encode_frame(message))
        except (ConnectionError, OSError):
            return False
        return True

    async def read_event(self) -> protocol.Event | None:
        """The next event from the pipe; None when it ended or broke (the worker is gone)."""
        try:
            event = await self._frames.read()
        except ValueError as exc:
            log.error("handler worker %d broke the protocol: %s", self.pid, exc)
            return None
        except (ConnectionError, OSError):
            return None
        return event  # type: ignore[return-value]  # the reader decodes protocol.Event

    def close_commands(self) -> None:
        self._commands.close()

    async def wait_marks(self, seq: int, timeout: float) -> None:
        """Wait until both output pipes have shown the end of job ``seq`` (or ``timeout``)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while min(self.marks.values()) < seq:
            self.mark_seen.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                log.warning("handler worker %d: the end of job %d's output did not arrive", self.pid, seq)
                return
            try:
                await asyncio.wait_for(self.mark_seen.wait(), left)
            except TimeoutError:
                continue


class HandlerPool:
    """A pool of handler workers: the Runner of the ``handler`` runtime.

    Args:
        modules: the handler modules every worker imports (dotted names or ``.py`` files;
            a relative file path is taken from the executor's working directory).
        workers: how many worker processes (jobs it runs at the same time).
        spawn: starts one worker; :func:`spawn_plain` when omitted.
        submit: submits a handler's follow-up job (``ctx.submit``); None refuses them.
        env: variables every worker gets besides the executor's PATH, LANG, PYTHONPATH.
        home: the workers' working directory; a temporary one (removed by :meth:`stop`)
            when omitted.
        python: the interpreter the workers run.
        kill_grace: seconds a cancelled or timed-out handler has to return before its
            worker is killed.
        pipe_grace: seconds to wait for the rest of a job's output once it ended.
        start_timeout: seconds a worker has to import the modules.
        clock: epoch seconds (stamped on the handler records).
        environ: the executor's environment (``os.environ`` when omitted).
    """

    def __init__(
        self,
        modules: Sequence[str],
        workers: int = 2,
        *,
        spawn: Spawn = spawn_plain,
        submit: SubmitFollowup | None = None,
        env: Mapping[str, str] | None = None,
        home: Path | None = None,
        python: str = sys.executable,
        kill_grace: float = 3.0,
        pipe_grace: float = 2.0,
        start_timeout: float = 120.0,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"a handler pool needs at least one worker, not {workers}")
        if not modules:
            raise ValueError("a handler pool needs at least one handler module")
        self._modules = [str(Path(m).resolve()) if is_path(m) else m for m in modules]
        self._count = workers
        self._spawn = spawn
        self._submit = submit
        self._extra_env = dict(env or {})
        self._home = home
        self._own_home = home is None
        self._python = python
        self._kill_grace = kill_grace
        self._pipe_grace = pipe_grace
        self._start_timeout = start_timeout
        self._clock = clock
        self._environ = os.environ if environ is None else environ
        self._infos: dict[str, HandlerInfo] = {}
        self._workers: set[_Worker] = set()
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopping = False
        self._waiting = 0  # attempts waiting for an idle worker

    @property
    def handlers(self) -> dict[str, HandlerInfo]:
        """The handlers the pool hosts, by name (empty before :meth:`start`)."""
        return dict(self._infos)

    def waiting(self) -> int:
        """How many attempts are waiting for an idle worker."""
        return self._waiting

    def pids(self) -> list[int]:
        """The process ids of the live workers."""
        return sorted(w.pid for w in self._workers if not w.retired)

    async def start(self) -> list[HandlerInfo]:
        """Start every worker and wait until each has imported the modules.

        Returns:
            The handler records (``jm_handlers``), one per handler, stamped now.

        Raises:
            HandlerLoadError: a module failed to import (named in the message), or a
                worker did not start; no worker is left running then.
        """
        if self._started:
            raise RuntimeError("the handler pool is started already")
        self._started = True
        if self._home is None:
            self._home = Path(tempfile.mkdtemp(prefix="jobmesh-handlers-"))
        self._home.mkdir(parents=True, exist_ok=True)
        results = await asyncio.gather(*(self._start_worker() for _ in range(self._count)), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.stop()
            raise failures[0]
        started = [r for r in results if isinstance(r, _Worker)]
        now = self._clock()
        self._infos = {info.name: msgspec.structs.replace(info, at=now) for info in started[0].handlers}
        for worker in started:
            self._idle.put_nowait(worker)
        log.info(
            "handler pool: %d workers (pids %s) host %s",
            len(started),
            ", ".join(str(w.pid) for w in started),
            ", ".join(self._infos) or "no handlers",
        )
        return list(self._infos.values())

    async def stop(self) -> None:
        """Kill every worker and wait for them; an attempt still running fails ``node_drained``."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        workers = list(self._workers)
        for worker in workers:
            worker.retired = True
            worker.close_commands()
            worker.process.kill()
        await asyncio.gather(*(self._reap(w) for w in workers), return_exceptions=True)
        if self._own_home and self._home is not None:
            await asyncio.to_thread(shutil.rmtree, self._home, True)

    async def run(self, request: RunRequest) -> Outcome:
        """Run one handler attempt to its end (a Runner); never raises for the job's own failure.

        Args:
            request: the attempt; its runtime is a ``HandlerRuntime``.

        Returns:
            Its outcome; on success its result file holds the handler's output as JSON.
        """
        runtime = request.runtime
        if not isinstance(runtime, HandlerRuntime):
            raise TypeError(f"the handler pool runs handler runtimes, not {type(runtime).__name__}")
        spawned = False
        try:
            if request.abort.error is not None:
                return Outcome(None, request.abort.error)
            if runtime.handler not in self._infos:
                hosted = ", ".join(sorted(self._infos)) or "none"
                return failed_outcome(
                    HANDLER_MISSING, f"this node's handler pool has no handler {runtime.handler!r} (it hosts: {hosted})"
                )
            try:
                payload = msgspec.json.encode(runtime.input)
            except (TypeError, msgspec.EncodeError) as exc:
                return failed_outcome(
                    INPUT_INVALID, f"the input cannot be encoded as JSON: {exc} - at `$.runtime.input`"
                )
            begun = asyncio.get_running_loop().time()
            worker, waited = await self._acquire(request.abort, request.timeout)
            if worker is None:
                if request.abort.error is not None:
                    return Outcome(None, request.abort.error)
                return failed_outcome(
                    TIMEOUT,
                    f"waited {waited:.1f}s for a free handler worker, past its run timeout of {request.timeout:g}s "
                    "(the wait counts against the run timeout)",
                )
            spawned = True
            handoffs = 0
            while True:
                outcome = await self._serve(worker, request, runtime, payload, waited, handoffs)
                if outcome is not None:
                    return outcome
                handoffs += 1
                log.warning(
                    "%s: handler worker %d died before it accepted the job; handing it to another worker",
                    request.name,
                    worker.pid,
                )
                # Everything since the start counts against the run timeout: the waits, and
                # the time the dead worker held the job.
                waited = asyncio.get_running_loop().time() - begun
                worker, more = await self._acquire(request.abort, request.timeout - waited)
                waited += more
                if worker is None:
                    if request.abort.error is not None:
                        return Outcome(None, request.abort.error)
                    return failed_outcome(
                        TIMEOUT,
                        f"waited {waited:.1f}s for a free handler worker (its first one died before it took the "
                        f"job), past its run timeout of {request.timeout:g}s",
                    )
        finally:
            if not spawned and request.on_spawned is not None:
                await request.on_spawned()

    async def _serve(
        self,
        worker: _Worker,
        request: RunRequest,
        runtime: HandlerRuntime,
        payload: bytes,
        waited: float,
        handoffs: int,
    ) -> Outcome | None:
        """Run the job on ``worker`` (``handoffs``: how many died before accepting it already).

        Returns:
            The outcome; None when this worker died before it accepted the job too and
            :func:`hand_off` says another worker gets it.
        """
        worker.seq += 1
        job = _Job(request, worker.seq)
        worker.job = job  # from here on the worker's lines and its death are this job's
        keep = False
        try:
            if handoffs == 0 and request.on_spawned is not None:
                await request.on_spawned()
            outcome, keep = await self._converse(worker, job, runtime, payload, waited)
            if outcome is None and not hand_off(job.accepted, handoffs, self._stopping):
                outcome = await self._crashed(worker, job, runtime.handler)
            return outcome
        finally:
            worker.job = None
            if keep and not worker.dead and not self._stopping:
                self._idle.put_nowait(worker)
            else:
                self._retire(worker)

    async def _converse(
        self, worker: _Worker, job: _Job, runtime: HandlerRuntime, payload: bytes, waited: float
    ) -> tuple[Outcome | None, bool]:
        """Hand the job to ``worker`` and follow it to its end.

        Args:
            worker: the worker.
            job: the job.
            runtime: its handler runtime.
            payload: its input as JSON.
            waited: seconds it already waited for a worker (spent of its run timeout).

        Returns:
            The outcome (None: the worker went away before it accepted the job), and whether
            the worker may serve the next job.
        """
        request = job.request
        call = protocol.Call(
            job.seq,
            runtime.handler,
            payload,
            request.job_id,
            request.attempt,
            str(request.workdir),
            request.checkpoint,
        )
        if not await worker.send(call):
            return None, False  # its command pipe is closed: it never got the job
        talk = asyncio.ensure_future(self._talk(worker, job))
        aborted = asyncio.ensure_future(request.abort.wait())
        try:
            left = max(request.timeout - waited, 0.0)
            await asyncio.wait({talk, aborted}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not talk.done():
                stopped_by = request.abort.error or JobError(code=TIMEOUT, message=_timeout_message(request, waited))
                log.info("%s: stopping its handler (%s)", request.name, stopped_by.message)
                await worker.send(protocol.Cancel(job.seq))
                await asyncio.wait({talk}, timeout=self._kill_grace)
                worker.process.kill()
                await self._reap(worker)
                return Outcome(None, stopped_by, job.tail.text()), False
            end = talk.result()
        finally:
            aborted.cancel()
            if not talk.done():
                talk.cancel()
        if end is None:
            if not job.accepted:
                return None, False
            return await self._crashed(worker, job, runtime.handler), False
        await worker.wait_marks(job.seq, self._pipe_grace)
        tail = job.tail.text()
        if isinstance(end, protocol.Failed):
            keep = end.code in _KEEPS_WORKER
            return failed_outcome(_failure_code(end.code), end.message, output_tail=tail), keep
        try:
            await asyncio.to_thread((request.workdir / RESULT_FILE).write_bytes, end.result)
        except OSError as exc:
            return failed_outcome(EXECUTOR_ERROR, f"cannot write the handler's result: {exc}", output_tail=tail), True
        return Outcome(0, None, tail), True

    async def _talk(self, worker: _Worker, job: _Job) -> protocol.Done | protocol.Failed | None:
        """Follow the job's events until it ends; None when the worker went away."""
        request = job.request
        while True:
            event = await worker.events.get()
            if event is None:
                return None
            if getattr(event, "seq", job.seq) != job.seq:
                continue  # a late event of an earlier job of this worker
            job.accepted = True  # Accepted comes first; any event of the job says the same
            if isinstance(event, protocol.Done | protocol.Failed):
                return event
            if isinstance(event, protocol.Progress):
                if request.on_progress is not None:
                    request.on_progress(event.fraction, event.message)
            elif isinstance(event, protocol.Heartbeat):
                if event.checkpoint and request.on_checkpoint is not None:
                    request.on_checkpoint(event.checkpoint)
            elif isinstance(event, protocol.Submit):
                task = asyncio.ensure_future(self._followup(worker, request, event))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _followup(self, worker: _Worker, request: RunRequest, event: protocol.Submit) -> None:
        """Submit a handler's follow-up job and answer the worker."""
        answer = protocol.SubmitDone(event.seq, event.request)
        try:
            if self._submit is None:
                raise Unavailable("this executor's handler pool cannot submit jobs (it has no connection)")
            try:
                spec = msgspec.json.decode(event.spec, type=JobSpec)
            except msgspec.ValidationError as exc:
                raise InvalidMessage(f"the follow-up job spec is invalid: {exc}") from exc
            job_id = await self._submit(spec, event.key, request.parent)
            log.info("%s: submitted follow-up job %s", request.name, job_id)
            answer = msgspec.structs.replace(answer, job_id=job_id)
        except JobmeshError as exc:
            answer = msgspec.structs.replace(answer, code=exc.code, message=exc.message, field=exc.field or "")
        except Exception as exc:
            log.exception("%s: submitting a follow-up job failed", request.name)
            answer = msgspec.structs.replace(answer, code="internal", message=f"{type(exc).__name__}: {exc}")
        await worker.send(answer)

    async def _crashed(self, worker: _Worker, job: _Job, handler: str) -> Outcome:
        """The outcome of a job whose worker went away under it."""
        try:
            code = await asyncio.wait_for(worker.process.wait(), self._kill_grace)
        except TimeoutError:
            worker.process.kill()  # it closed its event pipe but lives on: it is broken
            code = await worker.process.wait()
        worker.process.kill()  # whatever it started must not outlive it
        await self._reap(worker)
        if self._stopping:
            return failed_outcome(NODE_DRAINED, "the executor's handler pool stopped", output_tail=job.tail.text())
        if code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        message = f"the worker running handler {handler!r} (pid {worker.pid}) {how}"
        return failed_outcome(HANDLER_CRASHED, message, exit_code=None, output_tail=job.tail.text())

    async def _acquire(self, abort: AbortSignal, timeout: float) -> tuple[_Worker | None, float]:
        """An idle live worker, waiting at most ``timeout`` seconds for one.

        Returns:
            The worker (None when ``abort`` is set or ``timeout`` passes first), and how
            many seconds it waited (0.0 when a worker was idle).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout
        waited = 0.0
        while True:
            left = deadline - loop.time()
            if left <= 0 or abort.is_set():
                # Before taking an idle one too: a job aborted (or out of time) while its
                # first worker's death was handled must not start on a second.
                return None, waited
            if not self._idle.empty():
                worker = self._idle.get_nowait()
            else:
                getting = asyncio.ensure_future(self._idle.get())
                aborted = asyncio.ensure_future(abort.wait())
                self._waiting += 1
                try:
                    await asyncio.wait({getting, aborted}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                except BaseException:
                    # This attempt's task was cancelled while it waited: a worker the get
                    # took already goes back, a pending get must not take one later.
                    self._give_back(_taken(getting))
                    raise
                finally:
                    self._waiting -= 1
                    aborted.cancel()
                    waited = loop.time() - started
                taken = _taken(getting)
                if taken is None:
                    continue  # the loop's checks say whether it was the abort or the deadline
                if abort.is_set():
                    self._give_back(taken)  # it came at the same moment as the abort
                    return None, waited
                worker = taken
            if not worker.dead and not worker.retired:
                return worker, waited

    def _give_back(self, worker: _Worker | None) -> None:
        """Return a worker taken from the idle queue but not used."""
        if worker is not None:
            self._idle.put_nowait(worker)

    def _retire(self, worker: _Worker) -> None:
        """Kill ``worker`` and start another in its place (unless the pool is stopping)."""
        if worker.retired:
            return
        worker.retired = True
        worker.close_commands()
        worker.process.kill()
        if self._stopping:
            return
        task = asyncio.ensure_future(self._replace(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, old: _Worker) -> None:
        await self._reap(old)  # its memory is free before the next worker loads its model
        delay = 0.5
        while not self._stopping:
            try:
                worker = await self._start_worker()
            except (HandlerLoadError, OSError) as exc:
                log.error("handler pool: a replacement worker failed to start (retrying in %gs): %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            log.info("handler pool: worker %d replaces worker %d", worker.pid, old.pid)
            self._idle.put_nowait(worker)
            return

    async def _reap(self, worker: _Worker) -> None:
        """Wait for the worker's exit and its output; then release it (once)."""
        if worker.closed.done():
            return
        try:
            await worker.process.wait()
            pending = [t for t in worker.tasks if not t.done()]
            if pending:
                _, late = await asyncio.wait(pending, timeout=self._pipe_grace)
                for task in late:  # a grandchild that left the group holds the pipe
                    task.cancel()
        finally:
            if not worker.closed.done():
                worker.closed.set_result(None)
                self._workers.discard(worker)
                # A grandchild that left the group may hold the event pipe open: close it.
                if worker.events_pipe is not None:
                    worker.events_pipe.close()
                worker.close_commands()
                await worker.process.close()

    async def _start_worker(self) -> _Worker:
        """Start one worker and wait for it to report its handlers.

        Raises:
            HandlerLoadError: a module failed to import, or the worker did not start.
        """
        assert self._home is not None
        commands_in, commands_out = os.pipe()
        events_in, events_out = os.pipe()
        argv = [
            self._python,
            "-m",
            "jobmesh.sdk.worker",
            "--commands",
            str(commands_in),
            "--events",
            str(events_out),
            *self._modules,
        ]
        env = worker_environment(self._environ, self._home, self._extra_env)
        try:
            process = await self._spawn(argv, env, self._home, (commands_in, events_out))
        except OSError as exc:
            for fd in (commands_out, events_in):
                os.close(fd)
            raise HandlerLoadError(f"cannot start a handler worker ({argv[0]}): {exc}") from exc
        finally:
            os.close(commands_in)
            os.close(events_out)
        # Each end is owned, and closed once, by its PipeReadTransport / PipeWriter (fdpipes).
        # Each end is owned, and closed once, by its PipeReadTransport / PipeWriter: at the
        # end of the pipe, or when the worker is reaped.
        try:
            events = asyncio.StreamReader(limit=READ_CHUNK)
            events_pipe = PipeReadTransport(events_in, events)
        except BaseException:
            os.close(events_in)
            os.close(commands_out)
            process.kill()
            await process.close()
            raise
        worker = _Worker(process, PipeWriter(commands_out), events)
        worker.events_pipe = events_pipe
        self._workers.add(worker)
        worker.tasks = [
            asyncio.ensure_future(self._pump(worker, process.stdout, "stdout")),
            asyncio.ensure_future(self._pump(worker, process.stderr, "stderr")),
            asyncio.ensure_future(self._read_events(worker)),
        ]
        try:
            first = await asyncio.wait_for(worker.events.get(), self._start_timeout)
        except TimeoutError:
            self._abandon(worker)
            raise HandlerLoadError(
                f"a handler worker (pid {worker.pid}) did not import {', '.join(self._modules)} "
                f"within {self._start_timeout:g}s"
            ) from None
        if isinstance(first, protocol.Ready):
            worker.handlers = first.handlers
            worker.ready = True
            return worker
        self._abandon(worker)
        if isinstance(first, protocol.LoadFailed):
            raise HandlerLoadError(
                f"handler module {first.module!r} failed to import: {first.message} "
                "(its traceback is in the executor's log)",
                first.module,
            )
        code = await worker.process.wait()
        raise HandlerLoadError(
            f"a handler worker (pid {worker.pid}) exited with code {code} before loading "
            f"{', '.join(self._modules)} (its output is in the executor's log)"
        )

    def _abandon(self, worker: _Worker) -> None:
        """Kill a worker that never became ready; it is not replaced."""
        worker.retired = True
        worker.close_commands()
        worker.process.kill()
        task = asyncio.ensure_future(self._reap(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_events(self, worker: _Worker) -> None:
        """Move the worker's events into its queue; notice a worker that dies while idle."""
        while (event := await worker.read_event()) is not None:
            worker.events.put_nowait(event)
        worker.dead = True
        worker.events.put_nowait(None)
        if worker.ready and worker.job is None and not worker.retired and not self._stopping:
            log.warning("handler worker %d died between jobs; starting another", worker.pid)
            self._retire(worker)

    async def _pump(self, worker: _Worker, reader: asyncio.StreamReader, stream: OutputStream) -> None:
        """Read one output pipe of the worker into the lines of the job it serves."""
        buffer = b""
        while chunk := await reader.read(READ_CHUNK):
            buffer += chunk
            if b"\n" in chunk:
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    await self._line(worker, stream, raw)
            if len(buffer) > MAX_LINE_BYTES:
                cut = (len(buffer) - 1) // MAX_LINE_BYTES * MAX_LINE_BYTES
                await self._emit(worker, stream, buffer[:cut])
                buffer = buffer[cut:]
        if buffer:
            await self._line(worker, stream, buffer)

    async def _line(self, worker: _Worker, stream: OutputStream, raw: bytes) -> None:
        at = raw.find(protocol.END_MARK)
        if at < 0:
            await self._emit(worker, stream, raw)
            return
        if at:
            await self._emit(worker, stream, raw[:at])  # the job's last line, without a newline
        try:
            worker.marks[stream] = int(raw[at + len(protocol.END_MARK) :])
        except ValueError:
            return
        worker.mark_seen.set()

    async def _emit(self, worker: _Worker, stream: OutputStream, raw: bytes) -> None:
        for start in range(0, max(len(raw), 1), MAX_LINE_BYTES):
            text = raw[start : start + MAX_LINE_BYTES].decode("utf-8", "replace").rstrip("\r")
            job = worker.job
            if job is not None:
                await job.line(stream, text)
            else:
                log.info("handler worker %d %s: %s", worker.pid, stream, text)


def hand_off(accepted: bool, handoffs: int, stopping: bool) -> bool:
    """Whether a job whose worker went away goes to another worker instead of failing.

    Only when the worker never accepted it (no ``Accepted``: none of the job ran, so running
    it elsewhere cannot run it twice), at most :data:`MAX_HANDOFFS` times (a job that keeps
    meeting dying workers fails ``handler_crashed``), and not while the pool stops.

    Args:
        accepted: whether the worker accepted the job.
        handoffs: how often the job went to another worker already.
        stopping: whether the pool is stopping.

    Returns:
        Whether to hand it off.
    """
    return not accepted and handoffs < MAX_HANDOFFS and not stopping


def _taken(getting: asyncio.Future[_Worker]) -> _Worker | None:
    """What a pending ``Queue.get`` holds once it is stopped: its worker, or None.

    A get still pending is cancelled; ``Queue.get`` then leaves a worker it was woken for in
    the queue (and wakes the next getter), so only a get that already finished holds one.
    """
    if not getting.done():
        getting.cancel()
        return None
    if getting.cancelled() or getting.exception() is not None:
        return None
    return getting.result()


def _timeout_message(request: RunRequest, waited: float) -> str:
    """Why a job that ran past its run timeout was stopped, with its wait for a worker if any."""
    message = f"ran longer than its run timeout of {request.timeout:g}s"
    if waited > 0:
        message += f" ({waited:.1f}s of it waiting for a free handler worker)"
    return message


def _failure_code(code: str) -> FailureCode:
    """A failure code the worker reported, as the contract's (``handler_failed_replace``,
    a raise after which the worker is replaced, is ``handler_failed``)."""
    if code == INPUT_INVALID:
        return INPUT_INVALID
    if code == HANDLER_MISSING:
        return HANDLER_MISSING
    return HANDLER_FAILED
