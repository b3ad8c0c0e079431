"""The binder's view of the ``jm_alloc`` KV bucket, and compare-and-set writes to it.

Every binder replica watches the bucket, so its cache is almost always current; the
compare-and-set on the record's revision catches the rest: a write based on a stale
revision is refused by the server, the record is re-read and the change is recomputed.

A cache can only prove that a reservation exists, never that it is gone: a write another
replica made a moment ago, or many seconds of writes after a NATS reconnect, may not have
arrived yet. So "nothing to remove" is decided from a record read from the server
(:meth:`Allocations.remove`), and the watch is started afresh after every reconnect
(:meth:`Allocations.restart`); until its initial values are in, the view is not
:attr:`~Allocations.fresh` and the binder binds nothing on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from jobmesh.binder.allocation import without
from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import Allocation
from jobmesh.errors import Conflict, Unavailable
from jobmesh.runtime.kvwatch import bucket_keys, watch_forever

log = logging.getLogger("jobmesh.binder")

_decoder = msgspec.json.Decoder(Allocation)
T = TypeVar("T")
CAS_TRIES = 8
Record = tuple[Allocation, int]  # an allocation record and its KV revision


class Allocations:
    """Cached allocation records with their KV revisions.

    Args:
        js: the JetStream context.
        monotonic: returns monotonic seconds (for :attr:`fresh_since`).
    """

    def __init__(self, js: JetStreamContext, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._js = js
        self._monotonic = monotonic
        self._kv: KeyValue | None = None
        self.records: dict[str, Record] = {}
        self._holder: dict[str, str] = {}  # reservation key -> node holding it
        # Keys held on more nodes than that one: a gang's members (one per node), or a
        # duplicate delivery's room. Rare, so a plain key costs no set.
        self._extra: dict[str, set[str]] = {}
        # One writer per node record at a time in this process: the binder's consumers
        # (bindings, releases) edit the same records concurrently, and two edits from one
        # cached revision would make one of them lose its compare-and-set, costing a
        # re-read of the whole record and a second write. Other replicas still race by CAS.
        # A writer that meets a NATS timeout holds its node's lock that long: the others
        # for that node wait behind it (their batches keep sending in-progress acks).
        self._writing: dict[str, asyncio.Lock] = {}
        self._ready = asyncio.Event()
        self._fresh_event = asyncio.Event()
        self._restart = asyncio.Event()
        self.fresh = False  # the current watch has delivered every record the bucket held
        self.fresh_since = 0.0  # monotonic time it became so (0 while not fresh)
        self._generation = 0  # counts restarts: a watch from before one says nothing about freshness

    async def open(self) -> None:
        """Bind to the ``jm_alloc`` bucket (provisioned by the runtime)."""
        self._kv = await self._js.key_value(subjects.KV_ALLOC)

    @property
    def kv(self) -> KeyValue:
        """The ``jm_alloc`` bucket (after :meth:`open`)."""
        if self._kv is None:
            raise Unavailable("the allocation bucket is not open yet (Allocations.open first)")
        return self._kv

    def snapshot(self) -> dict[str, Allocation]:
        """The cached record of every node (the planning input)."""
        return {node: alloc for node, (alloc, _) in self.records.items()}

    def holder(self, key: str) -> str | None:
        """The node that holds reservation ``key`` (``job_id:attempt``), as far as we know
        (one of them, when several do: see :meth:`holders`)."""
        return self._holder.get(key)

    def holders(self, key: str) -> list[str]:
        """Every node that holds reservation ``key``, sorted (a gang's members)."""
        first = self._holder.get(key)
        if first is None:
            return []
        more = self._extra.get(key)
        return sorted({first, *more}) if more else [first]

    # --- the cache -----------------------------------------------------------------
    def _store(self, node_id: str, alloc: Allocation | None, revision: int, *, force: bool = False) -> None:
        """Put a record into the cache; an older revision than the cached one is ignored
        unless ``force`` (the server's answer to a read or write is the truth, even when a
        restarted server went back in its revisions)."""
        current = self.records.get(node_id)
        if current is not None and revision <= current[1] and not force:
            return
        old_keys = current[0].reservations.keys() if current is not None else set()
        new_keys = alloc.reservations.keys() if alloc is not None else set()
        for key in old_keys - new_keys:
            self._unhold(key, node_id)
        for key in new_keys - old_keys:
            first = self._holder.setdefault(key, node_id)
            if first != node_id:
                self._extra.setdefault(key, set()).add(node_id)
        if alloc is None:
            self.records.pop(node_id, None)
        else:
            self.records[node_id] = (alloc, revision)

    def _unhold(self, key: str, node_id: str) -> None:
        more = self._extra.get(key)
        if more is not None:
            more.discard(node_id)
        if self._holder.get(key) == node_id:
            if more:
                self._holder[key] = more.pop()
            else:
                del self._holder[key]
        if more is not None and not more:
            del self._extra[key]

    def _replace(self, records: dict[str, Record]) -> None:
        """Make ``records`` (a complete read of the bucket) the whole cache."""
        self.records = records
        self._holder = {}
        self._extra = {}
        for node, (alloc, _) in records.items():
            for key in alloc.reservations:
                first = self._holder.setdefault(key, node)
                if first != node:
                    self._extra.setdefault(key, set()).add(node)

    # --- the watch -----------------------------------------------------------------
    def restart(self) -> None:
        """Start the watch afresh (after a reconnect); the view is stale until it caught up."""
        self.fresh = False
        self.fresh_since = 0.0
        self._generation += 1
        self._fresh_event.clear()
        self._restart.set()

    async def watch(self) -> None:
        """Keep the cache current (run as a background task), restarting when asked to.

        A watch that cannot be started (NATS away, JetStream still recovering after a
        restart) is tried again with backoff; the view stays stale meanwhile.
        """
        await watch_forever(
            self.kv.watchall, self._follow, self._restart, name="allocation view", bucket=subjects.KV_ALLOC, log=log
        )

    async def _follow(self, watcher: Any) -> None:
        # The initial values are collected apart and then replace the cache as a whole, so
        # that a record deleted while the watch was down goes too, and revisions that a
        # restarted server counts anew are taken as they are.
        generation = self._generation
        snapshot: dict[str, Record] | None = {}
        async for entry in watcher:
            if entry is None:  # initial values delivered
                if generation != self._generation:
                    return  # restarted meanwhile: this watch is on its way out
                if snapshot is not None:
                    self._replace(snapshot)
                    snapshot = None
                self.fresh = True
                self.fresh_since = self._monotonic()
                self._ready.set()
                self._fresh_event.set()
                continue
            if entry.operation in ("DEL", "PURGE"):
                # Nothing reserved; the marker's revision is what the next write must name.
                alloc = Allocation(node_id=entry.key)
            else:
                try:
                    alloc = _decoder.decode(entry.value)
                except msgspec.DecodeError:
                    log.warning("ignoring a malformed allocation record for %s", entry.key)
                    continue
            if snapshot is None:
                self._store(entry.key, alloc, entry.revision)
            else:
                snapshot[entry.key] = (alloc, entry.revision)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the first watch has delivered the bucket's initial values."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def wait_fresh(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the view to be caught up.

        Returns:
            Whether it is.
        """
        if self.fresh:
            return True
        try:
            await asyncio.wait_for(self._fresh_event.wait(), timeout)
        except TimeoutError:
            return False
        return self.fresh

    # --- reads and writes ----------------------------------------------------------
    async def refresh(self, node_id: str) -> None:
        """Re-read one node's record from the server; the cache then holds what it said.

        Raises:
            Unavailable: when the server does not answer.
        """
        try:
            entry = await self.kv.get(node_id)
        except KeyNotFoundError as exc:
            # A deleted record holds nothing; a write must name its delete marker's revision.
            marker = getattr(exc.entry, "revision", None) or 0
            self._store(node_id, Allocation(node_id=node_id) if marker else None, marker, force=True)
            return
        except (TimeoutError, nats.errors.Error) as exc:
            raise Unavailable(f"cannot read the allocation of node {node_id}: {type(exc).__name__}: {exc}") from exc
        if entry.value:
            self._store(node_id, _decoder.decode(entry.value), entry.revision or 0, force=True)
        else:
            self._store(node_id, None, 0, force=True)

    async def reload(self) -> None:
        """Re-read every record from the server (to find reservations a stale cache misses).

        Raises:
            Unavailable: when the server does not answer.
        """
        try:
            keys = await bucket_keys(self._js, subjects.KV_ALLOC)
        except (TimeoutError, nats.errors.Error) as exc:
            raise Unavailable(f"cannot list the allocation records: {type(exc).__name__}: {exc}") from exc
        await asyncio.gather(*(self.refresh(key) for key in keys))

    async def remove(self, node_id: str, keys: set[str]) -> None:
        """Remove the reservations ``keys`` from a node's record; return once the server's
        record is known to hold none of them.

        The cache proves a reservation's presence (a compare-and-set from its revision fails
        if the record moved on), never its absence: when the cached record shows none of
        ``keys``, the record is read from the server first and the decision made from that.

        Raises:
            Unavailable: when the server does not answer.
            Conflict: when every compare-and-set lost a race.
        """
        async with self._writer(node_id):
            # The re-read under the node's lock too: a read that answered before another
            # task's write here would put the older revision back in the cache.
            cached = self.records.get(node_id)
            if cached is None or not keys & cached[0].reservations.keys():
                await self.refresh(node_id)
            await self._change(node_id, lambda alloc: (without(alloc, keys), None))

    async def change(self, node_id: str, edit: Callable[[Allocation], tuple[Allocation | None, T]]) -> T:
        """Apply ``edit`` to a node's record with compare-and-set, re-reading on conflict.

        Args:
            node_id: the node.
            edit: given the current record, returns ``(new record or None for no write,
                result)``; it is called again after every lost race, so it must be pure.

        Returns:
            ``edit``'s result from the attempt that was written.

        Raises:
            Conflict: when every try lost a race.
            Unavailable: when NATS does not answer.
        """
        async with self._writer(node_id):
            return await self._change(node_id, edit)

    def _writer(self, node_id: str) -> asyncio.Lock:
        """The lock of a node's record (one per node this replica has written to)."""
        lock = self._writing.get(node_id)
        if lock is None:
            lock = self._writing[node_id] = asyncio.Lock()
        return lock

    async def _change(self, node_id: str, edit: Callable[[Allocation], tuple[Allocation | None, T]]) -> T:
        for _ in range(CAS_TRIES):
            alloc, revision = self.records.get(node_id, (Allocation(node_id=node_id), 0))
            new, result = edit(alloc)
            if new is None:
                return result
            try:
                revision = await self.kv.update(node_id, encode(new), last=revision)
            except KeyWrongLastSequenceError:
                await self.refresh(node_id)
                continue
            except (TimeoutError, nats.errors.Error) as exc:
                # Not a lost race: NATS is slow or away. The batch is redelivered later.
                raise Unavailable(
                    f"cannot write the allocation of node {node_id}: {type(exc).__name__}: {exc}"
                ) from exc
            self._store(node_id, new, revision, force=True)
            return result
        raise Conflict(f"allocation record of node {node_id} kept changing; gave up after {CAS_TRIES} tries")
