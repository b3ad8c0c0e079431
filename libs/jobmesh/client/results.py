"""A job's result: which attempt holds it, and where it is (inline or in ``jm_results``).

A process job writes its result to the file ``$JOBMESH_RESULT_PATH``. After the attempt
succeeded, a small UTF-8 result travels inline in the tracker's view
(``AttemptView.result``); a bigger one is stored in the object store bucket ``jm_results``
under ``result_key(job, attempt)`` and the view names it (``result_ref``). Choosing the
attempt is pure (:func:`result_attempt`); the client fetches the bytes.
"""

from __future__ import annotations

import msgspec

from jobmesh.contract.messages.v1 import AttemptView, JobView
from jobmesh.errors import NotFound

__all__ = ["JobResult", "has_result", "result_attempt"]


class JobResult(msgspec.Struct, frozen=True, kw_only=True):
    """The result of one attempt.

    Attributes:
        job_id: the job.
        attempt: the attempt that wrote it.
        data: the result's bytes.
        ref: its object in ``jm_results``; "" when it travelled inline.
    """

    job_id: str
    attempt: int
    data: bytes
    ref: str = ""


def has_result(attempt: AttemptView) -> bool:
    """Whether an attempt left a result (inline or stored).

    Args:
        attempt: one attempt of a view.

    Returns:
        True when it has inline text or an object reference.
    """
    return bool(attempt.result or attempt.result_ref)


def result_attempt(view: JobView, attempt: int | None = None) -> AttemptView:
    """The attempt whose result ``jobmesh result`` shows.

    Args:
        view: the tracker's view of the job.
        attempt: the attempt asked for; None for the one that succeeded (only a
            successful attempt's result is kept).

    Returns:
        The attempt, which has a result.

    Raises:
        NotFound: when there is no such attempt or it has no result; the message says why
            (not succeeded yet, or it wrote no result file).
    """
    if attempt is not None:
        chosen = next((a for a in view.attempts if a.attempt == attempt), None)
        if chosen is None:
            numbers = ", ".join(str(a.attempt) for a in view.attempts) or "none yet"
            raise NotFound(f"job {view.job_id} has no attempt {attempt} (its attempts: {numbers})", field="attempt")
        if not has_result(chosen):
            raise NotFound(f"attempt {attempt} of job {view.job_id} has no result ({_why_none(chosen)})")
        return chosen
    with_result = [a for a in view.attempts if has_result(a)]
    if with_result:
        return max(with_result, key=lambda a: a.attempt)
    succeeded = [a for a in view.attempts if a.state == "succeeded"]
    if succeeded:
        raise NotFound(f"job {view.job_id} has no result ({_why_none(succeeded[-1])})")
    ended = "it ended" if view.final else "it has not succeeded yet; it is"
    raise NotFound(f"job {view.job_id} has no result: {ended} {view.state}")


def _why_none(attempt: AttemptView) -> str:
    if attempt.state == "succeeded":
        return "it succeeded without writing a result file to $JOBMESH_RESULT_PATH"
    return f"only a successful attempt keeps one; this one is {attempt.state}"
