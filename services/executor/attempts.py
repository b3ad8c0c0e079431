"""One attempt's life on this node, and the node's register of attempts.

One :class:`Attempt` takes a ``JobBound`` of a process, handler or container runtime from
its lease to its published terminal event: it waits until its JobStarted and a node record
listing it are durable, refuses what the node cannot isolate as asked (``isolation_refused``,
:func:`~jobmesh.executor.isolation.probe.refusal`), prepares a fresh working directory (the
job's input files, its secrets as files or variables, its stdin), builds the
:class:`~jobmesh.executor.runrequest.RunRequest` (a cleared environment: the allow-list, the
job's own variables, jobmesh's) and hands it to the runner of its runtime kind
(:data:`Runners`: the process runner with the node's isolation, the handler pool, the
container runner), with a progress pipe (:mod:`jobmesh.executor.progress`); a workflow
step's ``${steps...}`` and ``${item...}`` are filled in first, from the results it reads
(:mod:`jobmesh.executor.stepinputs`). It watches and
finally judges the disk quota (:mod:`jobmesh.executor.quota`), masks the job's secrets out
of every log line, the output tail and the result (:mod:`jobmesh.executor.masking`),
collects the result file (:mod:`jobmesh.executor.results`; a kept result is stored before
the success is reported) and reports the outcome (:mod:`jobmesh.executor.outcomes`).

:class:`Attempts` is this node's register: which attempts run (for cancel, supersede and
drain), which ran recently (so a redelivered ``JobBound`` is not run twice), which an
earlier incarnation left behind, and which were cancelled before their ``JobBound`` came.
:meth:`Attempts.classify` decides what a ``JobBound`` gets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec
from opentelemetry import trace

from jobmesh.contract import subjects
from jobmesh.contract.ids import attempt_key, log_id
from jobmesh.contract.messages.v1 import (
    AttemptLease,
    ContainerRuntime,
    HandlerRuntime,
    JobBound,
    JobRuntime,
    LogLine,
    NoopRuntime,
    ParentRef,
    ProcessRuntime,
)
from jobmesh.contract.messages.v1.jobs import FailureCode, runtime_kind
from jobmesh.errors import InvalidSpec, Overloaded, Unavailable
from jobmesh.executor.gangs import gang_env, keeps_result
from jobmesh.executor.gpus import gpu_env
from jobmesh.executor.inputs import InputFileError, UploadStore, fetch_stdin, materialize
from jobmesh.executor.isolation.environment import job_environment
from jobmesh.executor.isolation.launch import hand_workdir
from jobmesh.executor.isolation.probe import NodeIsolation, refusal
from jobmesh.executor.isolation.uids import UidPool, kill_uid
from jobmesh.executor.leases import LeaseBook, LeaseState
from jobmesh.executor.masking import Masker
from jobmesh.executor.outcomes import (
    CANCELLED,
    EXECUTOR_ERROR,
    HANDLER_MISSING,
    INPUT_INVALID,
    ISOLATION_REFUSED,
    NODE_DRAINED,
    PREEMPTED,
    RESULT_TOO_LARGE,
    SUPERSEDED,
    TIMEOUT,
    WORKDIR_FAILED,
    Outcome,
    failed_outcome,
    noop_outcome,
    terminal_message,
)
from jobmesh.executor.progress import PROGRESS_FD_VAR, ProgressChannel, ProgressRecorder
from jobmesh.executor.quota import directory_bytes, outcome_after_exit, watch_quota
from jobmesh.executor.reporter import Reporter
from jobmesh.executor.restart import (
    kill_leftovers,
    remove_leftovers,
    reports_of,
    strip_private,
    write_lease,
    write_outcome,
)
from jobmesh.executor.results import EMPTY_KEPT, RESULT_FILE, RESULT_PATH_VAR, ResultStore, too_large_message
from jobmesh.executor.runner import AbortSignal, OutputStream, ProcessRunner
from jobmesh.executor.runrequest import Runner, RunRequest
from jobmesh.executor.secrets import (
    SANDBOX_SECRETS_DIR,
    SECRETS_DIR_VAR,
    SecretMissing,
    SecretSource,
    remove_secret_files,
    secret_env,
    write_secret_files,
)
from jobmesh.executor.stepinputs import ResultReader, StepInputs, resolve
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.tracing import Context, start_attempt_span

log = logging.getLogger("jobmesh.executor.attempts")

CHECKPOINT_VAR = "JOBMESH_CHECKPOINT"
SECRET_MISSING: FailureCode = "secret_missing"
INPUT_FILE_FAILED: FailureCode = "input_file_failed"
# The runner of each runtime kind this node offers, by the runtime's wire tag: "process"
# (ProcessRunner with the node's isolation), "handler" (HandlerPool), "container"
# (ContainerRunner). A kind without a runner here fails its attempts (see Attempt).
Runners = Mapping[str, Runner]
# What a JobBound gets (Attempts.classify):
#   run: a new attempt; duplicate: this process has it already (running or ended);
#   orphaned: an earlier incarnation started it (it was reported at start: lost, or ended
#     with the terminal event it kept);
#   ended_before: an earlier incarnation ended it, and its terminal event is durable;
#   left_behind: its working directory exists, so an earlier incarnation started it (its
#     record has expired since): it is reported lost (or ended, as it kept), not run again;
#   cancelled: an AttemptCancel came first; stale: a newer attempt of the job runs here.
Verdict = Literal["run", "duplicate", "orphaned", "ended_before", "left_behind", "cancelled", "stale"]


def attempt_name(job_id: str, attempt: int) -> str:
    """How log lines name an attempt: ``job <id> attempt <n>``."""
    return f"job {job_id} attempt {attempt}"


@dataclass(frozen=True)
class AttemptSetup:
    """What every attempt of this node is prepared with besides its own dispatch.

    Attributes:
        runners: the runner of each runtime kind (:data:`Runners`).
        base_env: the allow-listed variables of the executor's environment.
        isolation: the node's isolation (its level, network policy, the sandbox uid).
        secrets: where the node's secrets are (None: a job naming one fails ``secret_missing``).
        uploads: the ``jm_uploads`` object store (input files and stdin objects).
        allowed_roots: node directories input files may be copied from.
        uids: the uids attempts take one of their own from (None: they all run as
            ``isolation.uid``); :class:`Attempts` makes it from ``isolation.attempt_uids``.
        gpu_node: whether the node has GPUs (every job then gets the GPU variables, one
            without GPUs an empty set).
    """

    runners: Runners
    base_env: Mapping[str, str] = field(default_factory=dict)
    isolation: NodeIsolation = field(default_factory=NodeIsolation)
    secrets: SecretSource | None = None
    uploads: UploadStore | None = None
    allowed_roots: tuple[Path, ...] = ()
    uids: UidPool | None = None
    gpu_node: bool = False


def stop_code(reason: str) -> FailureCode:
    """The failure code an ``AttemptCancel`` stops an attempt with: its reason says which.

    Args:
        reason: the cancel's reason; one that starts with ``superseded`` means a newer
            attempt of the job exists, one that starts with ``preempted`` that a
            higher-priority job needs the room (the binder's preemption).

    Returns:
        ``superseded``, ``preempted`` or ``cancelled``.
    """
    if reason.startswith("superseded"):
        return SUPERSEDED
    return PREEMPTED if reason.startswith("preempted") else CANCELLED


class Attempt:
    """One attempt of a process, handler or container on this node, from its lease to its
    published terminal event.

    (A no-op attempt needs none of this; :meth:`Attempts.launch` reports it directly.)

    Args:
        bound: the dispatch message.
        context: the dispatch envelope's trace context, carried by everything it reports.
        started_at: when the executor started it (the JobStarted ``at``).
        lease: its lease in the node record, updated with the job's progress.
        ready: resolves once its JobStarted and a record listing it are durable; the
            process starts only then.
        node_id: this node.
        work_root: the node's work directory; the attempt's own is a fresh subdirectory.
        reporter: where log lines and the terminal event go.
        setup: the node's runners, environment, isolation, secrets and uploads.
        results: reads and stores result files.
        tracer: for the attempt's span.
        on_ended: called with the attempt's key once its terminal event is durable; True
            when it removes the lease and kept outcome itself once a node record listing the
            attempt as ended is durable (the clean-up leaves those two files then).
        clock: epoch seconds.
    """

    def __init__(
        self,
        bound: JobBound,
        context: Context,
        started_at: float,
        *,
        lease: LeaseState,
        ready: asyncio.Future[None],
        node_id: str,
        work_root: Path,
        reporter: Reporter,
        setup: AttemptSetup,
        results: ResultStore | None,
        tracer: trace.Tracer,
        on_ended: Callable[[str], bool],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bound = bound
        self.context = context
        # What its events and log lines continue: the attempt's span once it is recorded.
        self._trace_context = context
        self.started_at = started_at
        self.key = attempt_key(bound.job_id, bound.attempt)
        self.name = attempt_name(bound.job_id, bound.attempt)
        self.lease = lease
        self._ready = ready
        self._node_id = node_id
        self._work_root = work_root
        self._reporter = reporter
        self._setup = setup
        self._results = results
        self._tracer = tracer
        self._on_ended = on_ended
        self._clock = clock
        self._abort = AbortSignal()
        self._log_seq = 0
        self._masker: Masker | None = None  # set once the job's secrets are known
        # Who the job runs as, and owns its files: its own uid from the pool, else the
        # node's sandbox uid (None: the executor's own, it is not root).
        self._uid: int | None = setup.isolation.uid
        self._gid: int | None = setup.isolation.gid
        self._own_uid = False
        self._keep_evidence = False  # its lease and outcome wait for a record (on_ended)

    @property
    def workdir(self) -> Path:
        return self._work_root / f"{self.bound.job_id}-{self.bound.attempt}"  # as Attempts.workdir_of

    def abort(self, code: FailureCode, message: str) -> None:
        """Stop the attempt's process now, or keep it from starting; it is reported as failed
        with ``code`` (the first reason given wins).

        Args:
            code: the failure code it is reported with.
            message: the human explanation.
        """
        if not self._abort.is_set():
            log.info("%s: stopping it (%s: %s)", self.name, code, message)
        self._abort.set(code, message)

    async def run(self) -> None:
        """Run to the end and publish the terminal event; never raises for a job's failure."""
        span = self._open_spans()
        writing: asyncio.Future[None] | None = None
        try:
            try:
                runtime = self.bound.spec.runtime
                if isinstance(runtime, NoopRuntime):  # Attempts.launch reports those itself
                    raise TypeError("an Attempt does not run no-op runtimes")
                outcome = await self._when_ready(runtime)
            except Exception as exc:
                log.exception("%s failed inside the executor", self.name)
                outcome = failed_outcome(EXECUTOR_ERROR, f"{type(exc).__name__}: {exc}")
            if outcome.error is not None:
                span.set_attribute("jobmesh.error.code", outcome.error.code)
                span.set_status(
                    trace.Status(trace.StatusCode.ERROR, f"{outcome.error.code}: {outcome.error.message}"[:500])
                )
            terminal = terminal_message(
                self.bound,
                self._node_id,
                outcome,
                self.started_at,
                self._clock(),
                self._trace_context,
                self.lease.checkpoint,
            )
            # Kept before it is published: an executor killed before its record lists the
            # attempt as ended lets the next one publish this again, not a loss.
            writing = asyncio.ensure_future(asyncio.to_thread(write_outcome, self.private_dir, terminal))
            try:
                await asyncio.shield(writing)
            except Exception as exc:  # noqa: BLE001 - the end is published all the same
                log.warning("%s: cannot keep its outcome in %s: %s", self.name, self.private_dir, exc)
            durable = self._reporter.emit([terminal])
            # The directory stays until the outcome is durable, for whoever debugs a loss
            # (an executor that dies first leaves it, and its next start clears it).
            await durable
            # Its lease and kept outcome stay until a record listing it as ended is durable
            # (Attempts removes them then): before that, a kill leaves a record that lists it
            # running, and the next executor must find the outcome to publish, not a loss.
            self._keep_evidence = self._on_ended(self.key)
        finally:
            span.end()
            if writing is not None and not writing.done():
                # A drain's cancel came during the write: let it finish first, or it would
                # bring the directory back after the clean-up.
                await asyncio.shield(asyncio.wait({writing}))
            # However it ends, cancelled by a drain whose events never became durable
            # included: its secrets must not outlive it, nor meet its uid's next attempt.
            await asyncio.shield(self._clean_up())

    def _open_spans(self) -> trace.Span:
        """The attempt's span, from when the attempt was queued (the submit for the first,
        its binding for a retry, whose backoff came before), with the wait in the queue
        (until the executor took it) as a span of its own below it. A retry's or a
        migration's span links to the attempt before it (``start_attempt_span``)."""
        bound = self.bound
        queued_since = bound.submitted_at if bound.attempt == 1 else min(bound.bound_at, self.started_at)
        span = start_attempt_span(
            self._tracer,
            "attempt jobmesh.job",
            self.context,
            bound.job_id,
            bound.attempt,
            start_time=_nanoseconds(queued_since),
            attributes={
                "jobmesh.job_id": bound.job_id,
                "jobmesh.attempt": bound.attempt,
                "jobmesh.node_id": self._node_id,
                "jobmesh.queue": bound.spec.queue,
                "jobmesh.tenant": bound.spec.tenant,
                "jobmesh.runtime": runtime_kind(bound.spec.runtime),
            },
        )
        if not span.is_recording():
            return span  # nothing is exported: the dispatch's context is carried on as it came
        self._trace_context = trace.set_span_in_context(span, self.context)
        wait = self._tracer.start_span(
            "wait jobmesh.job",
            context=self._trace_context,
            start_time=_nanoseconds(queued_since),
            attributes={"jobmesh.queue": bound.spec.queue, "jobmesh.tenant": bound.spec.tenant},
        )
        wait.end(end_time=max(_nanoseconds(self.started_at), _nanoseconds(queued_since)))
        return span

    async def _clean_up(self) -> None:
        """Kill whatever still runs as the attempt's own uid (before its files go, so nothing
        of it acts on them meanwhile), remove the private directory (secrets first; all but
        the lease and kept outcome when those wait for the record) and the working
        directory, then return the uid to the pool."""
        pool = self._setup.uids
        uid = self._uid if self._own_uid and pool is not None else None
        self._own_uid = False
        try:
            if uid is not None:
                await asyncio.to_thread(kill_uid, uid, uid if self._gid is None else self._gid)
            if self._keep_evidence:
                await asyncio.to_thread(strip_private, self.private_dir)
            else:
                await asyncio.to_thread(_remove_private, self.private_dir)
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)
        finally:
            if uid is not None and pool is not None:
                pool.release(uid)

    def _take_uid(self, kind: str) -> str | None:
        """Take a uid of the attempt's own for a process or a container (a handler runs in a
        worker, as the sandbox uid); why not, when the pool is empty."""
        pool = self._setup.uids
        if pool is None or kind == "handler":
            return None
        uid = pool.acquire()
        if uid is None:
            return f"all {pool.count} attempt uids from JOBMESH_ATTEMPT_UID_BASE={pool.first} are in use"
        self._uid = self._gid = uid
        self._own_uid = True
        return None

    @property
    def private_dir(self) -> Path:
        """Beside the working directory, out of the job's reach: its stdin file and secrets."""
        return self._work_root / f".{self.bound.job_id}-{self.bound.attempt}"

    async def _when_ready(self, runtime: JobRuntime) -> Outcome:
        if not self._ready.done():
            stopped = asyncio.ensure_future(self._abort.wait())
            try:
                await asyncio.wait({self._ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
        if self._abort.error is not None:
            # Cancelled, superseded or drained before it started: nothing ran.
            return Outcome(None, self._abort.error)
        return await self._run_attempt(runtime)

    async def _run_attempt(self, runtime: JobRuntime) -> Outcome:
        setup = self._setup
        kind = runtime_kind(runtime)
        why = refusal(self.bound.spec, kind, setup.isolation.level, setup.isolation.network)
        if why is not None:
            log.warning("%s: refused: %s", self.name, why)
            return failed_outcome(ISOLATION_REFUSED, why)
        runner = setup.runners.get(kind)
        if runner is None:
            if isinstance(runtime, HandlerRuntime):
                message = f"this node runs no handler pool, so it has no handler {runtime.handler!r}"
                return failed_outcome(HANDLER_MISSING, message)
            return failed_outcome(ISOLATION_REFUSED, f"this node cannot run a {kind} runtime")
        stdin = self.bound.spec.stdin
        if self.bound.spec.step is not None:
            filled = await self._step_inputs()
            if isinstance(filled, Outcome):
                return filled
            if filled is not None:
                runtime, stdin = filled.runtime, filled.stdin
        no_uid = self._take_uid(kind)
        if no_uid is not None:
            return failed_outcome(EXECUTOR_ERROR, no_uid)
        workdir = self.workdir
        try:
            # The lease first: an executor that replaces this one after its record expired
            # learns from it what ran here (restart.left_behind).
            write_lease(self.private_dir, self.lease.as_lease())
            # 0700 until handed over: nobody else reads the input files while they arrive.
            workdir.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            # An existing one included: :meth:`Attempts.classify` refuses an attempt whose
            # directory an earlier executor left, so this one is not ours to clear.
            return failed_outcome(WORKDIR_FAILED, f"cannot create {workdir}: {exc}")
        recorder = ProgressRecorder(self.lease, self.name, self._mask)
        channel = ProgressChannel(recorder.line)
        try:
            outcome = await self._prepared(runner, runtime, workdir, channel, stdin)
        finally:
            await channel.close()
        masker = self._masker
        if masker is not None and masker.active:
            outcome = _masked(outcome, masker)
        if outcome.error is not None:
            return outcome
        if self._results is None:
            if self.bound.spec.keep_result:
                log.warning("%s: its result is not kept: this executor has no result store", self.name)
            return outcome
        result = workdir / RESULT_FILE
        if masker is not None and masker.active:
            await asyncio.to_thread(masker.mask_file, result)
        return await self._with_result(outcome, result)

    async def _step_inputs(self) -> StepInputs | Outcome | None:
        """A workflow step's argv, env, input and stdin with the results it reads filled in
        (None: nothing to fill), or the failure: ``input_invalid`` when they cannot be, the
        stop when the attempt is stopped meanwhile."""
        results = self._results
        reader = ResultReader(results.store) if results is not None else None
        filling = asyncio.ensure_future(resolve(self.bound.spec, reader))
        stopped = asyncio.ensure_future(self._abort.wait())
        try:
            await asyncio.wait({filling, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not filling.done():
            filling.cancel()
            assert self._abort.error is not None
            return Outcome(None, self._abort.error)
        try:
            return filling.result()
        except InvalidSpec as exc:
            log.info("%s: %s", self.name, exc)
            return failed_outcome(INPUT_INVALID, str(exc))
        except Unavailable as exc:
            log.warning("%s: %s", self.name, exc)
            return failed_outcome(EXECUTOR_ERROR, f"cannot read the results of the steps it reads: {exc}")

    async def _prepared(
        self, runner: Runner, runtime: JobRuntime, workdir: Path, channel: ProgressChannel, stdin_text: str
    ) -> Outcome:
        """Put the job's files, secrets and stdin (``stdin_text``, filled in) in place, then run it."""
        spec, setup = self.bound.spec, self._setup
        isolation = setup.isolation
        own_env: dict[str, str] = dict(runtime.env) if isinstance(runtime, ProcessRuntime | ContainerRuntime) else {}
        secrets_dir: Path | None = None
        stdin: Path | None = None
        try:
            if spec.secrets:
                if setup.secrets is None:
                    raise SecretMissing(spec.secrets, "this node has no secrets (JOBMESH_SECRETS_DIR is not set)")
                values = await asyncio.to_thread(setup.secrets.resolve, spec.secrets)
                self._masker = Masker(values)
                if self._masker.unmasked:
                    log.warning(
                        "%s: secrets %s are shorter than 4 characters and are not masked in its output",
                        self.name,
                        ", ".join(self._masker.unmasked),
                    )
                if spec.secrets_as == "env":
                    own_env.update(secret_env(values))
                else:
                    secrets_dir = await asyncio.to_thread(
                        write_secret_files, values, self.private_dir / "secrets", self._uid, self._gid
                    )
                    in_sandbox = isolation.sandbox is not None and isinstance(runtime, ProcessRuntime)
                    own_env[SECRETS_DIR_VAR] = SANDBOX_SECRETS_DIR if in_sandbox else str(secrets_dir)
            if spec.files:
                await materialize(spec.files, workdir, setup.uploads, setup.allowed_roots, self._uid, self._gid)
            if spec.stdin_object:
                stdin = await fetch_stdin(spec.stdin_object, setup.uploads, self.private_dir / "stdin")
            elif stdin_text:
                stdin = self.private_dir / "stdin"
                await asyncio.to_thread(stdin.write_text, stdin_text)
        except SecretMissing as exc:
            return failed_outcome(SECRET_MISSING, str(exc))
        except InputFileError as exc:
            log.warning("%s: %s", self.name, exc)
            return failed_outcome(INPUT_FILE_FAILED, str(exc))
        if self._uid is not None and os.geteuid() == 0 and not isinstance(runtime, HandlerRuntime):
            await asyncio.to_thread(self._hand_over, workdir, stdin, secrets_dir is not None)
        else:
            # Nobody's to hand it to (a non-root executor's jobs are its own user; a handler
            # runs in a worker of the sandbox uid, a container maybe as its image's user):
            # open it as a fresh directory would be, now that its inputs are in place.
            await asyncio.to_thread(os.chmod, workdir, 0o755)
        return await self._run_with(runner, runtime, workdir, channel, own_env, secrets_dir, stdin)

    def _hand_over(self, workdir: Path, stdin: Path | None, secrets: bool) -> None:
        """Give the job what is its own once everything is in place: the working directory,
        the stdin file (a job may reopen ``/dev/stdin``), and entry to the private directory
        when it holds secret files or the stdin."""
        assert self._uid is not None
        gid = self._gid if self._gid is not None else -1
        hand_workdir(workdir, self._uid)
        if stdin is not None:
            os.chown(stdin, self._uid, gid)
        if secrets or stdin is not None:
            # Root's, with search for the job's own group alone: were it the job's, the job
            # could swap ``secrets`` for a link that root's clean-up would then follow.
            os.chown(self.private_dir, 0, gid)
            os.chmod(self.private_dir, 0o710)

    async def _run_with(
        self,
        runner: Runner,
        runtime: JobRuntime,
        workdir: Path,
        channel: ProgressChannel,
        own_env: Mapping[str, str],
        secrets_dir: Path | None,
        stdin: Path | None,
    ) -> Outcome:
        job_vars = {
            "JOBMESH_JOB_ID": self.bound.job_id,
            "JOBMESH_ATTEMPT": str(self.bound.attempt),
            RESULT_PATH_VAR: str(workdir / RESULT_FILE),
            PROGRESS_FD_VAR: str(channel.child_fd),
            CHECKPOINT_VAR: self.bound.checkpoint,
            **gang_env(self.bound),
        }
        if self.bound.scratch_dir:
            job_vars["JOBMESH_SCRATCH_DIR"] = self.bound.scratch_dir
        if self.bound.gpu_devices or self.bound.spec.resources.gpu or self._setup.gpu_node:
            # On a GPU node a job without GPUs is told it has none: else CUDA shows it all.
            job_vars.update(gpu_env(self.bound.gpu_devices))
        env = job_environment(self._setup.base_env, workdir, own_env, job_vars)
        timeout = self.bound.spec.timeouts.run
        quota_mb = self.bound.spec.resources.disk_mb
        watchdog = asyncio.ensure_future(watch_quota(workdir, quota_mb, self._abort)) if quota_mb else None
        total = self.bound.spec.timeouts.total
        # The total timeout counts from the submission, across attempts: this attempt gets
        # what is left of it, and is stopped with its own reason when that runs out.
        stop_at_total = (
            asyncio.get_running_loop().call_later(
                max(0.0, self.bound.submitted_at + total - self._clock()),
                self._abort.set,
                TIMEOUT,
                f"the job ran past its total timeout of {total:g}s (across all attempts)",
            )
            if total
            else None
        )
        lease = self.lease
        request = RunRequest(
            job_id=self.bound.job_id,
            attempt=self.bound.attempt,
            name=self.name,
            runtime=runtime,
            workdir=workdir,
            env=env,
            timeout=timeout,
            abort=self._abort,
            on_line=self._publish_line,
            resources=self.bound.spec.resources,
            network=self.bound.spec.network,
            stdin=stdin,
            secrets_dir=secrets_dir,
            gpu_devices=tuple(self.bound.gpu_devices),
            uid=self._uid if self._own_uid else None,
            gid=self._gid if self._own_uid else None,
            checkpoint=self.bound.checkpoint,
            on_progress=lambda fraction, message: _progress(lease, fraction, self._mask(message)),
            on_checkpoint=lambda text: setattr(lease, "checkpoint", self._mask(text)),
            pass_fds=(channel.child_fd,),
            on_spawned=channel.spawned,
            parent=_parent_of(self.bound),
        )
        run_span = self._tracer.start_span(
            "run jobmesh.job", context=self._trace_context, attributes={"jobmesh.runtime": runtime_kind(runtime)}
        )
        try:
            outcome = await runner.run(request)
            if outcome.exit_code is not None:
                run_span.set_attribute("process.exit.code", outcome.exit_code)
            if outcome.error is not None:
                run_span.set_attribute("jobmesh.error.code", outcome.error.code)
                run_span.set_status(trace.Status(trace.StatusCode.ERROR, outcome.error.code))
        finally:
            run_span.end()
            if watchdog is not None:
                watchdog.cancel()
            if stop_at_total is not None:
                stop_at_total.cancel()
        if not quota_mb:
            return outcome
        # The watchdog looks only once a second: a job that wrote past its quota and exited
        # in between would otherwise succeed. The group is dead now, so this is the last word.
        used = await asyncio.to_thread(directory_bytes, workdir)
        return outcome_after_exit(outcome, used, quota_mb)

    async def _with_result(self, outcome: Outcome, path: Path) -> Outcome:
        """The successful outcome with the result the job left, or the failure it causes."""
        assert self._results is not None
        try:
            result = await self._results.collect(
                self.bound.job_id, self.bound.attempt, path, keep=keeps_result(self.bound), rank=self.bound.rank
            )
        except Overloaded as exc:
            log.warning("%s: its result cannot be stored: %s", self.name, exc)
            return failed_outcome(RESULT_TOO_LARGE, str(exc), outcome.exit_code, outcome.output_tail)
        if result is None:
            return outcome
        if result.too_large:
            log.info("%s: result of %d bytes is over the limit", self.name, result.size)
            message = too_large_message(result.size, self._results.limits)
            return failed_outcome(RESULT_TOO_LARGE, message, outcome.exit_code, outcome.output_tail)
        return Outcome(
            outcome.exit_code,
            None,
            outcome.output_tail,
            result=result.text,
            result_ref=result.ref,
            result_bytes=result.size,
        )

    def _mask(self, text: str) -> str:
        """``text`` with the attempt's secrets masked (they are known once it is prepared)."""
        return self._masker.mask(text) if self._masker is not None else text

    async def _publish_line(self, stream: OutputStream, line: str) -> None:
        if self._masker is not None:
            line = self._masker.mask(line)
        self._log_seq += 1
        bound = self.bound
        message = LogLine(job_id=bound.job_id, attempt=bound.attempt, stream=stream, line=line, at=self._clock())
        msg_id = log_id(bound.job_id, bound.attempt, self._log_seq, bound.rank)
        line_out = Outgoing(subjects.job_log(bound.job_id), message, msg_id, self._trace_context, spanned=False)
        await self._reporter.emit_log(line_out)


def _nanoseconds(epoch_seconds: float) -> int:
    return int(epoch_seconds * 1e9)


def _progress(lease: LeaseState, fraction: float, message: str) -> None:
    lease.progress = min(1.0, max(0.0, fraction))
    lease.message = message


def _masked(outcome: Outcome, masker: Masker) -> Outcome:
    """The outcome with the secrets out of its tail and its error's message (a handler's
    exception, an engine's complaint can quote a value)."""
    tail = masker.mask_tail(outcome.output_tail) if outcome.output_tail else outcome.output_tail
    error = outcome.error
    if error is not None:
        error = msgspec.structs.replace(error, message=masker.mask(error.message))
    return Outcome(outcome.exit_code, error, tail, outcome.result, outcome.result_ref, outcome.result_bytes)


def _remove_private(path: Path) -> None:
    if path.exists():
        remove_secret_files(path / "secrets")
        shutil.rmtree(path, ignore_errors=True)


class Attempts:
    """This node's attempts: the running ones, and bounded memories of the others.

    Args:
        node_id: this node.
        work_root: the node's work directory (``<work_dir>/<node_id>``).
        reporter: where attempts report.
        runners: the runner of each runtime kind (:data:`Runners`), or the process runner
            alone (then the only kind, with the allow-list it was made with).
        tracer: for attempt spans.
        leases: the leases the node record lists.
        results: reads and stores result files (None: results are ignored).
        clock: epoch seconds.
        remember: how many recent attempts to remember for deduplication; a redelivery comes within ``ack_wait`` seconds, so this only
            has to cover that long a burst.
        remember_cancels: how many cancels of attempts not seen yet to remember.
        setup: the rest of what attempts are prepared with (environment, isolation,
            secrets, uploads); its runners are ``runners``.
    """

    def __init__(
        self,
        node_id: str,
        work_root: Path,
        reporter: Reporter,
        runners: Runners | ProcessRunner,
        tracer: trace.Tracer,
        leases: LeaseBook | None = None,
        results: ResultStore | None = None,
        clock: Callable[[], float] = time.time,
        remember: int = 100_000,
        remember_cancels: int = 10_000,
        setup: AttemptSetup | None = None,
    ) -> None:
        self._node_id = node_id
        self._work_root = work_root
        self._reporter = reporter
        if isinstance(runners, ProcessRunner):
            process = runners
            runners = {"process": process}
            if setup is None:
                setup = AttemptSetup(runners, process.base_env, process.isolation or NodeIsolation())
        if setup is None:
            setup = AttemptSetup(runners)
        elif setup.runners is not runners:
            setup = dataclasses.replace(setup, runners=runners)
        if setup.uids is None and setup.isolation.attempt_uids is not None:
            setup = dataclasses.replace(setup, uids=UidPool(*setup.isolation.attempt_uids))
        self.setup = setup
        self._tracer = tracer
        self.leases = leases if leases is not None else LeaseBook()
        # Asks for a node record put (Registration.put_soon; set once the registration
        # exists): an attempt that ended waits for the record listing it as ended.
        self.record_put: Callable[[], asyncio.Future[None]] | None = None
        self._results = results
        self._clock = clock
        self._remember = remember
        self._remember_cancels = remember_cancels
        # key -> the future of its JobStarted (or refusal) being durable: what a redelivery waits on.
        self._recent: OrderedDict[str, asyncio.Future[None]] = OrderedDict()
        self._running: dict[str, tuple[Attempt, asyncio.Task[None]]] = {}
        self._keeping: set[asyncio.Task[None]] = set()  # no-ops storing their kept result
        self._by_job: dict[str, Attempt] = {}  # the running process attempt of each job
        self._cancelled: OrderedDict[str, str] = OrderedDict()  # key -> reason, JobBound not seen yet
        self._orphaned: set[str] = set()
        self._ended_before: set[str] = set()

    # --- what an earlier incarnation left ------------------------------------------
    def adopt_previous(self, orphaned: Iterable[str], ended: Iterable[str]) -> None:
        """Remember what the previous incarnation's record listed, so none of it runs again.

        Args:
            orphaned: attempts it ran (reported lost now).
            ended: attempts it ended (their terminal events are durable).
        """
        self._orphaned.update(orphaned)
        self._ended_before.update(ended)

    # --- decisions -----------------------------------------------------------------
    def classify(self, bound: JobBound, key: str) -> Verdict:
        """What this node does with a ``JobBound`` (for this node).

        Args:
            bound: the dispatch message.
            key: its attempt key (``job_id:attempt``).

        Returns:
            The verdict (see :data:`Verdict`).
        """
        if key in self._recent:
            return "duplicate"
        if self._orphaned or self._ended_before or self._cancelled:  # all empty on the common path
            if key in self._orphaned:
                return "orphaned"
            if key in self._ended_before:
                return "ended_before"
            if key in self._cancelled:
                return "cancelled"
        if self._by_job:
            running = self._by_job.get(bound.job_id)
            if running is not None and running.bound.attempt > bound.attempt:
                return "stale"
        if not isinstance(bound.spec.runtime, NoopRuntime) and self.workdir_of(bound).exists():
            return "left_behind"
        return "run"

    def workdir_of(self, bound: JobBound) -> Path:
        """The working directory of an attempt: ``<work_root>/<job_id>-<attempt>``."""
        return self._work_root / f"{bound.job_id}-{bound.attempt}"

    def started_future(self, key: str) -> asyncio.Future[None] | None:
        """The Started (or refusal) future of a known attempt, or None if this process never saw it."""
        return self._recent.get(key)

    def cancel_reason(self, key: str) -> str:
        """The reason of the cancel that came before the attempt's ``JobBound``."""
        return self._cancelled.get(key) or "cancelled"

    # --- starting ------------------------------------------------------------------
    def launch(
        self,
        bound: JobBound,
        context: Context,
        started_at: float,
        started: asyncio.Future[None],
        ready: asyncio.Future[None] | None = None,
    ) -> Attempt | None:
        """Remember the attempt and start it as a background task.

        A no-op attempt has nothing to run or wait for, so its terminal event is queued at
        once, right behind its Started, without a task or a lease (None is returned): this
        is the benchmark path, and a task per job there costs a tenth of the executor's time.
        Any other attempt (process, handler, container) is added to the lease book at once;
        it starts when ``ready`` resolves (the caller puts the record and resolves it).

        Args:
            bound: the dispatch message.
            context: its trace context.
            started_at: the JobStarted ``at``.
            started: resolves once its JobStarted is durable.
            ready: resolves once the JobStarted and a record listing the attempt are durable
                (required for a process attempt).

        Returns:
            The attempt, or None for a no-op.
        """
        key = attempt_key(bound.job_id, bound.attempt)
        # A redelivery of a process attempt waits for its record too, like the first delivery.
        self._remember_seen(key, started if ready is None else ready)
        if self._by_job:
            older = self._by_job.get(bound.job_id)
            if older is not None and older.bound.attempt < bound.attempt:
                older.abort(SUPERSEDED, f"superseded by attempt {bound.attempt}, bound to this node")
        runtime = bound.spec.runtime
        if isinstance(runtime, NoopRuntime):
            outcome = noop_outcome(runtime)
            if keeps_result(bound) and outcome.error is None and self._results is not None:
                # Its (empty) result is kept before its success is reported, as a process's is.
                keeping = asyncio.get_running_loop().create_task(self._keep_noop(bound, context, started_at, outcome))
                self._keeping.add(keeping)
                keeping.add_done_callback(self._keeping.discard)
                return None
            self._reporter.post([terminal_message(bound, self._node_id, outcome, started_at, self._clock(), context)])
            return None
        if ready is None:
            raise ValueError("an attempt that runs something needs the future of its record being durable")
        lease = self.leases.add(
            bound.job_id, bound.attempt, bound.partition, started_at, bound.checkpoint, bound.rank, bound.world_size
        )
        attempt = Attempt(
            bound,
            context,
            started_at,
            lease=lease,
            ready=ready,
            node_id=self._node_id,
            work_root=self._work_root,
            reporter=self._reporter,
            setup=self.setup,
            results=self._results,
            tracer=self._tracer,
            on_ended=self._ended,
            clock=self._clock,
        )
        task = asyncio.get_running_loop().create_task(attempt.run(), name=f"attempt:{attempt.key}")
        self._running[attempt.key] = (attempt, task)
        self._by_job[bound.job_id] = attempt
        task.add_done_callback(functools.partial(self._finished, attempt))
        return attempt

    async def _keep_noop(self, bound: JobBound, context: Context, started_at: float, outcome: Outcome) -> None:
        """Keep a no-op's ``null`` result, then report its success (or why it could not be kept)."""
        assert self._results is not None
        try:
            await self._results.keep(bound.job_id, bound.attempt, io.BytesIO(EMPTY_KEPT))
        except Overloaded as exc:
            outcome = failed_outcome(RESULT_TOO_LARGE, str(exc))
        except Exception as exc:
            log.exception(
                "%s: keeping its result failed inside the executor", attempt_name(bound.job_id, bound.attempt)
            )
            outcome = failed_outcome(EXECUTOR_ERROR, f"{type(exc).__name__}: {exc}")
        self._reporter.post([terminal_message(bound, self._node_id, outcome, started_at, self._clock(), context)])

    def refuse(self, bound: JobBound, code: FailureCode, message: str, context: Context) -> asyncio.Future[None]:
        """Report an attempt failed without running it (cancelled or stale before it started).

        Args:
            bound: the dispatch message.
            code: the failure code.
            message: why.
            context: its trace context.

        Returns:
            The future of the JobFailed being durable.
        """
        key = attempt_key(bound.job_id, bound.attempt)
        log.info("%s: not run (%s: %s)", attempt_name(bound.job_id, bound.attempt), code, message)
        outcome = failed_outcome(code, message)
        durable = self._reporter.emit([terminal_message(bound, self._node_id, outcome, 0.0, self._clock(), context)])
        durable.add_done_callback(lambda future: None if future.cancelled() else self._ended(key))
        self._remember_seen(key, durable)
        self._cancelled.pop(key, None)
        return durable

    async def report_left_behind(self, bound: JobBound, context: Context) -> asyncio.Future[None]:
        """Report lost an attempt an earlier executor started here (or ended, when it kept its
        terminal event), and clear what it left.

        Args:
            bound: the dispatch message (it came again).
            context: its trace context.

        Returns:
            The future of the report being durable.
        """
        key = attempt_key(bound.job_id, bound.attempt)
        workdir = self.workdir_of(bound)
        log.warning(
            "%s: an earlier executor of this node started it (%s is left): reporting what became of it, not running it",
            attempt_name(bound.job_id, bound.attempt),
            workdir,
        )
        lease = AttemptLease(
            job_id=bound.job_id,
            attempt=bound.attempt,
            partition=bound.partition,
            started_at=bound.bound_at,
            rank=bound.rank,
            world_size=bound.world_size,
        )
        # Its kept outcome, if it ended, is read first; its directories go only once the
        # report is durable and recorded, so an executor killed meanwhile leaves the next one
        # the same evidence.
        reports, _ = await asyncio.to_thread(reports_of, self._work_root, [lease], self._node_id, self._clock())
        await asyncio.to_thread(kill_leftovers, [workdir], remove=False)
        durable = self._reporter.emit([dataclasses.replace(report, context=context) for report in reports])
        self._remember_seen(key, durable)
        clearing = asyncio.get_running_loop().create_task(self._clear_left_behind(key, workdir, durable))
        self._keeping.add(clearing)
        clearing.add_done_callback(self._keeping.discard)
        return durable

    async def _clear_left_behind(self, key: str, workdir: Path, durable: asyncio.Future[None]) -> None:
        await durable
        await asyncio.to_thread(shutil.rmtree, workdir, True)
        if not self._ended(key):  # else its lease and outcome go once a record lists it ended
            await asyncio.to_thread(remove_leftovers, [workdir])

    def _remember_seen(self, key: str, started: asyncio.Future[None]) -> None:
        recent = self._recent
        recent[key] = started
        if len(recent) > self._remember:
            recent.popitem(last=False)

    def _ended(self, key: str) -> bool:
        """List the attempt as ended; True when its private directory is removed here once a
        record saying so is durable (see :class:`Attempt`)."""
        self.leases.end(key, self._clock())
        if self.record_put is None:
            return False
        dropping = asyncio.get_running_loop().create_task(self._drop_evidence(key, self.record_put()))
        self._keeping.add(dropping)
        dropping.add_done_callback(self._keeping.discard)
        return True

    async def _drop_evidence(self, key: str, recorded: asyncio.Future[None]) -> None:
        # Cancelled with the record writer (a stop): the files stay for the next start,
        # which finds the attempt ended in the last record, or publishes its kept outcome.
        await recorded
        job_id, _, attempt = key.rpartition(":")
        await asyncio.to_thread(_remove_private, self._work_root / f".{job_id}-{attempt}")

    def _finished(self, attempt: Attempt, _task: asyncio.Task[None]) -> None:
        self._running.pop(attempt.key, None)
        if self._by_job.get(attempt.bound.job_id) is attempt:
            del self._by_job[attempt.bound.job_id]

    # --- stopping ------------------------------------------------------------------
    def cancel(self, job_id: str, attempt: int, reason: str) -> Literal["stopping", "ended", "remembered"]:
        """Stop an attempt, or keep it from ever running.

        Args:
            job_id: the job.
            attempt: the attempt.
            reason: why (the cancel's reason).

        Returns:
            ``stopping`` when it runs here (it is being stopped, its terminal event follows),
            ``ended`` when it already ended here (or in an earlier incarnation),
            ``remembered`` when its JobBound has not come yet: it is refused when it does.
        """
        key = attempt_key(job_id, attempt)
        running = self._running.get(key)
        if running is not None:
            running[0].abort(stop_code(reason), reason or "cancelled")
            return "stopping"
        if key in self._recent or key in self._orphaned or key in self._ended_before:
            return "ended"
        if key not in self._cancelled:
            log.info("%s: cancelled before its dispatch came (%s)", attempt_name(job_id, attempt), reason)
        self._cancelled[key] = reason
        self._cancelled.move_to_end(key)
        if len(self._cancelled) > self._remember_cancels:
            self._cancelled.popitem(last=False)
        return "remembered"

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
        tasks = [task for _, task in self._running.values()] + list(self._keeping)
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        left = list(self._running.values())
        for attempt, _ in left:
            attempt.abort(NODE_DRAINED, f"node {self._node_id} was drained before the attempt finished")
        if left:
            log.warning(
                "drain: stopping %d attempts that did not finish in %.0fs: %s",
                len(left),
                grace,
                ", ".join(attempt.name for attempt, _ in left[:20]),
            )
            _, pending = await asyncio.wait([task for _, task in left], timeout=settle)
            for task in pending:
                task.cancel()
            if pending:
                # Each then runs its shielded clean-up (secrets, directories, uid): wait for
                # it, or the loop's end would cancel that too.
                await asyncio.wait(pending, timeout=settle)
        return len(left)


def _parent_of(bound: JobBound) -> ParentRef | None:
    """The attempt's job as the parent of what its handler submits, if it is a workflow step."""
    step = bound.spec.step
    if step is None:
        return None
    return ParentRef(job_id=bound.job_id, partition=bound.partition, workflow_id=step.workflow_id, step=step.step)
