"""Waits on NATS that a reconnect makes hopeless are given up at once.

A request or publish sent just before the connection dropped gets no answer after the
reconnect when the server restarted: its PubAck or reply is gone with the old server. Left
alone, the batch that waits for it holds its consumer for the whole request timeout
(10 s), and the binder binds and releases nothing meanwhile. So a handler's waits on NATS
are guarded: when the connection is re-established while one is in progress, it is
cancelled and the batch is handed back (``Unavailable``), to be redelivered in moments.
Every consumer's effects are idempotent on redelivery (message ids, upserts, compare-and-
set), so giving a batch back is always safe. The runtime owns one instance: its
publisher guards every wait for PubAcks with it, and services guard their own waits
(the binder's KV reads and writes) with ``Runtime.reconnects``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from jobmesh.errors import Unavailable

T = TypeVar("T")


class Reconnects:
    """Counts reconnects and cuts short the waits that began before the latest one.

    A guarded wait runs inside an ``asyncio.timeout`` scope with no deadline; a reconnect
    moves every open scope's deadline to now, which cancels the wait where it stands. No
    task is made per wait, so guarding costs the hot path nothing measurable.
    """

    def __init__(self) -> None:
        self._changed = asyncio.Event()  # set by the next reconnect, then replaced
        self._scopes: set[asyncio.Timeout] = set()
        self.count = 0

    def reconnected(self) -> None:
        """Call after every reconnect (a ``Runtime.on_reconnect`` hook)."""
        self.count += 1
        self._changed.set()
        self._changed = asyncio.Event()
        if self._scopes:
            now = asyncio.get_running_loop().time()
            for scope in self._scopes:
                scope.reschedule(now)

    async def pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if NATS reconnects first: a retry that waits out
        an outage should go the moment the connection is back, not at its next backoff."""
        try:
            await asyncio.wait_for(self._changed.wait(), delay)
        except TimeoutError:
            pass

    async def guard(self, work: Awaitable[T], what: str) -> T:
        """Await ``work`` unless NATS reconnects first.

        Args:
            work: the wait on NATS (a publish, a KV read or write).
            what: what it does, for the error.

        Returns:
            ``work``'s result.

        Raises:
            Unavailable: NATS reconnected before ``work`` finished (it was cancelled).
        """
        scope = asyncio.timeout(None)
        try:
            async with scope:
                self._scopes.add(scope)
                try:
                    return await work
                finally:
                    self._scopes.discard(scope)
        except TimeoutError:
            if scope.expired():
                raise Unavailable(f"NATS reconnected while {what}; the batch is handed back to try again") from None
            raise  # a timeout of the work itself
