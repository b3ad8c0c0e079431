"""Scheduler handlers: one ``PartitionScheduler`` per partition this process owns.

Order of effects for every batch: insert new jobs, decide, publish (JobReady, JobExpired,
JobRetrying, JobGaveUp, JobLost, JobCancelled ...) beside the state update, commit, then
ack. A crash anywhere before the ack replays the batch: the insert skips known jobs, and
every message id is deterministic (``job:attempt:kind[:n]``), so a re-publish within
JetStream's duplicate window is a no-op. The backlog in memory changes while deciding; if
the publish or the commit fails it is rebuilt from Postgres before the next batch.

After its release an attempt holds a lease (``attemptleases``): its node's records renew
it; one that never shows up is released again after the bind timeout, one whose renewals
stop is declared lost. What follows a failed or lost attempt is ``retries.decide``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

import asyncpg
import msgspec
from nats.errors import Error as NatsError

from jobmesh.contract import subjects
from jobmesh.contract.ids import release_id
from jobmesh.contract.messages.v1 import (
    AttemptError,
    CancelReply,
    CancelRequest,
    ChildAdded,
    DependencyEnded,
    DependencyWatch,
    ExplainReply,
    ExplainRequest,
    JobCancelled,
    JobExpired,
    JobFailed,
    JobLost,
    JobReady,
    JobSubmitted,
    JobSucceeded,
    JobUnplaceable,
    JobWaiting,
    MemberSucceeded,
    NodeInfo,
    TerminalEvent,
)
from jobmesh.errors import Unavailable
from jobmesh.runtime.clusterconfig import ClusterConfig
from jobmesh.runtime.db import translated
from jobmesh.runtime.fencing import binding_fence
from jobmesh.runtime.nodes import NodeWatcher
from jobmesh.runtime.outcomes import ACK, Outcome
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.service import Envelope
from jobmesh.runtime.tracing import Context, Tracing, record_lost_attempt
from jobmesh.scheduler import lifecycle, mapsteps, retries, store
from jobmesh.scheduler.attemptleases import AttemptLeases, Lease
from jobmesh.scheduler.backlog import (
    CANCELLED,
    DEPS,
    EXPIRED,
    FAILED,
    RELEASED,
    SUCCEEDED,
    TIMER,
    Backlog,
    Expire,
    Job,
    Release,
)
from jobmesh.scheduler.metrics import SchedulerMetrics
from jobmesh.scheduler.placement import Placement
from jobmesh.scheduler.results import ResultMissing, Results

if TYPE_CHECKING:
    from jobmesh.runtime.db import Connection

log = logging.getLogger("jobmesh.scheduler")

TERMINAL = (JobSucceeded, JobFailed, JobExpired, JobLost, JobCancelled)
_submitted = msgspec.json.Decoder(JobSubmitted)
_encode_submitted = msgspec.json.Encoder().encode
PLAN_LIMIT = 2000  # releases per planning round; the rest go in the next round
# A lease is due but the partition's events are not processed that far: ask again this soon.
LEASE_CATCH_UP_RETRY = 0.25


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


class Round:
    """What one batch or planning round decides besides releases: messages and state changes."""

    __slots__ = (
        "awaiting",
        "changes",
        "children_done",
        "edges",
        "edges_done",
        "ended_in",
        "ends",
        "now",
        "out",
        "outcomes",
        "told",
    )

    def __init__(self, now: float) -> None:
        self.now = now
        self.changes = store.StateChanges()
        self.out: list[Outgoing] = []
        self.ended_in: dict[str, int] = {}  # attempts that freed capacity, per queue (wake room)
        self.ends: list[tuple[str, str]] = []  # jobs that ended for good, and how (for their waiters)
        self.told: list[str] = []  # ended jobs whose watching partitions were told
        self.awaiting: list[str] = []  # succeeded steps whose end waits for their child jobs
        self.children_done: list[str] = []  # parents whose children no longer matter
        self.outcomes: dict[str, str] = {}  # every end of this round (not in Postgres yet)
        self.edges: list[tuple[str, str]] = []  # (job waited for, waiter) to keep from pruning
        self.edges_done: list[str] = []  # waiters that ended: their edges go

    def freed(self, queue: str) -> None:
        """An attempt of ``queue`` ended and freed its capacity."""
        self.ended_in[queue] = self.ended_in.get(queue, 0) + 1

    @property
    def ended(self) -> int:
        """How many attempts freed capacity this round (wakes jobs waiting for room)."""
        return sum(self.ended_in.values())

    def end(self, job_id: str, outcome: str) -> None:
        """``job_id`` ended for good with ``outcome``: its waiters hear of it."""
        self.ends.append((job_id, outcome))
        self.outcomes[job_id] = outcome


class PartitionScheduler:
    """Owns the backlog of one partition while this process holds its lease.

    Args:
        partition: the partition number.
        partitions: how many partitions exist (a fallback job may belong to another).
        pool: Postgres pool (schema ``scheduler``).
        publisher: JetStream publisher.
        placements: node rankings.
        nodes: the node view (its freshness gates lease decisions).
        config: queue and tenant configuration.
        tracing: turns a job's stored traceparent back into the context JobReady continues.
        bind_timeout: seconds a released attempt may take to show up in a node record.
        settle: seconds the node view must have been caught up before a lease decision.
        clock: returns the current unix time.
        monotonic: monotonic seconds (lease deadlines).
        results: reads the lists mapped steps map over and writes their manifests.
        metrics: the scheduler's instruments (the global meter's when omitted).
    """

    def __init__(
        self,
        partition: int,
        pool: asyncpg.Pool,
        publisher: Publisher,
        placements: Placements,
        config: ClusterConfig,
        tracing: Tracing,
        *,
        nodes: NodeWatcher | None = None,
        partitions: int = 1,
        bind_timeout: float = 30.0,
        settle: float = 10.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        results: Results | None = None,
        metrics: SchedulerMetrics | None = None,
        processed_through: Callable[[], Awaitable[float]] | None = None,
    ) -> None:
        # How far this partition's own events are processed (unix time: every event stored
        # before it has been handled and acked; inf when none is outstanding). A lease is
        # declared run out only for a deadline before that: an attempt's JobSucceeded may
        # still wait in the consumer (a lagging or a killed owner's unacked batch), and
        # declaring it lost then would run it a second time. None: no such wait (tests).
        self._processed_through = processed_through
        self._through = math.inf if processed_through is None else -math.inf  # monotonic
        self._through_retry = 0.0
        self._tracing = tracing
        self._metrics = metrics or SchedulerMetrics()
        self._results = results
        self._watchers: dict[str, set[int]] = {}  # jobs of this partition others wait for
        self._resend: list[Outgoing] = []  # watches to send again after a load
        # Child jobs of workflow steps (a handler's ctx.submit): parent -> {child: partition};
        # a parent that succeeded ends, for its dependents, once its children have.
        self._children: dict[str, dict[str, int]] = {}
        self._awaiting: dict[str, list] = {}  # parent -> [children not ended, children failed]
        self._child_of: dict[str, str] = {}  # child of an awaiting parent -> the parent
        self._reawait: list[str] = []  # parents that were awaiting at a load
        self._with_edges: set[str] = set()  # held jobs whose dependencies are kept from pruning
        self.partition = partition
        self._partitions = partitions
        self._pool = pool
        self._publisher = publisher
        self._placements = placements
        self._nodes = nodes
        self._config = config
        self._clock = clock
        self._monotonic = monotonic
        self._settle = settle
        self.backlog = self._new_backlog()
        self.leases = AttemptLeases(partition, bind_timeout)
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._dirty = False
        # Set once the partition is given up (quiesce): a batch this process pulled before
        # that, and that reaches the lock only after it, must not be applied (its next
        # owner may have loaded the backlog already, and would never see the batch).
        self._closed = False
        self._nodes_key: object = None

    def _new_backlog(self) -> Backlog:
        return Backlog(queue_config=self._config.queue, weight_of=self._config.weight)

    async def load(self) -> None:
        """Rebuild the backlog from Postgres (start-up, take-over, or after a failure)."""
        rows = await store.load_active(self._pool, self.partition)
        backlog = self._new_backlog()
        leases = AttemptLeases(self.partition, self.leases.bind_timeout)
        now = self._clock()
        mono = self._monotonic()
        loaded: list[tuple[Job, str]] = []
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
            if row["retry"]:
                _restore(job, store.retry_decoder.decode(row["retry"]))
            loaded.append((job, row["state"]))
        active = {job.job_id for job, _state in loaded}
        waited = {dep for job, _s in loaded if job.deps for dep in job.deps if dep not in active}
        # A mapped step expanded before waits for its items (their ids follow from its own).
        expanded = {job.job_id: mapsteps.item_ids(job.job_id, job.items) for job, _s in loaded if job.items >= 0}
        waited.update(i for items in expanded.values() for i in items if i not in active)
        async with self._pool.acquire() as conn:
            ended = await store.ended_outcomes(conn, list(waited), self.partition)
        for job, state in loaded:
            if job.job_id in expanded and state != "released":
                job.items, job.deps = -1, None
                backlog.add(job, now)
                backlog.expanded(job.job_id, expanded[job.job_id], ended, now)
                continue
            if state == "released":
                backlog.add_released(job, now)
                # A new owner knows nothing of the attempt's renewals: every lease starts
                # afresh, long enough for the next records to renew the running ones.
                leases.track(
                    job.job_id,
                    job.attempt,
                    job.heartbeat,
                    mono,
                    max(leases.bind_timeout, job.heartbeat),
                    job.replicas,
                    job.gang_done,
                )
            else:
                backlog.add(job, now, ended)
        self._watchers = await store.load_watches(self._pool, self.partition)
        self._with_edges = await store.load_edge_waiters(self._pool, self.partition)
        self._children = await store.load_children(self._pool, self.partition)
        self._awaiting, self._child_of = {}, {}
        # A parent not held any more has ended: it was waiting for its children.
        self._reawait = [parent for parent in self._children if parent not in active]
        # Watches sent before may not have been recorded yet: send them again (idempotent).
        self._resend = self._remote_watches([job for job, _s in loaded if job.deps], ended, now)
        self.backlog = backlog
        self.leases = leases
        if self._nodes is not None:
            for node, _alive in self._nodes.all():
                leases.observe(node, mono)
        self._dirty = False
        if len(rows) > 10_000:
            # A big backlog is long-lived and free of reference cycles: keep the cyclic
            # collector from walking it again and again (freed jobs still go by refcount).
            gc.collect()
            gc.freeze()
        log.info("partition %d: loaded %d active jobs", self.partition, len(rows))
        self.kick()

    async def quiesce(self) -> None:
        """Wait until the batch, round or cancel in hand has finished (the partition is
        being given up: nothing may commit after its next owner loaded it)."""
        async with self._lock:
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"partition {self.partition} was given up: its next owner takes this")

    def kick(self) -> None:
        """Ask the planner to look at the backlog again."""
        self._kick.set()

    def config_changed(self) -> None:
        self.backlog.reconfigure(self._clock())
        self.kick()

    def observe(self, record: NodeInfo, at: float) -> None:
        """A node record arrived: renew the leases of this partition's attempts on it."""
        self.leases.observe(record, at)
        if self.leases._pending:  # a restarted executor: act now, not at the next deadline
            self.kick()

    async def handle(self, batch: list[Envelope]) -> list[Outcome] | None:
        """Apply a batch of submits, attempt endings and unplaceable replies.

        Returns:
            None (ack them all), or one outcome per message when an executor's ending was
            fenced off (:meth:`_fenced`): that one is retried or dead-lettered, unapplied.
        """
        outcomes: list[Outcome] | None = None
        async with self._lock:
            self._check_open()
            if self._dirty:
                async with translated("reloading the backlog"):
                    await self.load()
            now = self._clock()
            wake_before = self._next_wake(now)
            submits: list[Envelope] = []
            finished: list[TerminalEvent] = []
            refused: list[JobUnplaceable] = []
            # Messages between partitions (and from the trigger) about dependencies: rare.
            watches: list[DependencyWatch] = []
            told: list[DependencyEnded] = []
            added: list[ChildAdded] = []
            contexts = {}
            for n, env in enumerate(batch):  # one pass: this is every job's path
                message = env.message
                contexts[message.job_id] = env.context
                if isinstance(message, JobSubmitted):
                    submits.append(env)
                elif isinstance(message, TERMINAL) or isinstance(message, MemberSucceeded):
                    fenced = self._fenced(env)
                    if fenced is not None:
                        outcomes = outcomes or [ACK] * len(batch)
                        outcomes[n] = fenced
                        continue
                    finished.append(message)
                elif isinstance(message, JobUnplaceable):
                    refused.append(message)
                elif isinstance(message, DependencyWatch):
                    watches.append(message)
                elif isinstance(message, DependencyEnded):
                    told.append(message)
                elif isinstance(message, ChildAdded):
                    added.append(message)
            try:
                async with translated("scheduler batch"), self._pool.acquire() as conn, conn.transaction():
                    traces = [env.headers.get("traceparent", "") for env in submits]
                    new = await store.insert_new(
                        conn, [env.message for env in submits], traces, [env.data for env in submits]
                    )
                    jobs = [
                        Job.of(env.message, seq, raw=env.data, trace=trace)
                        for env, trace in zip(submits, traces, strict=True)
                        if (seq := new.get(env.message.job_id)) is not None
                    ]
                    rnd = Round(now)
                    ended = await self._ended_before(conn, jobs)
                    for job in jobs:
                        self.backlog.add(job, now, ended)
                        self._metrics.submitted(job.queue, job.tenant)
                        if job.where == DEPS and job.deps:
                            rnd.edges.extend((dep, job.job_id) for dep in job.deps)
                            self._with_edges.add(job.job_id)
                    rnd.out.extend(self._remote_watches(jobs, ended, now))
                    # Watches first: a watched job that ends in this batch is then told of.
                    if watches:
                        await self._watched(conn, watches, rnd)
                    if told:
                        await store.record_dep_ends(conn, self.partition, [(m.job_id, m.outcome, m.at) for m in told])
                        for ended_there in told:
                            rnd.end(ended_there.job_id, ended_there.outcome)
                    if added:
                        await self._children_added(conn, added)
                    for m in finished:
                        self._attempt_ended(m, rnd, contexts.get(m.job_id))
                    for r in refused:
                        self._refused(r, rnd, contexts.get(r.job_id))
                    self._check_leases(rnd)
                    if rnd.ended:
                        self.backlog.retry_rooms_now(now, rnd.ended, rnd.ended_in)
                    decisions = self._plan(now)
                    await self._publish_and_record(conn, decisions, rnd)
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
        return outcomes

    def _fenced(self, env: Envelope) -> Outcome | None:
        """The fate of an executor's ending for an attempt whose lease names another node.

        The lease learns the attempt's node from that node's own record (it lists the
        attempt before running it), so an ending from any other node is not the attempt's:
        it is refused (after a few deliveries' patience, as the record view may lag). An
        ending of the partition form (the scheduler's own), of a stale attempt (ignored
        anyway) or of an attempt no record listed yet passes: nothing here can tell.
        """
        parsed = subjects.node_of_event(env.subject)
        if parsed is None:
            return None
        event = env.message
        lease = self.leases.leases.get(event.job_id)
        if lease is None or lease.attempt != event.attempt:
            return None
        if lease.listed is not None:
            # A gang: every member's node speaks for the attempt (one that ended included),
            # and any node may while some member was never listed.
            if parsed[1] in lease.listed or len(lease.ranks or ()) < lease.size:
                return None
        what = f"job {event.job_id} attempt {event.attempt} is listed by the record of"
        return binding_fence(env.subject, parsed[1], lease.node_id, env.deliveries, what)

    # --- what follows an attempt -----------------------------------------------------
    def _attempt_ended(self, event: TerminalEvent, rnd: Round, context: Context | None) -> None:
        job = self.backlog.jobs.get(event.job_id)
        if job is None or job.attempt != event.attempt:
            return  # the job is gone, or the event is of a stale attempt (fenced)
        if isinstance(event, MemberSucceeded):
            self._member_succeeded(job, event, rnd, context)
            return
        if isinstance(event, JobFailed | JobLost):
            # Usually the job is out (released). After a re-release for a missed bind it may
            # sit in the backlog again when the attempt, which did run after all, fails: it
            # is taken out, so the failure gets its retry or give-up like any other.
            if job.where == RELEASED or self.backlog.claim_released(job.job_id, job.attempt, rnd.now):
                node_id = event.node_id
                ended = lifecycle.attempt_error(event, job.attempt, node_id, event.at)
                state = "lost" if isinstance(event, JobLost) else "failed"
                checkpoint = event.checkpoint if isinstance(event, JobFailed) else ""
                self._failed(job, ended, state, rnd, context, checkpoint=checkpoint)
                return
        if self.backlog.finish(event.job_id, event.attempt, rnd.now):
            self.leases.forget(event.job_id)
            outcome = (
                SUCCEEDED
                if isinstance(event, JobSucceeded)
                else EXPIRED
                if isinstance(event, JobExpired)
                else CANCELLED
            )
            if outcome == SUCCEEDED and event.job_id in self._children:
                # Its handler submitted jobs: for its dependents it ends once they have.
                rnd.changes.add(event.job_id, "done", "waiting for the jobs its handler submitted")
                rnd.awaiting.append(event.job_id)
            else:
                rnd.changes.add(event.job_id, "done", outcome=outcome)
                rnd.end(event.job_id, outcome)
            rnd.freed(job.queue)

    def _member_succeeded(self, job: Job, event: MemberSucceeded, rnd: Round, context: Context | None) -> None:
        """One member of a gang succeeded: the attempt succeeds once every member has."""
        if event.rank in job.gang_done or event.rank >= job.replicas:
            return  # a duplicate
        # Counted whatever the job's place: a gang released again (a member's JobBound
        # went missing) may already have members that ran.
        job.gang_done = job.gang_done | {event.rank}
        self.leases.member_done(job.job_id, job.attempt, event.rank)
        if event.rank == 0:
            job.gang_lead = event
        if len(job.gang_done) < job.replicas:
            # Kept durably: a new owner must not wait for members that are done already.
            rnd.changes.keep(job.job_id, job.attempt, _retry_state(job))
            return
        outgoing, done = lifecycle.gang_succeeded(
            self.partition, job.gang_lead or event, event, job.submitted_at, job.spec, context
        )
        log.info("job %s: all %d gang members of attempt %d succeeded", job.job_id, job.replicas, job.attempt)
        rnd.out.append(outgoing)
        self._attempt_ended(done, rnd, context)

    def _failed(
        self,
        job: Job,
        ended: AttemptError,
        state: str,
        rnd: Round,
        context: Context | None,
        lease: Lease | None = None,
        checkpoint: str = "",
    ) -> None:
        """Attempt ``ended.attempt`` of ``job`` failed or was lost: retry or give up.

        Args:
            lease: the attempt's lease when it was already taken out (an expiry); its
                checkpoint goes to the next attempt.
            checkpoint: the one the attempt's failure carried (JobFailed.checkpoint): it
                wins over the lease's, which may not have heard of it yet.
        """
        lease = self.leases.forget(job.job_id) or lease
        if state == "lost":
            self._metrics.lost(job.queue, job.tenant)
            record_lost_attempt(
                self._tracing, context, job.job_id, ended.attempt, ended.node_id, ended.error.message, ended.at
            )
        if job.cancelling:
            self._end_cancelled(job, job.attempt, ended.node_id, rnd, context)
            return
        spec = job.spec
        placement = self._placements.current()
        zone_of = {e.node_id: placement.zone_of(e.node_id) for e in (*job.errors, ended) if e.node_id}
        decision = retries.decide(
            job_id=job.job_id,
            policy=spec.retry,
            timeouts=spec.timeouts,
            ended=ended,
            earlier=list(job.errors),
            zone_of=zone_of,
            submitted_at=job.submitted_at,
            now=rnd.now,
        )
        code = ended.error.code
        if isinstance(decision, retries.Retry):
            checkpoint = checkpoint or (lease.checkpoint if lease is not None else "")
            self.backlog.retry(
                job.job_id, job.attempt, decision.next_attempt, decision.not_before, decision.avoid,
                decision.avoid_zones, ended, checkpoint, rnd.now,
            )  # fmt: skip
            rnd.out.append(lifecycle.retrying(job.job_id, self.partition, ended, decision, rnd.now, context))
            self._metrics.retried(job.queue, job.tenant)
            reason = f"retrying: attempt {decision.next_attempt} in {decision.delay:.1f}s after {code}"
            rnd.changes.add(job.job_id, "pending", reason, attempt=decision.next_attempt, retry=_retry_state(job))
            rnd.freed(job.queue)
            log.info(
                "job %s: attempt %d %s (%s) on %s; attempt %d in %.1fs%s",
                job.job_id, ended.attempt, state, code, ended.node_id or "-", decision.next_attempt, decision.delay,
                f", avoiding {', '.join(sorted(decision.avoid | decision.avoid_zones))}" if decision.avoid else "",
            )  # fmt: skip
            return
        errors = [*job.errors, ended]
        fallback = lifecycle.fallback_submission(job.job_id, spec, self._partitions, rnd.now)
        self.backlog.finish(job.job_id, job.attempt, rnd.now)
        rnd.out.extend(
            lifecycle.gave_up(
                job.job_id,
                self.partition,
                ended,
                state,
                decision.reason,
                errors,
                fallback,
                rnd.now,
                context,
                spec=spec,
            )
        )
        rnd.changes.add(job.job_id, "done", decision.reason, outcome=FAILED)
        rnd.end(job.job_id, FAILED)
        rnd.freed(job.queue)
        self._metrics.gave_up(job.queue, job.tenant)
        log.info(
            "job %s: gave up after attempt %d %s (%s): %s%s",
            job.job_id, ended.attempt, state, code, decision.reason,
            f"; fallback job {fallback.job_id}" if fallback is not None else "",
        )  # fmt: skip

    def _refused(self, refusal: JobUnplaceable, rnd: Round, context: Context | None) -> None:
        job = self.backlog.jobs.get(refusal.job_id)
        if job is not None and job.cancelling and job.attempt == refusal.attempt and job.where == RELEASED:
            # The binder did not bind a cancelled attempt: the job ends here.
            self.leases.forget(job.job_id)
            self._end_cancelled(job, job.attempt, "", rnd, context)
            return
        before = job.releases if job is not None else 0
        if self.backlog.room_wanted(
            refusal.job_id, refusal.attempt, refusal.release, refusal.reason, rnd.now, refusal.retry_after
        ):
            self.leases.forget(refusal.job_id)
            rnd.changes.add(refusal.job_id, "pending", refusal.reason, releases=refusal.release)
        elif job is not None and job.releases != before:
            # A dead owner's release, refused, of a job still waiting here: the count moved
            # past it, and is kept, so no later owner reuses its message id either.
            rnd.changes.add(job.job_id, "pending", job.reason, releases=job.releases)

    def _end_cancelled(self, job: Job, attempt: int, node_id: str, rnd: Round, context: Context | None) -> None:
        if job.where == RELEASED:
            self.backlog.finish(job.job_id, job.attempt, rnd.now)
            rnd.freed(job.queue)
        reason = job.cancelling or "cancelled"
        # The spec is decoded from the backlog's bytes once, here at the job's end.
        rnd.out.append(
            lifecycle.cancelled(job.job_id, self.partition, attempt, reason, node_id, rnd.now, context, spec=job.spec)
        )
        rnd.changes.add(job.job_id, "done", f"cancelled: {reason}", outcome=CANCELLED)
        rnd.end(job.job_id, CANCELLED)
        log.info("job %s: cancelled (attempt %d): %s", job.job_id, attempt, reason)

    def _check_leases(self, rnd: Round) -> None:
        """Act on the leases that ran out, but only on a node view that has caught up: a
        view that missed records would take live attempts for lost ones."""
        if not self._view_settled():
            return
        for expiry in self.leases.expired(min(self._monotonic(), self._through)):
            job = self.backlog.jobs.get(expiry.job_id)
            if job is None or job.attempt != expiry.attempt or job.where != RELEASED:
                continue
            context = self._tracing.extract({"traceparent": job.trace} if job.trace else None)
            if expiry.kind == "rebind":
                if job.cancelling:
                    # Never seen running and cancelled: end it here rather than bind it anew.
                    self._end_cancelled(job, job.attempt, "", rnd, context)
                    continue
                log.warning("job %s: attempt %d %s; releasing it again", job.job_id, job.attempt, expiry.reason)
                self.backlog.release_again(job.job_id, job.attempt, expiry.reason, rnd.now)
                continue
            log.warning("job %s: attempt %d lost: %s", job.job_id, job.attempt, expiry.reason)
            message, event = lifecycle.lost(
                job.job_id, self.partition, job.attempt, expiry.node_id, expiry.reason, rnd.now, context, job.replicas
            )
            rnd.out.append(message)
            # The stale attempt may still run on a node that was only stopped or cut off:
            # tell that node to stop it (the binder frees its reservation on the JobLost).
            if not expiry.restarted:
                rnd.out.append(
                    lifecycle.superseded(
                        job.job_id, self.partition, job.attempt, expiry.node_id, rnd.now, context, job.replicas > 1
                    )
                )
            ended = lifecycle.attempt_error(event, job.attempt, expiry.node_id, rnd.now)
            self._failed(job, ended, "lost", rnd, context, lease=expiry.lease)

    def _view_settled(self) -> bool:
        if self._nodes is None:
            return True
        return self._nodes.fresh and self._monotonic() - self._nodes.fresh_since >= self._settle

    # --- cancel ----------------------------------------------------------------------
    async def cancel(self, request: CancelRequest) -> CancelReply:
        """Cancel a job of this partition: at once if it is held, else stop its attempt."""
        async with self._lock:
            self._check_open()
            job = self.backlog.jobs.get(request.job_id)
            if job is None:
                return CancelReply(
                    job_id=request.job_id,
                    state="unknown",
                    message=f"job {request.job_id} is not held by the scheduler: it has ended or is not known",
                )
            reason = request.reason or "cancelled by request"
            if job.where == RELEASED and job.cancelling:
                return CancelReply(
                    job_id=job.job_id, state="cancelling", message=f"already cancelling: {job.cancelling}"
                )
            now = self._clock()
            rnd = Round(now)
            state, message = self._cancel_one(job, reason, rnd)
            if job.items >= 0:
                # A mapped step's items go with it.
                for item_id in list(job.deps or ()):
                    item = self.backlog.jobs.get(item_id)
                    if item is not None and not (item.where == RELEASED and item.cancelling):
                        self._cancel_one(item, f"{reason} (its mapped step was cancelled)", rnd)
            log.info("job %s: cancel asked (%s): %s", job.job_id, reason, state)
            try:
                async with translated("cancelling a job"), self._pool.acquire() as conn, conn.transaction():
                    await self._publish_and_record(conn, [], rnd)
            except BaseException:
                self._dirty = True
                raise
        self.kick()
        return CancelReply(job_id=job.job_id, state=state, message=message)

    def _cancel_one(self, job: Job, reason: str, rnd: Round) -> tuple[Literal["cancelled", "cancelling"], str]:
        """Cancel ``job``: end it now if it is held, else have its attempt stopped."""
        context = self._tracing.extract({"traceparent": job.trace} if job.trace else None)
        if job.where == RELEASED:
            job.cancelling = reason
            rnd.out.append(lifecycle.cancelling(job.job_id, self.partition, job.attempt, reason, rnd.now, context))
            rnd.changes.add(
                job.job_id, "released", f"cancelling: {reason}", attempt=job.attempt, retry=_retry_state(job)
            )
            return "cancelling", f"attempt {job.attempt} is being stopped"
        self.backlog.cancel_held(job.job_id, rnd.now)
        self.leases.forget(job.job_id)
        # The job's own attempt number, released or not: the tracker may already show that
        # attempt (waiting), and an ending at another one would be fenced.
        rnd.out.append(
            lifecycle.cancelled(job.job_id, self.partition, job.attempt, reason, "", rnd.now, context, spec=job.spec)
        )
        rnd.changes.add(job.job_id, "done", f"cancelled: {reason}", outcome=CANCELLED)
        rnd.end(job.job_id, CANCELLED)
        if job.errors:
            return "cancelled", f"it was waiting to run attempt {job.attempt} after a failure; it ended now"
        return "cancelled", "it had not started; it ended now"

    # --- dependencies and mapped steps -----------------------------------------------
    async def _ended_before(self, conn: Connection, jobs: list[Job]) -> dict[str, str]:
        """How the jobs that new ``jobs`` depend on ended, for those not held here now."""
        waited = list({dep for job in jobs if job.deps for dep in job.deps if dep not in self.backlog.jobs})
        return await store.ended_outcomes(conn, waited, self.partition) if waited else {}

    def _remote_watches(self, jobs: list[Job], ended: dict[str, str], now: float) -> list[Outgoing]:
        """A DependencyWatch for every dependency in another partition not known to have ended."""
        out = []
        for job in jobs:
            if not job.deps:
                continue
            for dep in job.spec.after:
                if dep.partition not in (-1, self.partition) and dep.job_id in job.deps and dep.job_id not in ended:
                    out.append(mapsteps.watch(dep.job_id, dep.partition, self.partition, now))
        return out

    async def _watched(self, conn: Connection, watches: list[DependencyWatch], rnd: Round) -> None:
        """Other partitions wait for jobs of this one: tell them now of those that ended,
        and remember the rest (durably) until they end."""
        unknown = [w.job_id for w in watches if w.job_id not in self.backlog.jobs]
        ended = await store.ended_outcomes(conn, unknown, self.partition) if unknown else {}
        keep = []
        for w in watches:
            outcome = ended.get(w.job_id) if w.job_id not in self.backlog.jobs else None
            if outcome is not None:
                rnd.out.append(mapsteps.dependency_ended(w.job_id, outcome, w.watcher, rnd.now))
            else:
                self._watchers.setdefault(w.job_id, set()).add(w.watcher)
                keep.append((w.job_id, w.watcher))
        await store.add_watches(conn, self.partition, keep)

    async def _carry_ends(self, conn: Connection, rnd: Round) -> None:
        """Carry the round's job ends to the jobs waiting for them, until nothing moves:
        waiters go on or are skipped (a skip is an end too), mapped steps are expanded or
        end with their items, and other partitions that wait are told."""
        backlog = self.backlog
        if self._reawait:
            rnd.awaiting.extend(self._reawait)
            self._reawait = []
        for parent in rnd.awaiting:
            await self._await_children(conn, parent, rnd)
        rnd.awaiting = []
        while True:
            ends, rnd.ends = rnd.ends, []
            for job_id, outcome in ends:
                if backlog.dependency_ended(job_id, outcome, rnd.now):
                    self.kick()  # a waiter may run: the next round releases it
                if job_id in self._with_edges:
                    self._with_edges.discard(job_id)
                    rnd.edges_done.append(job_id)
                if job_id in self._children and job_id not in self._awaiting:
                    # It ended without waiting for its children (it failed, or was
                    # cancelled): they no longer matter to its dependents.
                    del self._children[job_id]
                    rnd.children_done.append(job_id)
                owner = self._child_of.pop(job_id, None)
                if owner is not None:
                    waiting = self._awaiting[owner]
                    waiting[0].discard(job_id)
                    waiting[1] += outcome != SUCCEEDED
                    if not waiting[0]:
                        self._children_ended(owner, waiting[1], rnd)
                watchers = self._watchers.pop(job_id, None)
                if watchers:
                    rnd.out.extend(mapsteps.dependency_ended(job_id, outcome, w, rnd.now) for w in sorted(watchers))
                    rnd.told.append(job_id)
            for job, reason in backlog.take_skipped():
                context = self._tracing.extract({"traceparent": job.trace} if job.trace else None)
                rnd.out.append(
                    lifecycle.cancelled(
                        job.job_id,
                        self.partition,
                        job.attempt,
                        reason,
                        "",
                        rnd.now,
                        context,
                        spec=job.spec,
                        skipped=True,
                    )
                )
                rnd.changes.add(job.job_id, "done", reason, outcome=CANCELLED)
                rnd.end(job.job_id, CANCELLED)
                log.info("job %s: %s", job.job_id, reason)
            for job in backlog.take_items_done():
                context = self._tracing.extract({"traceparent": job.trace} if job.trace else None)
                rnd.out.append(
                    mapsteps.step_ended(
                        job.submitted, job.attempt, self.partition, job.items, job.items_failed, rnd.now, context
                    )
                )
                outcome = SUCCEEDED if job.items_failed == 0 else FAILED
                rnd.changes.add(job.job_id, "done", f"its {job.items} items ended", outcome=outcome)
                rnd.end(job.job_id, outcome)
            expand = backlog.take_expand()
            if expand:
                await self._expand(conn, expand, rnd)
            if not (rnd.ends or backlog.skipped or backlog.items_done or backlog.to_expand):
                break
        for job in backlog.take_deps_met():
            rnd.changes.keep(job.job_id, job.attempt, _retry_state(job))
        if rnd.told:
            await store.drop_watches(conn, rnd.told)
            rnd.told = []
        if rnd.edges:
            await store.add_edges(conn, self.partition, rnd.edges)
            rnd.edges = []
        if rnd.edges_done:
            await store.drop_edges(conn, rnd.edges_done)
            rnd.edges_done = []
        if rnd.children_done:
            await store.drop_children(conn, rnd.children_done)
            rnd.children_done = []

    async def _children_added(self, conn: Connection, added: list[ChildAdded]) -> None:
        """Remember steps' children; one for a step that has ended already (its ChildAdded
        came late, after a redelivery) no longer changes what its dependents saw."""
        unheld = [c.job_id for c in added if c.job_id not in self.backlog.jobs and c.job_id not in self._awaiting]
        ended = await store.ended_outcomes(conn, unheld, self.partition) if unheld else {}
        kept = [c for c in added if c.job_id not in ended]
        for child in kept:
            self._children.setdefault(child.job_id, {})[child.child] = child.child_partition
            waiting = self._awaiting.get(child.job_id)
            if waiting is not None and child.child not in self._child_of:
                waiting[0].add(child.child)  # it is waiting for its children: one more
                self._child_of[child.child] = child.job_id
        await store.add_children(conn, self.partition, [(c.job_id, c.child, c.child_partition) for c in kept])

    async def _await_children(self, conn: Connection, parent: str, rnd: Round) -> None:
        """Step ``parent`` succeeded and its handler submitted jobs: it ends, for the jobs
        that need it, once they have (failed if one of them did not succeed)."""
        children = self._children.get(parent, {})
        gone = [child for child in children if child not in self.backlog.jobs]
        ended = await store.ended_outcomes(conn, gone, self.partition) if gone else {}
        ended.update((c, rnd.outcomes[c]) for c in gone if c in rnd.outcomes)  # ended this round
        pending = {child for child in children if child not in ended}
        failed = sum(1 for child in children if child in ended and ended[child] != SUCCEEDED)
        if not pending:
            self._children_ended(parent, failed, rnd)
            return
        self._awaiting[parent] = [pending, failed]
        for child in pending:
            self._child_of[child] = parent
            if children[child] != self.partition:
                rnd.out.append(mapsteps.watch(child, children[child], self.partition, rnd.now))

    def _children_ended(self, parent: str, failed: int, rnd: Round) -> None:
        count = len(self._children.pop(parent, {}))
        self._awaiting.pop(parent, None)
        outcome = SUCCEEDED if failed == 0 else FAILED
        reason = f"its {count} child jobs ended" + (f", {failed} did not succeed" if failed else "")
        rnd.changes.add(parent, "done", reason, outcome=outcome)
        rnd.end(parent, outcome)
        rnd.children_done.append(parent)

    async def _expand(self, conn: Connection, steps: list[Job], rnd: Round) -> None:
        """Read each mapped step's list and submit one job per item."""
        for job in steps:
            submitted = job.submitted
            mapping = submitted.spec.map
            context = self._tracing.extract({"traceparent": job.trace} if job.trace else None)
            try:
                if mapping is None or submitted.spec.step is None or self._results is None:
                    raise mapsteps.MapError("a mapped step needs a workflow step and a scheduler with results")
                try:
                    upstream = await self._results.kept(mapping.source)
                except ResultMissing as exc:
                    raise mapsteps.MapError(str(exc)) from None
                items = mapsteps.items_of(upstream, list(mapping.path))
            except (OSError, TimeoutError, NatsError) as exc:
                # jm_results does not answer: try again shortly; the batch still commits.
                log.warning("job %s: cannot read the list it maps over yet (%s); retrying", job.job_id, exc)
                self._expand_later(job)
                continue
            except mapsteps.MapError as exc:
                if self.backlog.map_failed(job.job_id, rnd.now) is not None:
                    message = f"cannot map over {mapping.over if mapping else '?'}: {exc}"
                    rnd.out.append(
                        mapsteps.step_failed(
                            submitted, job.attempt, self.partition, message, "map_failed", rnd.now, context
                        )
                    )
                    rnd.changes.add(job.job_id, "done", message, outcome=FAILED)
                    rnd.end(job.job_id, FAILED)
                    log.info("job %s: %s", job.job_id, message)
                continue
            item_jobs = mapsteps.item_jobs(submitted, len(items), self.partition, rnd.now)
            ids = [item.job_id for item in item_jobs]
            try:
                await self._results.put_manifest(job.job_id, mapsteps.manifest(ids, mapping.source))
            except (OSError, TimeoutError, NatsError) as exc:
                log.warning("job %s: cannot write its manifest yet (%s); retrying", job.job_id, exc)
                self._expand_later(job)
                continue
            # The items join the backlog now, in this transaction, as the step's expansion
            # does: a cancel reaches them at once, and a new owner finds them (their
            # JobSubmitted, published for everyone else, is a duplicate when it comes back).
            raws = [_encode_submitted(item) for item in item_jobs]
            new = await store.insert_new(conn, item_jobs, [job.trace] * len(item_jobs), raws)
            for item, raw in zip(item_jobs, raws, strict=True):
                seq = new.get(item.job_id)
                if seq is not None:
                    item_job = Job.of(item, seq, raw=raw, trace=job.trace)
                    self.backlog.add(item_job, rnd.now)
                    self._metrics.submitted(item_job.queue, item_job.tenant)
            rnd.out.extend(mapsteps.submitted(item, context) for item in item_jobs)
            known = [i for i in ids if i not in new]  # a redone expansion: some may have ended
            ended = await store.ended_outcomes(conn, known, self.partition) if known else {}
            ended.update((i, rnd.outcomes[i]) for i in ids if i in rnd.outcomes)
            self.backlog.expanded(job.job_id, ids, ended, rnd.now)
            rnd.changes.add(job.job_id, "pending", f"waiting for its {len(ids)} items")
            rnd.changes.keep(job.job_id, job.attempt, _retry_state(job))  # its item count
            rnd.edges.extend((i, job.job_id) for i in ids)
            self._with_edges.add(job.job_id)
            log.info("job %s: mapped over %d items", job.job_id, len(ids))

    def _expand_later(self, job: Job, delay: float = 2.0) -> None:
        """Look at a mapped step again after ``delay`` (its list could not be read)."""

        def again() -> None:
            if self.backlog.jobs.get(job.job_id) is job:
                self.backlog.to_expand.append(job)
                self.kick()

        asyncio.get_running_loop().call_later(delay, again)

    def _next_wake(self, now: float) -> float | None:
        wakes = [t for t in (self.backlog.next_wake(), self.backlog.next_token(now)) if t is not None]
        deadline = self.leases.next_deadline()
        if deadline is not None:
            mono = self._monotonic()
            if deadline <= mono and deadline >= self._through:
                # Due, but this partition's events are not processed that far yet: look again
                # shortly (a batch handled meanwhile kicks the planner sooner).
                deadline = max(deadline, self._through_retry)
            wakes.append(now + max(0.0, deadline - mono))
        return min(wakes) if wakes else None

    async def _catch_up_leases(self) -> None:
        """Learn how far this partition's events are processed, when a lease is due and
        the last answer did not cover it (one or two requests, only then)."""
        if self._processed_through is None:
            return
        deadline = self.leases.next_deadline()
        mono = self._monotonic()
        if deadline is None or deadline > mono or deadline < self._through or mono < self._through_retry:
            return
        through = await self._processed_through()
        # As a monotonic time: how long before now the processed events end. Nothing
        # outstanding covers what happened until now, not what comes later.
        self._through = mono if through == math.inf else mono - max(0.0, self._clock() - through)
        if deadline >= self._through:
            self._through_retry = mono + LEASE_CATCH_UP_RETRY

    async def run_planner(self) -> None:
        """Plan when nodes change, config changes, timers fire, tokens refill or leases run out."""
        while True:
            now = self._clock()
            wake = self._next_wake(now)
            timeout = max(0.0, wake - now) if wake is not None else None
            if timeout is not None and not self._view_settled():
                timeout = max(timeout, 1.0)  # lease deadlines wait for the view: do not spin
            try:
                await asyncio.wait_for(self._kick.wait(), timeout)
            except TimeoutError:
                pass
            self._kick.clear()
            try:
                await self._catch_up_leases()
                async with self._lock:
                    if self._closed:
                        return
                    if self._dirty:
                        await self.load()
                    now = self._clock()
                    nodes_key = self._placements.current()
                    if nodes_key is not self._nodes_key:
                        self._nodes_key = nodes_key
                        self.backlog.unpark(now)
                    rnd = Round(now)
                    self._check_leases(rnd)
                    decisions = self._plan(now)
                    busy = (
                        self.backlog.held
                        or self.backlog.skipped
                        or self.backlog.to_expand
                        or self._resend
                        or self._reawait
                    )
                    if decisions or rnd.out or rnd.changes or rnd.ends or busy:  # idle: no transaction
                        async with self._pool.acquire() as conn, conn.transaction():
                            await self._publish_and_record(conn, decisions, rnd)
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

    async def _publish_and_record(self, conn: Connection, decisions: list[Release | Expire], rnd: Round) -> None:
        """Publish the decisions and the round's messages and write their state changes side
        by side, inside the open transaction; the commit that follows happens only if both
        succeeded."""
        decided = self._messages(decisions, rnd)
        await self._carry_ends(conn, rnd)
        if self._resend:
            rnd.out.extend(self._resend)
            self._resend = []
        outgoing = rnd.out + decided + self._waits(rnd.now)
        results = await asyncio.gather(
            self._publisher.publish(outgoing), store.apply(conn, rnd.changes), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _waits(self, now: float) -> list[Outgoing]:
        """JobWaiting for each job newly held back, when its reason is new for the attempt.

        Costs nothing for jobs that are never held (the no-op fast path). A retry's backoff
        is left out: its JobRetrying already says when the next attempt comes.
        """
        out: list[Outgoing] = []
        for job in self.backlog.take_held():
            if job.reason == job.told or (job.where == TIMER and job.errors):
                continue
            job.told = job.reason
            job.waits += 1
            reason = self.backlog.explain(job.job_id, now) or job.reason
            message = JobWaiting(
                job_id=job.job_id,
                attempt=job.attempt,
                partition=self.partition,
                reason=reason,
                at=now,
                release=job.releases,
                wait=job.waits,
            )
            context = self._tracing.extract({"traceparent": job.trace} if job.trace else None)
            msg_id = release_id(job.job_id, job.attempt, subjects.WAITING, job.waits)
            out.append(Outgoing(subjects.job_event(self.partition, subjects.WAITING), message, msg_id, context))
        return out

    def _plan(self, now: float) -> list[Release | Expire]:
        return self.backlog.plan(now, self._placements.current().place_job, limit=PLAN_LIMIT)

    def _messages(self, decisions: list[Release | Expire], rnd: Round) -> list[Outgoing]:
        """The messages one round's decisions publish; notes the state changes they make."""
        now, changes = rnd.now, rnd.changes
        outgoing: list[Outgoing] = []
        mono = self._monotonic()
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
                    checkpoint=job.checkpoint,
                )
                subject = subjects.job_event(self.partition, subjects.READY)
                msg_id = release_id(job.job_id, job.attempt, subjects.READY, job.releases)
                outgoing.append(Outgoing(subject, ready, msg_id, context))
                changes.add(job.job_id, "released", releases=job.releases)
                self.leases.track(job.job_id, job.attempt, job.heartbeat, mono, size=job.replicas, done=job.gang_done)
                if job.releases == 1:
                    # Its first release ends its wait; a release again (a lost bind, a full
                    # node) is the binder's to explain, not the queue's.
                    self._metrics.waited(job.queue, job.tenant, now - max(job.clock_from, job.not_before))
            elif isinstance(d, Expire):
                # The attempt that never started (the tracker may show it waiting).
                outgoing.append(
                    lifecycle.expired(job.job_id, self.partition, job.attempt, d.reason, now, context, spec=job.spec)
                )
                changes.add(job.job_id, "done", d.reason, outcome=EXPIRED)
                rnd.end(job.job_id, EXPIRED)
        return outgoing

    async def explain(self, request: ExplainRequest) -> ExplainReply:
        """Why a job of this partition is not running yet (or how its attempt is doing)."""
        job = self.backlog.jobs.get(request.job_id)
        if job is None:
            return ExplainReply(job_id=request.job_id, where="", reason="")
        reason = self.backlog.explain(request.job_id, self._clock())
        lease = self.leases.leases.get(job.job_id)
        if job.where == RELEASED and job.cancelling:
            reason = f"cancelling: {job.cancelling}"
        elif job.where == RELEASED and lease is not None and lease.node_id:
            done = (
                f" ({lease.progress:.0%}{': ' + lease.message if lease.message else ''})"
                if lease.progress is not None
                else ""
            )
            reason = f"running on node {lease.node_id}{done}"
        return ExplainReply(job_id=request.job_id, where=job.where, reason=reason)


def _retry_state(job: Job) -> store.RetryState:
    return store.RetryState(
        not_before=job.not_before,
        avoid=sorted(job.avoid),
        avoid_zones=sorted(job.avoid_zones),
        errors=list(job.errors),
        checkpoint=job.checkpoint,
        cancelling=job.cancelling,
        deps_met_at=job.deps_met_at,
        items=job.items,
        gang_done=sorted(job.gang_done),
        gang_lead=job.gang_lead,
    )


def _restore(job: Job, state: store.RetryState) -> None:
    job.not_before = max(job.not_before, state.not_before)
    job.avoid = frozenset(state.avoid)
    job.avoid_zones = frozenset(state.avoid_zones)
    job.errors = tuple(state.errors)
    job.checkpoint = state.checkpoint
    job.cancelling = state.cancelling
    if state.deps_met_at:
        # Its dependencies were met before: it waits for none of them again (their rows
        # may be gone), and its queue timeout still counts from then.
        job.deps = None
        job.clock_from = job.deps_met_at = state.deps_met_at
    job.items = state.items
    job.gang_done = frozenset(state.gang_done)
    job.gang_lead = state.gang_lead
