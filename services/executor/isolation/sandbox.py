"""The bubblewrap command line that runs one attempt's process in a sandbox (a pure function).

How the pieces fit when the executor runs as root (verified with bubblewrap 0.8.0):

1. ``bwrap`` itself runs as root, so it can bind any source path (a work directory below a
   0700 directory, an interpreter under ``/root``). It unshares the mount, pid, ipc, uts,
   cgroup and (unless the job may use the network) network namespaces, builds a new root
   of read-only system binds, a private ``/tmp``, a fresh ``/proc`` and ``/dev`` and the
   one writable work directory (at its own path), and drops every capability except the
   three the next step needs.
2. ``setpriv`` switches to the unprivileged uid and gid (``JOBMESH_SANDBOX_UID``/``GID``),
   clears the supplementary groups, the inheritable and bounding capability sets and sets
   no_new_privs (so no setuid binary gains anything).
3. ``unshare --user`` makes the user namespace, mapping that uid to itself, and executes
   the job. (``bwrap --unshare-user`` run by root would map the sandbox uid onto root.)

Run by another user, ``bwrap`` makes the user namespace itself and maps that user to the
sandbox uid; setpriv and unshare are not needed.

Intermediate directories of a bind target that are not in a bind already are made with
mode 0755 inside the sandbox, so a path the sandbox uid could not walk on the host (a 0700
parent) is reachable inside.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

# What a process needs of the system: programs, libraries, configuration (read-only).
SYSTEM_BINDS = ("/usr", "/etc", "/opt")
MERGED_USR_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SECRETS_MOUNT = "/run/secrets"
# Kept by bwrap for the setpriv step, which drops them all.
DROP_STEP_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP")


@dataclass(frozen=True, slots=True)
class SandboxTools:
    """The programs of the sandbox chain and what the probe found about the machine.

    Attributes:
        bwrap: the bubblewrap executable.
        setpriv: util-linux ``setpriv`` (used when the executor runs as root).
        unshare: util-linux ``unshare`` (likewise).
        as_root: whether the executor runs as root (the three-step chain) or not (bwrap alone).
        symlinks: top-level directories that are symlinks on this machine (merged /usr),
            name -> target, e.g. ``/bin`` -> ``usr/bin``.
        directories: top-level ones of :data:`MERGED_USR_LINKS` that are real directories
            here (bound read-only instead).
        extra_ro: more host paths to bind read-only (the Python prefix of the executor, so
            that a ``python`` job works; installation roots of handler modules).
        python_bin: the directory of the executor's interpreter, first on a sandboxed job's
            PATH (see :func:`sandbox_path`).
    """

    bwrap: str = "bwrap"
    setpriv: str = "setpriv"
    unshare: str = "unshare"
    as_root: bool = True
    symlinks: dict[str, str] = field(default_factory=dict)
    directories: tuple[str, ...] = ()
    extra_ro: tuple[str, ...] = ()
    python_bin: str = ""


@dataclass(frozen=True, slots=True)
class SandboxRequest:
    """One process to sandbox.

    Attributes:
        argv: the job's command.
        workdir: its working directory (bound writable at the same path, and its cwd).
        uid: the uid it runs as.
        gid: the gid it runs as.
        network: whether it keeps the host's network.
        secrets_dir: a directory bound read-only at /run/secrets ("" for none).
        devices: device nodes bound into /dev (reserved GPUs).
        extra_ro: more host paths for this process only, bound read-only.
    """

    argv: Sequence[str]
    workdir: str
    uid: int
    gid: int
    network: bool = False
    secrets_dir: str = ""
    devices: Sequence[str] = ()
    extra_ro: Sequence[str] = ()


def sandbox_argv(tools: SandboxTools, request: SandboxRequest) -> list[str]:
    """The full command line: bwrap, its options, the drop steps and the job's argv.

    Args:
        tools: the chain's programs and the machine's layout (:class:`SandboxTools`).
        request: the process (:class:`SandboxRequest`).

    Returns:
        The argv to execute (as root when ``tools.as_root``).
    """
    args: list[str] = [
        tools.bwrap,
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "jobmesh",
    ]
    if not request.network:
        args.append("--unshare-net")
    if not tools.as_root:
        # bwrap makes the user namespace itself; it maps this user to the sandbox ids.
        args += ["--unshare-user", "--uid", str(request.uid), "--gid", str(request.gid), "--disable-userns"]
    # Targets of read-only mounts so far: what lies under them exists and cannot be made.
    mounted: list[str] = []
    made: set[str] = set()

    def parents_of(target: str) -> list[str]:
        out: list[str] = []
        for parent in reversed(PurePosixPath(target).parents):
            text = str(parent)
            if text in ("/", "/tmp") or text in made or _covered(text, mounted):
                continue
            made.add(text)
            out += ["--perms", "0755", "--dir", text]
        return out

    def bind(option: str, source: str) -> None:
        if _covered(source, mounted):
            return  # inside a bind already (a Python prefix under /usr, say)
        args.extend(parents_of(source))
        args.extend([option, source, source])
        mounted.append(source)

    for path in SYSTEM_BINDS:
        bind("--ro-bind-try", path)
    for name in MERGED_USR_LINKS:
        if name in tools.symlinks:
            args += ["--symlink", tools.symlinks[name], name]
            mounted.append(name)
        elif name in tools.directories:
            bind("--ro-bind", name)
    # Before the binds below, which may lie under /tmp (a work directory usually does).
    args += ["--perms", "01777", "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev"]
    mounted += ["/proc", "/dev"]
    for path in (*tools.extra_ro, *request.extra_ro):
        bind("--ro-bind", path)
    for device in request.devices:
        args += ["--dev-bind", device, device]
    if request.secrets_dir:
        args += [*parents_of(SECRETS_MOUNT), "--ro-bind", request.secrets_dir, SECRETS_MOUNT]
    args += [*parents_of(request.workdir), "--bind", request.workdir, request.workdir]
    args += ["--chdir", request.workdir, "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if tools.as_root:
        for cap in DROP_STEP_CAPS:
            args += ["--cap-add", cap]
        args += ["--", *drop_argv(tools, request.uid, request.gid)]
    else:
        args.append("--")
    args += list(request.argv)
    return args


def sandbox_path(path: str, tools: SandboxTools) -> str:
    """A sandboxed job's PATH: the executor's interpreter directory, then the entries of
    ``path`` that exist inside the sandbox (what the system and the extra binds hold).

    A PATH entry outside them (a ``~/.pyenv/shims`` of the executor's user) would only make
    a command that exists on the host unfindable inside; ``python`` is the executor's own.

    Args:
        path: the job's PATH (the allow-listed one, or the job's own).
        tools: the sandbox's binds.

    Returns:
        The PATH to give it.
    """
    visible = [*SYSTEM_BINDS, *tools.symlinks, *tools.directories, *tools.extra_ro]
    entries = [entry for entry in path.split(":") if entry.startswith("/") and _covered(entry, visible)]
    if tools.python_bin and tools.python_bin not in entries:
        entries.insert(0, tools.python_bin)
    return ":".join(dict.fromkeys(entries))


def drop_argv(tools: SandboxTools, uid: int, gid: int) -> list[str]:
    """The setpriv and unshare steps that leave root for ``uid``:``gid`` in a user namespace.

    Args:
        tools: the programs.
        uid: the sandbox uid.
        gid: the sandbox gid.

    Returns:
        The argv prefix, ending with ``--`` before the job's command.
    """
    return [
        tools.setpriv,
        "--reuid",
        str(uid),
        "--regid",
        str(gid),
        "--clear-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        tools.unshare,
        "--user",
        f"--map-user={uid}",
        f"--map-group={gid}",
        "--",
    ]


def _covered(target: str, mounted: Iterable[str]) -> bool:
    """Whether ``target`` is one of ``mounted`` or lies under one (paths compared as
    normalised strings: this runs for every bind of every sandboxed attempt)."""
    path = posixpath.normpath(target)
    for m in mounted:
        m = posixpath.normpath(m)
        if path == m or path.startswith(m + "/") or m == "/":
            return True
    return False
