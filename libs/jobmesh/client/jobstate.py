"""What a job's state means to a person, apart from how it is printed.

The tracker records what happened to a job; only the scheduler knows why a job that has not
started yet is held. The tracker stores a held job as queued (attempt 0, before its first
release) or ready (after a release that went back to the backlog), so the state a person
should see comes from both: :func:`resolve` combines a tracker state with the scheduler's
explanation (``ExplainReply``). Everything here is pure; the commands fetch the facts.

States also have a rank, so a display that gathers them from several sources (a watch
stream, polls of the tracker and the scheduler) never shows a job going backwards:
:func:`goes_back`.

A job has ended only when the tracker says it is ``final``: a failed or lost attempt may be
followed by a retry, so no state alone means the end (:func:`is_final`). What a running
attempt reports about itself (progress, a message, a checkpoint) travels in its node's
record, the lease the executor renews every heartbeat (:func:`progress_in`).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from jobmesh.contract.messages.v1 import (
    TERMINAL_STATES,
    ExplainReply,
    JobState,
    JobSummary,
    JobUpdate,
    JobView,
    NodeInfo,
)

# Every state the tracker may report, in lifecycle order (the ``JobState`` literal).
JOB_STATES: tuple[str, ...] = typing.get_args(JobState)
# States of a job that has not been bound to a node: the scheduler may hold it and say why.
PRE_RUNNING: tuple[str, ...] = ("queued", "waiting", "ready")
TERMINAL: frozenset[str] = frozenset(TERMINAL_STATES)

# Places in the scheduler's backlog (``ExplainReply.where``) where a job waits for
# something other than its turn: a start time, an earlier group member, a concurrency key,
# a node that fits, room on its candidates.
WAITING_PLACES: frozenset[str] = frozenset({"timer", "group", "key", "parked", "room", "deps", "expand"})
# ``where`` of a job that sits in the ready structures; the explanation tells whether it
# only waits for its turn ("queued: ...") or for a queue gate (rate limit, in-flight cap).
READY_PLACE = "ready"
_TURN_PREFIX = "queued"

# The pre-running states share one rank: the scheduler may move a job between them in any
# direction within an attempt (a release the binder refuses goes back to waiting). A job
# that is retrying waits for the backoff of its next attempt: it ranks with them.
_RANKS = {"queued": 0, "waiting": 0, "ready": 0, "retrying": 0, "bound": 1, "running": 2}
# States in which an attempt holds a node, whose record then carries the attempt's lease.
ON_A_NODE: frozenset[str] = frozenset({"bound", "running"})
TERMINAL_RANK = 3


@dataclass(frozen=True)
class Seen:
    """A job's state as a person should see it.

    Attributes:
        state: one of ``JOB_STATES``.
        reason: why it is in that state ("" when there is nothing to say).
        attempt: the attempt the state belongs to (0 before the first release).
        node_id: the node of the attempt, "" when none or while the job is held.
        exit_code: the attempt's exit code, when it has one.
        final: the job has ended for good (the tracker's ``final``).
    """

    state: str
    reason: str = ""
    attempt: int = 0
    node_id: str = ""
    exit_code: int | None = None
    final: bool = False


@dataclass(frozen=True)
class Progress:
    """What a running attempt last reported about itself, from its node's lease.

    Attributes:
        attempt: the attempt that reported it.
        node_id: the node that runs it.
        fraction: how much is done, 0 to 1; None when the job never said.
        message: the words that came with the fraction.
        checkpoint: the last checkpoint (a retry starts from it).
    """

    attempt: int
    node_id: str
    fraction: float | None = None
    message: str = ""
    checkpoint: str = ""


def is_terminal(state: str) -> bool:
    """Whether ``state`` ends an attempt (not necessarily the job: see :func:`is_final`).

    Args:
        state: a job state.

    Returns:
        True for succeeded, failed, expired, lost and cancelled.
    """
    return state in TERMINAL


def is_final(seen: Seen) -> bool:
    """Whether the job has ended for good: nothing about it changes any more.

    Only the tracker's ``final`` says so. A failed or lost attempt is not the end while
    the scheduler may still retry it.

    Args:
        seen: the job's state as resolved.

    Returns:
        True once the job is final.
    """
    return seen.final


def progress_in(record: NodeInfo, job_id: str, attempt: int) -> Progress | None:
    """The progress of one attempt in its node's record (the lease of that attempt).

    Args:
        record: the node's record from ``jm_nodes``.
        job_id: the job.
        attempt: the attempt; a lease of another attempt of the same job is not its own.

    Returns:
        The attempt's progress, None when the record holds no lease of it.
    """
    for lease in record.attempts:
        if lease.job_id == job_id and lease.attempt == attempt:
            return Progress(attempt, record.node_id, lease.progress, lease.message, lease.checkpoint)
    return None


def rank(state: str) -> int:
    """How far along its attempt a job in ``state`` is.

    Args:
        state: a job state; one this version does not know ranks with the pre-running
            states, so it never hides another.

    Returns:
        0 for queued, waiting and ready; 1 bound; 2 running; 3 any terminal state.
    """
    return TERMINAL_RANK if state in TERMINAL else _RANKS.get(state, 0)


def needs_explaining(state: str) -> bool:
    """Whether only the scheduler can tell what a job the tracker shows in ``state`` waits for.

    Args:
        state: the tracker's state of the job.

    Returns:
        True for the pre-running states.
    """
    return state in PRE_RUNNING


def resolve(state: str, reason: str, explained: ExplainReply | None) -> tuple[str, str]:
    """The state and reason a person sees, from the tracker's and the scheduler's views.

    Args:
        state: the state the tracker recorded.
        reason: the reason the tracker recorded.
        explained: the scheduler's answer for the job; None when none was asked for or no
            scheduler answered.

    Returns:
        ``(state, reason)``: "waiting" with the scheduler's reason for a job held in its
        backlog, "queued" for one that only waits for its turn, otherwise what the tracker
        recorded (with the scheduler's words when it has some).
    """
    if explained is None or not _held(state, explained):
        return state, reason
    if explained.where == READY_PLACE:
        if explained.reason.startswith(_TURN_PREFIX):
            return "queued", ""
        return "waiting", explained.reason  # a queue gate: rate limit or in-flight cap
    # Without words of the scheduler's, the tracker's reason (the binder's refusal) stands.
    if explained.where in WAITING_PLACES:
        return "waiting", explained.reason or reason
    return state, explained.reason or reason  # released to the binder, or a place this version does not know


def _held(state: str, explained: ExplainReply) -> bool:
    # The scheduler's word counts only for a job it still holds (``where`` is "" once the
    # job has left its backlog) and that the tracker has not yet seen bound.
    return bool(explained.where) and needs_explaining(state)


def exit_code_of(view: JobView) -> int | None:
    """The exit code of the job's latest attempt, if it has one.

    Args:
        view: the tracker's view of the job.

    Returns:
        The exit code, or None.
    """
    return view.attempts[-1].exit_code if view.attempts else None


def seen_in_view(view: JobView, explained: ExplainReply | None) -> Seen:
    """What a person should see for a job the tracker describes as ``view``.

    Args:
        view: the tracker's view of the job.
        explained: the scheduler's explanation, when one was asked for.

    Returns:
        The resolved state; a job the scheduler holds shows no node and no exit code.
    """
    state, reason = resolve(view.state, view.reason, explained)
    if explained is not None and _held(view.state, explained):
        return Seen(state, reason, view.attempt, final=view.final)
    return Seen(state, reason, view.attempt, view.node_id, exit_code_of(view), view.final)


def seen_in_summary(job: JobSummary, explained: ExplainReply | None) -> Seen:
    """What a person should see for a row of the tracker's job list.

    Args:
        job: one row of ``JobListReply``.
        explained: the scheduler's explanation, when one was asked for.

    Returns:
        The resolved state (a summary carries no reason of the tracker's own).
    """
    state, reason = resolve(job.state, "", explained)
    return Seen(state, reason, job.attempt, job.node_id, job.exit_code, job.final)


def seen_in_update(update: JobUpdate) -> Seen:
    """What a person should see for a change the tracker announced on the watch subject.

    Args:
        update: one ``JobUpdate``.

    Returns:
        The state as announced.
    """
    return Seen(update.state, update.reason, update.attempt, update.node_id, update.exit_code, update.final)


def goes_back(shown: Seen | None, candidate: Seen) -> bool:
    """Whether showing ``candidate`` after ``shown`` would move the job backwards.

    Facts arrive from a watch stream and from polls that can race it, so a poll may bring
    an older state. A later attempt always moves forward; within one attempt a state of a
    lower rank than the one shown is stale (for example ready after bound), and so is a
    state that is not final after the same one was shown final.

    Args:
        shown: the furthest state shown so far, None when nothing was shown.
        candidate: the state that has just been learnt.

    Returns:
        True when ``candidate`` must not be shown.
    """
    if shown is None:
        return False
    return (candidate.attempt, rank(candidate.state), candidate.final) < (
        shown.attempt,
        rank(shown.state),
        shown.final,
    )
