"""Scheduler handlers: one ``PartitionScheduler`` per partition this process owns.

Order of effects for every batch: insert new jobs, decide, publish JobReady/JobExpired
beside the state update, commit, then ack. A crash anywhere before the ack replays the
batch: the insert skips known jobs, and JobReady ids (``job:attempt:ready:n``) make a
re-publish within JetStream's duplicate window a no-op. The backlog in memory changes
while deciding; if the publish or the commit fails it is rebuilt from Postgres before the
next batch. Known gap: a released job has no timeout of its own, so a JobReady lost for
good (or an executor that dies; JobLost is not built yet) holds its slot until restarted by hand.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import asyncpg
import msgspec

from jobmesh.contract import subjects
from jobmesh.contract.ids import event_id, release_id
from jobmesh.contract.messages.v1 import (
    ExplainReply,
    ExplainRequest,
    JobExpired,
    JobFailed,
    JobLost,
    JobReady,
    JobSubmitted,
    JobSucceeded,
    JobUnplaceable,
    TerminalEvent,
)
from jobmesh.runtime.clusterconfig import ClusterConfig
from jobmesh.runtime.db import translated
from jobmesh.runtime.nodes import NodeWatcher
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.service import Envelope
from jobmesh.runtime.tracing import Tracing
from jobmesh.scheduler import store
from jobmesh.scheduler.backlog import Backlog, Expire, Job, Release
from jobmesh.scheduler.placement import Placement

if TYPE_CHECKING:
    from jobmesh.runtime.db import Connection

log = logging.getLogger("jobmesh.scheduler")

TERMINAL = (JobSucceeded, JobFailed, JobExpired, JobLost)
_submitted = msgspec.json.Decoder(JobSubmitted)
PLAN_LIMIT = 2000  # releases per planning round; the rest go in the next round


class Placements:
    """The current ``Placement`` for the live nodes and zone map, rebuilt when either changes."""

    def __init__(self, nodes: NodeWatcher, config: ClusterConfig, strategy: str = "spread") -> None:
        self._nodes = nodes
        self._config = config
        self._strategy = strategy
        self._key: tuple | None = None
        self._current: Placement | None = None

    def current(self) -> Placement:
        key = (self._nodes.version, id(self._config.zones))
        if key != self._key or self._current is None:
            self._current = Placement(self._nodes.alive(), self._config.zones, self._strategy)
            self._key = key
        return self._current


class PartitionScheduler:
    """Owns the backlog of one partition while this process holds its lease.

    Args:
        partition: the partition number.
        pool: Postgres pool (schema ``scheduler``).
        publisher: JetStream publisher.
        placements: node rankings.
        config: queue and tenant configuration.
        tracing: turns a job's stored traceparent back into the context JobReady continues.
        clock: returns the current unix time.
    """

    def __init__(
        self,
        partition: int,
        pool: asyncpg.Pool,
        publisher: Publisher,
        placements: Placements,
        config: ClusterConfig,
        tracing: Tracing,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tracing = tracing
        self.partition = partition
        self._pool = pool
        self._publisher = publisher
        self._placements = placements
        self._config = config
        self._clock = clock
        self.backlog = self._new_backlog()
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._dirty = False
        self._nodes_key: object = None

    def _new_backlog(self) -> Backlog:
        return Backlog(queue_config=self._config.queue, weight_of=self._config.weight)

    async def load(self) -> None:
        """Rebuild the backlog from Postgres (start-up, take-over, or after a failure)."""
        rows = await store.load_active(self._pool, self.partition)
        backlog = self._new_backlog()
        now = self._clock()
        for i, row in enumerate(rows):
            if i % 5000 == 4999:
                await asyncio.sleep(0)  # let lease beats and other partitions run meanwhile
            job = Job.of(
                _submitted.decode(row["submitted"]),
                row["seq"],
                raw=row["submitted"],
                trace=row["trace"],
                attempt=row["attempt"],
                releases=row["releases"],
            )
            if row["state"] == "released":
                backlog.add_released(job, now)
            else:
                backlog.add(job, now)
        self.backlog = backlog
        self._dirty = False
        if len(rows) > 10_000:
            # A big backlog is long-lived and free of reference cycles: keep the cyclic
            # collector from walking it again and again (freed jobs still go by refcount).
            gc.collect()
            gc.freeze()
        log.info("partition %d: loaded %d active jobs", self.partition, len(rows))
        self.kick()

    def kick(self) -> None:
        """Ask the planner to look at the backlog again."""
        self._kick.set()

    def config_changed(self) -> None:
        self.backlog.reconfigure(self._clock())
        self.kick()

    async def handle(self, batch: list[Envelope]) -> None:
        """Apply a batch of submits, terminal events and unplaceable replies."""
        async with self._lock:
            if self._dirty:
                async with translated("reloading the backlog"):
                    await self.load()
            now = self._clock()
            wake_before = self._next_wake(now)
            submits = [env for env in batch if isinstance(env.message, JobSubmitted)]
            finished: list[TerminalEvent] = [env.message for env in batch if isinstance(env.message, TERMINAL)]
            refused: list[JobUnplaceable] = [env.message for env in batch if isinstance(env.message, JobUnplaceable)]
            try:
                async with translated("scheduler batch"), self._pool.acquire() as conn, conn.transaction():
                    traces = [env.headers.get("traceparent", "") for env in submits]
                    new = await store.insert_new(
                        conn, [env.message for env in submits], traces, [env.data for env in submits]
                    )
                    for env, trace in zip(submits, traces, strict=True):
                        seq = new.get(env.message.job_id)
                        if seq is not None:
                            self.backlog.add(Job.of(env.message, seq, raw=env.data, trace=trace), now)
                    changes = store.StateChanges()
                    ended = 0
                    for m in finished:
                        if self.backlog.finish(m.job_id, m.attempt, now):
                            changes.add(m.job_id, "done")
                            ended += 1
                    for r in refused:
                        if self.backlog.room_wanted(r.job_id, r.attempt, r.release, r.reason, now):
                            changes.add(r.job_id, "pending", r.reason)
                    if ended:
                        self.backlog.retry_rooms_now(now, ended)
                    decisions = self._plan(now)
                    await self._publish_and_record(conn, decisions, now, changes)
            except BaseException:
                self._dirty = True
                raise
            # The planner sleeps until the next timer or token; wake it only if this batch
            # brought that moment forward, or left releases for another round.
            wake_after = self._next_wake(now)
            if len(decisions) >= PLAN_LIMIT or (
                wake_after is not None and (wake_before is None or wake_after < wake_before)
            ):
                self.kick()

    def _next_wake(self, now: float) -> float | None:
        wakes = [t for t in (self.backlog.next_wake(), self.backlog.next_token(now)) if t is not None]
        return min(wakes) if wakes else None

    async def run_planner(self) -> None:
        """Plan when nodes change, config changes, timers fire or tokens refill."""
        while True:
            now = self._clock()
            wake = self._next_wake(now)
            timeout = max(0.0, wake - now) if wake is not None else None
            try:
                await asyncio.wait_for(self._kick.wait(), timeout)
            except TimeoutError:
                pass
            self._kick.clear()
            try:
                async with self._lock:
                    if self._dirty:
                        await self.load()
                    now = self._clock()
                    nodes_key = self._placements.current()
                    if nodes_key is not self._nodes_key:
                        self._nodes_key = nodes_key
                        self.backlog.unpark(now)
                    decisions = self._plan(now)
                    if decisions:  # an idle round costs no transaction
                        changes = store.StateChanges()
                        async with self._pool.acquire() as conn, conn.transaction():
                            await self._publish_and_record(conn, decisions, now, changes)
                if len(decisions) >= PLAN_LIMIT:
                    self.kick()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The round's effects are undone by the reload; try again shortly.
                log.exception("partition %d: planning round failed; retrying", self.partition)
                self._dirty = True
                await asyncio.sleep(1.0)

    async def run_pruner(self, retention: float, every: float = 60.0) -> None:
        """Forget finished jobs once ``retention`` seconds have passed (a background task)."""
        while True:
            await asyncio.sleep(every)
            try:
                while await store.prune_done(self._pool, self.partition, self._clock() - retention) > 0:
                    pass
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError):
                # Nothing depends on pruning promptly: try again at the next round.
                log.warning("partition %d: pruning finished jobs failed; will retry", self.partition, exc_info=True)

    async def _publish_and_record(
        self, conn: Connection, decisions: list[Release | Expire], now: float, changes: store.StateChanges
    ) -> None:
        """Publish the decisions and write their state changes side by side, inside the open
        transaction; the commit that follows happens only if both succeeded."""
        outgoing = self._messages(decisions, now, changes)
        results = await asyncio.gather(
            self._publisher.publish(outgoing), store.apply(conn, changes), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _plan(self, now: float) -> list[Release | Expire]:
        return self.backlog.plan(now, self._placements.current().place_job, limit=PLAN_LIMIT)

    def _messages(self, decisions: list[Release | Expire], now: float, changes: store.StateChanges) -> list[Outgoing]:
        """The messages one round's decisions publish; notes the state changes they make."""
        outgoing: list[Outgoing] = []
        for d in decisions:
            job = d.job
            context = self._tracing.extract({"traceparent": job.trace} if job.trace else None)
            if isinstance(d, Release):
                submitted = job.submitted
                ready = JobReady(
                    job_id=job.job_id,
                    attempt=job.attempt,
                    partition=self.partition,
                    spec=submitted.spec,
                    candidates=d.candidates,
                    tiers=d.tiers if any(d.tiers) else [],
                    submitted_at=job.submitted_at,
                    ready_at=now,
                    release=job.releases,
                )
                subject = subjects.job_event(self.partition, subjects.READY)
                msg_id = release_id(job.job_id, job.attempt, subjects.READY, job.releases)
                outgoing.append(Outgoing(subject, ready, msg_id, context))
                changes.add(job.job_id, "released", releases=job.releases)
            elif isinstance(d, Expire):
                # Attempt 0: the job expired before any attempt was released.
                attempt = job.attempt if job.releases else 0
                message = JobExpired(
                    job_id=job.job_id, attempt=attempt, partition=self.partition, reason=d.reason, at=now
                )
                subject = subjects.job_event(self.partition, subjects.EXPIRED)
                outgoing.append(Outgoing(subject, message, event_id(job.job_id, attempt, subjects.EXPIRED), context))
                changes.add(job.job_id, "done", d.reason)
        return outgoing

    async def explain(self, request: ExplainRequest) -> ExplainReply:
        """Why a job of this partition is not running yet."""
        job = self.backlog.jobs.get(request.job_id)
        if job is None:
            return ExplainReply(job_id=request.job_id, where="", reason="")
        return ExplainReply(
            job_id=request.job_id, where=job.where, reason=self.backlog.explain(request.job_id, self._clock())
        )
