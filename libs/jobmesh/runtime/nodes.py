"""A live view of registered executor nodes, from the ``jm_nodes`` KV bucket.

Executors own the records; the scheduler and the binder only watch them. A node counts as
alive while its last heartbeat is younger than the node TTL, so a node that stops
heartbeating leaves the candidate set even before the bucket expires its record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.js import JetStreamContext

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import NodeInfo
from jobmesh.runtime.kvwatch import watch_forever

log = logging.getLogger("jobmesh.runtime.nodes")

_decoder = msgspec.json.Decoder(NodeInfo)


class NodeWatcher:
    """Keeps ``nodes`` current from a KV watch and calls ``on_change`` when the set changes.

    A view that missed updates must not be decided on: after a NATS reconnect a KV watch
    can lag behind the bucket for many seconds. So the watch is started afresh after every
    reconnect (:meth:`restart`), and the view counts as :attr:`fresh` only once that
    watch's initial values have all arrived.

    Args:
        js: the JetStream context.
        ttl: seconds after its last heartbeat that a node is considered gone.
        on_change: called (synchronously) when a node joins, leaves or changes capacity.
        on_record: called (synchronously) with every record put, heartbeats included, and
            the monotonic time it arrived (the scheduler renews attempt leases from them).
        clock: returns the current unix time.
        monotonic: returns monotonic seconds (for :attr:`fresh_since`).
    """

    def __init__(
        self,
        js: JetStreamContext,
        ttl: float,
        on_change: Callable[[], None] | None = None,
        on_record: Callable[[NodeInfo, float], None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._js = js
        self._ttl = ttl
        self._on_change = on_change
        self._on_record = on_record
        self._clock = clock
        self._monotonic = monotonic
        self._nodes: dict[str, NodeInfo] = {}
        self._alive_ids: frozenset[str] = frozenset()
        self._ready = asyncio.Event()
        self._restart = asyncio.Event()
        self.version = 0  # bumps whenever the alive set or a node's record changes shape
        self._seen_version = 0
        self.fresh = False  # the current watch has delivered every record the bucket held
        self.fresh_since = 0.0  # monotonic time it became so (0 while not fresh)
        self._fresh_event = asyncio.Event()
        self._generation = 0  # counts restarts: an older watch says nothing about freshness

    def restart(self) -> None:
        """Start the watch afresh (after a reconnect); the view is stale until it caught up."""
        self._generation += 1
        self.fresh = False
        self.fresh_since = 0.0
        self._fresh_event.clear()
        self._restart.set()

    async def wait_fresh(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the view to have caught up; say whether it has."""
        if self.fresh:
            return True
        try:
            await asyncio.wait_for(self._fresh_event.wait(), timeout)
        except TimeoutError:
            return False
        return self.fresh

    async def run(self) -> None:
        """Watch forever (run as a background task), restarting when asked to.

        Right after NATS comes back, JetStream may refuse to create the watch for a moment:
        the view stays stale and the watch is tried again, with backoff, instead of the
        service stopping.
        """
        js = self._js

        async def open_watch() -> Any:
            return await (await js.key_value(subjects.KV_NODES)).watchall()

        await watch_forever(
            open_watch,
            lambda watcher: self._follow(watcher, self._generation),
            self._restart,
            name="node view",
            bucket=subjects.KV_NODES,
            log=log,
        )

    async def _follow(self, watcher: Any, generation: int) -> None:
        snapshot: dict[str, NodeInfo] | None = {}  # the initial values, until they are all in
        async for entry in watcher:
            if generation != self._generation:
                return  # a restart was asked for: this watch's view is not the current one
            if entry is None:  # initial values delivered
                if snapshot is not None:
                    self._nodes, snapshot = snapshot, None
                self.fresh = True
                self.fresh_since = self._monotonic()
                self._fresh_event.set()
                self._ready.set()
                self.version += 1
                self._recheck()
                continue
            nodes = snapshot if snapshot is not None else self._nodes
            if entry.operation in ("DEL", "PURGE"):
                if nodes.pop(entry.key, None) is not None and snapshot is None:
                    self._recheck()
                continue
            try:
                node = _decoder.decode(entry.value)
            except msgspec.DecodeError:
                log.warning("ignoring a malformed node record under %s", entry.key)
                continue
            old = nodes.get(entry.key)
            nodes[entry.key] = node
            if self._on_record is not None:
                self._on_record(node, self._monotonic())
            if snapshot is not None:
                continue
            if old is None or shape(old) != shape(node):
                self.version += 1
                self._recheck()
            elif entry.key not in self._alive_ids:
                self._recheck()  # a node that had gone quiet is back

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the initial records have been read."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    def alive(self) -> list[NodeInfo]:
        """Nodes whose heartbeat is fresh, in id order."""
        now = self._clock()
        return [n for _, n in sorted(self._nodes.items()) if now - n.heartbeat_at < self._ttl]

    def all(self) -> list[tuple[NodeInfo, bool]]:
        """Every record still in the bucket, with whether its heartbeat is fresh."""
        now = self._clock()
        return [(n, now - n.heartbeat_at < self._ttl) for _, n in sorted(self._nodes.items())]

    def _recheck(self) -> None:
        alive = frozenset(n.node_id for n in self.alive())
        if alive != self._alive_ids:
            self._alive_ids = alive
            self.version += 1
        # _seen_version covers changes counted in run() before this call.
        if self.version != self._seen_version:
            self._seen_version = self.version
            if self._on_change is not None:
                self._on_change()

    async def expire_loop(self, interval: float = 1.0) -> None:
        """Notice nodes whose heartbeats stopped (no KV event marks that moment)."""
        while True:
            await asyncio.sleep(interval)
            self._recheck()


def shape(node: NodeInfo) -> tuple[object, ...]:
    """Everything placement reads from a node, except its id and heartbeat time.

    Two nodes of equal shape rank alike (placement groups them); a record update that
    keeps the shape (a heartbeat) is no change to the node set.
    """
    return (
        node.cpu_milli,
        node.memory_mb,
        node.gpu,
        node.gpu_kind,
        node.disk_mb,
        node.arch,
        node.zone,
        node.isolation,
        tuple(sorted(node.labels.items())),
        tuple(node.handlers),
        tuple(node.runtimes),
        tuple(node.datasets),
        node.draining,
    )
