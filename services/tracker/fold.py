"""The tracker's decisions, as pure functions: how lifecycle events combine into records.

Every event becomes a one-event job record and (from attempt 1 on) a one-event attempt
record. Records combine with two *join* functions, :func:`join_attempt` and
:func:`join_job`. A batch is folded with them in Python, so each row is written at most
once per batch; the store's upserts apply the very same joins against the stored rows in
SQL (``store.py`` mirrors these functions, and a test checks that the two agree).

The joins make the result independent of delivery order, of batching and of redelivery:

* An attempt's state only moves forward. States are ordered by rank (queued and retrying
  0, waiting 1, ready 2, bound 3, running 4, terminal 5); "waiting" and "ready" form one
  class, because the scheduler may release an attempt again after the binder found no
  room. Within that class the release number orders them (ready n < waiting n < ready
  n+1), so the order does not depend on the scheduler's and the binder's clocks agreeing.
* A terminal state is final, with a precedence among terminal records: JobGaveUp's
  record of the attempt (the scheduler's summary: its state and error) gives way to the
  attempt's own ending (JobSucceeded, JobFailed, JobLost, JobExpired), and every ending
  gives way to JobCancelled (a job cancelled while it ran ends ``cancelled``, whether the
  executor's JobFailed(code=cancelled) or the scheduler's JobCancelled comes first).
  Within one level the first recorded stays: a late Succeeded after the tracker recorded
  Lost is history, not state.
* JobRetrying(attempt n, next_attempt m) is the first state of attempt m: ``retrying``, of
  the lowest rank, so attempt m's own events move it on whichever arrives first.
* A job shows its highest attempt. Events of an older attempt update that attempt's own
  record and the event log, never the job's state (fencing). Attempt 0 is the time before
  the first release (JobSubmitted, or JobExpired / JobCancelled before any attempt) and
  lives on the job row only.
* A job is ``final`` when the attempt it shows ended it: that attempt succeeded, or the
  scheduler gave it up, cancelled it or let it expire. The scheduler's mark (``ends_job``)
  is sticky whichever ending of the attempt the state shows. Since the scheduler never
  goes on after such a decision, a final job stays final; and a late success of an
  attempt the scheduler had already replaced (it was declared lost) is fenced off like any
  stale event, so it never makes the job final.
* The workflow step a job is (run, step, item index) comes with its spec, and is kept
  with it; the skip mark of a JobCancelled (a dependency ended as the job did not need)
  is sticky.
* JobCancelling changes no state: it records why the attempt is being stopped
  (``cancelling``), shown as the attempt's reason until the attempt ends.
* Facts that fill gaps (node, bind and start times, spec, submission time, partition,
  the fallback links, the origin, the cancelling reason) are kept whichever event brings
  them first, and are never cleared by a later, emptier event. The origin (the trigger
  rule and event that started the job) comes only with JobSubmitted, so it fills its gap
  on its own rather than with the spec, which JobReady and JobBound bring too.

* A gang (``JobSpec.replicas`` > 1) has one attempt of many members: each member's
  JobBound, JobStarted, JobFailed and JobLost (``world_size`` > 1) move the attempt like a
  plain job's events do, and each is an event row of its own (``member_event_id``). Only
  rank 0's events bring the attempt's node, so it does not depend on which member spoke
  first. A member stopped because another one failed (JobFailed, code ``cancelled``)
  yields to the failure that stopped it, whichever the tracker hears first.
  MemberSucceeded (one member done) changes no state: the scheduler's JobSucceeded ends
  the attempt once every member has. Besides, every member event gives a member record
  (:func:`member_of`, joined by :func:`join_member`): how far each member got (bound <
  running < an ending; the first ending recorded stays), the rows behind
  ``AttemptView.members``. A plain job has none.

DependencyWatch, DependencyEnded (and ChildAdded, from the trigger) travel on JM_JOBS to
scheduler partitions; they say nothing about the job's own state (DependencyEnded carries
the watcher's partition, not the job's), so the fold leaves them out.

There is one deliberate exception to order independence: two *different* endings of one
level for one attempt (Succeeded and Lost, say). The one recorded first wins, because
other services already acted on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeGuard, cast

from msgspec import Struct
from msgspec import field as wire
from msgspec.structs import replace

from jobmesh.contract import subjects
from jobmesh.contract.ids import event_id, member_event_id, release_id
from jobmesh.contract.messages.v1 import (
    ChildAdded,
    DependencyEnded,
    DependencyWatch,
    JobBound,
    JobCancelled,
    JobCancelling,
    JobExpired,
    JobFailed,
    JobGaveUp,
    JobLost,
    JobReady,
    JobRetrying,
    JobSpec,
    JobStarted,
    JobState,
    JobSubmitted,
    JobSucceeded,
    JobUnplaceable,
    JobUpdate,
    JobWaiting,
    LifecycleEvent,
    MemberSucceeded,
)
from jobmesh.contract.messages.v1.triggers import JobOrigin

# Ranks: queued and retrying 0, waiting 1, ready 2, bound 3, running 4, any terminal state 5.
TERMINAL_RANK = 5
# Precedence of terminal records (their seq): a gang member stopped because another
# member failed (its JobFailed, code cancelled), then the scheduler's summary in
# JobGaveUp, then the attempt's own ending, then a cancel. So a gang's attempt shows the
# failure that stopped the others, whichever the tracker hears first. Rows written before
# issue 7 hold 0 (own).
_STOPPED_MEMBER_SEQ = -2
_SUMMARY_SEQ = -1
_OWN_SEQ = 0
_CANCEL_SEQ = 1
_CANCELLED_CODE = "cancelled"
# The record JobCancelling brings when it is the first word of its attempt: below every
# state, so the attempt's own first event replaces it.
_PLACEHOLDER_SEQ = -1
_TEXT_MAX = 64 * 1024
_DETAIL_MAX = 1000
_LOST_DEFAULT = "the attempt was lost"


class AttemptState(Struct, frozen=True, kw_only=True):
    """One attempt as recorded (a row of ``tracker.attempts``; attempt 0 on the job only).

    Records travel to Postgres as JSON, so field names are column names. The fields from
    ``state`` to ``result_bytes`` move together when a state advances; the rest fill gaps.
    """

    attempt: int
    state: JobState
    rank: int = wire(name="state_rank")
    seq: int = wire(name="state_seq", default=0)  # order within the rank (releases; terminal precedence)
    state_at: float  # when the event that set ``state`` happened
    reason: str = ""
    exit_code: int | None = None
    error_code: str = ""
    error_message: str = ""
    output_tail: str = ""
    finished_at: float | None = None
    result: str = ""
    result_ref: str = ""
    result_bytes: int = 0
    node_id: str = ""
    bound_at: float | None = None
    started_at: float | None = None
    ends_job: bool = False  # the scheduler ended the job with this attempt (gave up, cancelled, expired)
    cancelling: str = ""  # "cancelling: <reason>" once a cancel of this attempt is under way


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
    partition: int = -1  # -1 until an event brings it (every event does)
    fallback_job_id: str = ""  # the job that runs in its place (JobGaveUp)
    fallback_of: str = ""  # the job it runs in place of (JobSubmitted)
    origin: JobOrigin | None = None  # the trigger rule and event that started it (JobSubmitted)
    # Its place in a workflow run (``spec.step``), known with the spec: "" and -1 for a job
    # that is not a step, or not a mapped item.
    workflow_id: str = ""
    step: str = ""
    index: int = wire(name="step_index", default=-1)
    skipped: bool = False  # cancelled because a dependency ended as it did not need (JobCancelled)


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


class MemberRow(Struct, frozen=True, kw_only=True):
    """One member of a gang's attempt (a row of ``tracker.members``): how far it got.

    Field names are column names, as for :class:`AttemptState`.
    """

    job_id: str
    attempt: int
    rank: int
    node_id: str
    state: str  # bound, running, succeeded, failed, lost
    order: int = wire(name="state_rank")  # bound 1 < running 2 < any ending 3
    at: float  # when it got there
    detail: str = ""  # why it failed or was lost; empty otherwise


@dataclass
class Folded:
    """One batch, folded: each row once, sorted by key so concurrent writers lock in order."""

    jobs: list[JobRow] = field(default_factory=list)
    attempts: list[AttemptRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    # Gang members only: a batch of plain jobs has none, and writes none.
    members: list[MemberRow] = field(default_factory=list)


# --- what a record means -------------------------------------------------------------


def final_of(state: str, ends_job: bool) -> bool:
    """Whether a job whose shown attempt is in ``state`` has ended for good.

    Args:
        state: the state of the attempt the job shows.
        ends_job: whether the scheduler ended the job with that attempt (gave it up,
            cancelled it or let it expire).

    Returns:
        True when the attempt succeeded or the scheduler ended the job with it.
    """
    return ends_job or state == "succeeded"


def is_final(record: AttemptState) -> bool:
    """Whether a job showing ``record`` has ended for good (:func:`final_of` of its fields).

    Args:
        record: the attempt the job shows.

    Returns:
        True once the job is final.
    """
    return final_of(record.state, record.ends_job)


def shown_reason(record: AttemptState) -> str:
    """The reason to show for an attempt: a cancel under way, until the attempt ends.

    Args:
        record: an attempt record.

    Returns:
        ``cancelling: <reason>`` while a cancel of a live attempt is under way, else the
        reason its state came with.
    """
    return reason_of(record.reason, record.cancelling, record.rank)


def reason_of(reason: str, cancelling: str, rank: int) -> str:
    """:func:`shown_reason` of an attempt's columns (what a list reads, without the record).

    Args:
        reason: the reason its state came with.
        cancelling: the cancel under way ("" for none).
        rank: its state's rank.

    Returns:
        The reason to show.
    """
    if cancelling and rank < TERMINAL_RANK:
        return cancelling
    return reason


# --- the joins -----------------------------------------------------------------------


def advances(old: AttemptState, new: AttemptState) -> bool:
    """Whether ``new``'s state replaces ``old``'s within the same attempt.

    Mirrored by the SQL function ``advances`` in ``store.DDL``.
    """
    if old.rank == TERMINAL_RANK:
        # Terminal records replace each other only by precedence (summary < own < cancel).
        return new.rank == TERMINAL_RANK and new.seq > old.seq
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
        The state of whichever advances further (``old`` on a tie or by precedence), with
        node, bind and start times, the scheduler's end mark and the cancelling reason
        filled from either.
    """
    node_id = old.node_id or new.node_id
    bound_at = _earliest(old.bound_at, new.bound_at)
    started_at = _earliest(old.started_at, new.started_at)
    ends_job = old.ends_job or new.ends_job
    cancelling = old.cancelling or new.cancelling
    if advances(old, new):
        base = new
    elif (node_id, bound_at, started_at, ends_job, cancelling) == (
        old.node_id,
        old.bound_at,
        old.started_at,
        old.ends_job,
        old.cancelling,
    ):
        return old
    else:
        base = old
    return replace(
        base,
        node_id=node_id,
        bound_at=bound_at,
        started_at=started_at,
        ends_job=ends_job,
        cancelling=cancelling,
    )


def join_job(old: JobRow, new: JobRow) -> JobRow:
    """Combine two records of one job; ``old`` is the one recorded first.

    Returns:
        The job showing the higher attempt (joined when both show the same one), the
        identity known first, the highest partition seen (every event carries the same
        one), the fallback links, the origin and the skip mark from either, and the latest
        update time. The workflow step goes with the identity (both come with the spec).
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
        partition=max(old.partition, new.partition),
        fallback_job_id=old.fallback_job_id or new.fallback_job_id,
        fallback_of=old.fallback_of or new.fallback_of,
        origin=old.origin if old.origin is not None else new.origin,
        workflow_id=ident.workflow_id,
        step=ident.step,
        index=ident.index,
        skipped=old.skipped or new.skipped,
    )


def join_member(old: MemberRow, new: MemberRow) -> MemberRow:
    """Combine two records of one gang member; ``old`` is the one recorded first.

    Mirrored by the members upsert in ``store.py``.

    Returns:
        The record that got further (bound < running < an ending; ``old`` on a tie, so the
        first ending recorded stays), with the node filled from either.
    """
    base = new if new.order > old.order else old
    node_id = old.node_id or new.node_id
    return base if base.node_id == node_id else replace(base, node_id=node_id)


# --- events to records ---------------------------------------------------------------


def record_of(event: LifecycleEvent) -> tuple[JobRow, EventRow]:
    """The one-event job record and event row of a decoded lifecycle event.

    The event row is filed under the event's own attempt (0 for JobSubmitted), which for
    JobRetrying is the attempt that ended, not the one its record starts. Free text is
    cleaned so Postgres can store it (no NUL, bounded length).
    """
    member = type(event) in _MEMBER_TYPES and _is_member(event)
    job, detail = _record(event, member)
    # A one-event record's update time is the event's own time.
    kind, n, at = _KINDS[type(event)], getattr(event, "attempt", 0), job.updated_at
    eid = event_id(job.job_id, n, kind)
    release = getattr(event, "release", 1)
    if isinstance(event, JobWaiting):
        eid = release_id(job.job_id, n, kind, event.wait)  # each wait of an attempt is its own row
    elif release > 1:
        # A re-release is history of its own, not a duplicate of the first release.
        eid = release_id(job.job_id, n, kind, release)
    elif member:
        # Each member of a gang has its own bound, started, failed, lost and success.
        eid = member_event_id(job.job_id, n, kind, cast(_MemberEvent, event).rank)
    return job, EventRow(eid, job.job_id, n, kind, at, _clean(detail)[:_DETAIL_MAX])


# The events each member of a gang sends of its own (with its rank and world_size).
_MemberEvent = JobBound | JobStarted | JobFailed | JobLost | MemberSucceeded
_MEMBER_EVENTS = (JobBound, JobStarted, JobFailed, JobLost, MemberSucceeded)
_MEMBER_TYPES = frozenset(_MEMBER_EVENTS)  # a set lookup keeps the plain path cheap
_BOUND_ORDER, _RUNNING_ORDER, _ENDED_ORDER = 1, 2, 3


def _is_member(event: LifecycleEvent) -> TypeGuard[_MemberEvent]:
    # A MemberSucceeded's world_size is at least 2 (the contract checks it on decoding).
    return isinstance(event, _MEMBER_EVENTS) and event.world_size > 1


def _member_name(event: _MemberEvent) -> str:
    return f"member {event.rank} on node {_clean(event.node_id) or '-'}"


def _attempt_node(node_id: str, member: bool, rank: int) -> str:
    # A gang's attempt shows rank 0's node: taking whichever member spoke first would make
    # the record depend on the delivery order.
    return node_id if not member or rank == 0 else ""


def _failure_text(event: JobFailed) -> str:
    code, message = _clean(event.error.code), _clean(event.error.message)
    exit_part = f" (exit {event.exit_code})" if event.exit_code is not None else ""
    return f"{code}: {message}{exit_part}"


def _lost_reason(event: JobLost) -> str:
    return _clean(event.reason)[:_DETAIL_MAX] or _LOST_DEFAULT


def member_of(event: LifecycleEvent) -> MemberRow | None:
    """The member record of a gang member's event.

    Args:
        event: a decoded lifecycle event.

    Returns:
        How far the member got, from its JobBound, JobStarted, MemberSucceeded, JobFailed
        or JobLost when its gang has several members; None for every other event, and for
        every event of a plain job.
    """
    if not _is_member(event):
        return None
    detail = ""
    match event:
        case JobBound():
            state, order, at = "bound", _BOUND_ORDER, event.bound_at
        case JobStarted():
            state, order, at = "running", _RUNNING_ORDER, event.at
        case MemberSucceeded():
            state, order, at = "succeeded", _ENDED_ORDER, event.at
        case JobFailed():
            state, order, at, detail = "failed", _ENDED_ORDER, event.at, _failure_text(event)[:_DETAIL_MAX]
        case JobLost():
            state, order, at, detail = "lost", _ENDED_ORDER, event.at, _lost_reason(event)
    return MemberRow(
        job_id=event.job_id,
        attempt=event.attempt,
        rank=event.rank,
        node_id=_clean(event.node_id),
        state=state,
        order=order,
        at=at,
        detail=detail,
    )


_KINDS = {
    JobSubmitted: subjects.SUBMITTED,
    JobReady: subjects.READY,
    JobUnplaceable: subjects.UNPLACEABLE,
    JobWaiting: subjects.WAITING,
    JobBound: subjects.BOUND,
    JobStarted: subjects.STARTED,
    JobSucceeded: subjects.SUCCEEDED,
    JobFailed: subjects.FAILED,
    JobExpired: subjects.EXPIRED,
    JobLost: subjects.LOST,
    JobRetrying: subjects.RETRYING,
    JobGaveUp: subjects.GAVE_UP,
    JobCancelling: subjects.CANCELLING,
    JobCancelled: subjects.CANCELLED,
    MemberSucceeded: subjects.MEMBER_SUCCEEDED,
}


def _record(event: LifecycleEvent, member: bool) -> tuple[JobRow, str]:
    # ``member``: the event is a gang member's own (:func:`_is_member`).
    p = event.partition
    match event:
        case JobSubmitted(spec=spec):
            state = AttemptState(attempt=0, state="queued", rank=0, state_at=event.submitted_at)
            fallback_of = _clean(event.fallback_of)
            detail = f"queue {spec.queue}, tenant {spec.tenant}"
            if fallback_of:
                detail += f", fallback of {fallback_of}"
            if event.origin is not None:
                rule = f" {event.origin.rule}" if event.origin.rule else ""
                detail += f", from {event.origin.kind}{rule}"
            job = _job(event.job_id, p, state, spec, event.submitted_at, fallback_of=fallback_of, origin=event.origin)
            return job, detail
        case JobReady(spec=spec):
            state = AttemptState(
                attempt=event.attempt, state="ready", rank=2, seq=2 * event.release, state_at=event.ready_at
            )
            return _job(event.job_id, p, state, spec, event.submitted_at), "candidates: " + ", ".join(event.candidates)
        case JobWaiting():
            # Held by the scheduler: one class with waiting-for-room, ordered among the
            # attempt's releases by the releases it had so far.
            reason = _clean(event.reason)
            state = AttemptState(
                attempt=event.attempt,
                state="waiting",
                rank=1,
                seq=2 * event.release + 1,
                state_at=event.at,
                reason=reason,
            )
            return _job(event.job_id, p, state), reason
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
            return _job(event.job_id, p, state), reason
        case JobBound(spec=spec):
            state = AttemptState(
                attempt=event.attempt,
                state="bound",
                rank=3,
                state_at=event.bound_at,
                node_id=_attempt_node(event.node_id, member, event.rank),
                bound_at=event.bound_at,
            )
            detail = _member_name(event) if member else f"node {event.node_id}"
            return _job(event.job_id, p, state, spec, event.submitted_at), detail
        case JobStarted():
            state = AttemptState(
                attempt=event.attempt,
                state="running",
                rank=4,
                state_at=event.at,
                node_id=_attempt_node(event.node_id, member, event.rank),
                started_at=event.at,
            )
            detail = _member_name(event) if member else f"node {event.node_id}"
            if event.incarnation:
                detail += f", incarnation {_clean(event.incarnation)}"
            return _job(event.job_id, p, state), detail
        case MemberSucceeded():
            # One member's success is not the attempt's (the scheduler's JobSucceeded is,
            # once every member has sent this): a record below every state, like
            # JobCancelling's, so the job row exists and its update time moves, no more.
            return _job(event.job_id, p, _placeholder(event.attempt, event.at)), f"{_member_name(event)} succeeded"
        case JobSucceeded():
            state = AttemptState(
                attempt=event.attempt,
                state="succeeded",
                rank=TERMINAL_RANK,
                seq=_OWN_SEQ,
                state_at=event.at,
                exit_code=event.exit_code,
                output_tail=_clean(event.output_tail),
                finished_at=event.at,
                # A result is the job's output: never cut, only made storable.
                result=_clean(event.result, limit=None),
                result_ref=_clean(event.result_ref),
                result_bytes=event.result_bytes,
                node_id=event.node_id,
                started_at=event.started_at or None,
            )
            detail = f"exit {event.exit_code}"
            if event.result_ref:
                detail += f", result of {event.result_bytes} bytes in {subjects.OBJ_RESULTS}"
            elif event.result or event.result_bytes:
                detail += f", result of {event.result_bytes} bytes inline"
            return _job(event.job_id, p, state, None, event.submitted_at), detail
        case JobFailed():
            code, message = _clean(event.error.code), _clean(event.error.message)
            stopped = member and code == _CANCELLED_CODE
            state = AttemptState(
                attempt=event.attempt,
                state="failed",
                rank=TERMINAL_RANK,
                seq=_STOPPED_MEMBER_SEQ if stopped else _OWN_SEQ,
                state_at=event.at,
                reason=f"{code}: {message}"[:_DETAIL_MAX],
                exit_code=event.exit_code,
                error_code=code,
                error_message=message,
                output_tail=_clean(event.output_tail),
                finished_at=event.at,
                node_id=_attempt_node(_clean(event.node_id), member, event.rank),
                started_at=event.started_at or None,
            )
            detail = _failure_text(event)
            if member:
                detail = f"{_member_name(event)}: {detail}"
            return _job(event.job_id, p, state, None, event.submitted_at), detail
        case JobExpired():
            reason = _clean(event.reason)
            state = AttemptState(
                attempt=event.attempt,
                state="expired",
                rank=TERMINAL_RANK,
                seq=_OWN_SEQ,
                state_at=event.at,
                reason=reason,
                finished_at=event.at,
                ends_job=True,
            )
            return _job(event.job_id, p, state), reason
        case JobLost():
            # Whoever declared it (the scheduler for a lease, the executor after a restart)
            # says why; the error matches what the scheduler lists in JobGaveUp.errors.
            node = _clean(event.node_id)
            reason = _lost_reason(event)
            state = AttemptState(
                attempt=event.attempt,
                state="lost",
                rank=TERMINAL_RANK,
                seq=_OWN_SEQ,
                state_at=event.at,
                reason=reason,
                error_code="lost",
                error_message=reason,
                finished_at=event.at,
                node_id=_attempt_node(node, member, event.rank),
            )
            if member:
                return _job(event.job_id, p, state), f"{_member_name(event)}: {reason}"
            return _job(event.job_id, p, state), f"{reason} (node {node})" if node else reason
        case JobRetrying():
            code, message = _clean(event.error.code), _clean(event.error.message)
            state = AttemptState(
                attempt=event.next_attempt,
                state="retrying",
                rank=0,
                state_at=event.at,
                reason=f"after attempt {event.attempt}: {code}: {message}"[:_DETAIL_MAX],
            )
            detail = f"attempt {event.next_attempt} in {event.delay:.1f}s"
            if event.avoid:
                detail += ", avoiding " + ", ".join(event.avoid)
            return _job(event.job_id, p, state), detail
        case JobGaveUp():
            code, message = _clean(event.error.code), _clean(event.error.message)
            # The attempt ended when its own event says; the summary knows that time too.
            ended = next((e.at for e in event.errors if e.attempt == event.attempt), event.at)
            state = AttemptState(
                attempt=event.attempt,
                state=event.state,
                rank=TERMINAL_RANK,
                seq=_SUMMARY_SEQ,
                state_at=ended,
                # The same reason the attempt's own JobFailed / JobLost gives.
                reason=(f"{code}: {message}" if event.state == "failed" else message)[:_DETAIL_MAX],
                error_code=code,
                error_message=message,
                finished_at=ended,
                node_id=_clean(event.node_id),
                ends_job=True,
            )
            fallback = _clean(event.fallback_job_id)
            detail = _clean(event.reason) + (f"; fallback job {fallback}" if fallback else "")
            return _job(event.job_id, p, state, at=event.at, fallback_job_id=fallback), detail
        case JobCancelling():
            reason = _clean(event.reason)
            cancelling = f"cancelling: {reason}"[:_DETAIL_MAX] if reason else "cancelling"
            return _job(event.job_id, p, _placeholder(event.attempt, event.at, cancelling)), reason
        case JobCancelled():
            reason = _clean(event.reason)[:_DETAIL_MAX]
            state = AttemptState(
                attempt=event.attempt,
                state="cancelled",
                rank=TERMINAL_RANK,
                seq=_CANCEL_SEQ,
                state_at=event.at,
                reason=reason,
                finished_at=event.at,
                node_id=_clean(event.node_id),
                ends_job=True,
            )
            return _job(event.job_id, p, state, skipped=event.skipped), reason
    raise TypeError(f"not a lifecycle event: {type(event).__name__}")


def _job(
    job_id: str,
    partition: int,
    state: AttemptState,
    spec: JobSpec | None = None,
    submitted_at: float | None = None,
    *,
    at: float | None = None,
    fallback_job_id: str = "",
    fallback_of: str = "",
    origin: JobOrigin | None = None,
    skipped: bool = False,
) -> JobRow:
    # ``at``: when the event happened, if not when its state did (a give-up is later
    # than the end of the attempt it records).
    updated_at = state.state_at if at is None else at
    if spec is None:
        return JobRow(
            job_id=job_id,
            current=state,
            updated_at=updated_at,
            submitted_at=submitted_at or None,
            partition=partition,
            fallback_job_id=fallback_job_id,
            fallback_of=fallback_of,
            origin=origin,
            skipped=skipped,
        )
    step = spec.step
    return JobRow(
        job_id=job_id,
        current=state,
        updated_at=updated_at,
        name=_clean(spec.name),
        queue=spec.queue,
        tenant=spec.tenant,
        spec=spec,
        submitted_at=submitted_at or None,
        partition=partition,
        fallback_job_id=fallback_job_id,
        fallback_of=fallback_of,
        origin=origin,
        workflow_id=step.workflow_id if step is not None else "",
        step=_clean(step.step) if step is not None else "",
        index=step.index if step is not None else -1,
        skipped=skipped,
    )


def _placeholder(attempt: int, at: float, cancelling: str = "") -> AttemptState:
    """A record below every state of the attempt: the job row exists and its update time
    moves, and nothing else (what a cancel on its way, or one gang member's success, says)."""
    return AttemptState(
        attempt=attempt,
        state="queued" if attempt == 1 else "retrying",
        rank=0,
        seq=_PLACEHOLDER_SEQ,
        state_at=at,
        cancelling=cancelling,
    )


def _clean(text: str, limit: int | None = _TEXT_MAX) -> str:
    # Postgres text cannot hold NUL: one such byte would fail its whole batch, every time.
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text if limit is None or len(text) <= limit else text[-limit:]


# --- the fold ------------------------------------------------------------------------

# Scheduler-to-scheduler messages on JM_JOBS: part of no job's record.
_NOT_RECORDED = (DependencyWatch, DependencyEnded, ChildAdded)


def recorded(event: LifecycleEvent) -> bool:
    """Whether the tracker records ``event``: every lifecycle event but the schedulers'
    dependency messages (DependencyWatch, DependencyEnded), which it acks and leaves out."""
    return not isinstance(event, _NOT_RECORDED)


def fold(events: Iterable[LifecycleEvent]) -> Folded:
    """Fold a batch, in delivery order, into one record per job and per attempt.

    Args:
        events: decoded lifecycle events.

    Returns:
        Job rows, attempt rows (attempt >= 1), event rows (deduplicated by event id) and
        gang member rows (none for plain jobs), each sorted by its key; the schedulers' own
        messages (:func:`recorded`) leave none.
    """
    jobs: dict[str, JobRow] = {}
    attempts: dict[tuple[str, int], AttemptState] = {}
    rows: dict[str, EventRow] = {}
    members: dict[tuple[str, int, int], MemberRow] = {}
    for event in events:
        if not recorded(event):
            continue
        job, row = record_of(event)
        known = jobs.get(job.job_id)
        jobs[job.job_id] = job if known is None else join_job(known, job)
        n = job.current.attempt
        if n > 0:
            key = (job.job_id, n)
            had = attempts.get(key)
            attempts[key] = job.current if had is None else join_attempt(had, job.current)
        rows.setdefault(row.event_id, row)
        member = member_of(event) if type(event) in _MEMBER_TYPES else None
        if member is not None:
            mkey = (member.job_id, member.attempt, member.rank)
            was = members.get(mkey)
            members[mkey] = member if was is None else join_member(was, member)
    return Folded(
        jobs=[jobs[k] for k in sorted(jobs)],
        attempts=[AttemptRow(k[0], attempts[k]) for k in sorted(attempts)],
        events=[rows[k] for k in sorted(rows)],
        members=[members[k] for k in sorted(members)],
    )


def updates(folded: Folded, stored: Mapping[str, AttemptState]) -> list[JobUpdate]:
    """The watch updates to announce after a batch commits.

    Args:
        folded: the batch.
        stored: for each job row the write changed, the attempt it shows now.

    Returns:
        One ``JobUpdate`` per job the batch moved: its shown state is now the batch's own,
        or the batch made it final (a give-up after the attempt's own failure) or brought
        the cancel under way. None for jobs the batch did not move (fenced or older events).
    """
    out: list[JobUpdate] = []
    for job in folded.jobs:
        now = stored.get(job.job_id)
        mine = job.current
        if now is None or now.attempt != mine.attempt:
            continue
        moved = (now.state, now.state_at) == (mine.state, mine.state_at)
        marked = (mine.ends_job and now.ends_job) or (mine.cancelling != "" and now.cancelling == mine.cancelling)
        if not (moved or marked):
            continue
        out.append(
            JobUpdate(
                job_id=job.job_id,
                state=now.state,
                attempt=now.attempt,
                node_id=now.node_id,
                exit_code=now.exit_code,
                reason=shown_reason(now),
                at=now.state_at,
                final=is_final(now),
            )
        )
    return out
