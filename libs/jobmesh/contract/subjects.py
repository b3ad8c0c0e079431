"""Every subject, stream, consumer and bucket name jobmesh uses, in one place.

Services call the builders here; they never format a subject themselves. Subjects carry
the major version (``jobmesh.v1.``); a breaking change gets ``v2`` subjects.
"""

from __future__ import annotations

import zlib

PREFIX = "jobmesh.v1"

# The five services, in pipeline order; each name appears in its durables and health subject.
SERVICES = ("trigger", "scheduler", "binder", "executor", "tracker")

# --- streams -------------------------------------------------------------------------
STREAM_JOBS = "JM_JOBS"  # every job lifecycle event, partitioned by queue
STREAM_DISPATCH = "JM_DISPATCH"  # bound jobs, one subject per executor node
STREAM_LOGS = "JM_LOGS"  # stdout/stderr lines, one subject per job
STREAM_DEADLETTER = "JM_DEADLETTER"  # messages a service refused, with the reason
STREAM_EVENTS = "JM_EVENTS"  # external trigger events published by users
# Subjects outside jobmesh.v1.events.> that the operator lets rules watch
# (JOBMESH_TRIGGER_SUBJECTS); the trigger service provisions it with those subjects.
STREAM_EXTERNAL = "JM_EXTERNAL"

# --- KV buckets ----------------------------------------------------------------------
KV_NODES = "jm_nodes"  # executor registrations; owned by executors, TTL = node lease
KV_ALLOC = "jm_alloc"  # per-node reservations; owned by the binder, CAS on revision
KV_LEASES = "jm_leases"  # scheduler partition ownership
KV_CONFIG = "jm_config"  # queue, tenant and zone configuration
KV_HANDLERS = "jm_handlers"  # Python handlers executors host, key = handler name
KV_TRIGGERS = "jm_triggers"  # trigger rules (TriggerRecord), key = rule name; owned by the trigger
KV_TRIGGER_STATE = "jm_trigger_state"  # partial state of rules: pending bursts, last schedule ticks
KV_TRIGGER_STATS = "jm_trigger_stats"  # per-rule figures, one key per rule and trigger instance
KV_WORKFLOWS = "jm_workflows"  # workflow runs (WorkflowRun), key run.<run id>; owned by the trigger
OBJ_RESULTS = "jm_results"  # job results too large to travel inline, key <job_id>/<attempt>
OBJ_UPLOADS = "jm_uploads"  # files uploaded with a submit, key sha256/<hex digest>

# --- job lifecycle (stream JM_JOBS) --------------------------------------------------
JOBS_ALL = f"{PREFIX}.job.>"

SUBMITTED = "submitted"
READY = "ready"
UNPLACEABLE = "unplaceable"
WAITING = "waiting"
BOUND = "bound"
STARTED = "started"
SUCCEEDED = "succeeded"
FAILED = "failed"
EXPIRED = "expired"
LOST = "lost"
RETRYING = "retrying"
GAVE_UP = "gave_up"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
# A scheduler partition asks another to say when a job ends (a dependency across
# partitions), and the other says so; both travel on the scheduler's partition subjects.
DEP_WATCH = "dep_watch"
DEP_ENDED = "dep_ended"
# A workflow step's handler submitted a child job its dependents wait for too (trigger to
# the step's partition).
CHILD_ADDED = "child_added"
# One member of a gang ended well (MemberSucceeded); the gang's attempt ends once all have.
MEMBER_SUCCEEDED = "member_succeeded"
# An attempt ended: its reservation (if any) can go.
TERMINAL_KINDS = (SUCCEEDED, FAILED, EXPIRED, LOST, CANCELLED, MEMBER_SUCCEEDED)
# A job ended for good: what "the end of an earlier job" means to a trigger rule.
JOB_END_KINDS = (SUCCEEDED, GAVE_UP, CANCELLED, EXPIRED)
# What an executor reports about the attempts bound to its node. These travel on the node
# form (node_event: the node id is the subject's last token), so a NATS permission can
# let each node publish for its own attempts only. The services' own events of the same
# kinds (the scheduler's success of a mapped step, its lost lease) keep the partition form.
EXECUTOR_KINDS = (STARTED, SUCCEEDED, FAILED, LOST, MEMBER_SUCCEEDED)


def partition_of(queue: str, partitions: int) -> int:
    """The scheduler partition a queue hashes to (stable across processes and versions)."""
    return zlib.crc32(queue.encode()) % partitions


def job_event(partition: int | str, kind: str) -> str:
    """Subject of one lifecycle event kind in one partition (``*`` for every partition)."""
    return f"{PREFIX}.job.{partition}.{kind}"


def node_event(partition: int | str, kind: str, node_id: str) -> str:
    """Subject of an event an executor publishes about an attempt bound to ``node_id``
    (one of :data:`EXECUTOR_KINDS`): ``jobmesh.v1.job.<partition>.<kind>.<node_id>``.

    Args:
        partition: the job's partition (``*`` for every partition, in a filter).
        kind: the event kind.
        node_id: the node (one subject token; ``*`` for every node, in a filter).

    Returns:
        The six-token subject.
    """
    return f"{PREFIX}.job.{partition}.{kind}.{node_id}"


def job_events(partition: int | str, kinds: tuple[str, ...]) -> list[str]:
    """Filter subjects for several kinds in a partition (``*`` for every partition).

    A kind executors publish (:data:`EXECUTOR_KINDS`) comes with both its forms: the
    partition form (the services' events of that kind, and older executors') and the node
    form of every node (``...<kind>.*``). The two never overlap (five tokens and six), as
    one consumer's filters must not.
    """
    out = []
    for kind in kinds:
        out.append(f"{PREFIX}.job.{partition}.{kind}")
        if kind in EXECUTOR_KINDS:
            out.append(node_event(partition, kind, "*"))
    return out


def node_of_event(subject: str) -> tuple[str, str] | None:
    """The kind and node of a job event subject in the node form, None for any other.

    Args:
        subject: a subject of stream JM_JOBS.

    Returns:
        ``(kind, node_id)`` of ``jobmesh.v1.job.<partition>.<kind>.<node_id>``; None for the
        partition form (five tokens). A subject of more than six tokens under
        ``jobmesh.v1.job.`` is returned with everything after the kind as its node, which
        no node id matches (node ids are one token).
    """
    if subject.count(".") < 5:
        return None
    parts = subject.split(".", 5)
    return parts[4], parts[5]


# --- dispatch (stream JM_DISPATCH) ---------------------------------------------------
DISPATCH_ALL = f"{PREFIX}.node.*.dispatch"
CANCEL_ALL = f"{PREFIX}.node.*.cancel"


def node_dispatch(node_id: str) -> str:
    """Subject the binder publishes a bound job to, and that node's executor consumes."""
    return f"{PREFIX}.node.{node_id}.dispatch"


def node_cancel(node_id: str) -> str:
    """Subject the binder sends AttemptCancel to, for an attempt bound to ``node_id``."""
    return f"{PREFIX}.node.{node_id}.cancel"


# --- logs (stream JM_LOGS) -----------------------------------------------------------
LOGS_ALL = f"{PREFIX}.log.>"


def job_log(job_id: str) -> str:
    """Subject of one job's output lines."""
    return f"{PREFIX}.log.{job_id}"


# --- dead letters (stream JM_DEADLETTER) ---------------------------------------------
DEADLETTER_ALL = f"{PREFIX}.deadletter.>"


def deadletter(service: str) -> str:
    """Subject a service records refused messages on."""
    return f"{PREFIX}.deadletter.{service}"


# --- external events (stream JM_EVENTS) ----------------------------------------------
EVENTS_ALL = f"{PREFIX}.events.>"

# --- request/reply APIs (core NATS, queue groups) ------------------------------------
API_SUBMIT = f"{PREFIX}.api.submit"
API_JOB_GET = f"{PREFIX}.api.jobs.get"
API_JOB_LIST = f"{PREFIX}.api.jobs.list"
API_NODES = f"{PREFIX}.api.nodes"
API_QUEUES = f"{PREFIX}.api.queues"
API_TRIGGERS_PUT = f"{PREFIX}.api.triggers.put"
API_TRIGGERS_GET = f"{PREFIX}.api.triggers.get"
API_TRIGGERS_LIST = f"{PREFIX}.api.triggers.list"
API_TRIGGERS_DELETE = f"{PREFIX}.api.triggers.delete"
API_TRIGGERS_PAUSE = f"{PREFIX}.api.triggers.pause"
API_TRIGGERS_TEST = f"{PREFIX}.api.triggers.test"
API_WORKFLOWS_RUN = f"{PREFIX}.api.workflows.run"
API_WORKFLOWS_GET = f"{PREFIX}.api.workflows.get"
API_WORKFLOWS_LIST = f"{PREFIX}.api.workflows.list"
API_WORKFLOWS_CANCEL = f"{PREFIX}.api.workflows.cancel"
API_WORKFLOWS_RETRY = f"{PREFIX}.api.workflows.retry"


def scheduler_explain(partition: int) -> str:
    """Request/reply subject on which the owner of ``partition`` explains a job's wait."""
    return f"{PREFIX}.api.scheduler.{partition}.explain"


def scheduler_cancel(partition: int) -> str:
    """Request/reply subject on which the owner of ``partition`` cancels a job (the job's
    partition is in its view: ``JobView.partition``)."""
    return f"{PREFIX}.api.scheduler.{partition}.cancel"


def result_key(job_id: str, attempt: int, rank: int = 0) -> str:
    """Object name of an attempt's result in ``jm_results``: ``<job_id>/<attempt>``, and
    ``/<rank>`` after it for a gang member above rank 0 (the members share the attempt;
    rank 0's is the gang's result)."""
    key = f"{job_id}/{attempt}"
    return key if rank == 0 else f"{key}/{rank}"


def step_result_key(job_id: str) -> str:
    """Object name in ``jm_results`` of a kept result (``JobSpec.keep_result``): one per
    job, not per attempt, so a later step reads it knowing only the job id."""
    return f"step/{job_id}"


def map_manifest_key(job_id: str) -> str:
    """Object name in ``jm_results`` of a mapped step's manifest: its items' job ids, in
    item order (written by the scheduler when it expands the step)."""
    return f"map/{job_id}"


def workflow_key(run_id: str) -> str:
    """Key of a workflow run's record in ``jm_workflows``."""
    return f"run.{run_id}"


def workflow_concurrency_key(digest: str) -> str:
    """Key in ``jm_workflows`` of the last run of a workflow concurrency key (its digest)."""
    return f"key.{digest}"


def upload_key(digest: str) -> str:
    """Object name of an uploaded file in ``jm_uploads``: its content's sha256, so the same
    file uploaded twice is stored once and a fetched file can be checked against its name."""
    return f"sha256/{digest}"


def lease_key(partition: int) -> str:
    """Key of a partition's lease in ``jm_leases``."""
    return f"partition.{partition}"


MEMBERS = "member.*"  # the member keys of jm_leases: one per live scheduler instance


def member_key(instance: str) -> str:
    """Key in ``jm_leases`` a live scheduler instance keeps putting (partitions are spread
    over the instances heard from). Dots in an instance name become ``_``."""
    return f"member.{instance.replace('.', '_')}"


def health(service: str) -> str:
    """Request/reply subject every instance of ``service`` answers health checks on."""
    return f"{PREFIX}.health.{service}"


def job_watch(job_id: str) -> str:
    """Core-NATS subject the tracker announces a job's state changes on, after commit."""
    return f"{PREFIX}.watch.{job_id}"


# --- trigger state (KV keys) --------------------------------------------------------
def trigger_pending_key(rule: str, key_digest: str) -> str:
    """Key in ``jm_trigger_state`` of one pending debounce, batch or correlation."""
    return f"pending.{rule}.{key_digest}"


def trigger_pending_prefix(rule: str) -> str:
    """Watch/delete pattern of every pending key of ``rule``."""
    return f"pending.{rule}.*"


def trigger_tick_key(rule: str) -> str:
    """Key in ``jm_trigger_state`` holding the last tick a schedule rule fired."""
    return f"tick.{rule}"


def trigger_stats_key(rule: str, instance: str) -> str:
    """Key in ``jm_trigger_stats`` of one trigger instance's figures for ``rule``."""
    return f"{rule}.{instance.replace('.', '_')}"


# --- durable consumer names ----------------------------------------------------------
def durable(service: str, purpose: str) -> str:
    """Name of a durable consumer shared by every replica of a service."""
    return f"{service}-{purpose}"
