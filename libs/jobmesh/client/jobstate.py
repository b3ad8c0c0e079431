"""What a job's state means to a person, apart from how it is printed.

The tracker records what happened to a job; only the scheduler knows why a job that has not
started yet is held. The tracker stores a held job as queued (attempt 0, before its first
release) or ready (after a release that went back to the backlog), so the state a person
should see comes from both: :func:`resolve` combines a tracker state with the scheduler's
explanation (``ExplainReply``). Everything here is pure; the commands fetch the facts.

States also have a rank, so a display that gathers them from several sources (a watch
stream, polls of the tracker and the scheduler) never shows a job going backwards:
:func:`goes_back`.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from jobmesh.contract.messages.v1 import TERMINAL_STATES, ExplainReply, JobState, JobSummary, JobUpdate, JobView

# Every state the tracker may report, in lifecycle order (the ``JobState`` literal).
JOB_STATES: tuple[str, ...] = typing.get_args(JobState)
# States of a job that has not been bound to a node: the scheduler may hold it and say why.
PRE_RUNNING: tuple[str, ...] = ("queued", "waiting", "ready")
TERMINAL: frozenset[str] = frozenset(TERMINAL_STATES)

# Places in the scheduler's backlog (``ExplainReply.where``) where a job waits for
# something other than its turn: a start time, an earlier group member, a concurrency key,
# a node that fits, room on its candidates.
WAITING_PLACES: frozenset[str] = frozenset({"timer", "group", "key", "parked", "room"})
# ``where`` of a job that sits in the ready structures; the explanation tells whether it
# only waits for its turn ("queued: ...") or for a queue gate (rate limit, in-flight cap).
READY_PLACE = "ready"
_TURN_PREFIX = "queued"

# The pre-running states share one rank: the scheduler may move a job between them in any
# direction within an attempt (a release the binder refuses goes back to waiting).
_RANKS = {"queued": 0, "waiting": 0, "ready": 0, "bound": 1, "running": 2}
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
    """

    state: str
    reason: str = ""
    attempt: int = 0
    node_id: str = ""
    exit_code: int | None = None


def is_terminal(state: str) -> bool:
    """Whether ``state`` is final: the job will not change any more.

    Args:
        state: a job state.

    Returns:
        True for succeeded, failed, expired and lost.
    """
    return state in TERMINAL


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
    if explained.where in WAITING_PLACES:
        return "waiting", explained.reason
    return state, explained.reason  # released to the binder, or a place this version does not know


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
        return Seen(state, reason, view.attempt)
    return Seen(state, reason, view.attempt, view.node_id, exit_code_of(view))


def seen_in_summary(job: JobSummary, explained: ExplainReply | None) -> Seen:
    """What a person should see for a row of the tracker's job list.

    Args:
        job: one row of ``JobListReply``.
        explained: the scheduler's explanation, when one was asked for.

    Returns:
        The resolved state (a summary carries no reason of the tracker's own).
    """
    state, reason = resolve(job.state, "", explained)
    return Seen(state, reason, job.attempt, job.node_id, job.exit_code)


def seen_in_update(update: JobUpdate) -> Seen:
    """What a person should see for a change the tracker announced on the watch subject.

    Args:
        update: one ``JobUpdate``.

    Returns:
        The state as announced.
    """
    return Seen(update.state, update.reason, update.attempt, update.node_id, update.exit_code)


def goes_back(shown: Seen | None, candidate: Seen) -> bool:
    """Whether showing ``candidate`` after ``shown`` would move the job backwards.

    Facts arrive from a watch stream and from polls that can race it, so a poll may bring
    an older state. A later attempt always moves forward; within one attempt a state of a
    lower rank than the one shown is stale (for example ready after bound).

    Args:
        shown: the furthest state shown so far, None when nothing was shown.
        candidate: the state that has just been learnt.

    Returns:
        True when ``candidate`` must not be shown.
    """
    if shown is None:
        return False
    return (candidate.attempt, rank(candidate.state)) < (shown.attempt, rank(shown.state))
