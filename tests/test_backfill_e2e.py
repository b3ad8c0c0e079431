"""Backfill through the real services: an 8-cpu job behind a stream of 1-cpu jobs on an
8-cpu node gets a reservation of future capacity, starts within the time it promised,
and a shorter job still runs in the gap before it while no longer one slips past it."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import pytest
from nats.js.errors import KeyNotFoundError

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
        fill = [Submission(spec=_small(f"fill-{i}", 2 + 0.5 * i, timeout=10)) for i in range(8)]
        fill += [Submission(spec=_small(f"queued-{i}", 3, timeout=10)) for i in range(16)]
        stream_ids += (await client.submit(fill)).job_ids
        big_spec = JobSpec(
            runtime=ProcessRuntime(argv=["echo", "big"]), resources=Resources(cpu_milli=8000, memory_mb=32), name="big"
        )
        [big] = (await client.submit([Submission(spec=big_spec)])).job_ids

        async def stream() -> None:
            for i in range(400):
                [job_id] = (await client.submit([Submission(spec=_small(f"stream-{i}", 3, timeout=10))])).job_ids
                stream_ids.append(job_id)
                await asyncio.sleep(0.25)  # the stream's pace, not a wait for a result

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
        # A job short enough to end before the promise runs in the gap.
        gap_spec = JobSpec(
            runtime=ProcessRuntime(argv=["true"]),
            resources=ONE_CPU,
            timeouts=Timeouts(run=1),
            name="gap",
            queue="gap",  # not behind the stream in its queue's order
        )
        [gap] = (await client.submit([Submission(spec=gap_spec)])).job_ids

        async def succeeded(job_id: str):
            view = await _view(client, job_id)
            return view if view is not None and view.state == "succeeded" else None

        won = await eventually(lambda: succeeded(big), timeout=90, what="the big job to run")
        await _stop(streaming)
        started = won.attempts[-1].started_at
        assert started is not None and started <= hold.starts_at, (started, hold.starts_at)
        filled = await eventually(lambda: succeeded(gap), timeout=30, what="the short job to run")
        assert filled.attempts[-1].finished_at <= started  # it ran in the gap, before the big job
        # No job of the stream (each may run 10 s, longer than the gap) started after the
        # room was promised and before the big job: none slipped past it.
        slipped = []
        for job_id in stream_ids:
            view = await _view(client, job_id)
            if view is None or not view.attempts:
                continue
            begun = view.attempts[0].started_at
            if begun is not None and hold.at + 1.0 < begun < started:
                slipped.append((view.name, begun))
        assert not slipped, slipped
    finally:
        if streaming is not None:
            await _stop(streaming)
        await client.close()


async def _stop(task: asyncio.Future[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
