"""Pipelined submits against the real trigger: a plain loop of ``Client.enqueue`` travels in
a few requests; every handle's job id is the one the trigger accepted, each job exactly
once; a bad job among them is refused on its own handle only, naming its field as if it had
been submitted alone; ``close`` sends what is still queued."""

from __future__ import annotations

import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobSpec, NoopRuntime
from jobmesh.errors import InvalidMessage
from tests.cluster_fixtures import submitted_where

pytestmark = pytest.mark.integration


async def test_a_loop_of_enqueues_is_accepted_in_few_requests_and_a_bad_job_fails_alone(make_cluster, nats_server):
    await make_cluster(("trigger",), name="pipeline")
    client = await Client.connect(nats_server.url)
    requests: list[int] = []

    async def count(msg) -> None:
        requests.append(msg.data.count(b'"spec"'))

    watcher = await client.nc.subscribe(subjects.API_SUBMIT, cb=count)
    try:
        tag = "pipeline-loop"
        handles = []
        for i in range(600):
            # Job 123's priority is out of range: the trigger refuses it, naming the field.
            spec = JobSpec(runtime=NoopRuntime(), name=tag, priority=12 if i == 123 else 5)
            handles.append(client.enqueue(spec))
        await client.flush()
        assert all(h.done() for h in handles)
        bad = handles[123]
        with pytest.raises(InvalidMessage) as refused:
            await bad
        assert refused.value.field == "jobs[0].spec.priority", refused.value
        assert "$.jobs[0].spec.priority" in str(refused.value)
        good = [h for i, h in enumerate(handles) if i != 123]
        assert [await h for h in good] == [h.job_id for h in good]

        # Every good job went in exactly once, the bad one never.
        stored = await submitted_where(client.nc.jetstream(), lambda e: e.spec.name == tag)
        ids = [event.job_id for event, _ in stored]
        assert sorted(ids) == sorted(h.job_id for h in good) and len(set(ids)) == len(ids)
        # A few requests carried them all: the batch with the bad job went twice.
        assert sum(requests) >= 600 and len(requests) <= 8, requests

        # What is still queued at close goes out before the connection does.
        last = client.enqueue(JobSpec(runtime=NoopRuntime(), name=tag + "-last"))
    finally:
        await watcher.unsubscribe()
        await client.close()
    assert last.done() and last.error is None
