"""Executor node records (KV ``jm_nodes``) and binder allocations (KV ``jm_alloc``)."""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Struct, field

from jobmesh.contract.messages.v1.jobs import ISOLATION_LEVELS, Resources

__all__ = ["Allocation", "AttemptLease", "GpuDevice", "HandlerInfo", "NodeInfo", "Reservation"]


class GpuDevice(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One GPU of a node, as its probe found it (``nvidia-smi``) or as configured.

    Attributes:
        index: the device index (what CUDA_VISIBLE_DEVICES names, and /dev/nvidia<index>).
        kind: its model, as placement matches ``resources.gpu_kind``.
        memory_mb: its memory (0 when configured rather than probed).
        uuid: its UUID, when the probe reports one.
    """

    index: Annotated[
        int, Meta(description="The device index (what CUDA_VISIBLE_DEVICES names, and /dev/nvidia<index>).")
    ]
    kind: Annotated[
        str, Meta(description="Its model, as placement matches resources.gpu_kind; empty when unknown.")
    ] = ""
    memory_mb: Annotated[int, Meta(description="Its memory, in MiB; 0 when configured rather than probed.")] = 0
    uuid: Annotated[str, Meta(description="Its UUID, when the probe reports one; empty otherwise.")] = ""


class HandlerInfo(Struct, frozen=True, kw_only=True, tag="handler.info"):
    """A Python handler an executor hosts (KV ``jm_handlers``, key = its name).

    Written by every executor that loads it; the trigger checks a handler job's input
    against ``input_schema`` at submit. Executors hosting one name must agree on its types.

    Attributes:
        name: the handler's name (``@handler("name")``).
        input_type: the qualified name of its input struct.
        output_type: the qualified name of its output struct.
        input_schema: JSON Schema of its input (msgspec.json.schema of the input type).
        output_schema: JSON Schema of its output.
        doc: its docstring's first line.
        module: the module that defines it.
        at: when it was last written.
    """

    name: Annotated[str, Meta(description='The handler\'s name (@handler("name")), also its key.')]
    input_type: Annotated[str, Meta(description="The qualified name of its input struct.")]
    output_type: Annotated[str, Meta(description="The qualified name of its output struct.")]
    input_schema: Annotated[
        dict[str, Any],
        Meta(description="The JSON Schema of its input; a handler job's input is checked against it at submit."),
    ]
    output_schema: Annotated[dict[str, Any], Meta(description="The JSON Schema of its output (the job's result).")]
    doc: Annotated[str, Meta(description="Its docstring's first line; empty when it has none.")] = ""
    module: Annotated[str, Meta(description="The module that defines it; empty when unknown.")] = ""
    at: Annotated[float, Meta(description="When an executor last wrote it. Unix time, in seconds.")] = 0.0


class AttemptLease(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One running attempt, as its executor renews its lease with every heartbeat.

    Attributes:
        progress: the last fraction done (0 to 1) the job reported; None if it never did.
        message: the message that came with it.
        checkpoint: the last checkpoint the job reported; a retry starts from it.
    """

    job_id: Annotated[str, Meta(description="The running attempt's job.")]
    attempt: Annotated[int, Meta(description="The running attempt's number.")]
    partition: Annotated[
        int, Meta(description="The scheduler partition of the job's queue: crc32(queue) % JOBMESH_PARTITIONS.")
    ]
    started_at: Annotated[float, Meta(description="When the attempt started. Unix time, in seconds.")]
    progress: Annotated[
        float | None,
        Meta(description="The last fraction done the job reported, from 0 to 1; null when it never reported any."),
    ] = None
    message: Annotated[
        str, Meta(description="The message that came with the last progress report; empty when none.")
    ] = ""
    checkpoint: Annotated[
        str,
        Meta(
            description="The last checkpoint the job reported (free text it chose); empty when none: the attempt starts afresh."
        ),
    ] = ""
    rank: Annotated[int, Meta(ge=0), Meta(description="The gang member it is (JobBound.rank); 0 for a plain job.")] = 0
    world_size: Annotated[
        int, Meta(ge=1), Meta(description="How many members its gang has (JobBound.world_size); 1 for a plain job.")
    ] = 1


class NodeInfo(Struct, frozen=True, kw_only=True, tag="node.info"):
    """What an executor advertises, refreshed every heartbeat; expires with the KV TTL.

    Every put is also the lease renewal of every attempt the node runs (``attempts``):
    one message per node and heartbeat, however many attempts it holds. ``incarnation``
    changes whenever the executor process restarts, so a record from a new incarnation
    says that the attempts of the old one are gone.
    """

    node_id: Annotated[str, Meta(description="The node's id (JOBMESH_NODE_ID), also its key.")]
    cpu_milli: Annotated[int, Meta(description="CPU capacity offered, in millicores (1000 = one core).")]
    memory_mb: Annotated[int, Meta(description="Memory offered, in MiB.")]
    gpu: Annotated[int, Meta(description="GPUs offered; 0: none.")] = 0
    gpu_kind: Annotated[str, Meta(description="The GPUs' model; empty when none or unknown.")] = ""
    gpu_devices: Annotated[
        list[GpuDevice], Meta(description="One entry per GPU, by index (its length is gpu); empty when none.")
    ] = []
    disk_mb: Annotated[int, Meta(description="Scratch disk offered, in MiB; 0: none reserved.")] = 0
    arch: Annotated[str, Meta(description="The node's architecture (x86_64, aarch64); empty when unknown.")] = ""
    zone: Annotated[str, Meta(description="The node's zone (for locality); empty when none.")] = ""
    address: Annotated[
        str,
        Meta(
            description="The host name or IP its gang members' peers reach it at (JOBMESH_NODE_ADDRESS); empty: the executor's host name."
        ),
    ] = ""
    isolation: Annotated[
        str,
        Meta(
            description="The strongest isolation level the node enforces: process, sandbox, container or vm.",
            extra_json_schema={"enum": list(ISOLATION_LEVELS)},
        ),
    ] = "process"
    network: Annotated[
        bool, Meta(description="Whether a job that asks for the network may have it here (default true).")
    ] = True
    # What the executor's probe found at start, for ``jobmesh nodes``: "sandbox" ->
    # "bubblewrap 0.8.0", "cgroup" -> "v1 memory,cpu,pids", "container" -> "podman: ...".
    probe: Annotated[
        dict[str, str],
        Meta(
            description="What the executor's probe found at start (sandbox, cgroup, container: in words); empty when it did not probe."
        ),
    ] = {}
    labels: Annotated[
        dict[str, str], Meta(description="The node's labels, matched by constraints.labels; empty: none.")
    ] = {}
    handlers: Annotated[list[str], Meta(description="The Python handlers it hosts; empty: none.")] = []
    datasets: Annotated[
        list[str], Meta(description="Datasets held locally (locality.dataset matches these); empty: none.")
    ] = []
    runtimes: Annotated[list[str], Meta(description="The runtimes it runs (process, noop, handler, container).")] = (
        field(default_factory=lambda: ["process", "noop"])
    )
    work_dir: Annotated[str, Meta(description="Where its attempts' working directories live; empty when unknown.")] = ""
    started_at: Annotated[float, Meta(description="When the executor started. Unix time, in seconds.")] = 0.0
    heartbeat_at: Annotated[float, Meta(description="Its last heartbeat. Unix time, in seconds.")] = 0.0
    draining: Annotated[bool, Meta(description="True while it drains: it takes no new attempts.")] = False
    incarnation: Annotated[
        str,
        Meta(
            description="The executor process that runs it (NodeInfo.incarnation): a new value after every restart; empty when unknown."
        ),
    ] = ""
    attempts: Annotated[
        list[AttemptLease], Meta(description="The attempts it runs; each put renews their leases. Empty: none.")
    ] = []
    # Attempts whose terminal event is durable, kept for a while after they end, so that a
    # lease holder whose view of terminal events lags never takes an ended one for lost.
    ended: Annotated[
        list[str],
        Meta(
            description='"<job_id>:<attempt>" of attempts whose terminal event is durable, kept a while after they end; empty: none.'
        ),
    ] = []


class Reservation(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One attempt's hold on a node."""

    resources: Annotated[Resources, Meta(description="What the attempt holds.")]
    scratch_dir: Annotated[str, Meta(description="Its scratch directory on the node.")]
    at: Annotated[float, Meta(description="When it was reserved. Unix time, in seconds.")]
    partition: Annotated[
        int, Meta(description="The job's scheduler partition (to address JobLost if the node dies).")
    ] = 0
    gpu_devices: Annotated[
        list[int], Meta(description="The indices of the GPUs it holds, none shared with another; empty: none.")
    ] = []
    # What preemption weighs (services/binder/preempting.py). A reservation written before
    # these existed reads as a job of the defaults (priority 5, preemptible: no job could
    # opt out then), which is what its job was unless it named a priority.
    priority: Annotated[int, Meta(ge=0, le=9), Meta(description="The job's priority (0-9).")] = 5
    tenant: Annotated[str, Meta(description='The job\'s tenant; "default" when not recorded.')] = "default"
    queue: Annotated[str, Meta(description='The job\'s queue; "default" when not recorded.')] = "default"
    preemptible: Annotated[
        bool,
        Meta(description="Whether a higher-priority job may stop the attempt to make room (default true)."),
    ] = True
    ends_by: Annotated[
        float,
        Meta(ge=0),
        Meta(
            description="When the attempt has ended at the latest: reserved at plus its run timeout and the stop grace. Unix time, in seconds; 0: unknown (a reservation from before this field)."
        ),
    ] = 0.0
    starts_at: Annotated[
        float,
        Meta(ge=0),
        Meta(
            description="A future hold (backfill): the room is promised to the job from this time; it does not count against the node before it is bound. Unix time, in seconds; 0: a reservation in force."
        ),
    ] = 0.0
    waiting_for: Annotated[
        list[str],
        Meta(
            description='A hold: the attempts ("<job_id>:<attempt>") this job preempted here; it is bound once none of them is reserved any more. Empty: a plain reservation.'
        ),
    ] = []
    # A gang's member (JobBound.rank): a redelivered JobReady re-announces the same ranks.
    rank: Annotated[int, Meta(ge=0), Meta(description="The gang member it holds room for; 0 for a plain job.")] = 0
    world_size: Annotated[int, Meta(ge=1), Meta(description="How many members its gang has; 1 for a plain job.")] = 1
    release: Annotated[
        int,
        Meta(ge=0),
        Meta(
            description="A gang member's: the JobReady.release that reserved it (a later one may start afresh); 0 otherwise."
        ),
    ] = 0


class Allocation(Struct, frozen=True, kw_only=True, tag="node.allocation"):
    """Everything reserved on one node, keyed by ``job_id:attempt``; updated by CAS only."""

    node_id: Annotated[str, Meta(description="The node these reservations are on.")]
    reservations: Annotated[
        dict[str, Reservation],
        Meta(
            description='Every attempt\'s hold on the node, keyed by "<job_id>:<attempt>"; empty when nothing is reserved.'
        ),
    ] = {}
