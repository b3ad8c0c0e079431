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

import msgspec
from nats.js import JetStreamContext

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import NodeInfo

log = logging.getLogger("jobmesh.runtime.nodes")

_decoder = msgspec.json.Decoder(NodeInfo)


class NodeWatcher:
    """Keeps ``nodes`` current from a KV watch and calls ``on_change`` when the set changes.

    Args:
        js: the JetStream context.
        ttl: seconds after its last heartbeat that a node is considered gone.
        on_change: called (synchronously) when a node joins, leaves or changes capacity.
        clock: returns the current unix time.
    """

    def __init__(
        self,
        js: JetStreamContext,
        ttl: float,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._js = js
        self._ttl = ttl
        self._on_change = on_change
        self._clock = clock
        self._nodes: dict[str, NodeInfo] = {}
        self._alive_ids: frozenset[str] = frozenset()
        self._ready = asyncio.Event()
        self.version = 0  # bumps whenever the alive set or a node's record changes shape
        self._seen_version = 0

    async def run(self) -> None:
        """Watch forever (run as a background task)."""
        kv = await self._js.key_value(subjects.KV_NODES)
        watcher = await kv.watchall()
        async for entry in watcher:
            if entry is None:  # initial values delivered
                self._ready.set()
                self._recheck()
                continue
            if entry.operation in ("DEL", "PURGE"):
                if self._nodes.pop(entry.key, None) is not None:
                    self._recheck()
                continue
            else:
                try:
                    node = _decoder.decode(entry.value)
                except msgspec.DecodeError:
                    log.warning("ignoring a malformed node record under %s", entry.key)
                    continue
                old = self._nodes.get(entry.key)
                self._nodes[entry.key] = node
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
