"""The five services, each with its own NATS identity, on a server that knows no other.

Credentials come from ``jobmesh auth issue``; the streams, buckets and durables from
``jobmesh provision --services`` run as the provisioner. Then jobs of several kinds run end
to end, and no process of the cluster was refused anything: every permission violation a
service hits is in its log, and there is none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobSpec, NoopRuntime, ProcessRuntime, Resources, Submission
from jobmesh.dev.servers import NatsServer
from tests.cluster_fixtures import Service
from tests.helpers import eventually

pytestmark = pytest.mark.integration

NODE = "auth-node"
NODE_ENV = {"JOBMESH_NODE_ID": NODE, "JOBMESH_NODE_CPU_MILLI": "8000", "JOBMESH_NODE_MEMORY_MB": "8192"}


def _jobmesh(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from jobmesh.client.cli import main; main()", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("credentials") / "nats"
    issued = _jobmesh(["auth", "issue", "--dir", str(directory), "--node", NODE, "--json"], {})
    assert issued.returncode == 0, issued.stderr
    names = {row["identity"] for row in json.loads(issued.stdout)["identities"]}
    assert {"provisioner", "client", f"executor-{NODE}"} <= names
    return directory


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, credentials: Path):
    store = tmp_path_factory.mktemp("nats-auth")
    server = NatsServer(store, log_file=store / "nats.log", auth_file=credentials / "auth.conf").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def provisioned(auth_server: NatsServer, credentials: Path, database_url: str) -> NatsServer:
    env = {
        "JOBMESH_NATS_URL": auth_server.url,
        "JOBMESH_DATABASE_URL": database_url,
        "JOBMESH_NATS_NKEY_FILE": str(credentials / "provisioner.nk"),
    }
    done = _jobmesh(["provision", "--services", "--node", NODE], env)
    assert done.returncode == 0, done.stderr
    return auth_server


async def test_no_identity_no_connection(auth_server: NatsServer):
    with pytest.raises(Exception):  # noqa: B017 - nats-py raises its own error types for a refused CONNECT
        await nats.connect(auth_server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)


async def test_jobs_run_end_to_end_with_every_process_on_its_own_identity(
    provisioned: NatsServer, credentials: Path, database_url: str, make_cluster, monkeypatch, work_dir
):
    cluster = await make_cluster(
        [Service(name, NODE_ENV if name == "executor" else {}) for name in subjects.SERVICES],
        nats_url=provisioned.url,
        credentials=credentials,
        env={"JOBMESH_WORK_DIR": str(work_dir)},
        name="auth",
    )
    monkeypatch.setenv("JOBMESH_NATS_NKEY_FILE", str(credentials / "client.nk"))
    client = await Client.connect(provisioned.url)
    conn = await asyncpg.connect(database_url)
    try:
        small = Resources(cpu_milli=10, memory_mb=0)
        specs = [JobSpec(runtime=NoopRuntime(), resources=small) for _ in range(20)]
        specs.append(JobSpec(runtime=ProcessRuntime(argv=["sh", "-c", "echo hello"]), resources=small))
        ids = (await client.submit([Submission(spec=spec) for spec in specs])).job_ids

        async def all_succeeded() -> bool:
            count = await conn.fetchval(
                "SELECT count(*) FROM tracker.jobs WHERE job_id = ANY($1::text[]) AND state = 'succeeded'", ids
            )
            return count == len(ids)

        await eventually(all_succeeded, timeout=90, what="every job to succeed under authentication")
        view = await client.get(ids[-1])
        assert view.state == "succeeded"
        lines = (await client.logs(ids[-1])).lines
        assert [line.line for line in lines] == ["hello"]
        # A completion rule: the trigger may not make the completions durable itself, so
        # the provisioner made it, and the trigger consumes it from its start.
        await client.put_trigger(
            {
                "name": "after-x",
                "source": {"kind": "completion", "outcome": "succeeded", "name": "x"},
                "job": {"name": "after-x", "runtime": {"kind": "noop"}, "resources": {"cpu_milli": 10}},
            }
        )
        (first,) = (
            await client.submit([Submission(spec=JobSpec(name="x", runtime=NoopRuntime(), resources=small))])
        ).job_ids

        async def chained() -> bool:
            return bool(
                await conn.fetchval("SELECT count(*) FROM tracker.jobs WHERE name = 'after-x' AND state = 'succeeded'")
            )

        await eventually(chained, timeout=60, what=f"the completion rule to fire after job {first}")
        cluster.check_alive()
        refused = {
            sp.name: [line for line in sp.log_path.read_text().splitlines() if "permissions violation" in line.lower()]
            for sp in cluster.procs
        }
        assert refused == {sp.name: [] for sp in cluster.procs}
        # The server's own account of it: it logs every refusal, and a connection without a key.
        assert provisioned.log_file is not None
        server_log = provisioned.log_file.read_text()
        assert "Violation" not in server_log, [line for line in server_log.splitlines() if "Violation" in line][:5]
    finally:
        await conn.close()
        await client.close()


def test_issue_for_executors_behind_a_leaf_node(tmp_path):
    directory = tmp_path / "edge-keys"
    issued = _jobmesh(
        ["auth", "issue", "--dir", str(directory), "--node", "edge-1", "--edge-domain", "hub", "--json"], {}
    )
    assert issued.returncode == 0, issued.stderr
    rows = {row["identity"]: row for row in json.loads(issued.stdout)["identities"]}
    link = rows["leaf-link"]
    assert link["new"] == "yes" and link["public_key"].startswith("U")
    conf = directory / "leaf-link.conf"
    assert oct(conf.stat().st_mode & 0o777) == "0o600"
    assert conf.read_text().startswith('nkey: "SU')
    text = (directory / "auth.conf").read_text()
    # The edge checks grants after its mapping: the executor's calls in the domain's form.
    assert "$JS.hub.API.CONSUMER.MSG.NEXT.JM_DISPATCH.executor-edge-1" in text
    assert "$JS.hub.API.$KV.jm_nodes.edge-1" in text
    assert link["public_key"] not in text  # the link has no client grants
    # A later issue (a new node) keeps the domain and the link key.
    again = _jobmesh(["auth", "issue", "--dir", str(directory), "--node", "edge-2", "--json"], {})
    assert again.returncode == 0, again.stderr
    rows = {row["identity"]: row for row in json.loads(again.stdout)["identities"]}
    assert rows["leaf-link"] == {**link, "new": "no"}
    assert "$JS.hub.API.CONSUMER.MSG.NEXT.JM_DISPATCH.executor-edge-2" in (directory / "auth.conf").read_text()
    # Another domain for the same keys, or one that is not a subject token, is refused by name.
    other = _jobmesh(["auth", "issue", "--dir", str(directory), "--edge-domain", "elsewhere"], {})
    assert other.returncode != 0 and "--edge-domain" in other.stderr and "'hub'" in other.stderr
    bad = _jobmesh(["auth", "issue", "--dir", str(tmp_path / "bad"), "--edge-domain", "a.b"], {})
    assert bad.returncode != 0 and "--edge-domain" in bad.stderr
