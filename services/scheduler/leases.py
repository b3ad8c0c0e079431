"""Partition ownership: one active scheduler per partition, by lease in KV.

A lease is a key ``partition.<n>`` in ``jm_leases``, whose bucket TTL equals the lease TTL.
Every instance beats six times per TTL, all partitions at once, each call bounded by a
quarter of the TTL. The owner renews its keys with compare-and-set. A renewal refused
because the revision moved means someone else holds the partition: the owner lets go at
once. A renewal that fails for another reason (NATS slow or away) keeps the partition only
while the lease surely still holds; past 0.8 TTL since the last successful renewal the
owner lets go (self-fencing), because a standby may own it by then. A standby tries to
create missing keys, so it takes over at most a TTL (plus one beat) after the owner's last
renewal. A graceful stop deletes the keys, so a standby takes over at its next beat.

Partitions are spread over the live instances: each one keeps a ``member.<instance>`` key
alive in the same bucket, and holds at most ``ceil(partitions / live members)``
partitions. One that holds more stops serving the extra ones and deletes their keys; one
that holds fewer creates keys that are free. So two schedulers each serve half, and the
death of one stalls only its half, for about a lease TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError

from jobmesh.contract import subjects

log = logging.getLogger("jobmesh.scheduler.leases")

# A renewal that failed for a reason other than a lost race keeps the partition only while
# less than this fraction of the TTL has passed since the last successful renewal began.
SAFE_FRACTION = 0.8


def fair_share(partitions: int, members: int) -> int:
    """How many partitions one of ``members`` live schedulers may hold: so that one death
    stalls only its share of the queues."""
    return -(-partitions // max(1, members))


def still_ours(now: float, renewed_at: float, ttl: float) -> bool:
    """Whether a lease whose renewal just failed (NATS slow or away) surely still holds.

    The server accepted the last renewal at some moment after ``renewed_at`` (when the
    call began), so the lease lasts at least until ``renewed_at + ttl``. Keeping a margin
    (``SAFE_FRACTION``) covers clock drift and the call in flight: past it, a standby may
    own the partition, and serving it would risk two owners (self-fencing).

    Args:
        now: the current monotonic time.
        renewed_at: monotonic time at which the last successful renewal began.
        ttl: the lease TTL.
    """
    return now - renewed_at < ttl * SAFE_FRACTION


class Leases:
    """Acquire, renew and release partition leases.

    Args:
        js: the JetStream context.
        instance: this process's unique name (the lease value).
        partitions: how many partitions exist.
        ttl: the lease TTL (the bucket's max age).
        gained: awaited when a partition becomes ours.
        lost: awaited when a partition stops being ours.
        clock: monotonic seconds (injected for tests).
    """

    def __init__(
        self,
        js: JetStreamContext,
        instance: str,
        partitions: int,
        ttl: float,
        gained: Callable[[int], Awaitable[None]],
        lost: Callable[[int], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._js = js
        self._instance = instance.encode()
        self._partitions = partitions
        self._ttl = ttl
        self._gained = gained
        self._lost = lost
        self.owned: dict[int, int] = {}  # partition -> revision of our lease record
        self._renewed: dict[int, float] = {}  # partition -> monotonic time of the last renewal
        self._taking: dict[int, asyncio.Task] = {}  # take-overs in progress
        self.last_beat = 0.0
        self._members: dict[str, float] = {}  # live scheduler instances -> when last heard
        self._members_task: asyncio.Future[None] | None = None
        self._member_key = subjects.member_key(instance)

    async def run(self) -> None:
        """Beat forever (a background task)."""
        kv = await self._js.key_value(subjects.KV_LEASES)
        # The bucket's max age is the real lease TTL (it was fixed when the bucket was made);
        # beat by it even if this process was configured with another value.
        actual = (await kv.status()).ttl
        if actual and abs(actual - self._ttl) > 0.01:
            log.warning("lease bucket TTL is %.1fs, not the configured %.1fs; using the bucket's", actual, self._ttl)
            self._ttl = actual
        self._members_task = asyncio.ensure_future(self._watch_members(kv))
        try:
            while True:
                if self._members_task.done():
                    # The watch ended (a reconnect made it restart, or it failed): read its
                    # outcome and follow the members afresh.
                    if not self._members_task.cancelled() and self._members_task.exception() is not None:
                        log.warning("member watch ended: %s", self._members_task.exception())
                    self._members_task = asyncio.ensure_future(self._watch_members(kv))
                await self._announce(kv)
                share = fair_share(self._partitions, len(self.live_members()))
                await self._give_back_extra(kv, share)
                free_slots = max(0, share - len(self.owned))
                await asyncio.gather(
                    *(self._beat(kv, partition, may_take=free_slots > 0) for partition in range(self._partitions))
                )
                self.last_beat = self._clock()
                await asyncio.sleep(self._ttl / 6)
        finally:
            self._members_task.cancel()

    def reconnected(self) -> None:
        """NATS reconnected: a KV watch can lag for long after that, so follow the members
        afresh (at the next beat); until then the last known members count."""
        if self._members_task is not None:
            self._members_task.cancel()

    def live_members(self) -> list[str]:
        """Scheduler instances heard from within a lease TTL (this one always counts)."""
        now = self._clock()
        live = {name for name, at in self._members.items() if now - at < self._ttl}
        live.add(self._member_key.removeprefix("member."))
        return sorted(live)

    async def _announce(self, kv: Any) -> None:
        try:
            await asyncio.wait_for(kv.put(self._member_key, self._instance), self._ttl / 4)
        except (TimeoutError, APIError, nats.errors.Error):
            log.debug("could not announce this scheduler instance", exc_info=True)

    async def _watch_members(self, kv: Any) -> None:
        """Follow the member keys: a put is a sign of life, a delete a graceful goodbye.

        A member that dies sends nothing: its key expires with the bucket's TTL, which no
        watch reports, so liveness is judged by when it was last heard from.
        """
        watcher = await kv.watch(subjects.MEMBERS)
        async for entry in watcher:
            if entry is None:
                continue
            name = entry.key.removeprefix("member.")
            if entry.operation in ("DEL", "PURGE"):
                self._members.pop(name, None)
            else:
                self._members[name] = self._clock()

    async def _give_back_extra(self, kv: Any, share: int) -> None:
        """Hold no more than a fair share: stop serving the extra partitions first, then
        delete their lease keys so an instance with fewer takes them at its next beat."""
        extra = sorted(self.owned, reverse=True)[: max(0, len(self.owned) - share)]
        for partition in extra:
            if partition in self._taking:
                continue  # still loading: give it back once it serves
            log.info("giving partition %d back: %d live schedulers share %d partitions", partition,
                     len(self.live_members()), self._partitions)  # fmt: skip
            await self._lost(partition)
            await self._drop(kv, partition)

    async def _beat(self, kv: Any, partition: int, may_take: bool = True) -> None:
        key = subjects.lease_key(partition)
        limit = self._ttl / 4  # a hung call must not outlive the lease it is renewing
        if partition in self.owned:
            started = self._clock()
            try:
                self.owned[partition] = await asyncio.wait_for(
                    kv.update(key, self._instance, last=self.owned[partition]), limit
                )
                # The server accepted it at some moment after ``started``: count from there.
                self._renewed[partition] = started
                return
            except KeyWrongLastSequenceError:
                if await self._still_mine(kv, key, partition, started, limit):
                    return
                log.warning("lost the lease of partition %d to another instance", partition)
            except KeyNotFoundError:
                log.warning("lost the lease of partition %d to another instance", partition)
            except (TimeoutError, APIError, nats.errors.Error):
                # Cannot tell whether the lease still holds. Keep serving while it surely
                # does; once it may have expired, stop, because a standby may own it now.
                if still_ours(self._clock(), self._renewed.get(partition, started), self._ttl):
                    log.warning("could not renew the lease of partition %d; will retry", partition, exc_info=True)
                    return
                log.warning("could not renew the lease of partition %d in time; letting it go", partition)
            self.owned.pop(partition, None)
            self._renewed.pop(partition, None)
            taking = self._taking.pop(partition, None)
            if taking is not None:
                taking.cancel()
            await self._lost(partition)
            return
        if not may_take:
            return  # a fair share is held already: leave free partitions to the others
        started = self._clock()
        try:
            revision = await asyncio.wait_for(kv.create(key, self._instance), limit)
        except (TimeoutError, KeyWrongLastSequenceError, APIError, nats.errors.Error):
            return  # another instance owns it, or NATS is away: try at the next beat
        self.owned[partition] = revision
        self._renewed[partition] = started
        log.info("took the lease of partition %d", partition)
        # Loading a big backlog takes a while; the beats (of this and every other lease)
        # must go on meanwhile, so the take-over runs beside them.
        task = asyncio.ensure_future(self._take(kv, partition))
        self._taking[partition] = task
        task.add_done_callback(lambda _t: self._taking.pop(partition, None))

    async def _still_mine(self, kv: Any, key: str, partition: int, started: float, limit: float) -> bool:
        """A renewal was refused for its revision: is the key nevertheless ours?

        A NATS server killed without a clean stop can come back without the last writes it
        acknowledged, our latest renewal among them: the key then holds our name at an
        older revision. Nobody else wrote it, so it is still ours: adopt that revision
        rather than give the partition up and take it over again (a reload of its backlog).
        """
        try:
            entry = await asyncio.wait_for(kv.get(key), limit)
            if entry.value != self._instance or entry.revision is None:
                return False
            self.owned[partition] = await asyncio.wait_for(kv.update(key, self._instance, last=entry.revision), limit)
        except (KeyWrongLastSequenceError, KeyNotFoundError, TimeoutError, APIError, nats.errors.Error):
            return False
        self._renewed[partition] = started
        log.info("lease of partition %d: the server had an older revision of our own record; kept it", partition)
        return True

    async def _take(self, kv, partition: int) -> None:
        try:
            await self._gained(partition)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Could not start serving it (Postgres down?): give it back for someone else.
            log.exception("could not take over partition %d; releasing its lease", partition)
            await self._lost(partition)
            await self._drop(kv, partition)

    async def release_all(self) -> None:
        """Delete our leases (graceful stop) so a standby takes over without waiting."""
        kv = await self._js.key_value(subjects.KV_LEASES)
        for partition in list(self.owned):
            await self._drop(kv, partition)
        try:
            await kv.delete(self._member_key)
        except (KeyNotFoundError, APIError, nats.errors.Error, TimeoutError):
            pass  # the TTL forgets this member soon enough

    async def _drop(self, kv, partition: int) -> None:
        revision = self.owned.pop(partition, None)
        self._renewed.pop(partition, None)
        try:
            await kv.delete(subjects.lease_key(partition), last=revision)
        except (TimeoutError, KeyWrongLastSequenceError, KeyNotFoundError, APIError, nats.errors.Error):
            pass  # already someone else's, gone, or NATS away: the TTL will free it

    def healthy(self) -> str | None:
        """A problem when lease beats stopped (NATS unreachable for longer than a beat)."""
        if self.last_beat and self._clock() - self.last_beat > self._ttl:
            return "lease renewals are late"
        return None
