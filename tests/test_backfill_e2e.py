"""Backfill through the real services: an 8-cpu job behind a stream of 1-cpu jobs on an
8-cpu node gets a reservation of future capacity and starts within the time it promised;
shorter jobs still run in the gap before it, and nothing that could overstay the promise
is admitted."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import pytest
from nats.js.errors import KeyNotFoundError

from jobmesh.binder.backfill import STOP_SLACK
from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import Allocation, JobSpec, ProcessRuntime, Resources, Submission, Timeouts
from jobmesh.dev.cluster import LocalCluster
from jobmesh.errors import NotFound
from tests.cluster_fixtures import Service
from tests.helpers import eventually

pytestmark = pytest.mark.integration

NODE_ID = "bf-1"
NODE = Service(
    "executor",
    {"JOBMESH_NODE_ID": NODE_ID, "JOBMESH_NODE_CPU_MILLI": "8000", "JOBMESH_NODE_MEMORY_MB": "8192"},
    tag="-bf",
)
ONE_CPU = Resources(cpu_milli=1000, memory_mb=32)


def _small(name: str, seconds: float, timeout: float) -> JobSpec:
    return JobSpec(
        runtime=ProcessRuntime(argv=["sleep", str(seconds)]),
        resources=ONE_CPU,
        timeouts=Timeouts(run=timeout),
        name=name,
        queue="stream",
    )


@pytest.fixture(scope="module")
async def backfill_cluster(make_module_cluster) -> LocalCluster:
    return await make_module_cluster(
        ("trigger", "scheduler", "binder", "tracker", NODE),
        env={"JOBMESH_NODE_TTL_SECONDS": "3", "JOBMESH_HEARTBEAT_SECONDS": "1"},
        name="backfill",
    )


async def _view(client: Client, job_id: str):
    try:
        return await client.get(job_id)
    except NotFound:
        return None


async def test_a_big_job_behind_a_stream_of_small_ones_starts_by_its_promise(backfill_cluster, nats_server):
    client = await Client.connect(nats_server.url)
    kv = await client.nc.jetstream().key_value(subjects.KV_ALLOC)
    stream_ids: list[str] = []
    streaming: asyncio.Future[None] | None = None
    try:
        # The node full of 1-cpu jobs that end one by one, more of them queued behind, then
        # the 8-cpu job, then more 1-cpu jobs all along: whenever a cpu frees, a small job is
        # waiting for it, so the big one never finds eight free by chance.
        # The first ones may run 20 s: the promise is that far out, and the stream's jobs
        # (10 s each at most) still fit in the gap before it for a while, then no more.
        # One of them runs 12 s: the node cannot drain for the big job before that, while
        # the cpus the others free are there for a short job.
        fill = [Submission(spec=_small(f"fill-{i}", 12 if i == 0 else 2 + 0.5 * i, timeout=20)) for i in range(8)]
        fill += [Submission(spec=_small(f"queued-{i}", 3, timeout=20)) for i in range(16)]
        stream_ids += (await client.submit(fill)).job_ids

        async def full():
            return [n.allocated.cpu_milli for n in (await client.nodes()).nodes] == [8000]

        await eventually(full, timeout=30, what="the node to be full")
        big_spec = JobSpec(
            runtime=ProcessRuntime(argv=["echo", "big"]), resources=Resources(cpu_milli=8000, memory_mb=32), name="big"
        )
        [big] = (await client.submit([Submission(spec=big_spec)])).job_ids

        async def stream() -> None:
            for i in range(400):
                [job_id] = (await client.submit([Submission(spec=_small(f"stream-{i}", 3, timeout=10))])).job_ids
                stream_ids.append(job_id)
                await asyncio.sleep(0.25)  # the stream's pace, not a wait for a result (noqa: sleep)

        streaming = asyncio.ensure_future(stream())

        async def promised():
            try:
                entry = await kv.get(NODE_ID)
            except KeyNotFoundError:
                return None  # nothing reserved on the node yet
            record = msgspec.json.decode(entry.value, type=Allocation)
            hold = record.reservations.get(f"{big}:1")
            return hold if hold is not None and hold.starts_at else None

        try:
            hold = await eventually(promised, timeout=60, what="the big job's reservation of future room")
        except AssertionError as exc:
            view = await _view(client, big)
            events = [(e.kind, e.detail) for e in view.events] if view is not None else []
            raise AssertionError(f"{exc}; the big job's history: {events}") from None

        # A job short enough to end before the promise runs in the gap (in its own queue,
        # not behind the stream's jobs, which the room keeps waiting).
        gap_spec = JobSpec(
            runtime=ProcessRuntime(argv=["true"]),
            resources=ONE_CPU,
            timeouts=Timeouts(run=1),
            name="gap",
            queue="gap",
        )
        [gap] = (await client.submit([Submission(spec=gap_spec)])).job_ids

        async def succeeded(job_id: str):
            view = await _view(client, job_id)
            return view if view is not None and view.state == "succeeded" else None

        won = await eventually(lambda: succeeded(big), timeout=90, what="the big job to run")
        await _stop(streaming)
        started = won.attempts[-1].started_at
        assert started is not None and started <= hold.starts_at, (started, hold.starts_at)
        # Every job bound on the node after the promise was made ends by it at the latest
        # (backfill admits nothing that could overstay), and some were: the gap was used.
        admitted = []
        for job_id in [*stream_ids, gap]:
            view = await _view(client, job_id)
            if view is None:
                continue
            for event in view.events:
                if event.kind == "bound" and hold.at < event.at < started:
                    admitted.append((view.name, event.at + view.spec.timeouts.run + STOP_SLACK))
        # (A second of slack: the test reads the binding's time, a moment after the reservation's.)
        overstaying = [(name, bound) for name, bound in admitted if bound > hold.starts_at + 1.0]
        assert not overstaying, (hold.starts_at, overstaying)
        assert any(name == "gap" for name, _ in admitted), admitted
    finally:
        if streaming is not None:
            await _stop(streaming)
        await client.close()


async def _stop(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
