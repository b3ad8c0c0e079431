"""A job's attempts as a timeline: what ran where, how each attempt ended, what came next.

``jobmesh status`` shows it, with the members of a gang's attempt under it. Everything here
is pure: it reads a ``JobView`` (attempts and recorded events) and returns plain data for
the print code.

How the attempts hang together comes from the events: a ``retrying`` event says that the
scheduler will run the job again after a backoff (its detail gives the delay), a
``gave_up`` event that it will not, ``cancelling`` and ``cancelled`` that somebody stopped
it. The tracker files a retry under the attempt that ended (its detail names the next one
and the delay), so each attempt's events say what followed it.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobmesh.client.jobstate import PRE_RUNNING
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import AttemptView, EventView, JobView, MemberView


@dataclass(frozen=True)
class Step:
    """One attempt in the timeline.

    Attributes:
        attempt: its number (from 1).
        state: how it stands or ended.
        node_id: the node it was bound to ("" when none).
        started_at: when its process started, None if it never did.
        finished_at: when it ended, None while it has not.
        exit_code: the process's exit code, when it has one.
        error: ``code: message`` of its failure, "" when none.
        reason: why it is in its state (a lost attempt's reason, a cancel's reason).
        result: where its result is (``12 bytes inline``, ``3000000 bytes in jm_results``).
        retry: the detail of the retry that followed it ("" when none did).
        waited: seconds from the retry decision to the release of the next attempt (the
            backoff as it was served), None when unknown.
        notes: ``kind: detail`` of the other events that ended or stopped it (gave up,
            cancelling, cancelled), in order.
        members: a gang's members, by rank, each with how far it got; empty for a plain
            job.
    """

    attempt: int
    state: str
    node_id: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    error: str = ""
    reason: str = ""
    result: str = ""
    retry: str = ""
    waited: float | None = None
    notes: tuple[str, ...] = ()
    members: tuple[MemberView, ...] = ()

    @property
    def ran_for(self) -> float | None:
        """Seconds from start to end, None unless it both started and ended."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)


# Events that stop or end an attempt and are worth a line of their own under it.
_NOTED = (subjects.GAVE_UP, subjects.CANCELLING, subjects.CANCELLED)


def result_text(attempt: AttemptView) -> str:
    """Where an attempt's result is, as a person reads it.

    Args:
        attempt: one attempt of the view.

    Returns:
        ``N bytes inline``, ``N bytes in jm_results``, or "" when it has none.
    """
    if attempt.result_ref:
        return f"{attempt.result_bytes} bytes in {subjects.OBJ_RESULTS}"
    if attempt.result or attempt.result_bytes:
        return f"{attempt.result_bytes or len(attempt.result.encode())} bytes inline"
    return ""


def timeline(view: JobView) -> list[Step]:
    """The attempts of a job, in number order, each with what followed it.

    Args:
        view: the tracker's view, with its attempts and events.

    Returns:
        One step per attempt the tracker recorded.
    """
    attempts = sorted(view.attempts, key=lambda a: a.attempt)
    events = sorted(view.events, key=lambda e: e.at)
    retries = {e.attempt: e for e in events if e.kind == subjects.RETRYING}
    steps = []
    for i, a in enumerate(attempts):
        retry = retries.get(a.attempt)
        following = attempts[i + 1].attempt if i + 1 < len(attempts) else None
        notes = tuple(_note(e) for e in events if e.kind in _NOTED and e.attempt == a.attempt)
        steps.append(
            Step(
                attempt=a.attempt,
                # A preempted attempt did not fail: it was stopped for a higher-priority
                # job and does not count toward the job's attempts.
                state="preempted" if a.state == "failed" and a.error and a.error.code == "preempted" else a.state,
                node_id=a.node_id,
                started_at=a.started_at,
                finished_at=a.finished_at,
                exit_code=a.exit_code,
                error=f"{a.error.code}: {a.error.message}" if a.error else "",
                reason=a.reason,
                result=result_text(a),
                retry=(retry.detail or "retrying") if retry else "",
                waited=_waited(retry, following, events),
                notes=notes,
                members=tuple(sorted(a.members, key=lambda m: m.rank)),
            )
        )
    return steps


def last_refusal(view: JobView) -> EventView | None:
    """Why the binder last refused the attempt a pending job shows (a gang that needs more
    nodes than are free, say), for as long as the job waits.

    The scheduler's explanation of a job it has released again says only that; the
    refusal is still what the job waits on.

    Args:
        view: the tracker's view.

    Returns:
        The latest ``unplaceable`` event of the job's current attempt while the tracker
        shows it queued, waiting or ready; None otherwise, or when there is none.
    """
    if view.final or view.state not in PRE_RUNNING:
        return None
    refusals = [e for e in view.events if e.kind == subjects.UNPLACEABLE and e.attempt == view.attempt and e.detail]
    return max(refusals, key=lambda e: e.at) if refusals else None


def job_notes(view: JobView) -> list[str]:
    """The events about the job before any attempt was released (a cancel of a held job).

    Args:
        view: the tracker's view.

    Returns:
        ``kind: detail`` of each such event, in order.
    """
    return [_note(e) for e in sorted(view.events, key=lambda e: e.at) if e.kind in _NOTED and e.attempt == 0]


def _note(event: EventView) -> str:
    return f"{event.kind.replace('_', ' ')}: {event.detail}" if event.detail else event.kind.replace("_", " ")


def _waited(retry: EventView | None, following: int | None, events: list[EventView]) -> float | None:
    # The next attempt's first release, measured from the decision to retry.
    if retry is None or following is None:
        return None
    released = [e.at for e in events if e.kind == subjects.READY and e.attempt == following]
    return max(0.0, min(released) - retry.at) if released else None
