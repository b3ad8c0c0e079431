"""Jobs that depend on jobs, through the real services: a diamond across scheduler
partitions, a failure that skips what needs it and runs what waits for it to fail, and the
reason a waiting job shows."""

from __future__ import annotations

import pytest

from jobmesh.client.client import Client
from jobmesh.contract import ids, subjects
from jobmesh.contract.messages.v1 import Dependency, JobSpec, ProcessRuntime, Submission
from jobmesh.errors import InvalidSpec, NotFound
from tests.helpers import eventually

pytestmark = pytest.mark.integration

PARTITIONS = 4  # the default (Settings.partitions)


@pytest.fixture
async def client(cluster, nats_server):
    cl = await Client.connect(nats_server.url)
    yield cl
    await cl.close()


def _job(key: str, queue: str, argv: list[str], after: list[tuple[str, str, str]] = ()) -> Submission:
    deps = [
        Dependency(
            job_id=ids.job_id_for(k), when=when, step=k.split(":")[-1], partition=subjects.partition_of(q, PARTITIONS)
        )
        for k, q, when in after
    ]
    spec = JobSpec(runtime=ProcessRuntime(argv=argv), queue=queue, name=key.split(":")[-1], after=deps)
    return Submission(spec=spec, idempotency_key=key)


async def test_a_diamond_across_partitions_runs_d_after_b_and_c(client, request):
    run = request.node.name
    a, b, c, d = (f"{run}:{s}" for s in "abcd")
    # etl and q1 hash to different partitions, so every edge crosses one.
    assert subjects.partition_of("etl", PARTITIONS) != subjects.partition_of("q1", PARTITIONS)
    reply = await client.submit(
        [
            # d first: it is submitted before what it needs exists anywhere.
            _job(d, "etl", ["echo", "d"], after=[(b, "q1", "succeeded"), (c, "q1", "succeeded")]),
            _job(b, "q1", ["sh", "-c", "sleep 0.3; echo b"], after=[(a, "etl", "succeeded")]),
            _job(c, "q1", ["echo", "c"], after=[(a, "etl", "succeeded")]),
            _job(a, "etl", ["sh", "-c", "sleep 0.5; echo a"]),
        ]
    )
    job_d = reply.job_ids[0]
    waiting = await eventually(
        lambda: _reason_if(client, job_d, "waiting for"), timeout=30, what="d to say what it waits for"
    )
    assert "b" in waiting and "c" in waiting
    views = {
        name: await client.wait(ids.job_id_for(key), timeout=60) for name, key in zip("abcd", (a, b, c, d), strict=True)
    }
    assert all(v.state == "succeeded" for v in views.values()), {k: v.state for k, v in views.items()}
    first = {k: v.attempts[-1] for k, v in views.items()}
    assert first["b"].started_at >= first["a"].finished_at
    assert first["c"].started_at >= first["a"].finished_at
    assert first["d"].started_at >= max(first["b"].finished_at, first["c"].finished_at)


async def test_a_failure_skips_what_needs_it_and_runs_the_on_failure_job(client, request):
    run = request.node.name
    a, nxt, cleanup, after_any = (f"{run}:{s}" for s in ("a", "next", "cleanup", "always"))
    await client.submit(
        [
            _job(a, "etl", ["sh", "-c", "exit 3"]),
            _job(nxt, "q1", ["echo", "never"], after=[(a, "etl", "succeeded")]),
            _job(cleanup, "q1", ["echo", "cleaning"], after=[(a, "etl", "failed")]),
            _job(after_any, "etl", ["echo", "any"], after=[(nxt, "q1", "ended")]),
        ]
    )
    failed = await client.wait(ids.job_id_for(a), timeout=60)
    assert failed.state == "failed"
    skipped = await client.wait(ids.job_id_for(nxt), timeout=60)
    assert skipped.state == "cancelled"
    assert "skipped: a failed" in skipped.reason
    assert (await client.wait(ids.job_id_for(cleanup), timeout=60)).state == "succeeded"
    # "ended" runs after a skip too (afterany).
    assert (await client.wait(ids.job_id_for(after_any), timeout=60)).state == "succeeded"


async def test_a_job_submitted_after_its_dependency_ended_runs_or_is_refused(client, request):
    run = request.node.name
    a, b, c = (f"{run}:{s}" for s in "abc")
    await client.submit([_job(a, "q1", ["echo", "a"])])
    assert (await client.wait(ids.job_id_for(a), timeout=60)).state == "succeeded"
    await client.submit([_job(b, "etl", ["echo", "b"], after=[(a, "q1", "succeeded")])])
    assert (await client.wait(ids.job_id_for(b), timeout=60)).state == "succeeded"
    # One that could never run is refused at submit, naming the field (nothing is created).
    with pytest.raises(InvalidSpec) as refused:
        await client.submit([_job(c, "q1", ["echo", "c"], after=[(a, "q1", "failed")])])
    assert refused.value.field.endswith("spec.after[0].job_id")
    with pytest.raises(NotFound):
        await client.get(ids.job_id_for(c))


async def _reason_if(client: Client, job_id: str, text: str) -> str:
    try:
        view = await client.get(job_id)
    except NotFound:  # not recorded yet
        return ""
    return view.reason if text in view.reason else ""
