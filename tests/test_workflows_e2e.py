"""Workflows through the real services: the shipped examples, a diamond, a failure with
an on-failure step and a retry, a cancel during a fan-out, and the trigger and scheduler
killed mid-run."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import msgspec
import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.client.workflows import WorkflowStatus, read_workflow_file
from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import WorkflowRunReply, WorkflowRunRequest, WorkflowSpec
from jobmesh.runtime.tracing import trace_id_of
from tests.cluster_fixtures import E2E_NODE_ENV, jobmesh_cli
from tests.helpers import eventually

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "workflows"
DIGITS = ROOT / "examples" / "handlers" / "digits.py"
FAST = {"JOBMESH_NODE_TTL_SECONDS": "3", "JOBMESH_HEARTBEAT_SECONDS": "1"}


@pytest.fixture(scope="module")
async def wf_cluster(make_module_cluster):
    """The five services; the executor hosts the digits handlers the demo workflow calls."""
    return await make_module_cluster(env={**E2E_NODE_ENV, **FAST, "JOBMESH_HANDLER_MODULES": str(DIGITS)}, name="wf")


@pytest.fixture
async def client(wf_cluster, nats_server):
    cl = await Client.connect(nats_server.url)
    yield cl
    await cl.close()


async def _ended(client: Client, run_id: str, timeout: float = 90) -> WorkflowStatus:
    async def done():
        status = await client.workflow_status(run_id)
        return status if status.outcome != "running" else None

    return await eventually(done, timeout=timeout, what=f"run {run_id} to end")


async def _output(client: Client, job_id: str) -> str:
    view = await client.get(job_id)
    return view.attempts[-1].output_tail


def _spec(data: dict) -> WorkflowSpec:
    return msgspec.convert(data, WorkflowSpec)


def sh(script: str, *args: str) -> dict:
    return {"kind": "process", "argv": ["sh", "-c", script, *args]}


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_shipped_example_runs_with_the_cli(wf_cluster, nats_server, example):
    done = jobmesh_cli(["workflow", "run", str(EXAMPLES / example), "--json"], nats_server.url, timeout=180)
    assert done.returncode == 0, done.stderr + done.stdout
    status = json.loads(done.stdout)
    assert status["outcome"] == "succeeded"
    states = {s["name"]: s["state"] for s in status["steps"]}
    assert all(state in ("succeeded", "skipped") for state in states.values()), states


async def test_a_diamond_runs_d_after_b_and_c_and_d_sees_both_results(client):
    spec = read_workflow_file(EXAMPLES / "diamond.yaml")
    run = (await client.run_workflow(spec)).run
    status = await _ended(client, run.run_id)
    assert status.outcome == "succeeded"
    attempts = {name: (await client.get(job_id)).attempts[-1] for name, job_id in run.jobs.items()}
    assert attempts["d"].started_at >= max(attempts["b"].finished_at, attempts["c"].finished_at)
    assert min(attempts["b"].started_at, attempts["c"].started_at) >= attempts["a"].finished_at
    assert "left=60 right=60 total=120" in await _output(client, run.jobs["d"])


async def test_fan_out_and_fan_in_get_every_result_in_item_order(client):
    spec = read_workflow_file(EXAMPLES / "fan-out.yaml")
    run = (await client.run_workflow(spec, input={"shards": 12})).run
    status = await _ended(client, run.run_id)
    assert status.outcome == "succeeded"
    square = status.step("square")
    assert square.items is not None and square.items.succeeded == 12
    collected = json.loads((await client.get(run.jobs["collect"])).attempts[-1].result)
    assert collected == [{"shard": i, "square": i * i} for i in range(12)]


async def test_a_failure_skips_what_needs_it_runs_its_on_failure_step_and_retry_resumes(
    make_cluster, nats_server, work_dir, shared_dir
):
    # Jobs at the process level see the file the test makes: the failing step succeeds
    # once it exists.
    # The module's own node runs this module's other jobs; these go to this one (its label).
    env = {
        **E2E_NODE_ENV,
        **FAST,
        "JOBMESH_NODE_ID": "node-proc",
        "JOBMESH_NODE_ISOLATION": "process",
        "JOBMESH_NODE_LABELS": "sees=host",
    }
    await make_cluster(env={**env, "JOBMESH_WORK_DIR": str(work_dir)}, name="wfretry")
    client = await Client.connect(nats_server.url)
    try:
        await _fail_then_retry(client, shared_dir / "fixed")
    finally:
        await client.close()


async def _fail_then_retry(client: Client, flag: Path) -> None:
    on_host = {"constraints": {"labels": {"sees": "host"}}}
    spec = _spec(
        {
            "name": "flaky",
            "steps": {
                "extract": {"runtime": sh('echo "{\\"n\\": 3}" > "$JOBMESH_RESULT_PATH"'), **on_host},
                "load": {
                    "needs": ["extract"],
                    "runtime": sh(f'test -e {flag} || exit 4; echo "loaded $0"', "${steps.extract.result.n}"),
                    **on_host,
                },
                "report": {"needs": ["load"], "runtime": sh("echo report"), **on_host},
                "alert": {"needs": ["load"], "when": "failed", "runtime": sh("echo alerting"), **on_host},
            },
        }
    )
    run = (await client.run_workflow(spec)).run
    status = await _ended(client, run.run_id)
    assert status.outcome == "failed"
    states = {s.name: s.state for s in status.steps}
    assert states == {"extract": "succeeded", "load": "failed", "report": "skipped", "alert": "succeeded"}
    assert "alerting" in await _output(client, run.jobs["alert"])
    extract_job = run.jobs["extract"]

    flag.write_text("")
    retried = await client.retry_workflow(run.run_id)
    # What did not succeed runs again; what succeeded (extract, and the alert that ran) is kept.
    assert sorted(retried.steps) == ["load", "report"]
    assert retried.run.jobs["extract"] == extract_job and retried.run.jobs["alert"] == run.jobs["alert"]
    status = await _ended(client, run.run_id)
    assert status.outcome == "succeeded", [(s.name, s.state, s.reason) for s in status.steps]
    states = {s.name: s.state for s in status.steps}
    assert states == {"extract": "succeeded", "load": "succeeded", "report": "succeeded", "alert": "succeeded"}
    assert "loaded 3" in await _output(client, retried.run.jobs["load"])
    started = [j for j in await client.workflow_jobs(run.run_id) if j.step == "extract"]
    assert len(started) == 1


async def test_cancelling_during_a_fan_out_leaves_nothing_running_or_reserved(client):
    spec = _spec(
        {
            "name": "slow-fan",
            "steps": {
                "list": {"runtime": sh('echo "{\\"items\\": [1,2,3,4,5,6,7,8,9,10]}" > "$JOBMESH_RESULT_PATH"')},
                "work": {
                    "needs": ["list"],
                    "map": {"over": "${steps.list.result.items}", "concurrency": 3},
                    "runtime": sh("sleep 60"),
                },
                "after": {"needs": ["work"], "runtime": sh("echo never")},
            },
        }
    )
    run = (await client.run_workflow(spec)).run

    async def three_running():
        status = await client.workflow_status(run.run_id)
        items = status.step("work").items
        return items is not None and items.running == 3

    await eventually(three_running, timeout=60, what="three items to run")
    await client.cancel_workflow(run.run_id, reason="test")
    status = await _ended(client, run.run_id, timeout=60)
    assert status.outcome == "cancelled"
    jobs = await client.workflow_jobs(run.run_id)
    assert all(j.final for j in jobs), [(j.step, j.index, j.state) for j in jobs]
    items = [j for j in jobs if j.step == "work" and j.index >= 0]
    assert len(items) == 10 and all(j.state == "cancelled" for j in items)
    assert status.step("after").state in ("skipped", "cancelled")

    async def released():
        return all(v.reservations == 0 for v in (await client.nodes()).nodes)

    await eventually(released, timeout=30, what="every reservation to be released")


async def test_killing_the_trigger_and_the_scheduler_mid_run_still_runs_each_step_once(
    make_cluster, nats_server, database_url
):
    cluster = await make_cluster(env={**E2E_NODE_ENV, **FAST, "JOBMESH_NODE_ID": "node-kill"}, name="wfkill")
    spec = _spec(
        {
            "name": "survivor",
            "steps": {
                "list": {"runtime": sh('echo "{\\"items\\": [0,1,2,3,4,5,6,7,8,9,10,11]}" > "$JOBMESH_RESULT_PATH"')},
                "work": {
                    "needs": ["list"],
                    "map": {"over": "${steps.list.result.items}", "concurrency": 2},
                    "runtime": sh('sleep 0.3; echo "{\\"i\\": $0}" > "$JOBMESH_RESULT_PATH"', "${item}"),
                },
                "sum": {"needs": ["work"], "runtime": sh('echo "$0"', "${steps.work.result}")},
            },
        }
    )
    client = await Client.connect(nats_server.url)
    conn = await asyncpg.connect(database_url)
    try:
        run = (await client.run_workflow(spec)).run

        async def some_items_done():
            items = (await client.workflow_status(run.run_id)).step("work").items
            return items is not None and 2 <= items.succeeded < 12

        await eventually(some_items_done, timeout=60, what="the fan-out to be under way")
        for name in ("trigger", "scheduler"):
            cluster.kill(name)  # SIGKILL: no drain
        for name in ("trigger", "scheduler"):
            cluster.start_service(name, tag="-restarted")
        await cluster.wait_healthy(("trigger", "scheduler"))
        status = await _ended(client, run.run_id, timeout=120)
        assert status.outcome == "succeeded", [(s.name, s.state, s.reason) for s in status.steps]
        assert json.loads((await _output(client, run.jobs["sum"])).strip()) == [{"i": i} for i in range(12)]
        # Each step and item started exactly once.
        jobs = await client.workflow_jobs(run.run_id)
        ran = [j.job_id for j in jobs if j.index >= 0 or j.step in ("list", "sum")]
        assert len(ran) == 14
        starts = await conn.fetch(
            "SELECT job_id, count(*) AS n FROM tracker.events WHERE kind = 'started' AND job_id = ANY($1) GROUP BY job_id",
            ran,
        )
        assert sorted(r["n"] for r in starts) == [1] * 14
        cluster.check_alive()
    finally:
        await conn.close()
        await client.close()


async def test_steps_in_queues_of_other_partitions_wait_and_read_across_them(client):
    # etl and q1 hash to different scheduler partitions (of the default 4).
    spec = _spec(
        {
            "name": "across",
            "steps": {
                "list": {"queue": "etl", "runtime": sh('echo "{\\"items\\": [5, 6, 7]}" > "$JOBMESH_RESULT_PATH"')},
                "double": {
                    "queue": "q1",
                    "needs": ["list"],
                    "map": {"over": "${steps.list.result.items}"},
                    "runtime": sh('echo "$(($0 * 2))" > "$JOBMESH_RESULT_PATH"', "${item}"),
                },
                "sum": {"queue": "etl", "needs": ["double"], "runtime": sh('echo "$0"', "${steps.double.result}")},
            },
        }
    )
    run = (await client.run_workflow(spec)).run
    status = await _ended(client, run.run_id)
    assert status.outcome == "succeeded", [(s.name, s.state, s.reason) for s in status.steps]
    assert json.loads(await _output(client, run.jobs["sum"])) == [10, 12, 14]


async def test_a_run_is_one_trace_from_its_request_down_to_every_items_events(client, nats_server):
    spec = _spec(
        {
            "name": "traced",
            "steps": {
                "list": {"runtime": sh('echo "{\\"items\\": [1, 2]}" > "$JOBMESH_RESULT_PATH"')},
                "each": {"needs": ["list"], "map": {"over": "${steps.list.result.items}"}, "runtime": {"kind": "noop"}},
                "end": {"needs": ["each"], "runtime": {"kind": "noop"}},
            },
        }
    )
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    nc = await nats.connect(nats_server.url)
    try:
        reply = await nc.request(
            subjects.API_WORKFLOWS_RUN,
            encode(WorkflowRunRequest(spec=spec)),
            timeout=10,
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
        run = msgspec.json.decode(reply.data, type=WorkflowRunReply).run
        status = await _ended(client, run.run_id)
        assert status.outcome == "succeeded"
        jobs = {j.job_id for j in await client.workflow_jobs(run.run_id)}
        assert len(jobs) == 5  # three steps and two items
        js = nc.jetstream()
        info = await js.stream_info(subjects.STREAM_JOBS)
        found: dict[str, set[str]] = {}
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(subjects.STREAM_JOBS, seq)
            body = msgspec.json.decode(msg.data)
            if body.get("job_id") in jobs and body.get("type") in ("job.submitted", "job.started", "job.succeeded"):
                found.setdefault(body["job_id"], set()).add(trace_id_of(msg.headers))
        assert set(found) == jobs
        assert {t for ts in found.values() for t in ts} == {trace_id}, found
    finally:
        await nc.close()
