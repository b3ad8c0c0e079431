"""The resource limits (setrlimit) every attempt's first process gets before it executes anything.

They apply on every isolation level, with or without cgroups. Where a cgroup limits memory
and processes for the attempt as a whole, the rlimits are only a backstop and are set well
above it, so that the cgroup's verdict (``oom``, ``pids_exceeded``) is what the job sees;
without a cgroup they are the only limits there are. All of it is a pure function of the
attempt's reservation and the node's settings.
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass

# Virtual address space is not memory: runtimes reserve far more than they touch (a Go
# program, a JVM, glibc's per-thread arenas), so with a cgroup the address space limit
# leaves this much room over the memory limit.
ADDRESS_HEADROOM_MB = 4096
# Without a cgroup the address space limit is the only memory limit: twice the reservation
# plus this much for the interpreter's and libraries' own mappings.
ADDRESS_BASE_MB = 256
CPU_GRACE_SECONDS = 5  # CPU time beyond the run timeout before SIGXCPU (the timeout acts first)
# The node's cores, the default for attempt_rlimits' ``cpus``: what one process can burn
# at most per second of wall time (os.cpu_count, not the affinity mask, which a process
# may widen).
NODE_CPUS = os.cpu_count() or 1
# The process count of RLIMIT_NPROC is per user, shared by every process running as that
# uid; with a pids cgroup per attempt it is only a backstop this many times the attempt's own.
NPROC_BACKSTOP_FACTOR = 16


@dataclass(frozen=True, slots=True)
class Rlimit:
    """One limit: a ``resource.RLIMIT_*`` constant with its soft and hard values."""

    resource: int
    soft: int
    hard: int


def address_space_mb(memory_mb: int, cgroup_memory: bool) -> int:
    """RLIMIT_AS of an attempt, in MiB.

    Args:
        memory_mb: the memory it reserved.
        cgroup_memory: whether a cgroup limits its memory (then this is only a backstop).

    Returns:
        The limit.
    """
    if cgroup_memory:
        return memory_mb + ADDRESS_HEADROOM_MB
    return 2 * memory_mb + ADDRESS_BASE_MB


def attempt_rlimits(
    memory_mb: int,
    run_timeout: float,
    open_files: int,
    pids_max: int,
    *,
    cgroup_memory: bool,
    cgroup_pids: bool,
    cpus: int = NODE_CPUS,
    own_uid: bool = False,
) -> tuple[Rlimit, ...]:
    """The rlimits of an attempt's processes.

    Args:
        memory_mb: the memory it reserved.
        run_timeout: its run timeout in seconds (RLIMIT_CPU is a little above what it
            can use in that time).
        open_files: ``JOBMESH_ATTEMPT_OPEN_FILES``.
        pids_max: ``JOBMESH_ATTEMPT_PIDS_MAX``.
        cgroup_memory: whether a cgroup limits its memory.
        cgroup_pids: whether a cgroup limits its processes.
        cpus: the node's cores (:data:`NODE_CPUS`), which RLIMIT_CPU is scaled by.
        own_uid: whether the attempt runs as a uid of its own, one that neither the
            executor nor another attempt runs as; only then is RLIMIT_NPROC set.

    Returns:
        RLIMIT_AS, RLIMIT_CPU, RLIMIT_NOFILE, RLIMIT_NPROC (with ``own_uid`` only) and
        RLIMIT_CORE (0: no core dumps).
    """
    address = address_space_mb(memory_mb, cgroup_memory) * 1024 * 1024
    cpu = cpu_seconds(run_timeout, cpus)
    limits = [
        Rlimit(resource.RLIMIT_AS, address, address),
        # SIGXCPU at the soft limit, SIGKILL at the hard one.
        Rlimit(resource.RLIMIT_CPU, cpu, cpu + CPU_GRACE_SECONDS),
        Rlimit(resource.RLIMIT_NOFILE, open_files, open_files),
    ]
    if own_uid:
        # RLIMIT_NPROC counts every process of the uid, not the attempt's: as the
        # executor's own uid it would count the executor, its handler workers and every
        # other attempt, and refuse a job's fork for what others run. Only a uid the
        # attempt has to itself makes it the attempt's limit.
        nproc = pids_max * NPROC_BACKSTOP_FACTOR if cgroup_pids else pids_max
        limits.append(Rlimit(resource.RLIMIT_NPROC, nproc, nproc))
    limits.append(Rlimit(resource.RLIMIT_CORE, 0, 0))
    return tuple(limits)


def cpu_seconds(run_timeout: float, cpus: int) -> int:
    """RLIMIT_CPU's soft limit for a run timeout: what ``cpus`` cores can use in it, plus a grace.

    CPU time counts every thread of a process, so a limit of the wall-clock timeout would
    stop a job with 4 busy threads after a quarter of it (SIGXCPU). Scaled by the node's
    cores it can never be reached before the run timeout, which stops the job first and
    says so; it stays as the backstop for a job the executor no longer watches (it died).
    Dropping it where a cgroup's cpu quota applies (the other way out) would lose that
    backstop wherever there is a cgroup, and scaling needs to know nothing of which
    controllers a node has.

    Args:
        run_timeout: the run timeout in seconds.
        cpus: the node's cores (at least 1 is assumed).

    Returns:
        The limit in seconds of CPU time.
    """
    return math.ceil(run_timeout * max(cpus, 1)) + CPU_GRACE_SECONDS


def cpu_limit(limits: tuple[Rlimit, ...]) -> Rlimit | None:
    """The RLIMIT_CPU among ``limits`` (None when there is none).

    Args:
        limits: an attempt's rlimits (:func:`attempt_rlimits`).

    Returns:
        Its CPU-time limit.
    """
    return next((limit for limit in limits if limit.resource == resource.RLIMIT_CPU), None)


def apply_rlimits(limits: tuple[Rlimit, ...]) -> None:
    """Set ``limits`` on the calling process (the forked child, before it executes the job).

    A hard limit above the current hard limit is lowered to it (only root may raise one).
    """
    for limit in limits:
        _, hard_now = resource.getrlimit(limit.resource)
        hard = limit.hard if hard_now == resource.RLIM_INFINITY else min(limit.hard, hard_now)
        resource.setrlimit(limit.resource, (min(limit.soft, hard), hard))
