"""Following one job until it is final, for ``run`` and ``watch``.

States come from the tracker: its watch subject announces each committed change
(core NATS, which may drop one), and a poll of the tracker fills in when the watch has
been quiet for a while. What the running attempt reports about itself (progress, a
message) comes from the record of the node that runs it: a KV watch of that node's key in
``jm_nodes``, whose every heartbeat renews the attempt's lease. The follower shows each new
state once, never one that goes back, and returns when the tracker says the job is final,
never on a state alone (a failed attempt may be retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
from nats.aio.msg import Msg

from jobmesh.client import jobstate
from jobmesh.client.cli.display import Display
from jobmesh.client.client import Client
from jobmesh.client.jobstate import Progress, Seen
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobUpdate, JobView, NodeInfo
from jobmesh.errors import NotFound

__all__ = ["POLL_SECONDS", "Follower"]

# Ask the tracker itself when the watch has brought no state for this long.
POLL_SECONDS = 2.0

_update_decoder = msgspec.json.Decoder(JobUpdate)
_node_decoder = msgspec.json.Decoder(NodeInfo)


class Follower:
    """Shows one job's states and progress on a display until the job is final.

    Args:
        client: a connected client.
        job_id: the job to follow.
        display: where to show what is learnt.
        resolve: turns a tracker view into the state a person should see (asks the
            scheduler why a held job waits).
        poll_seconds: how long the watch may be quiet before the tracker is asked.
        clock: monotonic seconds, for the elapsed times shown.
    """

    def __init__(
        self,
        client: Client,
        job_id: str,
        display: Display,
        resolve: Callable[[JobView], Awaitable[Seen]],
        poll_seconds: float = POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.job_id = job_id
        self.display = display
        self.resolve = resolve
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.started = clock()
        self._items: asyncio.Queue[JobUpdate | Progress] = asyncio.Queue()
        self._lease_of: tuple[str, int] | None = None  # (node, attempt) whose lease is watched
        self._lease_task: asyncio.Task[None] | None = None

    async def subscribe(self) -> None:
        """Start listening to the tracker's announcements; call before the job can change."""

        async def on_update(msg: Msg) -> None:
            with contextlib.suppress(msgspec.DecodeError):  # a newer tracker's message; the poll covers it
                self._items.put_nowait(_update_decoder.decode(msg.data))

        await self.client.nc.subscribe(subjects.job_watch(self.job_id), cb=on_update)
        await self.client.nc.flush()

    async def run(self, first: Seen | None = None) -> Seen:
        """Show the job until it is final.

        Args:
            first: the state already known (``watch`` reads the view first), if any.

        Returns:
            The final state.
        """
        shown: Seen | None = None
        last_progress: Progress | None = None
        next_poll = self.clock() + self.poll_seconds
        pending: list[Seen] = [first] if first is not None else []
        try:
            while True:
                if pending:
                    seen = pending.pop()
                else:
                    item = await self._next(next_poll - self.clock())
                    if isinstance(item, Progress):
                        if shown is not None and item.attempt == shown.attempt and item != last_progress:
                            self.display.progress(self.clock() - self.started, item)
                            last_progress = item
                        continue
                    next_poll = self.clock() + self.poll_seconds
                    if item is None:
                        try:
                            seen = await self.resolve(await self.client.get(self.job_id))
                        except NotFound:
                            continue  # the tracker has not recorded the submission yet
                    else:
                        seen = jobstate.seen_in_update(item)
                if jobstate.goes_back(shown, seen):
                    continue  # a poll that raced the watch brought an older state
                if seen != shown:
                    self.display.state(self.clock() - self.started, seen)
                    shown = seen
                    self._watch_lease(seen)
                if jobstate.is_final(seen):
                    return seen
        finally:
            await self._stop_lease()

    async def _next(self, wait: float) -> JobUpdate | Progress | None:
        """The next thing learnt, None when nothing came within ``wait`` seconds."""
        try:
            return await asyncio.wait_for(self._items.get(), max(0.0, wait))
        except TimeoutError:
            return None

    def _watch_lease(self, seen: Seen) -> None:
        """Watch the record of the node that holds the attempt, while one does."""
        on_node = seen.state in jobstate.ON_A_NODE and bool(seen.node_id) and not seen.final
        want = (seen.node_id, seen.attempt) if on_node else None
        if want == self._lease_of:
            return
        if self._lease_task is not None:
            self._lease_task.cancel()
            self._lease_task = None
        self._lease_of = want
        if want is not None:
            self._lease_task = asyncio.ensure_future(self._lease_updates(*want))

    async def _stop_lease(self) -> None:
        task, self._lease_task, self._lease_of = self._lease_task, None, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _lease_updates(self, node_id: str, attempt: int) -> None:
        """Queue each new progress report of ``attempt`` found in ``node_id``'s record."""
        try:
            kv = await self.client.nc.jetstream(timeout=self.client.timeout).key_value(subjects.KV_NODES)
            watcher = await kv.watch(node_id)
        except nats.errors.Error:
            return  # no progress to show; the states still come
        last: Progress | None = None
        try:
            async for entry in watcher:
                if entry is None or entry.operation or not entry.value:
                    continue  # the end of the initial values, or the record expired
                try:
                    record = _node_decoder.decode(entry.value)
                except msgspec.DecodeError:
                    continue
                progress = jobstate.progress_in(record, self.job_id, attempt)
                if progress is None or progress == last or (progress.fraction is None and not progress.message):
                    continue
                last = progress
                self._items.put_nowait(progress)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await watcher.stop()
