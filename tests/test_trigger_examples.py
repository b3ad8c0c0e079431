"""The rule files of examples/triggers/, each added to a live cluster with `jobmesh trigger add`
and fired the way its users would: an event published with plain nats-py, a signed webhook
POST, a cron tick, the completion chain that follows the reindex, and the workflow a dataset's
arrival starts."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
from pathlib import Path

import aiohttp
import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.contract.ids import job_id_for, trigger_key, workflow_run_id
from jobmesh.contract.messages.v1 import JobView
from jobmesh.errors import NotFound
from tests.cluster_fixtures import E2E_NODE_ENV, fired_by, jobmesh_cli
from tests.helpers import eventually

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "triggers"
HOOK_SECRET = "it-is-a-secret"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
async def examples_cluster(make_module_cluster, tmp_path_factory):
    secrets = tmp_path_factory.mktemp("secrets")
    (secrets / "github-webhook").write_text(HOOK_SECRET)
    port = _free_port()
    env = {
        **E2E_NODE_ENV,
        "JOBMESH_HANDLER_MODULES": str(EXAMPLES / "reindex.py"),
        "JOBMESH_SECRETS_DIR": str(secrets),
        "JOBMESH_HTTP_LISTEN": f"127.0.0.1:{port}",
    }
    cluster = await make_module_cluster(env=env, name="examples")
    return cluster, f"http://127.0.0.1:{port}"


def add(name: str, nats_url: str) -> None:
    result = jobmesh_cli(["trigger", "add", str(EXAMPLES / name)], nats_url)
    assert result.returncode == 0, result.stderr
    assert "added" in result.stdout + result.stderr


async def final(client: Client, job_id: str, timeout: float = 60) -> JobView:
    view = await client.wait(job_id, timeout=timeout)
    assert view.state == "succeeded", (view.state, view.reason, view.attempts)
    return view


async def test_dataset_reindex_and_its_completion_chain(examples_cluster, nats_server):
    for name in ("dataset-reindex.yaml", "publish-index.yaml", "notify-index.yaml"):
        add(name, nats_server.url)
    nc = await nats.connect(nats_server.url)
    client = await Client.connect(nats_server.url)
    try:
        js = nc.jetstream()
        ack = await js.publish("jobmesh.v1.events.dataset.updated.books", json.dumps({"rows": 1200}).encode())
        reindex = await final(client, job_id_for(f"trigger:dataset-reindex:1:{ack.stream}:{ack.seq}"))
        assert reindex.name == "reindex books"
        result = json.loads((await client.result(reindex.job_id)).data)
        assert result["dataset"] == "books" and result["rows"] == 1200 and result["terms"] > 0
        publish = await final(client, job_id_for(f"trigger:publish-index:1:end:{reindex.job_id}"))
        assert f"publishing the index of books built by job {reindex.job_id}" in publish.attempts[-1].output_tail
        notify = await final(client, job_id_for(f"trigger:notify-index:1:end:{publish.job_id}"))
        assert "index of books: publishing succeeded" in notify.attempts[-1].output_tail
        assert notify.origin is not None and notify.origin.depth == 2
    finally:
        await client.close()
        await nc.close()


async def test_github_push_webhook(examples_cluster, nats_server):
    _, http = examples_cluster
    add("github-push.yaml", nats_server.url)
    push = {"ref": "refs/heads/main", "after": "0a1b2c3", "repository": {"full_name": "example/app"}}
    body = json.dumps(push).encode()
    signature = "sha256=" + hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    client = await Client.connect(nats_server.url)
    try:
        async with aiohttp.ClientSession() as session:
            headers = {"X-Hub-Signature-256": signature, "X-GitHub-Delivery": "delivery-1"}
            async with session.post(f"{http}/v1/hooks/github-push", data=body, headers=headers) as resp:
                assert resp.status == 202, await resp.text()
                [job_id] = (await resp.json())["job_ids"]
            view = await final(client, job_id)
            assert view.name == "build example/app@0a1b2c3"
            assert "building example/app at 0a1b2c3" in view.attempts[-1].output_tail
            wrong = {"X-Hub-Signature-256": "sha256=" + "0" * 64}
            async with session.post(f"{http}/v1/hooks/github-push", data=body, headers=wrong) as resp:
                assert resp.status == 401
            other = json.dumps({**push, "ref": "refs/heads/feature"}).encode()
            signed = {
                "X-Hub-Signature-256": "sha256=" + hmac.new(HOOK_SECRET.encode(), other, hashlib.sha256).hexdigest()
            }
            async with session.post(f"{http}/v1/hooks/github-push", data=other, headers=signed) as resp:
                assert resp.status == 200 and (await resp.json())["filtered"] is True
    finally:
        await client.close()


async def test_dataset_probe_cron_fires(examples_cluster, nats_server):
    add("dataset-probe.yaml", nats_server.url)
    nc = await nats.connect(nats_server.url)
    client = await Client.connect(nats_server.url)
    try:
        js = nc.jetstream()
        # Every 15 seconds: the first tick comes within 15 s of the add.
        [first, *_] = await eventually(lambda: fired_by(js, "dataset-probe"), timeout=40, interval=0.5, what="a tick")
        assert first.origin.event.startswith("tick:") and int(first.origin.event[5:]) % 15 == 0
        view = await final(client, first.job_id)
        assert "probing the dataset store at" in view.attempts[-1].output_tail
        listed = json.loads(jobmesh_cli(["trigger", "list", "--json"], nats_server.url).stdout)
        [row] = [r for r in listed["triggers"] if r["name"] == "dataset-probe"]
        assert row["next_tick"] > first.origin.at
    finally:
        jobmesh_cli(["trigger", "rm", "dataset-probe"], nats_server.url)
        await client.close()
        await nc.close()


async def test_dataset_pipeline_starts_a_workflow_per_dataset(examples_cluster, nats_server):
    add("dataset-pipeline.yaml", nats_server.url)
    nc = await nats.connect(nats_server.url)
    client = await Client.connect(nats_server.url)
    try:
        js = nc.jetstream()
        body = {"dataset": "books", "shards": 20}
        ack = await js.publish("jobmesh.v1.events.datasets.arrived", json.dumps(body).encode())
        run_id = workflow_run_id(trigger_key("dataset-pipeline", 1, f"{ack.stream}:{ack.seq}"))

        async def ended():
            try:
                status = await client.workflow_status(run_id)
            except NotFound:
                return None
            return status if status.outcome != "running" else None

        status = await eventually(ended, timeout=120, what="the dataset's run to end")
        assert status.outcome == "succeeded"
        run = await client.get_workflow(run_id)
        assert run.input == body and run.concurrency_key == "dataset-books"
        collect = await final(client, run.jobs["collect"])
        assert json.loads(collect.attempts[-1].result) == [{"dataset": "books", "shard": i} for i in range(20)]
    finally:
        jobmesh_cli(["trigger", "rm", "dataset-pipeline"], nats_server.url)
        await client.close()
        await nc.close()


def test_every_example_rule_is_tested_here():
    source = Path(__file__).read_text()
    for path in EXAMPLES.glob("*.yaml"):
        assert f'"{path.name}"' in source, f"{path.name} is not added and fired by this test"
