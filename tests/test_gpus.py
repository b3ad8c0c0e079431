"""GPUs: the probe (a recording stand-in ``nvidia-smi`` on PATH, and the real machine's), the
variables and device files an attempt gets, two binder processes reserving the GPUs of nodes
on a real nats-server without ever handing one index to two jobs at once, and the same
through the whole cluster with an executor that advertises two GPUs."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import msgspec
import nats
import pytest

from jobmesh.binder.allocation import overbooked
from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import (
    Allocation,
    GpuDevice,
    JobBound,
    JobReady,
    JobSpec,
    JobSucceeded,
    JobUnplaceable,
    NodeInfo,
    NoopRuntime,
    ProcessRuntime,
    Resources,
    Submission,
)
from jobmesh.executor.gpus import QUERY_ARGS, gpu_device_nodes, gpu_env, probe_gpus
from jobmesh.runtime.provisioning import provision
from jobmesh.runtime.publisher import Outgoing, Publisher
from tests.cluster_fixtures import E2E_NODE_ENV, Service, stand_in_heartbeats
from tests.helpers import eventually

CSV = """0, NVIDIA A100-SXM4-40GB, 40960, GPU-aaaaaaaa-0000-0000-0000-000000000000
1, NVIDIA A100-SXM4-40GB, 40960, GPU-bbbbbbbb-0000-0000-0000-000000000001
"""


def stand_in(
    bin_dir: Path, record: Path, *, stdout: str = "", stderr: str = "", code: int = 0, hang: bool = False
) -> None:
    """An ``nvidia-smi`` on PATH that writes its argv (one per line) to ``record`` and
    prints canned output."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    body = ["#!/bin/sh", f"printf '%s\\n' \"$@\" > '{record}'"]
    if hang:
        body.append("exec sleep 30")
    body += [f"cat <<'EOF'\n{stdout}EOF", f"cat >&2 <<'EOF'\n{stderr}EOF", f"exit {code}"]
    script.write_text("\n".join(body) + "\n")
    script.chmod(0o755)


@pytest.fixture
def fake_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH of only a fresh directory (plus /bin for the stand-in's sh, cat and sleep)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:/bin:/usr/bin")
    return bin_dir


def test_the_probe_asks_nvidia_smi_and_advertises_what_it_lists(fake_path: Path, tmp_path: Path) -> None:
    record = tmp_path / "argv"
    stand_in(fake_path, record, stdout=CSV)
    probe = probe_gpus(0, "")
    assert record.read_text().splitlines() == list(QUERY_ARGS)
    assert QUERY_ARGS == ("--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits")
    assert probe.devices == [
        GpuDevice(
            index=0, kind="NVIDIA A100-SXM4-40GB", memory_mb=40960, uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000"
        ),
        GpuDevice(
            index=1, kind="NVIDIA A100-SXM4-40GB", memory_mb=40960, uuid="GPU-bbbbbbbb-0000-0000-0000-000000000001"
        ),
    ]
    assert probe.count == 2 and probe.kind == "NVIDIA A100-SXM4-40GB"
    assert probe.detail == "2 from nvidia-smi (NVIDIA A100-SXM4-40GB)"


def test_a_configured_kind_names_the_probed_gpus_and_a_configured_count_is_overruled(
    fake_path: Path, tmp_path: Path
) -> None:
    stand_in(fake_path, tmp_path / "argv", stdout="1, Tesla T4, [N/A], GPU-t\n0, Tesla T4, 15360, GPU-s\n")
    probe = probe_gpus(4, "t4")
    assert [(d.index, d.kind, d.memory_mb) for d in probe.devices] == [(0, "t4", 15360), (1, "t4", 0)]
    assert probe.kind == "t4"
    assert probe.detail == "2 from nvidia-smi (Tesla T4); JOBMESH_NODE_GPU=4 ignored"


def test_nvidia_smi_failing_falls_back_to_the_configured_count_and_says_why(fake_path: Path, tmp_path: Path) -> None:
    record = tmp_path / "argv"
    driver = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    stand_in(fake_path, record, stderr=driver + "\n", code=9)
    probe = probe_gpus(2, "a100")
    assert record.exists()  # it was asked
    assert probe.devices == [GpuDevice(index=0, kind="a100"), GpuDevice(index=1, kind="a100")]
    assert probe.detail.startswith("2 configured (JOBMESH_NODE_GPU); ")
    assert f"nvidia-smi exited with code 9: {driver}" in probe.detail


def test_unreadable_output_or_no_gpu_listed_falls_back_and_says_why(fake_path: Path, tmp_path: Path) -> None:
    stand_in(fake_path, tmp_path / "argv", stdout="0, only two fields\n")
    garbled = probe_gpus(1, "")
    assert garbled.devices == [GpuDevice(index=0)]
    assert "line 1 is not 'index, name, memory.total, uuid': '0, only two fields'" in garbled.detail
    stand_in(fake_path, tmp_path / "argv", stdout="x, a, 1, GPU-1\n")
    assert "the index 'x' is not a number" in probe_gpus(0, "").detail
    stand_in(fake_path, tmp_path / "argv", stdout="\n")
    empty = probe_gpus(0, "")
    assert empty.devices == [] and empty.detail.startswith("none: ") and empty.detail.endswith("listed no GPU")


def test_a_hanging_nvidia_smi_is_given_up_on_and_the_configured_count_used(fake_path: Path, tmp_path: Path) -> None:
    stand_in(fake_path, tmp_path / "argv", hang=True)
    started = time.monotonic()
    probe = probe_gpus(1, "", timeout=0.5)
    assert time.monotonic() - started < 10
    assert probe.devices == [GpuDevice(index=0)]
    assert probe.detail.endswith("did not answer within 0.5s")


def test_without_nvidia_smi_the_configured_count_is_advertised(fake_path: Path) -> None:
    probe = probe_gpus(3, "v100")
    assert [d.index for d in probe.devices] == [0, 1, 2] and probe.kind == "v100"
    assert probe.detail == "3 configured (JOBMESH_NODE_GPU); nvidia-smi not found on PATH"
    assert probe_gpus(0, "").detail == "none: nvidia-smi not found on PATH"


def test_the_real_probe_on_this_machine_reports_what_it_finds() -> None:
    # This machine has no GPU and no nvidia-smi: the real probe must say so, not guess.
    probe = probe_gpus(0, "")
    if shutil.which("nvidia-smi") is None:
        assert probe.devices == [] and probe.detail == "none: nvidia-smi not found on PATH"
    else:  # a GPU machine: whatever it lists, it names where it came from
        assert "nvidia-smi" in probe.detail


def test_the_gpu_variables_name_the_reserved_indices_and_no_gpu_means_none() -> None:
    assert gpu_env([0, 2]) == {
        "CUDA_VISIBLE_DEVICES": "0,2",
        "NVIDIA_VISIBLE_DEVICES": "0,2",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # numbered as nvidia-smi numbers them
    }
    assert gpu_env([]) == {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"}


def test_device_nodes_are_the_reserved_gpus_and_the_control_files_that_exist(tmp_path: Path) -> None:
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    assert gpu_device_nodes([0, 2], tmp_path) == [
        str(tmp_path / "nvidia0"),
        str(tmp_path / "nvidia2"),
        str(tmp_path / "nvidiactl"),
        str(tmp_path / "nvidia-uvm"),
    ]
    assert gpu_device_nodes([5], tmp_path) == [str(tmp_path / "nvidiactl"), str(tmp_path / "nvidia-uvm")]
    assert gpu_device_nodes([], tmp_path) == []


# --- two binder processes, GPU nodes of our own in jm_nodes ------------------------------

GPU_NODES = {
    f"gpu-{i}": NodeInfo(
        node_id=f"gpu-{i}",
        cpu_milli=64_000,
        memory_mb=64_000,
        gpu=2,
        gpu_kind="a100",
        gpu_devices=[GpuDevice(index=0, kind="a100"), GpuDevice(index=1, kind="a100")],
        heartbeat_at=0.0,
    )
    for i in range(2)
}
ROUNDS = 5
JOBS_PER_ROUND = 12  # four GPUs in all, so most of each round is refused


@pytest.mark.integration
async def test_two_binders_never_give_one_gpu_to_two_jobs_at_once(nats_server, make_cluster) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await provision(js)
    nodes_kv = await js.key_value(subjects.KV_NODES)

    beats = asyncio.ensure_future(stand_in_heartbeats(nodes_kv, GPU_NODES.values()))
    alloc_kv = await js.key_value(subjects.KV_ALLOC)
    violations: list[str] = []
    audit_watch = await alloc_kv.watchall()

    async def audit() -> None:
        # Every record any binder writes: no index held twice, none beyond the node's two.
        async for entry in audit_watch:
            if entry is None or entry.operation in ("DEL", "PURGE"):
                continue
            alloc = msgspec.json.decode(entry.value, type=Allocation)
            held = [i for r in alloc.reservations.values() for i in r.gpu_devices]
            if overbooked(GPU_NODES[alloc.node_id], alloc) or not set(held) <= {0, 1}:
                violations.append(f"{alloc.node_id} rev {entry.revision}: {held}")

    auditor = asyncio.ensure_future(audit())
    bound: dict[str, JobBound] = {}
    refused: set[str] = set()

    async def on_bound(msg) -> None:
        m = msgspec.json.decode(msg.data, type=JobBound)
        bound[m.job_id] = m

    async def on_refused(msg) -> None:
        refused.add(msgspec.json.decode(msg.data, type=JobUnplaceable).job_id)

    try:
        await make_cluster([Service("binder", tag=f"-{i}") for i in range(2)], name="gpubind")
        await js.subscribe(subjects.DISPATCH_ALL, cb=on_bound, ordered_consumer=True)
        await js.subscribe(subjects.job_event("*", subjects.UNPLACEABLE), cb=on_refused, ordered_consumer=True)
        publisher = Publisher(js)
        spec = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=100, memory_mb=10, gpu=1, gpu_kind="a100"))
        for round_ in range(ROUNDS):
            names = [f"g{round_}-{i:02d}" for i in range(JOBS_PER_ROUND)]
            ready = [
                Outgoing(
                    subjects.job_event(0, subjects.READY),
                    JobReady(
                        job_id=name,
                        attempt=1,
                        partition=0,
                        spec=spec,
                        candidates=list(GPU_NODES) if i % 2 else list(reversed(GPU_NODES)),
                        submitted_at=time.time(),
                        ready_at=time.time(),
                    ),
                    f"{name}:ready",
                )
                for i, name in enumerate(names)
            ]
            await publisher.publish(ready)

            async def answered(names: list[str] = names) -> bool:
                return all(n in bound or n in refused for n in names)

            await eventually(answered, timeout=30, what=f"round {round_}: every GPU job bound or refused")
            held = [(bound[n].node_id, tuple(bound[n].gpu_devices)) for n in names if n in bound]
            # These all hold their GPUs at the same time: each (node, index) once, one index each.
            assert len(held) == 4, held
            assert sorted(held) == [("gpu-0", (0,)), ("gpu-0", (1,)), ("gpu-1", (0,)), ("gpu-1", (1,))]
            # End them: the GPUs are freed with the reservations, for the next round.
            done = [
                Outgoing(
                    subjects.job_event(0, subjects.SUCCEEDED),
                    JobSucceeded(
                        job_id=n,
                        attempt=1,
                        partition=0,
                        node_id=bound[n].node_id,
                        exit_code=0,
                        output_tail="",
                        submitted_at=0.0,
                        started_at=0.0,
                        at=time.time(),
                    ),
                    f"{n}:1:succeeded",
                )
                for n in names
                if n in bound
            ]
            await publisher.publish(done)

            async def released() -> bool:
                records = [msgspec.json.decode((await alloc_kv.get(n)).value, type=Allocation) for n in GPU_NODES]
                return all(not r.reservations for r in records)

            await eventually(released, timeout=30, what=f"round {round_}: every GPU reservation released")
        assert not violations, violations
    finally:
        beats.cancel()
        auditor.cancel()
        for node_id in GPU_NODES:  # stand-in nodes must not take the later tests' jobs
            await nodes_kv.delete(node_id)
        await nc.close()


# --- the whole cluster: an executor advertising two GPUs -------------------------------


@pytest.mark.integration
async def test_gpu_jobs_on_a_two_gpu_node_never_hold_one_index_at_once(nats_server, make_cluster) -> None:
    # The executor advertises JOBMESH_NODE_GPU=2 (no nvidia-smi here: the configured count).
    env = {**E2E_NODE_ENV, "JOBMESH_NODE_GPU": "2", "JOBMESH_NODE_GPU_KIND": "a100"}
    await make_cluster(env=env, name="gpu-e2e")
    nc = await nats.connect(nats_server.url)
    held: dict[str, tuple[int, ...]] = {}  # attempts holding GPUs right now, as the events tell
    clashes: list[str] = []
    bindings: list[tuple[int, ...]] = []

    async def on_event(msg) -> None:
        # One connection, so bound and terminal events arrive in the order the server took them;
        # a release (and so a rebinding of its GPUs) only ever follows the terminal event.
        if msg.subject.startswith("jobmesh.v1.node."):
            bound = msgspec.json.decode(msg.data, type=JobBound)
            mine = tuple(bound.gpu_devices)
            bindings.append(mine)
            taken = {i for indices in held.values() for i in indices}
            if taken & set(mine) or len(mine) != 1:
                clashes.append(f"{bound.job_id} got {mine} while {held} held")
            held[bound.job_id] = mine
        else:
            held.pop(msgspec.json.decode(msg.data, type=JobSucceeded).job_id, None)

    await nc.subscribe(subjects.DISPATCH_ALL, cb=on_event)
    for subject in subjects.job_events("*", (subjects.SUCCEEDED,)):  # both forms (executors: the node's)
        await nc.subscribe(subject, cb=on_event)
    client = await Client.connect(nats_server.url)
    try:
        spec = JobSpec(
            runtime=ProcessRuntime(argv=["sh", "-c", "sleep 1"]),
            resources=Resources(cpu_milli=100, memory_mb=32, gpu=1, gpu_kind="a100"),
        )
        reply = await client.submit([Submission(spec=spec) for _ in range(4)])
        views = await asyncio.gather(*(client.wait(job_id, timeout=90) for job_id in reply.job_ids))
        assert [v.state for v in views] == ["succeeded"] * 4
        await eventually(lambda: _true(len(bindings) == 4), what="every JobBound seen")
        assert not clashes, clashes
        assert set(bindings) == {(0,), (1,)}  # lowest first: 1 is taken only while 0 is held
        # A job without GPUs on a GPU node is told it has none (else CUDA would show it all).
        plain = JobSpec(
            runtime=ProcessRuntime(argv=["sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES] $NVIDIA_VISIBLE_DEVICES"'])
        )
        [plain_id] = (await client.submit([Submission(spec=plain)])).job_ids
        seen = await client.wait(plain_id, timeout=60)
        assert seen.state == "succeeded" and seen.attempts[-1].output_tail == "[] void\n", seen.attempts[-1]
    finally:
        await client.close()
        await nc.close()


async def _true(value: bool) -> bool:
    return value
