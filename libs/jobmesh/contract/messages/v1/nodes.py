"""Executor node records (KV ``jm_nodes``) and binder allocations (KV ``jm_alloc``)."""

from __future__ import annotations

from typing import Any

from msgspec import Struct, field

from jobmesh.contract.messages.v1.jobs import Resources

__all__ = ["Allocation", "AttemptLease", "GpuDevice", "HandlerInfo", "NodeInfo", "Reservation"]


class GpuDevice(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One GPU of a node, as its probe found it (``nvidia-smi``) or as configured.

    Attributes:
        index: the device index (what CUDA_VISIBLE_DEVICES names, and /dev/nvidia<index>).
        kind: its model, as placement matches ``resources.gpu_kind``.
        memory_mb: its memory (0 when configured rather than probed).
        uuid: its UUID, when the probe reports one.
    """

    index: int
    kind: str = ""
    memory_mb: int = 0
    uuid: str = ""


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

    name: str
    input_type: str
    output_type: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    doc: str = ""
    module: str = ""
    at: float = 0.0


class AttemptLease(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One running attempt, as its executor renews its lease with every heartbeat.

    Attributes:
        progress: the last fraction done (0 to 1) the job reported; None if it never did.
        message: the message that came with it.
        checkpoint: the last checkpoint the job reported; a retry starts from it.
    """

    job_id: str
    attempt: int
    partition: int
    started_at: float
    progress: float | None = None
    message: str = ""
    checkpoint: str = ""


class NodeInfo(Struct, frozen=True, kw_only=True, tag="node.info"):
    """What an executor advertises, refreshed every heartbeat; expires with the KV TTL.

    Every put is also the lease renewal of every attempt the node runs (``attempts``):
    one message per node and heartbeat, however many attempts it holds. ``incarnation``
    changes whenever the executor process restarts, so a record from a new incarnation
    says that the attempts of the old one are gone.
    """

    node_id: str
    cpu_milli: int
    memory_mb: int
    gpu: int = 0
    gpu_kind: str = ""
    gpu_devices: list[GpuDevice] = []  # one per GPU, by index (its length is ``gpu``)
    disk_mb: int = 0
    arch: str = ""
    zone: str = ""
    isolation: str = "process"  # the strongest level this node enforces (IsolationLevel)
    network: bool = True  # whether a job that asks for the network may have it here
    # What the executor's probe found at start, for ``jobmesh nodes``: "sandbox" ->
    # "bubblewrap 0.8.0", "cgroup" -> "v1 memory,cpu,pids", "container" -> "podman: ...".
    probe: dict[str, str] = {}
    labels: dict[str, str] = {}
    handlers: list[str] = []
    datasets: list[str] = []  # datasets held locally (data-locality hints match these)
    runtimes: list[str] = field(default_factory=lambda: ["process", "noop"])
    work_dir: str = ""
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    draining: bool = False
    incarnation: str = ""
    attempts: list[AttemptLease] = []
    # Attempts whose terminal event is durable, kept for a while after they end, so that a
    # lease holder whose view of terminal events lags never takes an ended one for lost.
    ended: list[str] = []


class Reservation(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One attempt's hold on a node."""

    resources: Resources
    scratch_dir: str
    at: float
    partition: int = 0  # the job's scheduler partition, to address JobLost if the node dies
    gpu_devices: list[int] = []  # the indices of the GPUs it holds, none shared with another


class Allocation(Struct, frozen=True, kw_only=True, tag="node.allocation"):
    """Everything reserved on one node, keyed by ``job_id:attempt``; updated by CAS only."""

    node_id: str
    reservations: dict[str, Reservation] = {}
