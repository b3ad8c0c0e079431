"""Handler workers inside the node's isolation: the ``spawn`` the executor gives its handler pool.

A worker is a long-lived process that serves many handler jobs, so it gets its boundaries
once, when it starts: a cgroup of its own (``handlers-<n>``) with
``JOBMESH_HANDLER_WORKER_MEMORY_MB`` of memory and the pids limit, rlimits, the sandbox uid,
and at the sandbox level a bubblewrap sandbox without network whose writable directory is
the pool's home. What a sandboxed worker needs read-only besides the system and the Python
installation is bound too: the jobmesh package and the directories of the handler modules.

Because the sandbox is built before any job comes, an attempt's working directory is not
inside it (``ctx.workdir`` names a directory the worker cannot see there); the pool, which
runs in the executor, writes the result file.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import jobmesh
from jobmesh.executor.childprocess import ExitAwareProtocol, PipedProcess, start_piped
from jobmesh.executor.isolation.launch import Launch, LaunchSpec, prepare_launch
from jobmesh.executor.isolation.probe import NodeIsolation

WORKER_TIMEOUT = 30 * 86_400.0  # RLIMIT_CPU of a worker: it lives as long as the executor
WORKER_CPU_MILLI = 1_000_000  # no CPU quota of its own: each job's share is not the worker's


class IsolatedWorker(PipedProcess):
    """A worker process started by :func:`isolated_spawn` (a ``WorkerProcess`` of the pool).

    Args:
        transport: its subprocess transport.
        protocol: its protocol (pipes and exit).
        launch: its cgroup and what killing it takes.
    """

    def __init__(self, transport: asyncio.SubprocessTransport, protocol: ExitAwareProtocol, launch: Launch) -> None:
        super().__init__(transport, protocol)
        self._launch = launch

    def kill(self) -> None:
        """SIGKILL the worker's group and every process of its cgroup."""
        self._launch.signal_all(self.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Release the pipes and remove the worker's cgroup (after killing what is left in it).

        The cgroup's removal kills and waits until it is empty (up to seconds for a process
        stuck in the kernel), so it runs in a thread: the event loop serves the pool's other
        workers, and every attempt of the executor, meanwhile.
        """
        self._transport.close()
        await asyncio.to_thread(self._launch.finish)


def worker_read_only_paths(modules: Sequence[str]) -> tuple[str, ...]:
    """The host paths a sandboxed worker imports from: jobmesh itself and the handler modules.

    Args:
        modules: the handler modules (dotted names or ``.py`` paths).

    Returns:
        Paths to bind read-only (those under the system binds are dropped later).
    """
    paths: set[str] = {os.path.realpath(p) for p in jobmesh.__path__}
    for module in modules:
        if module.endswith(".py") or os.sep in module:
            # The file alone: its directory may be one the sandbox uid cannot enter (a bind
            # keeps a directory's mode), and the worker imports it by its path.
            paths.add(os.path.realpath(module))
            continue
        try:
            spec = importlib.util.find_spec(module.partition(".")[0])
        except (ImportError, ValueError):
            continue  # the pool's start names the module that does not import
        if spec is None:
            continue
        for location in spec.submodule_search_locations or ([spec.origin] if spec.origin else []):
            path = os.path.realpath(location)
            paths.add(path if os.path.isdir(path) else os.path.dirname(path))
    return tuple(sorted(paths))


def isolated_spawn(
    isolation: NodeIsolation, memory_mb: int, modules: Sequence[str]
) -> Callable[[Sequence[str], Mapping[str, str], Path, Sequence[int]], Awaitable[IsolatedWorker]]:
    """The pool's ``spawn``: each worker starts inside the node's isolation.

    Args:
        isolation: the node's isolation.
        memory_mb: each worker's memory limit (``JOBMESH_HANDLER_WORKER_MEMORY_MB``).
        modules: the handler modules (bound read-only in a sandbox).

    Returns:
        ``spawn(argv, env, cwd, pass_fds) -> worker``.
    """
    numbers = itertools.count(1)
    extra_ro = worker_read_only_paths(modules) if isolation.sandbox is not None else ()

    async def spawn(argv: Sequence[str], env: Mapping[str, str], cwd: Path, pass_fds: Sequence[int]) -> IsolatedWorker:
        spec = LaunchSpec(
            argv=argv,
            workdir=cwd,
            cgroup_name=f"handlers-{os.getpid()}-{next(numbers)}",
            memory_mb=memory_mb,
            cpu_milli=WORKER_CPU_MILLI,
            timeout=WORKER_TIMEOUT,
            network=False,
            extra_ro=extra_ro,
            pass_fds=tuple(pass_fds),
        )
        # Making the cgroup (and handing the directory over) is file-system I/O: in a thread.
        launch = await asyncio.to_thread(prepare_launch, isolation, spec)
        try:
            transport, protocol = await start_piped(
                launch.argv, cwd=cwd, env=env, pass_fds=pass_fds, preexec=launch.preexec
            )
        except BaseException:
            await asyncio.to_thread(launch.finish)
            raise
        return IsolatedWorker(transport, protocol, launch)

    return spawn
