"""One process inside the node's boundaries: its command line, what its child does before
it executes anything, and what is left to do once it ended.

:func:`prepare_launch` (I/O: makes the attempt's cgroup, hands the work directory to the
sandbox uid) returns a :class:`Launch`. Its :meth:`~Launch.preexec` runs in the forked child
before ``exec``: it joins the cgroup (so nothing the process starts is ever outside it), sets
the rlimits and, at the process level when the executor is root, drops to the sandbox uid
with no_new_privs. (``subprocess``'s own ``user=``/``group=`` switch before ``preexec_fn``
runs, and a process that is not root can no longer join a root-owned cgroup.) At the
sandbox level the child stays root so that bubblewrap can build the sandbox, and the chain
in :mod:`~jobmesh.executor.isolation.sandbox` drops root inside it.

Every value the child needs is computed here, in the parent: the child only makes system
calls.
"""

from __future__ import annotations

import ctypes
import os
import signal
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jobmesh.executor.isolation.cgroups import AttemptCgroup, CgroupEvents, attempt_limits
from jobmesh.executor.isolation.probe import NodeIsolation
from jobmesh.executor.isolation.rlimits import Rlimit, apply_rlimits, attempt_rlimits
from jobmesh.executor.isolation.sandbox import SandboxRequest, sandbox_argv

PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """What one process of an attempt needs from the node's isolation.

    Attributes:
        argv: its command.
        workdir: its working directory (exists, empty or holding its input files).
        cgroup_name: the name of its cgroup (``<job>-<attempt>``).
        memory_mb: the memory it may use.
        cpu_milli: the CPU it reserved.
        timeout: its run timeout (RLIMIT_CPU).
        network: whether it may use the network (sandbox: else none).
        secrets_dir: a directory of its secret files ("" for none).
        devices: device nodes it may use (reserved GPUs; sandbox only).
        extra_ro: more host paths it needs read-only inside a sandbox.
        pass_fds: descriptors it inherits besides 0-2.
    """

    argv: Sequence[str]
    workdir: Path
    cgroup_name: str
    memory_mb: int
    cpu_milli: int
    timeout: float
    network: bool = False
    secrets_dir: str = ""
    devices: Sequence[str] = ()
    extra_ro: Sequence[str] = ()
    pass_fds: Sequence[int] = ()


@dataclass
class Launch:
    """One process, ready to be started: ``argv`` with ``preexec`` as the child's first act.

    Attributes:
        argv: what to execute (bubblewrap's chain in a sandbox, else the job's argv).
        cgroup: its cgroup, or None on a node without cgroups.
        rlimits: what the child sets.
        drop_to: (uid, gid) the child switches to before exec (process level, as root).
        procs_files: the cgroup.procs files the child joins through.
        owner: (uid, gid) the child hands its pipes to (when the job runs as another uid).
        pass_fds: the descriptors it inherits besides 0-2 (the progress pipe).
        sandboxed: ``argv`` is bubblewrap's chain (a SIGTERM must spare bubblewrap itself).
    """

    argv: list[str]
    cgroup: AttemptCgroup | None = None
    rlimits: tuple[Rlimit, ...] = ()
    drop_to: tuple[int, int] | None = None
    procs_files: list[bytes] = field(default_factory=list)
    owner: tuple[int, int] | None = None
    pass_fds: tuple[int, ...] = ()
    sandboxed: bool = False

    def preexec(self) -> None:
        """Run in the forked child before ``exec``: join the cgroup, set rlimits, drop root."""
        for path in self.procs_files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")  # "0" is the writing process itself
            finally:
                os.close(fd)
        apply_rlimits(self.rlimits)
        if self.owner is not None:
            # The job reopens its pipes by name (``> /dev/stderr``, ``> /dev/fd/$FD``), which
            # checks the pipe's owner: root's, until given to the job's uid here.
            uid, gid = self.owner
            for fd in (0, 1, 2, *self.pass_fds):
                try:
                    if stat.S_ISFIFO(os.fstat(fd).st_mode):
                        os.fchown(fd, uid, gid)
                except OSError:
                    pass  # not open: nothing to hand over
        if self.drop_to is not None:
            uid, gid = self.drop_to
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")

    def signal_all(self, pgid: int, sig: int) -> None:
        """Send ``sig`` to the process group and, where there is one, every process of the cgroup
        (a sandboxed job runs in a session of its own, outside the group).

        A SIGTERM in a sandbox goes to the job's processes only: bubblewrap (the group's
        leader) forwards no signal, and its death SIGKILLs the sandbox (--die-with-parent),
        so terminating it would take away the grace a cancel or a preemption promises. It
        exits by itself once the job has; a SIGKILL after the grace reaches it as well."""
        if sig == signal.SIGTERM and self.sandboxed:
            # The job's processes: its cgroup's, or without one bubblewrap's descendants.
            pids = self.cgroup.pids() if self.cgroup is not None else descendants(pgid)
            for pid in pids:
                if pid != pgid:
                    try:
                        os.kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            return
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if self.cgroup is not None:
            for pid in self.cgroup.pids():
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def finish(self) -> CgroupEvents:
        """Kill whatever of the attempt is left, read what its cgroup recorded and remove it
        (blocking: run it in a thread).

        Returns:
            The OOM kills and refused forks (none without a cgroup).
        """
        if self.cgroup is None:
            return CgroupEvents()
        try:
            self.cgroup.kill_all()
            return self.cgroup.events()
        finally:
            self.cgroup.remove()


def descendants(root: int, proc: str = "/proc") -> list[int]:
    """Every live descendant of process ``root`` (one scan of ``proc``: the parent of each
    process, then the tree below ``root``)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir(proc)
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/stat", "rb") as f:
                stat_line = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ")" ends it.
        fields = stat_line[stat_line.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def hand_workdir(workdir: Path, uid: int) -> None:
    """Make ``workdir`` the job's (I/O): owned by ``uid``, with search for the executor's
    group alone, since bubblewrap changes into it as root without CAP_DAC_OVERRIDE and no
    job is in that group (others get nothing)."""
    os.chown(workdir, uid, os.getegid())
    os.chmod(workdir, 0o710)


def prepare_launch(isolation: NodeIsolation, spec: LaunchSpec) -> Launch:
    """Make the process's cgroup and build its launch (I/O: the cgroup, the work directory's owner).

    Args:
        isolation: the node's isolation (:func:`~jobmesh.executor.isolation.probe.probe_node`).
        spec: the process.

    Returns:
        The launch; call :meth:`Launch.finish` once the process ended, whatever happened.

    Raises:
        OSError: when the cgroup cannot be made or the work directory handed over.
    """
    if isolation.uid is not None and isolation.gid is not None:
        hand_workdir(spec.workdir, isolation.uid)
    cgroup = None
    if isolation.cgroups is not None:
        limits = attempt_limits(spec.memory_mb, spec.cpu_milli, isolation.pids_max)
        cgroup = isolation.cgroups.create(spec.cgroup_name, limits)
    rlimits = attempt_rlimits(
        spec.memory_mb,
        spec.timeout,
        isolation.open_files,
        isolation.pids_max,
        # A cgroup root exists only with memory and pids controllers (see cgroups.py).
        cgroup_memory=cgroup is not None,
        cgroup_pids=cgroup is not None,
        own_uid=_own_uid(isolation),
    )
    if isolation.sandbox is not None:
        request = SandboxRequest(
            argv=spec.argv,
            workdir=str(spec.workdir),
            uid=isolation.uid if isolation.uid is not None else os.geteuid(),
            gid=isolation.gid if isolation.gid is not None else os.getegid(),
            network=spec.network,
            secrets_dir=spec.secrets_dir,
            devices=spec.devices,
            extra_ro=spec.extra_ro,
        )
        argv = sandbox_argv(isolation.sandbox, request)
        drop_to = None  # bubblewrap needs root to build the sandbox; its chain drops it
    else:
        argv = list(spec.argv)
        drop_to = (isolation.uid, isolation.gid) if isolation.uid is not None and isolation.gid is not None else None
    owner = (isolation.uid, isolation.gid) if isolation.uid is not None and isolation.gid is not None else None
    procs = cgroup.procs_files() if cgroup is not None else []
    return Launch(
        argv, cgroup, rlimits, drop_to, procs, owner, tuple(spec.pass_fds), sandboxed=isolation.sandbox is not None
    )


def _own_uid(isolation: NodeIsolation) -> bool:
    """Whether the process runs as a uid of the attempt's own (from the attempt range)."""
    if isolation.uid is None or isolation.attempt_uids is None:
        return False
    first, count = isolation.attempt_uids
    return first <= isolation.uid < first + count


def command_problem(command: str, path: str, cwd: Path) -> str | None:
    """Why ``command`` cannot be executed, looked up as ``execvp`` would (None: it can be).

    In a sandbox the job's command is executed by the last step of the chain, so a missing
    one would look like the job's own exit code 127; the sandbox binds the host's system
    directories, so the host answers for it and the attempt fails ``spawn_failed`` instead.

    Args:
        command: the job's ``argv[0]``.
        path: the job's PATH.
        cwd: its working directory (a relative command with a ``/`` is looked up there).

    Returns:
        ``No such file or directory`` or ``Permission denied``, or None.
    """
    if "/" in command:
        candidates = [cwd / command]
    else:
        candidates = [Path(d or ".") / command for d in path.split(":")]
    denied = False
    for candidate in candidates:
        if candidate.is_file():
            if os.access(candidate, os.X_OK):
                return None
            denied = True
    return "Permission denied" if denied else "No such file or directory"
