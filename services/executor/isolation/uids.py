"""A uid of its own for each attempt, when the executor runs as root.

Jobs that share a uid can read each other's working directories and secret files, and
signal or ptrace each other's processes, whatever their directories' modes say. So each
attempt runs as a uid (and a gid of the same number) taken from the range
``JOBMESH_ATTEMPT_UID_BASE`` .. ``+ JOBMESH_ATTEMPT_UID_COUNT - 1``, which no other user of
the node may have. :class:`UidPool` hands them out least recently used first, so a uid comes
back only after every other one of the range was used: whatever a job left outside its
working directory (a file in a shared ``/tmp`` at the process level) meets the same uid
again as late as possible. Before a uid goes back, :func:`kill_uid` kills every process
that still runs as it (one that escaped its session where no cgroup holds it).

Several executors may run on one machine (the tests run two), and two of them must never
hand out one uid: each executor claims a block of the range for its lifetime
(:func:`claim_block`, an ``flock`` the kernel drops when the process dies), and kills
whatever still runs as a uid of the block when it claims it (what a dead executor left).
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("jobmesh.executor.isolation.uids")

KILL_TIMEOUT = 5.0
BLOCK_SIZE = 4096  # uids per executor: 16 executors per machine with the default range
LOCK_FILE = "uids.lock"


@dataclass(frozen=True)
class UidBlock:
    """The part of the attempt range one executor has to itself while it runs.

    Attributes:
        first: its first uid.
        count: how many it has.
        lock_fd: the open descriptor whose lock holds it (dropped with the process).
    """

    first: int
    count: int
    lock_fd: int


def lock_dir() -> Path:
    """Where the uid lock lives: root's own directory (jobs cannot take a lock there)."""
    run = Path("/run")
    base = run / "jobmesh" if os.access(run, os.W_OK) else Path(tempfile.gettempdir()) / "jobmesh-root"
    return base / "uid-blocks"


def _open_lock(directory: Path) -> int:
    """The lock file, in a directory that must be the executor's own and closed to others
    (in a shared /tmp another user could have made it first, or planted a link)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise PermissionError(f"{directory} must be a directory of uid {os.geteuid()} that nobody else may write")
    return os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _lock_span(fd: int, start: int, size: int) -> bool:
    """Take a write lock on bytes ``start .. start + size - 1`` of the lock file: one byte
    per uid, so two executors conflict exactly where their uids would. An open-file-
    description lock, held by this descriptor and dropped when the process dies."""
    flock = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, start, size, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock)
    except (BlockingIOError, PermissionError):
        return False
    return True


def claim_block(first: int, count: int, directory: Path | None = None) -> UidBlock | None:
    """Claim a free block of ``first .. first + count - 1`` for this process (I/O: lock files).

    Args:
        first: ``JOBMESH_ATTEMPT_UID_BASE``.
        count: ``JOBMESH_ATTEMPT_UID_COUNT``.
        directory: where the locks are (:func:`lock_dir`).

    Returns:
        The block, or None when other live executors hold every one.
    """
    directory = directory if directory is not None else lock_dir()
    end = first + count
    # The lock is on the uids themselves, one byte each: executors whose ranges overlap
    # anywhere (another base or count) meet on it, and disjoint ones never do.
    for start in range(first, end, BLOCK_SIZE):
        size = min(BLOCK_SIZE, end - start)
        fd = _open_lock(directory)
        if not _lock_span(fd, start, size):
            os.close(fd)
            continue
        killed = kill_range(start, size)
        if killed:
            log.warning(
                "killed %d processes an earlier executor left running as uids %d..%d", killed, start, start + size - 1
            )
        return UidBlock(start, size, fd)
    return None


def kill_range(first: int, count: int, proc: Path = Path("/proc")) -> int:
    """SIGKILL every process whose uid is in ``first .. first + count - 1``; how many were."""
    killed = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            uid = entry.stat().st_uid
            if first <= uid < first + count:
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return killed


def range_problem(
    first: int, count: int, reserved: Iterable[int], users: Iterable[int], groups: Iterable[int] = ()
) -> str:
    """Why ``first .. first + count - 1`` cannot be the attempt range ("" when it can): it
    holds a uid that must never be an attempt's (the sandbox uid, which handler workers run
    as, or a user of the machine), whose processes its kills would reach.

    Args:
        first: ``JOBMESH_ATTEMPT_UID_BASE``.
        count: ``JOBMESH_ATTEMPT_UID_COUNT``.
        reserved: the sandbox uid and gid.
        users: the uids of the machine's users (``pwd.getpwall()``).
        groups: the gids of its groups (``grp.getgrall()``): an attempt's gid is its uid.
    """
    for uid in reserved:
        if first <= uid < first + count:
            return f"the attempt range {first}..{first + count - 1} holds the sandbox uid {uid}"
    taken = sorted(uid for uid in users if first <= uid < first + count)
    if taken:
        return f"the attempt range {first}..{first + count - 1} holds uid {taken[0]}, a user of this machine"
    shared = sorted(gid for gid in groups if first <= gid < first + count)
    if shared:
        return f"the attempt range {first}..{first + count - 1} holds gid {shared[0]}, a group of this machine"
    return ""


class UidPool:
    """The free uids of the attempt range, least recently used first (O(1) each way).

    Args:
        first: the first uid of the range.
        count: how many uids it has.
    """

    def __init__(self, first: int, count: int) -> None:
        self.first = first
        self.count = count
        self._free: collections.deque[int] = collections.deque(range(first, first + count))
        self._taken: set[int] = set()

    def acquire(self) -> int | None:
        """A free uid, or None when every one is taken by a running attempt."""
        if not self._free:
            return None
        uid = self._free.popleft()
        self._taken.add(uid)
        return uid

    def release(self, uid: int) -> None:
        """Give ``uid`` back (its processes are gone: :func:`kill_uid`); it goes last in line."""
        if uid in self._taken:
            self._taken.discard(uid)
            self._free.append(uid)

    @property
    def in_use(self) -> int:
        """How many uids running attempts hold."""
        return len(self._taken)


def kill_uid(uid: int, gid: int) -> None:
    """Kill every process running as ``uid`` (blocking: run it in a thread).

    ``kill -KILL -1`` run as that uid reaches exactly the processes the uid may signal,
    which are its own, and never the caller. Only root can do this, and only root needs to.

    Raises:
        ValueError: for root (as root, ``kill -1`` would kill every process of the machine).
    """
    if uid < 1 or gid < 0:
        raise ValueError(f"kill_uid needs an unprivileged uid, not {uid}:{gid}")
    program = shutil.which("kill") or "/bin/kill"
    try:
        subprocess.run(
            [program, "-KILL", "-1"],
            user=uid,
            group=gid,
            extra_groups=[],
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=KILL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        # No kill program, or it hung: find the uid's processes in /proc instead.
        log.warning("kill as uid %d failed (%s); killing its processes found in /proc", uid, exc)
        kill_range(uid, 1)
