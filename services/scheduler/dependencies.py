"""What a dependency's end means for the job waiting for it. Pure: no I/O.

A job ends in one of four ways (``succeeded``, ``failed`` = gave up, ``cancelled``,
``expired``). A dependency's condition (``JobSpec.after[].when``) says which let the
waiting job run: ``succeeded`` only success (Slurm's afterok), ``failed`` a failure or an
expiry (afternotok: an on-failure step), ``ended`` any end (afterany). A dependency that
ends any other way can never be met, so the waiting job is skipped: it ends cancelled,
with ``skipped`` set, and its own waiters hear of that in turn.
"""

from __future__ import annotations

_MEETS: dict[str, frozenset[str]] = {
    "succeeded": frozenset({"succeeded"}),
    "failed": frozenset({"failed", "expired"}),
    "ended": frozenset({"succeeded", "failed", "cancelled", "expired"}),
}
_WORDS = {
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "was cancelled or skipped",
    "expired": "expired",
}
MAX_NAMED = 5  # waiting reasons name this many dependencies, then count the rest


def satisfied(when: str, outcome: str) -> bool:
    """Whether a dependency with condition ``when`` is met by an end with ``outcome``."""
    return outcome in _MEETS.get(when, _MEETS["succeeded"])


def skip_reason(label: str, when: str, outcome: str) -> str:
    """Why a job is skipped: its dependency ``label`` ended as ``when`` does not allow."""
    wanted = {"succeeded": "success", "failed": "a failure", "ended": "an end"}.get(when, when)
    return f"skipped: {label} {_WORDS.get(outcome, outcome)}, and it runs only after {wanted}"


def waiting_reason(deps: dict[str, tuple[str, str]]) -> str:
    """``waiting for: extract, transform`` (by step name where there is one)."""
    labels = sorted(label for _when, label in deps.values())
    shown = ", ".join(labels[:MAX_NAMED])
    more = len(labels) - MAX_NAMED
    return f"waiting for: {shown}" + (f" and {more} more" if more > 0 else "")
