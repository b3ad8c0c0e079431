"""Dispatch batch in, JobStarted out: the executor's one consumer handler.

The node's durable consumer reads both its dispatch subject (``JobBound``) and its cancel
subject (``AttemptCancel``), in stream order, so a cancel that follows a dispatch in the
same batch finds the attempt launched.

The handler never waits for a job to finish. For the new attempts of a batch it queues one
JobStarted each and, if any of them runs something (a process, a handler, a container:
anything but a no-op), asks for one node-record put listing them; it returns (so the
runtime acks the batch) once the Started and that record are durable, and only then do
they start. So a crash can never leave an attempt that
ran but is in no record: a restarted executor finds it there and reports it lost. What
happens to each kind of ``JobBound`` is :meth:`~jobmesh.executor.attempts.Attempts.classify`'s
verdict:

- a copy of an attempt this process already has is acked once its Started is durable;
- an attempt an earlier incarnation ran, or ended, is acked without running it (it was
  reported at start, lost or with the end it kept, or its terminal event is durable);
- an attempt whose working directory exists was started by an earlier incarnation whose
  record has expired since: it is reported lost (and what it left running is killed),
  never run a second time under the same attempt number;
- an attempt cancelled before its JobBound came, or older than an attempt of the same job
  running here, is reported failed (``cancelled`` / ``superseded``) without running;
- a JobBound for attempt n+1 of a job whose attempt n runs here stops attempt n
  (``superseded``) and runs n+1.

An ``AttemptCancel`` stops a running attempt (SIGTERM to its process group, SIGKILL after
the grace) and is acked once the attempt's terminal event is durable (until then it is
redelivered every :data:`CANCEL_RECHECK_SECONDS`). One for an attempt not seen yet is
remembered, and redelivered until the JobBound came and was refused, or for at most
:data:`CANCEL_WAIT_DELIVERIES` deliveries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from jobmesh.contract import subjects
from jobmesh.contract.ids import attempt_key, member_event_id
from jobmesh.contract.messages.v1 import AttemptCancel, JobBound, JobStarted, NoopRuntime
from jobmesh.errors import Unavailable
from jobmesh.executor.attempts import Attempts, stop_code
from jobmesh.executor.metrics import ExecutorMetrics
from jobmesh.executor.outcomes import SUPERSEDED
from jobmesh.executor.reporter import Reporter
from jobmesh.runtime.outcomes import ACK, Outcome, Reject, Retry
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.service import Envelope

# A cancel of a running attempt comes back this often until the attempt's end is durable.
CANCEL_RECHECK_SECONDS = 1.0
# A cancel of an attempt whose JobBound has not come is held (redelivered) this many times.
CANCEL_WAIT_DELIVERIES = 30
DISPATCH_MESSAGES = JobBound | AttemptCancel


class RecordPuts(Protocol):
    """What the handler needs of the node record: a put that lists the batch's new attempts."""

    def put_soon(self) -> asyncio.Future[None]:
        """A future that resolves once a record put built after this call is durable."""
        ...


class DispatchHandler:
    """Handles a batch of ``JobBound`` and ``AttemptCancel`` from this node's subjects.

    Args:
        node_id: this node; a message for another node is refused.
        incarnation: this executor process (``JobStarted.incarnation``).
        attempts: this node's attempt register.
        reporter: publishes the Started events.
        record: puts the node record (:class:`~jobmesh.executor.registration.Registration`).
        clock: epoch seconds.
        started_timeout: seconds to wait for the batch's Started and record to be durable
            before giving up on this delivery (the runtime then naks it; the redelivery
            finds the attempts known and waits on the same futures again). Keep it below
            the consumer's ``ack_wait``.
        metrics: the executor's instruments (told the queue of every attempt started).
    """

    def __init__(
        self,
        node_id: str,
        attempts: Attempts,
        reporter: Reporter,
        record: RecordPuts,
        clock: Callable[[], float] = time.time,
        started_timeout: float = 20.0,
        incarnation: str = "",
        metrics: ExecutorMetrics | None = None,
    ) -> None:
        self._metrics = metrics or ExecutorMetrics()
        self._node_id = node_id
        self._incarnation = incarnation
        self._attempts = attempts
        self._reporter = reporter
        self._record = record
        self._clock = clock
        self._started_timeout = started_timeout
        self.duplicates = 0

    async def __call__(self, envelopes: list[Envelope]) -> Sequence[Outcome] | None:
        outcomes: list[Outcome] = []
        started: list[Outgoing] = []
        fresh: list[tuple[JobBound, Envelope, float]] = []
        waits: set[asyncio.Future[None]] = set()
        batch_keys: set[str] = set()
        attempts = self._attempts
        process_attempts = False
        for env in envelopes:
            message = env.message
            if isinstance(message, AttemptCancel):
                if fresh:
                    # Launch what came before it, so the cancel finds those attempts running.
                    process_attempts |= self._launch(started, fresh, waits)
                    started, fresh = [], []
                outcomes.append(self._cancel(message, env))
                continue
            bound: JobBound = message
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
            verdict = attempts.classify(bound, key)
            if verdict != "run":
                self.duplicates += verdict == "duplicate"
                known = attempts.started_future(key)
                if known is not None:
                    waits.add(known)
                elif verdict == "cancelled":
                    reason = attempts.cancel_reason(key)
                    waits.add(attempts.refuse(bound, stop_code(reason), reason, env.context))
                elif verdict == "left_behind":
                    waits.add(await attempts.report_left_behind(bound, env.context))
                elif verdict == "stale":
                    why = "a newer attempt of this job was bound to this node before this one came"
                    waits.add(attempts.refuse(bound, SUPERSEDED, why, env.context))
                # orphaned, ended_before: acked without running (see the module docstring).
                outcomes.append(ACK)
                continue
            batch_keys.add(key)
            now = self._clock()
            started.append(
                Outgoing(
                    subjects.node_event(bound.partition, subjects.STARTED, self._node_id),
                    JobStarted(
                        job_id=bound.job_id,
                        attempt=bound.attempt,
                        partition=bound.partition,
                        node_id=self._node_id,
                        at=now,
                        incarnation=self._incarnation,
                        rank=bound.rank,
                        world_size=bound.world_size,
                    ),
                    # A member's own: the members of a gang share job and attempt.
                    member_event_id(bound.job_id, bound.attempt, subjects.STARTED, bound.rank),
                    env.context,
                ),
            )
            fresh.append((bound, env, now))
            self._metrics.started(key, bound.spec.queue)
            outcomes.append(ACK)
        if fresh:
            process_attempts |= self._launch(started, fresh, waits)
        pending = [w for w in waits if not w.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=self._started_timeout)
            if late:
                what = "JobStarted and the node record" if process_attempts else "JobStarted"
                raise Unavailable(f"{what} not durable within {self._started_timeout:g}s")
        if all(outcome is ACK for outcome in outcomes):
            return None
        return outcomes

    def _launch(
        self, started: list[Outgoing], fresh: list[tuple[JobBound, Envelope, float]], waits: set[asyncio.Future[None]]
    ) -> bool:
        """Queue the Started of ``fresh``, launch them, and put the record if any runs something.

        Returns:
            Whether any of them runs something (is not a no-op).
        """
        # Queued before any attempt runs, so each Started precedes its attempt's log lines
        # and terminal event in the reporter's FIFO.
        durable = self._reporter.emit(started)
        waits.add(durable)
        ready: asyncio.Future[None] | None = None
        for bound, env, now in fresh:
            if not isinstance(bound.spec.runtime, NoopRuntime):
                if ready is None:
                    ready = asyncio.get_running_loop().create_future()
                self._attempts.launch(bound, env.context, now, durable, ready)
            else:
                self._attempts.launch(bound, env.context, now, durable)
        if ready is None:
            return False
        # One put for the whole batch, requested after every lease of it is in the book.
        both = asyncio.gather(durable, self._record.put_soon())
        both.add_done_callback(lambda done: _resolve(ready, done))
        waits.add(ready)
        return True

    def _cancel(self, cancel: AttemptCancel, env: Envelope) -> Outcome:
        if cancel.node_id != self._node_id:
            return Reject("wrong_node", f"AttemptCancel for node {cancel.node_id} arrived at node {self._node_id}")
        state = self._attempts.cancel(cancel.job_id, cancel.attempt, cancel.reason)
        if state == "ended":
            return ACK
        if state == "stopping":
            return Retry(CANCEL_RECHECK_SECONDS, "the attempt is being stopped")
        if env.deliveries >= CANCEL_WAIT_DELIVERIES:
            return ACK  # still remembered; its JobBound is refused if it comes
        return Retry(CANCEL_RECHECK_SECONDS, "the attempt's dispatch has not come yet")


def _resolve(ready: asyncio.Future[None], done: asyncio.Future[tuple[None, None]]) -> None:
    # Only a stop cancels the record put; the attempts then end as drained, without running.
    if not ready.done() and not done.cancelled() and done.exception() is None:
        ready.set_result(None)
