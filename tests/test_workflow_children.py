"""Dynamic work: a workflow step's handler submits child jobs (``ctx.submit``), and the
steps that need that step wait for the children too, through the real services."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import msgspec
import pytest

from jobmesh.client.client import Client
from jobmesh.client.workflows import WorkflowStatus
from jobmesh.contract.messages.v1 import WorkflowSpec
from tests.cluster_fixtures import E2E_NODE_ENV
from tests.helpers import eventually

pytestmark = pytest.mark.integration

HANDLERS = '''
"""A step that finds more work as it goes: it submits one child job per part."""
import msgspec
from jobmesh.contract.messages.v1 import JobSpec, ProcessRuntime
from jobmesh.sdk import Context, handler


class Parts(msgspec.Struct):
    parts: int
    fail: int = -1  # the part whose job fails (-1: none)


class Children(msgspec.Struct):
    job_ids: list[str]


@handler("split")
def split(request: Parts, ctx: Context) -> Children:
    ids = []
    for part in range(request.parts):
        code = 1 if part == request.fail else 0
        script = f"sleep 0.4; echo part {part}; exit {code}"
        ids.append(ctx.submit(JobSpec(runtime=ProcessRuntime(argv=["sh", "-c", script]), name=f"part {part}")))
    return Children(job_ids=ids)
'''


@pytest.fixture(scope="module")
def handler_module():
    # The handler workers run as another uid in a sandbox: the module must be readable.
    root = Path(tempfile.mkdtemp(prefix="jobmesh-children-"))
    os.chmod(root, 0o755)
    path = root / "children_handlers.py"
    path.write_text(HANDLERS)
    path.chmod(0o644)
    yield path
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
async def children_cluster(make_module_cluster, handler_module):
    return await make_module_cluster(env={**E2E_NODE_ENV, "JOBMESH_HANDLER_MODULES": str(handler_module)}, name="kids")


@pytest.fixture
async def client(children_cluster, nats_server):
    cl = await Client.connect(nats_server.url)
    yield cl
    await cl.close()


def _workflow(fail: int = -1) -> WorkflowSpec:
    return msgspec.convert(
        {
            "name": "children",
            "steps": {
                "split": {"runtime": {"kind": "handler", "handler": "split", "input": {"parts": 3, "fail": fail}}},
                "merge": {"needs": ["split"], "runtime": {"kind": "process", "argv": ["echo", "merged"]}},
            },
        },
        WorkflowSpec,
    )


async def _ended(client: Client, run_id: str) -> WorkflowStatus:
    async def done():
        status = await client.workflow_status(run_id)
        return status if status.outcome != "running" else None

    return await eventually(done, timeout=90, what=f"run {run_id} to end")


async def test_a_step_that_needs_a_spawning_step_waits_for_its_children(client):
    run = (await client.run_workflow(_workflow())).run
    status = await _ended(client, run.run_id)
    assert status.outcome == "succeeded", [(s.name, s.state, s.reason) for s in status.steps]
    split = await client.get(run.jobs["split"])
    children = msgspec.json.decode(split.attempts[-1].result)["job_ids"]
    assert len(children) == 3
    ends = [(await client.wait(child, timeout=30)).attempts[-1] for child in children]
    assert all(a.state == "succeeded" for a in ends)
    merge = (await client.get(run.jobs["merge"])).attempts[-1]
    # The children sleep after the handler returned: merge started only once they ended.
    assert merge.started_at >= max(a.finished_at for a in ends)
    assert split.attempts[-1].finished_at < max(a.finished_at for a in ends)


async def test_a_failed_child_fails_its_step_for_the_steps_that_need_it(client):
    run = (await client.run_workflow(_workflow(fail=1))).run
    status = await _ended(client, run.run_id)
    merge = status.step("merge")
    assert merge.state == "skipped", (merge.state, merge.reason)
    assert "split" in merge.reason
    # The step's own job succeeded, but one of its children did not: the run failed.
    split = status.step("split")
    assert (split.state, split.reason) == ("failed", "1 of 3 child jobs did not succeed")
    assert status.outcome == "failed"
    jobs = await client.workflow_jobs(run.run_id)
    assert sum(1 for j in jobs if j.step.startswith("split.children.")) == 3


async def test_a_retry_runs_a_step_again_whose_child_failed(client):
    run = (await client.run_workflow(_workflow(fail=1))).run
    assert (await _ended(client, run.run_id)).outcome == "failed"
    retried = await client.retry_workflow(run.run_id)
    assert sorted(retried.steps) == ["merge", "split"]
