"""What this node is: its identity, capacity and attributes, as a ``NodeInfo`` record.

Everything here is pure except :func:`read_machine_facts`, which is the one place that asks
the operating system; the rest are functions of settings and those facts, so they are
tested without a machine to match.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jobmesh.contract.messages.v1 import GpuDevice, NodeInfo
from jobmesh.contract.validation import label_problem
from jobmesh.errors import InvalidSpec
from jobmesh.runtime.settings import Settings

# Node ids become a subject token and a KV key, so they use the same alphabet as job ids.
NODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NOT_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]+")

RUNTIMES = ["process", "noop"]
DEFAULT_WORK_ROOT = Path(tempfile.gettempdir()) / "jobmesh-work"


@dataclass(frozen=True, slots=True)
class MachineFacts:
    """What the operating system says about this machine.

    Attributes:
        hostname: the host name, unsanitized.
        cpu_count: logical CPUs (0 when unknown).
        memory_mb: total memory in MiB (0 when unknown).
        arch: ``platform.machine()``, e.g. ``x86_64``.
    """

    hostname: str
    cpu_count: int
    memory_mb: int
    arch: str


def read_machine_facts(meminfo: Path = Path("/proc/meminfo")) -> MachineFacts:
    """Ask the operating system for the facts a node advertises by default."""
    try:
        memory_mb = parse_meminfo(meminfo.read_text())
    except OSError:
        memory_mb = 0  # not Linux: the operator must set JOBMESH_NODE_MEMORY_MB
    return MachineFacts(
        hostname=socket.gethostname(),
        cpu_count=os.cpu_count() or 0,
        memory_mb=memory_mb,
        arch=platform.machine(),
    )


def parse_meminfo(text: str) -> int:
    """Total memory in MiB from the text of ``/proc/meminfo`` (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) // 1024  # the kernel always reports kB
    return 0


def sanitize_node_id(hostname: str) -> str:
    """A valid node id derived from a host name: other characters become ``-``.

    Args:
        hostname: any host name, e.g. ``build-01.example.com``.

    Returns:
        An id matching :data:`NODE_ID_PATTERN` (``build-01-example-com``); ``node`` when
        nothing usable is left.
    """
    cleaned = _NOT_ID_CHARS.sub("-", hostname).strip("-")[:64].strip("-")
    return cleaned or "node"


def resolve_node_id(settings: Settings, facts: MachineFacts) -> str:
    """``JOBMESH_NODE_ID`` when set (and valid), else the sanitized host name.

    Raises:
        InvalidSpec: when ``JOBMESH_NODE_ID`` is set but not a valid id.
    """
    if settings.node_id:
        if not NODE_ID_PATTERN.match(settings.node_id):
            raise InvalidSpec(
                f"JOBMESH_NODE_ID={settings.node_id!r} is not a valid node id: use 1-64 of "
                "A-Z a-z 0-9 _ - (it becomes a NATS subject token)",
                field="node_id",
            )
        return settings.node_id
    return sanitize_node_id(facts.hostname)


def parse_labels(text: str) -> dict[str, str]:
    """Parse ``JOBMESH_NODE_LABELS`` (``k=v,k2=v2``) into a dict.

    Whitespace around items, keys and values is ignored, and so are empty items (a
    trailing comma). Values may be empty (``gpu=``) and may contain ``=``.

    Raises:
        InvalidSpec: naming JOBMESH_NODE_LABELS, when an item has no ``=``, an empty or
            badly formed key, or repeats a key.
    """
    labels: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise InvalidSpec(
                f"JOBMESH_NODE_LABELS: bad label {item!r}: expected key=value pairs separated by commas",
                field="node_labels",
            )
        problem = label_problem(key, value)
        if problem:
            raise InvalidSpec(f"JOBMESH_NODE_LABELS: {problem}", field="node_labels")
        if key in labels:
            raise InvalidSpec(f"JOBMESH_NODE_LABELS: label {key!r} is given twice", field="node_labels")
        labels[key] = value
    return labels


def node_work_dir(settings: Settings, node_id: str) -> Path:
    """Where this node's attempts get their working directories: ``<work_dir>/<node_id>``."""
    root = Path(settings.work_dir) if settings.work_dir else DEFAULT_WORK_ROOT
    return root / node_id


def build_node_info(
    settings: Settings,
    facts: MachineFacts,
    started_at: float,
    *,
    isolation: str | None = None,
    probe: dict[str, str] | None = None,
    runtimes: list[str] | None = None,
    handlers: list[str] | None = None,
    gpu_devices: list[GpuDevice] | None = None,
) -> NodeInfo:
    """The record this node advertises: settings win, machine facts and the probes fill the gaps.

    Args:
        settings: the process settings (``node_*`` and ``work_dir``).
        facts: what the machine says (:func:`read_machine_facts`); its host name is the
            node's address when ``JOBMESH_NODE_ADDRESS`` is not set.
        started_at: when this executor started (epoch seconds); also the first heartbeat.
        isolation: the level the isolation probe decided (None: the setting, ``auto`` as
            ``process``).
        probe: what the probes found (``NodeInfo.probe``).
        runtimes: the runtime kinds this node has runners for (None: process and noop).
        handlers: handlers its pool hosts, advertised besides ``JOBMESH_NODE_HANDLERS``.
        gpu_devices: the GPUs the GPU probe found (None: the configured count, unlisted).

    Returns:
        A ``NodeInfo`` ready to put under its ``node_id`` in KV ``jm_nodes``.

    Raises:
        InvalidSpec: for a bad JOBMESH_NODE_ID or JOBMESH_NODE_LABELS.
    """
    node_id = resolve_node_id(settings, facts)
    level = isolation or ("process" if settings.node_isolation == "auto" else settings.node_isolation)
    configured = [h.strip() for h in settings.node_handlers.split(",") if h.strip()]
    hosted = list(dict.fromkeys([*configured, *(handlers or [])]))
    gpus = gpu_devices if gpu_devices is not None else []
    kinds = {device.kind for device in gpus}
    return NodeInfo(
        node_id=node_id,
        cpu_milli=settings.node_cpu_milli or facts.cpu_count * 1000,
        memory_mb=settings.node_memory_mb or facts.memory_mb,
        gpu=len(gpus) if gpu_devices is not None else settings.node_gpu,
        gpu_kind=(kinds.pop() if len(kinds) == 1 else "") if gpu_devices else settings.node_gpu_kind,
        gpu_devices=gpus,
        disk_mb=settings.node_disk_mb,
        arch=facts.arch,
        zone=settings.node_zone,
        address=settings.node_address or facts.hostname,
        isolation=level,
        network=settings.node_network,
        probe=dict(probe or {}),
        labels=parse_labels(settings.node_labels),
        handlers=hosted,
        datasets=[d.strip() for d in settings.node_datasets.split(",") if d.strip()],
        runtimes=list(runtimes) if runtimes is not None else list(RUNTIMES),
        work_dir=str(node_work_dir(settings, node_id)),
        started_at=started_at,
        heartbeat_at=started_at,
    )
