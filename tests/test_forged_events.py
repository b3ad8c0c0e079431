"""Forged executor events against the real services: dead-lettered as forged, no effect.

A job runs on node A until the test lets it end. Meanwhile a forger publishes a JobSucceeded
for it on node B's subject, once naming node A in its body (every consumer of JM_JOBS
refuses it before any handler: the subject fence) and once naming node B (the scheduler
and the binder, which know the attempt is A's, refuse it: the binding fence). The job
keeps running on A, A keeps its reservation, and the job ends by A's own report.

Not covered: the tracker has no binding fence (see docs/architecture.md, "Subjects"), so
it records the second forgery; its view of this job is not asserted past the first.
"""

from __future__ import annotations

import time

import msgspec
import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.ids import attempt_key
from jobmesh.contract.messages.v1 import Allocation, JobSpec, JobSucceeded, ProcessRuntime, Resources, Submission
from tests.cluster_fixtures import dead_letters, node_record
from tests.helpers import eventually

pytestmark = pytest.mark.integration

NODE_A = "forge-a"
NODE_B = "forge-b"
ENV = {
    "JOBMESH_NODE_ID": NODE_A,
    "JOBMESH_NODE_CPU_MILLI": "8000",
    "JOBMESH_NODE_MEMORY_MB": "8192",
    "JOBMESH_LOG_LEVEL": "WARNING",
}
# Runs until the test puts "go" into its working directory.
WAIT_FOR_GO = "while [ ! -e go ]; do sleep 0.05; done; echo done"


async def _reserved_on(js, node: str) -> set[str]:
    kv = await js.key_value(subjects.KV_ALLOC)
    try:
        entry = await kv.get(node)
    except Exception:  # noqa: BLE001 - no record: nothing reserved
        return set()
    if not entry.value:
        return set()
    return set(msgspec.json.decode(entry.value, type=Allocation).reservations)


async def _forged_letters(js, subject: str) -> dict[str, str]:
    """Service -> reason of the ``forged`` dead letters of ``subject``."""
    return {d.service: d.reason for d in await dead_letters(js) if d.subject == subject and d.code == "forged"}


def _forged(job_id: str, partition: int, node_id: str) -> JobSucceeded:
    now = time.time()
    return JobSucceeded(
        job_id=job_id,
        partition=partition,
        attempt=1,
        node_id=node_id,
        exit_code=0,
        output_tail="forged",
        submitted_at=now,
        started_at=now,
        at=now,
    )


async def test_forged_successes_are_dead_lettered_and_change_nothing(make_cluster, nats_server):
    cluster = await make_cluster(env=ENV, name="forged")
    nc = await nats.connect(nats_server.url)
    client = await Client.connect(nats_server.url, timeout=30)
    try:
        js = nc.jetstream()
        spec = JobSpec(
            runtime=ProcessRuntime(argv=["sh", "-c", WAIT_FOR_GO]),
            queue="forged",
            resources=Resources(cpu_milli=100, memory_mb=16),
        )
        [job_id] = (await client.submit([Submission(spec=spec)])).job_ids
        key = attempt_key(job_id, 1)

        async def running_on_a() -> bool:
            try:
                view = await client.get(job_id)
            except Exception:  # noqa: BLE001 - not recorded yet
                return False
            return view.state == "running" and view.node_id == NODE_A

        await eventually(running_on_a, timeout=60, what="the job to run on node A")
        view = await client.get(job_id)
        partition = view.partition

        async def listed_by_a() -> bool:
            record = await node_record(nats_server.url, NODE_A)
            return record is not None and any(a.job_id == job_id for a in record.attempts)

        await eventually(listed_by_a, timeout=30, what="node A's record to list the attempt")
        assert key in await _reserved_on(js, NODE_A)

        async def scheduler_says_running_on_a() -> bool:
            explained = await client.explain(partition, job_id)
            return explained.where == "released" and NODE_A in explained.reason

        await eventually(scheduler_says_running_on_a, timeout=30, what="the scheduler to see the attempt on A")

        subject_b = subjects.node_event(partition, subjects.SUCCEEDED, NODE_B)
        # 1. Node B's subject, node A's name in the body: refused by every JM_JOBS consumer.
        await js.publish(subject_b, encode(_forged(job_id, partition, NODE_A)), headers={"Nats-Msg-Id": "forged-1"})

        async def refused_by_everyone() -> dict[str, str]:
            letters = await _forged_letters(js, subject_b)
            return letters if {"scheduler", "binder", "tracker"} <= set(letters) else {}

        letters = await eventually(refused_by_everyone, timeout=60, what="forged dead letters of the first forgery")
        for reason in letters.values():
            assert f"node_id '{NODE_A}' is not the subject's node '{NODE_B}'" in reason, reason

        # 2. Node B's subject and name, for A's attempt: the scheduler and the binder know
        # the attempt is A's.
        await js.publish(subject_b, encode(_forged(job_id, partition, NODE_B)), headers={"Nats-Msg-Id": "forged-2"})

        async def refused_by_binding() -> list[str]:
            found = [
                d
                for d in await dead_letters(js)
                if d.subject == subject_b and d.code == "forged" and f"'{NODE_A}', not '{NODE_B}'" in d.reason
            ]
            services = {d.service for d in found}
            return sorted(services) if {"scheduler", "binder"} <= services else []

        assert await eventually(refused_by_binding, timeout=60, what="the binding fences") == ["binder", "scheduler"]

        # Nothing changed: A still holds the reservation, the scheduler still has the job
        # running on A, and no retry or end was decided.
        assert key in await _reserved_on(js, NODE_A)
        assert await scheduler_says_running_on_a()

        # A's own report ends the job.
        workdirs = list((cluster.work_dir / "nodes").glob(f"*/{job_id}-1"))
        assert len(workdirs) == 1, workdirs
        (workdirs[0] / "go").touch()

        subject_a = subjects.node_event(partition, subjects.SUCCEEDED, NODE_A)

        async def reported_by_a() -> bool:
            info = await js.stream_info(subjects.STREAM_JOBS, subjects_filter=subject_a)
            return sum((info.state.subjects or {}).values()) == 1

        await eventually(reported_by_a, timeout=60, what="node A's own JobSucceeded")

        async def scheduler_done() -> bool:
            return (await client.explain(partition, job_id)).where == ""

        await eventually(scheduler_done, timeout=60, what="the scheduler to end the job")
        await eventually(lambda: _released(js, key), timeout=30, what="the reservation to be released")
        # Neither forgery was taken for A's report: no retry and no second attempt.
        view = await client.get(job_id)
        assert view.attempt == 1 and view.node_id == NODE_A
    finally:
        await client.close()
        await nc.close()


async def _released(js, key: str) -> bool:
    return key not in await _reserved_on(js, NODE_A)
