"""Trigger handlers: turn an API submit into JobSubmitted events.

The reply carries job ids only after JetStream acknowledged every JobSubmitted, so a job
id a caller holds is never lost. A handler job's input is checked against its handler's
input type (``handlerschemas``) with the rest of the request, before anything is published.

A job that waits for others (``after``) is checked against the tracker in one round of
requests: a job it names must exist (or be in the same request); one that has ended already
either meets the condition (the dependency is dropped: the scheduler need not wait for a
job it may have forgotten) or never can (refused, naming the field).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.ids import child_id, child_step, job_id_for, new_idempotency_key, submit_id
from jobmesh.contract.messages.v1 import (
    ChildAdded,
    ErrorReply,
    HandlerRuntime,
    JobGetRequest,
    JobListReply,
    JobListRequest,
    JobSpec,
    JobSubmitted,
    JobSummary,
    JobView,
    QueueConfig,
    StepRef,
    Submission,
    SubmitReply,
    SubmitRequest,
)
from jobmesh.contract.validation import validate_spec
from jobmesh.errors import InvalidSpec, NotFound, Unavailable
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.service import Envelope
from jobmesh.trigger.handlerschemas import HandlerSchemas
from jobmesh.trigger.workflows import condition

# How long the tracker has to answer one request.
TRACKER_TIMEOUT = 5.0
# A job submitted a moment ago may not be recorded yet: a job the tracker does not know is
# asked about again, this often, for this long, before a dependency on it is refused.
NOT_FOUND_RETRY = 0.2
NOT_FOUND_GRACE = 1.0
# At most this many requests to the tracker in flight for one submit.
LOOKUP_CONCURRENCY = 64


class JobLookup:
    """What the trigger asks the tracker about jobs (request/reply on core NATS).

    Args:
        nc: the NATS connection.
        timeout: seconds the tracker has to answer one request.
        clock: monotonic seconds (the not-found grace).
        sleep: waits between the asks about a job not recorded yet.
    """

    def __init__(
        self,
        nc: NATS,
        timeout: float = TRACKER_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
        grace: float = NOT_FOUND_GRACE,
    ) -> None:
        self._nc = nc
        self._timeout = timeout
        self._clock = clock
        self._sleep = sleep
        self._grace = grace

    async def _request(self, subject: str, message: Any, reply_type: Any) -> Any:
        try:
            reply = await self._nc.request(subject, encode(message), timeout=self._timeout)
        except nats.errors.NoRespondersError as exc:
            raise Unavailable(f"the tracker is not running (no responders on {subject})") from exc
        except nats.errors.TimeoutError as exc:
            raise Unavailable(f"the tracker did not answer on {subject} within {self._timeout}s") from exc
        decoded = msgspec.json.decode(reply.data, type=reply_type | ErrorReply)
        if isinstance(decoded, ErrorReply):
            raise decoded.error()
        return decoded

    async def get(self, job_id: str) -> JobView | None:
        """The tracker's view of one job; None when it does not know it."""
        try:
            view: JobView = await self._request(subjects.API_JOB_GET, JobGetRequest(job_id=job_id), JobView)
        except NotFound:
            return None
        return view

    async def views(self, job_ids: Iterable[str], grace: float | None = None) -> dict[str, JobView | None]:
        """The views of several jobs, asked for together; a job not known at first is asked
        about again for a short grace (it may have been submitted a moment ago).

        Args:
            job_ids: the jobs.
            grace: seconds to keep asking about unknown jobs (None: this lookup's own).

        Returns:
            Each job's view, None for a job the tracker does not know.

        Raises:
            Unavailable: the tracker does not answer.
        """
        wanted = list(dict.fromkeys(job_ids))
        limit = asyncio.Semaphore(LOOKUP_CONCURRENCY)

        async def one(job_id: str) -> JobView | None:
            async with limit:
                return await self.get(job_id)

        found: dict[str, JobView | None] = dict(zip(wanted, await asyncio.gather(*map(one, wanted)), strict=True))
        deadline = self._clock() + (self._grace if grace is None else grace)
        missing = [job_id for job_id, view in found.items() if view is None]
        while missing and self._clock() < deadline:
            await self._sleep(NOT_FOUND_RETRY)
            for job_id, view in zip(missing, await asyncio.gather(*map(one, missing)), strict=True):
                found[job_id] = view
            missing = [job_id for job_id in missing if found[job_id] is None]
        return found

    async def workflow_jobs(self, run_id: str, page: int = 2_000) -> list[JobSummary]:
        """Every job of a workflow run as the tracker lists it (older generations too), read
        in pages that each fit in a message."""
        jobs: list[JobSummary] = []
        while True:
            reply: JobListReply = await self._request(
                subjects.API_JOB_LIST, JobListRequest(workflow=run_id, limit=page, offset=len(jobs)), JobListReply
            )
            jobs.extend(reply.jobs)
            if len(reply.jobs) < page:
                return jobs


def check_preempt(spec: JobSpec, queue: QueueConfig, where: str) -> None:
    """Refuse a job that asks to preempt (``spec.preempt``) when its queue does not allow it
    at the job's priority: the operator decides which queues and bands may stop others.

    Raises:
        InvalidSpec: naming ``where``, the queue and what its configuration says.
    """
    if queue.allows_preemption(spec.priority):
        return
    if queue.preempt_min_priority is None:
        why = "does not allow preemption"
    else:
        why = f"allows preemption from priority {queue.preempt_min_priority}, and the job has {spec.priority}"
    raise InvalidSpec(
        f"{where}: queue {spec.queue!r} {why} (jobmesh queue set {spec.queue} --preempt-min-priority N)",
        field=where,
    )


class SubmitHandler:
    """Handles ``jobmesh.v1.api.submit``.

    Args:
        publisher: publishes to JetStream and waits for the acks.
        partitions: how many scheduler partitions queues hash onto.
        schemas: the handlers' input types; None checks no handler input at submit.
        clock: returns the current unix time.
        jobs: asks the tracker about the jobs a job waits for; None checks no ``after``.
        queues: a queue's configuration (the live ``jm_config`` view), to refuse a job that
            asks to preempt on a queue that does not allow it; None checks nothing.
    """

    def __init__(
        self,
        publisher: Publisher,
        partitions: int,
        schemas: HandlerSchemas | None = None,
        clock: Callable[[], float] = time.time,
        jobs: JobLookup | None = None,
        queues: Callable[[str], QueueConfig] | None = None,
    ) -> None:
        self._publisher = publisher
        self._partitions = partitions
        self._schemas = schemas
        self._clock = clock
        self._jobs = jobs
        self._queues = queues

    async def __call__(self, env: Envelope) -> SubmitReply:
        request: SubmitRequest = env.message
        may_hold_nul = True
        if env.raw is not None:
            # Unknown fields were refused by the request's codec (SubmitRequest is strict).
            may_hold_nul = b"\\u0000" in env.raw.data  # JSON can carry NUL only escaped
        now = self._clock()
        for i, submission in enumerate(request.jobs):
            spec = submission.spec
            validate_spec(spec, where=f"jobs[{i}].spec", may_hold_nul=may_hold_nul, now=now)
            if spec.preempt and self._queues is not None:
                check_preempt(spec, self._queues(spec.queue), f"jobs[{i}].spec.preempt")
            # A type test per job is all a job that is not a handler call pays here.
            if type(spec.runtime) is HandlerRuntime and self._schemas is not None:
                await self._schemas.check(spec.runtime, f"jobs[{i}].spec.runtime")
            fallback = spec.retry.fallback
            if fallback is not None and type(fallback.runtime) is HandlerRuntime and self._schemas is not None:
                await self._schemas.check(fallback.runtime, f"jobs[{i}].spec.retry.fallback.runtime")
        keys = [submission.idempotency_key or new_idempotency_key() for submission in request.jobs]
        job_ids = [job_id_for(key) for key in keys]
        specs = [_as_child(submission) for submission in request.jobs]
        # A plain submit pays one test per job here; only one that waits asks the tracker.
        if self._jobs is not None and any(spec.after for spec in specs):
            specs = await settle_after(specs, job_ids, self._jobs, self._partitions)
        outgoing = []
        for key, job_id, spec in zip(keys, job_ids, specs, strict=True):
            partition = subjects.partition_of(spec.queue, self._partitions)
            event = JobSubmitted(
                job_id=job_id,
                partition=partition,
                spec=spec,
                idempotency_key=key,
                submitted_at=now,
            )
            outgoing.append(
                Outgoing(subjects.job_event(partition, subjects.SUBMITTED), event, submit_id(key), env.context)
            )
        # A job a workflow step's handler submitted: its step's partition hears of it, in
        # the same batch, so that it knows of the child before the step's own end.
        for submission, job_id, event_out in zip(request.jobs, job_ids, list(outgoing), strict=True):
            parent = submission.parent
            if parent is not None:
                added = ChildAdded(
                    job_id=parent.job_id,
                    partition=parent.partition,
                    child=job_id,
                    child_partition=event_out.message.partition,
                    at=now,
                )
                subject = subjects.job_event(parent.partition, subjects.CHILD_ADDED)
                outgoing.append(Outgoing(subject, added, child_id(parent.job_id, job_id), env.context))
        acks = await self._publisher.publish(outgoing)
        return SubmitReply(job_ids=job_ids, duplicates=[bool(ack.duplicate) for ack in acks[: len(job_ids)]])


def _as_child(submission: Submission) -> JobSpec:
    """A job a workflow step's handler submitted is listed with the step's run."""
    spec, parent = submission.spec, submission.parent
    if parent is None or not parent.workflow_id or spec.step is not None:
        return spec
    step = StepRef(workflow_id=parent.workflow_id, step=child_step(parent.step, parent.job_id)[:128])
    return msgspec.structs.replace(spec, step=step)


async def settle_after(
    specs: Sequence[JobSpec], job_ids: Sequence[str], jobs: JobLookup, partitions: int
) -> list[JobSpec]:
    """The specs with their ``after`` checked against the tracker, in one round of requests.

    A dependency on a job of the same request stays (it is submitted with it); one on a
    job that has not ended stays; one on a job that ended as the condition allows is
    dropped; one on a job that ended otherwise, or that the tracker does not know, is
    refused.

    Args:
        specs: the request's job specs, in order.
        job_ids: their job ids (from their idempotency keys).
        jobs: the tracker.
        partitions: how many scheduler partitions queues hash onto.

    Returns:
        The specs, each with the dependencies still to wait for, each naming the partition
        of the job it waits for (where the scheduler asks to hear of its end).

    Raises:
        NotFound: a dependency names a job nobody submitted (``jobs[i].spec.after[k].job_id``).
        InvalidSpec: a dependency can never be met, names the job itself, or the request's
            jobs wait for each other in a cycle.
        Unavailable: the tracker does not answer.
    """
    local = {job_id: i for i, job_id in enumerate(job_ids)}
    _refuse_local_cycles(specs, job_ids, local)
    asked = [dep.job_id for spec in specs for dep in spec.after if dep.job_id not in local]
    views = await jobs.views(asked) if asked else {}
    out = []
    for i, spec in enumerate(specs):
        if not spec.after:
            out.append(spec)
            continue
        kept = []
        for k, dep in enumerate(spec.after):
            field = f"jobs[{i}].spec.after[{k}].job_id"
            if dep.job_id in local:
                queue = specs[local[dep.job_id]].queue
                kept.append(msgspec.structs.replace(dep, partition=subjects.partition_of(queue, partitions)))
                continue
            view = views.get(dep.job_id)
            if view is None:
                raise NotFound(
                    f"job {dep.job_id} is not known: a job can wait only for a job submitted before it"
                    f" or with it - at `$.{field}`",
                    field=field,
                )
            state = condition(dep.when, view.state, view.final)
            if state == "pending":
                kept.append(msgspec.structs.replace(dep, partition=view.partition) if view.partition >= 0 else dep)
            elif state == "never":
                raise InvalidSpec(
                    f"job {dep.job_id} ended {view.state}, and this job runs only after "
                    f"{'success' if dep.when == 'succeeded' else 'a failure'} (when: {dep.when}); it could never run"
                    f" - at `$.{field}`",
                    field=field,
                )
        out.append(msgspec.structs.replace(spec, after=kept))
    return out


def _refuse_local_cycles(specs: Sequence[JobSpec], job_ids: Sequence[str], local: dict[str, int]) -> None:
    """Refuse a job that waits for itself, or jobs of one request that wait for each other in a cycle."""
    for i, spec in enumerate(specs):
        for k, dep in enumerate(spec.after):
            if dep.job_id == job_ids[i]:
                field = f"jobs[{i}].spec.after[{k}].job_id"
                raise InvalidSpec(f"a job cannot wait for itself - at `$.{field}`", field=field)
    if not any(dep.job_id in local for spec in specs for dep in spec.after):
        return
    state = [0] * len(specs)  # 0 not seen, 1 on the path, 2 done
    # Depth first without recursion: a request may chain a thousand jobs one after another.
    for start in range(len(specs)):
        if state[start]:
            continue
        state[start] = 1
        stack = [(start, 0)]
        while stack:
            i, k = stack[-1]
            after = specs[i].after
            if k == len(after):
                state[i] = 2
                stack.pop()
                continue
            stack[-1] = (i, k + 1)
            j = local.get(after[k].job_id)
            if j is None or state[j] == 2:
                continue
            if state[j] == 1:
                field = f"jobs[{i}].spec.after[{k}].job_id"
                raise InvalidSpec(
                    f"jobs[{i}] waits for jobs[{j}], which waits for it in turn (a cycle): neither could ever run"
                    f" - at `$.{field}`",
                    field=field,
                )
            state[j] = 1
            stack.append((j, 0))
