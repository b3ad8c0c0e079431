"""The live stream behind ``GET /api/v1/events``: one NATS subscription, many browsers.

The tracker announces every committed change of a job on ``jobmesh.v1.watch.<job_id>``
(core NATS). The hub subscribes once to all of them and hands each update to every
listener, filtered by job when the listener asked for one job. While anybody listens it
also asks the binder and the schedulers every ``period`` seconds for the nodes and the
queues, and passes them on only when they changed, so a dashboard's node and queue tables
stay current without each browser polling.

A listener that does not keep up is not allowed to hold the hub back: its queue is
bounded, and when it overflows the listener gets one ``resync`` event (reload what you
show) instead of the updates it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import nats.errors
from nats.aio.msg import Msg

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobUpdate
from jobmesh.errors import JobmeshError
from jobmesh.web.views import queues_view

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000  # events one listener may be behind before it must resync
_update_decoder = msgspec.json.Decoder(JobUpdate)


@dataclass(frozen=True)
class LiveEvent:
    """One server-sent event: its ``event:`` name and its JSON ``data:``."""

    kind: str
    data: bytes


@dataclass(eq=False)  # by identity: the hub keeps its listeners in a set
class Listener:
    """One open event stream.

    Attributes:
        job_id: only this job's updates ("" for every job's, and the nodes and queues).
        queue: the events not yet sent.
        overflowed: it fell behind; a ``resync`` is due.
    """

    job_id: str = ""
    queue: asyncio.Queue[LiveEvent] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    overflowed: bool = False

    def offer(self, event: LiveEvent) -> None:
        """Queue ``event``; on overflow drop what is queued and leave one ``resync``."""
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(LiveEvent("resync", b'{"reason":"this stream fell behind"}'))

    async def next(self) -> LiveEvent:
        """The next event to send."""
        event = await self.queue.get()
        if event.kind == "resync":
            self.overflowed = False
        return event


class LiveHub:
    """Fans the cluster's job updates, and snapshots of nodes and queues, out to listeners.

    Args:
        client: a connected client (its NATS connection carries the subscription).
        period: seconds between node and queue snapshots while anybody listens.
    """

    def __init__(self, client: Client, period: float = 2.0) -> None:
        self.client = client
        self.period = period
        self.listeners: set[Listener] = set()
        self._sub: object | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._last: dict[str, bytes] = {}

    async def start(self) -> None:
        """Subscribe to every job's updates and start the snapshot loop."""
        self._sub = await self.client.nc.subscribe(subjects.job_watch("*"), cb=self._on_update)
        self._task = asyncio.create_task(self._snapshots(), name="web-live-snapshots")

    async def stop(self) -> None:
        """Stop the loop and the subscription."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        sub, self._sub = self._sub, None
        if sub is not None and not self.client.nc.is_closed:
            with contextlib.suppress(Exception):  # the connection may be gone already: nothing to undo
                await sub.unsubscribe()  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def listen(self, job_id: str = "") -> Iterator[Listener]:
        """A listener for as long as the ``with`` lasts; it first gets the last snapshots."""
        listener = Listener(job_id=job_id)
        if not job_id:
            for kind, data in self._last.items():
                listener.offer(LiveEvent(kind, data))
        self.listeners.add(listener)
        self._wake.set()
        try:
            yield listener
        finally:
            self.listeners.discard(listener)

    def publish(self, event: LiveEvent, job_id: str = "") -> None:
        """Hand ``event`` to every listener that wants it (``job_id``: the job it is about)."""
        for listener in list(self.listeners):
            if not listener.job_id or listener.job_id == job_id:
                listener.offer(event)

    async def _on_update(self, msg: Msg) -> None:
        try:
            update = _update_decoder.decode(msg.data)
        except msgspec.DecodeError:
            # A newer tracker's message: say which job changed, the page asks for it.
            job_id = msg.subject.rsplit(".", 1)[-1]
            self.publish(LiveEvent("job", msgspec.json.encode({"job_id": job_id})), job_id)
            return
        self.publish(LiveEvent("job", msgspec.json.encode(update)), update.job_id)

    async def _snapshots(self) -> None:
        while True:
            if not any(not listener.job_id for listener in self.listeners):
                self._wake.clear()
                await self._wake.wait()
            await self.snapshot()
            await asyncio.sleep(self.period)

    async def snapshot(self) -> None:
        """Ask for the nodes and the queues once; publish what changed since the last time."""
        for kind, fetch in (("nodes", self._nodes), ("queues", self._queues)):
            try:
                data = await fetch()
            except (JobmeshError, nats.errors.Error) as exc:
                # The binder or the schedulers are down or slow, or NATS is reconnecting: the
                # page keeps what it shows and says why; the next round asks again.
                code = exc.code if isinstance(exc, JobmeshError) else "unavailable"
                data = msgspec.json.encode({"error": code, "message": str(exc) or type(exc).__name__})
            if self._last.get(kind) != data:
                self._last[kind] = data
                self.publish(LiveEvent(kind, data))

    async def _nodes(self) -> bytes:
        return msgspec.json.encode(await self.client.nodes())

    async def _queues(self) -> bytes:
        return msgspec.json.encode(queues_view(await self.client.queues()))
