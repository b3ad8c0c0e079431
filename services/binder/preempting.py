"""Preemption at the binder: the inputs of the victim rule (``preemption.choose_victims``)
read off the allocation records, and the *hold* that keeps the freed room for the job.

The binder decides because it alone sees every reservation of every partition, with the
priority, tenant, queue and opt-out each was made with (``Reservation``). A ready job that
fits on none of its candidates, asks to preempt (``JobSpec.preempt``) and is allowed to by
its queue (``QueueConfig.preempt_min_priority``) gets a set of victims on one candidate.
In one compare-and-set on that node's record the binder writes the job's reservation as a
hold, ``waiting_for`` the victims; then it sends each victim an ``AttemptCancel`` whose
reason starts with ``preempted``. The executor stops it (SIGTERM, SIGKILL after its grace)
and reports it failed ``preempted``, which the scheduler retries at once without counting
it (a disruption, like a drain). The job is refused this round with the reason.

A hold counts against the node like any reservation, so while the victims stop the node
is booked beyond its capacity by exactly them, and once they have gone the room is the
job's: nothing else is placed there meanwhile, not even the victims' own next attempts,
which would otherwise take it back and be preempted again. When the job comes back (its
next release), the binder finds its reservation and binds it there as soon as no victim
is held any more. Because the hold is in the record, every binder replica sees it: the
victims are not chosen twice, by anyone. A hold ends as any reservation does, with the
attempt's terminal event; one for an attempt never bound (cancelled, expired) names no
node, and is found by the attempt's key.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

import msgspec

from jobmesh.binder.allocation import free_on, new_reservation, node_gpus, pick_gpus
from jobmesh.binder.preemption import NodeFree, PendingJob, Preemption, RunningAttempt, choose_victims
from jobmesh.contract.ids import attempt_key, split_attempt_key
from jobmesh.contract.messages.v1 import Allocation, JobReady, NodeInfo, QueueConfig, Reservation

PREEMPTED_REASON = "preempted"  # the AttemptCancel reason's first word (the executor's stop code)
PREEMPTING = "preempting "  # how the refusal of a job whose hold waits begins
# How soon such a job is released again (JobUnplaceable.retry_after): its victims stop
# within the node's grace, and the held room must not sit idle for the scheduler's backoff.
HOLD_RETRY_SECONDS = 1.0


def waiting_on(alloc: Allocation, reservation: Reservation) -> list[str]:
    """The victims a hold still waits for: those of its ``waiting_for`` still on the node
    (empty for a plain reservation, or a hold whose victims have all gone)."""
    return [key for key in reservation.waiting_for if key in alloc.reservations]


def claimed_victims(allocs: Mapping[str, Allocation]) -> set[str]:
    """Every attempt a hold waits for: already chosen, not to be chosen again."""
    return {
        key
        for alloc in allocs.values()
        for r in alloc.reservations.values()
        if r.waiting_for
        for key in waiting_on(alloc, r)
    }


def running_attempts(
    allocs: Mapping[str, Allocation], nodes: Mapping[str, NodeInfo], claimed: set[str]
) -> list[RunningAttempt]:
    """Every reservation on a live node as the victim rule sees it, less those ``claimed``
    by a preemption under way (their room is promised already)."""
    running = []
    for node_id, alloc in allocs.items():
        node = nodes.get(node_id)
        if node is None:
            continue
        for key, r in alloc.reservations.items():
            if key in claimed or r.waiting_for or r.starts_at:
                continue  # chosen already, or a hold not bound yet: nothing runs there
            job_id, attempt = split_attempt_key(key)
            running.append(
                RunningAttempt(
                    job_id=job_id,
                    attempt=attempt,
                    node_id=node_id,
                    priority=r.priority,
                    tenant=r.tenant,
                    resources=r.resources,
                    started_at=r.at,
                    preemptible=r.preemptible,
                    queue=r.queue,
                    gpu_kind=(r.resources.gpu_kind or node.gpu_kind) if r.resources.gpu else "",
                )
            )
    return running


def over_share(allocs: Mapping[str, Allocation], weight: Callable[[str], float], asking: str) -> dict[str, bool]:
    """Which tenants hold more of the reserved cpu than their weight's share of it.

    The shares are among the tenants holding reservations and the asking job's tenant,
    weighted as fair share weighs them (``tenant.<name>`` in jm_config). Cluster-wide and
    by cpu: preemption frees room on nodes, whatever queue it is used by.
    """
    held: dict[str, int] = {asking: 0}
    for alloc in allocs.values():
        for r in alloc.reservations.values():
            if not r.starts_at:  # a future hold holds nothing yet
                held[r.tenant] = held.get(r.tenant, 0) + r.resources.cpu_milli
    total = sum(held.values())
    weights = {tenant: weight(tenant) for tenant in held}
    weight_total = sum(weights.values())
    if total <= 0 or weight_total <= 0:
        return {}
    return {tenant: held[tenant] / total > weights[tenant] / weight_total for tenant in held}


def free_of_kind(node: NodeInfo, alloc: Allocation | None, kind: str) -> NodeFree:
    """What is free on ``node`` now, its gpus counted only of ``kind`` ("" for any)."""
    free = free_on(node, alloc)
    gpus = free.gpu
    if kind:
        held = {i for r in (alloc.reservations.values() if alloc else ()) for i in r.gpu_devices}
        gpus = sum(1 for d in node_gpus(node) if d.index not in held and (d.kind or node.gpu_kind) == kind)
    return (free.cpu_milli, free.memory_mb, gpus, free.disk_mb)


def plan_preemption(
    job: JobReady,
    queues: Callable[[str], QueueConfig],
    weight: Callable[[str], float],
    allocs: Mapping[str, Allocation],
    nodes: Mapping[str, NodeInfo],
    now: float,
) -> Preemption | None:
    """The victims whose stop lets ``job`` fit on one of its candidates, or None.

    None also when the job does not ask to preempt, or its queue does not allow it at the
    job's priority (the configuration may have changed since the job was submitted).

    Only the candidates' records are turned into the rule's inputs (victims, and the holds
    that claimed some already, are on the node they free); the fair-share state and the
    capped queues' sizes (and their attempts other holds claimed, charged to their caps)
    are counted over every record, one pass each.

    Args:
        job: a ready job that fit on none of its candidates.
        queues: a queue's configuration (whether it may preempt; its cap as a victim).
        weight: a tenant's fair-share weight.
        allocs: every node's allocation record.
        nodes: the live nodes.
        now: the clock (the work a victim would lose).
    """
    spec = job.spec
    if not spec.preempt or not queues(spec.queue).allows_preemption(spec.priority):
        return None
    usable = [c for c in job.candidates if c in nodes and not nodes[c].draining]
    if not usable:
        return None
    nearby = {c: allocs[c] for c in usable if c in allocs}
    running = running_attempts(nearby, nodes, claimed_victims(nearby))
    if not running:
        return None
    caps = {}
    for queue in {a.queue for a in running}:
        fraction = queues(queue).preemptible_fraction
        if fraction < 1:
            caps[queue] = fraction
    sizes: Counter[str] | None = None
    already: Counter[str] = Counter()
    if caps:
        # A capped queue's running attempts, and those of them earlier preemptions are
        # stopping already: they count against its cap (a cap per decision alone would let
        # a run of urgent jobs, one victim each, take the whole queue).
        sizes = Counter()
        for alloc in allocs.values():
            for r in alloc.reservations.values():
                if r.waiting_for:
                    for victim in waiting_on(alloc, r):
                        queue = alloc.reservations[victim].queue
                        if queue in caps:
                            already[queue] += 1
                elif r.queue in caps and not r.starts_at:
                    sizes[r.queue] += 1
    kind = spec.resources.gpu_kind
    free = {c: free_of_kind(nodes[c], allocs.get(c), kind) for c in usable}
    pending = PendingJob(priority=spec.priority, tenant=spec.tenant, resources=spec.resources)
    return choose_victims(
        running,
        pending,
        over_share(allocs, weight, spec.tenant),
        caps,
        now,
        free=free,
        nodes=usable,
        queue_sizes=sizes,
        already=already,
    )


def describe(preemption: Preemption) -> str:
    """The refusal reason of a job whose preemption has just begun, for its waits."""
    count = len(preemption.victims)
    lower = max(v.priority for v in preemption.victims)
    return (
        f"{PREEMPTING}{count} attempt{'s' if count != 1 else ''} of priority {lower} or lower"
        f" on {preemption.node_id}; the room is held for it and it starts when they have stopped"
    )


def hold(
    node: NodeInfo, alloc: Allocation, job: JobReady, victims: list[str], now: float
) -> tuple[Allocation | None, list[str] | None]:
    """The compare-and-set step that books ``job``'s room on ``node`` as a hold waiting for
    ``victims``; pure, as it runs again on the fresh record after a lost race.

    The record it writes must keep every promise: no victim is claimed by another hold
    already, and once the victims have gone the job fits beside everything else on the
    node (another replica may have reserved or held room there since the plan).

    Returns:
        The record to write (None: no write), and the victims the job's hold waits for:
        ``victims`` for a new hold, the stored ones when the job holds room there already
        (another replica, an earlier delivery), None when it holds none (the preemption is
        planned again on its next release).
    """
    key = attempt_key(job.job_id, job.attempt)
    existing = alloc.reservations.get(key)
    if existing is not None:
        # Held already: by a preemption (its victims), or by backfill (no preemption here).
        return None, (None if existing.starts_at else waiting_on(alloc, existing))
    if any(v not in alloc.reservations for v in victims) or claimed_victims({node.node_id: alloc}) & set(victims):
        return None, None
    spec = job.spec
    res = spec.resources
    after = {k: r for k, r in alloc.reservations.items() if k not in victims}
    # What is free once the victims have gone: every other reservation and hold counts.
    if not free_on(node, Allocation(node_id=alloc.node_id, reservations=after)).fits(res):
        return None, None
    gpus: list[int] = []
    if res.gpu:
        picked = pick_gpus(node, after, res)
        if picked is None:
            return None, None
        gpus = picked
    # Its end bound is refreshed when it is bound (bound_hold).
    reservation = new_reservation(node, job, now, gpus, waiting_for=list(victims))
    return Allocation(node_id=alloc.node_id, reservations={**alloc.reservations, key: reservation}), list(victims)


def bound_hold(alloc: Allocation, key: str, now: float) -> tuple[Allocation | None, None]:
    """The compare-and-set step that turns a hold whose victims have gone into a plain
    reservation (``waiting_for`` emptied) as it is bound: from then on it runs, and may be
    a victim itself."""
    held = alloc.reservations.get(key)
    if held is None or not held.waiting_for:
        return None, None
    # Its run timeout's clock starts now, not when the room was held: the bound moves with it.
    bound = held.ends_by + max(0.0, now - held.at) if held.ends_by else 0.0
    plain = msgspec.structs.replace(held, waiting_for=[], ends_by=bound)
    return Allocation(node_id=alloc.node_id, reservations={**alloc.reservations, key: plain}), None


def waiting_text(node_id: str, waiting: list[str]) -> str:
    """The refusal reason of a job whose hold still waits for its victims."""
    count = len(waiting)
    return (
        f"{PREEMPTING}{count} attempt{'s' if count != 1 else ''} on {node_id}; the room is held for it"
        " and it starts when they have stopped"
    )
