"""The binder's view of the ``jm_alloc`` KV bucket, and compare-and-set writes to it.

Every binder replica watches the bucket, so its cache is almost always current; the
compare-and-set on the record's revision catches the rest: a write based on a stale
revision is refused by the server, the record is re-read and the change is recomputed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeVar

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import Allocation
from jobmesh.errors import Conflict, Unavailable

log = logging.getLogger("jobmesh.binder")

_decoder = msgspec.json.Decoder(Allocation)
T = TypeVar("T")
CAS_TRIES = 8


class Allocations:
    """Cached allocation records with their KV revisions."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None
        self.records: dict[str, tuple[Allocation, int]] = {}
        self._holder: dict[str, str] = {}  # reservation key -> node holding it
        self._ready = asyncio.Event()

    async def open(self) -> None:
        self._kv = await self._js.key_value(subjects.KV_ALLOC)

    def snapshot(self) -> dict[str, Allocation]:
        return {node: alloc for node, (alloc, _) in self.records.items()}

    def holder(self, key: str) -> str | None:
        """The node that holds reservation ``key`` (``job_id:attempt``), as far as we know."""
        return self._holder.get(key)

    def _store(self, node_id: str, alloc: Allocation | None, revision: int) -> None:
        current = self.records.get(node_id)
        if current is not None and revision <= current[1]:
            return
        old_keys = current[0].reservations.keys() if current is not None else set()
        new_keys = alloc.reservations.keys() if alloc is not None else set()
        for key in old_keys - new_keys:
            if self._holder.get(key) == node_id:
                del self._holder[key]
        for key in new_keys - old_keys:
            self._holder[key] = node_id
        if alloc is None:
            self.records.pop(node_id, None)
        else:
            self.records[node_id] = (alloc, revision)

    async def watch(self) -> None:
        """Keep the cache current (run as a background task)."""
        assert self._kv is not None
        watcher = await self._kv.watchall()
        async for entry in watcher:
            if entry is None:
                self._ready.set()
                continue
            if entry.operation in ("DEL", "PURGE"):
                self._store(entry.key, None, entry.revision)
                continue
            try:
                self._store(entry.key, _decoder.decode(entry.value), entry.revision)
            except msgspec.DecodeError:
                log.warning("ignoring a malformed allocation record for %s", entry.key)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def refresh(self, node_id: str) -> None:
        """Re-read one node's record from the server."""
        assert self._kv is not None
        try:
            entry = await self._kv.get(node_id)
        except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError, nats.errors.NoRespondersError) as exc:
            raise Unavailable(f"cannot read the allocation of node {node_id}: {type(exc).__name__}") from exc
        except KeyNotFoundError:
            current = self.records.get(node_id)
            self._store(node_id, None, (current[1] + 1) if current else 1)
            return
        if entry.value:
            self._store(node_id, _decoder.decode(entry.value), entry.revision or 0)

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
        """
        assert self._kv is not None
        for _ in range(CAS_TRIES):
            alloc, revision = self.records.get(node_id, (Allocation(node_id=node_id), 0))
            new, result = edit(alloc)
            if new is None:
                return result
            try:
                revision = await self._kv.update(node_id, encode(new), last=revision)
            except KeyWrongLastSequenceError:
                await self.refresh(node_id)
                continue
            except (TimeoutError, nats.errors.Error) as exc:
                # Not a lost race: NATS is slow or away. The batch is redelivered later.
                raise Unavailable(
                    f"cannot write the allocation of node {node_id}: {type(exc).__name__}: {exc}"
                ) from exc
            self._store(node_id, new, revision)
            return result
        raise Conflict(f"allocation record of node {node_id} kept changing; gave up after {CAS_TRIES} tries")
