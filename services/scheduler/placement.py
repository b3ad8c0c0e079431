"""Placement: which nodes may run a job, best first. Pure functions of a node snapshot.

Hard constraints filter: runtime, isolation level, arch, labels, gpu count and kind,
handler, and static fit (a node too small for the request even when empty). Soft scores
order what is left into *tiers* (lower is better): data locality (a node holding the
job's dataset is tier 0; otherwise the zone distance to the nearest node holding it) plus
network proximity (zone distance from the job's preferred zone, by the configured map).
Within a tier, ``spread`` puts the largest nodes first and rotates the start so successive
jobs land on different nodes; ``pack`` puts the smallest first. The binder then checks
live free capacity and, within the best tier, applies the same strategy to what is free.

Jobs with the same placement signature get the same ranking, so it is computed once per
node-set change and cached: a decision among 1,000 nodes is then a dict lookup.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from jobmesh.contract.messages.v1 import (
    ISOLATION_LEVELS,
    RUNTIME_ISOLATION_CEILING,
    HandlerRuntime,
    JobSpec,
    NodeInfo,
    ZoneMap,
)
from jobmesh.contract.messages.v1 import runtime_kind as kind_of_runtime
from jobmesh.runtime.nodes import shape
from jobmesh.scheduler.gangs import gang_candidates

CANDIDATES = 16  # how many ranked nodes travel with a JobReady


def runtime_kind(spec: JobSpec) -> str:
    """The runtime a node must offer (``NodeInfo.runtimes``): the runtime's wire tag."""
    return kind_of_runtime(spec.runtime)


def required_handler(spec: JobSpec) -> str:
    """The handler a node must host: the handler runtime's, else the constraint's ("" for none)."""
    runtime = spec.runtime
    return runtime.handler if isinstance(runtime, HandlerRuntime) else spec.constraints.handler


def misfit(spec: JobSpec, node: NodeInfo) -> str | None:
    """Why ``node`` can never run ``spec`` (a short reason), or None when it can."""
    res = spec.resources
    cons = spec.constraints
    kind = runtime_kind(spec)
    if kind not in node.runtimes:
        return f"no node with runtime {kind}"
    if res.gpu and gpus_of_kind(node, res.gpu_kind) < res.gpu:
        if res.gpu_kind and not gpus_of_kind(node, res.gpu_kind):
            return f"no node with gpu kind {res.gpu_kind}"
        return f"no node with {res.gpu} gpu" + (f" of kind {res.gpu_kind}" if res.gpu_kind else "")
    if cons.arch and node.arch != cons.arch:
        return f"no node with arch {cons.arch}"
    if cons.isolation and _enforced(node.isolation, kind) < ISOLATION_LEVELS[cons.isolation]:
        return f"no node with isolation {cons.isolation}"
    handler = required_handler(spec)
    if handler and handler not in node.handlers:
        return f"no node hosting handler {handler}"
    if spec.network and not node.network:
        return "no node that allows network"
    if spec.network and kind == "handler" and node.isolation != "process":
        # Handler workers are long-lived and shared by jobs: in a sandbox they have no network.
        return "no node whose handler workers may use the network (a process-level node hosting the handler)"
    for key, value in cons.labels.items():
        if node.labels.get(key) != value:
            return f"no node with label {key}={value}"
    if res.cpu_milli > node.cpu_milli:
        return f"no node with {res.cpu_milli}m cpu"
    if res.memory_mb > node.memory_mb:
        return f"no node with {res.memory_mb} MiB memory"
    if res.disk_mb > node.disk_mb:
        return f"no node with {res.disk_mb} MiB disk"
    if node.draining:  # checked last: the reason then means "it would fit, but it drains"
        return "every fitting node is draining"
    return None


def gpus_of_kind(node: NodeInfo, kind: str) -> int:
    """How many of a node's GPUs are of ``kind`` ("" for any): a node with GPUs of several
    kinds lists each device with its own (and advertises no single ``gpu_kind``)."""
    if not kind:
        return node.gpu
    if node.gpu_devices:
        return sum(1 for device in node.gpu_devices if (device.kind or node.gpu_kind) == kind)
    return node.gpu if node.gpu_kind == kind else 0


def _enforced(node_level: str, kind: str) -> int:
    """The level a node enforces for a runtime: its own, capped by what the runtime can run at."""
    ceiling = ISOLATION_LEVELS[RUNTIME_ISOLATION_CEILING.get(kind, "process")]
    return min(ISOLATION_LEVELS.get(node_level, 0), ceiling)


def zone_distance(zones: ZoneMap, a: str, b: str) -> int:
    """Distance between two zones (0 for the same zone; the map is read both ways)."""
    if a == b:
        return 0
    d = zones.distances.get(a, {}).get(b)
    if d is None:
        d = zones.distances.get(b, {}).get(a)
    return zones.default if d is None else d


def signature(spec: JobSpec) -> tuple:
    """Everything placement looks at; jobs with equal signatures rank nodes equally."""
    res, cons, loc = spec.resources, spec.constraints, spec.locality
    return (
        runtime_kind(spec),
        res.cpu_milli,
        res.memory_mb,
        res.gpu,
        res.gpu_kind,
        res.disk_mb,
        cons.arch,
        cons.isolation,
        tuple(sorted(cons.labels.items())),
        required_handler(spec),
        spec.network,
        loc.zone,
        loc.dataset,
    )


class Placement:
    """Rankings over one snapshot of live nodes.

    Args:
        nodes: live nodes.
        zones: the zone distance map.
        strategy: ``spread`` or ``pack``.
        limit: how many candidates to return per job.
    """

    def __init__(
        self, nodes: Iterable[NodeInfo], zones: ZoneMap | None = None, strategy: str = "spread", limit: int = CANDIDATES
    ) -> None:
        self.nodes = list(nodes)
        self.zones = zones or ZoneMap()
        self.strategy = strategy
        self.limit = limit
        self._cache: dict[tuple, tuple[list[str], list[int], str]] = {}
        self._turn: dict[tuple, int] = {}
        self._best: dict[tuple, int] = {}  # how many candidates share the best tier
        self._dataset_zones: dict[str, set[str]] = {}
        self._zone = {node.node_id: node.zone for node in self.nodes}
        self._by_id = {node.node_id: node for node in self.nodes}
        # Real clusters are pools of identical machines: rank each distinct node shape
        # once, not each node, so a new ranking over 1,000 nodes costs a handful of checks.
        classes: dict[tuple, list[NodeInfo]] = {}
        for node in self.nodes:
            for dataset in node.datasets:
                self._dataset_zones.setdefault(dataset, set()).add(node.zone)
            classes.setdefault(shape(node), []).append(node)
        self._classes = [(members[0], sorted(n.node_id for n in members)) for members in classes.values()]

    def place(self, spec: JobSpec) -> tuple[list[str], list[int], str]:
        """Candidates best first, their tiers, and the reason when there are none."""
        return self._place(signature(spec), lambda: spec)

    def place_job(self, job) -> tuple[list[str], list[int], str]:
        """Like :meth:`place` for a backlog job: its signature is precomputed, and its
        spec is decoded only when this signature was never ranked on these nodes.

        A job the binder sent back (its candidates were full) gets the next window of the
        ranking on each new release, so over its retries it reaches every fitting node,
        not only the best ``limit`` of them.
        """
        if job.replicas > 1:
            return self._place_gang(job)
        ids, tiers, reason = self._place(job.sig, lambda: job.spec, window=job.releases)
        if ids and (job.avoid or job.avoid_zones):
            # Rare (a job that failed repeatedly on a node): filter its own copy, so the
            # shared ranking of its signature stays as it is.
            kept = [
                (i, t)
                for i, t in zip(ids, tiers, strict=True)
                if i not in job.avoid and self._zone.get(i, "") not in job.avoid_zones
            ]
            if not kept:
                avoided = ", ".join(sorted(job.avoid | job.avoid_zones))
                return [], [], f"every fitting node is avoided after repeated failures there ({avoided})"
            return [i for i, _ in kept], [t for _, t in kept], ""
        return ids, tiers, reason

    def _place_gang(self, job) -> tuple[list[str], list[int], str]:
        """Every fitting node of a group that could hold the gang (the binder counts the
        room), not only the best ``limit``: a gang of 64 needs 64 of them at least."""
        spec = job.spec
        ranked = self._cache.get(job.sig)
        if ranked is None:
            ranked = self._cache[job.sig] = self._rank(spec)
            self._best[job.sig] = ranked[1].count(ranked[1][0]) if ranked[1] else 0
        ids, tiers, reason = ranked
        if not ids:
            return [], [], reason
        tier_of = dict(zip(ids, tiers, strict=True))
        fitting = [i for i in ids if i not in job.avoid and self._zone.get(i, "") not in job.avoid_zones]
        picked, reason = gang_candidates(fitting, self._by_id, spec.replicas, spec.same, spec.resources)
        return picked, [tier_of[i] for i in picked], reason

    def zone_of(self, node_id: str) -> str:
        """The zone of a live node ("" when it has none or is not live)."""
        return self._zone.get(node_id, "")

    def _place(self, sig: tuple, load_spec, window: int = 0) -> tuple[list[str], list[int], str]:
        ranked = self._cache.get(sig)
        if ranked is None:
            ranked = self._cache[sig] = self._rank(load_spec())
            self._best[sig] = ranked[1].count(ranked[1][0]) if ranked[1] else 0
        ids, tiers, reason = ranked
        if not ids:
            return [], [], reason
        if window and len(ids) > self.limit:
            start = (window * self.limit) % len(ids)
            picked = [(start + k) % len(ids) for k in range(self.limit)]
            return [ids[i] for i in picked], [tiers[i] for i in picked], ""
        if self.strategy == "spread":
            # Rotate inside the best tier so equal jobs do not all try the same nodes first.
            best = self._best[sig]
            turn = self._turn.get(sig, 0)
            self._turn[sig] = turn + 1
            start = turn % best
            head = min(self.limit, best)
            order = [ids[(start + k) % best] for k in range(head)]
            order += ids[best : best + self.limit - head]
            return order, tiers[: len(order)], ""
        return ids[: self.limit], tiers[: self.limit], ""

    def _rank(self, spec: JobSpec) -> tuple[list[str], list[int], str]:
        fitting: list[tuple[int, int, list[str]]] = []
        reasons: Counter[str] = Counter()
        for example, members in self._classes:
            why = misfit(spec, example)
            if why is not None:
                reasons[why] += len(members)
                continue
            size = example.cpu_milli if self.strategy == "pack" else -example.cpu_milli
            fitting.append((self._tier(spec, example), size, members))
        if not fitting:
            reason = reasons.most_common(1)[0][0] if reasons else "no executor node registered"
            return [], [], reason
        fitting.sort(key=lambda f: (f[0], f[1], f[2][0]))
        ids: list[str] = []
        tiers: list[int] = []
        for tier, _, members in fitting:
            ids.extend(members)
            tiers.extend([tier] * len(members))
        return ids, tiers, ""

    def _tier(self, spec: JobSpec, node: NodeInfo) -> int:
        tier = 0
        dataset = spec.locality.dataset
        if dataset and dataset not in node.datasets:
            holders = self._dataset_zones.get(dataset)
            if holders:
                tier += min(zone_distance(self.zones, z, node.zone) for z in holders) + 1
        if spec.locality.zone:
            tier += zone_distance(self.zones, spec.locality.zone, node.zone)
        return tier
