"""One attempt's life on this node, and the node's register of attempts.

One :class:`Attempt` takes a process ``JobBound`` from its fresh working directory to its
published terminal event: it runs the process (:mod:`jobmesh.executor.runner`), watches and
finally judges the disk quota (:mod:`jobmesh.executor.quota`), and reports the outcome
(:mod:`jobmesh.executor.outcomes`). :class:`Attempts` is this node's register of attempts:
which are running (for drain) and which ran recently (so a redelivered ``JobBound`` is not
run twice).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from opentelemetry import trace

from jobmesh.contract import subjects
from jobmesh.contract.ids import attempt_key, log_id
from jobmesh.contract.messages.v1 import JobBound, LogLine, NoopRuntime, ProcessRuntime
from jobmesh.contract.messages.v1.jobs import FailureCode
from jobmesh.executor.outcomes import (
    EXECUTOR_ERROR,
    NODE_DRAINED,
    WORKDIR_FAILED,
    Outcome,
    failed_outcome,
    noop_outcome,
    terminal_message,
)
from jobmesh.executor.quota import directory_bytes, outcome_after_exit, watch_quota
from jobmesh.executor.reporter import Reporter
from jobmesh.executor.runner import AbortSignal, OutputStream, ProcessRunner
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.tracing import Context

log = logging.getLogger("jobmesh.executor.attempts")


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

    def abort(self, code: FailureCode, message: str) -> None:
        """Stop the attempt's process now; it is reported as failed with ``code``.

        Args:
            code: the failure code it is reported with.
            message: the human explanation.
        """
        self._abort.set(code, message)

    async def run(self) -> None:
        """Run to the end and publish the terminal event; never raises for a job's failure."""
        span = self._tracer.start_span("execute jobmesh.job", context=self.context)
        try:
            try:
                runtime = self.bound.spec.runtime
                if not isinstance(runtime, ProcessRuntime):  # Attempts.launch reports the others itself
                    raise TypeError(f"an Attempt runs process runtimes, not {type(runtime).__name__}")
                outcome = await self._run_process(runtime)
            except Exception as exc:
                log.exception("attempt %s failed inside the executor", self.key)
                outcome = failed_outcome(EXECUTOR_ERROR, f"{type(exc).__name__}: {exc}")
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
            return failed_outcome(WORKDIR_FAILED, f"cannot create {workdir}: {exc}")
        job_vars = {"JOBMESH_JOB_ID": self.bound.job_id, "JOBMESH_ATTEMPT": str(self.bound.attempt)}
        if self.bound.scratch_dir:
            job_vars["JOBMESH_SCRATCH_DIR"] = self.bound.scratch_dir
        env = self._runner.environment(runtime, workdir, job_vars)
        timeout = self.bound.spec.timeouts.run
        quota_mb = self.bound.spec.resources.disk_mb
        watchdog = asyncio.ensure_future(watch_quota(workdir, quota_mb, self._abort)) if quota_mb else None
        try:
            outcome = await self._runner.run(runtime, workdir, env, timeout, self._abort, self._publish_line)
        finally:
            if watchdog is not None:
                watchdog.cancel()
        if not quota_mb:
            return outcome
        # The watchdog looks only once a second: a job that wrote past its quota and exited
        # in between would otherwise succeed. The group is dead now, so this is the last word.
        used = await asyncio.to_thread(directory_bytes, workdir)
        return outcome_after_exit(outcome, used, quota_mb)

    async def _publish_line(self, stream: OutputStream, line: str) -> None:
        self._log_seq += 1
        bound = self.bound
        message = LogLine(job_id=bound.job_id, attempt=bound.attempt, stream=stream, line=line, at=self._clock())
        msg_id = log_id(bound.job_id, bound.attempt, self._log_seq)
        await self._reporter.emit_log(Outgoing(subjects.job_log(bound.job_id), message, msg_id, self.context))


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
        self._running: dict[str, tuple[Attempt, asyncio.Task[None]]] = {}

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
        task.add_done_callback(functools.partial(self._finished, attempt.key))
        return attempt

    def _finished(self, key: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(key, None)

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
