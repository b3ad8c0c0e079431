"""History retention: the tracker prunes finished jobs, in small batches, off the write path.

What is old is decided by pure functions of an injected clock (:func:`prune_cutoff`,
:func:`purges_logs`); :class:`Pruner` is the I/O around them: a periodic task with its own
Postgres connection, so a round never takes a connection a write batch is waiting for, and
batches of ``batch`` jobs, each one short statement, so no lock is held for long.

Log lines live on JM_LOGS, whose ``max_age`` bounds them anyway. When the history is kept
for less time than that, the lines of each pruned job are purged with it, so ``jobmesh
logs`` never shows the output of a job the tracker no longer knows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import nats.errors
from nats.js import JetStreamContext

from jobmesh.contract import streams, subjects
from jobmesh.errors import JobmeshError
from jobmesh.tracker import store

log = logging.getLogger("jobmesh.tracker")

# Purge requests in flight at once: enough to keep up with a batch, few enough that the
# JetStream API is not flooded.
PURGE_CONCURRENCY = 16


def prune_cutoff(now: float, retention: float) -> float:
    """The time before which a final job's last change makes it old enough to prune.

    Args:
        now: the current unix time (from the injected clock).
        retention: ``JOBMESH_HISTORY_RETENTION_SECONDS``.

    Returns:
        Unix seconds; a job last changed strictly before it may go.
    """
    return now - retention


def purges_logs(retention: float, logs_max_age: float = streams.STREAMS_BY_NAME[subjects.STREAM_LOGS].max_age) -> bool:
    """Whether a pruned job's log lines must be purged with it: only when the stream would
    otherwise keep them longer than the job's history (else they expired already).

    Args:
        retention: ``JOBMESH_HISTORY_RETENTION_SECONDS``.
        logs_max_age: JM_LOGS' ``max_age`` in seconds.
    """
    return retention < logs_max_age


Purge = Callable[[Sequence[str]], Awaitable[None]]


def log_purger(js: JetStreamContext) -> Purge:
    """A purge of the JM_LOGS subjects of the given jobs (best effort: what fails stays
    until the stream's ``max_age``)."""
    limit = asyncio.Semaphore(PURGE_CONCURRENCY)

    async def one(job_id: str) -> None:
        async with limit:
            try:
                await js.purge_stream(subjects.STREAM_LOGS, subject=subjects.job_log(job_id))
            except (TimeoutError, nats.errors.Error):
                log.warning("could not purge the log lines of pruned job %s; they expire with JM_LOGS", job_id)

    async def purge(job_ids: Sequence[str]) -> None:
        await asyncio.gather(*(one(j) for j in job_ids))

    return purge


class Pruner:
    """Deletes finished jobs older than the retention, one batch at a time.

    Args:
        pool: a pool of its own (one connection is enough), search_path ``tracker``.
        retention: seconds a final job is kept after its last change.
        batch: jobs per statement.
        clock: returns the current unix time.
        purge: called with the ids of each deleted batch (log lines); None for none.
        pause: seconds between two batches of one round, so a long backlog of old rows
            (the first round on a large history) leaves Postgres to the write path.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        retention: float,
        batch: int,
        clock: Callable[[], float] = time.time,
        purge: Purge | None = None,
        pause: float = 0.05,
    ) -> None:
        self._pool = pool
        self._retention = retention
        self._batch = batch
        self._clock = clock
        self._purge = purge
        self._pause = pause
        self.pruned = 0  # jobs deleted since start (read by tests and logs)
        self.rounds = 0  # completed rounds
        self.batches = 0  # statements that deleted something

    async def round(self) -> int:
        """Prune until no old final job is left; return how many went."""
        cutoff = prune_cutoff(self._clock(), self._retention)
        total = 0
        while True:
            gone = await store.prune(self._pool, cutoff, self._batch)
            total += len(gone)
            self.pruned += len(gone)
            self.batches += bool(gone)
            if gone and self._purge is not None:
                await self._purge(gone)
            if len(gone) < self._batch:
                break
            await asyncio.sleep(self._pause)  # throttling between batches, not a wait
        self.rounds += 1
        if total:
            log.info("pruned %d finished jobs last changed before %.0f", total, cutoff)
        return total

    async def run(self, interval: float) -> None:
        """Run a round every ``interval`` seconds (a background task), the first one at once."""
        while True:
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, JobmeshError):
                # Nothing depends on pruning promptly: the next round picks up where this stopped.
                log.warning("pruning the history failed; will retry in %.0f s", interval, exc_info=True)
            await asyncio.sleep(interval)
