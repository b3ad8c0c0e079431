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
    "FAILURE_CODE_NAMES",
    "ISOLATION_LEVELS",
    "MAX_DISRUPTIONS",
    "MAX_REPLICAS",
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
    "MemberSucceeded",
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
# The largest gang jobmesh places (JobSpec.replicas): more members than this is no cluster
# jobmesh is built for, and its JobReady would carry thousands of candidates.
MAX_REPLICAS = 1024
Rank = Annotated[int, Meta(ge=0, lt=MAX_REPLICAS)]
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
    "preempted",  # a higher-priority job needed its room; it was stopped and requeued
]
FAILURE_CODES: frozenset[str] = frozenset(typing.get_args(FailureCode))
FAILURE_CODE_NAMES: tuple[str, ...] = typing.get_args(FailureCode)  # in declaration order, for the schema
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
# Disruptions are not the job's fault (an operator drained its node, a higher-priority job
# preempted it): they are retried whatever the policy says, and do not count toward
# max_attempts; drains up to this many (preemptions without a cap).
DISRUPTION_CODES: frozenset[str] = frozenset({"node_drained", "preempted"})
MAX_DISRUPTIONS = 10


class Resources(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What one attempt reserves on its node for as long as it runs."""

    cpu_milli: Annotated[NonNegInt, Meta(description="CPU, in millicores (1000 = one core); default 100.")] = 100
    memory_mb: Annotated[
        NonNegInt, Meta(description="Memory, in MiB; default 64. Exceeding it ends the attempt with oom.")
    ] = 64
    gpu: Annotated[NonNegInt, Meta(description="GPUs, a count; 0 (the default): none.")] = 0
    gpu_kind: Annotated[str, Meta(description="The GPU model wanted; empty: any kind.")] = ""
    disk_mb: Annotated[NonNegInt, Meta(description="Scratch disk, in MiB; 0 (the default): no quota reserved.")] = 0


class ProcessRuntime(Struct, frozen=True, kw_only=True, tag="process", tag_field="kind"):
    """Run ``argv`` as a subprocess in a fresh working directory."""

    argv: Annotated[
        list[str],
        Meta(min_length=1),
        Meta(description="The command and its arguments (at least one); argv[0] is looked up on the node's PATH."),
    ]
    env: Annotated[
        dict[str, str],
        Meta(
            description="Environment variables added to the node's minimal environment (name to value); empty adds none."
        ),
    ] = {}


class NoopRuntime(Struct, frozen=True, kw_only=True, tag="noop", tag_field="kind"):
    """Succeed at once without starting a process (benchmarks, smoke tests)."""

    exit_code: Annotated[NonNegInt, Meta(description="The exit code it ends with (default 0: success).")] = 0


class HandlerRuntime(Struct, frozen=True, kw_only=True, tag="handler", tag_field="kind"):
    """Call the Python handler ``handler`` hosted by the node's worker pool with ``input``.

    ``input`` is JSON for the handler's input type; it is checked against that type at
    submit when an executor has advertised it, else when the attempt runs. The handler's
    return value is the job's result (JSON).
    """

    handler: Annotated[Name, Meta(description="The handler's name, as an executor advertises it (KV jm_handlers).")]
    input: Annotated[
        Any, Meta(description="The handler's input, JSON for its input type; null when it takes none.")
    ] = None


class ContainerRuntime(Struct, frozen=True, kw_only=True, tag="container", tag_field="kind"):
    """Run ``argv`` (or the image's own command when empty) in a container of ``image``,
    with the same limits, network policy, files and secrets as a process."""

    image: Annotated[
        str,
        Meta(min_length=1, max_length=512, pattern=r"^[^\s\x00]+$"),
        Meta(description="The container image to run (a reference the node's engine can pull or has)."),
    ]
    argv: Annotated[
        list[str], Meta(description="The command in the container; empty runs the image's own command.")
    ] = []
    env: Annotated[
        dict[str, str],
        Meta(
            description="Environment variables added to the node's minimal environment (name to value); empty adds none."
        ),
    ] = {}


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

    path: Annotated[
        RelativePath,
        Meta(description='Where the file goes, relative to the working directory (no "..", no leading "/").'),
    ]
    object: Annotated[
        str,
        Meta(max_length=256),
        Meta(
            description="Its object name in the jm_uploads bucket (uploaded with the submit); empty when node_path is given."
        ),
    ] = ""
    node_path: Annotated[
        str,
        Meta(max_length=4096),
        Meta(
            description="An absolute path on the node, under one its operator allows (JOBMESH_ALLOWED_INPUT_PATHS); empty when object is given."
        ),
    ] = ""
    size: Annotated[
        NonNegInt, Meta(description="Its size in bytes, as uploaded (checked when fetched); 0 for a node path.")
    ] = 0
    mode: Annotated[int, Meta(ge=0, le=0o777), Meta(description="Its permission bits (default 0o644 = 420).")] = 0o644


class Constraints(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Hard placement constraints: a node that fails any of these is never a candidate."""

    arch: Annotated[
        str, Meta(description="Only nodes of this architecture (NodeInfo.arch, e.g. x86_64, aarch64); empty: any.")
    ] = ""
    isolation: Annotated[
        Literal["", "process", "sandbox", "container", "vm"],
        Meta(
            description="Only nodes that enforce at least this isolation level (process < sandbox < container < vm); empty: any."
        ),
    ] = ""
    labels: Annotated[
        dict[str, str], Meta(description="Only nodes that have all these labels with these values; empty: any node.")
    ] = {}
    handler: Annotated[str, Meta(description="Only nodes that host this Python handler; empty: any.")] = ""


class Locality(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Soft placement hints: nodes near these score higher."""

    zone: Annotated[
        str, Meta(description="Prefer nodes in this zone, then the nearest (ZoneMap); empty: no preference.")
    ] = ""
    dataset: Annotated[
        str, Meta(description="Prefer nodes that hold this dataset locally (NodeInfo.datasets); empty: none.")
    ] = ""


class Timeouts(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Deadlines, in seconds; 0 means none.

    Attributes:
        queue: the job expires if no attempt started within this long of the submission.
        run: one attempt is stopped (``timeout``) after running this long.
        heartbeat: an attempt whose lease is not renewed within this long is lost.
        total: across all attempts, from the submission: once passed, a failed attempt is
            not retried and a running one is stopped (``timeout``).
    """

    queue: Annotated[
        float,
        Meta(ge=0),
        Meta(
            description="The job expires if no attempt started within this many seconds of the submission; 0 (the default): never."
        ),
    ] = 0.0
    run: Annotated[
        float,
        Meta(gt=0, le=30 * 86400),
        Meta(
            description="One attempt is stopped (timeout) after running this many seconds (default 3600, at most 30 days)."
        ),
    ] = 3600.0
    heartbeat: Annotated[
        float,
        Meta(ge=1, le=3600),
        Meta(
            description="An attempt whose lease is not renewed within this many seconds is lost (1 to 3600, default 10)."
        ),
    ] = 10.0
    total: Annotated[
        float,
        Meta(ge=0),
        Meta(
            description="Seconds across all attempts from the submission; once passed a failed attempt is not retried and a running one is stopped. 0 (the default): none."
        ),
    ] = 0.0


class JobSpecBase(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The fields a job and a fallback job share: what runs, where and when."""

    runtime: Annotated[
        JobRuntime, Meta(description="What runs: a process, a Python handler, a container, or noop (tagged by kind).")
    ]
    name: Annotated[
        str, Meta(max_length=256), Meta(description="A name for people (at most 256 characters); empty: none.")
    ] = ""
    queue: Annotated[
        Name, Meta(description='The queue it waits in (letters, digits, _ . -); "default" when not given.')
    ] = "default"
    tenant: Annotated[
        Name,
        Meta(description='The job\'s tenant (fair share between tenants); "default" when the submitter named none.'),
    ] = "default"
    priority: Annotated[
        Priority,
        Meta(description="Priority from 0 (lowest) to 9 (highest); higher runs first within a tenant's share."),
    ] = 5
    preempt: Annotated[
        bool,
        Meta(
            description="When it fits on no node, stop lower-priority preemptible attempts to make room; its queue must allow this for its priority (QueueConfig.preempt_min_priority). Default false."
        ),
    ] = False
    preemptible: Annotated[
        bool,
        Meta(
            description="Whether a higher-priority job may stop its attempt to make room (it is then requeued, the attempt counted preempted, not failed). Default true."
        ),
    ] = True
    resources: Annotated[
        Resources, Meta(description="What one attempt reserves on its node (default: 100 millicores, 64 MiB).")
    ] = Resources()
    constraints: Annotated[Constraints, Meta(description="Hard placement constraints; empty: any node.")] = (
        Constraints()
    )
    locality: Annotated[Locality, Meta(description="Soft placement hints; empty: none.")] = Locality()
    timeouts: Annotated[Timeouts, Meta(description="Deadlines, in seconds.")] = Timeouts()
    concurrency_key: Annotated[
        str,
        Meta(max_length=256),
        Meta(description="Jobs with the same key share its concurrency limit; empty: no key."),
    ] = ""
    concurrency_limit: Annotated[
        NonNegInt, Meta(description="At most this many jobs with the same concurrency_key run at once; 0: no limit.")
    ] = 0
    group: Annotated[
        str,
        Meta(max_length=256),
        Meta(
            description="A sequential group: jobs with the same group run one at a time, in submission order; empty: none."
        ),
    ] = ""
    not_before: Annotated[
        float,
        Meta(ge=0),
        Meta(description="Do not start before this time. Unix time, in seconds; 0: as soon as possible."),
    ] = 0.0
    metadata: Annotated[
        dict[str, str], Meta(description="Labels for people and for completion rules (string to string); empty: none.")
    ] = {}
    # What the job sees of the world besides its own files.
    network: Annotated[
        bool, Meta(description="Allow outbound network access; without it (the default) a sandboxed job has none.")
    ] = False
    secrets: Annotated[
        list[SecretName],
        Meta(max_length=64),
        Meta(description="Names of secrets the node provides to the job (at most 64); empty: none."),
    ] = []
    secrets_as: Annotated[
        Literal["file", "env"],
        Meta(
            description="How the job gets its secrets: file (readable only by the job, the default) or env (variables)."
        ),
    ] = "file"
    stdin: Annotated[
        str,
        Meta(max_length=MAX_STDIN_BYTES),
        Meta(description="What the process reads on stdin (at most 64 KiB); empty: nothing."),
    ] = ""
    stdin_object: Annotated[
        str,
        Meta(max_length=256),
        Meta(description="A larger stdin, uploaded to jm_uploads, by object name; empty: none."),
    ] = ""
    files: Annotated[
        list[InputFile],
        Meta(max_length=1024),
        Meta(description="Files the working directory starts with (at most 1024); empty: none."),
    ] = []


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

    max_attempts: Annotated[
        int,
        Meta(ge=1, le=100),
        Meta(description="Attempts in all, the first included (1 to 100; 1, the default: never retry)."),
    ] = 1
    backoff: Annotated[
        float,
        Meta(gt=0, le=86400),
        Meta(description="Seconds before the second attempt; each retry doubles it (default 1)."),
    ] = 1.0
    backoff_max: Annotated[
        float, Meta(gt=0, le=86400), Meta(description="The longest wait between attempts, in seconds (default 300).")
    ] = 300.0
    jitter: Annotated[
        float,
        Meta(ge=0, le=1),
        Meta(
            description="How much shorter than the doubled delay a wait may be, as a fraction from 0 to 1 (default 0.25)."
        ),
    ] = 0.25
    retry_on: Annotated[
        list[str],
        Meta(max_length=32),
        Meta(
            description="The FailureCodes that are retried; empty: exit_code, lost, timeout, oom, executor_error, handler_failed, handler_crashed, handler_missing, container_failed."
        ),
    ] = []
    migrate_after: Annotated[
        int,
        Meta(ge=0, le=100),
        Meta(description="After this many failures on one node, later attempts avoid it; 0 (the default): never."),
    ] = 0
    migrate_zone: Annotated[
        bool, Meta(description="When migrating, avoid the node's whole zone too (default false).")
    ] = False
    fallback: Annotated[
        FallbackSpec | None,
        Meta(description="A job that runs once in place of this one after its last attempt failed; null: none."),
    ] = None

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

    job_id: Annotated[Id, Meta(description="The job waited for.")]
    when: Annotated[
        DependencyCondition,
        Meta(
            description="Which end satisfies it: succeeded (the default), failed (gave up or expired) or ended (any end)."
        ),
    ] = "succeeded"
    step: Annotated[
        str,
        Meta(
            description='The workflow step the job waited for is, for messages such as "waiting for: extract"; empty outside workflows.'
        ),
    ] = ""
    partition: Annotated[
        int,
        Meta(ge=-1),
        Meta(
            description="The scheduler partition of the job waited for; -1 (the default) when unknown, which a scheduler takes for its own."
        ),
    ] = -1


class UpstreamRef(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An upstream step whose result a step's templates may read.

    Attributes:
        job_id: the step's job (a mapped step: its map job, whose result lists its items' jobs).
        mapped: the step maps over a list; its result is the list of its items' results.
    """

    job_id: Annotated[Id, Meta(description="The upstream step's job (a mapped step: its map job).")]
    mapped: Annotated[
        bool, Meta(description="True when the step maps over a list: its result is the list of its items' results.")
    ] = False


class ItemRef(Struct, frozen=True, kw_only=True):
    """The item a mapped job runs for: element ``index`` of the list at ``path`` in the
    result of ``job_id`` (read by reference when the job starts, never copied inline)."""

    job_id: Annotated[Id, Meta(description="The job whose result holds the list.")]
    path: Annotated[list[str | int], Meta(description="The path to the list inside that result (keys and indices).")]
    index: Annotated[NonNegInt, Meta(description="The item's position in the list, from 0.")]


class StepRef(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where a job sits in a workflow run, and what its templates may read.

    Attributes:
        workflow_id: the run.
        step: the step's name.
        index: a mapped item's position in its list; -1 for a step's own job.
        upstream: the steps named in this step's templates, by name.
        item: what ``${item}`` is (mapped items only).
    """

    workflow_id: Annotated[Id, Meta(description="The run.")]
    step: Annotated[str, Meta(min_length=1, max_length=128), Meta(description="The step's name.")]
    index: Annotated[
        int,
        Meta(ge=-1),
        Meta(description="A mapped item's position in its list; -1 (the default) for a step's own job."),
    ] = -1
    upstream: Annotated[
        dict[str, UpstreamRef], Meta(description="The steps named in this step's templates, by name; empty: none.")
    ] = {}
    item: Annotated[ItemRef | None, Meta(description="What ${item} is (mapped items only); null otherwise.")] = None


class MapSpec(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Run a step once per item of a list from an upstream result (fan-out).

    Attributes:
        over: the template that names the list, e.g. ``${steps.extract.result.items}``.
        concurrency: at most this many items run at once (0: no cap of its own).
        source: the job whose result holds the list (filled in at submit).
        path: the path to the list inside that result (filled in at submit).
    """

    over: Annotated[
        str,
        Meta(min_length=1, max_length=1024),
        Meta(description="The template naming the list, e.g. ${steps.extract.result.items}."),
    ]
    concurrency: Annotated[
        int, Meta(ge=0, le=10_000), Meta(description="At most this many items run at once; 0: no cap of its own.")
    ] = 0
    source: Annotated[
        str, Meta(description="The job whose result holds the list (filled in at submit); empty before.")
    ] = ""
    path: Annotated[
        list[str | int],
        Meta(description="The path to the list inside that result (filled in at submit); empty: the result itself."),
    ] = []


class JobSpec(JobSpecBase, frozen=True, kw_only=True, omit_defaults=True):
    """Everything a user declares about one job."""

    retry: Annotated[
        RetryPolicy,
        Meta(description="What the scheduler does when an attempt fails or is lost (default: one attempt, no retry)."),
    ] = RetryPolicy()
    after: Annotated[
        list[Dependency],
        Meta(max_length=MAX_DEPENDENCIES),
        Meta(description="Jobs this one waits for, and which of their ends let it run (at most 1000); empty: none."),
    ] = []
    # Store the result by reference (jm_results ``step/<job_id>``) so that later jobs can
    # read it, however small: set on every workflow step.
    keep_result: Annotated[
        bool,
        Meta(
            description="Store the result by reference (jm_results step/<job_id>) so later jobs can read it, however small; default false."
        ),
    ] = False
    step: Annotated[
        StepRef | None,
        Meta(description="Where the job sits in a workflow run (set by the trigger); null outside workflows."),
    ] = None
    map: Annotated[
        MapSpec | None, Meta(description="A mapped step: run one job per item of an upstream list; null otherwise.")
    ] = None
    # A gang (docs/scheduling.md#gangs): every member on a node of its own, all reserved or
    # none, started together; one member failing fails the attempt of all.
    replicas: Annotated[
        int,
        Meta(ge=1, le=MAX_REPLICAS),
        Meta(
            description="How many members run at once, each on a node of its own with these resources (a gang, at most 1024); 1: a plain job."
        ),
    ] = 1
    same: Annotated[
        str,
        Meta(max_length=300),
        Meta(
            description='With replicas: put every member on nodes sharing this attribute\'s value: "zone" or "label:<key>"; empty: any nodes.'
        ),
    ] = ""
    spread: Annotated[
        Literal["spread", "pack"],
        Meta(
            description="With replicas: spread takes the roomiest nodes (the default), pack the fullest that fit, leaving roomy nodes whole."
        ),
    ] = "spread"


class JobError(Struct, frozen=True, kw_only=True):
    """Why an attempt failed: a stable code (a :data:`FailureCode`) and a human message."""

    code: Annotated[
        str,
        Meta(
            description="Why the attempt failed: a stable FailureCode. A later v1 may add codes: treat an unknown one as a failure.",
            extra_json_schema={"enum": list(FAILURE_CODE_NAMES)},
        ),
    ]
    message: Annotated[str, Meta(description="What happened, in words.")]


# --- lifecycle events (stream JM_JOBS / JM_DISPATCH) ---------------------------------


class JobEvent(Struct, frozen=True, kw_only=True):
    """What every lifecycle event carries: the job and its scheduler partition."""

    job_id: Annotated[
        Id,
        Meta(
            description='The job\'s id: 32 hex characters derived from its idempotency key (docs/integrations.md, "Job ids").'
        ),
    ]
    partition: Annotated[
        NonNegInt, Meta(description="The scheduler partition of the job's queue: crc32(queue) % JOBMESH_PARTITIONS.")
    ]


class AttemptEvent(JobEvent, frozen=True, kw_only=True):
    """What every event about one attempt carries besides: the attempt number, which
    fences off events of a stale attempt."""

    attempt: Annotated[
        AttemptNumber,
        Meta(
            description="The attempt number, counted from 1; events of an older attempt than the job's current one are ignored."
        ),
    ]


class JobSubmitted(JobEvent, frozen=True, kw_only=True, tag="job.submitted"):
    """A job was accepted; published by the trigger with Nats-Msg-Id = idempotency key
    (or by the scheduler, for a fallback job, with ``fallback_of`` set)."""

    spec: Annotated[JobSpec, Meta(description="The job as its submitter declared it (JobSpec).")]
    idempotency_key: Annotated[
        str,
        Meta(
            description="The key the job id derives from (the submitter's, or one generated for a submit without a key)."
        ),
    ]
    submitted_at: Annotated[float, Meta(description="When the job was accepted. Unix time, in seconds.")]
    fallback_of: Annotated[
        str, Meta(description="The job this one runs in place of (a fallback); empty otherwise.")
    ] = ""
    origin: Annotated[
        JobOrigin | None, Meta(description="The trigger rule and event that started the job; null for a plain submit.")
    ] = None


class JobReady(AttemptEvent, frozen=True, kw_only=True, tag="job.ready"):
    """The scheduler released an attempt; candidates are ranked best first."""

    spec: Annotated[JobSpec, Meta(description="The job's spec, as the binder reserves and the executor runs it.")]
    candidates: Annotated[
        list[str], Meta(description="Node ids that fit, best first; the binder takes the first it can reserve.")
    ]
    submitted_at: Annotated[float, Meta(description="When the job was accepted. Unix time, in seconds.")]
    ready_at: Annotated[float, Meta(description="When the scheduler released it. Unix time, in seconds.")]
    release: Annotated[
        int,
        Meta(ge=1),
        Meta(
            description="Counts the releases of this attempt by the scheduler, from 1 (a refused release is released again)."
        ),
    ] = 1
    tiers: Annotated[
        list[int],
        Meta(description="The locality tier of each candidate (lower is nearer), in the same order; empty: all equal."),
    ] = []
    checkpoint: Annotated[
        str,
        Meta(
            description="The last checkpoint the job reported (free text it chose); empty when none: the attempt starts afresh."
        ),
    ] = ""


class JobUnplaceable(AttemptEvent, frozen=True, kw_only=True, tag="job.unplaceable"):
    """The binder could not reserve any candidate; the scheduler will hold the job."""

    reason: Annotated[str, Meta(description="Why no candidate could be reserved.")]
    at: Annotated[float, Meta(description="When this happened. Unix time, in seconds.")]
    release: Annotated[int, Meta(ge=1), Meta(description="The JobReady.release this answers.")] = 1
    retry_after: Annotated[
        float,
        Meta(ge=0),
        Meta(
            description="Release it again after at most this many seconds (room is held for it and frees soon); 0: the scheduler's own backoff."
        ),
    ] = 0.0


class JobWaiting(AttemptEvent, frozen=True, kw_only=True, tag="job.waiting"):
    """The scheduler holds the attempt back, and says why: its start time, its sequential
    group, its concurrency key, or no node that fits. Published when the reason first
    applies (not again while it stays the same), so history shows every wait."""

    reason: Annotated[
        str,
        Meta(
            description="Why the scheduler holds the attempt back (start time, group, concurrency key, no fitting node)."
        ),
    ]
    at: Annotated[float, Meta(description="When this happened. Unix time, in seconds.")]
    release: Annotated[NonNegInt, Meta(description="Releases of this attempt so far (orders the wait among them).")] = 0
    wait: Annotated[
        int, Meta(ge=1), Meta(description="Counts this attempt's waits, from 1 (numbers their message ids).")
    ] = 1


class JobBound(AttemptEvent, frozen=True, kw_only=True, tag="job.bound"):
    """Resources are reserved on ``node_id``; sent on that node's dispatch subject."""

    node_id: Annotated[Id, Meta(description="The node the resources are reserved on.")]
    spec: Annotated[JobSpec, Meta(description="The job as its submitter declared it (JobSpec).")]
    scratch_dir: Annotated[str, Meta(description="The attempt's scratch directory on the node.")]
    submitted_at: Annotated[float, Meta(description="When the job was accepted. Unix time, in seconds.")]
    bound_at: Annotated[float, Meta(description="When the binder reserved the resources. Unix time, in seconds.")]
    checkpoint: Annotated[
        str,
        Meta(
            description="The last checkpoint the job reported (free text it chose); empty when none: the attempt starts afresh."
        ),
    ] = ""
    gpu_devices: Annotated[
        list[int],
        Meta(description="The indices of the node's GPUs reserved for this attempt; empty when it reserved none."),
    ] = []
    # A gang member's place in its gang: the job sees them as JOBMESH_RANK,
    # JOBMESH_WORLD_SIZE and JOBMESH_PEERS.
    rank: Annotated[Rank, Meta(description="The member's rank in its gang, from 0; 0 for a plain job.")] = 0
    world_size: Annotated[
        int, Meta(ge=1), Meta(description="How many members the gang has (JobSpec.replicas); 1 for a plain job.")
    ] = 1
    peers: Annotated[
        list[str],
        Meta(
            description="Every member's address as \"host:port\", by rank (this one's included); empty for a plain job."
        ),
    ] = []


class JobStarted(AttemptEvent, frozen=True, kw_only=True, tag="job.started"):
    """The executor started the attempt."""

    node_id: Annotated[Id, Meta(description="The node running the attempt.")]
    at: Annotated[float, Meta(description="When the attempt started. Unix time, in seconds.")]
    incarnation: Annotated[
        str,
        Meta(
            description="The executor process that runs it (NodeInfo.incarnation): a new value after every restart; empty when unknown."
        ),
    ] = ""
    rank: Annotated[Rank, Meta(description="The gang member that started (JobBound.rank); 0 for a plain job.")] = 0
    world_size: Annotated[
        int, Meta(ge=1), Meta(description="How many members its gang has (JobBound.world_size); 1 for a plain job.")
    ] = 1


class JobSucceeded(AttemptEvent, frozen=True, kw_only=True, tag="job.succeeded"):
    """The attempt ended with exit code 0 (or a mapped step's items all succeeded)."""

    # A node id, or "" for a mapped step, which the scheduler ends without running it: the
    # constraint was loosened from Id (same type; a v1.0 reader refuses only those ends).
    node_id: Annotated[
        str,
        Meta(description="The node that ran it; empty for a mapped step, which the scheduler ends without running it."),
    ]
    exit_code: Annotated[int, Meta(description="The process's exit code (0).")]
    output_tail: Annotated[
        str,
        Meta(
            description="The last lines of the attempt's output (stdout and stderr), at most a few KiB; empty when it printed nothing."
        ),
    ]
    submitted_at: Annotated[float, Meta(description="When the job was accepted. Unix time, in seconds.")]
    started_at: Annotated[
        float, Meta(description="When the attempt started. Unix time, in seconds; 0 when it has not.")
    ]
    at: Annotated[float, Meta(description="When the attempt ended. Unix time, in seconds.")]
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
    # What a completion rule filters on (the job's queue, name and metadata labels), so a
    # consumer of job ends needs no lookup of the spec.
    queue: Annotated[
        str, Meta(description="The job's queue; empty in an event from a version that did not send it.")
    ] = ""
    name: Annotated[str, Meta(description="The job's name (free text); empty when it has none.")] = ""
    metadata: Annotated[
        dict[str, str], Meta(description="The job's metadata labels (string to string); empty when it has none.")
    ] = {}


class JobFailed(AttemptEvent, frozen=True, kw_only=True, tag="job.failed"):
    """The attempt ended badly: non-zero exit, timeout, or a runtime error."""

    node_id: Annotated[str, Meta(description="The node the attempt ran on.")]
    exit_code: Annotated[
        int | None, Meta(description="The process's exit code; null when it was killed or never started.")
    ]
    error: Annotated[JobError, Meta(description="Why the attempt failed: a stable code (FailureCode) and a message.")]
    output_tail: Annotated[
        str,
        Meta(
            description="The last lines of the attempt's output (stdout and stderr), at most a few KiB; empty when it printed nothing."
        ),
    ]
    submitted_at: Annotated[float, Meta(description="When the job was accepted. Unix time, in seconds.")]
    started_at: Annotated[
        float, Meta(description="When the attempt started. Unix time, in seconds; 0 when it never did.")
    ]
    at: Annotated[float, Meta(description="When the attempt ended. Unix time, in seconds.")]
    # The node record carries it too, but a job that checkpoints and fails at once may end
    # before a record with it reaches the scheduler: the next attempt must not lose it.
    checkpoint: Annotated[
        str,
        Meta(
            description="The last checkpoint the attempt reported (masked as in its lease), for the next attempt; empty when none."
        ),
    ] = ""
    rank: Annotated[
        Rank,
        Meta(description="The gang member that failed (JobBound.rank): it fails the whole attempt; 0 for a plain job."),
    ] = 0
    world_size: Annotated[
        int, Meta(ge=1), Meta(description="How many members its gang has (JobBound.world_size); 1 for a plain job.")
    ] = 1


class MemberSucceeded(AttemptEvent, frozen=True, kw_only=True, tag="job.member_succeeded"):
    """One member of a gang ended with exit code 0. Not the job's end: the scheduler ends the
    attempt with one JobSucceeded once every member has sent this (published by the
    executor on the node form, like JobSucceeded for a plain job)."""

    node_id: Annotated[Id, Meta(description="The node that ran the member.")]
    rank: Annotated[Rank, Meta(description="The member's rank in its gang, from 0.")]
    world_size: Annotated[int, Meta(ge=2), Meta(description="How many members the gang has.")]
    exit_code: Annotated[int, Meta(description="The process's exit code (0).")]
    output_tail: Annotated[
        str,
        Meta(description="The last lines of the member's output, at most a few KiB; empty when it printed nothing."),
    ]
    started_at: Annotated[float, Meta(description="When the member started. Unix time, in seconds.")]
    at: Annotated[float, Meta(description="When the member ended. Unix time, in seconds.")]
    result: Annotated[
        str, Meta(description="The member's result when small UTF-8 text travelled inline; empty otherwise.")
    ] = ""
    result_ref: Annotated[
        str, Meta(description="The result's object name in jm_results when it did not travel inline; empty otherwise.")
    ] = ""
    result_bytes: Annotated[int, Meta(description="The result's size, in bytes; 0 when there is none.")] = 0


class JobExpired(JobEvent, frozen=True, kw_only=True, tag="job.expired"):
    """The job was not started before its queue timeout."""

    attempt: Annotated[NonNegInt, Meta(description="The attempt that never started (0 from schedulers before v1.1).")]
    reason: Annotated[str, Meta(description="Why it expired (its queue timeout passed).")]
    at: Annotated[float, Meta(description="When this happened. Unix time, in seconds.")]
    # What a completion rule filters on (the job's queue, name and metadata labels), so a
    # consumer of job ends needs no lookup of the spec.
    queue: Annotated[
        str, Meta(description="The job's queue; empty in an event from a version that did not send it.")
    ] = ""
    name: Annotated[str, Meta(description="The job's name (free text); empty when it has none.")] = ""
    metadata: Annotated[
        dict[str, str], Meta(description="The job's metadata labels (string to string); empty when it has none.")
    ] = {}


class JobLost(AttemptEvent, frozen=True, kw_only=True, tag="job.lost"):
    """The attempt's lease expired, or its executor restarted without it.

    Published by the scheduler that owns the job's partition (lease expiry, bind timeout)
    or by the executor itself (it restarted, or refused a dispatch it may have run before).
    """

    node_id: Annotated[str, Meta(description="The node the attempt ran or was bound on.")]
    at: Annotated[float, Meta(description="When this happened. Unix time, in seconds.")]
    reason: Annotated[
        str,
        Meta(
            description="Why it is considered lost (lease expired, bind timeout, executor restarted); empty from older versions."
        ),
    ] = ""
    rank: Annotated[Rank, Meta(description="The gang member that was lost; 0 for a plain job or when unknown.")] = 0
    world_size: Annotated[
        int, Meta(ge=1), Meta(description="How many members its gang has (JobBound.world_size); 1 for a plain job.")
    ] = 1


class AttemptError(Struct, frozen=True, kw_only=True):
    """How one attempt of a job ended, as the scheduler saw it (JobGaveUp lists them all)."""

    attempt: Annotated[int, Meta(description="The attempt this error ended.")]
    node_id: Annotated[str, Meta(description="The node the attempt ran on; empty when it never ran.")]
    error: Annotated[JobError, Meta(description="How the attempt failed (code and message).")]
    at: Annotated[float, Meta(description="When the attempt ended. Unix time, in seconds.")]


class JobRetrying(AttemptEvent, frozen=True, kw_only=True, tag="job.retrying"):
    """The scheduler will run the job again: ``attempt`` failed (or was lost), and
    ``next_attempt`` is released once ``not_before`` has passed."""

    node_id: Annotated[str, Meta(description="The node the failed attempt ran on.")]
    error: Annotated[JobError, Meta(description="Why the attempt failed.")]
    next_attempt: Annotated[AttemptNumber, Meta(description="The number of the attempt that follows.")]
    delay: Annotated[float, Meta(description="Seconds of backoff before next_attempt is released.")]
    not_before: Annotated[float, Meta(description="When next_attempt is released. Unix time, in seconds.")]
    avoid: Annotated[
        list[str], Meta(description="Nodes the next attempts avoid (retry.migrate_after); empty: none.")
    ] = []
    at: Annotated[float, Meta(description="When this happened. Unix time, in seconds.")]


class JobGaveUp(AttemptEvent, frozen=True, kw_only=True, tag="job.gave_up"):
    """The job ended failed for good: ``attempt`` was its last. ``state`` is how that
    attempt ended; ``errors`` lists every attempt's error, in order."""

    state: Annotated[Literal["failed", "lost"], Meta(description="How the last attempt ended: failed or lost.")]
    node_id: Annotated[str, Meta(description="The node the last attempt ran on; empty when it never ran.")]
    error: Annotated[JobError, Meta(description="The last attempt's error.")]
    reason: Annotated[
        str, Meta(description="Why no retry: attempts exhausted, code not retried, or the total timeout passed.")
    ]
    errors: Annotated[
        list[AttemptError], Meta(description="Every attempt's error, in order; empty from older schedulers.")
    ] = []
    fallback_job_id: Annotated[
        str, Meta(description="The job that runs in its place when the retry policy has a fallback; empty otherwise.")
    ] = ""
    at: Annotated[float, Meta(description="When this happened. Unix time, in seconds.")]
    # What a completion rule filters on (the job's queue, name and metadata labels), so a
    # consumer of job ends needs no lookup of the spec.
    queue: Annotated[
        str, Meta(description="The job's queue; empty in an event from a version that did not send it.")
    ] = ""
    name: Annotated[str, Meta(description="The job's name (free text); empty when it has none.")] = ""
    metadata: Annotated[
        dict[str, str], Meta(description="The job's metadata labels (string to string); empty when it has none.")
    ] = {}


class JobCancelling(AttemptEvent, frozen=True, kw_only=True, tag="job.cancelling"):
    """A cancel arrived while ``attempt`` was out of the scheduler's hands (at the binder
    or running): the binder forwards it to the attempt's node, which stops it."""

    reason: Annotated[str, Meta(description="Why it is being cancelled.")]
    at: Annotated[float, Meta(description="When this happened. Unix time, in seconds.")]


class JobCancelled(JobEvent, frozen=True, kw_only=True, tag="job.cancelled"):
    """The job ended cancelled; it never runs again. ``attempt`` is the attempt that was
    stopped, or the one that never started."""

    attempt: Annotated[
        NonNegInt,
        Meta(description="The attempt that was stopped, or the one that never started (0 before any was released)."),
    ]
    reason: Annotated[
        str,
        Meta(
            description="Why it was cancelled (the canceller's words, or skipped: a dependency ended as it did not need)."
        ),
    ]
    node_id: Annotated[str, Meta(description="The node the stopped attempt ran on; empty when it was not running.")] = (
        ""
    )
    at: Annotated[float, Meta(description="When this happened. Unix time, in seconds.")]
    # What a completion rule filters on (the job's queue, name and metadata labels), so a
    # consumer of job ends needs no lookup of the spec.
    queue: Annotated[
        str, Meta(description="The job's queue; empty in an event from a version that did not send it.")
    ] = ""
    name: Annotated[str, Meta(description="The job's name (free text); empty when it has none.")] = ""
    metadata: Annotated[
        dict[str, str], Meta(description="The job's metadata labels (string to string); empty when it has none.")
    ] = {}
    skipped: Annotated[
        bool, Meta(description="True when it never ran because a dependency ended as it did not need.")
    ] = False


class DependencyWatch(JobEvent, frozen=True, kw_only=True, tag="job.dep_watch"):
    """A scheduler partition asks the partition of ``job_id`` to say when that job ends:
    a job of ``watcher`` depends on it. Sent on the watched job's partition subject."""

    watcher: Annotated[
        NonNegInt, Meta(description="The partition to tell when the job ends (it holds a job that depends on it).")
    ]
    at: Annotated[float, Meta(description="When the watch was asked for. Unix time, in seconds.")]


class ParentRef(Struct, frozen=True, kw_only=True):
    """The workflow step whose handler submitted a job (``ctx.submit``): the step counts as
    ended for the steps that need it only once such child jobs have ended too."""

    job_id: Annotated[Id, Meta(description="The step's job (whose handler submitted this one).")]
    partition: Annotated[NonNegInt, Meta(description="The step job's scheduler partition.")]
    # The step's run and name: the child is listed with the run.
    workflow_id: Annotated[
        str, Meta(max_length=64, pattern=r"^[A-Za-z0-9_\-]*$"), Meta(description="The step's run; empty when unknown.")
    ] = ""
    step: Annotated[str, Meta(max_length=128), Meta(description="The step's name; empty when unknown.")] = ""


class ChildAdded(JobEvent, frozen=True, kw_only=True, tag="job.child_added"):
    """Job ``job_id`` (a workflow step, of ``partition``) submitted ``child``: the steps that
    need it wait for the child too. Published by the trigger with the child's JobSubmitted,
    before the submit is answered, so it precedes the step's own end in its partition."""

    child: Annotated[Id, Meta(description="The child job the step's handler submitted.")]
    child_partition: Annotated[NonNegInt, Meta(description="The child's scheduler partition.")]
    at: Annotated[float, Meta(description="When this happened. Unix time, in seconds.")]


class DependencyEnded(JobEvent, frozen=True, kw_only=True, tag="job.dep_ended"):
    """Job ``job_id`` ended (``outcome``: succeeded, failed, cancelled or expired); sent to
    each partition that watches it, on that partition's subject (``partition``)."""

    outcome: Annotated[
        Literal["succeeded", "failed", "cancelled", "expired"], Meta(description="How the watched job ended.")
    ]
    at: Annotated[float, Meta(description="When it ended. Unix time, in seconds.")]


class AttemptCancel(Struct, frozen=True, kw_only=True, tag="node.cancel"):
    """Stop this attempt now (SIGTERM, then SIGKILL after the grace period); sent on the
    attempt's node's cancel subject. An attempt not started yet never starts."""

    job_id: Annotated[
        Id,
        Meta(
            description='The job\'s id: 32 hex characters derived from its idempotency key (docs/integrations.md, "Job ids").'
        ),
    ]
    attempt: Annotated[
        AttemptNumber,
        Meta(
            description="The attempt number, counted from 1; events of an older attempt than the job's current one are ignored."
        ),
    ]
    partition: Annotated[
        NonNegInt, Meta(description="The scheduler partition of the job's queue: crc32(queue) % JOBMESH_PARTITIONS.")
    ]
    node_id: Annotated[Id, Meta(description="The node the attempt is bound to (the cancel subject's node).")]
    reason: Annotated[
        str, Meta(description="Why it is cancelled, for the attempt's record; empty when the canceller gave none.")
    ]
    at: Annotated[float, Meta(description="When the cancel was sent. Unix time, in seconds.")]


class LogLine(Struct, frozen=True, kw_only=True, tag="job.log"):
    """One line of an attempt's output (stream JM_LOGS)."""

    job_id: Annotated[
        Id,
        Meta(
            description='The job\'s id: 32 hex characters derived from its idempotency key (docs/integrations.md, "Job ids").'
        ),
    ]
    attempt: Annotated[
        AttemptNumber,
        Meta(
            description="The attempt number, counted from 1; events of an older attempt than the job's current one are ignored."
        ),
    ]
    stream: Annotated[Literal["stdout", "stderr"], Meta(description="Which output it came from: stdout or stderr.")]
    line: Annotated[str, Meta(description="One line of output, without its newline.")]
    at: Annotated[float, Meta(description="When the executor read it. Unix time, in seconds.")]


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
    | MemberSucceeded
)
# An attempt has ended (its reservation, if any, can be freed).
# A gang member's success ends that member's part only (its node's reservation).
TerminalEvent = JobSucceeded | JobFailed | JobExpired | JobLost | JobCancelled | MemberSucceeded
# A job has ended for good (what a rule that fires on "the end of an earlier job" reads).
JobEnd = JobSucceeded | JobGaveUp | JobCancelled | JobExpired
