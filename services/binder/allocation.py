"""Binding decisions: which candidate node gets a job. Pure functions, no I/O.

A node's free capacity is what it advertises minus its reservations. ``plan`` walks each
job's ranked candidates and takes the first whose free capacity fits, counting what earlier
jobs of the same batch took, so one batch never overbooks a node by itself; the
compare-and-set on the node's allocation record guards against other binders.

A job asking for GPUs gets specific devices: ``pick_gpus`` takes the lowest indices of the
node's GPUs (of the asked kind) that no other reservation on the node holds. The indices
are part of the reservation, so they are written by the same compare-and-set: two binders
racing for one node's GPUs cannot both win with the same record revision, and the loser
picks again from the record the winner wrote. A job without GPUs costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from jobmesh.binder.backfill import EXPIRY, ends_by, may_take
from jobmesh.contract.ids import attempt_key
from jobmesh.contract.messages.v1 import Allocation, GpuDevice, JobReady, NodeInfo, Reservation, Resources


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
    """Advertised capacity minus every reservation in force on the node (a future hold,
    ``backfill.py``, is not in force before its job is bound)."""
    free = Free(node.cpu_milli, node.memory_mb, node.gpu, node.disk_mb)
    if alloc is not None:
        for r in alloc.reservations.values():
            if not r.starts_at:
                free = free.minus(r.resources)
    return free


def free_and_holds(
    node: NodeInfo, alloc: Allocation | None, now: float
) -> tuple[Free, list[tuple[str, Reservation]], bool]:
    """In one pass over a node's record: what is free now (as :func:`free_on`), the future
    holds that constrain it at ``now``, and whether it holds expired ones (``backfill.py``)."""
    cpu, mem, gpu, disk = node.cpu_milli, node.memory_mb, node.gpu, node.disk_mb
    holds: list[tuple[str, Reservation]] = []
    expired = False
    if alloc is not None:
        for key, r in alloc.reservations.items():
            if r.starts_at:
                if now <= r.starts_at + EXPIRY:
                    holds.append((key, r))
                else:
                    expired = True
                continue
            res = r.resources
            cpu -= res.cpu_milli
            mem -= res.memory_mb
            gpu -= res.gpu
            disk -= res.disk_mb
    return Free(cpu, mem, gpu, disk), holds, expired


def allocated(alloc: Allocation | None) -> Resources:
    """The sum of every reservation on a node (nothing when it has no record)."""
    if alloc is None or not alloc.reservations:
        return Resources(cpu_milli=0, memory_mb=0)
    held = [r for r in alloc.reservations.values() if not r.starts_at]
    return Resources(
        cpu_milli=sum(r.resources.cpu_milli for r in held),
        memory_mb=sum(r.resources.memory_mb for r in held),
        gpu=sum(r.resources.gpu for r in held),
        disk_mb=sum(r.resources.disk_mb for r in held),
    )


def overbooked(node: NodeInfo, alloc: Allocation) -> bool:
    """True when reservations exceed capacity or two of them hold one GPU index (must
    never happen; tests check it)."""
    f = free_on(node, alloc)
    if f.cpu_milli < 0 or f.memory_mb < 0 or f.gpu < 0 or f.disk_mb < 0:
        return True
    held = [index for r in alloc.reservations.values() for index in r.gpu_devices]
    return len(held) != len(set(held))


def node_gpus(node: NodeInfo) -> list[GpuDevice]:
    """The GPUs a node has, by index.

    Args:
        node: the node's record.

    Returns:
        Its advertised devices; for an executor that advertises only a count (one from
        before devices were advertised), indices ``0 .. gpu-1`` of the node's kind.
    """
    if node.gpu_devices:
        return node.gpu_devices
    return [GpuDevice(index=index, kind=node.gpu_kind) for index in range(node.gpu)]


def pick_gpus(node: NodeInfo, reservations: Mapping[str, Reservation], res: Resources) -> list[int] | None:
    """The GPU indices a new reservation of ``res`` on ``node`` takes.

    Args:
        node: the node's record (its devices, or its count and kind).
        reservations: every reservation on the node, the ones just made in this batch
            included.
        res: what the job asks for; a device matches ``res.gpu_kind`` when it is empty,
            else when the device's kind (the node's kind for a device that names none)
            equals it.

    Returns:
        The ``res.gpu`` lowest matching indices no reservation holds, in ascending order
        (empty when ``res.gpu`` is 0); None when fewer are free.
    """
    if res.gpu == 0:
        return []
    held = {index for r in reservations.values() for index in r.gpu_devices}
    free = sorted(
        {
            d.index
            for d in node_gpus(node)
            if d.index not in held and (not res.gpu_kind or (d.kind or node.gpu_kind) == res.gpu_kind)
        }
    )
    if len(free) < res.gpu:
        return None
    return free[: res.gpu]


NO_ROOM = "no free capacity on candidate nodes"  # the refusal that preemption may answer


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
    now: float = 0.0,
) -> Plan:
    """Assign each job to a candidate with room: the best tier first, then by strategy.

    Args:
        jobs: ready jobs, in the order they should be served.
        nodes: live nodes by id.
        allocs: current allocation record per node (missing = nothing reserved).
        skip: per job id, candidate nodes already tried and lost in a race this batch.
        strategy: among fitting nodes of the best tier, ``spread`` takes the one with the
            most free cpu, ``pack`` the one with the least.
        now: the clock: a node with a future hold takes only jobs that end by its start
            or fit beside it (``backfill.may_take``).

    Returns:
        The assignment per node and the jobs that fit nowhere, with the reason.
    """
    skip = skip or {}
    free: dict[str, Free] = {}
    holds: dict[str, list[tuple[str, Reservation]]] = {}
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
                free[node_id], holds[node_id], _ = free_and_holds(node, allocs.get(node_id), now)
            if not free[node_id].fits(job.spec.resources):
                continue
            if holds[node_id] and not may_take_now(free[node_id], job, holds[node_id], now):
                continue  # the room is promised to a waiting job; this one would overstay
            if chosen is None or _better(free[node_id], free[chosen], strategy):
                chosen, chosen_tier = node_id, tier
        if chosen is None:
            live = [c for c in job.candidates if c in nodes]
            reason = NO_ROOM if live else "candidate nodes are gone"
            result.refused.append((job, reason))
            continue
        free[chosen] = free[chosen].minus(job.spec.resources)
        if holds.get(chosen):
            # Its own future hold, if it had one there, is its reservation from now on.
            own = attempt_key(job.job_id, job.attempt)
            holds[chosen] = [h for h in holds[chosen] if h[0] != own]
        result.assign.setdefault(chosen, []).append(job)
    return result


@dataclass(frozen=True, slots=True)
class Binding:
    """One job placed on a node: its scratch directory, whether this write reserved it
    (False: the attempt already held the reservation, a redelivery), and the GPU indices
    its reservation holds."""

    job: JobReady
    node_id: str
    scratch_dir: str
    new: bool
    gpu_devices: Sequence[int] = ()


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
        that no longer fit (another binder took the room since the plan was made, or too
        few GPUs of the asked kind are free).
    """
    free, holds, expired = free_and_holds(node, alloc, now)
    reservations = dict(alloc.reservations)
    if expired:
        # Future holds nobody came back for go with this write (backfill.EXPIRY).
        live = {k for k, _ in holds}
        reservations = {k: r for k, r in reservations.items() if not r.starts_at or k in live}
    won: list[Binding] = []
    lost: list[JobReady] = []
    for job in jobs:
        key = attempt_key(job.job_id, job.attempt)
        held = reservations.get(key)
        if held is not None and not held.starts_at:  # a redelivery: already ours on this node
            won.append(Binding(job, node.node_id, held.scratch_dir, False, held.gpu_devices))
            continue
        res = job.spec.resources
        if not free.fits(res) or (holds and not may_take_now(free, job, holds, now)):
            lost.append(job)
            continue
        gpus: list[int] = []
        if res.gpu:
            picked = pick_gpus(node, reservations, res)
            if picked is None:
                lost.append(job)
                continue
            gpus = picked
        reservation = new_reservation(node, job, now, gpus)
        free = free.minus(res)
        reservations[key] = reservation
        if holds:
            holds = [h for h in holds if h[0] != key]  # its own future hold, if any, is now this
        won.append(Binding(job, node.node_id, reservation.scratch_dir, True, reservation.gpu_devices))
    changed = any(b.new for b in won) or expired
    return (Allocation(node_id=node.node_id, reservations=reservations) if changed else None), won, lost


def new_reservation(
    node: NodeInfo, job: JobReady, now: float, gpus: list[int], waiting_for: list[str] | None = None
) -> Reservation:
    """``job``'s reservation on ``node`` made at ``now``: its scratch directory, GPUs, what
    preemption weighs (preempting.py), when it has ended at the latest (backfill.py), and
    for a preemption's hold the victims it waits for."""
    spec = job.spec
    return Reservation(
        resources=spec.resources,
        scratch_dir=f"{node.work_dir}/{job.job_id}-{job.attempt}" if node.work_dir else "",
        at=now,
        partition=job.partition,
        gpu_devices=gpus,
        priority=spec.priority,
        tenant=spec.tenant,
        queue=spec.queue,
        preemptible=spec.preemptible,
        ends_by=ends_by(now, spec.timeouts.run),
        waiting_for=waiting_for or [],
    )


def may_take_now(free: Free, job: JobReady, holds: list[tuple[str, Reservation]], now: float) -> bool:
    """Whether ``job`` may take room now beside a node's future holds (its own excepted)."""
    spec = job.spec
    own = attempt_key(job.job_id, job.attempt)
    return may_take(
        (free.cpu_milli, free.memory_mb, free.gpu, free.disk_mb),
        spec.resources,
        ends_by(now, spec.timeouts.run),
        holds,
        own,
    )


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
