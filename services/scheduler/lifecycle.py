"""The messages a scheduler publishes about the life of a job after its release.

Retries, give-ups (with the fallback job they submit), cancellations, expiries, declared
losses and the stop of a lost attempt on its node:
each function builds the message, its subject and its deterministic Nats-Msg-Id, so the
partition scheduler only decides *which* to send. Pure: no I/O, the clock passed in.
"""

from __future__ import annotations

import msgspec

from jobmesh.contract import subjects
from jobmesh.contract.ids import event_id, job_id_for, submit_id
from jobmesh.contract.messages.v1 import (
    AttemptCancel,
    AttemptError,
    JobCancelled,
    JobCancelling,
    JobError,
    JobExpired,
    JobGaveUp,
    JobLost,
    JobRetrying,
    JobSpec,
    JobSubmitted,
    JobSucceeded,
    MemberSucceeded,
)
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.tracing import Context
from jobmesh.scheduler.retries import Retry


def retrying(
    job_id: str, partition: int, ended: AttemptError, retry: Retry, now: float, context: Context | None
) -> Outgoing:
    """JobRetrying: ``ended`` failed, ``retry.next_attempt`` follows after the backoff."""
    message = JobRetrying(
        job_id=job_id,
        attempt=ended.attempt,
        partition=partition,
        node_id=ended.node_id,
        error=ended.error,
        next_attempt=retry.next_attempt,
        delay=retry.delay,
        not_before=retry.not_before,
        avoid=sorted(retry.avoid | retry.avoid_zones),
        at=now,
    )
    subject = subjects.job_event(partition, subjects.RETRYING)
    return Outgoing(subject, message, event_id(job_id, ended.attempt, subjects.RETRYING), context)


def fallback_submission(job_id: str, spec: JobSpec, partitions: int, now: float) -> JobSubmitted | None:
    """The JobSubmitted of the job that runs in place of ``job_id``, if its policy has one.

    Its idempotency key derives from the original job, so a replayed give-up submits the
    same fallback job once.
    """
    fallback = spec.retry.fallback
    if fallback is None:
        return None
    fields = {f: getattr(fallback, f) for f in fallback.__struct_fields__}
    # A fallback without a name of its own is named after the job it stands in for.
    fields["name"] = fallback.name or f"fallback of {spec.name or job_id}"[:256]
    fallback_spec = JobSpec(**fields)
    key = f"fallback:{job_id}"
    return JobSubmitted(
        job_id=job_id_for(key),
        partition=subjects.partition_of(fallback_spec.queue, partitions),
        spec=fallback_spec,
        idempotency_key=key,
        submitted_at=now,
        fallback_of=job_id,
    )


def gave_up(
    job_id: str,
    partition: int,
    ended: AttemptError,
    state: str,
    reason: str,
    errors: list[AttemptError],
    fallback: JobSubmitted | None,
    now: float,
    context: Context | None,
    *,
    spec: JobSpec,
) -> list[Outgoing]:
    """JobGaveUp for the job's last attempt, and the fallback job's JobSubmitted if any.

    ``spec`` is the job's: its queue, name and metadata go on the JobGaveUp, so a
    completion rule can filter on them without looking the spec up.
    """
    message = JobGaveUp(
        job_id=job_id,
        attempt=ended.attempt,
        partition=partition,
        state="lost" if state == "lost" else "failed",
        node_id=ended.node_id,
        error=ended.error,
        reason=reason,
        errors=errors,
        fallback_job_id=fallback.job_id if fallback is not None else "",
        at=now,
        queue=spec.queue,
        name=spec.name,
        metadata=spec.metadata,
    )
    out = [
        Outgoing(
            subjects.job_event(partition, subjects.GAVE_UP),
            message,
            event_id(job_id, ended.attempt, subjects.GAVE_UP),
            context,
        )
    ]
    if fallback is not None:
        out.append(
            Outgoing(
                subjects.job_event(fallback.partition, subjects.SUBMITTED),
                fallback,
                submit_id(fallback.idempotency_key),
                context,
            )
        )
    return out


def cancelled(
    job_id: str,
    partition: int,
    attempt: int,
    reason: str,
    node_id: str,
    now: float,
    context: Context | None,
    *,
    spec: JobSpec,
    skipped: bool = False,
) -> Outgoing:
    """JobCancelled: the job ended cancelled (attempt 0 when none was ever released), or
    was ``skipped`` (a dependency ended as it does not run after).

    ``spec`` is the job's: its queue, name and metadata go on the event (see
    :func:`gave_up`).
    """
    message = JobCancelled(
        job_id=job_id,
        partition=partition,
        attempt=attempt,
        reason=reason,
        node_id=node_id,
        at=now,
        queue=spec.queue,
        name=spec.name,
        metadata=spec.metadata,
        skipped=skipped,
    )
    subject = subjects.job_event(partition, subjects.CANCELLED)
    return Outgoing(subject, message, event_id(job_id, attempt, subjects.CANCELLED), context)


def expired(
    job_id: str, partition: int, attempt: int, reason: str, now: float, context: Context | None, *, spec: JobSpec
) -> Outgoing:
    """JobExpired: ``attempt`` never started before the job's queue timeout.

    ``spec`` is the job's: its queue, name and metadata go on the event (see
    :func:`gave_up`).
    """
    message = JobExpired(
        job_id=job_id,
        attempt=attempt,
        partition=partition,
        reason=reason,
        at=now,
        queue=spec.queue,
        name=spec.name,
        metadata=spec.metadata,
    )
    subject = subjects.job_event(partition, subjects.EXPIRED)
    return Outgoing(subject, message, event_id(job_id, attempt, subjects.EXPIRED), context)


def cancelling(job_id: str, partition: int, attempt: int, reason: str, now: float, context: Context | None) -> Outgoing:
    """JobCancelling: the binder forwards it to the node running ``attempt``."""
    message = JobCancelling(job_id=job_id, partition=partition, attempt=attempt, reason=reason, at=now)
    subject = subjects.job_event(partition, subjects.CANCELLING)
    return Outgoing(subject, message, event_id(job_id, attempt, subjects.CANCELLING), context)


# Appended to the ids of the scheduler's JobLost and stop for a gang's attempt: its members'
# executors report their own losses under the member ids (rank 0's is the plain one).
GANG_SUFFIX = ":scheduler"


def lost(
    job_id: str,
    partition: int,
    attempt: int,
    node_id: str,
    reason: str,
    now: float,
    context: Context | None,
    world_size: int = 1,
) -> tuple[Outgoing, JobLost]:
    """JobLost declared by the scheduler (a lease that ran out), and the event itself."""
    message = JobLost(
        job_id=job_id,
        attempt=attempt,
        partition=partition,
        node_id=node_id,
        at=now,
        reason=reason,
        world_size=world_size,
    )
    subject = subjects.job_event(partition, subjects.LOST)
    msg_id = event_id(job_id, attempt, subjects.LOST) + (GANG_SUFFIX if world_size > 1 else "")
    return Outgoing(subject, message, msg_id, context), message


def superseded(
    job_id: str, partition: int, attempt: int, node_id: str, now: float, context: Context | None, gang: bool = False
) -> Outgoing:
    """AttemptCancel (reason ``superseded``) for a lost attempt, on its node's cancel subject:
    a node that comes back from a stop or a partition stops it at once."""
    message = AttemptCancel(
        job_id=job_id,
        attempt=attempt,
        partition=partition,
        node_id=node_id,
        reason="superseded: the scheduler declared this attempt lost",
        at=now,
    )
    msg_id = event_id(job_id, attempt, "cancel") + (GANG_SUFFIX if gang else "")
    return Outgoing(subjects.node_cancel(node_id), message, msg_id, context)


def succeeded(
    job_id: str,
    attempt: int,
    partition: int,
    spec: JobSpec,
    *,
    node_id: str,
    output_tail: str,
    submitted_at: float,
    started_at: float,
    at: float,
    result: str,
    result_ref: str,
    result_bytes: int,
    context: Context | None,
) -> tuple[Outgoing, JobSucceeded]:
    """JobSucceeded published by the scheduler itself (the partition form): an attempt it
    ends without one executor's success, a mapped step's or a whole gang's. It carries the
    job's queue, name and metadata, which completion rules filter on."""
    message = JobSucceeded(
        job_id=job_id,
        attempt=attempt,
        partition=partition,
        node_id=node_id,
        exit_code=0,
        output_tail=output_tail,
        submitted_at=submitted_at,
        started_at=started_at,
        at=at,
        result=result,
        result_ref=result_ref,
        result_bytes=result_bytes,
        queue=spec.queue,
        name=spec.name,
        metadata=spec.metadata,
    )
    subject = subjects.job_event(partition, subjects.SUCCEEDED)
    return Outgoing(subject, message, event_id(job_id, attempt, subjects.SUCCEEDED), context), message


def gang_succeeded(
    partition: int,
    lead: MemberSucceeded,
    last: MemberSucceeded,
    submitted_at: float,
    spec: JobSpec,
    context: Context | None,
) -> tuple[Outgoing, JobSucceeded]:
    """The one JobSucceeded of a gang's attempt, once every member has succeeded: rank 0's
    node, output and result (``lead``), ended when the last member did (``last``)."""
    return succeeded(
        lead.job_id,
        lead.attempt,
        partition,
        spec,
        node_id=lead.node_id,
        output_tail=lead.output_tail,
        submitted_at=submitted_at,
        started_at=lead.started_at,
        at=max(lead.at, last.at),
        result=lead.result,
        result_ref=lead.result_ref,
        result_bytes=lead.result_bytes,
        context=context,
    )


def attempt_error(event: msgspec.Struct, attempt: int, node_id: str, at: float) -> AttemptError:
    """How an attempt ended, from its JobFailed or JobLost."""
    error = getattr(event, "error", None)
    if not isinstance(error, JobError):
        reason = getattr(event, "reason", "") or "the attempt was lost"
        error = JobError(code="lost", message=reason)
    return AttemptError(attempt=attempt, node_id=node_id, error=error, at=at)
