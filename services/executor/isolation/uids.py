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
"""

from __future__ import annotations

import collections
import logging
import shutil
import subprocess

log = logging.getLogger("jobmesh.executor.isolation.uids")

KILL_TIMEOUT = 5.0


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
    """
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
        log.warning("cannot kill what is left of uid %d: %s", uid, exc)
