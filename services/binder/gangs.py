"""Gang binding: every member of a gang on a node of its own, reserved all or none. Pure.

A gang's members talk to each other while they run, so a partial placement is worse than
none: the placed members would hold their room waiting for peers that never come. The
binder therefore plans the whole gang on one snapshot (:func:`choose_gang`), reserves the
members one node at a time in node-id order (:func:`reserve_member`, each step inside that
node's compare-and-set), and gives back every member it reserved when one step loses its
race. Two binders racing for overlapping nodes take them in the same order, so neither
can hold a node the other needs while waiting for one the other holds: the first to win
the first contested node goes on, the other rolls back (no deadlock), and a rolled-back
gang is refused and comes back with the scheduler's next release (no livelock: every
round, one of them wins).

One member per node keeps an attempt's key (``<job_id>:<attempt>``) unique on each node,
as the executor and every reservation expect. A member that wants a whole node's GPUs
asks for them (``resources.gpu``) and starts its local workers itself.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from jobmesh.binder.allocation import free_and_holds, may_take_now, new_reservation, pick_gpus
from jobmesh.contract.ids import attempt_key
from jobmesh.contract.messages.v1 import Allocation, JobReady, NodeInfo, Reservation
from jobmesh.contract.validation import gang_group, gang_need

# Each member listens on a port of its own: the same for every member of one attempt but
# its rank, so members that share a host (a dev cluster) do not collide, and different
# gangs on one host rarely do.
PORT_BASE = 20000
PORT_SPAN = 20000
# How soon a gang that lost a race comes back (JobUnplaceable.retry_after): the winner's
# members hold their nodes by then, so the loser sees the true room.
RACE_RETRY_SECONDS = 0.5
RACE_LOST = "lost a reservation race"  # in the refusal of a gang that rolled back


@dataclass(frozen=True, slots=True)
class GangPlan:
    """Where each member goes: ``nodes[rank]``."""

    nodes: tuple[str, ...]


def choose_gang(
    job: JobReady, nodes: Mapping[str, NodeInfo], allocs: Mapping[str, Allocation], now: float
) -> GangPlan | str:
    """Place every member of ``job``'s gang on a candidate with room now, or say why not.

    The candidates (every node the scheduler found fitting) are grouped by the ``same``
    attribute; of the groups with room for every member, the tightest is taken (fewest
    nodes with room, then its value), so larger groups stay whole for larger gangs. Within
    it, ``spread`` takes the roomiest nodes, ``pack`` the fullest that fit. Rank 0 is the
    first node taken. O(c log c) in the candidates.

    Returns:
        The plan, or the reason (``needs 4 nodes with ...; 3 free``) when no group holds it.
    """
    spec = job.spec
    res = spec.resources
    replicas = spec.replicas
    groups: dict[str, list[tuple[int, int, str]]] = {}
    for node_id in job.candidates:
        node = nodes.get(node_id)
        if node is None or node.draining:
            continue
        key = gang_group(node, spec.same)
        if key is None:
            continue
        alloc = allocs.get(node_id)
        free, holds, _ = free_and_holds(node, alloc, now)
        if not free.fits(res) or (holds and not may_take_now(free, job, holds, now)):
            continue
        if res.gpu and not _one_kind(node, res.gpu_kind):
            if pick_gpus(node, alloc.reservations if alloc is not None else {}, res) is None:
                continue  # enough GPUs, but not of the asked kind
        groups.setdefault(key, []).append((free.cpu_milli, free.memory_mb, node_id))
    roomy = [(len(entries), key) for key, entries in groups.items() if len(entries) >= replicas]
    if not roomy:
        best = max((len(entries) for entries in groups.values()), default=0)
        return f"{gang_need(replicas, res, spec.same)}; {best} free"
    _, chosen = min(roomy)
    entries = groups[chosen]
    if spec.spread == "pack":
        entries.sort()
    else:
        entries.sort(key=lambda e: (-e[0], -e[1], e[2]))
    return GangPlan(tuple(node_id for _, _, node_id in entries[:replicas]))


def _one_kind(node: NodeInfo, kind: str) -> bool:
    """Whether every GPU of ``node`` is of ``kind`` (any kind does for ""): then its free
    count tells all, and the devices need not be picked to know that they fit."""
    if not kind:
        return True
    return node.gpu_kind == kind and all(not d.kind or d.kind == kind for d in node.gpu_devices)


def reserve_member(
    alloc: Allocation, node: NodeInfo, *, job: JobReady, rank: int, now: float
) -> tuple[Allocation | None, Reservation | None]:
    """The compare-and-set step for member ``rank`` of ``job`` on ``node``: its reservation
    (the one it holds already, for a redelivery), or None when the room has gone."""
    key = attempt_key(job.job_id, job.attempt)
    held = alloc.reservations.get(key)
    if held is not None and not held.starts_at:
        return None, held
    free, holds, _ = free_and_holds(node, alloc, now)
    res = job.spec.resources
    if not free.fits(res) or (holds and not may_take_now(free, job, holds, now)):
        return None, None
    gpus: list[int] = []
    if res.gpu:
        picked = pick_gpus(node, alloc.reservations, res)
        if picked is None:
            return None, None
        gpus = picked
    reservation = msgspec.structs.replace(
        new_reservation(node, job, now, gpus), rank=rank, world_size=job.spec.replicas, release=job.release
    )
    reservations = dict(alloc.reservations)
    reservations[key] = reservation
    return Allocation(node_id=node.node_id, reservations=reservations), reservation


def peers(key: str, members: list[NodeInfo | None], node_ids: list[str]) -> list[str]:
    """Every member's "host:port", by rank: its node's advertised address (its id when the
    node advertises none or has left the view) and a port derived from the attempt."""
    base = PORT_BASE + zlib.crc32(key.encode()) % PORT_SPAN
    out = []
    for rank, (node, node_id) in enumerate(zip(members, node_ids, strict=True)):
        host = node.address if node is not None and node.address else node_id
        out.append(f"{host}:{base + rank}")
    return out
