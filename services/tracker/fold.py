"""The tracker's decisions, as pure functions: how lifecycle events combine into records.

Every event becomes a one-event job record and (from attempt 1 on) a one-event attempt
record. Records combine with two *join* functions, :func:`join_attempt` and
:func:`join_job`. A batch is folded with them in Python, so each row is written at most
once per batch; the store's upserts apply the very same joins against the stored rows in
SQL (``store.py`` mirrors these functions, and a test checks that the two agree).

The joins make the result independent of delivery order, of batching and of redelivery:

* An attempt's state only moves forward. States are ordered by rank (queued 0, waiting 1,
  ready 2, bound 3, running 4, terminal 5); "waiting" and "ready" form one class, because
  the scheduler may release an attempt again after the binder found no room. Within that
  class the release number orders them (ready n < waiting n < ready n+1), so the order
  does not depend on the scheduler's and the binder's clocks agreeing.
* The first terminal state an attempt gets is final: nothing moves it, not even another
  terminal event (a late Succeeded after the tracker recorded Lost is history, not state).
* A job shows its highest attempt. Events of an older attempt update that attempt's own
  record and the event log, never the job's state (fencing). Attempt 0 is the time before
  the first release (JobSubmitted, or JobExpired before any attempt) and lives on the job
  row only.
* Facts that fill gaps (node, bind and start times, spec, submission time) are kept
  whichever event brings them first, and are never cleared by a later, emptier event.

There is one deliberate exception to order independence: two *different* terminal events
for one attempt. The one recorded first wins, because other services already acted on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from msgspec import Struct
from msgspec import field as wire
from msgspec.structs import replace

from jobmesh.contract import subjects
from jobmesh.contract.ids import event_id, release_id
from jobmesh.contract.messages.v1 import (
    JobBound,
    JobExpired,
    JobFailed,
    JobLost,
    JobReady,
    JobSpec,
    JobStarted,
    JobState,
    JobSubmitted,
    JobSucceeded,
    JobUnplaceable,
    JobUpdate,
    LifecycleEvent,
)

# Ranks: queued 0, waiting 1, ready 2, bound 3, running 4, any terminal state 5.
TERMINAL_RANK = 5
_TEXT_MAX = 64 * 1024
_DETAIL_MAX = 1000


class AttemptState(Struct, frozen=True, kw_only=True):
    """One attempt as recorded (a row of ``tracker.attempts``; attempt 0 on the job only).

    Records travel to Postgres as JSON, so field names are column names.
    """

    attempt: int
    state: JobState
    rank: int = wire(name="state_rank")
    seq: int = wire(name="state_seq", default=0)  # order within the rank class (releases)
    state_at: float  # when the event that set ``state`` happened
    reason: str = ""
    exit_code: int | None = None
    error_code: str = ""
    error_message: str = ""
    output_tail: str = ""
    finished_at: float | None = None
    node_id: str = ""
    bound_at: float | None = None
    started_at: float | None = None


class JobRow(Struct, frozen=True, kw_only=True):
    """One job as recorded (a row of ``tracker.jobs``): identity plus its current attempt."""

    job_id: str
    current: AttemptState
    updated_at: float  # the latest event time seen for the job, fenced events included
    name: str = ""
    queue: str = ""
    tenant: str = ""
    spec: JobSpec | None = None
    submitted_at: float | None = None


class AttemptRow(Struct, frozen=True):
    """One row of ``tracker.attempts``: an attempt record and its job."""

    job_id: str
    record: AttemptState


class EventRow(Struct, frozen=True):
    """One row of ``tracker.events``."""

    event_id: str
    job_id: str
    attempt: int
    kind: str
    at: float
    detail: str


@dataclass
class Folded:
    """One batch, folded: each row once, sorted by key so concurrent writers lock in order."""

    jobs: list[JobRow] = field(default_factory=list)
    attempts: list[AttemptRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)


# --- the joins -----------------------------------------------------------------------


def advances(old: AttemptState, new: AttemptState) -> bool:
    """Whether ``new``'s state replaces ``old``'s within the same attempt.

    Mirrored by the SQL function ``advances`` in ``store.DDL``.
    """
    if old.rank == TERMINAL_RANK:
        return False
    # Class: waiting (1) and ready (2) share one, ordered by seq (the release), then time.
    return (new.rank - (new.rank >= 2), new.seq, new.state_at, new.rank) > (
        old.rank - (old.rank >= 2),
        old.seq,
        old.state_at,
        old.rank,
    )


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def join_attempt(old: AttemptState, new: AttemptState) -> AttemptState:
    """Combine two records of one attempt; ``old`` is the one recorded first.

    Returns:
        The state of whichever advances further (``old`` on a tie or when it is terminal),
        with node, bind and start times filled from either.
    """
    node_id = old.node_id or new.node_id
    bound_at = _earliest(old.bound_at, new.bound_at)
    started_at = _earliest(old.started_at, new.started_at)
    if advances(old, new):
        base = new
    elif (node_id, bound_at, started_at) == (old.node_id, old.bound_at, old.started_at):
        return old
    else:
        base = old
    return replace(base, node_id=node_id, bound_at=bound_at, started_at=started_at)


def join_job(old: JobRow, new: JobRow) -> JobRow:
    """Combine two records of one job; ``old`` is the one recorded first.

    Returns:
        The job showing the higher attempt (joined when both show the same one), the
        identity known first, and the latest update time.
    """
    if new.current.attempt > old.current.attempt:
        current = new.current
    elif new.current.attempt == old.current.attempt:
        current = join_attempt(old.current, new.current)
    else:
        current = old.current  # fenced: an older attempt never changes what the job shows
    ident = new if old.spec is None and new.spec is not None else old
    return JobRow(
        job_id=old.job_id,
        current=current,
        updated_at=max(old.updated_at, new.updated_at),
        name=ident.name,
        queue=ident.queue,
        tenant=ident.tenant,
        spec=ident.spec,
        submitted_at=old.submitted_at if old.submitted_at is not None else new.submitted_at,
    )


# --- events to records ---------------------------------------------------------------


def record_of(event: LifecycleEvent) -> tuple[JobRow, EventRow]:
    """The one-event job record and event row of a decoded lifecycle event.

    Free text is cleaned so Postgres can store it (no NUL, bounded length).
    """
    job, detail = _record(event)
    kind, n, at = _KINDS[type(event)], job.current.attempt, job.current.state_at
    eid = event_id(job.job_id, n, kind)
    release = getattr(event, "release", 1)
    if release > 1:
        # A re-release is history of its own, not a duplicate of the first release.
        eid = release_id(job.job_id, n, kind, release)
    return job, EventRow(eid, job.job_id, n, kind, at, _clean(detail)[:_DETAIL_MAX])


_KINDS = {
    JobSubmitted: subjects.SUBMITTED,
    JobReady: subjects.READY,
    JobUnplaceable: subjects.UNPLACEABLE,
    JobBound: subjects.BOUND,
    JobStarted: subjects.STARTED,
    JobSucceeded: subjects.SUCCEEDED,
    JobFailed: subjects.FAILED,
    JobExpired: subjects.EXPIRED,
    JobLost: subjects.LOST,
}


def _record(event: LifecycleEvent) -> tuple[JobRow, str]:
    match event:
        case JobSubmitted(spec=spec):
            state = AttemptState(attempt=0, state="queued", rank=0, state_at=event.submitted_at)
            return _job(event.job_id, state, spec, event.submitted_at), f"queue {spec.queue}, tenant {spec.tenant}"
        case JobReady(spec=spec):
            state = AttemptState(
                attempt=event.attempt, state="ready", rank=2, seq=2 * event.release, state_at=event.ready_at
            )
            return _job(event.job_id, state, spec, event.submitted_at), "candidates: " + ", ".join(event.candidates)
        case JobUnplaceable():
            reason = _clean(event.reason)
            state = AttemptState(
                attempt=event.attempt,
                state="waiting",
                rank=1,
                seq=2 * event.release + 1,
                state_at=event.at,
                reason=reason,
            )
            return _job(event.job_id, state), reason
        case JobBound(spec=spec):
            state = AttemptState(
                attempt=event.attempt,
                state="bound",
                rank=3,
                state_at=event.bound_at,
                node_id=event.node_id,
                bound_at=event.bound_at,
            )
            return _job(event.job_id, state, spec, event.submitted_at), f"node {event.node_id}"
        case JobStarted():
            state = AttemptState(
                attempt=event.attempt,
                state="running",
                rank=4,
                state_at=event.at,
                node_id=event.node_id,
                started_at=event.at,
            )
            return _job(event.job_id, state), f"node {event.node_id}"
        case JobSucceeded():
            state = AttemptState(
                attempt=event.attempt,
                state="succeeded",
                rank=TERMINAL_RANK,
                state_at=event.at,
                exit_code=event.exit_code,
                output_tail=_clean(event.output_tail),
                finished_at=event.at,
                node_id=event.node_id,
                started_at=event.started_at or None,
            )
            return _job(event.job_id, state, None, event.submitted_at), f"exit {event.exit_code}"
        case JobFailed():
            code, message = _clean(event.error.code), _clean(event.error.message)
            state = AttemptState(
                attempt=event.attempt,
                state="failed",
                rank=TERMINAL_RANK,
                state_at=event.at,
                reason=f"{code}: {message}"[:_DETAIL_MAX],
                exit_code=event.exit_code,
                error_code=code,
                error_message=message,
                output_tail=_clean(event.output_tail),
                finished_at=event.at,
                node_id=_clean(event.node_id),
                started_at=event.started_at or None,
            )
            exit_part = f" (exit {event.exit_code})" if event.exit_code is not None else ""
            return _job(event.job_id, state, None, event.submitted_at), f"{code}: {message}{exit_part}"
        case JobExpired():
            reason = _clean(event.reason)
            state = AttemptState(
                attempt=event.attempt,
                state="expired",
                rank=TERMINAL_RANK,
                state_at=event.at,
                reason=reason,
                finished_at=event.at,
            )
            return _job(event.job_id, state), reason
        case JobLost():
            node = _clean(event.node_id)
            reason = f"heartbeats from node {node} stopped" if node else "heartbeats stopped"
            state = AttemptState(
                attempt=event.attempt,
                state="lost",
                rank=TERMINAL_RANK,
                state_at=event.at,
                reason=reason,
                finished_at=event.at,
                node_id=node,
            )
            return _job(event.job_id, state), reason
    raise TypeError(f"not a lifecycle event: {type(event).__name__}")


def _job(job_id: str, state: AttemptState, spec: JobSpec | None = None, submitted_at: float | None = None) -> JobRow:
    if spec is None:
        return JobRow(job_id=job_id, current=state, updated_at=state.state_at, submitted_at=submitted_at or None)
    return JobRow(
        job_id=job_id,
        current=state,
        updated_at=state.state_at,
        name=_clean(spec.name),
        queue=spec.queue,
        tenant=spec.tenant,
        spec=spec,
        submitted_at=submitted_at or None,
    )


def _clean(text: str) -> str:
    # Postgres text cannot hold NUL: one such byte would fail its whole batch, every time.
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text if len(text) <= _TEXT_MAX else text[-_TEXT_MAX:]


# --- the fold ------------------------------------------------------------------------


def fold(events: Iterable[LifecycleEvent]) -> Folded:
    """Fold a batch, in delivery order, into one record per job and per attempt.

    Args:
        events: decoded lifecycle events.

    Returns:
        Job rows, attempt rows (attempt >= 1) and event rows (deduplicated by event id),
        each sorted by its key.
    """
    jobs: dict[str, JobRow] = {}
    attempts: dict[tuple[str, int], AttemptState] = {}
    rows: dict[str, EventRow] = {}
    for event in events:
        job, row = record_of(event)
        known = jobs.get(job.job_id)
        jobs[job.job_id] = job if known is None else join_job(known, job)
        n = job.current.attempt
        if n > 0:
            key = (job.job_id, n)
            had = attempts.get(key)
            attempts[key] = job.current if had is None else join_attempt(had, job.current)
        rows.setdefault(row.event_id, row)
    return Folded(
        jobs=[jobs[k] for k in sorted(jobs)],
        attempts=[AttemptRow(k[0], attempts[k]) for k in sorted(attempts)],
        events=[rows[k] for k in sorted(rows)],
    )


def updates(folded: Folded, stored: Mapping[str, AttemptState]) -> list[JobUpdate]:
    """The watch updates to announce after a batch commits.

    Args:
        folded: the batch.
        stored: for each job row the write changed, the attempt it shows now.

    Returns:
        One ``JobUpdate`` per job whose shown state is now the batch's own (the batch
        moved it); none for jobs the batch did not move (fenced or older events).
    """
    out: list[JobUpdate] = []
    for job in folded.jobs:
        now = stored.get(job.job_id)
        mine = job.current
        if now is None or (now.attempt, now.state, now.state_at) != (mine.attempt, mine.state, mine.state_at):
            continue
        out.append(
            JobUpdate(
                job_id=job.job_id,
                state=now.state,
                attempt=now.attempt,
                node_id=now.node_id,
                exit_code=now.exit_code,
                reason=now.reason,
                at=now.state_at,
            )
        )
    return out
