"""The channel table: who sends what, on which subject or KV key space, stored by which stream.

This is the hand-kept half of the wire contract, as data (the design brief's service table).
Everything else in it is derived: addresses come from the builders in
:mod:`jobmesh.contract.subjects` (the table passes placeholders such as ``{node_id}`` to them,
so a renamed subject follows), stream names from the same module, message types from
:mod:`jobmesh.contract.messages.v1`.

``jobmesh.dev.asyncapi`` renders the AsyncAPI document and the JSON Schemas from this table;
:mod:`jobmesh.contract.channelcheck` checks it against the stream configuration
(:mod:`jobmesh.contract.streams`) and the message types, so a renamed subject or stream, or
a new message that travels on no channel, cannot go unnoticed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from jobmesh.contract import subjects
from jobmesh.contract.messages import v1
from jobmesh.contract.subjects import SERVICES

# Anything outside the five services that talks to jobmesh: the `jobmesh` CLI, SDKs,
# `nats pub`, operators reading dead letters. AsyncAPI needs a name for the other end.
CLIENT = "client"
PARTIES = (*SERVICES, CLIENT)

# Channel parameters. Placeholders are passed to the subject builders so addresses come
# from subjects.py itself and follow it when a subject changes.
PARTITION = "{partition}"
NODE_ID = "{node_id}"
JOB_ID = "{job_id}"
SERVICE = "{service}"
EVENT = "{event}"
KEY = "{key}"

# How a parameter appears in an address: {name}.
PARAMETER_PATTERN = re.compile(r"\{([a-z_]+)\}")

# Lifecycle kinds in pipeline order (subjects.py holds them as separate constants).
JOB_KINDS = (
    subjects.SUBMITTED,
    subjects.READY,
    subjects.WAITING,
    subjects.UNPLACEABLE,
    subjects.BOUND,
    subjects.STARTED,
    subjects.SUCCEEDED,
    subjects.FAILED,
    subjects.EXPIRED,
    subjects.LOST,
    subjects.RETRYING,
    subjects.GAVE_UP,
    subjects.CANCELLING,
    subjects.CANCELLED,
    subjects.DEP_WATCH,
    subjects.DEP_ENDED,
    subjects.CHILD_ADDED,
    subjects.MEMBER_SUCCEEDED,
)

# Who reads every lifecycle kind through one filter (jobmesh.v1.job.>): the tracker records
# each in Postgres. channels() adds it to every per-kind job row, so each kind is described
# once, with its own message, and its readers are all named there.
ALL_KINDS_CONSUMERS = ("tracker",)


@dataclass(frozen=True)
class Payload:
    """A message that has no struct in ``jobmesh.contract.messages.v1`` (its body is free-form)."""

    name: str
    summary: str
    schema: Mapping[str, Any]


@dataclass(frozen=True)
class Channel:
    """One row of the channel table.

    Attributes:
        key: the AsyncAPI channel id.
        address: the subject template (from subjects.py); None for a requester's inbox.
        messages: what travels on it: v1 structs, or :class:`Payload` for free-form bodies.
        stream: the JetStream stream that stores it; None for core NATS (request/reply,
            watch); ``KV_<bucket>`` for a KV bucket.
        producers: parties that publish (or put, for KV).
        consumers: parties that subscribe, pull, answer or read.
        description: what it is for.
        reply: the key of the reply channel when this is a request subject.
        kv_bucket: the bucket name when the channel is a KV key space.
    """

    key: str
    address: str | None
    messages: tuple[Any, ...]
    stream: str | None
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    description: str
    reply: str | None = None
    kv_bucket: str | None = None


# --- free-form payloads --------------------------------------------------------------
HEALTH_REQUEST = Payload(
    "HealthRequest",
    "Any payload (the runtime ignores it); `{}` by convention.",
    {"description": "Ignored by the responder; send `{}`."},
)
EXTERNAL_EVENT = Payload(
    "ExternalEvent",
    "An external event: any JSON value, usually an object; trigger rules match its subject and fields.",
    {
        "description": "Any JSON value (usually an object) published by users or other systems; rules "
        "read it as `data`. A payload that is not JSON is dead-lettered by the trigger "
        "(code invalid_message) and fires no rule. The optional Nats-Msg-Id header is the event's "
        "identity: the same id is the same event (its jobs are not made twice), else the stream "
        "sequence is.",
    },
)


def _job(kind: str) -> str:
    return subjects.job_event(PARTITION, kind)  # a template, not a number


def _node_job(kind: str) -> str:
    # An executor's event: the node form, whose last token NATS permissions restrict.
    return subjects.node_event(PARTITION, kind, NODE_ID)


# What every node-form channel says about the subject's node token.
_NODE_FORM = (
    " The last token is the reporting node: each executor may publish only under its own node id, and a "
    "consumer dead-letters (code forged) an event whose body names another node_id, or one about an "
    "attempt it knows is bound to another node."
)
# What the partition form of an executor's kind says.
_OLDER_EXECUTORS = " Executors of earlier v1 versions published it here; consumers still read this form."


def _kv(bucket: str, key: str) -> str:
    # A KV put is a message on $KV.<bucket>.<key> stored in stream KV_<bucket> (NATS convention).
    return f"$KV.{bucket}.{key}"


TERMINAL_CONSUMERS = ("scheduler", "binder")  # who reacts to a terminal event today
# Who reacts to a job's end for good: the trigger's completion rules as well.
END_CONSUMERS = ("scheduler", "binder", "trigger")

# The table. Consumers of job.* kinds exclude the tracker: it reads them all through one
# filter (jobmesh.v1.job.>), and channels() adds it to each (ALL_KINDS_CONSUMERS).
CHANNELS: tuple[Channel, ...] = (
    # --- job lifecycle: stream JM_JOBS -------------------------------------------------
    Channel(
        "jobSubmitted",
        _job(subjects.SUBMITTED),
        (v1.JobSubmitted,),
        subjects.STREAM_JOBS,
        ("trigger",),
        ("scheduler",),
        "A job was accepted. Nats-Msg-Id is the idempotency key, so a repeated submit is a no-op.",
    ),
    Channel(
        "jobReady",
        _job(subjects.READY),
        (v1.JobReady,),
        subjects.STREAM_JOBS,
        ("scheduler",),
        ("binder",),
        "The scheduler released an attempt, with candidate nodes ranked best first.",
    ),
    Channel(
        "jobWaiting",
        _job(subjects.WAITING),
        (v1.JobWaiting,),
        subjects.STREAM_JOBS,
        ("scheduler",),
        (),
        "The scheduler holds a job back (start time, sequential group, concurrency key, no fitting "
        "node) and says why; published once per reason, so history shows every wait.",
    ),
    Channel(
        "jobUnplaceable",
        _job(subjects.UNPLACEABLE),
        (v1.JobUnplaceable,),
        subjects.STREAM_JOBS,
        ("binder",),
        ("scheduler",),
        "The binder could not reserve any candidate; the scheduler holds the job and tries later.",
    ),
    Channel(
        "jobStarted",
        _job(subjects.STARTED),
        (v1.JobStarted,),
        subjects.STREAM_JOBS,
        (),
        (),
        "The partition form of jobStartedOnNode: no service publishes it." + _OLDER_EXECUTORS,
    ),
    Channel(
        "jobStartedOnNode",
        _node_job(subjects.STARTED),
        (v1.JobStarted,),
        subjects.STREAM_JOBS,
        ("executor",),
        (),
        "The executor started an attempt." + _NODE_FORM,
    ),
    Channel(
        "jobSucceeded",
        _job(subjects.SUCCEEDED),
        (v1.JobSucceeded,),
        subjects.STREAM_JOBS,
        ("scheduler",),
        END_CONSUMERS,
        "Terminal: a mapped step's items all succeeded (the scheduler ends the step without running it; "
        "node_id is empty), or every member of a gang did (node_id is rank 0's node, the result rank 0's)."
        + _OLDER_EXECUTORS,
    ),
    Channel(
        "jobSucceededOnNode",
        _node_job(subjects.SUCCEEDED),
        (v1.JobSucceeded,),
        subjects.STREAM_JOBS,
        ("executor",),
        END_CONSUMERS,
        "Terminal: the attempt exited 0." + _NODE_FORM,
    ),
    Channel(
        "jobFailed",
        _job(subjects.FAILED),
        (v1.JobFailed,),
        subjects.STREAM_JOBS,
        (),
        TERMINAL_CONSUMERS,
        "The partition form of jobFailedOnNode: no service publishes it." + _OLDER_EXECUTORS,
    ),
    Channel(
        "jobFailedOnNode",
        _node_job(subjects.FAILED),
        (v1.JobFailed,),
        subjects.STREAM_JOBS,
        ("executor",),
        TERMINAL_CONSUMERS,
        "Terminal for the attempt: non-zero exit, timeout, disk quota, cancellation or a runtime error. "
        "The scheduler then publishes JobRetrying or JobGaveUp." + _NODE_FORM,
    ),
    Channel(
        "jobExpired",
        _job(subjects.EXPIRED),
        (v1.JobExpired,),
        subjects.STREAM_JOBS,
        ("scheduler",),
        END_CONSUMERS,
        "Terminal: the job was not started before its queue timeout.",
    ),
    Channel(
        "jobLost",
        _job(subjects.LOST),
        (v1.JobLost,),
        subjects.STREAM_JOBS,
        ("scheduler",),
        TERMINAL_CONSUMERS,
        "Terminal for the attempt: its lease was not renewed within its heartbeat timeout, or it "
        "was not started within the bind timeout (declared by the scheduler that owns the "
        "partition). The scheduler then retries or gives up; the binder frees the reservation." + _OLDER_EXECUTORS,
    ),
    Channel(
        "jobLostOnNode",
        _node_job(subjects.LOST),
        (v1.JobLost,),
        subjects.STREAM_JOBS,
        ("executor",),
        TERMINAL_CONSUMERS,
        "Terminal for the attempt: its executor restarted without it, or refused a dispatch it may "
        "have run before (declared by that executor). The scheduler then retries or gives up; the "
        "binder frees the reservation." + _NODE_FORM,
    ),
    Channel(
        "memberSucceeded",
        _job(subjects.MEMBER_SUCCEEDED),
        (v1.MemberSucceeded,),
        subjects.STREAM_JOBS,
        (),
        TERMINAL_CONSUMERS,
        "The partition form of memberSucceededOnNode: no service publishes it.",
    ),
    Channel(
        "memberSucceededOnNode",
        _node_job(subjects.MEMBER_SUCCEEDED),
        (v1.MemberSucceeded,),
        subjects.STREAM_JOBS,
        ("executor",),
        TERMINAL_CONSUMERS,
        "One member of a gang exited 0: the binder frees its node's reservation, and the scheduler "
        "ends the attempt with JobSucceeded once every member has sent this." + _NODE_FORM,
    ),
    Channel(
        "jobRetrying",
        _job(subjects.RETRYING),
        (v1.JobRetrying,),
        subjects.STREAM_JOBS,
        ("scheduler",),
        (),
        "The scheduler will run the job again after a backoff: the next attempt, the delay and the nodes it avoids.",
    ),
    Channel(
        "jobGaveUp",
        _job(subjects.GAVE_UP),
        (v1.JobGaveUp,),
        subjects.STREAM_JOBS,
        ("scheduler",),
        ("trigger",),
        "The job ended failed for good, with every attempt's error and the fallback job, if any. "
        "One of the job-end events (with succeeded, cancelled and expired).",
    ),
    Channel(
        "jobCancelling",
        _job(subjects.CANCELLING),
        (v1.JobCancelling,),
        subjects.STREAM_JOBS,
        ("scheduler",),
        ("binder",),
        "A cancel for an attempt at the binder or running: the binder forwards it to the node.",
    ),
    Channel(
        "jobCancelled",
        _job(subjects.CANCELLED),
        (v1.JobCancelled,),
        subjects.STREAM_JOBS,
        ("scheduler",),
        END_CONSUMERS,
        "The job ended cancelled; it never runs again. The binder frees any reservation.",
    ),
    Channel(
        "jobDepWatch",
        _job(subjects.DEP_WATCH),
        (v1.DependencyWatch,),
        subjects.STREAM_JOBS,
        ("scheduler",),
        ("scheduler",),
        "A job of another partition depends on this partition's job: say when it ends.",
    ),
    Channel(
        "jobDepEnded",
        _job(subjects.DEP_ENDED),
        (v1.DependencyEnded,),
        subjects.STREAM_JOBS,
        ("scheduler",),
        ("scheduler",),
        "A job that a job of this partition depends on ended (sent by the ended job's partition).",
    ),
    Channel(
        "jobChildAdded",
        _job(subjects.CHILD_ADDED),
        (v1.ChildAdded,),
        subjects.STREAM_JOBS,
        ("trigger",),
        ("scheduler",),
        "A workflow step's handler submitted a child job: the steps that need the step wait for it too.",
    ),
    # --- dispatch: stream JM_DISPATCH ----------------------------------------------------
    Channel(
        "nodeDispatch",
        subjects.node_dispatch(NODE_ID),
        (v1.JobBound,),
        subjects.STREAM_DISPATCH,
        ("binder",),
        ("executor", "tracker"),
        "A bound job, sent to the chosen node only: that node's executor runs it; the tracker "
        "reads every node's subject (jobmesh.v1.node.*.dispatch) to record the binding.",
    ),
    Channel(
        "nodeCancel",
        subjects.node_cancel(NODE_ID),
        (v1.AttemptCancel,),
        subjects.STREAM_DISPATCH,
        ("binder",),
        ("executor",),
        "Stop an attempt bound to this node (SIGTERM, then SIGKILL); one not started never starts.",
    ),
    # --- logs: stream JM_LOGS ------------------------------------------------------------
    Channel(
        "jobLog",
        subjects.job_log(JOB_ID),
        (v1.LogLine,),
        subjects.STREAM_LOGS,
        ("executor",),
        (CLIENT,),
        "Output lines of a job's attempts, in order; read with an ordered consumer (`jobmesh logs`).",
    ),
    # --- live watch: core NATS -----------------------------------------------------------
    Channel(
        "jobWatch",
        subjects.job_watch(JOB_ID),
        (v1.JobUpdate,),
        None,
        ("tracker",),
        (CLIENT,),
        "A job's state changes, announced after the tracker committed them. Core NATS, not "
        "stored: a watcher reads the current state with api.jobs.get first, then follows this.",
    ),
    # --- dead letters: stream JM_DEADLETTER ----------------------------------------------
    Channel(
        "deadLetter",
        subjects.deadletter(SERVICE),
        (v1.DeadLetter,),
        subjects.STREAM_DEADLETTER,
        SERVICES,
        (CLIENT,),
        "A message a service refused (undecodable, invalid, oversized, or out of retries), with "
        "the reason and the first bytes; kept for operators (`nats stream view JM_DEADLETTER`).",
    ),
    # --- external events: stream JM_EVENTS -----------------------------------------------
    Channel(
        "externalEvents",
        subjects.EVENTS_ALL.removesuffix(">") + EVENT,
        (EXTERNAL_EVENT,),
        subjects.STREAM_EVENTS,
        (CLIENT,),
        ("trigger",),
        "Events from outside (any language, or `nats pub`). The trigger service matches each against "
        "the event rules (subject pattern, filter) and submits the jobs they build; an event no rule "
        "matches is stored and starts nothing; a payload that is not JSON is dead-lettered (trigger) "
        "with the reason and fires nothing.",
    ),
    # --- request/reply APIs: core NATS, answered by one replica (queue group) -------------
    Channel(
        "apiSubmit",
        subjects.API_SUBMIT,
        (v1.SubmitRequest,),
        None,
        (CLIENT,),
        ("trigger",),
        "Submit jobs. The reply comes only after every JobSubmitted has its PubAck.",
        reply="apiSubmitReply",
    ),
    Channel(
        "apiSubmitReply",
        None,
        (v1.SubmitReply, v1.ErrorReply),
        None,
        ("trigger",),
        (CLIENT,),
        "Reply to api.submit, on the requester's inbox.",
    ),
    Channel(
        "apiJobsGet",
        subjects.API_JOB_GET,
        (v1.JobGetRequest,),
        None,
        (CLIENT,),
        ("tracker",),
        "Read one job with its attempts and events.",
        reply="apiJobsGetReply",
    ),
    Channel(
        "apiJobsGetReply",
        None,
        (v1.JobView, v1.ErrorReply),
        None,
        ("tracker",),
        (CLIENT,),
        "Reply to api.jobs.get, on the requester's inbox.",
    ),
    Channel(
        "apiJobsList",
        subjects.API_JOB_LIST,
        (v1.JobListRequest,),
        None,
        (CLIENT,),
        ("tracker",),
        "List recent jobs, newest first, optionally by state or queue.",
        reply="apiJobsListReply",
    ),
    Channel(
        "apiJobsListReply",
        None,
        (v1.JobListReply, v1.ErrorReply),
        None,
        ("tracker",),
        (CLIENT,),
        "Reply to api.jobs.list, on the requester's inbox.",
    ),
    Channel(
        "apiNodes",
        subjects.API_NODES,
        (v1.NodesRequest,),
        None,
        (CLIENT,),
        ("binder",),
        "Every executor node with capacity, allocation and last heartbeat (`jobmesh nodes`).",
        reply="apiNodesReply",
    ),
    Channel(
        "apiNodesReply",
        None,
        (v1.NodesReply, v1.ErrorReply),
        None,
        ("binder",),
        (CLIENT,),
        "Reply to api.nodes, on the requester's inbox.",
    ),
    Channel(
        "apiQueues",
        subjects.API_QUEUES,
        (v1.QueuesRequest,),
        None,
        (CLIENT,),
        ("scheduler",),
        "Queue depth per tenant and wait reason. Every scheduler replica answers (no queue "
        "group) for the partitions it owns; the client gathers replies (`jobmesh queues`).",
        reply="apiQueuesReply",
    ),
    Channel(
        "apiQueuesReply",
        None,
        (v1.QueuesReply, v1.ErrorReply),
        None,
        ("scheduler",),
        (CLIENT,),
        "One scheduler's reply to api.queues, on the requester's inbox.",
    ),
    Channel(
        "apiTriggersPut",
        subjects.API_TRIGGERS_PUT,
        (v1.TriggerPutRequest,),
        None,
        (CLIENT,),
        ("trigger",),
        "Add or change a trigger rule; it is validated completely (subjects, filter, template, the job its sample yields) before it is stored.",
        reply="apiTriggersPutReply",
    ),
    Channel(
        "apiTriggersPutReply",
        None,
        (v1.TriggerReply, v1.ErrorReply),
        None,
        ("trigger",),
        (CLIENT,),
        "Reply to apiTriggersPut, on the requester's inbox.",
    ),
    Channel(
        "apiWorkflowsRun",
        subjects.API_WORKFLOWS_RUN,
        (v1.WorkflowRunRequest,),
        None,
        (CLIENT, "trigger"),
        ("trigger",),
        "Start a workflow run: the whole DAG is checked (cycles, unknown steps, templates, every step's job) before any job is created.",
        reply="apiWorkflowsRunReply",
    ),
    Channel(
        "apiWorkflowsRunReply",
        None,
        (v1.WorkflowRunReply, v1.ErrorReply),
        None,
        ("trigger",),
        (CLIENT, "trigger"),
        "Reply to apiWorkflowsRun, on the requester's inbox.",
    ),
    Channel(
        "apiWorkflowsGet",
        subjects.API_WORKFLOWS_GET,
        (v1.WorkflowGetRequest,),
        None,
        (CLIENT, "trigger"),
        ("trigger",),
        "One run's record: its spec, input and each step's job.",
        reply="apiWorkflowsGetReply",
    ),
    Channel(
        "apiWorkflowsGetReply",
        None,
        (v1.WorkflowRun, v1.ErrorReply),
        None,
        ("trigger",),
        (CLIENT, "trigger"),
        "Reply to apiWorkflowsGet, on the requester's inbox.",
    ),
    Channel(
        "apiWorkflowsList",
        subjects.API_WORKFLOWS_LIST,
        (v1.WorkflowListRequest,),
        None,
        (CLIENT, "trigger"),
        ("trigger",),
        "Recent runs, newest first.",
        reply="apiWorkflowsListReply",
    ),
    Channel(
        "apiWorkflowsListReply",
        None,
        (v1.WorkflowListReply, v1.ErrorReply),
        None,
        ("trigger",),
        (CLIENT, "trigger"),
        "Reply to apiWorkflowsList, on the requester's inbox.",
    ),
    Channel(
        "apiWorkflowsCancel",
        subjects.API_WORKFLOWS_CANCEL,
        (v1.WorkflowCancelRequest,),
        None,
        (CLIENT, "trigger"),
        ("trigger",),
        "Cancel a run: its held and running steps (and their mapped items).",
        reply="apiWorkflowsCancelReply",
    ),
    Channel(
        "apiWorkflowsCancelReply",
        None,
        (v1.WorkflowCancelReply, v1.ErrorReply),
        None,
        ("trigger",),
        (CLIENT, "trigger"),
        "Reply to apiWorkflowsCancel, on the requester's inbox.",
    ),
    Channel(
        "apiWorkflowsRetry",
        subjects.API_WORKFLOWS_RETRY,
        (v1.WorkflowRetryRequest,),
        None,
        (CLIENT, "trigger"),
        ("trigger",),
        "Run a run's failed, skipped and cancelled steps again, keeping the succeeded steps' results.",
        reply="apiWorkflowsRetryReply",
    ),
    Channel(
        "apiWorkflowsRetryReply",
        None,
        (v1.WorkflowRetryReply, v1.ErrorReply),
        None,
        ("trigger",),
        (CLIENT, "trigger"),
        "Reply to apiWorkflowsRetry, on the requester's inbox.",
    ),
    Channel(
        "apiTriggersGet",
        subjects.API_TRIGGERS_GET,
        (v1.TriggerGetRequest,),
        None,
        (CLIENT,),
        ("trigger",),
        "One rule with its figures, next tick and pending partial state.",
        reply="apiTriggersGetReply",
    ),
    Channel(
        "apiTriggersGetReply",
        None,
        (v1.TriggerView, v1.ErrorReply),
        None,
        ("trigger",),
        (CLIENT,),
        "Reply to apiTriggersGet, on the requester's inbox.",
    ),
    Channel(
        "apiTriggersList",
        subjects.API_TRIGGERS_LIST,
        (v1.TriggerListRequest,),
        None,
        (CLIENT,),
        ("trigger",),
        "Every rule with its fires, failures, last fire and next tick.",
        reply="apiTriggersListReply",
    ),
    Channel(
        "apiTriggersListReply",
        None,
        (v1.TriggerListReply, v1.ErrorReply),
        None,
        ("trigger",),
        (CLIENT,),
        "Reply to apiTriggersList, on the requester's inbox.",
    ),
    Channel(
        "apiTriggersDelete",
        subjects.API_TRIGGERS_DELETE,
        (v1.TriggerDeleteRequest,),
        None,
        (CLIENT,),
        ("trigger",),
        "Remove a rule with its figures and partial state.",
        reply="apiTriggersDeleteReply",
    ),
    Channel(
        "apiTriggersDeleteReply",
        None,
        (v1.TriggerReply, v1.ErrorReply),
        None,
        ("trigger",),
        (CLIENT,),
        "Reply to apiTriggersDelete, on the requester's inbox.",
    ),
    Channel(
        "apiTriggersPause",
        subjects.API_TRIGGERS_PAUSE,
        (v1.TriggerPauseRequest,),
        None,
        (CLIENT,),
        ("trigger",),
        "Pause or resume a rule.",
        reply="apiTriggersPauseReply",
    ),
    Channel(
        "apiTriggersPauseReply",
        None,
        (v1.TriggerReply, v1.ErrorReply),
        None,
        ("trigger",),
        (CLIENT,),
        "Reply to apiTriggersPause, on the requester's inbox.",
    ),
    Channel(
        "apiTriggersTest",
        subjects.API_TRIGGERS_TEST,
        (v1.TriggerTestRequest,),
        None,
        (CLIENT,),
        ("trigger",),
        "The job an event would produce under a rule, without submitting it.",
        reply="apiTriggersTestReply",
    ),
    Channel(
        "apiTriggersTestReply",
        None,
        (v1.TriggerTestReply, v1.ErrorReply),
        None,
        ("trigger",),
        (CLIENT,),
        "Reply to apiTriggersTest, on the requester's inbox.",
    ),
    Channel(
        "apiSchedulerExplain",
        subjects.scheduler_explain(PARTITION),  # type: ignore[arg-type]
        (v1.ExplainRequest,),
        None,
        (CLIENT,),
        ("scheduler",),
        "Why a job is not running yet, answered by the owner of the job's partition.",
        reply="apiSchedulerExplainReply",
    ),
    Channel(
        "apiSchedulerCancel",
        subjects.scheduler_cancel(PARTITION),  # type: ignore[arg-type]
        (v1.CancelRequest,),
        None,
        (CLIENT,),
        ("scheduler",),
        "Cancel a job, answered by the owner of the job's partition (JobView.partition).",
        reply="apiSchedulerCancelReply",
    ),
    Channel(
        "apiSchedulerCancelReply",
        None,
        (v1.CancelReply, v1.ErrorReply),
        None,
        ("scheduler",),
        (CLIENT,),
        "Reply to a cancel request, on the requester's inbox.",
    ),
    Channel(
        "apiSchedulerExplainReply",
        None,
        (v1.ExplainReply, v1.ErrorReply),
        None,
        ("scheduler",),
        (CLIENT,),
        "Reply to an explain request, on the requester's inbox.",
    ),
    Channel(
        "health",
        subjects.health(SERVICE),
        (HEALTH_REQUEST,),
        None,
        (CLIENT,),
        SERVICES,
        "Health check answered by one instance of the service (`jobmesh health <service>`); "
        "ok is false while the instance drains or has lost NATS.",
        reply="healthReply",
    ),
    Channel(
        "healthReply",
        None,
        (v1.HealthReply,),
        None,
        SERVICES,
        (CLIENT,),
        "Reply to a health check, on the requester's inbox.",
    ),
    # --- KV buckets: one message per put on $KV.<bucket>.<key> ---------------------------
    Channel(
        "kvNodes",
        _kv(subjects.KV_NODES, NODE_ID),
        (v1.NodeInfo,),
        f"KV_{subjects.KV_NODES}",
        ("executor",),
        ("scheduler", "binder", CLIENT),
        "Executor registrations, refreshed every heartbeat; the bucket TTL "
        "(JOBMESH_NODE_TTL_SECONDS) makes each record a lease. Each put also renews the lease of "
        "every attempt the node runs (attempts, with progress and checkpoints; ended), which the "
        "scheduler holds; `jobmesh watch` reads progress from it.",
        kv_bucket=subjects.KV_NODES,
    ),
    Channel(
        "kvAlloc",
        _kv(subjects.KV_ALLOC, NODE_ID),
        (v1.Allocation,),
        f"KV_{subjects.KV_ALLOC}",
        ("binder",),
        ("binder",),
        "Everything reserved on a node, keyed by node id. Updated only by compare-and-set on "
        "the revision, so binder replicas never overbook a node.",
        kv_bucket=subjects.KV_ALLOC,
    ),
    Channel(
        "kvConfig",
        _kv(subjects.KV_CONFIG, KEY),
        (v1.QueueConfig, v1.TenantConfig, v1.ZoneMap),
        f"KV_{subjects.KV_CONFIG}",
        (CLIENT,),
        ("scheduler",),
        "Cluster configuration: queue.<name> (QueueConfig), tenant.<name> (TenantConfig) and "
        "zones (ZoneMap). Written by `jobmesh queue set` / `tenant set` / `zones set`; "
        "schedulers watch it and apply changes at once.",
        kv_bucket=subjects.KV_CONFIG,
    ),
    Channel(
        "kvHandlers",
        _kv(subjects.KV_HANDLERS, KEY),
        (v1.HandlerInfo,),
        f"KV_{subjects.KV_HANDLERS}",
        ("executor",),
        ("trigger", CLIENT),
        "The Python handlers executors host, keyed by handler name, with the JSON Schema of "
        "their input and output types: written by each executor that loads the handler; the "
        "trigger checks a handler job's input against it at submit.",
        kv_bucket=subjects.KV_HANDLERS,
    ),
    Channel(
        "kvTriggers",
        _kv(subjects.KV_TRIGGERS, KEY),
        (v1.TriggerRecord,),
        f"KV_{subjects.KV_TRIGGERS}",
        ("trigger",),
        ("trigger",),
        "Trigger rules keyed by rule name (history 5): written through api.triggers.*, watched by "
        "every trigger replica, so a change applies without a restart.",
        kv_bucket=subjects.KV_TRIGGERS,
    ),
    Channel(
        "kvWorkflows",
        _kv(subjects.KV_WORKFLOWS, KEY),
        (v1.WorkflowRun,),
        f"KV_{subjects.KV_WORKFLOWS}",
        ("trigger",),
        ("trigger",),
        "Workflow runs (run.<run id>: spec, input, each step's job) and the last run of each "
        "workflow concurrency key (key.<digest>), written by the trigger's workflow API.",
        kv_bucket=subjects.KV_WORKFLOWS,
    ),
    Channel(
        "kvTriggerState",
        _kv(subjects.KV_TRIGGER_STATE, KEY),
        (),
        f"KV_{subjects.KV_TRIGGER_STATE}",
        ("trigger",),
        ("trigger",),
        "Rules' partial state, private to the trigger: pending debounces, batches and "
        "correlations (pending.<rule>.<key digest>) and the last tick each schedule fired "
        "(tick.<rule>); updated by compare-and-set, so replicas share it.",
        kv_bucket=subjects.KV_TRIGGER_STATE,
    ),
    Channel(
        "kvTriggerStats",
        _kv(subjects.KV_TRIGGER_STATS, KEY),
        (),
        f"KV_{subjects.KV_TRIGGER_STATS}",
        ("trigger",),
        ("trigger",),
        "Each trigger instance's figures per rule (<rule>.<instance>): fires, failures, last fire; "
        "private to the trigger, summed by api.triggers.list.",
        kv_bucket=subjects.KV_TRIGGER_STATS,
    ),
    Channel(
        "kvLeases",
        _kv(subjects.KV_LEASES, KEY),
        (),
        f"KV_{subjects.KV_LEASES}",
        ("scheduler",),
        ("scheduler",),
        "Which scheduler instance owns each partition (partition.<n>), and which instances are "
        "alive (member.<instance>, put every beat, so the partitions are shared out over them); "
        "values are private to the scheduler and expire with the bucket TTL, so a standby takes over.",
        kv_bucket=subjects.KV_LEASES,
    ),
)

# The AsyncAPI Parameter Object of every {name} an address may hold; the checks take each
# sample value from here.
PARAMETERS: dict[str, dict[str, Any]] = {
    "partition": {
        "description": "Scheduler partition of the job's queue: crc32(queue) % JOBMESH_PARTITIONS "
        "(subjects.partition_of).",
        "examples": ["0"],
    },
    "node_id": {
        "description": "Executor node id (JOBMESH_NODE_ID): one subject token of A-Z a-z 0-9 _ -.",
        "examples": ["node-1"],
    },
    "job_id": {"description": "Job id.", "examples": ["j-7f3a9c2e"]},
    "service": {"description": "Service name.", "enum": list(SERVICES)},
    "event": {
        "description": "Event name chosen by the publisher: one or more dot-separated tokens.",
        "examples": ["orders.created"],
    },
    "key": {"description": "KV key.", "examples": ["0"]},
}


# --- messages ------------------------------------------------------------------------
def wire_messages() -> list[type[msgspec.Struct]]:
    """Every struct exported by ``jobmesh.contract.messages.v1`` that is tagged by ``type`` on the wire.

    Nested structs (JobSpec, Resources, ...) and runtimes (tagged by ``kind``) never travel
    alone, so they appear only inside these schemas.

    Returns:
        The message types, sorted by name.
    """
    found: dict[str, type[msgspec.Struct]] = {}
    for name in dir(v1):
        obj = getattr(v1, name)
        if isinstance(obj, type) and issubclass(obj, msgspec.Struct) and obj.__module__.startswith(v1.__name__):
            config = obj.__struct_config__
            if config.tag is not None and config.tag_field == "type":
                found[obj.__name__] = obj
    return [found[name] for name in sorted(found)]


def type_tag(message: type[msgspec.Struct]) -> str:
    """The value of a message's ``type`` field on the wire.

    Args:
        message: a wire message type (see :func:`wire_messages`).

    Returns:
        Its tag, e.g. ``"job.submitted"``.
    """
    return str(message.__struct_config__.tag)


def message_name(message: Any) -> str:
    """The name a table message goes by: the struct's class name, or the Payload's name.

    Args:
        message: an entry of :attr:`Channel.messages`.

    Returns:
        The name (also the schema's and the AsyncAPI message's name).
    """
    return message.name if isinstance(message, Payload) else message.__name__


# --- the completed table -------------------------------------------------------------
def _is_job_row(channel: Channel) -> bool:
    prefix, suffix = _job("\0").split("\0")
    return (
        channel.stream == subjects.STREAM_JOBS
        and channel.address is not None
        and channel.address.startswith(prefix)
        and channel.address.endswith(suffix)
    )


def channels() -> list[Channel]:
    """The channel table completed: every per-kind job row names the tracker as a reader too.

    Not checked here: :func:`jobmesh.contract.channelcheck.checked_channels` returns the same
    rows after checking them against the streams, the parties and the parameters.

    Returns:
        The rows of :data:`CHANNELS`, in table order.
    """
    return [replace(c, consumers=(*c.consumers, *ALL_KINDS_CONSUMERS)) if _is_job_row(c) else c for c in CHANNELS]


def _is_node_row(channel: Channel) -> bool:
    """Whether a job row is the node form of an executor's kind (``...<kind>.{node_id}``)."""
    return _is_job_row(channel) and channel.address is not None and channel.address.endswith("." + NODE_ID)


def job_kinds() -> list[str]:
    """Lifecycle kinds that have a channel of the partition form, in pipeline order.

    Returns:
        The kind tokens of the per-kind job subjects (``submitted``, ``ready``, ...).
    """
    prefix, suffix = _job("\0").split("\0")
    return [
        c.address.removeprefix(prefix).removesuffix(suffix)
        for c in CHANNELS
        if c.address and _is_job_row(c) and not _is_node_row(c)
    ]


def node_kinds() -> list[str]:
    """Lifecycle kinds that have a channel of the node form (what executors publish).

    Returns:
        Their kind tokens, in pipeline order (``started``, ``succeeded``, ...).
    """
    prefix = _job("\0").split("\0")[0]
    return [
        c.address.removeprefix(prefix).removesuffix("." + NODE_ID) for c in CHANNELS if c.address and _is_node_row(c)
    ]


def request_messages() -> list[type[msgspec.Struct]]:
    """The request structs: what travels on a channel that has a reply.

    Returns:
        Their types, in table order (each declares ``forbid_unknown_fields``).
    """
    found: list[type[msgspec.Struct]] = []
    for c in CHANNELS:
        if c.reply is not None:
            found.extend(m for m in c.messages if not isinstance(m, Payload) and m not in found)
    return found
