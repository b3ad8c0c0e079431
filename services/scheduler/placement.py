"""Placement: which nodes may run a job, best first. Pure functions of a node snapshot.

Hard constraints filter (runtime, isolation, arch, labels, gpu kind, handler, static
capacity); soft scores order what is left. The binder checks live free capacity; the
scheduler ranks on what nodes advertise.
"""

from __future__ import annotations

from typing import Iterable

from jobmesh.messages.v1 import JobSpec, NodeInfo, NoopRuntime

ISOLATION_LEVELS = {"process": 0, "sandbox": 1, "container": 2, "vm": 3}


def runtime_kind(spec: JobSpec) -> str:
    return "noop" if isinstance(spec.runtime, NoopRuntime) else "process"


def misfit(spec: JobSpec, node: NodeInfo) -> str | None:
    """Why ``node`` can never run ``spec`` (a short reason), or None when it can."""
    res = spec.resources
    cons = spec.constraints
    if node.draining:
        return "node draining"
    if runtime_kind(spec) not in node.runtimes:
        return f"no node with runtime {runtime_kind(spec)}"
    if res.gpu and (node.gpu < res.gpu):
        return f"no node with {res.gpu} gpu" + (f" of kind {res.gpu_kind}" if res.gpu_kind else "")
    if res.gpu_kind and node.gpu_kind != res.gpu_kind:
        return f"no node with gpu kind {res.gpu_kind}"
    if cons.arch and node.arch != cons.arch:
        return f"no node with arch {cons.arch}"
    if cons.isolation and ISOLATION_LEVELS.get(node.isolation, 0) < ISOLATION_LEVELS[cons.isolation]:
        return f"no node with isolation {cons.isolation}"
    if cons.handler and cons.handler not in node.handlers:
        return f"no node hosting handler {cons.handler}"
    for key, value in cons.labels.items():
        if node.labels.get(key) != value:
            return f"no node with label {key}={value}"
    if res.cpu_milli > node.cpu_milli:
        return f"no node with {res.cpu_milli}m cpu"
    if res.memory_mb > node.memory_mb:
        return f"no node with {res.memory_mb} MiB memory"
    if res.disk_mb > node.disk_mb:
        return f"no node with {res.disk_mb} MiB disk"
    return None


def rank(spec: JobSpec, nodes: Iterable[NodeInfo], limit: int = 8) -> tuple[list[str], str]:
    """Candidate node ids for ``spec``, best first, and the reason when there are none.

    Args:
        spec: the job.
        nodes: live nodes.
        limit: how many candidates to return; the binder tries them in order.

    Returns:
        ``(candidates, reason)``; ``reason`` is "" when there is at least one candidate.
    """
    fitting = []
    reason = "no executor node registered"
    for node in nodes:
        why = misfit(spec, node)
        if why is None:
            fitting.append(node)
        else:
            reason = why
    if not fitting:
        return [], reason
    zone = spec.locality.zone
    # Prefer the requested zone, then the most advertised capacity (a spreading default).
    fitting.sort(key=lambda n: (zone != "" and n.zone != zone, -n.cpu_milli, n.node_id))
    return [n.node_id for n in fitting[:limit]], ""
