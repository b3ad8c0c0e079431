"""Four binder processes race 1,000 jobs onto 10 small nodes: no node is ever overbooked,
each job gets exactly one answer, and every reservation is released when its job ends."""

from __future__ import annotations

import asyncio
import random
import time

import msgspec
import nats
import pytest

from jobmesh.binder.allocation import overbooked
from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import (
    Allocation,
    JobBound,
    JobReady,
    JobSpec,
    JobSucceeded,
    JobUnplaceable,
    NodeInfo,
    NoopRuntime,
    Reservation,
    Resources,
)
from jobmesh.runtime.provisioning import provision
from jobmesh.runtime.publisher import Outgoing, Publisher
from tests.cluster_fixtures import Service, stand_in_heartbeats
from tests.helpers import eventually

pytestmark = pytest.mark.integration

NODES = [f"small-{i}" for i in range(10)]
JOBS = 1000
CPU_PER_JOB = 300  # three fit on a 1000m node
CAPACITY = {n: NodeInfo(node_id=n, cpu_milli=1000, memory_mb=1024, disk_mb=100, heartbeat_at=0.0) for n in NODES}


async def test_four_binders_never_overbook(nats_server, make_cluster):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await provision(js)
    nodes_kv = await js.key_value(subjects.KV_NODES)

    beats = asyncio.ensure_future(stand_in_heartbeats(nodes_kv, CAPACITY.values()))
    await eventually(lambda: _keys(nodes_kv, len(NODES)), what="fake nodes registered")

    # Every allocation record ever written is checked, not only the final one.
    violations: list[str] = []
    writes = {"n": 0}
    alloc_kv = await js.key_value(subjects.KV_ALLOC)
    watcher = await alloc_kv.watchall()

    async def audit() -> None:
        async for entry in watcher:
            if entry is None or entry.operation in ("DEL", "PURGE"):
                continue
            alloc = msgspec.json.decode(entry.value, type=Allocation)
            writes["n"] += 1
            if overbooked(CAPACITY[alloc.node_id], alloc):
                violations.append(f"{alloc.node_id} rev {entry.revision}: {len(alloc.reservations)} reservations")

    auditor = asyncio.ensure_future(audit())
    try:
        cluster = await make_cluster([Service("binder", tag=f"-{i}") for i in range(4)], name="race")
        publisher = Publisher(js)
        spec = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=CPU_PER_JOB, memory_mb=10))
        rng = random.Random(7)
        ready = []
        for i in range(JOBS):
            candidates = NODES[:]
            rng.shuffle(candidates)
            job = JobReady(
                job_id=f"race{i:04d}",
                attempt=1,
                partition=0,
                spec=spec,
                candidates=candidates,
                submitted_at=time.time(),
                ready_at=time.time(),
            )
            ready.append(Outgoing(subjects.job_event(0, subjects.READY), job, f"race{i}:ready"))
        await publisher.publish(ready)

        bound: dict[str, str] = {}
        twice: list[str] = []
        refused: set[str] = set()

        async def on_bound(msg) -> None:
            m = msgspec.json.decode(msg.data, type=JobBound)
            if m.job_id in bound:
                twice.append(m.job_id)
            bound[m.job_id] = m.node_id

        async def on_refused(msg) -> None:
            refused.add(msgspec.json.decode(msg.data, type=JobUnplaceable).job_id)

        await js.subscribe(subjects.DISPATCH_ALL, cb=on_bound, ordered_consumer=True)
        await js.subscribe(subjects.job_event("*", subjects.UNPLACEABLE), cb=on_refused, ordered_consumer=True)

        async def all_answered():
            return len(bound) + len(refused) >= JOBS

        await eventually(all_answered, timeout=60, what="every job bound or refused")
        assert not twice, f"bound twice: {twice}"
        assert len(bound) + len(refused) == JOBS and not (set(bound) & refused)
        assert len(bound) == len(NODES) * (1000 // CPU_PER_JOB)  # every slot used, none twice
        assert not violations, violations

        # End every bound job: all reservations must go, whichever binder holds them.
        done = [
            Outgoing(
                subjects.job_event(0, subjects.SUCCEEDED),
                JobSucceeded(
                    job_id=j,
                    attempt=1,
                    partition=0,
                    node_id=n,
                    exit_code=0,
                    output_tail="",
                    submitted_at=0.0,
                    started_at=0.0,
                    at=time.time(),
                ),
                f"{j}:1:succeeded",
            )
            for j, n in bound.items()
        ]
        await publisher.publish(done)

        async def all_released():
            records = [msgspec.json.decode((await alloc_kv.get(n)).value, type=Allocation) for n in NODES]
            return all(not r.reservations for r in records)

        await eventually(all_released, timeout=30, what="every reservation released")
        assert not violations, violations
        assert writes["n"] >= len(NODES)
        cluster.check_alive()
    finally:
        beats.cancel()
        auditor.cancel()
        await nc.close()


async def _keys(kv, n: int) -> bool:
    try:
        return len(await kv.keys()) >= n
    except Exception:  # noqa: BLE001 - nats-py raises when the bucket is still empty
        return False


async def test_a_redelivered_ready_goes_back_to_its_reservation(nats_server, make_cluster):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await provision(js)
    nodes_kv = await js.key_value(subjects.KV_NODES)
    for i in range(3):
        node = NodeInfo(node_id=f"redo-{i}", cpu_milli=1000, memory_mb=1024, heartbeat_at=time.time() + 600)
        await nodes_kv.put(node.node_id, encode(node))
    try:
        await make_cluster(("binder",), name="redo")
        bound: list[str] = []

        async def on_bound(msg) -> None:
            m = msgspec.json.decode(msg.data, type=JobBound)
            if m.job_id == "redo-job":
                bound.append(m.node_id)

        await nc.subscribe(subjects.DISPATCH_ALL, cb=on_bound)
        spec = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=100, memory_mb=1))
        publisher = Publisher(js)
        # As if a binder reserved on redo-0 and died before its JobBound went out.
        alloc_kv = await js.key_value(subjects.KV_ALLOC)
        held = Allocation(
            node_id="redo-0",
            reservations={
                "redo-job:1": Reservation(resources=spec.resources, scratch_dir="/scratch/redo-job-1", at=time.time())
            },
        )
        await alloc_kv.put("redo-0", encode(held))
        # The redelivered JobReady prefers other nodes, as a re-plan might.
        again = JobReady(
            job_id="redo-job",
            attempt=1,
            partition=0,
            spec=spec,
            candidates=["redo-2", "redo-1", "redo-0"],
            submitted_at=0.0,
            ready_at=0.0,
        )
        await publisher.publish([Outgoing(subjects.job_event(0, subjects.READY), again, "redo:2")])
        await eventually(lambda: _async(len(bound) == 1), what="the binding")
        assert bound == ["redo-0"]

        async def reservations() -> int:
            count = 0
            for i in range(3):
                try:
                    count += len(
                        msgspec.json.decode((await alloc_kv.get(f"redo-{i}")).value, type=Allocation).reservations
                    )
                except Exception:  # noqa: BLE001 - no record for that node
                    pass
            return count

        stats_before = await js.stream_info(subjects.STREAM_JOBS)
        await eventually(lambda: _ready_acked(js, stats_before), what="the second JobReady to be handled")
        assert await reservations() == 1  # no second reservation elsewhere
    finally:
        await nc.close()


async def _async(value):
    return value


async def _ready_acked(js, _info) -> bool:
    info = await js.consumer_info(subjects.STREAM_JOBS, "binder-ready")
    return info.num_ack_pending == 0 and info.num_pending == 0
