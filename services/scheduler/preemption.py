"""Preemption: which running attempts on one node to stop so a pending job fits there.
A pure function of the running attempts, the pending job, fair-share state and the clock.

The rule, in the order it is applied:

1. **Who may be a victim.** Only an attempt marked preemptible, of strictly lower priority
   than the pending job, and by a margin that depends on its tenant's fair share: a
   tenant over its share gives way to a job ``OVER_SHARE_MARGIN`` (1) level above it, one
   at or under its share only to a job ``UNDER_SHARE_MARGIN`` (2) levels above. A tenant
   that is under its share is owed work; a one-level difference is not reason enough to
   take it away. A tenant the fair-share state does not mention counts as under.
2. **Per node, in order of cost.** Lowest priority first, then the least work lost
   (``now - started_at``: the youngest attempt), then job id and attempt, so equal inputs
   give equal answers. An attempt is taken only while it frees something still short (one
   holding no gpu does not help a gpu job), and only while its queue's cap allows.
3. **Never more than needed.** The taken set is then pruned, costliest first: any victim
   whose release is not needed for the fit is dropped. Because freeing less never makes
   a fit, one pass leaves a minimal set: no victim can be removed and the job still fit.
4. **Queue caps.** At most ``floor(cap * running attempts of the queue)`` attempts of a
   queue are taken by one decision (a queue without a cap: no limit). The caller charges
   earlier preemptions by passing a smaller cap; this function has no memory.
5. **Which node.** Among the nodes that can be freed, the one whose victims cost least:
   the highest victim priority, then the total work lost, then the number of victims,
   then the node id.

Returns None when no node can be freed. Cost: one pass over the running attempts to
count queues and keep the eligible ones by node, and a sort of each node's eligible
attempts: O(n log n).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter

from jobmesh.contract.messages.v1 import Resources

OVER_SHARE_MARGIN = 1  # priority levels a victim over its tenant's share must be below the pending job
UNDER_SHARE_MARGIN = 2  # ... and one at or under its share

# (cpu_milli, memory_mb, gpu) free on a node now, as the binder computes it from jm_alloc.
FreeCapacity = tuple[int, int, int]
_NOTHING: FreeCapacity = (0, 0, 0)
_queue_of = attrgetter("queue")


@dataclass(frozen=True, slots=True)
class RunningAttempt:
    """A running attempt, as preemption sees it."""

    job_id: str
    attempt: int
    node_id: str
    priority: int
    tenant: str
    resources: Resources
    started_at: float
    preemptible: bool
    queue: str


@dataclass(frozen=True, slots=True)
class PendingJob:
    """The job that would run on the freed node (it needs one node)."""

    priority: int
    tenant: str
    resources: Resources


@dataclass(frozen=True, slots=True)
class Preemption:
    """Stop ``victims`` (cheapest first) on ``node_id`` and the pending job fits there."""

    node_id: str
    victims: tuple[RunningAttempt, ...]


def margin_for(over_share: bool) -> int:
    """How many priority levels below the pending job a victim of such a tenant must be."""
    return OVER_SHARE_MARGIN if over_share else UNDER_SHARE_MARGIN


def choose_victims(
    running: Sequence[RunningAttempt],
    pending: PendingJob,
    over_share: Mapping[str, bool],
    caps: Mapping[str, float],
    now: float,
    *,
    free: Mapping[str, FreeCapacity] | None = None,
    nodes: Collection[str] | None = None,
) -> Preemption | None:
    """The cheapest minimal set of attempts on one node whose end lets ``pending`` fit.

    Args:
        running: every running attempt.
        pending: the job to make room for.
        over_share: tenant -> True when it runs more than its fair share.
        caps: queue -> the largest fraction (0..1) of its running attempts one decision
            may preempt; a queue not listed has no cap.
        now: the clock, for the work an attempt would lose.
        free: node id -> what is free there already (a node not listed: nothing).
        nodes: the nodes the pending job may run on (its placement candidates; None: any).
            Its gpu kind, labels and the rest are checked there, not here.
    """
    need = pending.resources
    need_cpu, need_mem, need_gpu = need.cpu_milli, need.memory_mb, need.gpu
    free = free or {}
    top = pending.priority
    # The lowest priority a victim of each kind may have: below these, by the margin.
    below_over = top - OVER_SHARE_MARGIN
    below_under = top - UNDER_SHARE_MARGIN
    # One pass, in C where it can be: the queues' sizes (only those with a cap matter), then
    # the eligible attempts. A priority at or below ``below_under`` is low enough whatever
    # the tenant's share, so the share is looked up only for the level in between.
    per_queue = Counter(map(_queue_of, running)) if caps else Counter()
    eligible = [
        a
        for a in running
        if a.preemptible
        and (a.priority <= below_under or (a.priority <= below_over and over_share.get(a.tenant, False)))
    ]
    by_node: dict[str, list[RunningAttempt]] = {}
    for attempt in eligible:
        if nodes is None or attempt.node_id in nodes:
            by_node.setdefault(attempt.node_id, []).append(attempt)
    allowed = {queue: int(cap * per_queue[queue]) for queue, cap in caps.items()}

    best: tuple[tuple[int, float, int, str], Preemption] | None = None
    for node_id, candidates in by_node.items():
        have_cpu, have_mem, have_gpu = free.get(node_id, _NOTHING)
        short = [need_cpu - have_cpu, need_mem - have_mem, need_gpu - have_gpu]
        if best is not None:
            # The highest victim priority is what a node is judged by first, and the greedy
            # pick takes no attempt above the one that completes the fit: attempts above
            # the best node's can only make a worse set, so they are not even sorted.
            ceiling = best[0][0]
            candidates = [a for a in candidates if a.priority <= ceiling]
        # Cheap bound first: if every candidate together does not free enough, skip the sort.
        if not _enough(short, candidates):
            continue
        candidates.sort(key=lambda a: (a.priority, -a.started_at, a.job_id, a.attempt))  # least work lost: latest start
        chosen = _take(candidates, short, allowed)
        if not chosen:  # None: cannot be freed; []: fits already, which is the binder's to find
            continue
        chosen = _prune(chosen, [need_cpu - have_cpu, need_mem - have_mem, need_gpu - have_gpu])
        cost = (
            max(a.priority for a in chosen),
            sum(now - a.started_at for a in chosen),
            len(chosen),
            node_id,
        )
        if best is None or cost < best[0]:
            best = (cost, Preemption(node_id=node_id, victims=tuple(chosen)))
    return None if best is None else best[1]


def _enough(short: list[int], candidates: list[RunningAttempt]) -> bool:
    cpu, mem, gpu = short
    for a in candidates:
        r = a.resources
        cpu -= r.cpu_milli
        mem -= r.memory_mb
        gpu -= r.gpu
    return cpu <= 0 and mem <= 0 and gpu <= 0


def _take(
    candidates: list[RunningAttempt], short: list[int], allowed: Mapping[str, int]
) -> list[RunningAttempt] | None:
    """Victims in order of cost until nothing is short; None when the node cannot be freed."""
    cpu, mem, gpu = short
    if cpu <= 0 and mem <= 0 and gpu <= 0:
        return []
    used: Counter[str] = Counter()
    chosen: list[RunningAttempt] = []
    for a in candidates:
        r = a.resources
        if not ((cpu > 0 and r.cpu_milli) or (mem > 0 and r.memory_mb) or (gpu > 0 and r.gpu)):
            continue  # frees nothing that is short
        cap = allowed.get(a.queue)
        if cap is not None and used[a.queue] >= cap:
            continue
        used[a.queue] += 1
        chosen.append(a)
        cpu -= r.cpu_milli
        mem -= r.memory_mb
        gpu -= r.gpu
        if cpu <= 0 and mem <= 0 and gpu <= 0:
            return chosen
    return None


def _prune(chosen: list[RunningAttempt], short: list[int]) -> list[RunningAttempt]:
    """Drop, costliest first, every victim the fit does not need."""
    spare = [
        sum(a.resources.cpu_milli for a in chosen) - short[0],
        sum(a.resources.memory_mb for a in chosen) - short[1],
        sum(a.resources.gpu for a in chosen) - short[2],
    ]
    kept = list(chosen)
    for a in reversed(chosen):
        r = a.resources
        if r.cpu_milli <= spare[0] and r.memory_mb <= spare[1] and r.gpu <= spare[2]:
            kept.remove(a)
            spare[0] -= r.cpu_milli
            spare[1] -= r.memory_mb
            spare[2] -= r.gpu
    return kept
