"""A node's GPUs: what the executor advertises, and how an attempt sees the ones reserved for it.

At start the executor asks ``nvidia-smi`` which GPUs the node has (:func:`probe_gpus`);
without it (or when it fails) the node advertises the configured count
(``JOBMESH_NODE_GPU`` / ``JOBMESH_NODE_GPU_KIND``) as indices ``0 .. n-1``. The binder
reserves specific indices for each attempt (``JobBound.gpu_devices``); the attempt sees
exactly those: :func:`gpu_env` names them to CUDA and to the NVIDIA container toolkit, and
:func:`gpu_device_nodes` lists the device files a sandbox or container binds in, so a job
without GPUs sees none.

The probe's decisions are a pure function of what ``nvidia-smi`` printed (:func:`parse_gpus`);
``which`` and ``run`` are injected so the I/O stays at the edge.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobmesh.contract.messages.v1 import GpuDevice

NVIDIA_SMI = "nvidia-smi"
QUERY_ARGS = ("--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits")
PROBE_TIMEOUT = 10.0  # seconds; a wedged driver can hang nvidia-smi for minutes
# Device files every CUDA process needs besides its own /dev/nvidia<index>.
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
NO_DEVICES = "void"  # NVIDIA_VISIBLE_DEVICES for "none" (the container toolkit's word)

Which = Callable[[str], str | None]
Run = Callable[..., "subprocess.CompletedProcess[Any]"]


@dataclass(frozen=True, slots=True)
class GpuProbe:
    """What the GPU probe found.

    Attributes:
        devices: the node's GPUs, by index (what ``NodeInfo.gpu_devices`` advertises).
        detail: how they were found, or why the probe fell back to the configured count
            (``NodeInfo.probe["gpu"]``).
    """

    devices: list[GpuDevice]
    detail: str

    @property
    def count(self) -> int:
        """How many GPUs the node advertises (``NodeInfo.gpu``)."""
        return len(self.devices)

    @property
    def kind(self) -> str:
        """The kind all the GPUs share (``NodeInfo.gpu_kind``); "" when none or mixed."""
        kinds = {device.kind for device in self.devices}
        return kinds.pop() if len(kinds) == 1 else ""


class GpuProbeError(Exception):
    """Raised when ``nvidia-smi``'s output cannot be read as the GPU list asked for."""


def probe_gpus(
    configured_count: int,
    configured_kind: str,
    which: Which = shutil.which,
    run: Run = subprocess.run,
    timeout: float = PROBE_TIMEOUT,
) -> GpuProbe:
    """Find the node's GPUs.

    ``nvidia-smi --query-gpu=index,name,memory.total,uuid --format=csv,noheader,nounits``
    when it is on PATH; its GPUs are advertised (a configured count is then ignored, and
    the detail says so). A configured kind names every probed GPU's kind, so that what
    placement matches (``resources.gpu_kind``) is the operator's word, not the driver's
    model string. Without ``nvidia-smi``, or when it fails, times out, prints nothing
    readable or finds no GPU, the node advertises ``configured_count`` GPUs of
    ``configured_kind`` (memory 0, no UUID) and the detail says why.

    Args:
        configured_count: ``settings.node_gpu``.
        configured_kind: ``settings.node_gpu_kind``.
        which: finds a program on PATH (``shutil.which``).
        run: runs a program (``subprocess.run``'s signature).
        timeout: seconds ``nvidia-smi`` may take.

    Returns:
        The devices to advertise and how they were found.
    """
    path = which(NVIDIA_SMI)
    if path is None:
        return _configured(configured_count, configured_kind, f"{NVIDIA_SMI} not found on PATH")
    try:
        done = run([path, *QUERY_ARGS], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return _configured(configured_count, configured_kind, f"{path} did not answer within {timeout:g}s")
    except OSError as exc:
        return _configured(configured_count, configured_kind, f"cannot run {path}: {exc.strerror or exc}")
    if done.returncode != 0:
        said = _first_line(done.stderr) or _first_line(done.stdout) or "no output"
        return _configured(configured_count, configured_kind, f"{path} exited with code {done.returncode}: {said}")
    try:
        devices = parse_gpus(done.stdout, configured_kind)
    except GpuProbeError as exc:
        return _configured(configured_count, configured_kind, f"{path}: {exc}")
    if not devices:
        return _configured(configured_count, configured_kind, f"{path} listed no GPU")
    models = ", ".join(sorted({_model(line) for line in done.stdout.splitlines() if line.strip()}))
    detail = f"{len(devices)} from {NVIDIA_SMI} ({models})"
    if configured_count and configured_count != len(devices):
        detail += f"; JOBMESH_NODE_GPU={configured_count} ignored"
    return GpuProbe(devices, detail)


def parse_gpus(output: str, kind: str = "") -> list[GpuDevice]:
    """Read ``nvidia-smi --query-gpu=index,name,memory.total,uuid --format=csv,noheader,nounits``.

    Args:
        output: what it printed, one ``index, name, memory, uuid`` line per GPU.
        kind: when not empty, every device's kind (the configured one); else the model name.

    Returns:
        The devices, by index.

    Raises:
        GpuProbeError: a line is not four fields, or its index is not a number, or an
            index repeats.
    """
    devices: dict[int, GpuDevice] = {}
    for number, line in enumerate(output.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            raise GpuProbeError(f"line {number} is not 'index, name, memory.total, uuid': {line.strip()!r}")
        index_text, name, memory_text, uuid = fields
        try:
            index = int(index_text)
        except ValueError:
            raise GpuProbeError(f"line {number}: the index {index_text!r} is not a number") from None
        if index < 0 or index in devices:
            raise GpuProbeError(f"line {number}: index {index} is negative or listed twice")
        devices[index] = GpuDevice(
            index=index, kind=kind or name, memory_mb=_memory(memory_text), uuid=uuid if uuid.startswith("GPU-") else ""
        )
    return [devices[index] for index in sorted(devices)]


def gpu_env(indices: Sequence[int]) -> dict[str, str]:
    """The variables that tell CUDA and the NVIDIA container toolkit which GPUs a job has.

    Args:
        indices: the node's GPU indices reserved for the attempt (``JobBound.gpu_devices``).

    Returns:
        ``CUDA_VISIBLE_DEVICES`` and ``NVIDIA_VISIBLE_DEVICES``, both ``"0,2"`` for
        indices 0 and 2, with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (CUDA's default order is
        fastest first, which on a mixed node numbers GPUs unlike nvidia-smi, whose
        indices these are); for none, ``CUDA_VISIBLE_DEVICES=""`` and
        ``NVIDIA_VISIBLE_DEVICES="void"``, so a job without GPUs sees none at all.
    """
    if not indices:
        return {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": NO_DEVICES}
    names = ",".join(str(index) for index in indices)
    return {"CUDA_VISIBLE_DEVICES": names, "NVIDIA_VISIBLE_DEVICES": names, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def gpu_device_nodes(indices: Sequence[int], dev: Path = Path("/dev")) -> list[str]:
    """The device files an attempt with GPUs ``indices`` needs inside a sandbox or container.

    Args:
        indices: the node's GPU indices reserved for the attempt.
        dev: the device directory (a test passes its own).

    Returns:
        ``<dev>/nvidia<i>`` for each index, then ``nvidiactl``, ``nvidia-uvm``,
        ``nvidia-uvm-tools`` and ``nvidia-modeset``: only those that exist (a bind of a
        missing file would fail the sandbox), and nothing at all without indices.
    """
    if not indices:
        return []
    names = [f"nvidia{index}" for index in indices] + list(CONTROL_NODES)
    return [str(dev / name) for name in names if (dev / name).exists()]


def _configured(count: int, kind: str, why: str) -> GpuProbe:
    devices = [GpuDevice(index=index, kind=kind) for index in range(count)]
    if count:
        return GpuProbe(devices, f"{count} configured (JOBMESH_NODE_GPU); {why}")
    return GpuProbe(devices, f"none: {why}")


def _memory(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        return 0  # "[N/A]" on some boards: unknown, not an error


def _model(line: str) -> str:
    fields = line.split(",")
    return fields[1].strip() if len(fields) > 1 else ""


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""
