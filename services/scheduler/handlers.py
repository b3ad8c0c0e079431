"""Scheduler handlers: one ``PartitionScheduler`` per owned partition.

Order of effects for every batch: insert new jobs, publish JobReady for the released
ones, commit, then update memory and ack. A crash anywhere before the ack replays the
batch; the insert skips known jobs and JobReady ids (``job:attempt:ready:n``) make the
re-publish a no-op, so each job is released exactly once per release decision.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import asyncpg
import msgspec

from jobmesh import subjects
from jobmesh.messages.v1 import (
    JobExpired, JobFailed, JobLost, JobReady, JobSubmitted, JobSucceeded, JobUnplaceable,
)
from jobmesh.nodes import NodeWatcher
from jobmesh.publisher import Outgoing, Publisher
from jobmesh.runtime import Envelope
from jobmesh.scheduler import store
from jobmesh.scheduler.backlog import Backlog, Job, Park, Release
from jobmesh.tracing import extract

log = logging.getLogger("jobmesh.scheduler")

TERMINAL = (JobSucceeded, JobFailed, JobExpired, JobLost)
_submitted_decoder = msgspec.json.Decoder(JobSubmitted)
# A job whose candidates were full is looked at again after this long at the latest.
ROOM_RETRY_SECONDS = 1.0


class PartitionScheduler:
    """Owns the backlog of one partition while this process holds it.

    Args:
        partition: the partition number.
        pool: Postgres pool (schema ``scheduler``).
        publisher: JetStream publisher.
        nodes: the live node view.
        clock: returns the current unix time.
    """

    def __init__(
        self,
        partition: int,
        pool: asyncpg.Pool,
        publisher: Publisher,
        nodes: NodeWatcher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.partition = partition
        self._pool = pool
        self._publisher = publisher
        self._nodes = nodes
        self._clock = clock
        self.backlog = Backlog()
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._nodes_version = -1

    async def load(self) -> None:
        """Rebuild the backlog from Postgres (start-up and partition take-over)."""
        rows = await store.load_active(self._pool, self.partition)
        for row in rows:
            job = Job(
                job_id=row["job_id"],
                seq=row["seq"],
                submitted=_submitted_decoder.decode(row["submitted"]),
                attempt=row["attempt"],
                state=row["state"],
                reason=row["reason"],
                releases=row["releases"],
                trace={"traceparent": row["trace"]} if row["trace"] else {},
            )
            self.backlog.add(job)
        log.info("partition %d: loaded %d active jobs", self.partition, len(rows))
        self.kick()

    def kick(self) -> None:
        """Ask the planner to look at the backlog again (nodes changed, room freed)."""
        self._kick.set()

    async def handle(self, batch: list[Envelope]) -> None:
        """Apply a batch of submits, terminal events and unplaceable replies."""
        async with self._lock:
            submits = [env for env in batch if isinstance(env.message, JobSubmitted)]
            finished = [env.message for env in batch if isinstance(env.message, TERMINAL)]
            refused = [env.message for env in batch if isinstance(env.message, JobUnplaceable)]
            added: list[str] = []
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    traces = [env.headers.get("traceparent", "") for env in submits]
                    new = await store.insert_new(conn, [env.message for env in submits], traces)
                    for env, trace in zip(submits, traces):
                        seq = new.get(env.message.job_id)
                        if seq is not None and self.backlog.add(
                            Job(env.message.job_id, seq, env.message, trace={"traceparent": trace} if trace else {})
                        ):
                            added.append(env.message.job_id)
                    done = [m.job_id for m in finished if self._is_current(m.job_id, m.attempt)]
                    await store.set_state(conn, done, "done")
                    back = [m for m in refused if self._is_current(m.job_id, m.attempt, m.release)]
                    await store.set_state(conn, [m.job_id for m in back], "pending", [m.reason for m in back])
                    decisions = await self._release(conn)
            except BaseException:
                self.backlog.discard(added)
                raise
            # Committed: now memory may follow.
            self.backlog.apply(decisions)
            for m in back:
                self.backlog.requeue(m.job_id, m.reason)
            self.backlog.discard(done)
            if done and self.backlog.waiting_for_room:
                self.kick()  # room was freed

    async def run_planner(self) -> None:
        """Release waiting jobs when nodes change or room may have been freed."""
        while True:
            timeout = ROOM_RETRY_SECONDS if self.backlog.waiting_for_room else None
            try:
                await asyncio.wait_for(self._kick.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            async with self._lock:
                self.backlog.unpark(nodes_changed=self._nodes_changed())
                async with self._pool.acquire() as conn, conn.transaction():
                    decisions = await self._release(conn)
                self.backlog.apply(decisions)

    def _nodes_changed(self) -> bool:
        changed = self._nodes.version != self._nodes_version
        self._nodes_version = self._nodes.version
        return changed

    def _is_current(self, job_id: str, attempt: int, release: int | None = None) -> bool:
        job = self.backlog.jobs.get(job_id)
        if job is None or job.attempt != attempt:
            return False
        return release is None or (job.state == "released" and job.releases == release)

    async def _release(self, conn: asyncpg.Connection) -> list[Release | Park]:
        decisions = self.backlog.plan(self._nodes.alive())
        releases = [d for d in decisions if isinstance(d, Release)]
        parks = [d for d in decisions if isinstance(d, Park) and d.reason != d.job.reason]
        now = self._clock()
        outgoing = []
        for d in releases:
            job = d.job
            ready = JobReady(
                job_id=job.job_id,
                attempt=job.attempt,
                partition=self.partition,
                spec=job.spec,
                candidates=d.candidates,
                submitted_at=job.submitted.submitted_at,
                ready_at=now,
                release=job.releases + 1,
            )
            outgoing.append(
                Outgoing(
                    subjects.job_event(self.partition, subjects.READY),
                    ready,
                    f"{job.job_id}:{job.attempt}:ready:{job.releases + 1}",
                    extract(job.trace),
                )
            )
        await self._publisher.publish(outgoing)
        await store.mark_released(conn, [d.job.job_id for d in releases], [d.job.releases + 1 for d in releases])
        await store.set_state(conn, [d.job.job_id for d in parks], "pending", [d.reason for d in parks])
        return decisions
