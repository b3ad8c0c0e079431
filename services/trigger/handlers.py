"""Trigger handlers: turn an API submit into JobSubmitted events.

The reply carries job ids only after JetStream acknowledged every JobSubmitted, so a job
id a caller holds is never lost. A handler job's input is checked against its handler's
input type (``handlerschemas``) with the rest of the request, before anything is published.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from jobmesh.contract import subjects
from jobmesh.contract.ids import job_id_for, new_idempotency_key, submit_id
from jobmesh.contract.messages.v1 import HandlerRuntime, JobSubmitted, SubmitReply, SubmitRequest
from jobmesh.contract.strict import reject_unknown_fields
from jobmesh.contract.validation import validate_spec
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.service import Envelope
from jobmesh.trigger.handlerschemas import HandlerSchemas


class SubmitHandler:
    """Handles ``jobmesh.v1.api.submit``.

    Args:
        publisher: publishes to JetStream and waits for the acks.
        partitions: how many scheduler partitions queues hash onto.
        schemas: the handlers' input types; None checks no handler input at submit.
        clock: returns the current unix time.
    """

    def __init__(
        self,
        publisher: Publisher,
        partitions: int,
        schemas: HandlerSchemas | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._publisher = publisher
        self._partitions = partitions
        self._schemas = schemas
        self._clock = clock

    async def __call__(self, env: Envelope) -> SubmitReply:
        request: SubmitRequest = env.message
        may_hold_nul = True
        if env.raw is not None:
            reject_unknown_fields(env.raw.data, SubmitRequest)
            may_hold_nul = b"\\u0000" in env.raw.data  # JSON can carry NUL only escaped
        now = self._clock()
        for i, submission in enumerate(request.jobs):
            spec = submission.spec
            validate_spec(spec, where=f"jobs[{i}].spec", may_hold_nul=may_hold_nul, now=now)
            # A type test per job is all a job that is not a handler call pays here.
            if type(spec.runtime) is HandlerRuntime and self._schemas is not None:
                await self._schemas.check(spec.runtime, f"jobs[{i}].spec.runtime")
            fallback = spec.retry.fallback
            if fallback is not None and type(fallback.runtime) is HandlerRuntime and self._schemas is not None:
                await self._schemas.check(fallback.runtime, f"jobs[{i}].spec.retry.fallback.runtime")
        outgoing = []
        job_ids = []
        for submission in request.jobs:
            key = submission.idempotency_key or new_idempotency_key()
            job_id = job_id_for(key)
            partition = subjects.partition_of(submission.spec.queue, self._partitions)
            event = JobSubmitted(
                job_id=job_id,
                partition=partition,
                spec=submission.spec,
                idempotency_key=key,
                submitted_at=now,
            )
            job_ids.append(job_id)
            outgoing.append(
                Outgoing(subjects.job_event(partition, subjects.SUBMITTED), event, submit_id(key), env.context)
            )
        acks = await self._publisher.publish(outgoing)
        return SubmitReply(job_ids=job_ids, duplicates=[bool(ack.duplicate) for ack in acks])
