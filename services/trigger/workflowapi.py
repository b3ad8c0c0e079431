"""The workflow API: ``jobmesh.v1.api.workflows.*`` (run, get, list, cancel, retry).

Any trigger replica answers (queue group ``trigger``). A run is checked whole first
(:func:`jobmesh.trigger.workflows.check`), so a refused workflow creates nothing. Then its
record goes to ``jm_workflows`` (created only: the same idempotency key names the same run,
and a second request publishes the same jobs again, which their message ids and job ids make
no-ops), and every step's ``JobSubmitted`` is published in one batch; the reply comes after
every PubAck, so a run a caller holds is never without its jobs.

Records change by compare-and-set on the key's revision (cancel, retry), so two writers
never lose an update. A run's state beyond ``cancelled`` is read from its jobs (the
tracker), never stored.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import jsonschema.exceptions  # type: ignore[import-untyped]
import msgspec
import nats.errors
import nats.js.errors
from msgspec import Struct
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from opentelemetry import trace

from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec, encode
from jobmesh.contract.ids import child_step, new_idempotency_key, submit_id, workflow_run_id
from jobmesh.contract.messages.v1 import (
    CancelReply,
    CancelRequest,
    ErrorReply,
    HandlerInfo,
    JobOrigin,
    JobSummary,
    WorkflowCancelReply,
    WorkflowCancelRequest,
    WorkflowGetRequest,
    WorkflowListReply,
    WorkflowListRequest,
    WorkflowRetryReply,
    WorkflowRetryRequest,
    WorkflowRun,
    WorkflowRunReply,
    WorkflowRunRequest,
    WorkflowSpec,
    WorkflowSummary,
)
from jobmesh.contract.strict import reject_unknown_fields
from jobmesh.errors import Conflict, InvalidSpec, JobmeshError, NotFound, Unavailable
from jobmesh.runtime.kvwatch import bucket_keys
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.service import Envelope, ResponderSpec
from jobmesh.runtime.tracing import Carried, Context, Tracing, new_root
from jobmesh.trigger.handlers import JobLookup
from jobmesh.trigger.handlerschemas import HandlerSchema
from jobmesh.trigger.workflows import (
    check,
    concurrency_digest,
    concurrency_key,
    depths,
    expand,
    handler_names,
    plan_retry,
    run_input,
    step_job_id,
    step_jobs,
)

log = logging.getLogger("jobmesh.trigger.workflowapi")

CAS_TRIES = 5
# Cancels in flight at once for one run; a level of the DAG is cancelled before the next.
CANCEL_CONCURRENCY = 64
# A cancel the scheduler answers "unknown" for a job that has not ended: the job was
# published a moment ago and not consumed yet. Asked again this often, for this long.
CANCEL_RETRY = 0.2
CANCEL_SETTLE = 5.0
SCHEDULER_TIMEOUT = 5.0
# Records read at once for a list.
LIST_CONCURRENCY = 64
RUN_PREFIX = subjects.workflow_key("")  # "run.": the keys of run records

_run_decoder = msgspec.json.Decoder(WorkflowRun)
_info_decoder = msgspec.json.Decoder(HandlerInfo)


MAX_EARLIER_RUNS = 32  # earlier runs of a concurrency key a new run looks back over
SIZE_MARGIN = 16 * 1024  # what a JobSubmitted adds to its spec (ids, deps, labels), generously


class _KeyHolder(Struct, frozen=True, kw_only=True):
    """What ``key.<digest>`` holds: the latest run with the key and the runs before it,
    latest first (kept with it, so a request retried after a crash finds the same ones,
    and a run whose record was never written does not hide the one before it)."""

    run_id: str
    after_run: str = ""
    earlier: list[str] = []


_holder_decoder = msgspec.json.Decoder(_KeyHolder)


class HandlerTypes:
    """Reads the types of the handlers a workflow calls from ``jm_handlers``.

    Args:
        js: the JetStream context.
    """

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def __call__(self, names: Iterable[str]) -> dict[str, HandlerSchema]:
        """The compiled types of ``names`` that an executor advertised (others are left out:
        their steps are checked when they run)."""
        wanted = sorted(set(names))
        if not wanted:
            return {}
        try:
            kv = await self._js.key_value(subjects.KV_HANDLERS)
        except Exception as exc:  # noqa: BLE001 - a courtesy check: the executor checks at run time
            log.warning("cannot open %s (%s); handler steps are checked when they run", subjects.KV_HANDLERS, exc)
            return {}
        entries = await asyncio.gather(*(_entry(kv, name) for name in wanted))
        out = {}
        for name, value in zip(wanted, entries, strict=True):
            if not value:
                continue
            try:
                out[name] = HandlerSchema(_info_decoder.decode(value))
            except (msgspec.DecodeError, jsonschema.exceptions.SchemaError) as exc:
                log.warning("handler %s: its record cannot be used to check a workflow (%s)", name, exc)
        return out


async def _entry(kv: Any, key: str) -> bytes | None:
    try:
        entry = await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    except (TimeoutError, nats.errors.Error) as exc:
        log.warning("cannot read %s (%s); treating it as absent", key, exc)
        return None
    return entry.value or None


class WorkflowApi:
    """Answers the workflow requests.

    Args:
        nc: the NATS connection (requests to schedulers).
        js: the JetStream context (``jm_workflows``).
        publisher: publishes the steps' jobs and waits for every PubAck.
        partitions: how many scheduler partitions queues hash onto.
        jobs: the tracker (a run's jobs and how they ended).
        handlers: the types of handlers (None: handler steps are not checked at run).
        tracing: starts the run's and steps' spans.
        clock: unix time.
        max_bytes: the largest request accepted.
    """

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        publisher: Publisher,
        partitions: int,
        jobs: JobLookup,
        handlers: Callable[[Iterable[str]], Any] | None = None,
        tracing: Tracing | None = None,
        clock: Callable[[], float] = time.time,
        max_bytes: int = 1024 * 1024,
    ) -> None:
        self._nc = nc
        self._js = js
        self._publisher = publisher
        self._partitions = partitions
        self._jobs = jobs
        self._handlers = handlers
        self._tracing = tracing or Tracing.off()
        self._clock = clock
        self._max_bytes = max_bytes
        self._kv: Any = None

    def responders(self) -> list[ResponderSpec]:
        """The five responders, for ``Runtime.serve``."""
        codec = self._max_bytes
        return [
            ResponderSpec(subjects.API_WORKFLOWS_RUN, Codec(WorkflowRunRequest, codec), self.run, queue="trigger"),
            ResponderSpec(subjects.API_WORKFLOWS_GET, Codec(WorkflowGetRequest, codec), self.get, queue="trigger"),
            ResponderSpec(subjects.API_WORKFLOWS_LIST, Codec(WorkflowListRequest, codec), self.list, queue="trigger"),
            ResponderSpec(
                subjects.API_WORKFLOWS_CANCEL, Codec(WorkflowCancelRequest, codec), self.cancel, queue="trigger"
            ),
            ResponderSpec(
                subjects.API_WORKFLOWS_RETRY, Codec(WorkflowRetryRequest, codec), self.retry, queue="trigger"
            ),
        ]

    # --- the bucket ----------------------------------------------------------------
    async def _bucket(self) -> Any:
        if self._kv is None:
            try:
                self._kv = await self._js.key_value(subjects.KV_WORKFLOWS)
            except Exception as exc:
                raise Unavailable(f"cannot open {subjects.KV_WORKFLOWS}: {exc}") from exc
        return self._kv

    async def _read(self, run_id: str) -> tuple[WorkflowRun | None, int]:
        kv = await self._bucket()
        try:
            entry = await kv.get(subjects.workflow_key(run_id))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None, 0
        except nats.js.errors.InvalidKeyError:
            return None, 0  # not an id a run can have
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable("read", run_id, exc) from exc
        if not entry.value:
            return None, 0
        try:
            return _run_decoder.decode(entry.value), entry.revision or 0
        except msgspec.DecodeError as exc:
            log.error("workflow run %s: the stored record does not decode (%s); treating it as absent", run_id, exc)
            return None, 0

    async def _existing(self, run_id: str) -> tuple[WorkflowRun, int]:
        record, revision = await self._read(run_id)
        if record is None:
            raise NotFound(f"no workflow run {run_id!r} (jobmesh workflow list shows them)", field="run_id")
        return record, revision

    async def _create(self, record: WorkflowRun) -> int:
        """Store a new run's record; its revision, or 0 when the run exists already."""
        kv = await self._bucket()
        try:
            return int(await kv.create(subjects.workflow_key(record.run_id), encode(record)))
        except nats.js.errors.KeyWrongLastSequenceError:
            return 0
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable("write", record.run_id, exc) from exc

    async def _update(self, record: WorkflowRun, revision: int) -> int:
        """Replace a run's record if it is still at ``revision``; its new revision."""
        kv = await self._bucket()
        try:
            return int(await kv.update(subjects.workflow_key(record.run_id), encode(record), last=revision))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise Conflict(f"workflow run {record.run_id} changed meanwhile; try again") from exc
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable("write", record.run_id, exc) from exc

    async def _hold_key(self, key: str, run_id: str) -> list[str]:
        """Make ``run_id`` the latest run with concurrency key ``key``; return the runs
        before it, latest first (bounded)."""
        kv = await self._bucket()
        name = subjects.workflow_concurrency_key(concurrency_digest(key))
        for _ in range(CAS_TRIES):
            holder: _KeyHolder | None = None
            revision = 0
            try:
                entry = await kv.get(name)
                revision = entry.revision or 0
                holder = _holder_decoder.decode(entry.value) if entry.value else None
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                pass
            except msgspec.DecodeError:
                log.warning("concurrency key %s: the stored value does not decode; replacing it", name)
            except (TimeoutError, nats.errors.Error) as exc:
                raise _unavailable("read", name, exc) from exc
            if holder is not None and holder.run_id == run_id:
                return holder.earlier or ([holder.after_run] if holder.after_run else [])  # its own request, retried
            earlier = [holder.run_id, *holder.earlier][:MAX_EARLIER_RUNS] if holder is not None else []
            value = encode(_KeyHolder(run_id=run_id, after_run=earlier[0] if earlier else "", earlier=earlier))
            try:
                if revision:
                    await kv.update(name, value, last=revision)
                else:
                    await kv.create(name, value)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            except (TimeoutError, nats.errors.Error) as exc:
                raise _unavailable("write", name, exc) from exc
            return earlier
        raise Conflict(f"concurrency key {key!r} kept changing under {CAS_TRIES} tries; try again")

    # --- run -----------------------------------------------------------------------
    async def run(self, env: Envelope) -> WorkflowRunReply:
        """Check a workflow whole, record the run, submit its jobs; reply after every PubAck."""
        request: WorkflowRunRequest = env.message
        if env.raw is not None:
            reject_unknown_fields(env.raw.data, WorkflowRunRequest)
        return await self.start(request.spec, request.input, request.idempotency_key, context=env.context)

    async def start(
        self,
        spec: WorkflowSpec,
        input: Any = None,
        idempotency_key: str = "",
        *,
        origin: JobOrigin | None = None,
        context: Context | None = None,
    ) -> WorkflowRunReply:
        """Start a run of ``spec`` (what ``api.workflows.run`` does; a trigger rule that starts
        a workflow calls this too).

        Args:
            spec: the workflow.
            input: the run's input; None for the workflow's own.
            idempotency_key: the same key always names the same run ("" for a fresh one).
            origin: the trigger rule and event that started it, if one did.
            context: the trace context the run's spans continue.

        Returns:
            The run's record, and whether it existed already (its jobs published again).

        Raises:
            InvalidSpec: the workflow could not run as written (the field named); nothing
                was created.
            Unavailable, Overloaded: the record or the jobs could not be written; the same
                request again finishes the run.
        """
        input = run_input(spec, input)
        handlers = await self._handlers(handler_names(spec)) if self._handlers is not None else {}
        now = self._clock()
        check(spec, input, handlers, now)
        key = concurrency_key(spec, input)
        run_id = workflow_run_id(idempotency_key or new_idempotency_key())
        if key:
            # A repeated request must find its run before it takes the key again (it would
            # queue behind itself); without a key the create below finds it instead.
            existing, revision = await self._read(run_id)
            if existing is not None:
                return WorkflowRunReply(run=await self._republish(existing, revision, context), duplicate=True)
        self._check_sizes(spec, input, run_id, now)
        earlier = await self._hold_key(key, run_id) if key else []
        record = WorkflowRun(
            run_id=run_id,
            spec=spec,
            input=input,
            jobs=step_jobs(spec, run_id, 0, {}),
            concurrency_key=key,
            after_run=earlier[0] if earlier else "",
            after_runs=earlier,
            origin=origin,
            created_at=now,
            updated_at=now,
        )
        revision = await self._create(record)
        if not revision:
            # Another replica took the same request at the same moment: its record stands.
            existing, revision = await self._existing(run_id)
            return WorkflowRunReply(run=await self._republish(existing, revision, context), duplicate=True)
        record = await self._publish_once(record, revision, context)
        log.info("workflow %s: run %s started with %d steps", spec.name, run_id, len(spec.steps))
        return WorkflowRunReply(run=record)

    def _check_sizes(self, spec: WorkflowSpec, input: Any, run_id: str, now: float) -> None:
        """Refuse a run whose step jobs would not fit in a message (the input filled into
        many places can make one much larger than the request), before anything is made."""
        spec_bytes = encode(spec)
        fills = spec_bytes.count(b"${input")
        if len(spec_bytes) + fills * len(encode(input)) + SIZE_MARGIN <= self._max_bytes:
            return  # no step's job can be larger than the whole workflow with every fill
        for event in expand(spec, input, run_id, 0, self._partitions, {}, now):
            size = len(encode(event))
            if size > self._max_bytes:
                step = event.spec.step.step if event.spec.step is not None else "?"
                raise InvalidSpec(
                    f"step {step}'s job is {size} bytes with the input filled in, over the {self._max_bytes}-byte"
                    " message limit: pass large values as files or results, not inline",
                    field=f"steps.{step}",
                )

    async def _republish(self, record: WorkflowRun, revision: int, context: Context | None) -> WorkflowRun:
        """Publish a run's jobs again for a request that names it a second time, if the first
        did not finish publishing them (a crash between the record and the PubAcks). A run
        published already is not: long after, its jobs may have been forgotten and would
        run again. A cancelled run's are not either."""
        if record.state == "cancelled" or record.published:
            return record
        return await self._publish_once(record, revision, context)

    async def _publish_once(self, record: WorkflowRun, revision: int, context: Context | None) -> WorkflowRun:
        """Publish the record's jobs, then mark it published (compare-and-set)."""
        await self._publish(record, context)
        done = msgspec.structs.replace(record, published=True)
        try:
            await self._update(done, revision)
        except Conflict:
            return record  # changed meanwhile (a cancel, a retry): the next look publishes if needed
        return done

    async def sweep_unpublished(self, older_than: float = 30.0) -> int:
        """Publish the jobs of runs whose request stopped between writing the record and
        the last PubAck (a trigger killed there, and nobody sent the request again).

        Returns:
            How many runs were published.
        """
        try:
            keys = await bucket_keys(self._js, subjects.KV_WORKFLOWS)
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable("list", subjects.KV_WORKFLOWS, exc) from exc
        count = 0
        now = self._clock()
        for key in keys:
            if not key.startswith(RUN_PREFIX):
                continue
            record, revision = await self._read(key[len(RUN_PREFIX) :])
            if record is None or record.published or record.state == "cancelled":
                continue
            if now - record.updated_at < older_than:
                continue  # its request may still be publishing
            await self._republish(record, revision, None)
            log.warning("workflow run %s: its jobs were not all published; published them now", record.run_id)
            count += 1
        return count

    async def run_sweeper(self, every: float = 60.0) -> None:
        """Sweep for unpublished runs every ``every`` seconds (a background task)."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.sweep_unpublished()
            except asyncio.CancelledError:
                raise
            except JobmeshError as exc:
                log.warning("sweeping for unpublished workflow runs failed (%s); will retry", exc)

    async def _publish(self, record: WorkflowRun, context: Context | None) -> None:
        """Publish the jobs of the record's generation (the same ids each time: a no-op when
        they were published already) and wait for every PubAck."""
        run_id, generation = record.run_id, record.generation
        kept = {step: job for step, job in record.jobs.items() if job != step_job_id(run_id, step, generation)}
        earlier = record.after_runs or ([record.after_run] if record.after_run else [])
        after_jobs = await self._earlier_jobs(earlier) if earlier and generation == 0 else []
        events = expand(
            record.spec,
            record.input,
            run_id,
            generation,
            self._partitions,
            kept,
            record.updated_at,
            after_jobs=after_jobs,
            origin=record.origin,
        )
        run_span, run_context = _child(self._tracing, f"workflow {record.spec.name}", context)
        spans = [run_span]
        outgoing = []
        for event in events:
            step = event.spec.step.step if event.spec.step is not None else ""
            span, step_context = _child(self._tracing, f"step {step}", run_context)
            if span is not None:
                span.set_attribute("jobmesh.job_id", event.job_id)
                span.set_attribute("jobmesh.step", step)
            spans.append(span)
            outgoing.append(
                Outgoing(
                    subjects.job_event(event.partition, subjects.SUBMITTED),
                    event,
                    submit_id(event.idempotency_key),
                    step_context,
                )
            )
        if run_span is not None:
            run_span.set_attribute("jobmesh.workflow", run_id)
            run_span.set_attribute("jobmesh.generation", generation)
        try:
            await self._publisher.publish(outgoing)
        finally:
            for span in reversed(spans):
                if span is not None:
                    span.end()

    async def _earlier_jobs(self, run_ids: list[str]) -> list[tuple[str, int]]:
        """The jobs of the earlier runs with the same key that have not ended (as far as the
        tracker knows: one it has not recorded yet is waited for), with their partitions.

        Raises:
            Unavailable: the tracker cannot say (the request fails; the same one again
                starts the run), rather than wait for jobs that may be long forgotten.
        """
        partition_of: dict[str, int] = {}
        for run_id in run_ids:
            earlier, _ = await self._read(run_id)
            if earlier is None:
                continue  # forgotten, or never written: nothing of it to wait for
            for step, job in earlier.jobs.items():
                if step in earlier.spec.steps:
                    partition_of[job] = subjects.partition_of(earlier.spec.steps[step].queue, self._partitions)
        jobs = list(partition_of)
        if not jobs:
            return []
        try:
            views = await self._jobs.views(jobs, grace=0.0)
        except JobmeshError as exc:
            raise Unavailable(f"the tracker cannot say which jobs of the earlier runs have ended: {exc}") from exc
        out = []
        for job in jobs:
            view = views.get(job)
            if view is None or not view.final:
                out.append((job, partition_of.get(job, -1)))
        return out

    # --- get and list --------------------------------------------------------------
    async def get(self, env: Envelope) -> WorkflowRun:
        """One run's record."""
        request: WorkflowGetRequest = env.message
        record, _ = await self._existing(request.run_id)
        return record

    async def list(self, env: Envelope) -> WorkflowListReply:
        """Runs, newest first (of one workflow when ``name`` is given)."""
        request: WorkflowListRequest = env.message
        try:
            keys = [key for key in await bucket_keys(self._js, subjects.KV_WORKFLOWS) if key.startswith(RUN_PREFIX)]
        except (TimeoutError, nats.errors.Error) as exc:
            raise _unavailable("list", "the runs", exc) from exc
        limit = asyncio.Semaphore(LIST_CONCURRENCY)

        async def one(key: str) -> WorkflowRun | None:
            async with limit:
                record, _ = await self._read(key.removeprefix(RUN_PREFIX))
                return record

        records = [r for r in await asyncio.gather(*map(one, keys)) if r is not None]
        if request.name:
            records = [r for r in records if r.spec.name == request.name]
        records.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        return WorkflowListReply(runs=[_summary(r) for r in records[: request.limit]])

    # --- cancel --------------------------------------------------------------------
    async def cancel(self, env: Envelope) -> WorkflowCancelReply:
        """Mark the run cancelled, then cancel its steps' jobs, dependents before their needs
        (a step that runs after any end of its need must not start because the need was
        cancelled first)."""
        request: WorkflowCancelRequest = env.message
        record = await self._mark_cancelled(request.run_id, request.reason)
        reason = f"workflow run {record.run_id} cancelled" + (f": {request.reason}" if request.reason else "")
        levels: dict[int, list[str]] = {}
        for step, depth in depths(record.spec).items():
            if step in record.jobs:
                levels.setdefault(depth, []).append(step)
        limit = asyncio.Semaphore(CANCEL_CONCURRENCY)

        async def one(step: str) -> str:
            async with limit:
                queue = record.spec.steps[step].queue
                return await self._cancel_job(record.jobs[step], subjects.partition_of(queue, self._partitions), reason)

        outcomes: list[str] = []
        for depth in sorted(levels, reverse=True):
            outcomes.extend(await asyncio.gather(*map(one, levels[depth])))
        reached = sum(1 for o in outcomes if o in ("cancelled", "cancelling"))
        ended = sum(1 for o in outcomes if o == "ended")
        other = len(outcomes) - reached - ended
        message = f"{reached} of {len(outcomes)} jobs stopped, {ended} had ended"
        if other:
            message += f"; {other} could not be reached (the scheduler did not answer or know them): cancel again"
        log.info("workflow run %s cancelled: %s", record.run_id, message)
        return WorkflowCancelReply(run_id=record.run_id, cancelled=reached, message=message)

    async def _mark_cancelled(self, run_id: str, reason: str) -> WorkflowRun:
        for _ in range(CAS_TRIES):
            record, revision = await self._existing(run_id)
            if record.state == "cancelled":
                return record
            updated = msgspec.structs.replace(record, state="cancelled", cancel_reason=reason, updated_at=self._clock())
            try:
                await self._update(updated, revision)
            except Conflict:
                continue
            return updated
        raise Conflict(f"workflow run {run_id} kept changing under {CAS_TRIES} tries; try again")

    async def _cancel_job(self, job_id: str, partition: int, reason: str) -> str:
        """Cancel one job: ``cancelled``, ``cancelling``, ``ended``, or ``unreached``."""
        deadline = time.monotonic() + CANCEL_SETTLE
        request = encode(CancelRequest(job_id=job_id, reason=reason))
        while True:
            try:
                msg = await self._nc.request(subjects.scheduler_cancel(partition), request, timeout=SCHEDULER_TIMEOUT)
                reply = msgspec.json.decode(msg.data, type=CancelReply | ErrorReply)
            except (nats.errors.Error, msgspec.DecodeError) as exc:
                log.warning("cancel of job %s: partition %d did not answer (%s)", job_id, partition, exc)
                return "unreached"
            if isinstance(reply, ErrorReply):
                log.warning("cancel of job %s: %s", job_id, reply.message)
                return "unreached"
            if reply.state != "unknown":
                return reply.state
            # The scheduler holds no such job: it has ended, or was published a moment ago
            # and is not consumed yet (then it would run after all: ask again).
            try:
                view = await self._jobs.get(job_id)
            except JobmeshError:
                view = None
            if view is not None and view.final:
                return "ended"
            if time.monotonic() >= deadline:
                return "unreached"
            await asyncio.sleep(CANCEL_RETRY)

    # --- retry ---------------------------------------------------------------------
    async def retry(self, env: Envelope) -> WorkflowRetryReply:
        """Run again the steps whose job did not succeed (the next generation); succeeded
        steps keep their jobs and results."""
        request: WorkflowRetryRequest = env.message
        record, revision = await self._existing(request.run_id)
        rows = await self._jobs.workflow_jobs(record.run_id)
        by_id = {row.job_id: row for row in rows if row.index == -1}
        current = {step: by_id.get(job) for step, job in record.jobs.items()}
        if any(row is None for row in current.values()):
            if record.state == "cancelled":
                # Never published (a crash between the record and the publish) and then
                # cancelled: such a job never ran, as a cancelled one.
                current = {step: row or _never_ran(record.jobs[step]) for step, row in current.items()}
            else:
                # The jobs of the record's generation may never have been published:
                # publishing them again heals that (the retry then waits for them to end).
                await self._publish(record, env.context)
        current = _with_children(current, rows)
        plan = plan_retry(record.spec, record.jobs, current)
        if not plan.steps:
            return WorkflowRetryReply(run=record, steps=[])
        generation = record.generation + 1
        updated = msgspec.structs.replace(
            record,
            jobs=step_jobs(record.spec, record.run_id, generation, plan.jobs_kept),
            generation=generation,
            state="running",
            cancel_reason="",
            published=False,  # until the new generation's jobs are all published
            updated_at=self._clock(),
        )
        revision = await self._update(updated, revision)
        updated = await self._publish_once(updated, revision, env.context)
        log.info("workflow run %s retried (generation %d): %s", record.run_id, generation, ", ".join(plan.steps))
        return WorkflowRetryReply(run=updated, steps=plan.steps)


def _unavailable(what: str, key: str, exc: BaseException) -> Unavailable:
    return Unavailable(f"cannot {what} {key} in {subjects.KV_WORKFLOWS}: {type(exc).__name__}: {exc}")


def _with_children(current: dict[str, JobSummary | None], rows: list[JobSummary]) -> dict[str, JobSummary | None]:
    """Each step's job as a retry judges it: a step whose own job succeeded but whose
    handler's child jobs did not all succeed counts as failed (it runs again), and one
    whose children still run as not ended."""
    out = dict(current)
    for step, row in current.items():
        if row is None or row.state != "succeeded":
            continue
        children = [r for r in rows if r.step == child_step(step, row.job_id)]
        if any(not c.final for c in children):
            out[step] = msgspec.structs.replace(row, final=False)
        elif any(c.state != "succeeded" for c in children):
            out[step] = msgspec.structs.replace(row, state="failed")
    return out


def _never_ran(job_id: str) -> JobSummary:
    return JobSummary(
        job_id=job_id,
        name="",
        queue="",
        tenant="",
        state="cancelled",
        attempt=0,
        node_id="",
        exit_code=None,
        submitted_at=0.0,
        updated_at=0.0,
        final=True,
    )


def _summary(record: WorkflowRun) -> WorkflowSummary:
    return WorkflowSummary(
        run_id=record.run_id,
        name=record.spec.name,
        state=record.state,
        generation=record.generation,
        steps=len(record.spec.steps),
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def _child(tracing: Tracing, name: str, parent: Context | None) -> tuple[Any, Context]:
    """A span below ``parent`` (None when nothing is recorded) and the context it makes.

    When spans are not recorded, the context still gets a span id of its own in the same
    trace, so each step's job carries its own traceparent.
    """
    if tracing.exporting:
        span = tracing.tracer.start_span(name, context=parent, kind=trace.SpanKind.INTERNAL)
        return span, trace.set_span_in_context(span, parent)
    if isinstance(parent, Carried):
        head = parent.traceparent
        return None, Carried(f"{head[:36]}{random.getrandbits(64) or 1:016x}{head[52:]}")
    return None, new_root()
