"""Reaping nodes that are gone for good: their allocation record and dispatch consumer.

An executor that goes away for good leaves two things behind: its record in ``jm_alloc``
(the binder's) and its durable on JM_DISPATCH (``executor-<node>``). Neither expires by
itself. The decision of which nodes are gone for good is pure (:func:`gone_for_good`, over
a snapshot and an injected clock): absent from ``jm_nodes`` (no fresh heartbeat) for
longer than ``JOBMESH_NODE_GRACE_SECONDS``, with no reservation left. :class:`Reaper` is
the I/O around it, and checks the server once more before it removes anything: the node's
registration must still be absent and its record still empty at the revision it deletes
(compare-and-set), so a node that came back keeps both.

When a node's absence began is known only while its stale record is in the bucket (its
last heartbeat); after that, from the first round that saw it absent. That memory lives in
the process: a restarted binder starts the grace afresh, which only ever reaps later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, KeyNotFoundError

from jobmesh.binder.allocations import Allocations
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import Allocation, NodeInfo
from jobmesh.runtime.nodes import NodeWatcher
from jobmesh.runtime.provisioning import forget_dispatch, kv_stream, kv_subject

log = logging.getLogger("jobmesh.binder")

_alloc_decoder = msgspec.json.Decoder(Allocation)
_node_decoder = msgspec.json.Decoder(NodeInfo)
# Executors name their dispatch durable subjects.durable("executor", node_id).
DISPATCH_DURABLE_PREFIX = subjects.durable("executor", "")


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """What the binder knows of the nodes at one moment.

    Attributes:
        alive: nodes with a fresh heartbeat in ``jm_nodes``.
        last_heartbeat: for records still in the bucket but stale, their last heartbeat.
        reservations: reservations held per node (its ``jm_alloc`` record).
        consumers: nodes that have a dispatch consumer.
    """

    alive: frozenset[str]
    last_heartbeat: Mapping[str, float]
    reservations: Mapping[str, int]
    consumers: frozenset[str]


def gone_for_good(
    now: float, grace: float, snapshot: NodeSnapshot, absent_since: Mapping[str, float]
) -> tuple[list[str], dict[str, float]]:
    """Which nodes are gone for good, and since when each absent node has been absent.

    Args:
        now: the current unix time (from the injected clock).
        grace: ``JOBMESH_NODE_GRACE_SECONDS``.
        snapshot: the nodes as the binder sees them now.
        absent_since: the previous round's answer (empty at start).

    Returns:
        ``(nodes to reap, in id order; absent_since for the next round)``. A node with
        reservations is never reaped (they are released by the attempts' ends first); a
        node that is alive again is forgotten.
    """
    known = set(snapshot.reservations) | snapshot.consumers | set(snapshot.last_heartbeat)
    since: dict[str, float] = {}
    doomed: list[str] = []
    for node in sorted(known - snapshot.alive):
        start = min(absent_since.get(node, now), snapshot.last_heartbeat.get(node, now))
        since[node] = start
        if now - start >= grace and snapshot.reservations.get(node, 0) == 0:
            doomed.append(node)
    return doomed, since


def node_of_durable(name: str) -> str | None:
    """The node whose dispatch durable is ``name`` (None for another service's durable)."""
    if name.startswith(DISPATCH_DURABLE_PREFIX) and len(name) > len(DISPATCH_DURABLE_PREFIX):
        return name[len(DISPATCH_DURABLE_PREFIX) :]
    return None


def snapshot_of(
    nodes: NodeWatcher, records: Mapping[str, tuple[Allocation, int]], durables: Iterable[str]
) -> NodeSnapshot:
    """Build the decision's input from the binder's views and the dispatch durables."""
    seen = nodes.all()
    return NodeSnapshot(
        alive=frozenset(n.node_id for n, fresh in seen if fresh),
        last_heartbeat={n.node_id: n.heartbeat_at for n, fresh in seen if not fresh},
        # A future hold (backfill) holds nothing yet: it does not keep a gone node's record.
        reservations={
            node: sum(1 for r in alloc.reservations.values() if not r.starts_at) for node, (alloc, _) in records.items()
        },
        consumers=frozenset(n for n in map(node_of_durable, durables) if n is not None),
    )


class Reaper:
    """Removes the allocation record and the dispatch consumer of nodes gone for good.

    Args:
        js: the JetStream context.
        nodes: the binder's node view.
        allocations: the binder's allocation view.
        grace: seconds a node must have been absent.
        clock: returns the current unix time.
        nats_side: also purge the node's dispatch subjects and delete its durable (and the
            allocation record's delete marker): False for a binder with an identity of its
            own, which may not (those are the provisioner's, ``jobmesh provision --forget-node``).
    """

    def __init__(
        self,
        js: JetStreamContext,
        nodes: NodeWatcher,
        allocations: Allocations,
        grace: float,
        clock: Callable[[], float] = time.time,
        nats_side: bool = True,
    ) -> None:
        self._js = js
        self._nats_side = nats_side
        self._nodes = nodes
        self._allocations = allocations
        self._grace = grace
        self._clock = clock
        self.absent_since: dict[str, float] = {}
        self.reaped: list[str] = []  # nodes reaped since start, oldest first

    async def round(self) -> list[str]:
        """Decide once and reap; return the nodes reaped. A stale view decides nothing."""
        if not (self._nodes.fresh and self._allocations.fresh):
            return []
        # Without the right to list and delete durables, the nodes known are those with a
        # record: the provisioner's `--forget-node` does the rest.
        durables = await self._dispatch_durables() if self._nats_side else []
        snapshot = snapshot_of(self._nodes, self._allocations.records, durables)
        doomed, self.absent_since = gone_for_good(self._clock(), self._grace, snapshot, self.absent_since)
        done = []
        for node in doomed:
            if await self._reap(node):
                done.append(node)
                self.absent_since.pop(node, None)
        self.reaped.extend(done)
        return done

    async def run(self, interval: float) -> None:
        """Run a round every ``interval`` seconds (a background task)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except (TimeoutError, nats.errors.Error):
                # Nothing waits on reaping: the next round decides again from fresh views.
                log.warning("reaping gone nodes failed; will retry", exc_info=True)

    async def _dispatch_durables(self) -> list[str]:
        names: list[str] = []
        while True:
            page = await self._js.consumers_info(subjects.STREAM_DISPATCH, offset=len(names))
            names.extend(info.name for info in page)
            if not page:
                return names

    async def _reap(self, node: str) -> bool:
        """Remove what ``node`` left behind, if the server agrees it is still gone."""
        # The dispatch stream's last sequence before the check below: what is purged from
        # the node's subjects is older than the check, so a bind to a node that registers
        # again right after it survives.
        last = (await self._js.stream_info(subjects.STREAM_DISPATCH)).state.last_seq if self._nats_side else 0
        registrations = await self._js.key_value(subjects.KV_NODES)
        try:
            entry = await registrations.get(node)
            # A record the bucket has not expired yet may still be there: only a heartbeat
            # within the grace says the node is back since the view was read.
            if entry.value and _node_decoder.decode(entry.value).heartbeat_at > self._clock() - self._grace:
                return False
        except KeyNotFoundError:
            pass
        if not await self._delete_record(node):
            return False
        if not self._nats_side:
            log.info(
                "node %s gone for good: removed its allocation record; its dispatch durable and subjects "
                "stay until `jobmesh provision --forget-node %s` runs with the provisioner's credentials",
                node,
                node,
            )
            return True
        # A node id that comes back after this starts a new consumer from the stream's start
        # (DeliverPolicy.ALL): it must not find old dispatches to run again.
        await forget_dispatch(self._js, node, up_to=last)
        log.info("node %s gone for good: removed its allocation record, dispatch consumer and dispatches", node)
        return True

    async def _delete_record(self, node: str) -> bool:
        """Delete the node's record at the revision read, if it holds no reservation; then
        purge the delete marker, so a node id that never comes back costs nothing."""
        kv = self._allocations.kv
        try:
            entry = await kv.get(node)
        except KeyNotFoundError:
            return True  # no record (never reserved on, or already reaped)
        if entry.value and _alloc_decoder.decode(entry.value).reservations:
            return False
        try:
            await kv.delete(node, last=entry.revision)
        except BadRequestError as exc:
            # nats-py's delete does not translate it as update does: 10071/10164 are
            # JetStream's "wrong last sequence", i.e. the record was written meanwhile.
            if exc.err_code in (10071, 10164):
                return False
            raise
        try:
            await kv.get(node)
            return True  # written again right after the delete: leave it
        except KeyNotFoundError as exc:
            marker = getattr(exc.entry, "revision", None) or 0
        if marker and self._nats_side:
            # Purging only up to the marker's sequence keeps any write that follows it.
            await self._js.purge_stream(
                kv_stream(subjects.KV_ALLOC), subject=kv_subject(subjects.KV_ALLOC, node), seq=marker + 1
            )
        return True
