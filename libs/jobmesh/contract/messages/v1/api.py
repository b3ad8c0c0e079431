"""Request/reply API messages: submit (trigger), queries and watch (tracker), health."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from jobmesh.contract.messages.v1.config import PartitionStats
from jobmesh.contract.messages.v1.deadletter import ERROR_CODES
from jobmesh.contract.messages.v1.jobs import JobError, JobSpec, ParentRef, Resources
from jobmesh.contract.messages.v1.nodes import NodeInfo
from jobmesh.contract.messages.v1.triggers import JobOrigin
from jobmesh.errors import JobmeshError

__all__ = [
    "TERMINAL_STATES",
    "WAIT_PLACES",
    "AttemptView",
    "CancelReply",
    "CancelRequest",
    "ErrorReply",
    "EventView",
    "ExplainReply",
    "ExplainRequest",
    "HealthReply",
    "JobGetRequest",
    "JobListReply",
    "JobListRequest",
    "JobState",
    "JobSummary",
    "JobUpdate",
    "JobView",
    "MemberView",
    "NodeView",
    "NodesReply",
    "NodesRequest",
    "QueuesReply",
    "QueuesRequest",
    "Submission",
    "SubmitReply",
    "SubmitRequest",
]

JobState = Literal[
    "queued",
    "waiting",
    "ready",
    "bound",
    "running",
    "succeeded",
    "failed",
    "expired",
    "lost",
    "retrying",
    "cancelled",
]
# The states a job can end in. Whether it has ended is ``final`` on the views: after a
# failed or lost attempt the job shows that state until the scheduler decides (retrying,
# or gave up, which makes it final).
TERMINAL_STATES = frozenset({"succeeded", "failed", "expired", "lost", "cancelled"})
# Where a scheduler holds a job it has not released (ExplainReply.where); "" when it does not.
WAIT_PLACES = ("ready", "timer", "group", "key", "parked", "room", "released", "")


class Submission(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One job to submit; the same idempotency key always yields the same job id."""

    spec: Annotated[JobSpec, Meta(description="The job.")]
    idempotency_key: Annotated[
        str,
        Meta(max_length=256),
        Meta(
            description="The job id derives from it: the same key always names the same job. Empty: the trigger generates a random key, so sending the request twice makes two jobs."
        ),
    ] = ""
    # Set by an executor for a job a workflow step's handler submits (``ctx.submit``): the
    # steps that need that step wait for this job too.
    parent: Annotated[
        ParentRef | None,
        Meta(
            description="Set by an executor for a job a workflow step's handler submits: the steps that need that step wait for this job too. Null otherwise."
        ),
    ] = None


class SubmitRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.submit"
):
    """Submit one or more jobs; the reply comes only after every PubAck."""

    jobs: Annotated[
        list[Submission],
        Meta(min_length=1, max_length=1000),
        Meta(description="The jobs to submit (1 to 1000), each with its own idempotency key."),
    ]


class SubmitReply(Struct, frozen=True, kw_only=True, tag="api.submitted"):
    """Job ids in request order; ``duplicates[i]`` is true when job i was already known."""

    job_ids: Annotated[list[str], Meta(description="The jobs' ids, in request order.")]
    duplicates: Annotated[
        list[bool],
        Meta(
            description="duplicates[i] is true when JetStream dropped job i as a repeat of its key within the duplicate window (120 s): nothing new was made. After the window a repeat says false, yet names the same job id, and the first job stands (docs/integrations.md)."
        ),
    ]


class ErrorReply(Struct, frozen=True, kw_only=True, tag="api.error"):
    """Any API failure: a stable code, a message, and the offending field when known."""

    code: Annotated[
        str,
        Meta(
            description="A stable error code: match on it, not on the message.",
            extra_json_schema={"enum": list(ERROR_CODES)},
        ),
    ]
    message: Annotated[str, Meta(description="What went wrong, in words.")]
    field: Annotated[
        str,
        Meta(
            description="The path of the offending field in the request (jobs[0].spec.priority; a missing or unknown field itself); empty when no field is at fault (the payload is not JSON, or too large)."
        ),
    ] = ""
    retryable: Annotated[
        bool,
        Meta(
            description="True when the same request may succeed later (the service is overloaded or unavailable); false: fix the request."
        ),
    ] = False

    @classmethod
    def of(cls, error: JobmeshError) -> ErrorReply:
        """The reply that carries ``error`` (its code, message, field and retryable flag)."""
        return cls(code=error.code, message=str(error), field=error.field or "", retryable=error.retryable)

    def error(self) -> JobmeshError:
        """The error this reply describes, as the class that owns its code."""
        return JobmeshError.from_wire(self.code, self.message, self.field, self.retryable)


class JobGetRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.jobs.get"
):
    """Ask the tracker for one job with its attempts and events."""

    job_id: Annotated[str, Meta(description="The job to read.")]


class JobListRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.jobs.list"
):
    """Ask the tracker for recent jobs, newest first."""

    limit: Annotated[int, Meta(ge=1, le=5_000), Meta(description="At most this many jobs (1 to 5000, default 50).")] = (
        50
    )
    state: Annotated[JobState | Literal[""], Meta(description="Only jobs in this state; empty: every state.")] = ""
    queue: Annotated[str, Meta(description="Only jobs of this queue; empty: every queue.")] = ""
    states: Annotated[
        list[JobState],
        Meta(description="Only jobs in any of these states; wins over state when given; empty: see state."),
    ] = []
    workflow: Annotated[
        str, Meta(description="Only the jobs of this workflow run, in submission order; empty: every job.")
    ] = ""
    # With ``workflow``: skip this many (a large run is read in pages, as one reply of
    # 20,000 rows would not fit in a message).
    offset: Annotated[
        int,
        Meta(ge=0),
        Meta(description="With workflow: skip this many (a large run is read in pages); 0: from the first."),
    ] = 0


class MemberView(Struct, frozen=True, kw_only=True):
    """One member of a gang's attempt, as its events say."""

    rank: Annotated[int, Meta(description="The member's rank, from 0.")]
    node_id: Annotated[str, Meta(description="The node it was bound to.")]
    state: Annotated[str, Meta(description="How far it got: bound, running, succeeded, failed or lost.")]
    at: Annotated[float, Meta(description="When it got there. Unix time, in seconds.")]
    detail: Annotated[str, Meta(description="Why it failed, in words; empty otherwise.")] = ""


class AttemptView(Struct, frozen=True, kw_only=True):
    """One attempt as recorded by the tracker."""

    attempt: Annotated[int, Meta(description="The attempt number, from 1.")]
    state: Annotated[JobState, Meta(description="How far the attempt got (a JobState).")]
    node_id: Annotated[str, Meta(description="The node it ran on; empty when it was never bound.")] = ""
    exit_code: Annotated[
        int | None,
        Meta(description="The process's exit code; null when it did not exit by itself (killed, never started)."),
    ] = None
    error: Annotated[JobError | None, Meta(description="Why it failed; null when it did not fail.")] = None
    output_tail: Annotated[
        str, Meta(description="The last lines of its output; empty when it printed nothing or has not ended.")
    ] = ""
    started_at: Annotated[
        float | None, Meta(description="When it started. Unix time, in seconds; null when it never started.")
    ] = None
    finished_at: Annotated[
        float | None,
        Meta(description="When it ended. Unix time, in seconds; null while it runs or when it never started."),
    ] = None
    reason: Annotated[
        str, Meta(description="Why it ended as it did, in words; empty when there is nothing to say.")
    ] = ""
    result: Annotated[
        str,
        Meta(
            description="The job's result when it was small UTF-8 text and travelled inline; empty otherwise (see result_ref)."
        ),
    ] = ""
    result_ref: Annotated[
        str,
        Meta(
            description="The result's object name in the jm_results bucket when it did not travel inline; empty when there is none or it is inline."
        ),
    ] = ""
    result_bytes: Annotated[int, Meta(description="The result's size, in bytes; 0 when there is none.")] = 0
    members: Annotated[
        list[MemberView], Meta(description="A gang's members that were bound, by rank; empty for a plain job.")
    ] = []


class EventView(Struct, frozen=True, kw_only=True):
    """One recorded lifecycle event."""

    kind: Annotated[str, Meta(description="The event's kind (submitted, ready, bound, started, succeeded, ...).")]
    attempt: Annotated[int, Meta(description="The attempt it is about; 0 for an event about the job.")]
    at: Annotated[float, Meta(description="When it happened. Unix time, in seconds.")]
    detail: Annotated[str, Meta(description="What it said, in words; empty when nothing.")] = ""


class JobView(Struct, frozen=True, kw_only=True, tag="api.job"):
    """Everything the tracker knows about one job."""

    job_id: Annotated[
        str,
        Meta(
            description='The job\'s id: 32 hex characters derived from its idempotency key (docs/integrations.md, "Job ids").'
        ),
    ]
    name: Annotated[str, Meta(description="The job's name (free text); empty when it has none.")]
    queue: Annotated[str, Meta(description="The job's queue; empty in an event from a version that did not send it.")]
    tenant: Annotated[
        str,
        Meta(description='The job\'s tenant (fair share between tenants); "default" when the submitter named none.'),
    ]
    state: Annotated[JobState, Meta(description="The job's current state.")]
    reason: Annotated[str, Meta(description="Why it is in that state, in words; empty when nothing to say.")]
    attempt: Annotated[int, Meta(description="Its current attempt number; 0 before the first release.")]
    node_id: Annotated[str, Meta(description="The node of its current attempt; empty when none.")]
    submitted_at: Annotated[float, Meta(description="When the job was accepted. Unix time, in seconds.")]
    updated_at: Annotated[float, Meta(description="When the record last changed. Unix time, in seconds.")]
    spec: Annotated[JobSpec, Meta(description="The job as its submitter declared it (JobSpec).")]
    attempts: Annotated[
        list[AttemptView], Meta(description="Every attempt, in order; empty before the first release.")
    ] = []
    events: Annotated[list[EventView], Meta(description="Every recorded lifecycle event, in order.")] = []
    final: Annotated[
        bool, Meta(description="True when the job has ended for good: nothing about it changes any more.")
    ] = False
    partition: Annotated[
        int, Meta(description="Its scheduler partition (where to explain or cancel it); -1 when unknown.")
    ] = -1
    fallback_job_id: Annotated[str, Meta(description="The job that ran in its place; empty when none.")] = ""
    fallback_of: Annotated[str, Meta(description="The job this one ran in place of; empty when none.")] = ""
    origin: Annotated[
        JobOrigin | None, Meta(description="The trigger rule and event that started the job; null for a plain submit.")
    ] = None


class JobSummary(Struct, frozen=True, kw_only=True):
    """One row of ``jobmesh list``."""

    job_id: Annotated[
        str,
        Meta(
            description='The job\'s id: 32 hex characters derived from its idempotency key (docs/integrations.md, "Job ids").'
        ),
    ]
    name: Annotated[str, Meta(description="The job's name (free text); empty when it has none.")]
    queue: Annotated[str, Meta(description="The job's queue; empty in an event from a version that did not send it.")]
    tenant: Annotated[
        str,
        Meta(description='The job\'s tenant (fair share between tenants); "default" when the submitter named none.'),
    ]
    state: Annotated[JobState, Meta(description="The job's current state.")]
    attempt: Annotated[int, Meta(description="Its current attempt number; 0 before the first release.")]
    node_id: Annotated[str, Meta(description="The node of its current attempt; empty when none.")]
    exit_code: Annotated[int | None, Meta(description="The exit code of its last attempt; null when none exited.")]
    submitted_at: Annotated[float, Meta(description="When the job was accepted. Unix time, in seconds.")]
    updated_at: Annotated[float, Meta(description="When the record last changed. Unix time, in seconds.")]
    final: Annotated[
        bool, Meta(description="True when the job has ended for good: nothing about it changes any more.")
    ] = False
    reason: Annotated[str, Meta(description="Why it is in its state, in words; empty when nothing to say.")] = ""
    step: Annotated[str, Meta(description="Its workflow step; empty when it is not one.")] = ""
    index: Annotated[int, Meta(description="A mapped item's position in its list; -1 otherwise.")] = -1
    skipped: Annotated[
        bool, Meta(description="True when it was cancelled because a dependency ended as it did not need.")
    ] = False


class JobListReply(Struct, frozen=True, kw_only=True, tag="api.jobs"):
    """Reply to ``JobListRequest``."""

    jobs: Annotated[
        list[JobSummary], Meta(description="The jobs, newest first (or in submission order for a workflow run).")
    ]


class JobUpdate(Struct, frozen=True, kw_only=True, tag="api.job.update"):
    """Announced on ``jobmesh.v1.watch.<job_id>`` after the tracker commits a change."""

    job_id: Annotated[
        str,
        Meta(
            description='The job\'s id: 32 hex characters derived from its idempotency key (docs/integrations.md, "Job ids").'
        ),
    ]
    state: Annotated[JobState, Meta(description="The job's state after the change.")]
    attempt: Annotated[int, Meta(description="Its current attempt number.")]
    node_id: Annotated[str, Meta(description="The node of its current attempt; empty when none.")] = ""
    exit_code: Annotated[int | None, Meta(description="The exit code, once an attempt exited; null otherwise.")] = None
    reason: Annotated[str, Meta(description="Why, in words; empty when nothing to say.")] = ""
    at: Annotated[
        float, Meta(description="When the change happened. Unix time, in seconds; 0 from older trackers.")
    ] = 0.0
    final: Annotated[
        bool, Meta(description="True when the job has ended for good: nothing about it changes any more.")
    ] = False


class HealthReply(Struct, frozen=True, kw_only=True, tag="health"):
    """Answer to a health check."""

    service: Annotated[str, Meta(description="The service that answered.")]
    instance: Annotated[str, Meta(description="The instance (replica) that answered.")]
    ok: Annotated[bool, Meta(description="True when the instance is serving; false while it drains or has lost NATS.")]
    detail: Annotated[str, Meta(description='What is wrong, or "ok"; empty from older versions.')] = ""


class ExplainRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.scheduler.explain"
):
    """Ask the owner of a job's partition why the job is not running yet."""

    job_id: Annotated[str, Meta(description="The job to explain.")]


class CancelRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.scheduler.cancel"
):
    """Ask the owner of a job's partition to cancel it (``scheduler.<p>.cancel``)."""

    job_id: Annotated[str, Meta(description="The job to cancel.")]
    reason: Annotated[
        str,
        Meta(max_length=1000),
        Meta(description="Why, recorded with the job (at most 1000 characters); empty when none."),
    ] = ""


class CancelReply(Struct, frozen=True, kw_only=True, tag="api.scheduler.cancelled"):
    """``state``: ``cancelled`` (it had not started: it ended now), ``cancelling`` (its
    attempt is being stopped; it ends cancelled within a second or so), or ``unknown``
    (this scheduler holds no such job: it has ended, or was never submitted)."""

    job_id: Annotated[str, Meta(description="The job the cancel was for.")]
    state: Annotated[
        Literal["cancelled", "cancelling", "unknown"],
        Meta(
            description="cancelled: it had not started and ended now; cancelling: its attempt is being stopped; unknown: this scheduler holds no such job."
        ),
    ]
    message: Annotated[str, Meta(description="What happened, in words.")]


class ExplainReply(Struct, frozen=True, kw_only=True, tag="api.scheduler.explained"):
    """``where``: ready, timer, group, key, parked, room, released; "" when not held."""

    job_id: Annotated[str, Meta(description="The job asked about.")]
    where: Annotated[
        str,
        Meta(
            description="Where the scheduler holds the job: ready, timer, group, key, parked, room or released; empty when it does not hold it.",
            extra_json_schema={"enum": list(WAIT_PLACES)},
        ),
    ]
    reason: Annotated[str, Meta(description="Why it is not running yet, in words.")]


class QueuesRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.queues"
):
    """Ask every scheduler for the depth of the queues in the partitions it owns."""


class QueuesReply(Struct, frozen=True, kw_only=True, tag="api.queues.reply"):
    """One scheduler's answer; ``partitions`` is the cluster's total partition count."""

    instance: Annotated[str, Meta(description="The scheduler instance that answered.")]
    partitions: Annotated[int, Meta(description="The cluster's total partition count.")]
    owned: Annotated[list[PartitionStats], Meta(description="The partitions this instance owns, with their queues.")]


class NodesRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.nodes"):
    """Ask the binder for every node with its capacity and allocation."""


class NodeView(Struct, frozen=True, kw_only=True):
    """A node as the binder sees it."""

    node: Annotated[NodeInfo, Meta(description="The node's record.")]
    alive: Annotated[bool, Meta(description="True while its record has not expired (its heartbeats arrive).")]
    allocated: Annotated[Resources, Meta(description="What is reserved on it now.")]
    reservations: Annotated[int, Meta(description="How many attempts hold reservations on it.")]


class NodesReply(Struct, frozen=True, kw_only=True, tag="api.nodes.reply"):
    """Reply to ``NodesRequest``."""

    nodes: Annotated[list[NodeView], Meta(description="Every known node.")]
