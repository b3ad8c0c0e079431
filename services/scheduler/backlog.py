"""The backlog of one scheduler partition and every ordering decision. Pure: no I/O.

A pending job is in exactly one place, and only jobs that could start now are in the
*ready* structures, so picking the next job never scans blocked ones:

- ready: per queue, ten priority levels (9 first); within a level tenants take turns by
  weighted fair share (``fairshare``); within a tenant FIFO by submission sequence;
- timer: ``not_before`` still in the future (a heap by time);
- group: behind an earlier job of the same sequential group (a list in submission order);
- key: its concurrency key is at its limit (a heap per key, woken when a job of the key ends);
- parked: no registered node fits (by reason; looked at again when the node set changes);
- room: the binder found its candidates full (retried after a short delay; meanwhile the
  queue's room window, ``roomwindow``, bounds what it has out);
- deps: waiting for the jobs it depends on to end (indexed by the job waited for, so an
  ending wakes exactly its waiters); a mapped step waits here for its items too;
- expand: a mapped step whose dependencies are met, until the scheduler has read its list
  and submitted one job per item.

Queue-level gates (a token-bucket rate and a cap on jobs in flight) stop a queue as a whole,
at no per-job cost. Concurrency keys and sequential groups are scoped to their queue (a
queue lives in exactly one partition, so one owner sees all of a queue's jobs).

A pick is O(log n) in the backlog size (heaps, dicts, and deques for FIFO order). Waking
jobs waiting for room is bounded per finished job; ``stats()`` and removing an expired
group member are linear.
"""

from __future__ import annotations

import bisect
import heapq
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from jobmesh.contract.messages.v1 import AttemptError, JobSpec, JobSubmitted, MemberSucceeded, QueueConfig
from jobmesh.runtime.backoff import backoff
from jobmesh.scheduler.dependencies import satisfied, skip_reason, waiting_reason
from jobmesh.scheduler.fairshare import Rotation, Shares
from jobmesh.scheduler.placement import signature
from jobmesh.scheduler.ratelimit import TokenBucket
from jobmesh.scheduler.roomwindow import FULL, RoomWindow

READY, TIMER, GROUP, KEY, PARKED, ROOM, RELEASED, GONE, DEPS, EXPAND = (
    "ready",
    "timer",
    "group",
    "key",
    "parked",
    "room",
    "released",
    "gone",
    "deps",
    "expand",
)
# How a dependency can end: what the scheduler records for every job that ends.
SUCCEEDED, FAILED, CANCELLED, EXPIRED = "succeeded", "failed", "cancelled", "expired"
# The reason of a job held for its start time; its explanation names the time itself.
DELAYED = "delayed until its start time (not_before)"
RETRY_BACKOFF = "waiting out the backoff before its next attempt"
ROOM_RETRY_SECONDS = 1.0
ROOM_RETRY_MAX_SECONDS = 30.0
ROOM_WAKE_PER_FINISH = 2  # jobs waiting for room that one finished job lets try again
LEVELS = 10


_decode_submitted = msgspec.json.Decoder(JobSubmitted).decode
_encode = msgspec.json.Encoder().encode


@dataclass(slots=True, eq=False)
class Job:
    """A job the scheduler holds until its attempt ends.

    Only what ordering reads is kept as fields (names interned, the placement signature
    shared between jobs); the full message stays as its JSON bytes and is decoded when the
    job is released. That keeps a pending job under a kilobyte and a pick from chasing
    pointers through a decoded spec.
    """

    job_id: str
    seq: int
    raw: bytes  # the JobSubmitted message
    queue: str
    tenant: str
    priority: int
    key: str  # concurrency key
    limit: int  # concurrency limit
    group: str
    not_before: float
    queue_timeout: float
    submitted_at: float
    sig: tuple  # placement signature
    attempt: int = 1
    releases: int = 0  # how often this attempt was released (numbers JobReady ids)
    trace: str = ""  # traceparent of the submit, continued by JobReady
    where: str = READY
    reason: str = ""
    heartbeat: float = 10.0  # the job's heartbeat timeout (its attempts' lease length)
    # What earlier attempts left behind; all empty until an attempt failed (most jobs).
    avoid: frozenset[str] = frozenset()  # nodes its next attempts avoid (migrate_after)
    avoid_zones: frozenset[str] = frozenset()
    errors: tuple[AttemptError, ...] = ()  # how each earlier attempt ended
    checkpoint: str = ""  # the last checkpoint an attempt reported; the next one starts from it
    cancelling: str = ""  # the reason, once a cancel arrived while the attempt was out
    told: str = ""  # the wait reason last published for this attempt (JobWaiting)
    waits: int = 0  # JobWaiting published for this attempt
    # The dependencies not met yet: job id -> (condition, label); None for most jobs.
    deps: dict[str, tuple[str, str]] | None = None
    mapped: bool = False  # a mapped step (JobSpec.map): expanded, not released
    items: int = -1  # a mapped step's item count once expanded (-1: not yet)
    items_failed: int = 0  # its items that ended other than succeeded
    clock_from: float = 0.0  # when its queue timeout starts: its submission, or its deps met
    deps_met_at: float = 0.0  # when its dependencies were all met (0: it had none, or not yet)
    replicas: int = 1  # a gang's members (JobSpec.replicas); 1 for a plain job
    gang_done: frozenset[int] = frozenset()  # the ranks of this attempt's members that succeeded
    gang_lead: MemberSucceeded | None = None  # rank 0's success: the gang's result and output

    @classmethod
    def of(cls, submitted: JobSubmitted, seq: int, raw: bytes | None = None, trace: str = "", **state) -> Job:
        """Build from a decoded JobSubmitted (and its wire bytes, when at hand)."""
        spec = submitted.spec
        return cls(
            job_id=submitted.job_id,
            seq=seq,
            raw=raw if raw is not None else _encode(submitted),
            queue=sys.intern(spec.queue),
            tenant=sys.intern(spec.tenant),
            priority=spec.priority,
            key=sys.intern(spec.concurrency_key),
            limit=spec.concurrency_limit,
            group=spec.group,
            not_before=spec.not_before,
            queue_timeout=spec.timeouts.queue,
            submitted_at=submitted.submitted_at,
            sig=signature(spec),
            trace=trace,
            heartbeat=spec.timeouts.heartbeat,
            deps={d.job_id: (d.when, d.step or d.job_id) for d in spec.after} if spec.after else None,
            mapped=spec.map is not None,
            replicas=spec.replicas,
            clock_from=submitted.submitted_at,
            **state,
        )

    @property
    def submitted(self) -> JobSubmitted:
        return _decode_submitted(self.raw)

    @property
    def spec(self) -> JobSpec:
        return self.submitted.spec


@dataclass(frozen=True, slots=True)
class Release:
    """Decision: hand ``job`` to the binder with these ranked candidates."""

    job: Job
    candidates: list[str]
    tiers: list[int]


@dataclass(frozen=True, slots=True)
class Expire:
    """Decision: ``job`` was not started before its queue timeout."""

    job: Job
    reason: str


Placer = Callable[[Job], tuple[list[str], list[int], str]]


class _Fifo:
    """Jobs of one tenant at one level, oldest submission first.

    New submissions arrive in sequence order, so they go to a deque (O(1)); the few jobs
    that come back out of order (woken by a timer, a freed key, a retry) go to a small heap.
    The head is the older of the two heads. This keeps a pick O(1) however deep the backlog.
    """

    __slots__ = ("_back", "_fresh")

    def __init__(self) -> None:
        self._fresh: deque[tuple[int, str]] = deque()
        self._back: list[tuple[int, str]] = []

    def __bool__(self) -> bool:
        return bool(self._fresh) or bool(self._back)

    def push(self, entry: tuple[int, str]) -> None:
        if not self._fresh or entry[0] > self._fresh[-1][0]:
            self._fresh.append(entry)
        else:
            heapq.heappush(self._back, entry)

    def first(self) -> tuple[int, str]:
        if self._back and (not self._fresh or self._back[0] < self._fresh[0]):
            return self._back[0]
        return self._fresh[0]

    def pop(self) -> None:
        if self._back and (not self._fresh or self._back[0] < self._fresh[0]):
            heapq.heappop(self._back)
        else:
            self._fresh.popleft()


class _Level:
    """One priority level of one queue: tenants in fair rotation, FIFO inside each."""

    __slots__ = ("fifo", "rotation")

    def __init__(self) -> None:
        self.fifo: dict[str, _Fifo] = {}
        self.rotation = Rotation()


@dataclass(eq=False)
class _Group:
    waiting: list[tuple[int, str]] = field(default_factory=list)  # (seq, job_id), sorted
    out: str = ""  # job id of the member currently released (or waiting for room)


class QueueState:
    """Everything one queue needs to decide its next job."""

    def __init__(self, name: str, config: QueueConfig, weight_of: Callable[[str], float], now: float) -> None:
        self.name = name
        self.shares = Shares(weight_of)
        self.levels: list[_Level | None] = [None] * LEVELS
        self.ready = 0
        self.in_flight = 0
        self.pending_by_tenant: dict[str, int] = {}
        self.keys_out: dict[str, int] = {}
        self.key_wait: dict[str, list[tuple[int, int, str]]] = {}
        self.groups: dict[str, _Group] = {}
        self.config = config
        self.bucket: TokenBucket | None = None
        self.room = RoomWindow()  # bounds what is out once the binder found no room
        self.configure(config, now)

    def configure(self, config: QueueConfig, now: float) -> None:
        self.config = config
        self.bucket = TokenBucket(config.rate, config.burst, now) if config.rate > 0 else None

    def gate(self, now: float) -> str:
        """Why this queue may not release now ("" when it may)."""
        if self.config.max_in_flight and self.in_flight >= self.config.max_in_flight:
            return f"queue {self.name} at its in-flight cap of {self.config.max_in_flight}"
        if self.bucket is not None and not self.bucket.available(now):
            return f"queue {self.name} rate limit of {self.config.rate:g}/s"
        if self.in_flight >= self.room.limit(now):
            return f"queue {self.name}: the binder found no free capacity; {self.in_flight} out, more as they end"
        return ""


class Backlog:
    """Pending and released jobs of one partition, and the decisions over them.

    Args:
        queue_config: the current configuration of a queue by name.
        weight_of: the current weight of a tenant by name.
    """

    def __init__(
        self,
        queue_config: Callable[[str], QueueConfig] = lambda name: QueueConfig(),
        weight_of: Callable[[str], float] = lambda tenant: 1.0,
    ) -> None:
        self._queue_config = queue_config
        self._weight_of = weight_of
        self.jobs: dict[str, Job] = {}
        self.queues: dict[str, QueueState] = {}
        self._timers: list[tuple[float, int, str]] = []
        self._deadlines: list[tuple[float, int, str]] = []
        self._room: list[tuple[float, int, str]] = []
        self._parked: dict[str, Job] = {}
        self._rr: list[str] = []  # queue names in round-robin order
        self._rr_next = 0
        self._sigs: dict[tuple, tuple] = {}  # one shared tuple per distinct signature
        self.held: list[Job] = []  # jobs put in a wait place since the last take_held()
        self._waiters: dict[str, set[str]] = {}  # job waited for -> the jobs waiting for it
        self.skipped: list[tuple[Job, str]] = []  # jobs a dependency's end ruled out, and why
        self.to_expand: list[Job] = []  # mapped steps whose dependencies are met
        self.items_done: list[Job] = []  # mapped steps whose items have all ended
        self.deps_met: list[Job] = []  # jobs whose dependencies were all met since the last look

    def __len__(self) -> int:
        return len(self.jobs)

    # --- intake ------------------------------------------------------------------------
    def queue(self, name: str, now: float) -> QueueState:
        q = self.queues.get(name)
        if q is None:
            q = QueueState(name, self._queue_config(name), self._weight_of, now)
            self.queues[name] = q
            self._rr.append(name)
        return q

    def reconfigure(self, now: float) -> None:
        """Re-read every queue's configuration (after a config change).

        Only queues whose configuration changed get a new bucket, so an unrelated change
        (a tenant's weight, the zone map) grants no queue a fresh burst.
        """
        for q in self.queues.values():
            config = self._queue_config(q.name)
            if config != q.config:
                q.configure(config, now)

    def add(self, job: Job, now: float, ended: dict[str, str] | None = None) -> bool:
        """Take a new pending job. Returns False when the job is already held.

        Args:
            ended: how jobs it depends on ended, for those that ended before it came (the
                rest it waits for; an ending it cannot run after skips it: ``skipped``).
        """
        if job.job_id in self.jobs:
            return False
        self.jobs[job.job_id] = job
        job.sig = self._sigs.setdefault(job.sig, job.sig)
        q = self.queue(job.queue, now)
        q.pending_by_tenant[job.tenant] = q.pending_by_tenant.get(job.tenant, 0) + 1
        if job.deps:
            ended = ended or {}
            for dep_id, (when, label) in list(job.deps.items()):
                outcome = ended.get(dep_id)
                if outcome is None:
                    self._waiters.setdefault(dep_id, set()).add(job.job_id)
                elif satisfied(when, outcome):
                    del job.deps[dep_id]
                else:
                    self._skip(job, skip_reason(label, when, outcome))
                    return True
            if job.deps:
                job.where = DEPS
                job.reason = waiting_reason(job.deps)
                self.held.append(job)
                return True
            job.deps = None
            job.clock_from = job.deps_met_at = now
            self.deps_met.append(job)
        self._intake(job, now)
        return True

    def _intake(self, job: Job, now: float) -> None:
        """A job whose dependencies are met (or that has none) joins the backlog proper."""
        q = self.queue(job.queue, now)
        if job.queue_timeout > 0:
            heapq.heappush(self._deadlines, (job.clock_from + job.queue_timeout, job.seq, job.job_id))
        if job.mapped and job.items < 0:
            job.where = EXPAND
            job.reason = "reading the list it maps over"
            self.to_expand.append(job)
            return
        if job.group:
            group = q.groups.setdefault(job.group, _Group())
            bisect.insort(group.waiting, (job.seq, job.job_id))
            job.where = GROUP
            self.held.append(job)
            self._advance_group(q, job.group, now)
        else:
            self._enter(job, now)

    # --- dependencies ------------------------------------------------------------------
    def dependency_ended(self, dep_id: str, outcome: str, now: float) -> int:
        """Job ``dep_id`` ended with ``outcome``: its waiters go on, or are skipped.

        A mapped step waiting for its items counts the item; once all have ended it is in
        ``items_done``. Skips land in ``skipped``: the scheduler ends them (and their own
        waiters hear of it through the same call).

        Returns:
            How many waiters may now run (a planning round should look at them).
        """
        woken = 0
        for waiter_id in self._waiters.pop(dep_id, ()):
            job = self.jobs.get(waiter_id)
            if job is None or job.where != DEPS or not job.deps or dep_id not in job.deps:
                continue
            when, label = job.deps.pop(dep_id)
            if job.items >= 0:
                if outcome != SUCCEEDED:
                    job.items_failed += 1
                if not job.deps:
                    self._forget_pending(self.queues[job.queue], job, now)
                    del self.jobs[job.job_id]
                    self.items_done.append(job)
                continue
            if not satisfied(when, outcome):
                self._forget_pending(self.queues[job.queue], job, now)
                del self.jobs[job.job_id]
                self.skipped.append((job, skip_reason(label, when, outcome)))
                continue
            if job.deps:
                job.reason = waiting_reason(job.deps)
                self.held.append(job)
            else:
                job.deps = None
                job.clock_from = job.deps_met_at = now
                self.deps_met.append(job)
                self._intake(job, now)
                woken += 1
        return woken

    def expanded(self, job_id: str, item_ids: list[str], ended: dict[str, str], now: float) -> None:
        """Mapped step ``job_id`` has submitted its items: it waits until they all end.

        Args:
            item_ids: the items' job ids, in item order.
            ended: how items that ended already ended (a take-over expands again).
        """
        job = self.jobs.get(job_id)
        if job is None or job.where != EXPAND:
            return
        job.items = len(item_ids)
        job.items_failed = sum(1 for i in item_ids if i in ended and ended[i] != SUCCEEDED)
        job.deps = {i: ("ended", f"item {n}") for n, i in enumerate(item_ids) if i not in ended}
        if not job.deps:
            self._forget_pending(self.queues[job.queue], job, now)
            del self.jobs[job_id]
            self.items_done.append(job)
            return
        for item_id in job.deps:
            self._waiters.setdefault(item_id, set()).add(job_id)
        job.where = DEPS
        job.reason = f"waiting for its {job.items} items"
        self.held.append(job)

    def take_expand(self) -> list[Job]:
        """The mapped steps to expand now (each handed out once)."""
        jobs, self.to_expand = self.to_expand, []
        return [job for job in jobs if job.where == EXPAND and self.jobs.get(job.job_id) is job]

    def take_skipped(self) -> list[tuple[Job, str]]:
        skipped, self.skipped = self.skipped, []
        return skipped

    def take_deps_met(self) -> list[Job]:
        """The jobs whose dependencies were met since the last call (the scheduler keeps
        when, so that a new owner neither waits for them again nor restarts their clock)."""
        met, self.deps_met = self.deps_met, []
        return met

    def take_items_done(self) -> list[Job]:
        done, self.items_done = self.items_done, []
        return done

    def map_failed(self, job_id: str, now: float) -> Job | None:
        """A mapped step could not be expanded (its list is missing or not a list): it
        leaves the backlog; the scheduler ends it failed."""
        job = self.jobs.get(job_id)
        if job is None or job.where != EXPAND:
            return None
        self._forget_pending(self.queues[job.queue], job, now)
        del self.jobs[job_id]
        return job

    def _skip(self, job: Job, reason: str) -> None:
        q = self.queues[job.queue]
        q.pending_by_tenant[job.tenant] -= 1
        job.where = GONE
        del self.jobs[job.job_id]
        self.skipped.append((job, reason))

    def add_released(self, job: Job, now: float) -> None:
        """Take a job that was released before a restart: it counts as in flight."""
        self.jobs[job.job_id] = job
        job.where = RELEASED
        q = self.queue(job.queue, now)
        q.in_flight += 1
        if job.key:
            q.keys_out[job.key] = q.keys_out.get(job.key, 0) + 1
        if job.group:
            q.groups.setdefault(job.group, _Group()).out = job.job_id

    def _enter(self, job: Job, now: float) -> None:
        """Put a job that is no longer behind its group where it belongs now."""
        if job.not_before > now:
            job.where = TIMER
            self.held.append(job)
            job.reason = DELAYED
            heapq.heappush(self._timers, (job.not_before, job.seq, job.job_id))
            return
        self._make_ready(job, now)

    def _make_ready(self, job: Job, now: float) -> None:
        q = self.queue(job.queue, now)
        level = q.levels[job.priority]
        if level is None:
            level = q.levels[job.priority] = _Level()
        fifo = level.fifo.get(job.tenant)
        if fifo is None:
            fifo = level.fifo[job.tenant] = _Fifo()
        if not fifo:
            level.rotation.push(job.tenant, q.shares.entering(job.tenant))
        fifo.push((job.seq, job.job_id))
        job.where = READY
        job.reason = ""
        q.ready += 1

    def _advance_group(self, q: QueueState, name: str, now: float) -> None:
        group = q.groups[name]
        if group.out or not group.waiting:
            if not group.out and not group.waiting:
                del q.groups[name]
            return
        _, job_id = group.waiting.pop(0)
        group.out = job_id
        self._enter(self.jobs[job_id], now)

    # --- decisions -------------------------------------------------------------------
    def plan(self, now: float, placer: Placer, limit: int = 1000) -> list[Release | Expire]:
        """Release what may start now, in order; expire what waited too long.

        Changes the backlog as it decides (a failed publish or commit is handled by
        rebuilding the backlog from the database).

        Args:
            now: the current time.
            placer: ranks candidate nodes for a spec, or says why none fits.
            limit: at most this many releases.

        Returns:
            Releases and expiries, in decision order.
        """
        decisions: list[Release | Expire] = []
        self._expire(now, decisions)
        self._wake(now)
        releases = 0
        idle_rounds = 0
        while releases < limit and self._rr and idle_rounds < len(self._rr):
            name = self._rr[self._rr_next % len(self._rr)]
            self._rr_next += 1
            q = self.queues[name]
            if q.ready == 0 or q.gate(now):
                idle_rounds += 1
                continue
            job = self._pick(q, placer, now)
            if job is None:
                idle_rounds += 1
                continue
            idle_rounds = 0
            job, candidates, tiers = job
            if q.bucket is not None:
                q.bucket.take(now)
            self._mark_out(q, job)
            decisions.append(Release(job, candidates, tiers))
            releases += 1
        return decisions

    def _pick(self, q: QueueState, placer: Placer, now: float):
        """The next startable job of ``q`` by priority, fair share and FIFO, or None."""
        for prio in range(LEVELS - 1, -1, -1):
            level = q.levels[prio]
            if level is None:
                continue
            while True:
                tenant = level.rotation.peek(q.shares)
                if tenant is None:
                    break
                fifo = level.fifo.get(tenant)
                job = self._head(fifo) if fifo is not None else None
                if fifo is None or job is None:
                    level.rotation.pop()
                    continue
                key = job.key
                if key and q.keys_out.get(key, 0) >= job.limit:
                    self._pop_ready(q, fifo)
                    job.where = KEY
                    self.held.append(job)
                    job.reason = f"concurrency key {key} at its limit of {job.limit}"
                    heapq.heappush(q.key_wait.setdefault(key, []), (-job.priority, job.seq, job.job_id))
                    continue
                candidates, tiers, reason = placer(job)
                if not candidates:
                    self._pop_ready(q, fifo)
                    job.where = PARKED
                    self.held.append(job)
                    job.reason = reason
                    self._parked[job.job_id] = job
                    if key:
                        self._wake_key(q, key, now)  # it will not use the key's free slot
                    continue
                self._pop_ready(q, fifo)
                new_pass = q.shares.charge(tenant)
                if fifo and self._head(fifo) is not None:
                    level.rotation.replace(tenant, new_pass)
                else:
                    level.rotation.pop()
                return job, candidates, tiers
        return None

    def _head(self, fifo: _Fifo | None) -> Job | None:
        # Entries of jobs that left the ready state (expired, finished) are dropped lazily.
        while fifo:
            job = self.jobs.get(fifo.first()[1])
            if job is not None and job.where == READY:
                return job
            fifo.pop()
        return None

    def _pop_ready(self, q: QueueState, fifo: _Fifo) -> None:
        fifo.pop()
        q.ready -= 1

    def _mark_out(self, q: QueueState, job: Job) -> None:
        job.where = RELEASED
        job.reason = ""
        job.releases += 1
        q.in_flight += 1
        q.pending_by_tenant[job.tenant] -= 1
        if job.key:
            q.keys_out[job.key] = q.keys_out.get(job.key, 0) + 1

    def _expire(self, now: float, decisions: list) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job_id = heapq.heappop(self._deadlines)
            job = self.jobs.get(job_id)
            if job is None or job.where in (RELEASED, GONE, DEPS, EXPAND) or job.attempt > 1:
                # Out at the binder or running, started before (a retry), or waiting for
                # other jobs (its queue timeout counts from when they allow it to run).
                continue
            q = self.queues[job.queue]
            reason = f"not started within the queue timeout of {job.queue_timeout:g}s"
            if job.reason:
                reason += f" (was waiting: {job.reason})"
            self._forget_pending(q, job, now)
            del self.jobs[job_id]
            decisions.append(Expire(job, reason))

    def _wake(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, job_id = heapq.heappop(self._timers)
            job = self.jobs.get(job_id)
            if job is not None and job.where == TIMER:
                self._make_ready(job, now)
        while self._room and self._room[0][0] <= now:
            _, _, job_id = heapq.heappop(self._room)
            job = self.jobs.get(job_id)
            if job is not None and job.where == ROOM:
                self._make_ready(job, now)

    def next_wake(self) -> float | None:
        """The earliest time a timer, a room retry or a deadline needs a planning round."""
        times = [h[0][0] for h in (self._timers, self._room, self._deadlines) if h]
        return min(times) if times else None

    def next_token(self, now: float) -> float | None:
        """The earliest time a rate-limited queue with ready jobs gets a token."""
        times = [
            q.bucket.next_token_at(now)
            for q in self.queues.values()
            if q.ready
            and q.bucket is not None
            and not (q.config.max_in_flight and q.in_flight >= q.config.max_in_flight)
        ]
        # A queue held by its room window opens by time too (its own finishes kick anyway).
        times.extend(
            at for q in self.queues.values() if q.ready and (at := q.room.opens_at(q.in_flight, now)) is not None
        )
        return min(times) if times else None

    # --- outcomes --------------------------------------------------------------------
    def finish(self, job_id: str, attempt: int, now: float) -> bool:
        """The current attempt of ``job_id`` ended: free its slot, key and group turn."""
        job = self.jobs.get(job_id)
        if job is None or job.attempt != attempt:
            return False
        q = self.queues[job.queue]
        if job.where == RELEASED:
            self._release_slot(q, job, now)
            group = job.group
            if group and group in q.groups and q.groups[group].out == job_id:
                q.groups[group].out = ""
                self._advance_group(q, group, now)
        else:
            self._forget_pending(q, job, now)
        job.where = GONE
        del self.jobs[job_id]
        return True

    def room_wanted(
        self, job_id: str, attempt: int, release: int, reason: str, now: float, retry_after: float = 0.0
    ) -> bool:
        """The binder found no room for this release: retry it shortly (after at most
        ``retry_after`` seconds when the binder said when, as it does for a job whose
        preemption holds room for it).

        A refusal of an earlier release than the job's last is stale (the job was released
        again since) and changes nothing. One of a later release than this scheduler knows
        of comes from the partition's previous owner, which published that release and died
        before its record of it was committed:
        - if this owner has released the job since, the refusal is taken (nothing else will
          answer that release);
        - if the job still waits here, its count moves past the refused release. Its next
          release would otherwise carry the refused one's message id, and JetStream would
          drop it as a duplicate, leaving the job out until its bind timeout.
        """
        job = self.jobs.get(job_id)
        if job is None or job.attempt != attempt or release < job.releases:
            return False
        if job.where != RELEASED:
            if job.where in (READY, TIMER, GROUP, KEY, PARKED, ROOM):  # still to be released
                job.releases = max(job.releases, release)
            return False
        job.releases = release
        q = self.queues[job.queue]
        self._release_slot(q, job, now)
        q.pending_by_tenant[job.tenant] = q.pending_by_tenant.get(job.tenant, 0) + 1
        job.where = ROOM
        job.reason = reason
        if reason.startswith(FULL):
            q.room.refused(q.in_flight, now)
        # Back off: a job that keeps finding its candidates full is not sent back and forth
        # every second; each refusal doubles the wait (about 1 s ... 30 s, jittered per job
        # so that jobs refused together do not all come back together).
        delay = backoff(job.releases, base=ROOM_RETRY_SECONDS, cap=ROOM_RETRY_MAX_SECONDS, key=job.job_id)
        if retry_after > 0:
            delay = min(delay, retry_after)
        heapq.heappush(self._room, (now + delay, job.seq, job.job_id))
        if job.queue_timeout > 0:
            # Its deadline may have passed while it was out at the binder (that entry was
            # dropped then): file it again so the next round expires it if due.
            heapq.heappush(self._deadlines, (job.clock_from + job.queue_timeout, job.seq, job.job_id))
        return True

    def retry(
        self,
        job_id: str,
        attempt: int,
        next_attempt: int,
        not_before: float,
        avoid: frozenset[str],
        avoid_zones: frozenset[str],
        error: AttemptError,
        checkpoint: str,
        now: float,
    ) -> bool:
        """Attempt ``attempt`` failed and the policy retries: hold the job as ``next_attempt``
        until ``not_before``. Its queue slot and concurrency key are free meanwhile; its turn
        in a sequential group is kept (the group's next job must not pass a retrying one).

        Returns:
            False when ``attempt`` is not the job's current, released attempt (stale).
        """
        job = self.jobs.get(job_id)
        if job is None or job.attempt != attempt or job.where != RELEASED:
            return False
        q = self.queues[job.queue]
        self._release_slot(q, job, now)
        q.pending_by_tenant[job.tenant] = q.pending_by_tenant.get(job.tenant, 0) + 1
        job.attempt = next_attempt
        job.releases = 0
        job.told, job.waits = "", 0
        job.gang_done, job.gang_lead = frozenset(), None  # the next attempt's members start afresh
        job.not_before = not_before
        job.avoid, job.avoid_zones = avoid, avoid_zones
        job.errors = (*job.errors, error)
        job.checkpoint = checkpoint or job.checkpoint
        self._enter(job, now)
        if job.where == TIMER:
            job.reason = RETRY_BACKOFF
        return True

    def claim_released(self, job_id: str, attempt: int, now: float) -> bool:
        """Count a job that waits in the backlog to be released again as out (released)
        once more: its attempt turned out to have run after all (it reports its end).

        Returns:
            False unless the job is waiting at ``attempt`` in a place a re-release reaches
            (ready, parked, waiting for room or for its key).
        """
        job = self.jobs.get(job_id)
        if job is None or job.attempt != attempt or job.where not in (READY, PARKED, ROOM, KEY):
            return False
        q = self.queues[job.queue]
        if job.where == READY:
            q.ready -= 1  # its ready entry is dropped lazily
        elif job.where == PARKED:
            self._parked.pop(job.job_id, None)
        self._mark_out(q, job)
        job.releases -= 1  # _mark_out counts a release; none happened
        return True

    def release_again(self, job_id: str, attempt: int, reason: str, now: float) -> bool:
        """The released attempt never showed up on a node (its JobReady or JobBound was
        lost): make it ready to be released again at once, as the same attempt."""
        job = self.jobs.get(job_id)
        if job is None or job.attempt != attempt or job.where != RELEASED:
            return False
        q = self.queues[job.queue]
        self._release_slot(q, job, now)
        q.pending_by_tenant[job.tenant] = q.pending_by_tenant.get(job.tenant, 0) + 1
        self._make_ready(job, now)
        job.reason = reason
        return True

    def cancel_held(self, job_id: str, now: float) -> Job | None:
        """Take a job that is not released out of the backlog (a cancel). Returns it, or
        None when it is released (the attempt must be stopped first) or unknown."""
        job = self.jobs.get(job_id)
        if job is None or job.where == RELEASED:
            return None
        self._forget_pending(self.queues[job.queue], job, now)
        del self.jobs[job_id]
        return job

    def retry_rooms_now(self, now: float, finished: int, ended_in: dict[str, int] | None = None) -> None:
        """``finished`` jobs freed capacity: that many jobs waiting for room (times a small
        factor, for jobs smaller than the ones that ended) may try at once. Bounded, so a
        large set of waiting jobs is not woken, and sent to the binder, wholesale.

        ``ended_in`` says how many of them were of each queue: a job woken by the end of
        another queue's attempt widens its own queue's room window by one (the room that
        end freed is its to try too); its own queue's ends open the window anyway."""
        others = dict(ended_in or {})
        woken = 0
        while self._room and woken < finished * ROOM_WAKE_PER_FINISH:
            _, _, job_id = heapq.heappop(self._room)
            job = self.jobs.get(job_id)
            if job is not None and job.where == ROOM:
                self._make_ready(job, now)
                donor = next((name for name, n in others.items() if n > 0 and name != job.queue), None)
                if donor is not None:
                    others[donor] -= 1
                    self.queues[job.queue].room.woken()
                woken += 1

    def unpark(self, now: float) -> None:
        """The node set changed: every parked job gets another look."""
        parked, self._parked = self._parked, {}
        for job in parked.values():
            if job.where == PARKED:
                self._make_ready(job, now)

    def _release_slot(self, q: QueueState, job: Job, now: float) -> None:
        q.in_flight -= 1
        key = job.key
        if key:
            q.keys_out[key] -= 1
            if not q.keys_out[key]:
                del q.keys_out[key]
            self._wake_key(q, key, now)

    def _wake_key(self, q: QueueState, key: str, now: float) -> None:
        """A slot of ``key`` is free: the best waiter gets its chance. Called again whenever
        a woken waiter leaves without taking the slot (parked, expired), so the slot is
        never left free while others wait."""
        waiting = q.key_wait.get(key)
        while waiting:
            _, _, next_id = heapq.heappop(waiting)
            nxt = self.jobs.get(next_id)
            if nxt is not None and nxt.where == KEY:  # else: expired meanwhile
                self._make_ready(nxt, now)
                break
        if waiting is not None and not waiting:
            del q.key_wait[key]

    def _forget_pending(self, q: QueueState, job: Job, now: float) -> None:
        if job.where == READY:
            q.ready -= 1  # its heap entry is dropped lazily
            if job.key and q.keys_out.get(job.key, 0) < job.limit:
                self._wake_key(q, job.key, now)  # it may have been woken for a free slot
        elif job.where == PARKED:
            self._parked.pop(job.job_id, None)
        q.pending_by_tenant[job.tenant] -= 1
        group = job.group
        if group and group in q.groups:
            g = q.groups[group]
            if g.out == job.job_id:
                g.out = ""
            else:
                index = bisect.bisect_left(g.waiting, (job.seq, job.job_id))
                if index < len(g.waiting) and g.waiting[index][1] == job.job_id:
                    g.waiting.pop(index)
            self._advance_group(q, group, now)
        job.where = GONE

    def take_held(self) -> list[Job]:
        """The jobs put in a wait place (timer, group, key, parked) since the last call,
        still there now: the scheduler tells the tracker why each waits."""
        held, self.held = self.held, []
        return [job for job in held if job.where in (TIMER, GROUP, KEY, PARKED, DEPS)]

    # --- visibility ------------------------------------------------------------------
    def explain(self, job_id: str, now: float) -> str:
        """Why a held job is not running yet, in words."""
        job = self.jobs.get(job_id)
        if job is None:
            return ""
        if job.where == READY:
            gate = self.queues[job.queue].gate(now)
            return gate or "queued: next when its turn comes"
        if job.where == RELEASED:
            return "released to the binder"
        if job.where == GROUP:
            return f"sequential group {job.group}: waiting for earlier jobs of the group"
        if job.where == TIMER:
            when = f"not before {_utc(job.not_before)} (in {_duration(job.not_before - now)})"
            return f"retry backoff: attempt {job.attempt} {when}" if job.errors else when
        return job.reason

    def stats(self, now: float | None = None) -> dict[str, dict]:
        """Per queue: pending, in flight, pending per tenant, waiting per place and per reason.

        With ``now``, ready jobs of a queue that its rate limit or in-flight cap holds back
        count under that reason too (what ``explain`` tells about each of them).
        """
        gates = {name: q.gate(now) for name, q in self.queues.items()} if now is not None else {}
        out: dict[str, dict] = {}
        for name, q in self.queues.items():
            out[name] = {
                "pending": sum(q.pending_by_tenant.values()),
                "in_flight": q.in_flight,
                "tenants": {t: n for t, n in q.pending_by_tenant.items() if n},
                "waiting": {},
                "reasons": {},
                "rate": q.config.rate,
                "max_in_flight": q.config.max_in_flight,
            }
        for job in self.jobs.values():
            if job.where not in (RELEASED, GONE):
                waiting = out[job.queue]["waiting"]
                waiting[job.where] = waiting.get(job.where, 0) + 1
                reason = gates.get(job.queue, "") if job.where == READY else job.reason
                if job.where == GROUP:
                    reason = f"sequential group {job.group}"
                elif job.where in (DEPS, EXPAND):
                    # One count for all: each job's own reason names its dependencies.
                    reason = "waiting for other jobs" if job.items < 0 else "waiting for its mapped items"
                if reason:
                    reasons = out[job.queue]["reasons"]
                    reasons[reason] = reasons.get(reason, 0) + 1
        return out


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60}m"
