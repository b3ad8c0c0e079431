"""Batched, ordered, never-lossy publishing of lifecycle events and log lines.

Everything the executor says goes through one :class:`Reporter`: callers queue messages and
move on, and one flusher task publishes whatever is queued, up to ``max_batch`` at a time,
with a single ``Publisher.publish`` call (every PubAck awaited together). There is no timer:
the flusher takes what is there, publishes, and repeats, so at light load a message goes
out at once and at heavy load batches grow by themselves while the previous one is in
flight. That is what lets the Started and Succeeded of a no-op attempt share one flush.

The queue is first in, first out, and a batch is retried until it is durable, so a job's
log lines and its Started event are durable before its terminal event. Callers that need
durability (the dispatch handler before it acks; an attempt before it removes its working
directory) await the future :meth:`Reporter.emit` returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable

import nats.errors

from jobmesh.errors import Overloaded, Unavailable
from jobmesh.runtime.backoff import backoff
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.reconnects import Reconnects

log = logging.getLogger("jobmesh.executor.reporter")


class Reporter:
    """Queues outgoing messages and publishes them in batches, retrying until durable.

    Args:
        publisher: publishes a batch and awaits every PubAck.
        max_batch: most messages in one publish call.
        max_backlog: log lines wait (which stalls the job's pipe, so the job slows down)
            while this many messages are queued; lifecycle events are never held back.
        retry_base: first delay after a failed publish, in seconds; doubles each time
            (jittered, see :func:`jobmesh.runtime.backoff.backoff`).
        retry_max: longest delay between retries.
        on_crash: called if the flusher dies of an unexpected error (a bug); the service
            uses it to stop, because nothing it reports would be published any more.
        reconnects: cuts a retry's wait short when NATS reconnects (the runtime's), so
            what waited out an outage goes the moment the connection is back.
        on_durable: called with every batch once it is durable (the executor's metrics
            record run times there); must not block or raise.
    """

    def __init__(
        self,
        publisher: Publisher,
        *,
        max_batch: int = 512,
        max_backlog: int = 10_000,
        retry_base: float = 0.1,
        retry_max: float = 5.0,
        on_crash: Callable[[BaseException], None] | None = None,
        reconnects: Reconnects | None = None,
        on_durable: Callable[[list[Outgoing]], None] | None = None,
    ) -> None:
        self._reconnects = reconnects or Reconnects()
        self._on_durable = on_durable
        self._publisher = publisher
        self._max_batch = max_batch
        self._max_backlog = max_backlog
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._on_crash = on_crash
        self._queue: deque[Outgoing] = deque()
        # Sequence numbers: how many messages were ever queued, and how many are durable.
        # Flushes are FIFO, so "durable up to N" resolves every waiter with a target <= N.
        self._queued = 0
        self._durable = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task | None = None
        self._failure: str | None = None
        self.published = 0
        self.flushes = 0
        self.retries = 0

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start the flusher task."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="executor-reporter")
            self._task.add_done_callback(self._flusher_done)

    async def close(self, timeout: float) -> None:
        """Publish what is queued (waiting up to ``timeout``), then stop the flusher."""
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            log.error(
                "%d messages were not published within %.0fs of stopping; they are lost "
                "(once this node's heartbeat lapses, the binder declares its attempts lost)",
                self._queued - self._durable,
                timeout,
            )
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, waiter in self._waiters:
            waiter.cancel()
        self._waiters.clear()

    # --- queueing --------------------------------------------------------------------
    def post(self, items: Iterable[Outgoing]) -> None:
        """Queue ``items`` in order, to be published as soon as possible."""
        before = len(self._queue)
        self._queue.extend(items)
        added = len(self._queue) - before
        if added:
            self._queued += added
            self._wake.set()

    def emit(self, items: Iterable[Outgoing]) -> asyncio.Future[None]:
        """Queue ``items`` in order; the future resolves once all of them are durable."""
        self.post(items)
        return self._wait_for(self._queued)

    async def emit_log(self, item: Outgoing) -> None:
        """Queue one log line, first waiting while the backlog is full (backpressure)."""
        while len(self._queue) >= self._max_backlog:
            self._room.clear()
            await self._room.wait()
        self._queue.append(item)
        self._queued += 1
        self._wake.set()

    async def flush(self) -> None:
        """Wait until everything queued so far is durable."""
        await self._wait_for(self._queued)

    def _wait_for(self, target: int) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if target <= self._durable:
            waiter.set_result(None)
        else:
            self._waiters.append((target, waiter))
        return waiter

    # --- health ----------------------------------------------------------------------
    @property
    def backlog(self) -> int:
        """Messages queued and not yet durable."""
        return self._queued - self._durable

    def problem(self) -> str | None:
        """A health-check problem: the last publish failed and the backlog is waiting."""
        if self._task is not None and self._task.done():
            return "reporter stopped: events are no longer published"
        if self._failure is not None:
            return f"cannot publish events ({self.backlog} waiting): {self._failure}"
        return None

    # --- the flusher -----------------------------------------------------------------
    async def _run(self) -> None:
        queue = self._queue
        while True:
            while not queue:
                self._wake.clear()
                await self._wake.wait()
            batch = [queue.popleft() for _ in range(min(len(queue), self._max_batch))]
            await self._publish(batch)
            if self._on_durable is not None:
                try:
                    self._on_durable(batch)
                except Exception:  # bookkeeping must never stop the flusher
                    log.exception("the reporter's on_durable hook failed; the batch is durable anyway")
            self._durable += len(batch)
            self.published += len(batch)
            self.flushes += 1
            waiters = self._waiters
            while waiters and waiters[0][0] <= self._durable:
                _, waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
            if len(queue) < self._max_backlog // 2:
                self._room.set()

    async def _publish(self, batch: list[Outgoing]) -> None:
        """Publish one batch, retrying with backoff until every message is durable.

        Re-publishing is safe: every message has a deterministic Nats-Msg-Id, so the
        stream drops the copies of those that made it the first time.
        """
        tries = 0
        while True:
            try:
                await self._publisher.publish(batch)
            except (Unavailable, Overloaded) as exc:
                reason = f"{exc.code}: {exc}"
            except nats.errors.Error as exc:
                # Reconnecting, stalled or closed: the same as unavailable for our purpose.
                reason = f"unavailable: {type(exc).__name__}: {exc}"
            else:
                if self._failure is not None:
                    log.info("publishing works again after %d retries", self.retries)
                self._failure = None
                return
            self._failure = reason
            self.retries += 1
            tries += 1
            # Keyed by the batch's first message id, so executors that failed together
            # (the same outage) do not all retry in step.
            delay = backoff(tries, base=self._retry_base, cap=self._retry_max, key=batch[0].msg_id)
            log.warning("could not publish %d messages (%s); retrying in %.1fs", len(batch), reason, delay)
            await self._reconnects.pause(delay)

    def _flusher_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("the reporter's flusher crashed", exc_info=exc)
            if self._on_crash is not None:
                self._on_crash(exc)
