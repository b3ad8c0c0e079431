"""Per-attempt control groups: memory, cpu and pids limits, what was hit, and killing every process.

One :class:`CgroupRoot` per executor (found by :func:`find_cgroup_root`) makes one
:class:`AttemptCgroup` per attempt below the executor's own cgroup. Two layouts:

- **v2**, where the executor's own cgroup is a writable, delegated subtree whose
  ``cgroup.controllers`` offers ``memory`` and ``pids``: the executor moves itself into a
  leaf (``<own>/executor``, the "no internal processes" rule), enables the controllers for
  its children and makes ``<own>/jobmesh-<node>/<attempt>``;
- **v1**, else, where the ``memory``, ``cpu`` and ``pids`` hierarchies are mounted
  writable: ``<mount>/<own path>/jobmesh-<node>/<attempt>`` in each.

The attempt's first process joins its cgroup before it executes anything (see
:mod:`~jobmesh.executor.isolation.launch`), so nothing it starts can be outside. Limits
come from the job's reserved resources (:func:`attempt_limits`); after the attempt,
:meth:`AttemptCgroup.events` says whether the OOM killer struck or the pids limit refused
a fork. Everything here but :func:`attempt_limits` and the parsers touches the file system.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("jobmesh.executor.isolation.cgroups")

CGROUP_MOUNT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "pids")
V2_REQUIRED = ("memory", "pids")
MIN_MEMORY_MB = 32  # a floor under the reserved memory: the sandbox's own helpers need a little
CPU_PERIOD_US = 100_000
MIN_CPU_MILLI = 100  # 10% of a CPU at least: below that a process start alone is throttled


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    """The limits of one attempt's cgroup.

    Attributes:
        memory_bytes: memory (RSS and page cache) before the OOM killer strikes.
        cpu_quota_us: CPU time per ``cpu_period_us`` (1000 milli-CPU = one period).
        cpu_period_us: the CFS period.
        pids_max: processes and threads, together.
    """

    memory_bytes: int
    cpu_quota_us: int
    cpu_period_us: int
    pids_max: int


@dataclass(frozen=True, slots=True)
class CgroupEvents:
    """What an attempt's cgroup recorded.

    Attributes:
        oom_kills: processes the OOM killer killed.
        pids_refused: forks refused at the pids limit.
    """

    oom_kills: int = 0
    pids_refused: int = 0


def attempt_limits(memory_mb: int, cpu_milli: int, pids_max: int) -> CgroupLimits:
    """The cgroup limits of an attempt that reserved ``memory_mb`` and ``cpu_milli``.

    Args:
        memory_mb: the reserved memory (``resources.memory_mb``).
        cpu_milli: the reserved CPU (``resources.cpu_milli``).
        pids_max: ``JOBMESH_ATTEMPT_PIDS_MAX``.

    Returns:
        The limits, with the floors :data:`MIN_MEMORY_MB` and :data:`MIN_CPU_MILLI`.
    """
    memory = max(memory_mb, MIN_MEMORY_MB) * 1024 * 1024
    quota = max(cpu_milli, MIN_CPU_MILLI) * CPU_PERIOD_US // 1000
    return CgroupLimits(memory_bytes=memory, cpu_quota_us=quota, cpu_period_us=CPU_PERIOD_US, pids_max=pids_max)


def parse_counter(text: str, key: str) -> int:
    """The value of ``key`` in a flat-keyed cgroup file (``memory.events``, ``pids.events``,
    v1's ``memory.oom_control``): lines of ``key value``; 0 when absent."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value.strip())
    return 0


def own_cgroup_paths(text: str) -> dict[str, str]:
    """The executor's cgroup per hierarchy, from the text of ``/proc/self/cgroup``.

    Args:
        text: lines ``id:controllers:path``; v2's line is ``0::/path``.

    Returns:
        Controller name -> path; v2's unified hierarchy is under ``""``.
    """
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


class AttemptCgroup:
    """One attempt's cgroup (a directory per hierarchy: one on v2, one per controller on v1).

    Args:
        version: 1 or 2.
        dirs: the attempt's directory in each hierarchy; the first is the one whose
            ``cgroup.procs`` the process joins through (the others follow it, see
            :meth:`procs_files`).
    """

    def __init__(self, version: Literal[1, 2], dirs: dict[str, Path]) -> None:
        self.version = version
        self.dirs = dirs

    def procs_files(self) -> list[bytes]:
        """The ``cgroup.procs`` files the attempt's first process writes ``0`` (itself) into."""
        return [os.fsencode(path / "cgroup.procs") for path in self.dirs.values()]

    def events(self) -> CgroupEvents:
        """What the kernel recorded for the attempt so far."""
        if self.version == 2:
            group = self.dirs[""]
            return CgroupEvents(
                oom_kills=parse_counter(_read(group / "memory.events"), "oom_kill"),
                pids_refused=parse_counter(_read(group / "pids.events"), "max"),
            )
        return CgroupEvents(
            oom_kills=parse_counter(_read(self.dirs["memory"] / "memory.oom_control"), "oom_kill")
            if "memory" in self.dirs
            else 0,
            pids_refused=parse_counter(_read(self.dirs["pids"] / "pids.events"), "max") if "pids" in self.dirs else 0,
        )

    def pids(self) -> list[int]:
        """Every process in the attempt's cgroup now."""
        found: set[int] = set()
        for path in self.dirs.values():
            for word in _read(path / "cgroup.procs").split():
                if word.isdigit():
                    found.add(int(word))
        return sorted(found)

    def kill_all(self, deadline_seconds: float = 5.0) -> int:
        """SIGKILL every process of the attempt until the cgroup is empty.

        A process forking while it is being killed adds a new one; the loop goes on until
        none is left (the pids limit bounds how many there can be) or the deadline passes.

        Args:
            deadline_seconds: how long to keep at it.

        Returns:
            How many kill signals were sent.
        """
        if self.version == 2:
            kill_file = self.dirs[""] / "cgroup.kill"
            if kill_file.exists():
                _write(kill_file, "1")
        sent = 0
        stop_at = time.monotonic() + deadline_seconds
        while True:
            pids = self.pids()
            if not pids:
                return sent
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    sent += 1
                except ProcessLookupError:
                    pass
            if time.monotonic() > stop_at:
                log.error(
                    "cgroup %s still has processes %s after %.0fs of SIGKILL", self.dirs, pids[:10], deadline_seconds
                )
                return sent
            time.sleep(0.01)  # the killed processes leave the cgroup once they are reaped

    def remove(self) -> None:
        """Remove the attempt's directories (empty once every process is gone and reaped)."""
        for path in self.dirs.values():
            _rmdir_with_retry(path)


class CgroupRoot:
    """Where this executor makes its attempts' cgroups.

    Args:
        version: 1 or 2.
        parents: per hierarchy (``""`` for v2, the controller names for v1), the directory
            ``jobmesh-<node>`` under which each attempt gets its own.
        detail: what the probe reports (``v1 memory,cpu,pids``).
    """

    def __init__(self, version: Literal[1, 2], parents: dict[str, Path], detail: str) -> None:
        self.version = version
        self.parents = parents
        self.detail = detail

    def create(self, name: str, limits: CgroupLimits) -> AttemptCgroup:
        """Make the attempt's cgroup with its limits (an existing one, left by a crash, is reused).

        Args:
            name: the attempt's directory name (``<job>-<attempt>``).
            limits: its limits (:func:`attempt_limits`).

        Returns:
            The cgroup, ready to be joined.

        Raises:
            OSError: when it cannot be made or limited.
        """
        dirs = {key: parent / name for key, parent in self.parents.items()}
        for parent, path in zip(self.parents.values(), dirs.values(), strict=True):
            parent.mkdir(exist_ok=True)  # again: an operator may have cleared an idle node's parent
            path.mkdir(exist_ok=True)
        group = AttemptCgroup(self.version, dirs)
        try:
            if self.version == 2:
                one = dirs[""]
                _write(one / "memory.max", str(limits.memory_bytes))
                _write(one / "memory.swap.max", "0", missing_ok=True)
                _write(one / "pids.max", str(limits.pids_max))
                _write(one / "cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}", missing_ok=True)
            else:
                if "memory" in dirs:
                    _write(dirs["memory"] / "memory.limit_in_bytes", str(limits.memory_bytes))
                    # Without swap accounting this file is absent; there is no swap here anyway.
                    _write(dirs["memory"] / "memory.memsw.limit_in_bytes", str(limits.memory_bytes), missing_ok=True)
                if "pids" in dirs:
                    _write(dirs["pids"] / "pids.max", str(limits.pids_max))
                if "cpu" in dirs:
                    _write(dirs["cpu"] / "cpu.cfs_period_us", str(limits.cpu_period_us))
                    _write(dirs["cpu"] / "cpu.cfs_quota_us", str(limits.cpu_quota_us))
        except OSError:
            group.remove()
            raise
        return group

    def sweep(self) -> int:
        """Kill what is left in the attempt cgroups an earlier process of this node left, and
        remove them: no attempt of another incarnation runs on here.

        Returns:
            How many were removed.
        """
        names: set[str] = set()
        for parent in self.parents.values():
            try:
                names.update(entry.name for entry in parent.iterdir() if entry.is_dir())
            except OSError:
                continue
        for name in sorted(names):
            group = AttemptCgroup(self.version, {key: parent / name for key, parent in self.parents.items()})
            group.kill_all()
            group.remove()
        return len(names)

    def close(self) -> None:
        """Remove this executor's parent directories (when no attempt is left in them)."""
        for parent in self.parents.values():
            try:
                parent.rmdir()
            except OSError:
                pass


def find_cgroup_root(
    node_id: str,
    mount: Path = CGROUP_MOUNT,
    proc_self_cgroup: Path = Path("/proc/self/cgroup"),
) -> tuple[CgroupRoot | None, str]:
    """Find (and prepare) where this executor can make per-attempt cgroups.

    v2 first: a delegated subtree (the executor's own cgroup, writable, offering memory
    and pids); then v1 (memory, cpu and pids hierarchies writable). Preparing changes the
    file system: the ``jobmesh-<node>`` parents are made, and on v2 the executor moves
    into a leaf of its own cgroup.

    Args:
        node_id: this node (names the parent directories).
        mount: where the cgroup file systems are mounted.
        proc_self_cgroup: this process's cgroup membership.

    Returns:
        The root, or None with the reason why there is none (for the probe's report).
    """
    try:
        own = own_cgroup_paths(proc_self_cgroup.read_text())
    except OSError as exc:
        return None, f"none: cannot read {proc_self_cgroup}: {exc.strerror}"
    reasons: list[str] = []
    v2 = _prepare_v2(node_id, mount, own, reasons)
    if v2 is not None:
        return v2, v2.detail
    v1 = _prepare_v1(node_id, mount, own, reasons)
    if v1 is not None:
        return v1, v1.detail
    return None, "none: " + "; ".join(reasons or ["no cgroup file system found"])


def _v2_dir(mount: Path, own: dict[str, str]) -> Path | None:
    if "" not in own:
        return None
    for candidate in (mount, mount / "unified"):  # pure v2, or the hybrid layout's unified mount
        if (candidate / "cgroup.controllers").exists():
            return candidate / own[""].lstrip("/")
    return None


def _prepare_v2(node_id: str, mount: Path, own: dict[str, str], reasons: list[str]) -> CgroupRoot | None:
    base = _v2_dir(mount, own)
    if base is None:
        reasons.append("no cgroup v2 hierarchy")
        return None
    offered = _read(base / "cgroup.controllers").split()
    missing = [c for c in V2_REQUIRED if c not in offered]
    if missing:
        reasons.append(f"cgroup v2 at {base} does not offer {','.join(missing)}")
        return None
    if not os.access(base, os.W_OK) or not os.access(base / "cgroup.subtree_control", os.W_OK):
        reasons.append(f"cgroup v2 at {base} is not writable (not delegated)")
        return None
    wanted = [c for c in ("memory", "pids", "cpu") if c in offered]
    enable = " ".join(f"+{c}" for c in wanted)
    try:
        # The "no internal processes" rule: controllers are enabled for children only of a
        # cgroup without processes, so the executor moves into a leaf of its own first.
        leaf = base / "executor"
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
        _write(base / "cgroup.subtree_control", enable)
        parent = base / f"jobmesh-{node_id}"
        parent.mkdir(exist_ok=True)
        _write(parent / "cgroup.subtree_control", enable)
    except OSError as exc:
        reasons.append(f"cgroup v2 at {base} cannot be delegated to attempts: {exc.strerror or exc}")
        return None
    return CgroupRoot(2, {"": parent}, f"v2 {','.join(wanted)} at {parent}")


def _prepare_v1(node_id: str, mount: Path, own: dict[str, str], reasons: list[str]) -> CgroupRoot | None:
    parents: dict[str, Path] = {}
    for controller in V1_CONTROLLERS:
        hierarchy = mount / controller
        if not (hierarchy / "cgroup.procs").exists() or controller not in own:
            reasons.append(f"no cgroup v1 {controller} hierarchy")
            continue
        base = hierarchy / own[controller].lstrip("/")
        parent = base / f"jobmesh-{node_id}"
        try:
            parent.mkdir(exist_ok=True)
        except OSError as exc:
            reasons.append(f"cgroup v1 {controller} at {base} is not writable: {exc.strerror}")
            continue
        parents[controller] = parent
    if "memory" not in parents or "pids" not in parents:
        for parent in parents.values():
            _rmdir_with_retry(parent, attempts=1)
        return None
    return CgroupRoot(1, parents, f"v1 {','.join(parents)}")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, value: str, missing_ok: bool = False) -> None:
    try:
        with open(path, "w") as handle:
            handle.write(value)
    except FileNotFoundError:
        if not missing_ok:
            raise


def _rmdir_with_retry(path: Path, attempts: int = 50) -> None:
    # A killed process leaves its cgroup only once its parent reaped it, a moment later.
    for _ in range(attempts):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    log.warning("cgroup %s could not be removed (still busy)", path)
