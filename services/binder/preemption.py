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
   holding no gpu does not help a gpu job, nor one holding gpus of another kind than the
   job asks for). What is short: cpu, memory, gpus (of the job's kind) and disk.
3. **Never more than needed.** The taken set is then pruned, costliest first: any victim
   whose release is not needed for the fit is dropped. Because freeing less never makes
   a fit, one pass leaves a minimal set: no victim can be removed and the job still fit.
   The set is chosen greedily, so it is minimal, not necessarily the cheapest one.
4. **Queue caps.** At most ``floor(cap * running attempts of the queue)`` attempts of a
   queue are taken by one decision (a queue without a cap: no limit). The caller charges
   earlier preemptions by passing a smaller cap; this function has no memory. Caps are
   checked on the pruned set, not while taking: a cap spent on a small young attempt the
   pruning then drops would hide a set that fits. When a queue is over its cap, its
   candidates are cut to the ``allowed`` largest (what they free of the shortfall) and
   steps 2-3 run again; each round fixes at least one queue, so there are at most as
   many rounds as capped queues.
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

# (cpu_milli, memory_mb, gpu, disk_mb) free on a node now, as the binder computes it from
# jm_alloc; ``gpu`` counts only free GPUs of the pending job's kind (any kind when it names
# none). Unlike gangs.FreeCapacity, a node missing from the mapping has *nothing* free:
# preemption is only asked about nodes that are full, and assuming room there would
# preempt too little.
NodeFree = tuple[int, int, int, int]
_NOTHING: NodeFree = (0, 0, 0, 0)
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
    # The kind of the GPUs it holds ("" when none or unknown): its gpus count toward a job
    # asking for a kind only when this names that kind.
    gpu_kind: str = ""


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
    free: Mapping[str, NodeFree] | None = None,
    nodes: Collection[str] | None = None,
    queue_sizes: Mapping[str, int] | None = None,
    already: Mapping[str, int] | None = None,
) -> Preemption | None:
    """A minimal set of attempts on one node, chosen greedily by cost, whose end lets
    ``pending`` fit (see the module's docstring for the rule; the cheapest set is not
    guaranteed).

    Args:
        running: every running attempt.
        pending: the job to make room for.
        over_share: tenant -> True when it runs more than its fair share.
        caps: queue -> the largest fraction (0..1) of its running attempts one decision
            may preempt; a queue not listed has no cap.
        now: the clock, for the work an attempt would lose.
        free: node id -> what is free there already, gpus of ``pending``'s kind only (a
            node not listed: nothing; see ``NodeFree``).
        nodes: the nodes the pending job may run on (its placement candidates; None: any).
            Its gpu kind, labels and the rest are checked there, not here.
        queue_sizes: queue -> its running attempts, for the caps; None counts ``running``
            (a caller that passes only some nodes' attempts passes the whole counts).
        already: queue -> its attempts earlier preemptions are stopping: charged to its cap.
    """
    need = pending.resources
    kind = need.gpu_kind
    free = free or {}
    top = pending.priority
    # The lowest priority a victim of each kind may have: below these, by the margin.
    below_over = top - OVER_SHARE_MARGIN
    below_under = top - UNDER_SHARE_MARGIN
    # One pass, in C where it can be: the queues' sizes (only those with a cap matter), then
    # the eligible attempts. A priority at or below ``below_under`` is low enough whatever
    # the tenant's share, so the share is looked up only for the level in between.
    per_queue: Mapping[str, int] = Counter()
    if caps:
        per_queue = queue_sizes if queue_sizes is not None else Counter(map(_queue_of, running))
    eligible = [
        a
        for a in running
        if a.preemptible
        and (a.priority <= below_under or (a.priority <= below_over and over_share.get(a.tenant, False)))
    ]
    # A set, whatever collection the caller passes: one membership test per attempt.
    wanted_nodes = None if nodes is None else frozenset(nodes)
    by_node: dict[str, list[RunningAttempt]] = {}
    for attempt in eligible:
        if wanted_nodes is None or attempt.node_id in wanted_nodes:
            by_node.setdefault(attempt.node_id, []).append(attempt)
    charged = already or {}
    allowed = {queue: max(0, int(cap * per_queue.get(queue, 0)) - charged.get(queue, 0)) for queue, cap in caps.items()}

    best: tuple[tuple[int, float, int, str], Preemption] | None = None
    for node_id, candidates in by_node.items():
        have = free.get(node_id, _NOTHING)
        short = (
            need.cpu_milli - have[0],
            need.memory_mb - have[1],
            need.gpu - have[2],
            need.disk_mb - have[3],
        )
        if best is not None:
            # The highest victim priority is what a node is judged by first, and the greedy
            # pick takes no attempt above the one that completes the fit: attempts above
            # the best node's can only make a worse set, so they are not even sorted.
            ceiling = best[0][0]
            candidates = [a for a in candidates if a.priority <= ceiling]
        # Cheap bound first: if every candidate together does not free enough, skip the sort.
        if not _enough(short, candidates, kind):
            continue
        candidates.sort(key=_cost_order)
        chosen = _take(candidates, short, kind)
        if not chosen:  # None: cannot be freed; []: fits already, which is the binder's to find
            continue
        chosen = _prune(chosen, short, kind)
        if allowed and _over_caps(chosen, allowed):
            # Retry over every candidate of the node, not the ceiling's cut: which of a
            # queue's attempts are its largest must not depend on the nodes seen before.
            everyone = sorted(by_node[node_id], key=_cost_order)
            chosen = _within_caps(everyone, short, kind, allowed)
            if not chosen:
                continue
        cost = (
            max(a.priority for a in chosen),
            sum(now - a.started_at for a in chosen),
            len(chosen),
            node_id,
        )
        if best is None or cost < best[0]:
            best = (cost, Preemption(node_id=node_id, victims=tuple(chosen)))
    return None if best is None else best[1]


def _cost_order(a: RunningAttempt) -> tuple[int, float, str, int]:
    return (a.priority, -a.started_at, a.job_id, a.attempt)  # least work lost: latest start


def _frees(a: RunningAttempt, kind: str) -> tuple[int, int, int, int]:
    """What ending ``a`` frees for a job asking for gpus of ``kind`` ("" for any)."""
    r = a.resources
    gpu = r.gpu if not kind or a.gpu_kind == kind else 0
    return (r.cpu_milli, r.memory_mb, gpu, r.disk_mb)


def _enough(short: tuple[int, ...], candidates: list[RunningAttempt], kind: str) -> bool:
    cpu, mem, gpu, disk = short
    for a in candidates:
        f = _frees(a, kind)
        cpu -= f[0]
        mem -= f[1]
        gpu -= f[2]
        disk -= f[3]
    return cpu <= 0 and mem <= 0 and gpu <= 0 and disk <= 0


def _take(candidates: list[RunningAttempt], short: tuple[int, ...], kind: str) -> list[RunningAttempt] | None:
    """Victims in order of cost until nothing is short; None when the node cannot be freed."""
    cpu, mem, gpu, disk = short
    if cpu <= 0 and mem <= 0 and gpu <= 0 and disk <= 0:
        return []
    chosen: list[RunningAttempt] = []
    for a in candidates:
        f = _frees(a, kind)
        if not ((cpu > 0 and f[0]) or (mem > 0 and f[1]) or (gpu > 0 and f[2]) or (disk > 0 and f[3])):
            continue  # frees nothing that is short
        chosen.append(a)
        cpu -= f[0]
        mem -= f[1]
        gpu -= f[2]
        disk -= f[3]
        if cpu <= 0 and mem <= 0 and gpu <= 0 and disk <= 0:
            return chosen
    return None


def _prune(chosen: list[RunningAttempt], short: tuple[int, ...], kind: str) -> list[RunningAttempt]:
    """Drop, costliest first, every victim the fit does not need."""
    frees = [_frees(a, kind) for a in chosen]
    spare = [sum(f[d] for f in frees) - short[d] for d in range(4)]
    kept = list(chosen)
    for a, f in zip(reversed(chosen), reversed(frees), strict=True):
        if all(f[d] <= spare[d] for d in range(4)):
            kept.remove(a)
            for d in range(4):
                spare[d] -= f[d]
    return kept


def _over_caps(chosen: list[RunningAttempt], allowed: Mapping[str, int]) -> list[str]:
    """The capped queues ``chosen`` takes more attempts of than their caps allow, sorted."""
    used = Counter(map(_queue_of, chosen))
    return sorted(q for q, n in used.items() if q in allowed and n > allowed[q])


def _within_caps(
    candidates: list[RunningAttempt], short: tuple[int, ...], kind: str, allowed: Mapping[str, int]
) -> list[RunningAttempt] | None:
    """Take and prune as ``_take`` and ``_prune`` do, within the queue caps.

    ``candidates`` are in order of cost. Each round that leaves a queue over its cap keeps
    only that queue's ``allowed`` largest candidates (by the share of the shortfall each
    frees, cost order breaking ties) and tries again: a queue cut so can no longer exceed
    its cap, so the rounds end. None when no set within the caps is found."""
    while True:
        chosen = _take(candidates, short, kind)
        if not chosen:
            return None
        chosen = _prune(chosen, short, kind)
        over = _over_caps(chosen, allowed)
        if not over:
            return chosen
        for queue in over:
            mine = [(i, a) for i, a in enumerate(candidates) if a.queue == queue]
            mine.sort(key=lambda e: (-_share(_frees(e[1], kind), short), e[0]))
            keep = {i for i, _ in mine[: allowed[queue]]}
            candidates = [a for i, a in enumerate(candidates) if a.queue != queue or i in keep]


def _share(frees: tuple[int, int, int, int], short: tuple[int, ...]) -> float:
    """How much of the shortfall ``frees`` covers: per short resource, the covered fraction."""
    return sum(min(f, s) / s for f, s in zip(frees, short, strict=True) if s > 0)
