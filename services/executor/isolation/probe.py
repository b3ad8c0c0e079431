"""What this node can enforce: the probe at start, the level it advertises, and refusals.

:func:`probe_node` is the I/O edge: it finds the sandbox programs, runs the whole sandbox
chain once on ``true``, and finds (and prepares) a place for per-attempt cgroups. Every
decision on what it found is a pure function: :func:`decide_level` (the level advertised,
capped by ``JOBMESH_NODE_ISOLATION``; an explicit level the probe cannot enforce is refused
with what it found), :func:`probe_report` (``NodeInfo.probe``) and :func:`refusal` (an
attempt this node cannot isolate as asked, ``isolation_refused``).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from jobmesh.contract.messages.v1 import ISOLATION_LEVELS, RUNTIME_ISOLATION_CEILING, JobSpec
from jobmesh.errors import InvalidSpec
from jobmesh.executor.isolation.cgroups import CgroupRoot, find_cgroup_root
from jobmesh.executor.isolation.sandbox import MERGED_USR_LINKS, SandboxRequest, SandboxTools, sandbox_argv
from jobmesh.executor.isolation.uids import BLOCK_SIZE, claim_block, range_problem
from jobmesh.runtime.settings import Settings

log = logging.getLogger("jobmesh.executor.isolation.probe")

PROBE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class SandboxProbe:
    """What the sandbox probe found.

    Attributes:
        tools: the chain's programs and the machine's layout, when the chain ran.
        detail: ``bubblewrap 0.8.0`` or ``unavailable: <why>``.
    """

    tools: SandboxTools | None
    detail: str


@dataclass(frozen=True, slots=True)
class NodeIsolation:
    """How this node isolates its attempts (decided once, at start).

    Attributes:
        level: the level it advertises and enforces (``process`` or ``sandbox``, or
            ``container`` when so configured and the container probe passed).
        network: whether a job that asks for the network may have it.
        uid: the uid attempts run as (None: the executor's own, it is not root), unless
            ``attempt_uids`` gives each its own; handler workers always run as it.
        gid: likewise the gid.
        attempt_uids: ``(first, count)``: the block of the attempt range this executor
            claimed, which each attempt takes a uid of its own from
            (:mod:`~jobmesh.executor.isolation.uids`); None: they all run as ``uid``.
        uid_lock: the descriptor whose lock holds that block while the executor runs.
        cgroups: where attempts get cgroups (None: no cgroup limits on this node).
        sandbox: the sandbox chain when ``level`` is sandbox or above, else None.
        open_files: RLIMIT_NOFILE of attempts.
        pids_max: the pids limit of attempts.
        probe: what the probe found, for ``NodeInfo.probe``.
    """

    level: str = "process"
    network: bool = True
    uid: int | None = None
    gid: int | None = None
    attempt_uids: tuple[int, int] | None = None
    uid_lock: int | None = None
    cgroups: CgroupRoot | None = None
    sandbox: SandboxTools | None = None
    open_files: int = 4096
    pids_max: int = 512
    probe: dict[str, str] = field(default_factory=dict)


def decide_level(setting: str, sandbox_works: bool, container_works: bool = False) -> str | None:
    """The level a node advertises.

    Args:
        setting: ``JOBMESH_NODE_ISOLATION`` (``auto`` or a level).
        sandbox_works: whether the sandbox chain ran on this node.
        container_works: whether the container probe passed.

    Returns:
        ``sandbox`` or ``process`` for ``auto``; the level itself when it can be enforced;
        None when it cannot (the executor refuses to start).
    """
    if setting == "auto":
        return "sandbox" if sandbox_works else "process"
    if setting == "process":
        return "process"
    if setting == "sandbox" and sandbox_works:
        return "sandbox"
    if setting == "container" and sandbox_works and container_works:
        return "container"
    return None


def level_problem(setting: str, probe: Mapping[str, str]) -> str:
    """The message of a refused explicit level: the setting and what the probe found."""
    found = ", ".join(f"{key}: {value}" for key, value in probe.items())
    return f"JOBMESH_NODE_ISOLATION={setting} cannot be enforced on this node; the probe found {found}"


def probe_report(
    sandbox_detail: str,
    cgroup_detail: str,
    uid: int | None,
    gid: int | None,
    own_uid: int,
    network: bool,
    attempt_uids: tuple[int, int] | None = None,
) -> dict[str, str]:
    """``NodeInfo.probe``: what the probe found, in words.

    Args:
        sandbox_detail: :attr:`SandboxProbe.detail`.
        cgroup_detail: what :func:`~jobmesh.executor.isolation.cgroups.find_cgroup_root` said.
        uid: the uid attempts run as (None: unchanged).
        gid: the gid.
        own_uid: the executor's uid.
        network: ``JOBMESH_NODE_NETWORK``.
        attempt_uids: :attr:`NodeIsolation.attempt_uids`.

    Returns:
        ``sandbox``, ``cgroup``, ``uid`` and ``network`` entries.
    """
    if uid is None:
        who = f"unchanged: the executor runs as uid {own_uid}, not root"
    elif attempt_uids is not None:
        first, count = attempt_uids
        who = f"each attempt its own of {first}..{first + count - 1}, handler workers {uid}:{gid} (the executor runs as root)"
    else:
        who = f"{uid}:{gid} (the executor runs as root)"
    return {
        "sandbox": sandbox_detail,
        "cgroup": cgroup_detail,
        "uid": who,
        "network": "allowed when asked" if network else "never (JOBMESH_NODE_NETWORK=false)",
    }


def refusal(spec: JobSpec, runtime_kind: str, node_level: str, node_network: bool) -> str | None:
    """Why this node cannot isolate an attempt as its job asks (``isolation_refused``), if so.

    Placement keeps such jobs away from such nodes; this is the executor's own check, for
    a record that changed (a restarted executor with other settings) or a stray dispatch.

    Args:
        spec: the job.
        runtime_kind: its runtime's tag (``process``, ``handler``, ``container``, ``noop``).
        node_level: :attr:`NodeIsolation.level`.
        node_network: :attr:`NodeIsolation.network`.

    Returns:
        The reason, or None when it can run here as asked.
    """
    asked = spec.constraints.isolation
    if asked:
        # The strongest level the runtime can be held to (placement caps by the same table).
        ceiling = RUNTIME_ISOLATION_CEILING.get(runtime_kind, "process")
        enforced = min(ISOLATION_LEVELS.get(node_level, 0), ISOLATION_LEVELS[ceiling])
        if ISOLATION_LEVELS[asked] > enforced:
            if ISOLATION_LEVELS[asked] > ISOLATION_LEVELS.get(node_level, 0):
                return f"the job asks for isolation {asked}; this node enforces {node_level}"
            return f"the job asks for isolation {asked}; a {runtime_kind} runtime runs at most in the {ceiling}"
    if spec.network and not node_network:
        return "the job asks for the network; this node allows none (JOBMESH_NODE_NETWORK=false)"
    if spec.network and runtime_kind == "handler" and node_level != "process":
        return "the job asks for the network; this node's handler workers run in a sandbox without one"
    return None


def python_prefixes() -> tuple[str, ...]:
    """The executor's Python installation (venv and base), bound so that ``python`` jobs work."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    return tuple(sorted(p for p in paths if p and os.path.isdir(p)))


def machine_layout(root: Path = Path("/")) -> tuple[dict[str, str], tuple[str, ...]]:
    """Which of /bin, /lib, ... are symlinks (merged /usr) and which are directories.

    Returns:
        (name -> link target, names that are real directories).
    """
    links: dict[str, str] = {}
    dirs: list[str] = []
    for name in MERGED_USR_LINKS:
        path = root / name.lstrip("/")
        if path.is_symlink():
            links[name] = os.readlink(path)
        elif path.is_dir():
            dirs.append(name)
    return links, tuple(dirs)


def probe_sandbox(
    uid: int,
    gid: int,
    as_root: bool,
    which: Callable[[str], str | None] = shutil.which,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> SandboxProbe:
    """Find bubblewrap (and setpriv and unshare when root) and run the whole chain on ``true``.

    Args:
        uid: the sandbox uid.
        gid: the sandbox gid.
        as_root: whether the executor runs as root.
        which: finds programs on PATH.
        run: runs a command (``subprocess.run``).

    Returns:
        The tools when the chain ran, and what was found.
    """
    bwrap = which("bwrap")
    if bwrap is None:
        return SandboxProbe(None, "unavailable: bwrap (bubblewrap) is not installed")
    setpriv, unshare = which("setpriv"), which("unshare")
    if as_root and (setpriv is None or unshare is None):
        return SandboxProbe(None, "unavailable: setpriv and unshare (util-linux) are needed to drop root")
    try:
        version = run([bwrap, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return SandboxProbe(None, f"unavailable: {bwrap} --version failed: {exc}")
    links, dirs = machine_layout()
    tools = SandboxTools(
        bwrap=bwrap,
        setpriv=setpriv or "setpriv",
        unshare=unshare or "unshare",
        as_root=as_root,
        symlinks=links,
        directories=dirs,
        extra_ro=python_prefixes(),
        python_bin=os.path.dirname(sys.executable),
    )
    with tempfile.TemporaryDirectory(prefix="jobmesh-probe-") as workdir:
        if as_root:
            os.chown(workdir, uid, gid)
            os.chmod(workdir, 0o711)  # as an attempt's (see launch.prepare_launch)
        argv = sandbox_argv(tools, SandboxRequest(argv=["true"], workdir=workdir, uid=uid, gid=gid))
        try:
            done = run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return SandboxProbe(None, f"unavailable: the sandbox did not run: {exc}")
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return SandboxProbe(None, f"unavailable: {version or 'bwrap'} did not run a sandbox: {why}")
    return SandboxProbe(tools, version or "bubblewrap")


def probe_node(
    settings: Settings, node_id: str, container_works: bool = False, container_detail: str = ""
) -> NodeIsolation:
    """Probe this node and decide how it isolates attempts (I/O: runs the sandbox once, makes
    cgroup directories).

    Args:
        settings: the executor's settings (``node_isolation``, ``node_network``,
            ``sandbox_uid``/``gid``, ``attempt_pids_max``, ``attempt_open_files``).
        node_id: this node (names its cgroup parents).
        container_works: whether the container probe passed (for an explicit ``container``).
        container_detail: what the container probe found (reported with the rest).

    Returns:
        The node's isolation.

    Raises:
        InvalidSpec: naming JOBMESH_NODE_ISOLATION and what the probe found, for a level
            it cannot enforce.
    """
    own_uid = os.geteuid()
    as_root = own_uid == 0
    uid = settings.sandbox_uid if as_root else None
    gid = settings.sandbox_gid if as_root else None
    if settings.node_isolation == "process":
        sandbox = SandboxProbe(None, "not probed: JOBMESH_NODE_ISOLATION=process")
    else:
        sandbox = probe_sandbox(settings.sandbox_uid, settings.sandbox_gid, as_root)
    cgroups, cgroup_detail = find_cgroup_root(node_id)
    block = None
    if as_root and settings.attempt_uid_count:
        users = [entry.pw_uid for entry in pwd.getpwall()]
        groups = [entry.gr_gid for entry in grp.getgrall()]
        reserved = (settings.sandbox_uid, settings.sandbox_gid)
        problem = range_problem(settings.attempt_uid_base, settings.attempt_uid_count, reserved, users, groups)
        if problem:
            raise InvalidSpec(f"JOBMESH_ATTEMPT_UID_BASE/COUNT: {problem}", field="attempt_uid_base")
        try:
            block = claim_block(settings.attempt_uid_base, settings.attempt_uid_count)
        except PermissionError as exc:
            raise InvalidSpec(
                f"JOBMESH_ATTEMPT_UID_BASE: cannot lock the attempt uids: {exc}", field="attempt_uid_base"
            ) from exc
        if block is None:
            first, last = settings.attempt_uid_base, settings.attempt_uid_base + settings.attempt_uid_count - 1
            raise InvalidSpec(
                f"JOBMESH_ATTEMPT_UID_BASE/COUNT: every block of {BLOCK_SIZE} uids of {first}..{last} is held by "
                "another executor on this machine; give this one a range of its own",
                field="attempt_uid_base",
            )
    attempt_uids = (block.first, block.count) if block is not None else None
    report = probe_report(sandbox.detail, cgroup_detail, uid, gid, own_uid, settings.node_network, attempt_uids)
    if container_detail:
        report["container"] = container_detail
    level = decide_level(settings.node_isolation, sandbox.tools is not None, container_works)
    if level is None:
        if cgroups is not None:
            cgroups.close()
        raise InvalidSpec(level_problem(settings.node_isolation, report), field="node_isolation")
    if cgroups is not None:
        swept = cgroups.sweep()
        if swept:
            log.info("removed %d attempt cgroups an earlier executor of node %s left", swept, node_id)
    log.info("node %s isolation %s: %s", node_id, level, "; ".join(f"{k} {v}" for k, v in report.items()))
    return NodeIsolation(
        level=level,
        network=settings.node_network,
        uid=uid,
        gid=gid,
        attempt_uids=attempt_uids,
        uid_lock=block.lock_fd if block is not None else None,
        cgroups=cgroups,
        sandbox=sandbox.tools if level != "process" else None,
        open_files=settings.attempt_open_files,
        pids_max=settings.attempt_pids_max,
        probe=report,
    )


def unreachable_parent(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory above ``path`` that ``uid``:``gid`` cannot walk through, if any.

    A job at the process level runs as the sandbox uid on the host's own file system, so
    its work directory must be reachable by that uid (a sandbox builds its own path).

    Args:
        path: the node's work directory.
        uid: the sandbox uid.
        gid: the sandbox gid.

    Returns:
        The directory, or None when every one can be searched.
    """
    for parent in [*reversed(path.parents), path]:
        try:
            st = parent.stat()
        except FileNotFoundError:
            return None  # made by the executor below here, with mode 0755
        if st.st_uid == uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid == gid:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            return parent
    return None
