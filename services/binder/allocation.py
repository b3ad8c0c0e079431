"""Binding decisions: which candidate node gets a job. Pure functions, no I/O.

A node's free capacity is what it advertises minus its reservations. ``plan`` walks each
job's ranked candidates and takes the first whose free capacity fits, counting what earlier
jobs of the same batch took, so one batch never overbooks a node by itself; the
compare-and-set on the node's allocation record guards against other binders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobmesh.contract.ids import attempt_key
from jobmesh.contract.messages.v1 import Allocation, JobReady, NodeInfo, Reservation, Resources


@dataclass(frozen=True, slots=True)
class Free:
    """Capacity left on a node."""

    cpu_milli: int
    memory_mb: int
    gpu: int
    disk_mb: int

    def fits(self, res: Resources) -> bool:
        return (
            res.cpu_milli <= self.cpu_milli
            and res.memory_mb <= self.memory_mb
            and res.gpu <= self.gpu
            and res.disk_mb <= self.disk_mb
        )

    def minus(self, res: Resources) -> Free:
        return Free(
            self.cpu_milli - res.cpu_milli,
            self.memory_mb - res.memory_mb,
            self.gpu - res.gpu,
            self.disk_mb - res.disk_mb,
        )


def free_on(node: NodeInfo, alloc: Allocation | None) -> Free:
    """Advertised capacity minus every reservation on the node."""
    free = Free(node.cpu_milli, node.memory_mb, node.gpu, node.disk_mb)
    if alloc is not None:
        for r in alloc.reservations.values():
            free = free.minus(r.resources)
    return free


def overbooked(node: NodeInfo, alloc: Allocation) -> bool:
    """True when reservations exceed capacity (must never happen; tests check it)."""
    f = free_on(node, alloc)
    return f.cpu_milli < 0 or f.memory_mb < 0 or f.gpu < 0 or f.disk_mb < 0


@dataclass
class Plan:
    """Where each job of a batch goes."""

    assign: dict[str, list[JobReady]] = field(default_factory=dict)  # node -> jobs
    refused: list[tuple[JobReady, str]] = field(default_factory=list)


def plan(
    jobs: list[JobReady],
    nodes: dict[str, NodeInfo],
    allocs: dict[str, Allocation],
    skip: dict[str, set[str]] | None = None,
    strategy: str = "spread",
) -> Plan:
    """Assign each job to a candidate with room: the best tier first, then by strategy.

    Args:
        jobs: ready jobs, in the order they should be served.
        nodes: live nodes by id.
        allocs: current allocation record per node (missing = nothing reserved).
        skip: per job id, candidate nodes already tried and lost in a race this batch.
        strategy: among fitting nodes of the best tier, ``spread`` takes the one with the
            most free cpu, ``pack`` the one with the least.

    Returns:
        The assignment per node and the jobs that fit nowhere, with the reason.
    """
    skip = skip or {}
    free: dict[str, Free] = {}
    result = Plan()
    for job in jobs:
        chosen = None
        chosen_tier = None
        tried = skip.get(job.job_id, set())
        for index, node_id in enumerate(job.candidates):
            tier = job.tiers[index] if index < len(job.tiers) else 0
            if chosen is not None and tier != chosen_tier:
                break  # only nodes of the best tier with room compete
            node = nodes.get(node_id)
            if node is None or node.draining or node_id in tried:
                continue
            if node_id not in free:
                free[node_id] = free_on(node, allocs.get(node_id))
            if not free[node_id].fits(job.spec.resources):
                continue
            if chosen is None or _better(free[node_id], free[chosen], strategy):
                chosen, chosen_tier = node_id, tier
        if chosen is None:
            live = [c for c in job.candidates if c in nodes]
            reason = "no free capacity on candidate nodes" if live else "candidate nodes are gone"
            result.refused.append((job, reason))
            continue
        free[chosen] = free[chosen].minus(job.spec.resources)
        result.assign.setdefault(chosen, []).append(job)
    return result


@dataclass(frozen=True, slots=True)
class Binding:
    """One job placed on a node: its scratch directory, and whether this write reserved it
    (False: the attempt already held the reservation, a redelivery)."""

    job: JobReady
    node_id: str
    scratch_dir: str
    new: bool


def reserve(
    node: NodeInfo, alloc: Allocation, jobs: list[JobReady], now: float
) -> tuple[Allocation | None, list[Binding], list[JobReady]]:
    """Reserve ``jobs`` on ``node`` against its current allocation record.

    The step inside the compare-and-set: it is run again on the fresh record after every
    lost race, so it must depend on nothing but its arguments.

    Args:
        node: the node's advertised record.
        alloc: its allocation record as last read.
        jobs: the jobs planned onto it, in order.
        now: the reservation time.

    Returns:
        The new record to write (None when nothing changed), the jobs bound, and the jobs
        that no longer fit (another binder took the room since the plan was made).
    """
    free = free_on(node, alloc)
    reservations = dict(alloc.reservations)
    won: list[Binding] = []
    lost: list[JobReady] = []
    for job in jobs:
        key = attempt_key(job.job_id, job.attempt)
        if key in reservations:  # a redelivery: already ours on this node
            won.append(Binding(job, node.node_id, reservations[key].scratch_dir, False))
            continue
        if not free.fits(job.spec.resources):
            lost.append(job)
            continue
        free = free.minus(job.spec.resources)
        scratch = f"{node.work_dir}/{job.job_id}-{job.attempt}" if node.work_dir else ""
        reservations[key] = Reservation(
            resources=job.spec.resources, scratch_dir=scratch, at=now, partition=job.partition
        )
        won.append(Binding(job, node.node_id, scratch, True))
    changed = any(b.new for b in won)
    return (Allocation(node_id=node.node_id, reservations=reservations) if changed else None), won, lost


def without(alloc: Allocation, keys: set[str]) -> Allocation | None:
    """``alloc`` with the reservations ``keys`` removed; None when it holds none of them."""
    if not keys & alloc.reservations.keys():
        return None
    return Allocation(
        node_id=alloc.node_id, reservations={k: v for k, v in alloc.reservations.items() if k not in keys}
    )


def _better(a: Free, b: Free, strategy: str) -> bool:
    if strategy == "pack":
        return (a.cpu_milli, a.memory_mb) < (b.cpu_milli, b.memory_mb)
    return (a.cpu_milli, a.memory_mb) > (b.cpu_milli, b.memory_mb)
