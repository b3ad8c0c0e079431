"""The scheduler's in-memory backlog of one partition: pure data, no I/O.

Jobs wait in a heap ordered by priority (higher first) then submission sequence (FIFO).
A job that fits no node is parked under its reason and looked at again only when the
node set changes, so an unplaceable job costs nothing while it waits.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Iterable

from jobmesh.messages.v1 import JobSpec, JobSubmitted, NodeInfo
from jobmesh.scheduler import placement


@dataclass(slots=True)
class Job:
    """A job the scheduler is responsible for until its attempt ends."""

    job_id: str
    seq: int
    submitted: JobSubmitted
    attempt: int = 1
    state: str = "pending"  # pending | released
    reason: str = ""
    releases: int = 0  # how often this attempt was released (numbers JobReady ids)
    trace: dict[str, str] = field(default_factory=dict)  # the submit's trace headers

    @property
    def spec(self) -> JobSpec:
        return self.submitted.spec


@dataclass(frozen=True, slots=True)
class Release:
    """Decision: release ``job`` to the binder with these candidate nodes."""

    job: Job
    candidates: list[str]


@dataclass(frozen=True, slots=True)
class Park:
    """Decision: ``job`` waits, for ``reason``."""

    job: Job
    reason: str


@dataclass
class Backlog:
    """Pending and released jobs of one partition."""

    jobs: dict[str, Job] = field(default_factory=dict)
    _heap: list[tuple[int, int, str]] = field(default_factory=list)
    _parked: dict[str, Job] = field(default_factory=dict)  # fit no node: wait for node changes
    _no_room: dict[str, Job] = field(default_factory=dict)  # candidates full: wait for capacity

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, job: Job) -> bool:
        """Track ``job``; returns False when it is already known."""
        if job.job_id in self.jobs:
            return False
        self.jobs[job.job_id] = job
        if job.state == "pending":
            self._push(job)
        return True

    def discard(self, job_ids: Iterable[str]) -> None:
        """Forget jobs (finished, or added by a batch that was rolled back)."""
        for job_id in job_ids:
            self.jobs.pop(job_id, None)
            self._parked.pop(job_id, None)
            self._no_room.pop(job_id, None)

    def requeue(self, job_id: str, reason: str) -> None:
        """A released job came back (no room on its candidates): park it with the reason."""
        job = self.jobs.get(job_id)
        if job is not None:
            job.state = "pending"
            job.reason = reason
            self._no_room[job_id] = job

    @property
    def waiting_for_room(self) -> int:
        return len(self._no_room)

    def unpark(self, nodes_changed: bool) -> None:
        """Look again at jobs waiting for room, and at every parked job if nodes changed."""
        for job in self._no_room.values():
            self._push(job)
        self._no_room.clear()
        if nodes_changed:
            for job in self._parked.values():
                self._push(job)
            self._parked.clear()

    def plan(self, nodes: list[NodeInfo], limit: int = 10_000) -> list[Release | Park]:
        """Decide what to release now, in order. Does not change the backlog.

        Args:
            nodes: live nodes to place on.
            limit: at most this many decisions.

        Returns:
            Releases and parks in priority/FIFO order.
        """
        decisions: list[Release | Park] = []
        seen: set[str] = set()
        for _, _, job_id in heapq.nsmallest(limit, self._heap):
            job = self.jobs.get(job_id)
            if job is None or job.state != "pending" or job_id in seen:
                continue
            if job_id in self._parked or job_id in self._no_room:
                continue
            seen.add(job_id)
            candidates, reason = placement.rank(job.spec, nodes)
            decisions.append(Release(job, candidates) if candidates else Park(job, reason))
        return decisions

    def apply(self, decisions: list[Release | Park]) -> None:
        """Record decisions once their effects are durable."""
        for decision in decisions:
            job = decision.job
            if isinstance(decision, Release):
                job.state = "released"
                job.reason = ""
                job.releases += 1
            else:
                job.reason = decision.reason
                self._parked[job.job_id] = job
        self._compact()

    def _push(self, job: Job) -> None:
        heapq.heappush(self._heap, (-job.spec.priority, job.seq, job.job_id))

    def _compact(self) -> None:
        # Drop heap entries that are no longer pending-and-unparked; keeps plan() cheap.
        self._heap = [
            entry for entry in self._heap
            if (job := self.jobs.get(entry[2])) is not None and job.state == "pending"
            and entry[2] not in self._parked and entry[2] not in self._no_room
        ]
        heapq.heapify(self._heap)
