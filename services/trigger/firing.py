"""Firing: the jobs rules decided on become JobSubmitted events, in one batch; the workflow
runs they decided on are started through the workflow API.

Every source (subject events, webhooks, schedules, completions, fired bursts) ends here.
A fire carries the idempotency key its rule derived from the rule, its version and the
event, so a redelivered event, a second replica or a retry after a crash submits the same
job: the Nats-Msg-Id dedupes within the stream's window, and the job id (derived from the
key) makes it the same job after it. Nothing is acknowledged upstream before the batch's
PubAcks are in.

A rule that starts a workflow fires a run the same way: its idempotency key names the run
(``ids.workflow_run_id``), so a redelivered event finds the run it started and publishes its
jobs again, which their ids make no-ops; the fire returns only once the run's record and
every step's PubAck are in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from jobmesh.contract import subjects
from jobmesh.contract.ids import job_id_for, submit_id
from jobmesh.contract.messages.v1 import (
    HandlerRuntime,
    JobOrigin,
    JobSpec,
    JobSubmitted,
    WorkflowRunReply,
    WorkflowSpec,
)
from jobmesh.errors import InvalidMessage, InvalidSpec, JobmeshError
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.tracing import Context
from jobmesh.trigger.handlerschemas import HandlerSchemas
from jobmesh.trigger.rules import WorkflowStart, workflow_error
from jobmesh.trigger.stats import RuleStats

# Workflow runs started at once from one batch: each is a few KV round trips and a publish.
START_CONCURRENCY = 16


class WorkflowStarter(Protocol):
    """What starts a workflow run (``WorkflowApi.start``)."""

    async def start(
        self,
        spec: WorkflowSpec,
        input: Any = None,
        idempotency_key: str = "",
        *,
        origin: JobOrigin | None = None,
        context: Context | None = None,
    ) -> WorkflowRunReply: ...


@dataclass(slots=True)
class Fire:
    """One job a rule decided to submit, or one workflow run it decided to start.

    Attributes:
        rule: the rule's name.
        spec: the job, already checked like a submit (None when ``run`` is given).
        key: its idempotency key (:meth:`CompiledRule.idempotency_key`).
        origin: which rule and event started it.
        context: the trace context of the event, so the job's trace continues the event's.
        run: the workflow run to start instead of a job.
    """

    rule: str
    spec: JobSpec | None
    key: str
    origin: JobOrigin
    context: Context | None = None
    run: WorkflowStart | None = None


@dataclass(slots=True)
class Fired:
    """What became of one fire: its job id (or its workflow run's id), whether it existed
    already, or the error that kept it from being submitted (an input its handler refuses,
    a run its workflow's check refuses)."""

    job_id: str = ""
    duplicate: bool = False
    error: JobmeshError | None = None
    run_id: str = ""


class Firer:
    """Submits fires.

    Args:
        publisher: publishes and waits for every PubAck.
        partitions: how many scheduler partitions queues hash onto.
        schemas: handler input types, checked before a handler job is submitted (None: not).
        stats: counts fires per rule.
        clock: unix time.
        workflows: starts the runs of rules that start a workflow (None: such fires fail,
            which only tests of the plain path do).
    """

    def __init__(
        self,
        publisher: Publisher,
        partitions: int,
        schemas: HandlerSchemas | None,
        stats: RuleStats,
        clock: Callable[[], float] = time.time,
        workflows: WorkflowStarter | None = None,
    ) -> None:
        self._publisher = publisher
        self._partitions = partitions
        self._schemas = schemas
        self._stats = stats
        self._clock = clock
        self.workflows = workflows

    async def fire(self, fires: Sequence[Fire]) -> list[Fired]:
        """Submit ``fires`` in one batch.

        Returns:
            One ``Fired`` per fire, in order. A fire whose handler input is refused, or
            whose workflow run is refused, has its error and is not submitted; the rest are.

        Raises:
            Unavailable, Overloaded: the publish failed; nothing may be acknowledged
                upstream (the caller's retry submits the same jobs and finds the same runs).
        """
        results = [Fired() for _ in fires]
        outgoing: list[Outgoing] = []
        sent: list[int] = []
        runs: list[int] = []
        now = self._clock()
        for i, item in enumerate(fires):
            if item.run is not None:
                runs.append(i)
                continue
            assert item.spec is not None  # a fire is a job or a run
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
                    self._stats.fired(fires[i].rule, now, kind=fires[i].origin.kind)
        if runs:
            await self._start_runs(fires, runs, results, now)
        return results

    async def _start_runs(self, fires: Sequence[Fire], runs: list[int], results: list[Fired], now: float) -> None:
        """Start the workflow runs of ``fires`` at ``runs``, filling in their results.

        Raises:
            Unavailable, Overloaded: a run's record or jobs could not be written (the
                batch's retry starts the same runs: their keys name them).
        """
        limit = asyncio.Semaphore(START_CONCURRENCY)

        async def one(i: int) -> None:
            item = fires[i]
            run = item.run
            assert run is not None
            if self.workflows is None:
                results[i].error = InvalidMessage(f"rule {item.rule}: workflow runs are off here", field="workflow")
                return
            async with limit:
                try:
                    reply = await self.workflows.start(
                        run.spec, run.input, item.key, origin=item.origin, context=item.context
                    )
                except InvalidSpec as exc:
                    # The event lacks what the workflow reads (an ${input...} field): the
                    # event is dead-lettered like a template that fails.
                    results[i].error = workflow_error(str(exc), exc.field or "")
                    return
            results[i].run_id = reply.run.run_id
            results[i].duplicate = reply.duplicate
            if not reply.duplicate:
                self._stats.fired(item.rule, now, kind=item.origin.kind)

        # Every start finishes (or fails) before the batch returns: an error other than a
        # refusal fails the batch, and its retry finds the runs already started.
        outcomes = await asyncio.gather(*(one(i) for i in runs), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
