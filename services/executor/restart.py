"""What a restarted executor does about the attempts of the process it replaces.

An executor that starts under a node id whose record is still in KV (it was killed and came
back within the node TTL) reads that record before its first put. Every attempt the record
lists belongs to another incarnation and is not running any more in this process: it is
reported lost at once (:func:`lost_messages`; or ended, below), so the scheduler retries it
without waiting for a lease to expire, and a dispatch of it that comes again is acked
without running it.

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

An attempt that ended writes its terminal event into the same directory before publishing it
(:func:`write_outcome`). The executor may be killed between that event becoming durable and
its record listing the attempt as ended; the next one then finds the attempt among the old
record's running ones. Reporting it lost would race the real end to the scheduler (a
scheduler replica killed while holding the end delivers it only after its ack wait), and
the job could end twice. So a starting executor publishes again the terminal event it finds
(:func:`reports_of`: the same message id, a no-op for JetStream when it was durable) and
reports lost only the attempts that left none. An attempt's private directory therefore
stays until a node record listing it as ended is durable, and a starting executor removes
the old directories only once its reports are durable and in a record of its own.
JetStream drops the copy of an event that was durable only within its duplicate window
(120 s); a later copy is absorbed by the tracker (events by id) and the scheduler (an
attempt that already ended).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Collection, Iterable
from pathlib import Path

import msgspec

from jobmesh.contract import subjects
from jobmesh.contract.ids import attempt_key, member_event_id
from jobmesh.contract.messages.v1 import AttemptLease, JobFailed, JobLost, JobSucceeded, MemberSucceeded, NodeInfo
from jobmesh.executor.outcomes import AttemptEnd, end_kind_of
from jobmesh.executor.secrets import remove_secret_files
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.tracing import Context

log = logging.getLogger("jobmesh.executor.restart")

LOST_REASON = "executor restarted; the attempt was not running any more"
LEASE_FILE = "lease.json"  # in the attempt's private directory
OUTCOME_FILE = "outcome.json"  # beside it: the terminal event, written before it is published


class StoredOutcome(msgspec.Struct, frozen=True):
    """An attempt's terminal event as its private directory keeps it (:func:`write_outcome`).

    Only the event: its subject and message id are derived again from the attempt when it
    is published again, so a file a job could have written cannot address another subject
    or take another attempt's message id.

    Attributes:
        succeeded: the event, when the attempt succeeded.
        failed: the event, when it failed.
        member_succeeded: the event, when it was a gang member and succeeded.
    """

    succeeded: JobSucceeded | None = None
    failed: JobFailed | None = None
    member_succeeded: MemberSucceeded | None = None

    @property
    def event(self) -> AttemptEnd | None:
        """The kept event, whichever it is."""
        for event in (self.succeeded, self.failed, self.member_succeeded):
            if event is not None:
                return event
        return None


_lease_decoder = msgspec.json.Decoder(AttemptLease)
_outcome_decoder = msgspec.json.Decoder(StoredOutcome)


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
    """One ``JobLost`` per orphaned attempt, addressed and with its message id (the lease's
    gang member's own).

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
                rank=lease.rank,
                world_size=lease.world_size,
            ),
            member_event_id(lease.job_id, lease.attempt, subjects.LOST, lease.rank),
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


def strip_private(private: Path) -> None:
    """Remove from an ended attempt's private directory all but its lease and kept outcome
    (its secrets first), which stay until a node record lists the attempt as ended.

    Args:
        private: ``<work_root>/.<job>-<attempt>``; a missing one is fine.
    """
    remove_secret_files(private / "secrets")
    try:
        entries = list(os.scandir(private))
    except OSError:
        return
    for entry in entries:
        if entry.name in (LEASE_FILE, OUTCOME_FILE):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def kill_leftovers(workdirs: Iterable[Path], proc: Path = Path("/proc"), remove: bool = True) -> int:
    """SIGKILL the process groups still working in orphaned attempts' directories, then remove
    those directories and the attempts' private directories (:func:`remove_leftovers`).

    Blocking (it walks ``/proc`` and the directories): run it in a thread.

    Args:
        workdirs: attempt directories of orphaned attempts.
        proc: the proc file system.
        remove: also remove the directories now (False: the caller does, once what it
            reports of them is durable and recorded).

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
    if remove:
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
    # An outcome left from an earlier run of the same attempt id is not this run's.
    (private / OUTCOME_FILE).unlink(missing_ok=True)
    partial = private / f"{LEASE_FILE}.partial"
    partial.write_bytes(msgspec.json.encode(lease))
    partial.replace(private / LEASE_FILE)


def write_outcome(private: Path, terminal: Outgoing) -> None:
    """Keep an attempt's terminal event in its private directory, before it is published.

    Blocking: run it in a thread. Written to a temporary name and renamed, so a crash leaves
    the whole file or none.

    Args:
        private: ``<work_root>/.<job>-<attempt>`` (created 0700 when the attempt never
            got as far as its lease).
        terminal: the JobSucceeded, MemberSucceeded or JobFailed, addressed
            (``outcomes.terminal_message``).
    """
    event = terminal.message
    stored = StoredOutcome(
        succeeded=event if isinstance(event, JobSucceeded) else None,
        failed=event if isinstance(event, JobFailed) else None,
        member_succeeded=event if isinstance(event, MemberSucceeded) else None,
    )
    private.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = private / f"{OUTCOME_FILE}.partial"
    partial.write_bytes(msgspec.json.encode(stored))
    partial.replace(private / OUTCOME_FILE)


def read_outcome(private: Path, lease: AttemptLease, node_id: str) -> Outgoing | None:
    """The terminal event an attempt kept in its private directory, ready to publish again.

    Args:
        private: ``<work_root>/.<job>-<attempt>``.
        lease: the attempt it must be of.
        node_id: this node, which it must name.

    Returns:
        The event on its own subject with its own message id, or None when there is none
        (the attempt had not ended), it is cut off, or it is not this attempt's (and gang
        member's) on this node (a job that could write the directory must not end another
        attempt).
    """
    try:
        stored = _outcome_decoder.decode((private / OUTCOME_FILE).read_bytes())
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    event = stored.event
    if event is None:
        return None
    rank = 0 if isinstance(event, JobSucceeded) else event.rank
    if (event.job_id, event.attempt, event.partition, event.node_id, rank) != (
        lease.job_id,
        lease.attempt,
        lease.partition,
        node_id,
        lease.rank,
    ):
        return None
    kind = end_kind_of(event)
    return Outgoing(
        subjects.node_event(lease.partition, kind, node_id),
        event,
        member_event_id(lease.job_id, lease.attempt, kind, lease.rank),
    )


def reports_of(
    work_root: Path, ended_or_lost: Iterable[AttemptLease], node_id: str, at: float
) -> tuple[list[Outgoing], int]:
    """What a starting executor reports for the attempts an earlier one left running: the
    terminal event each kept (:func:`read_outcome`), else a ``JobLost``.

    Blocking (it reads files): run it in a thread, before the attempts' directories go.

    Args:
        work_root: this node's ``<work_dir>/<node_id>``.
        ended_or_lost: the orphaned and left-behind attempts.
        node_id: this node.
        at: now (epoch seconds).

    Returns:
        The messages, in the order of ``ended_or_lost``, and how many are terminal events.
    """
    reports: list[Outgoing] = []
    kept = 0
    for lease in ended_or_lost:
        terminal = read_outcome(work_root / f".{lease.job_id}-{lease.attempt}", lease, node_id)
        if terminal is not None:
            kept += 1
            reports.append(terminal)
        else:
            reports.extend(lost_messages([lease], node_id, at))
    return reports, kept


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
