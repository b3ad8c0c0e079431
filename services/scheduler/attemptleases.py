"""Attempt leases: which released attempts are still alive, as their nodes' records say.

Pure bookkeeping, one instance per partition the scheduler owns; the clock is passed in.
Every released attempt holds a lease with a deadline:

- at release: ``now + bind_timeout`` (the attempt has to reach a node and start);
- whenever its node's record (one KV put per node and heartbeat) lists it: ``arrival +
  heartbeat timeout`` of the job; the record also brings the last progress and checkpoint.

When a deadline passes, :meth:`AttemptLeases.expired` says what to do: an attempt that no
record ever listed is *rebound* (its JobReady or JobBound was lost; the same attempt is
released again), one that was listed is *lost*. A record of a new incarnation of a node
(the executor restarted) that does not list an attempt seen under the old one makes that
attempt lost at once. An attempt a record lists as ended is dropped: its terminal event
is durable and on its way, however far behind this scheduler's consumer is. Deadlines sit
in a heap, so finding the expired ones is O(log n) each; entries left by renewals and
ended attempts are dropped lazily, and the heap is rebuilt once they outnumber the live
leases, so it stays proportional to the attempts in flight.

A gang's attempt runs on several nodes, one member each, and every member's node renews
its own part: the lease keeps a deadline per member node (``Lease.members``), and its
deadline is the earliest of them, so one member's silent node loses the whole attempt
while its peers' records still come. Until every member was listed once, the release's
bind deadline counts too: a member that never showed up loses the attempt as well. A
member that ended leaves the lease; the others keep it.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Literal

from jobmesh.contract.ids import attempt_key
from jobmesh.contract.messages.v1 import NodeInfo


@dataclass(slots=True)
class Lease:
    """The lease of one released attempt."""

    attempt: int
    deadline: float
    heartbeat: float  # the job's heartbeat timeout
    node_id: str = ""  # where a record listed it ("" until one did)
    incarnation: str = ""
    progress: float | None = None
    message: str = ""
    checkpoint: str = ""
    size: int = 1  # the gang's members (1: a plain job)
    # A gang's: member node -> (deadline, incarnation); None for a plain job.
    members: dict[str, tuple[float, str]] | None = None
    listed: set[str] | None = None  # a gang's member nodes a record listed so far (ended ones too)
    ranks: set[int] | None = None  # a gang's ranks listed so far, or known to have succeeded
    bind_deadline: float = 0.0  # a gang's, until every member was listed


@dataclass(frozen=True, slots=True)
class Expiry:
    """A lease that ran out: ``rebind`` (never seen running) or ``lost``, with what the
    lease last held (its checkpoint goes to the next attempt)."""

    job_id: str
    attempt: int
    kind: Literal["rebind", "lost"]
    node_id: str
    reason: str
    lease: Lease
    restarted: bool = False  # its executor restarted: the old process is gone already


@dataclass
class AttemptLeases:
    """The leases of one partition's released attempts.

    Args:
        partition: the partition whose attempts these are (records list all partitions).
        bind_timeout: seconds a released attempt may take to show up in a record.
    """

    partition: int
    bind_timeout: float
    leases: dict[str, Lease] = field(default_factory=dict)  # job id -> lease
    _heap: list[tuple[float, str, int]] = field(default_factory=list)
    _by_node: dict[str, set[str]] = field(default_factory=dict)  # node -> job ids seen on it
    # Losses a record showed (at its arrival, monotonic), not yet taken.
    _pending: list[tuple[float, Expiry]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.leases)

    def track(
        self,
        job_id: str,
        attempt: int,
        heartbeat: float,
        now: float,
        grace: float | None = None,
        size: int = 1,
        done: frozenset[int] = frozenset(),
    ) -> None:
        """An attempt was released (or is reloaded after a take-over): start its lease.

        Args:
            grace: seconds until its deadline; ``bind_timeout`` when omitted.
            size: how many members its gang has (1: a plain job).
            done: the gang's ranks known to have succeeded (a reload): no record lists
                them again, and none need.
        """
        self._unindex(job_id)
        deadline = now + (self.bind_timeout if grace is None else grace)
        lease = Lease(attempt=attempt, deadline=deadline, heartbeat=heartbeat)
        if size > 1:
            lease.size, lease.members, lease.bind_deadline = size, {}, deadline
            lease.listed, lease.ranks = set(), set(done)
            lease.deadline = self._gang_deadline(lease)
        self.leases[job_id] = lease
        self._push(lease.deadline, job_id, attempt)

    def forget(self, job_id: str) -> Lease | None:
        """The attempt ended (or the job left): drop its lease, returning what it held."""
        self._unindex(job_id)
        return self.leases.pop(job_id, None)

    def observe(self, record: NodeInfo, at: float) -> None:
        """A node's record arrived at ``at``: renew what it lists, notice what it lost."""
        listed: set[str] = set()
        for lease_info in record.attempts:
            if lease_info.partition != self.partition:
                continue
            lease = self.leases.get(lease_info.job_id)
            if lease is None or lease.attempt != lease_info.attempt:
                continue  # not ours, or a stale attempt (fenced)
            listed.add(lease_info.job_id)
            if lease.members is not None:
                self._renew_member(lease, lease_info.job_id, record, lease_info.rank, at)
            else:
                if lease.node_id != record.node_id:
                    self._unindex(lease_info.job_id)
                    self._by_node.setdefault(record.node_id, set()).add(lease_info.job_id)
                lease.node_id = record.node_id
                lease.incarnation = record.incarnation
                lease.deadline = at + lease.heartbeat
            lease.progress = lease_info.progress
            lease.message = lease_info.message
            if lease_info.checkpoint:
                lease.checkpoint = lease_info.checkpoint
            self._push(lease.deadline, lease_info.job_id, lease.attempt)
        seen_here = self._by_node.get(record.node_id)
        if not seen_here:
            return
        ended = set(record.ended) if record.ended else set()
        for job_id in list(seen_here):
            lease = self.leases.get(job_id)
            if lease is None or job_id in listed:
                continue
            if attempt_key(job_id, lease.attempt) in ended:
                # Its terminal event is durable: it is no lease's business any more, and a
                # consumer that lags must not take it for lost meanwhile. A gang member's
                # end leaves its peers' lease.
                if lease.members is not None:
                    self._member_left(lease, job_id, record.node_id)
                else:
                    self.forget(job_id)
                continue
            incarnation = lease.incarnation
            if lease.members is not None:
                incarnation = lease.members.get(record.node_id, (0.0, ""))[1]
            if incarnation and record.incarnation and incarnation != record.incarnation:
                # The executor restarted: the new process does not run what the old one ran.
                self._pending.append(
                    (
                        at,
                        Expiry(
                            job_id,
                            lease.attempt,
                            "lost",
                            record.node_id,
                            "its executor restarted without it",
                            lease,
                            True,
                        ),
                    )
                )
                self.forget(job_id)

    def expired(self, now: float) -> list[Expiry]:
        """The leases that ran out by ``now`` (and those a record showed lost by ``now``),
        once each. A caller that may act only on what happened before some time passes that
        time as ``now``: a loss a record showed later waits, as a lease's deadline does."""
        out = [expiry for at, expiry in self._pending if at <= now]
        self._pending = [(at, expiry) for at, expiry in self._pending if at > now]
        while self._heap and self._heap[0][0] <= now:
            deadline, job_id, attempt = heapq.heappop(self._heap)
            lease = self.leases.get(job_id)
            if lease is None or lease.attempt != attempt or lease.deadline != deadline:
                continue  # renewed, ended or superseded since this entry was filed
            if lease.members is not None and lease.node_id:
                out.append(self._gang_expiry(job_id, lease, now))
            elif lease.node_id:
                reason = f"no lease renewal from node {lease.node_id} for {lease.heartbeat:g}s"
                out.append(Expiry(job_id, attempt, "lost", lease.node_id, reason, lease))
            else:
                reason = f"not running {self.bind_timeout:g}s after its release"
                out.append(Expiry(job_id, attempt, "rebind", "", reason, lease))
            self.forget(job_id)
        return out

    def next_deadline(self) -> float | None:
        """The earliest live deadline, a loss a record showed included (stale entries on
        top are dropped on the way)."""
        pending = min((at for at, _ in self._pending), default=None)
        heap = self._heap
        while heap:
            deadline, job_id, attempt = heap[0]
            lease = self.leases.get(job_id)
            if lease is not None and lease.attempt == attempt and lease.deadline == deadline:
                return deadline if pending is None else min(deadline, pending)
            heapq.heappop(heap)
        return pending

    def member_done(self, job_id: str, attempt: int, rank: int) -> None:
        """Member ``rank`` of the gang's attempt succeeded: it is accounted for, whether or
        not a record ever listed it (a short member between two records, a reload)."""
        lease = self.leases.get(job_id)
        if lease is None or lease.attempt != attempt or lease.ranks is None:
            return
        lease.ranks.add(rank)
        lease.deadline = self._gang_deadline(lease)
        self._push(lease.deadline, job_id, attempt)

    def _renew_member(self, lease: Lease, job_id: str, record: NodeInfo, rank: int, at: float) -> None:
        """A record lists a member of ``lease``'s gang: renew that member's part."""
        assert lease.members is not None and lease.listed is not None and lease.ranks is not None
        lease.ranks.add(rank)
        lease.listed.add(record.node_id)
        if record.node_id not in lease.members:
            self._by_node.setdefault(record.node_id, set()).add(job_id)
        lease.members[record.node_id] = (at + lease.heartbeat, record.incarnation)
        lease.node_id = lease.node_id or record.node_id  # the first member seen speaks for it
        lease.incarnation = lease.incarnation or record.incarnation
        lease.deadline = self._gang_deadline(lease)

    def _member_left(self, lease: Lease, job_id: str, node_id: str) -> None:
        """A gang member's end is durable: its node renews nothing more, and need not."""
        assert lease.members is not None
        lease.members.pop(node_id, None)
        holders = self._by_node.get(node_id)
        if holders is not None:
            holders.discard(job_id)
            if not holders:
                del self._by_node[node_id]
        lease.deadline = self._gang_deadline(lease)
        self._push(lease.deadline, job_id, lease.attempt)

    @staticmethod
    def _gang_deadline(lease: Lease) -> float:
        assert lease.members is not None
        assert lease.ranks is not None
        deadlines = [deadline for deadline, _ in lease.members.values()]
        if len(lease.ranks) < lease.size:
            deadlines.append(lease.bind_deadline)
        # Every member ended: their ends are durable and on their way to the scheduler.
        return min(deadlines, default=math.inf)

    def _gang_expiry(self, job_id: str, lease: Lease, now: float) -> Expiry:
        """Why a gang's lease ran out: a member's node went silent, or members never came."""
        assert lease.members is not None
        silent = sorted(node_id for node_id, (deadline, _) in lease.members.items() if deadline <= now)
        if silent:
            reason = f"no lease renewal from node {silent[0]} (a gang member) for {lease.heartbeat:g}s"
            return Expiry(job_id, lease.attempt, "lost", silent[0], reason, lease)
        reason = f"only {len(lease.ranks or ())} of {lease.size} gang members running {self.bind_timeout:g}s after its release"
        return Expiry(job_id, lease.attempt, "lost", lease.node_id, reason, lease)

    def _push(self, deadline: float, job_id: str, attempt: int) -> None:
        heapq.heappush(self._heap, (deadline, job_id, attempt))
        if len(self._heap) > 2 * len(self.leases) + 1024:
            # Renewals and ended attempts leave entries behind; once they outnumber the
            # live leases, keep only one entry per lease.
            self._heap = [(lease.deadline, j, lease.attempt) for j, lease in self.leases.items()]
            heapq.heapify(self._heap)

    def _unindex(self, job_id: str) -> None:
        lease = self.leases.get(job_id)
        if lease is not None and lease.members is not None:
            for node_id in lease.members:
                holders = self._by_node.get(node_id)
                if holders is not None:
                    holders.discard(job_id)
                    if not holders:
                        del self._by_node[node_id]
            return
        if lease is not None and lease.node_id:
            holders = self._by_node.get(lease.node_id)
            if holders is not None:
                holders.discard(job_id)
                if not holders:
                    del self._by_node[lease.node_id]
