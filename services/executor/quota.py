"""The disk quota of an attempt's working directory: measuring it, watching it, judging it at exit.

The binder reserved ``disk_mb`` on this node for the job; a job that writes more would eat
into other jobs' reservations, so it fails with ``disk_quota_exceeded``. The directory is
measured every :data:`QUOTA_CHECK_SECONDS` while the process runs (and the process is
stopped when it is over), and once more after the process has exited, so a job that writes
past its quota and exits within one interval fails too.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from jobmesh.contract.messages.v1 import JobError
from jobmesh.executor.outcomes import DISK_QUOTA, EXIT_CODE, Outcome
from jobmesh.executor.runner import AbortSignal

QUOTA_CHECK_SECONDS = 1.0  # how often a running job's scratch directory is measured
MIB = 1024 * 1024


def directory_bytes(path: Path) -> int:
    """Bytes held by regular files under ``path`` (links are not followed).

    Args:
        path: the directory to measure; a missing one holds nothing.

    Returns:
        The sum of the files' sizes.
    """
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue  # removed while we looked: nothing to count
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def quota_error(used_bytes: int, quota_mb: int) -> JobError | None:
    """The ``disk_quota_exceeded`` error for a directory holding ``used_bytes``, if it is over.

    Args:
        used_bytes: what the directory holds (:func:`directory_bytes`).
        quota_mb: the job's ``disk_mb``; 0 means the job reserved no disk and is not measured.

    Returns:
        The error, or None when there is no quota or the directory is within it.
    """
    if quota_mb <= 0 or used_bytes <= quota_mb * MIB:
        return None
    return JobError(code=DISK_QUOTA, message=f"used {used_bytes / MIB:.1f} MiB of its {quota_mb} MiB disk quota")


def outcome_after_exit(outcome: Outcome, used_bytes: int, quota_mb: int) -> Outcome:
    """The final outcome of an ended process, given what its directory holds after it ended.

    A process that ended on its own (success, or a non-zero exit that may well be the
    full disk speaking) but left more than its quota fails with ``disk_quota_exceeded``,
    keeping its exit code and output. One the executor stopped (timeout, drain, quota) or
    that never started keeps its reason: that is why it ended.

    Args:
        outcome: what the runner returned.
        used_bytes: what the working directory holds now (:func:`directory_bytes`).
        quota_mb: the job's ``disk_mb`` (0: no quota).

    Returns:
        ``outcome``, or the quota failure that replaces it.
    """
    if outcome.error is not None and outcome.error.code != EXIT_CODE:
        return outcome
    error = quota_error(used_bytes, quota_mb)
    if error is None:
        return outcome
    return Outcome(outcome.exit_code, error, outcome.output_tail)


async def watch_quota(workdir: Path, quota_mb: int, abort: AbortSignal, interval: float = QUOTA_CHECK_SECONDS) -> None:
    """Stop the attempt through ``abort`` once its directory outgrows its quota.

    Measured by walking the directory, so a burst between two checks can overshoot briefly
    (the check at exit, :func:`outcome_after_exit`, catches a job that ends in between).
    Runs until it stops the attempt or is cancelled.

    Args:
        workdir: the attempt's working directory.
        quota_mb: the job's ``disk_mb`` (more than 0).
        abort: the attempt's abort signal.
        interval: seconds between two measurements.
    """
    while True:
        await asyncio.sleep(interval)
        error = quota_error(await asyncio.to_thread(directory_bytes, workdir), quota_mb)
        if error is not None:
            abort.set(DISK_QUOTA, error.message)
            return
