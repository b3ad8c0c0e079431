"""Dispatch batch in, JobStarted out: the executor's one consumer handler.

The handler never waits for a job to finish. It launches each new attempt as a background
task, queues one JobStarted per attempt, and returns (so the runtime acks the batch) once
every Started of the batch is durable. A JobBound this node has already seen, which is
what a redelivery after a slow ack looks like, is acked without running it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from jobmesh.contract import subjects
from jobmesh.contract.ids import attempt_key, event_id
from jobmesh.contract.messages.v1 import JobBound, JobStarted
from jobmesh.errors import Unavailable
from jobmesh.executor.attempts import Attempts
from jobmesh.executor.reporter import Reporter
from jobmesh.runtime.outcomes import ACK, Outcome, Reject
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.service import Envelope


class DispatchHandler:
    """Handles a batch of ``JobBound`` from this node's dispatch subject.

    Args:
        node_id: this node; a JobBound for another node is refused.
        attempts: this node's attempt register.
        reporter: publishes the Started events.
        clock: epoch seconds.
        started_timeout: seconds to wait for the batch's Started to be durable before
            giving up on this delivery (the runtime then naks it; the redelivery finds the
            attempts already running and waits on the same Started again). Keep it below
            the consumer's ``ack_wait``.
    """

    def __init__(
        self,
        node_id: str,
        attempts: Attempts,
        reporter: Reporter,
        clock: Callable[[], float] = time.time,
        started_timeout: float = 20.0,
    ) -> None:
        self._node_id = node_id
        self._attempts = attempts
        self._reporter = reporter
        self._clock = clock
        self._started_timeout = started_timeout
        self.duplicates = 0

    async def __call__(self, envelopes: list[Envelope]) -> Sequence[Outcome] | None:
        outcomes: list[Outcome] = []
        started: list[Outgoing] = []
        fresh: list[tuple[JobBound, Envelope, float]] = []
        waits: set[asyncio.Future[None]] = set()
        batch_keys: set[str] = set()
        for env in envelopes:
            bound: JobBound = env.message
            if bound.node_id != self._node_id:
                outcomes.append(
                    Reject("wrong_node", f"JobBound for node {bound.node_id} arrived at node {self._node_id}")
                )
                continue
            key = attempt_key(bound.job_id, bound.attempt)
            if key in batch_keys:
                # A copy within this very batch: the first one's Started is awaited below.
                self.duplicates += 1
                outcomes.append(ACK)
                continue
            known = self._attempts.started_future(key)
            if known is not None:
                self.duplicates += 1
                waits.add(known)
                outcomes.append(ACK)
                continue
            batch_keys.add(key)
            now = self._clock()
            started.append(
                Outgoing(
                    subjects.job_event(bound.partition, subjects.STARTED),
                    JobStarted(
                        job_id=bound.job_id,
                        attempt=bound.attempt,
                        partition=bound.partition,
                        node_id=self._node_id,
                        at=now,
                    ),
                    event_id(bound.job_id, bound.attempt, subjects.STARTED),
                    env.context,
                ),
            )
            fresh.append((bound, env, now))
            outcomes.append(ACK)
        if started:
            # Queued before any attempt runs, so each Started precedes its attempt's
            # log lines and terminal event in the reporter's FIFO.
            durable = self._reporter.emit(started)
            waits.add(durable)
            for bound, env, now in fresh:
                self._attempts.launch(bound, env.context, now, durable)
        pending = [w for w in waits if not w.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=self._started_timeout)
            if late:
                raise Unavailable(f"JobStarted not durable within {self._started_timeout:g}s")
        if all(outcome is ACK for outcome in outcomes):
            return None
        return outcomes
