"""JSON log lines of real service processes carry the job's id and its trace id."""

from __future__ import annotations

import json
import uuid

import pytest

from jobmesh.client.client import Client
from jobmesh.contract.messages.v1 import JobSpec, ProcessRuntime, Submission
from tests.cluster_fixtures import E2E_NODE_ENV
from tests.helpers import eventually

pytestmark = pytest.mark.integration


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_a_failed_job_s_scheduler_line_names_its_job_and_trace(make_cluster, nats_server):
    cluster = await make_cluster(env={**E2E_NODE_ENV, "JOBMESH_LOG_FORMAT": "json"}, name="jsonlogs")
    client = await Client.connect(nats_server.url)
    try:
        spec = JobSpec(runtime=ProcessRuntime(argv=["sh", "-c", "exit 4"]), queue="json-logs")
        [job_id] = (await client.submit([Submission(spec=spec, idempotency_key=f"jl-{uuid.uuid4().hex}")])).job_ids

        async def gave_up() -> dict | None:
            scheduler = next(p for p in cluster.procs if p.name == "scheduler")
            lines = json_lines(scheduler.log_path.read_text(errors="replace"))
            return next((r for r in lines if r.get("job_id") == job_id and "gave up" in r["msg"]), None)

        line = await eventually(gave_up, timeout=60, interval=0.2, what="the scheduler's give-up line")
    finally:
        await client.close()
    # Every line of every service is JSON with the common fields.
    for proc in cluster.procs:
        text = proc.log_path.read_text(errors="replace")
        records = json_lines(text)
        assert records and len(records) == len([t for t in text.splitlines() if t.strip()]), proc.name
        assert all({"ts", "level", "service", "logger", "msg"} <= r.keys() for r in records), proc.name
    assert line["service"] == "scheduler" and line["level"] == "INFO"
    # The failure event came alone in its batch (light load): the line has its trace.
    assert len(line["trace_id"]) == 32 and int(line["trace_id"], 16) != 0, line
