"""Firing: the jobs rules decided on become JobSubmitted events, in one batch.

Every source (subject events, webhooks, schedules, completions, fired bursts) ends here.
A fire carries the idempotency key its rule derived from the rule, its version and the
event, so a redelivered event, a second replica or a retry after a crash submits the same
job: the Nats-Msg-Id dedupes within the stream's window, and the job id (derived from the
key) makes it the same job after it. Nothing is acknowledged upstream before the batch's
PubAcks are in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jobmesh.contract import subjects
from jobmesh.contract.ids import job_id_for, submit_id
from jobmesh.contract.messages.v1 import HandlerRuntime, JobOrigin, JobSpec, JobSubmitted
from jobmesh.errors import JobmeshError
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.tracing import Context
from jobmesh.trigger.handlerschemas import HandlerSchemas
from jobmesh.trigger.stats import RuleStats


@dataclass(slots=True)
class Fire:
    """One job a rule decided to submit.

    Attributes:
        rule: the rule's name.
        spec: the job, already checked like a submit.
        key: its idempotency key (:meth:`CompiledRule.idempotency_key`).
        origin: which rule and event started it.
        context: the trace context of the event, so the job's trace continues the event's.
    """

    rule: str
    spec: JobSpec
    key: str
    origin: JobOrigin
    context: Context | None = None


@dataclass(slots=True)
class Fired:
    """What became of one fire: its job id, whether that job existed already, or the error
    that kept it from being submitted (an input its handler refuses)."""

    job_id: str = ""
    duplicate: bool = False
    error: JobmeshError | None = None


class Firer:
    """Submits fires.

    Args:
        publisher: publishes and waits for every PubAck.
        partitions: how many scheduler partitions queues hash onto.
        schemas: handler input types, checked before a handler job is submitted (None: not).
        stats: counts fires per rule.
        clock: unix time.
    """

    def __init__(
        self,
        publisher: Publisher,
        partitions: int,
        schemas: HandlerSchemas | None,
        stats: RuleStats,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._publisher = publisher
        self._partitions = partitions
        self._schemas = schemas
        self._stats = stats
        self._clock = clock

    async def fire(self, fires: Sequence[Fire]) -> list[Fired]:
        """Submit ``fires`` in one batch.

        Returns:
            One ``Fired`` per fire, in order. A fire whose handler input is refused has
            its error and is not submitted; the rest are.

        Raises:
            Unavailable, Overloaded: the publish failed; nothing may be acknowledged
                upstream (the caller's retry submits the same jobs).
        """
        results = [Fired() for _ in fires]
        outgoing: list[Outgoing] = []
        sent: list[int] = []
        now = self._clock()
        for i, item in enumerate(fires):
            runtime = item.spec.runtime
            if type(runtime) is HandlerRuntime and self._schemas is not None:
                try:
                    await self._schemas.check(runtime, "job.runtime")
                except JobmeshError as exc:
                    results[i].error = exc
                    continue
            job_id = job_id_for(item.key)
            partition = subjects.partition_of(item.spec.queue, self._partitions)
            event = JobSubmitted(
                job_id=job_id,
                partition=partition,
                spec=item.spec,
                idempotency_key=item.key,
                submitted_at=now,
                origin=item.origin,
            )
            results[i].job_id = job_id
            outgoing.append(
                Outgoing(subjects.job_event(partition, subjects.SUBMITTED), event, submit_id(item.key), item.context)
            )
            sent.append(i)
        if outgoing:
            acks = await self._publisher.publish(outgoing)
            for i, ack in zip(sent, acks, strict=True):
                results[i].duplicate = bool(ack.duplicate)
                if not ack.duplicate:
                    self._stats.fired(fires[i].rule, now)
        return results
