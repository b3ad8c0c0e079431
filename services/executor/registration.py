"""This node's record in KV ``jm_nodes``: registration, heartbeat, lease renewal, deregistration.

One task writes the record. It puts it every ``heartbeat_seconds`` and, in between, whenever
somebody asks for a put (:meth:`Registration.put_soon`: a dispatch batch whose new attempts
must be in the record before they run). Requests that come while a put is in flight are all
answered by the next one, so a burst of batches costs one put per flight, not one per batch,
and puts never overtake each other.

Each put carries the node's facts, its ``incarnation``, ``draining``, and the leases of the
:class:`~jobmesh.executor.leases.LeaseBook` (running and recently ended attempts). The
bucket's TTL is the node lease: if the puts stop, the record vanishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from jobmesh.contract.messages.v1 import NodeInfo
from jobmesh.errors import Unavailable
from jobmesh.executor.leases import LeaseBook, fit_record
from jobmesh.runtime.backoff import backoff

log = logging.getLogger("jobmesh.executor.registration")

# How often the writer looks at whether the runtime began stopping, so the node is marked
# draining within this long of SIGTERM (the runtime has no stop hook before on_stop).
STOP_POLL_SECONDS = 0.2
_decoder = msgspec.json.Decoder(NodeInfo)


class Registration:
    """This node's record in KV ``jm_nodes``; its puts renew the node's and its attempts' leases.

    Args:
        kv: the ``jm_nodes`` bucket.
        info: the node record; ``heartbeat_at``, ``draining``, ``attempts`` and ``ended``
            are filled in per put.
        leases: the attempts the record lists.
        interval: seconds between heartbeats.
        clock: epoch seconds.
    """

    def __init__(
        self,
        kv: KeyValue,
        info: NodeInfo,
        leases: LeaseBook,
        interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._kv = kv
        self._info = info
        self._leases = leases
        self._interval = interval
        self._clock = clock
        self._draining = False
        self._failure: str | None = None
        self._failures = 0
        # Futures of put requests not yet answered by a durable put built after them.
        self._requests: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._writing = False  # the writer task (run) is running
        self.beats = 0

    @property
    def node_id(self) -> str:
        return self._info.node_id

    @property
    def incarnation(self) -> str:
        return self._info.incarnation

    @property
    def draining(self) -> bool:
        return self._draining

    async def read_previous(self) -> NodeInfo | None:
        """The record as it is before this process's first put (that of an earlier process).

        Returns:
            The record, or None when there is none (or it cannot be read as one).

        Raises:
            Unavailable: when KV does not answer.
        """
        try:
            entry = await asyncio.wait_for(self._kv.get(self.node_id), 10.0)
        except KeyNotFoundError:
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise Unavailable(f"cannot read the record of node {self.node_id}: {exc}") from exc
        if not entry.value:
            return None
        try:
            return _decoder.decode(entry.value)
        except msgspec.DecodeError as exc:
            log.warning("the previous record of node %s is not a node record (%s); ignoring it", self.node_id, exc)
            return None

    async def register(self) -> None:
        """The first put; the node is not ready until it is visible.

        Raises:
            Unavailable: when the record cannot be written.
        """
        if not await self.beat():
            raise Unavailable(f"cannot register node {self.node_id}: {self._failure}")

    def put_soon(self) -> asyncio.Future[None]:
        """Ask for a put now; the future resolves once a put built after this call is durable.

        A failed put is retried (with backoff) until one succeeds; the future never fails,
        it is only cancelled when the writer stops.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._requests.append(future)
        self._wake.set()
        return future

    async def beat(self) -> bool:
        """Put the record now with a fresh ``heartbeat_at``. Returns False when that failed."""
        now = self._clock()
        attempts, ended = self._leases.snapshot(now)
        info = msgspec.structs.replace(
            self._info, heartbeat_at=now, draining=self._draining, attempts=attempts, ended=ended
        )
        try:
            # A put slower than a heartbeat interval is as good as failed: the next one is due.
            await asyncio.wait_for(self._kv.put(self.node_id, fit_record(info)), max(self._interval, 1.0))
        except (TimeoutError, nats.errors.Error) as exc:
            self._failure = f"{type(exc).__name__}: {exc}"
            self._failures += 1
            log.warning("heartbeat of node %s failed: %s", self.node_id, self._failure)
            return False
        self._failure = None
        self._failures = 0
        self.beats += 1
        return True

    async def mark_draining(self, timeout: float = 5.0) -> None:
        """Advertise that this node takes no new work (binders skip draining nodes).

        Args:
            timeout: how long to wait for the put that says so.
        """
        if self._draining:
            return
        self._draining = True
        if not self._writing:
            await self.beat()
            return
        try:
            # Through the writer, so that two puts are never in flight at once.
            await asyncio.wait_for(asyncio.shield(self.put_soon()), timeout)
        except TimeoutError:
            log.warning("node %s: the put marking it draining did not succeed within %.0fs", self.node_id, timeout)

    async def deregister(self) -> None:
        """Delete the record; if that fails the TTL removes it soon enough."""
        try:
            await asyncio.wait_for(self._kv.delete(self.node_id), 5.0)
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("could not delete node record %s (it expires with the TTL): %s", self.node_id, exc)

    async def run(self, stop_requested: Callable[[], bool], on_stop_requested: Callable[[], object]) -> None:
        """Heartbeat and answer put requests until cancelled; mark draining as soon as a stop begins.

        Args:
            stop_requested: whether the service began stopping.
            on_stop_requested: called once when it did.
        """
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self._interval
        retry_at = 0.0  # after a failed put, requests wait until then too
        self._writing = True
        try:
            while True:
                if not self._draining and stop_requested():
                    on_stop_requested()
                    self._draining = True
                    next_beat = loop.time()
                now = loop.time()
                if now >= next_beat or (self._requests and now >= retry_at):
                    answered, self._requests = self._requests, []
                    if await self.beat():
                        for future in answered:
                            if not future.done():
                                future.set_result(None)
                        next_beat = loop.time() + self._interval
                        retry_at = 0.0
                    else:
                        # Still owed: the next put answers them. While KV keeps failing the
                        # pause grows, but never past a heartbeat interval.
                        self._requests = answered + self._requests
                        pause = backoff(self._failures, base=0.1, cap=self._interval, key=self.node_id)
                        next_beat = retry_at = loop.time() + pause
                    continue
                wake_at = max(retry_at, now) if self._requests else next_beat
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, min(STOP_POLL_SECONDS, wake_at - now)))
                except TimeoutError:
                    pass
        finally:
            self._writing = False
            for future in self._requests:
                future.cancel()
            self._requests = []

    def problem(self) -> str | None:
        """A health-check problem: the last heartbeat put failed."""
        if self._failure is not None:
            return f"heartbeat of node {self.node_id} failed: {self._failure}"
        return None
