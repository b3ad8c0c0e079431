"""A continuous pull consumer: keeps pull requests outstanding and yields batches.

Why not ``PullSubscription.fetch``: once its first no-wait probe finds nothing, nats-py's
fetch waits for the whole batch (or the timeout) before returning, so at light load every
message waits for the timeout. This class speaks the documented JetStream pull protocol
(``$JS.API.CONSUMER.MSG.NEXT``) instead: it keeps up to ``batch`` messages requested, hands
over whatever has arrived as soon as anything has, and re-requests when half is consumed,
so a busy consumer gets full batches and an idle one gets each message at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("jobmesh.runtime.pull")

_STATUS = "Status"
_PENDING = "Nats-Pending-Messages"


class PullConsumer:
    """Batches from one durable consumer.

    Args:
        nc: a connected client.
        stream: stream name.
        durable: durable consumer name (must exist).
        batch: most messages handed over at once, and most requested ahead.
        expires: seconds each pull request lives on the server.
    """

    def __init__(self, nc: NATS, stream: str, durable: str, batch: int, expires: float = 5.0) -> None:
        self._nc = nc
        self.durable = durable
        self.stopped = False  # set by the runtime to end this consumer's loop
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._batch = batch
        self._expires = expires
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._requested = 0  # asked for and neither delivered nor expired
        self._last_request = 0.0
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._refill: asyncio.Future[None] | None = None
        self._last_status = ""
        self._closed = False

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)
        await self._top_up()

    async def close(self) -> None:
        """Stop pulling, and give back what was pulled but not handed over yet, so another
        replica (or the next owner of a partition) gets it now rather than after ack_wait."""
        self._closed = True
        while not self._queue.empty():
            msg = self._queue.get_nowait()
            try:
                await msg.nak()
            except Exception:  # noqa: BLE001 - connection gone: ack_wait will redeliver it
                break
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - closing a dead connection is not an error
                pass

    def reconnected(self) -> None:
        """The connection came back: requests pending on the old server died with it, so
        ask again now rather than after their expiry (which would stall this consumer for
        seconds after every reconnect)."""
        self._requested = 0
        self._last_request = 0.0
        self._refill = asyncio.ensure_future(self._top_up())  # kept: a task must not vanish

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers and not msg.reply else None
        if status:
            if status in ("404", "408", "409"):
                # The request ended; the header says how many of its messages never came.
                unfilled = msg.headers.get(_PENDING) if msg.headers else None
                self._requested = max(0, self._requested - int(unfilled)) if unfilled else 0
            elif status != "100":  # 100 is an idle heartbeat: nothing to do
                # 503 and the like: the request reached no consumer (JetStream recovering
                # after a restart, say). Forget it; the next round (within a second) asks again.
                self._requested = 0
                if status != self._last_status:
                    said = (msg.headers or {}).get("Description", "")
                    log.warning("%s: pull request answered %s %s", self.durable, status, said)
                self._last_status = status
                return
            self._last_status = status
            await self._top_up()
            return
        self._requested = max(0, self._requested - 1)
        self._queue.put_nowait(msg)

    async def _top_up(self) -> None:
        if self._closed or not self._nc.is_connected:
            return
        want = self._batch - self._requested - self._queue.qsize()
        if want < max(1, self._batch // 2):
            return
        self._requested += want
        self._last_request = time.monotonic()
        body = {"batch": want, "expires": int(self._expires * 1e9)}
        await self._nc.publish(self._api, json.dumps(body).encode(), reply=self._inbox)

    async def next_batch(self, timeout: float) -> list[Msg]:
        """Wait up to ``timeout`` for at least one message; return all that are ready."""
        try:
            first = await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            # A request can vanish without a status (reconnect, server restart); after
            # its expiry has surely passed, forget it and ask again.
            if time.monotonic() - self._last_request > self._expires + 1.0:
                self._requested = 0
            await self._top_up()
            return []
        batch = [first]
        while len(batch) < self._batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        await self._top_up()
        return batch
