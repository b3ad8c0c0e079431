"""What a restarted executor does about the attempts of the process it replaces.

An executor that starts under a node id whose record is still in KV (it was killed and came
back within the node TTL) reads that record before its first put. Every attempt the record
lists belongs to another incarnation and is not running any more in this process: it is
reported lost at once (:func:`lost_messages`), so the scheduler retries it without waiting
for a lease to expire, and a dispatch of it that comes again is acked without running it.

The processes such an attempt started may have outlived the executor (each attempt runs in
a session of its own). :func:`kill_leftovers` stops those still working in the attempt's
directory, so that "not running any more" is true before the attempt runs elsewhere, and
then removes what the attempt left on disk (:func:`remove_leftovers`): its working
directory ``<work_root>/<job>-<attempt>`` and its private directory beside it,
``<work_root>/.<job>-<attempt>`` (its stdin file and secret files). A secret must not
outlive the executor that fetched it, and an attempt that comes again must find neither.

An executor that comes back after its record expired finds no record to read. So every
attempt writes its lease (job, attempt, partition) into its private directory before its
working directory exists (:func:`write_lease`), and a starting executor also reports lost
every attempt whose lease it finds there that no record accounts for
(:func:`left_behind`). Without that, a scheduler that took the partition over meanwhile
would know neither the attempt's node nor its fate until its bind timeout ran out.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Collection, Iterable
from pathlib import Path

import msgspec

from jobmesh.contract import subjects
from jobmesh.contract.ids import attempt_key, event_id
from jobmesh.contract.messages.v1 import AttemptLease, JobLost, NodeInfo
from jobmesh.executor.secrets import remove_secret_files
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.tracing import Context

log = logging.getLogger("jobmesh.executor.restart")

LOST_REASON = "executor restarted; the attempt was not running any more"
LEASE_FILE = "lease.json"  # in the attempt's private directory

_lease_decoder = msgspec.json.Decoder(AttemptLease)


def orphaned_attempts(old: NodeInfo | None, incarnation: str) -> list[AttemptLease]:
    """The attempts an earlier incarnation's record lists, which this process does not run.

    Args:
        old: the node's record as this process found it at start (None: there was none).
        incarnation: this process's incarnation.

    Returns:
        The leases of the old record, or [] when there is no record of another incarnation.
    """
    if old is None or old.incarnation == incarnation:
        return []
    return list(old.attempts)


def lost_messages(
    orphans: Iterable[AttemptLease], node_id: str, at: float, context: Context | None = None
) -> list[Outgoing]:
    """One ``JobLost`` per orphaned attempt, addressed and with its message id.

    Args:
        orphans: the attempts (:func:`orphaned_attempts`).
        node_id: this node.
        at: now (epoch seconds).
        context: the trace context they continue, if any.

    Returns:
        The messages, for the reporter.
    """
    return [
        Outgoing(
            subjects.node_event(lease.partition, subjects.LOST, node_id),
            JobLost(
                job_id=lease.job_id,
                attempt=lease.attempt,
                partition=lease.partition,
                node_id=node_id,
                at=at,
                reason=LOST_REASON,
            ),
            event_id(lease.job_id, lease.attempt, subjects.LOST),
            context,
        )
        for lease in orphans
    ]


def leftover_groups(workdirs: Iterable[Path], proc: Path = Path("/proc")) -> dict[int, Path]:
    """The process groups of processes still working in (or below) one of ``workdirs``.

    Args:
        workdirs: attempt directories of orphaned attempts.
        proc: the proc file system (Linux); nothing is found without one.

    Returns:
        Process group id -> the directory its process works in. Processes of other users,
        and ones that left the directory, are not found.
    """
    roots = [str(path) for path in workdirs]
    if not roots:
        return {}
    found: dict[int, Path] = {}
    try:
        entries = list(os.scandir(proc))
    except OSError:
        return {}
    own = os.getpid()
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            cwd = os.readlink(os.path.join(entry.path, "cwd"))
            pgid = os.getpgid(int(entry.name))
        except OSError:
            continue  # gone, or not ours to look at
        for root in roots:
            if cwd == root or cwd.startswith(root + os.sep):
                found[pgid] = Path(root)
                break
    return found


def private_dir_of(workdir: Path) -> Path:
    """The private directory beside an attempt's working directory (``Attempt.private_dir``).

    Args:
        workdir: ``<work_root>/<job>-<attempt>``.

    Returns:
        ``<work_root>/.<job>-<attempt>``.
    """
    return workdir.with_name(f".{workdir.name}")


def remove_leftovers(workdirs: Iterable[Path]) -> None:
    """Remove what orphaned attempts left on disk: the private directory, then the working one.

    The secrets go first (their directory is read-only, see
    :func:`~jobmesh.executor.secrets.remove_secret_files`), then the rest of the private
    directory (the stdin file), then the working directory. Missing ones are fine.

    Args:
        workdirs: attempt directories of orphaned attempts.
    """
    for workdir in workdirs:
        private = private_dir_of(workdir)
        remove_secret_files(private / "secrets")
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        if private.exists() or workdir.exists():
            log.error("cannot remove all of %s and %s, left by the previous executor", workdir, private)


def kill_leftovers(workdirs: Iterable[Path], proc: Path = Path("/proc")) -> int:
    """SIGKILL the process groups still working in orphaned attempts' directories, then remove
    those directories and the attempts' private directories (:func:`remove_leftovers`).

    Blocking (it walks ``/proc`` and the directories): run it in a thread.

    Args:
        workdirs: attempt directories of orphaned attempts.
        proc: the proc file system.

    Returns:
        How many process groups were killed.
    """
    workdirs = list(workdirs)
    killed = 0
    own_group = os.getpgid(0)
    for pgid, root in leftover_groups(workdirs, proc).items():
        if pgid == own_group:
            continue  # never our own: a job started by hand from inside a work directory
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue
        killed += 1
        log.warning("killed process group %d left running in %s by the previous executor", pgid, root)
    # After the kill: nothing of the attempt writes a file into them any more.
    remove_leftovers(workdirs)
    return killed


def write_lease(private: Path, lease: AttemptLease) -> None:
    """Record an attempt's lease in its private directory (created 0700), before it runs.

    Written to a temporary name and renamed, so a crash leaves the whole file or none.

    Args:
        private: ``<work_root>/.<job>-<attempt>``.
        lease: the attempt's job, attempt number and partition.
    """
    private.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = private / f"{LEASE_FILE}.partial"
    partial.write_bytes(msgspec.json.encode(lease))
    partial.replace(private / LEASE_FILE)


def left_behind(work_root: Path, accounted: Collection[str]) -> tuple[list[AttemptLease], list[Path]]:
    """The attempts an earlier executor of this node started here that no record accounts for.

    Blocking (it lists the work root): run it in a thread.

    Args:
        work_root: this node's ``<work_dir>/<node_id>``.
        accounted: attempt keys the previous record listed, running or ended.

    Returns:
        The leases found that ``accounted`` lacks (to report lost), and the working
        directory of every attempt left here (to clear: at start nothing here is this
        process's own).
    """
    leases: list[AttemptLease] = []
    workdirs: list[Path] = []
    try:
        entries = list(os.scandir(work_root))
    except OSError:
        return [], []  # no work root yet: nothing ran here
    for entry in entries:
        if not entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        workdir = work_root / entry.name[1:]
        try:
            lease = _lease_decoder.decode((Path(entry.path) / LEASE_FILE).read_bytes())
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            lease = None  # an attempt older than lease files, or one cut off before it ran
        if lease is not None and entry.name != f".{lease.job_id}-{lease.attempt}":
            # A job that can write its own private directory (an executor not run as root)
            # must not make the next executor report another attempt lost.
            log.warning("ignoring %s: its lease names another attempt", Path(entry.path) / LEASE_FILE)
            lease = None
        if lease is not None and attempt_key(lease.job_id, lease.attempt) not in accounted:
            leases.append(lease)
        workdirs.append(workdir)
    return leases, workdirs
