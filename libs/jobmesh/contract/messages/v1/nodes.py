"""Executor node records (KV ``jm_nodes``) and binder allocations (KV ``jm_alloc``)."""

from __future__ import annotations

from msgspec import Struct, field

from jobmesh.contract.messages.v1.jobs import Resources

__all__ = ["Allocation", "NodeInfo", "Reservation"]


class NodeInfo(Struct, frozen=True, kw_only=True, tag="node.info"):
    """What an executor advertises, refreshed every heartbeat; expires with the KV TTL."""

    node_id: str
    cpu_milli: int
    memory_mb: int
    gpu: int = 0
    gpu_kind: str = ""
    disk_mb: int = 0
    arch: str = ""
    zone: str = ""
    isolation: str = "process"
    labels: dict[str, str] = {}
    handlers: list[str] = []
    datasets: list[str] = []  # datasets held locally (data-locality hints match these)
    runtimes: list[str] = field(default_factory=lambda: ["process", "noop"])
    work_dir: str = ""
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    draining: bool = False


class Reservation(Struct, frozen=True, kw_only=True):
    """One attempt's hold on a node."""

    resources: Resources
    scratch_dir: str
    at: float
    partition: int = 0  # the job's scheduler partition, to address JobLost if the node dies


class Allocation(Struct, frozen=True, kw_only=True, tag="node.allocation"):
    """Everything reserved on one node, keyed by ``job_id:attempt``; updated by CAS only."""

    node_id: str
    reservations: dict[str, Reservation] = {}
