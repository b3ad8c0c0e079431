"""What follows a failed or lost attempt: retry (when, and avoiding which nodes) or give up.

A pure function of the job's retry policy, the attempt that ended, the attempts before it
and the clock, so that the decision is tested without a cluster and a replayed batch
decides the same thing again.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobmesh.contract.messages.v1 import DISRUPTION_CODES, MAX_DISRUPTIONS, AttemptError, RetryPolicy, Timeouts
from jobmesh.runtime.backoff import backoff

PREEMPTED = "preempted"  # a disruption without a cap (see decide)


@dataclass(frozen=True, slots=True)
class Retry:
    """Run the job again as ``next_attempt`` once ``not_before`` has passed."""

    next_attempt: int
    delay: float
    not_before: float
    avoid: frozenset[str]  # nodes
    avoid_zones: frozenset[str]


@dataclass(frozen=True, slots=True)
class GiveUp:
    """The job ends failed; ``reason`` says why it is not retried."""

    reason: str


def decide(
    *,
    job_id: str,
    policy: RetryPolicy,
    timeouts: Timeouts,
    ended: AttemptError,
    earlier: list[AttemptError],
    zone_of: dict[str, str],
    submitted_at: float,
    now: float,
) -> Retry | GiveUp:
    """Decide what follows the attempt that ended with ``ended``.

    Args:
        job_id: the job (the backoff's jitter derives from it).
        policy: the job's retry policy.
        timeouts: the job's timeouts (``total`` bounds every retry).
        ended: the attempt that just failed or was lost, with its error code.
        earlier: how the job's earlier attempts ended, oldest first.
        zone_of: the zone of each node that ran an attempt (for ``migrate_zone``).
        submitted_at: when the job was submitted.
        now: the current time.

    Returns:
        ``Retry`` or ``GiveUp``.
    """
    code = ended.error.code
    history = [*earlier, ended]
    disruptions = sum(1 for a in history if a.error.code in DISRUPTION_CODES)
    counted = len(history) - disruptions  # attempts that count toward max_attempts
    if code in DISRUPTION_CODES:
        # Drains are capped (a node that keeps handing a job back is a reason to stop);
        # preemptions are not: a low-priority job on a busy cluster may be stopped many
        # times, and giving up on it would turn priority into failure. ``total`` bounds it.
        drained = disruptions - sum(1 for a in history if a.error.code == PREEMPTED)
        if code != PREEMPTED and drained > MAX_DISRUPTIONS:
            return GiveUp(f"handed back {drained} times ({code}); the job is not retried any more")
    elif not policy.retries(code):
        return GiveUp(f"failure code {code} is not retried by the job's policy")
    elif counted >= policy.max_attempts:
        return GiveUp(
            f"all {policy.max_attempts} attempts failed" if policy.max_attempts > 1 else "no retries asked for"
        )
    # A disruption is retried at once: the job did nothing wrong.
    delay = 0.0 if code in DISRUPTION_CODES else _delay(job_id, policy, counted)
    not_before = now + delay
    if timeouts.total and not_before >= submitted_at + timeouts.total:
        return GiveUp(f"the total timeout of {timeouts.total:g}s leaves no time for another attempt")
    avoid, zones = _avoided(policy, history, zone_of)
    return Retry(len(history) + 1, delay, not_before, avoid, zones)


def _delay(job_id: str, policy: RetryPolicy, failures: int) -> float:
    return backoff(failures, base=policy.backoff, cap=policy.backoff_max, spread=policy.jitter, key=job_id)


def _avoided(
    policy: RetryPolicy, history: list[AttemptError], zone_of: dict[str, str]
) -> tuple[frozenset[str], frozenset[str]]:
    """The nodes (and zones) with ``migrate_after`` failures of this job or more."""
    if not policy.migrate_after:
        return frozenset(), frozenset()
    failures: dict[str, int] = {}
    for attempt in history:
        if attempt.node_id and attempt.error.code not in DISRUPTION_CODES:
            failures[attempt.node_id] = failures.get(attempt.node_id, 0) + 1
    nodes = frozenset(n for n, count in failures.items() if count >= policy.migrate_after)
    zones = frozenset(zone_of[n] for n in nodes if zone_of.get(n)) if policy.migrate_zone else frozenset()
    return nodes, zones
