"""The job model and its lifecycle events.

A ``JobSpec`` is what a user declares. Lifecycle events are tagged, frozen structs with a
``type`` field on the wire; ``LifecycleEvent`` is their union, decoded with one typed
decoder per consumer.

Attempt-level and job-level endings differ. An attempt ends with JobSucceeded, JobFailed,
JobLost or (when it was never released) JobExpired / JobCancelled. A job ends for good
with one of :data:`JobEnd`: JobSucceeded (success is always final), JobGaveUp (the
scheduler will not retry: the policy is exhausted, the code does not retry, or the total
timeout passed), JobCancelled or JobExpired. After a JobFailed or JobLost the scheduler
always says what follows: JobRetrying or JobGaveUp.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from jobmesh.contract.messages.v1.triggers import JobOrigin

__all__ = [
    "DEPENDENCY_CONDITIONS",
    "DISRUPTION_CODES",
    "FAILURE_CODES",
    "ISOLATION_LEVELS",
    "MAX_DISRUPTIONS",
    "MAX_STDIN_BYTES",
    "MAX_UPLOAD_BYTES",
    "RETRY_ON_BY_DEFAULT",
    "RUNTIME_ISOLATION_CEILING",
    "AttemptCancel",
    "AttemptError",
    "AttemptEvent",
    "ChildAdded",
    "Constraints",
    "ContainerRuntime",
    "Dependency",
    "DependencyEnded",
    "DependencyWatch",
    "FailureCode",
    "FallbackSpec",
    "HandlerRuntime",
    "InputFile",
    "IsolationLevel",
    "ItemRef",
    "JobBound",
    "JobCancelled",
    "JobCancelling",
    "JobEnd",
    "JobError",
    "JobEvent",
    "JobExpired",
    "JobFailed",
    "JobGaveUp",
    "JobLost",
    "JobReady",
    "JobRetrying",
    "JobRuntime",
    "JobSpec",
    "JobSpecBase",
    "JobStarted",
    "JobSubmitted",
    "JobSucceeded",
    "JobUnplaceable",
    "JobWaiting",
    "LifecycleEvent",
    "Locality",
    "LogLine",
    "MapSpec",
    "NoopRuntime",
    "ParentRef",
    "Priority",
    "ProcessRuntime",
    "Resources",
    "RetryPolicy",
    "SecretName",
    "StepRef",
    "TerminalEvent",
    "Timeouts",
    "UpstreamRef",
    "runtime_kind",
]

NonNegInt = Annotated[int, Meta(ge=0)]
Name = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]
Priority = Annotated[int, Meta(ge=0, le=9)]
Seconds = Annotated[float, Meta(gt=0)]
# Subject tokens may not contain dots or wildcards, so ids are restricted to this set.
Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]
AttemptNumber = Annotated[int, Meta(ge=1)]
# A secret is looked up by name in a directory or as a variable on the node, so a name holds
# no path characters (no "/", no leading "."), and fits a variable name once upper-cased.
SecretName = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")]
# A file's place in the working directory: relative, no "..", no leading "/" (checked by
# contract.validation.input_path_problem; the pattern keeps out what is never a path).
RelativePath = Annotated[str, Meta(min_length=1, max_length=1024, pattern=r"^[^/\x00]")]
MAX_STDIN_BYTES = 64 * 1024  # inline stdin in a spec; a larger stdin travels as an upload
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # all the files uploaded with one submit, together

# Isolation levels, weakest first: a job that asks for one runs only on a node at or above it.
IsolationLevel = Literal["process", "sandbox", "container", "vm"]
ISOLATION_LEVELS: dict[str, int] = {"process": 0, "sandbox": 1, "container": 2, "vm": 3}
# The strongest level each runtime can run at, whatever its node enforces: a process or a
# handler worker runs at most in the sandbox, a container in its container.
RUNTIME_ISOLATION_CEILING: dict[str, str] = {
    "process": "sandbox",
    "handler": "sandbox",
    "noop": "vm",
    "container": "container",
}

# Why an attempt failed (``JobError.code``). Producers are typed against this literal and
# retry policies are checked against it; the wire field itself stays a plain string, so
# that a reader of an older v1 accepts a code added later (additive evolution).
FailureCode = Literal[
    "exit_code",  # the process exited non-zero or was killed by a signal
    "timeout",  # it ran longer than its run timeout
    "lost",  # its lease was not renewed in time, or its executor restarted without it
    "oom",  # it used more memory than it reserved
    "spawn_failed",  # the command could not be started (not found, not executable)
    "workdir_failed",  # the attempt's working directory could not be created
    "node_drained",  # the executor stopped before the attempt finished, and handed it back
    "executor_error",  # the executor failed while running it (a bug)
    "disk_quota_exceeded",  # the scratch directory outgrew the disk the job reserved
    "result_too_large",  # the result file exceeded the result size limit
    "cancelled",  # somebody cancelled the job while this attempt ran
    "superseded",  # a newer attempt of the job exists; this one was stopped
    "pids_exceeded",  # it started more processes than its pids limit allows (a fork bomb)
    "isolation_refused",  # the node cannot isolate it as asked (level, network, devices)
    "secret_missing",  # it names a secret its node does not have
    "input_file_failed",  # a file of its working directory could not be fetched or copied
    "input_invalid",  # a handler's input does not match the handler's input type
    "handler_failed",  # the handler raised an exception
    "handler_crashed",  # the handler's worker process died (os._exit, a signal, a crash)
    "handler_missing",  # the node does not host the handler (any more)
    "container_failed",  # the container engine could not start the container
]
FAILURE_CODES: frozenset[str] = frozenset(typing.get_args(FailureCode))
# What a retry policy retries unless it names its own codes. The codes left out say the
# job cannot run as declared (spawn_failed, workdir_failed, result_too_large,
# disk_quota_exceeded), or that nobody wants it to run again (cancelled, superseded).
RETRY_ON_BY_DEFAULT: tuple[FailureCode, ...] = (
    "exit_code",
    "lost",
    "timeout",
    "oom",
    "executor_error",
    "handler_failed",
    "handler_crashed",
    "handler_missing",
    "container_failed",
)
# Disruptions are not the job's fault (an operator drained its node): they are retried
# whatever the policy says, and do not count toward max_attempts, up to this many.
DISRUPTION_CODES: frozenset[str] = frozenset({"node_drained"})
MAX_DISRUPTIONS = 10


class Resources(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What one attempt reserves on its node for as long as it runs."""

    cpu_milli: NonNegInt = 100
    memory_mb: NonNegInt = 64
    gpu: NonNegInt = 0
    gpu_kind: str = ""
    disk_mb: NonNegInt = 0


class ProcessRuntime(Struct, frozen=True, kw_only=True, tag="process", tag_field="kind"):
    """Run ``argv`` as a subprocess in a fresh working directory."""

    argv: Annotated[list[str], Meta(min_length=1)]
    env: dict[str, str] = {}


class NoopRuntime(Struct, frozen=True, kw_only=True, tag="noop", tag_field="kind"):
    """Succeed at once without starting a process (benchmarks, smoke tests)."""

    exit_code: NonNegInt = 0


class HandlerRuntime(Struct, frozen=True, kw_only=True, tag="handler", tag_field="kind"):
    """Call the Python handler ``handler`` hosted by the node's worker pool with ``input``.

    ``input`` is JSON for the handler's input type; it is checked against that type at
    submit when an executor has advertised it, else when the attempt runs. The handler's
    return value is the job's result (JSON).
    """

    handler: Name
    input: Any = None


class ContainerRuntime(Struct, frozen=True, kw_only=True, tag="container", tag_field="kind"):
    """Run ``argv`` (or the image's own command when empty) in a container of ``image``,
    with the same limits, network policy, files and secrets as a process."""

    image: Annotated[str, Meta(min_length=1, max_length=512, pattern=r"^[^\s\x00]+$")]
    argv: list[str] = []
    env: dict[str, str] = {}


JobRuntime = ProcessRuntime | NoopRuntime | HandlerRuntime | ContainerRuntime
# Each runtime type's wire tag (``process``, ``noop``, ``handler``, ``container``): what a
# node lists in ``NodeInfo.runtimes``. A dict lookup, as placement asks it per job and node.
_RUNTIME_KINDS: dict[type, str] = {cls: str(cls.__struct_config__.tag) for cls in typing.get_args(JobRuntime)}


def runtime_kind(runtime: JobRuntime) -> str:
    """The kind of ``runtime``: its wire tag, which a node must offer to run it."""
    return _RUNTIME_KINDS[type(runtime)]


class InputFile(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One file the attempt's working directory starts with.

    Exactly one source: ``object`` (a file uploaded with the submit, by its name in the
    object store bucket jm_uploads) or ``node_path`` (a file or directory on the node, under
    a path its operator allows, JOBMESH_ALLOWED_INPUT_PATHS).

    Attributes:
        path: where it goes, relative to the working directory.
        object: its object name in jm_uploads.
        node_path: an absolute path on the node.
        size: its size in bytes, as uploaded (checked when fetched).
        mode: its permission bits.
    """

    path: RelativePath
    object: Annotated[str, Meta(max_length=256)] = ""
    node_path: Annotated[str, Meta(max_length=4096)] = ""
    size: NonNegInt = 0
    mode: Annotated[int, Meta(ge=0, le=0o777)] = 0o644


class Constraints(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Hard placement constraints: a node that fails any of these is never a candidate."""

    arch: str = ""
    isolation: Literal["", "process", "sandbox", "container", "vm"] = ""  # see IsolationLevel
    labels: dict[str, str] = {}  # checked by contract.validation.label_problem
    handler: str = ""


class Locality(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Soft placement hints: nodes near these score higher."""

    zone: str = ""
    dataset: str = ""


class Timeouts(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Deadlines, in seconds; 0 means none.

    Attributes:
        queue: the job expires if no attempt started within this long of the submission.
        run: one attempt is stopped (``timeout``) after running this long.
        heartbeat: an attempt whose lease is not renewed within this long is lost.
        total: across all attempts, from the submission: once passed, a failed attempt is
            not retried and a running one is stopped (``timeout``).
    """

    queue: Annotated[float, Meta(ge=0)] = 0.0
    run: Annotated[float, Meta(gt=0, le=30 * 86400)] = 3600.0
    heartbeat: Annotated[float, Meta(ge=1, le=3600)] = 10.0
    total: Annotated[float, Meta(ge=0)] = 0.0


class JobSpecBase(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The fields a job and a fallback job share: what runs, where and when."""

    runtime: JobRuntime
    name: Annotated[str, Meta(max_length=256)] = ""
    queue: Name = "default"
    tenant: Name = "default"
    priority: Priority = 5
    resources: Resources = Resources()
    constraints: Constraints = Constraints()
    locality: Locality = Locality()
    timeouts: Timeouts = Timeouts()
    concurrency_key: Annotated[str, Meta(max_length=256)] = ""
    concurrency_limit: NonNegInt = 0
    group: Annotated[str, Meta(max_length=256)] = ""
    not_before: Annotated[float, Meta(ge=0)] = 0.0
    metadata: dict[str, str] = {}
    # What the job sees of the world besides its own files.
    network: bool = False  # outbound network; without it a sandboxed job has none
    secrets: Annotated[list[SecretName], Meta(max_length=64)] = []
    secrets_as: Literal["file", "env"] = "file"  # files readable only by the job, or variables
    stdin: Annotated[str, Meta(max_length=MAX_STDIN_BYTES)] = ""  # what the process reads on stdin
    stdin_object: Annotated[str, Meta(max_length=256)] = ""  # a larger stdin, uploaded to jm_uploads
    files: Annotated[list[InputFile], Meta(max_length=1024)] = []


class FallbackSpec(JobSpecBase, frozen=True, kw_only=True, omit_defaults=True):
    """The job that runs in place of one whose attempts are exhausted: another command,
    handler or image. It runs once (it has no retry policy, so no fallback of its own)."""


class RetryPolicy(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the scheduler does when an attempt fails or is lost.

    Attributes:
        max_attempts: attempts in all, the first included (1: never retry).
        backoff: seconds before the second attempt; each retry doubles it.
        backoff_max: the longest wait between attempts.
        jitter: how much shorter than the doubled delay a wait may be, as a fraction, so
            that jobs that failed together do not all come back together.
        retry_on: the failure codes that are retried; [] means
            :data:`RETRY_ON_BY_DEFAULT`.
        migrate_after: after this many failures on one node, later attempts avoid that
            node (0: never).
        migrate_zone: when migrating, avoid the node's whole zone too.
        fallback: runs in place of the job once its last attempt failed.
    """

    max_attempts: Annotated[int, Meta(ge=1, le=100)] = 1
    backoff: Annotated[float, Meta(gt=0, le=86400)] = 1.0
    backoff_max: Annotated[float, Meta(gt=0, le=86400)] = 300.0
    jitter: Annotated[float, Meta(ge=0, le=1)] = 0.25
    retry_on: Annotated[list[str], Meta(max_length=32)] = []
    migrate_after: Annotated[int, Meta(ge=0, le=100)] = 0
    migrate_zone: bool = False
    fallback: FallbackSpec | None = None

    def retries(self, code: str) -> bool:
        """Whether this policy retries a failure with ``code`` (attempts left aside)."""
        return code in (self.retry_on or RETRY_ON_BY_DEFAULT)


# --- dependencies and workflow steps ----------------------------------------------

# What a dependency waits for: ``succeeded`` (Slurm's afterok), ``failed`` (afternotok: the
# job gave up or expired) or ``ended`` (afterany: any end, a cancel included).
DependencyCondition = Literal["succeeded", "failed", "ended"]
DEPENDENCY_CONDITIONS: tuple[str, ...] = typing.get_args(DependencyCondition)
MAX_DEPENDENCIES = 1000


class Dependency(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A job this job waits for, and which of its ends lets this one run.

    The scheduler holds the job until every dependency has ended as ``when`` allows; a
    dependency that ends otherwise skips the job (it ends cancelled, ``skipped``).

    Attributes:
        job_id: the job waited for.
        when: the end that satisfies the dependency.
        step: the workflow step the job is, for the words "waiting for: extract".
        partition: the scheduler partition of the job waited for (the partition of its
            queue); -1 when unknown, which a scheduler takes for its own.
    """

    job_id: Id
    when: DependencyCondition = "succeeded"
    step: str = ""
    partition: Annotated[int, Meta(ge=-1)] = -1


class UpstreamRef(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An upstream step whose result a step's templates may read.

    Attributes:
        job_id: the step's job (a mapped step: its map job, whose result lists its items' jobs).
        mapped: the step maps over a list; its result is the list of its items' results.
    """

    job_id: Id
    mapped: bool = False


class ItemRef(Struct, frozen=True, kw_only=True):
    """The item a mapped job runs for: element ``index`` of the list at ``path`` in the
    result of ``job_id`` (read by reference when the job starts, never copied inline)."""

    job_id: Id
    path: list[str | int]
    index: NonNegInt


class StepRef(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where a job sits in a workflow run, and what its templates may read.

    Attributes:
        workflow_id: the run.
        step: the step's name.
        index: a mapped item's position in its list; -1 for a step's own job.
        upstream: the steps named in this step's templates, by name.
        item: what ``${item}`` is (mapped items only).
    """

    workflow_id: Id
    step: Annotated[str, Meta(min_length=1, max_length=128)]
    index: Annotated[int, Meta(ge=-1)] = -1
    upstream: dict[str, UpstreamRef] = {}
    item: ItemRef | None = None


class MapSpec(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Run a step once per item of a list from an upstream result (fan-out).

    Attributes:
        over: the template that names the list, e.g. ``${steps.extract.result.items}``.
        concurrency: at most this many items run at once (0: no cap of its own).
        source: the job whose result holds the list (filled in at submit).
        path: the path to the list inside that result (filled in at submit).
    """

    over: Annotated[str, Meta(min_length=1, max_length=1024)]
    concurrency: Annotated[int, Meta(ge=0, le=10_000)] = 0
    source: str = ""
    path: list[str | int] = []


class JobSpec(JobSpecBase, frozen=True, kw_only=True, omit_defaults=True):
    """Everything a user declares about one job."""

    retry: RetryPolicy = RetryPolicy()
    after: Annotated[list[Dependency], Meta(max_length=MAX_DEPENDENCIES)] = []
    # Store the result by reference (jm_results ``step/<job_id>``) so that later jobs can
    # read it, however small: set on every workflow step.
    keep_result: bool = False
    step: StepRef | None = None  # set by the trigger on a workflow's jobs
    map: MapSpec | None = None  # a mapped step: the scheduler runs one job per item


class JobError(Struct, frozen=True, kw_only=True):
    """Why an attempt failed: a stable code (a :data:`FailureCode`) and a human message."""

    code: str
    message: str


# --- lifecycle events (stream JM_JOBS / JM_DISPATCH) ---------------------------------


class JobEvent(Struct, frozen=True, kw_only=True):
    """What every lifecycle event carries: the job and its scheduler partition."""

    job_id: Id
    partition: NonNegInt


class AttemptEvent(JobEvent, frozen=True, kw_only=True):
    """What every event about one attempt carries besides: the attempt number, which
    fences off events of a stale attempt."""

    attempt: AttemptNumber


class JobSubmitted(JobEvent, frozen=True, kw_only=True, tag="job.submitted"):
    """A job was accepted; published by the trigger with Nats-Msg-Id = idempotency key
    (or by the scheduler, for a fallback job, with ``fallback_of`` set)."""

    spec: JobSpec
    idempotency_key: str
    submitted_at: float
    fallback_of: str = ""  # the job this one runs in place of
    origin: JobOrigin | None = None  # the trigger rule and event that started it, if one did


class JobReady(AttemptEvent, frozen=True, kw_only=True, tag="job.ready"):
    """The scheduler released an attempt; candidates are ranked best first."""

    spec: JobSpec
    candidates: list[str]
    submitted_at: float
    ready_at: float
    release: Annotated[int, Meta(ge=1)] = 1  # counts re-releases of the same attempt
    tiers: list[int] = []  # locality tier of each candidate (lower is nearer); [] = all equal
    checkpoint: str = ""  # the last checkpoint an earlier attempt reported, for this one


class JobUnplaceable(AttemptEvent, frozen=True, kw_only=True, tag="job.unplaceable"):
    """The binder could not reserve any candidate; the scheduler will hold the job."""

    reason: str
    at: float
    release: Annotated[int, Meta(ge=1)] = 1  # the JobReady.release this answers


class JobWaiting(AttemptEvent, frozen=True, kw_only=True, tag="job.waiting"):
    """The scheduler holds the attempt back, and says why: its start time, its sequential
    group, its concurrency key, or no node that fits. Published when the reason first
    applies (not again while it stays the same), so history shows every wait."""

    reason: str
    at: float
    release: NonNegInt = 0  # releases of this attempt so far (orders it among them)
    wait: Annotated[int, Meta(ge=1)] = 1  # counts this attempt's waits (numbers their ids)


class JobBound(AttemptEvent, frozen=True, kw_only=True, tag="job.bound"):
    """Resources are reserved on ``node_id``; sent on that node's dispatch subject."""

    node_id: Id
    spec: JobSpec
    scratch_dir: str
    submitted_at: float
    bound_at: float
    checkpoint: str = ""  # from JobReady: what the attempt starts from
    gpu_devices: list[int] = []  # the indices of the node's GPUs reserved for this attempt


class JobStarted(AttemptEvent, frozen=True, kw_only=True, tag="job.started"):
    """The executor started the attempt."""

    node_id: Id
    at: float
    incarnation: str = ""  # the executor process that runs it (NodeInfo.incarnation)


class JobSucceeded(AttemptEvent, frozen=True, kw_only=True, tag="job.succeeded"):
    """The attempt ended with exit code 0 (or a mapped step's items all succeeded)."""

    # A node id, or "" for a mapped step, which the scheduler ends without running it: the
    # constraint was loosened from Id (same type; a v1.0 reader refuses only those ends).
    node_id: str
    exit_code: int
    output_tail: str
    submitted_at: float
    started_at: float
    at: float
    result: str = ""  # the result file, when it is small and UTF-8 text
    result_ref: str = ""  # else its key in the object store bucket jm_results
    result_bytes: int = 0
    # What a completion rule filters on (the job's queue, name and metadata labels), so a
    # consumer of job ends needs no lookup of the spec.
    queue: str = ""
    name: str = ""
    metadata: dict[str, str] = {}


class JobFailed(AttemptEvent, frozen=True, kw_only=True, tag="job.failed"):
    """The attempt ended badly: non-zero exit, timeout, or a runtime error."""

    node_id: str
    exit_code: int | None
    error: JobError
    output_tail: str
    submitted_at: float
    started_at: float
    at: float


class JobExpired(JobEvent, frozen=True, kw_only=True, tag="job.expired"):
    """The job was not started before its queue timeout."""

    attempt: NonNegInt  # the attempt that never started (0 from schedulers before v1.1)
    reason: str
    at: float
    # What a completion rule filters on (the job's queue, name and metadata labels), so a
    # consumer of job ends needs no lookup of the spec.
    queue: str = ""
    name: str = ""
    metadata: dict[str, str] = {}


class JobLost(AttemptEvent, frozen=True, kw_only=True, tag="job.lost"):
    """The attempt's lease expired, or its executor restarted without it.

    Published by the scheduler that owns the job's partition (lease expiry, bind timeout)
    or by the executor itself (it restarted, or refused a dispatch it may have run before).
    """

    node_id: str
    at: float
    reason: str = ""


class AttemptError(Struct, frozen=True, kw_only=True):
    """How one attempt of a job ended, as the scheduler saw it (JobGaveUp lists them all)."""

    attempt: int
    node_id: str
    error: JobError
    at: float


class JobRetrying(AttemptEvent, frozen=True, kw_only=True, tag="job.retrying"):
    """The scheduler will run the job again: ``attempt`` failed (or was lost), and
    ``next_attempt`` is released once ``not_before`` has passed."""

    node_id: str
    error: JobError
    next_attempt: AttemptNumber
    delay: float  # seconds of backoff before next_attempt
    not_before: float
    avoid: list[str] = []  # nodes the next attempts avoid (migrate_after)
    at: float


class JobGaveUp(AttemptEvent, frozen=True, kw_only=True, tag="job.gave_up"):
    """The job ended failed for good: ``attempt`` was its last. ``state`` is how that
    attempt ended; ``errors`` lists every attempt's error, in order."""

    state: Literal["failed", "lost"]
    node_id: str
    error: JobError
    reason: str  # why no retry: attempts exhausted, code not retried, total timeout
    errors: list[AttemptError] = []
    fallback_job_id: str = ""  # the job that runs in its place, if the policy has one
    at: float
    # What a completion rule filters on (the job's queue, name and metadata labels), so a
    # consumer of job ends needs no lookup of the spec.
    queue: str = ""
    name: str = ""
    metadata: dict[str, str] = {}


class JobCancelling(AttemptEvent, frozen=True, kw_only=True, tag="job.cancelling"):
    """A cancel arrived while ``attempt`` was out of the scheduler's hands (at the binder
    or running): the binder forwards it to the attempt's node, which stops it."""

    reason: str
    at: float


class JobCancelled(JobEvent, frozen=True, kw_only=True, tag="job.cancelled"):
    """The job ended cancelled; it never runs again. ``attempt`` is the attempt that was
    stopped, or the one that never started."""

    attempt: NonNegInt
    reason: str
    node_id: str = ""
    at: float
    # What a completion rule filters on (the job's queue, name and metadata labels), so a
    # consumer of job ends needs no lookup of the spec.
    queue: str = ""
    name: str = ""
    metadata: dict[str, str] = {}
    skipped: bool = False  # it never ran because a dependency ended as it did not need


class DependencyWatch(JobEvent, frozen=True, kw_only=True, tag="job.dep_watch"):
    """A scheduler partition asks the partition of ``job_id`` to say when that job ends:
    a job of ``watcher`` depends on it. Sent on the watched job's partition subject."""

    watcher: NonNegInt
    at: float


class ParentRef(Struct, frozen=True, kw_only=True):
    """The workflow step whose handler submitted a job (``ctx.submit``): the step counts as
    ended for the steps that need it only once such child jobs have ended too."""

    job_id: Id
    partition: NonNegInt
    # The step's run and name: the child is listed with the run.
    workflow_id: Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9_\-]*$")] = ""
    step: Annotated[str, Meta(max_length=128)] = ""


class ChildAdded(JobEvent, frozen=True, kw_only=True, tag="job.child_added"):
    """Job ``job_id`` (a workflow step, of ``partition``) submitted ``child``: the steps that
    need it wait for the child too. Published by the trigger with the child's JobSubmitted,
    before the submit is answered, so it precedes the step's own end in its partition."""

    child: Id
    child_partition: NonNegInt
    at: float


class DependencyEnded(JobEvent, frozen=True, kw_only=True, tag="job.dep_ended"):
    """Job ``job_id`` ended (``outcome``: succeeded, failed, cancelled or expired); sent to
    each partition that watches it, on that partition's subject (``partition``)."""

    outcome: Literal["succeeded", "failed", "cancelled", "expired"]
    at: float


class AttemptCancel(Struct, frozen=True, kw_only=True, tag="node.cancel"):
    """Stop this attempt now (SIGTERM, then SIGKILL after the grace period); sent on the
    attempt's node's cancel subject. An attempt not started yet never starts."""

    job_id: Id
    attempt: AttemptNumber
    partition: NonNegInt
    node_id: Id
    reason: str
    at: float


class LogLine(Struct, frozen=True, kw_only=True, tag="job.log"):
    """One line of an attempt's output (stream JM_LOGS)."""

    job_id: Id
    attempt: AttemptNumber
    stream: Literal["stdout", "stderr"]
    line: str
    at: float


LifecycleEvent = (
    JobSubmitted
    | JobReady
    | JobWaiting
    | JobUnplaceable
    | JobBound
    | JobStarted
    | JobSucceeded
    | JobFailed
    | JobExpired
    | JobLost
    | JobRetrying
    | JobGaveUp
    | JobCancelling
    | JobCancelled
    | DependencyWatch
    | DependencyEnded
    | ChildAdded
)
# An attempt has ended (its reservation, if any, can be freed).
TerminalEvent = JobSucceeded | JobFailed | JobExpired | JobLost | JobCancelled
# A job has ended for good (what a rule that fires on "the end of an earlier job" reads).
JobEnd = JobSucceeded | JobGaveUp | JobCancelled | JobExpired
