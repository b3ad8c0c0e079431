"""The resource limits (setrlimit) every attempt's first process gets before it executes anything.

They apply on every isolation level, with or without cgroups. Where a cgroup limits memory
and processes for the attempt as a whole, the rlimits are only a backstop and are set well
above it, so that the cgroup's verdict (``oom``, ``pids_exceeded``) is what the job sees;
without a cgroup they are the only limits there are. All of it is a pure function of the
attempt's reservation and the node's settings.
"""

from __future__ import annotations

import math
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
# The process count of RLIMIT_NPROC is per user, shared by every attempt running as that
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
) -> tuple[Rlimit, ...]:
    """The rlimits of an attempt's processes.

    Args:
        memory_mb: the memory it reserved.
        run_timeout: its run timeout in seconds (RLIMIT_CPU is a little above it).
        open_files: ``JOBMESH_ATTEMPT_OPEN_FILES``.
        pids_max: ``JOBMESH_ATTEMPT_PIDS_MAX``.
        cgroup_memory: whether a cgroup limits its memory.
        cgroup_pids: whether a cgroup limits its processes.

    Returns:
        RLIMIT_AS, RLIMIT_CPU, RLIMIT_NOFILE, RLIMIT_NPROC and RLIMIT_CORE (0: no core dumps).
    """
    address = address_space_mb(memory_mb, cgroup_memory) * 1024 * 1024
    cpu = math.ceil(run_timeout) + CPU_GRACE_SECONDS
    nproc = pids_max * NPROC_BACKSTOP_FACTOR if cgroup_pids else pids_max
    return (
        Rlimit(resource.RLIMIT_AS, address, address),
        # SIGXCPU at the soft limit, SIGKILL at the hard one.
        Rlimit(resource.RLIMIT_CPU, cpu, cpu + CPU_GRACE_SECONDS),
        Rlimit(resource.RLIMIT_NOFILE, open_files, open_files),
        Rlimit(resource.RLIMIT_NPROC, nproc, nproc),
        Rlimit(resource.RLIMIT_CORE, 0, 0),
    )


def apply_rlimits(limits: tuple[Rlimit, ...]) -> None:
    """Set ``limits`` on the calling process (the forked child, before it executes the job).

    A hard limit above the current hard limit is lowered to it (only root may raise one).
    """
    for limit in limits:
        _, hard_now = resource.getrlimit(limit.resource)
        hard = limit.hard if hard_now == resource.RLIM_INFINITY else min(limit.hard, hard_now)
        resource.setrlimit(limit.resource, (min(limit.soft, hard), hard))
