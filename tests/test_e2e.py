"""One job end to end through the five services, each a separate process, via the CLI."""

from __future__ import annotations

import json

import msgspec
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobSpec, ProcessRuntime, Submission
from jobmesh.runtime.tracing import trace_id_of
from tests.cluster_fixtures import NODE_ID, job_status, jobmesh_cli, submitted_job_id
from tests.helpers import eventually

pytestmark = pytest.mark.integration


async def test_run_succeeding_job_prints_output_and_exits_0(cluster, nats_server):
    result = jobmesh_cli(["run", "--", "sh", "-c", "echo hi; exit 0"], nats_server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == ["hi"]
    assert "succeeded" in result.stderr
    view = job_status(submitted_job_id(result.stderr), nats_server.url)
    assert view["state"] == "succeeded"
    [attempt] = view["attempts"]
    assert attempt["state"] == "succeeded" and attempt["exit_code"] == 0


async def test_run_failing_job_exits_3_and_status_shows_exit_code(cluster, nats_server):
    result = jobmesh_cli(["run", "--", "sh", "-c", "exit 7"], nats_server.url)
    assert result.returncode == 3, result.stderr
    view = job_status(submitted_job_id(result.stderr), nats_server.url)
    assert view["state"] == "failed"
    assert view["node_id"] == NODE_ID
    [attempt] = view["attempts"]
    assert attempt["exit_code"] == 7
    assert attempt["state"] == "failed"
    kinds = [e["kind"] for e in view["events"]]
    for kind in ("submitted", "ready", "bound", "started", "failed"):
        assert kind in kinds


async def test_submit_json_then_logs_and_list(cluster, nats_server):
    result = jobmesh_cli(["submit", "--json", "--", "sh", "-c", "echo one; echo two >&2"], nats_server.url)
    assert result.returncode == 0, result.stderr
    job_id = json.loads(result.stdout)["job_id"]  # stdout is only JSON

    client = await Client.connect(nats_server.url)
    try:
        await eventually(lambda: _state_is(client, job_id, "succeeded"), what="job to succeed")
    finally:
        await client.close()
    logs = jobmesh_cli(["logs", job_id], nats_server.url)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.splitlines() == ["one"]
    assert "two" in logs.stderr
    listed = json.loads(jobmesh_cli(["list", "--json"], nats_server.url).stdout)
    assert job_id in [j["job_id"] for j in listed]


async def _state_is(client: Client, job_id: str, state: str) -> bool:
    try:
        return (await client.get(job_id)).state == state
    except Exception:  # noqa: BLE001 - not recorded yet
        return False


async def test_same_idempotency_key_gives_same_job(cluster, nats_server):
    client = await Client.connect(nats_server.url)
    try:
        spec = JobSpec(runtime=ProcessRuntime(argv=["true"]))
        first = await client.submit([Submission(spec=spec, idempotency_key="same-key-1")])
        second = await client.submit([Submission(spec=spec, idempotency_key="same-key-1")])
        assert first.job_ids == second.job_ids
        assert second.duplicates == [True]
        await eventually(lambda: _state_is(client, first.job_ids[0], "succeeded"), what="job to succeed")
        view = await client.get(first.job_ids[0])
        assert len(view.attempts) == 1
    finally:
        await client.close()


async def test_trace_context_travels_from_submit_to_terminal_event(cluster, nats_server, nc):
    client = await Client.connect(nats_server.url)
    try:
        reply = await client.submit([Submission(spec=JobSpec(runtime=ProcessRuntime(argv=["true"])))])
        job_id = reply.job_ids[0]
        await eventually(lambda: _state_is(client, job_id, "succeeded"), what="job to succeed")
    finally:
        await client.close()
    js = nc.jetstream()
    ids = {}
    info = await js.stream_info(subjects.STREAM_JOBS)
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(subjects.STREAM_JOBS, seq)
        body = msgspec.json.decode(msg.data)
        if body.get("job_id") == job_id:
            ids[body["type"]] = trace_id_of(msg.headers)
    assert set(ids) >= {"job.submitted", "job.ready", "job.started", "job.succeeded"}
    trace_ids = set(ids.values())
    assert len(trace_ids) == 1 and "" not in trace_ids, ids


async def test_cli_reports_unreachable_cluster_clearly():
    result = jobmesh_cli(["submit", "--", "true"], "nats://127.0.0.1:1")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach NATS" in lines[0]


async def test_cli_rejects_bad_spec_naming_the_field(cluster, nats_server, nc):
    js = nc.jetstream()

    async def submitted_count() -> int:
        info = await js.stream_info(subjects.STREAM_JOBS, subjects_filter=subjects.job_event("*", subjects.SUBMITTED))
        return sum((info.state.subjects or {}).values())

    before = await submitted_count()
    result = jobmesh_cli(["submit", "--priority", "12", "--", "true"], nats_server.url)
    assert result.returncode == 1
    assert "priority" in result.stderr
    # The CLI checks the spec before it sends it, so the path starts at the spec.
    assert "(field priority)" in result.stderr, result.stderr
    assert result.stdout == ""  # no job id printed
    assert await submitted_count() == before, "a rejected submit published a job"
