"""An executor at the edge, behind a NATS leaf node: it pulls its work and reports through
a link it opens itself, and an attempt outlives a short loss of that link.

The hub is a nats-server with JetStream (domain ``hub``) that accepts leaf nodes; four
services run on it. The edge is a second nats-server with no JetStream of its own that
dials the hub as a leaf node (``edge_server``); the executor connects only to it. Nothing
connects to the edge from outside: its only listening port is for local clients.

Authentication is on at both ends (``AuthNats(leafnodes=True)``): the hub's leaf node port
takes only the link's key, and the edge lets in only jobmesh's identities, the executor
with its own key and its grants in the hub domain's form (``permissions.in_domain``). The
services on the hub connect as themselves; the test's own connections use the test
administrator's password.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.contract.ids import job_id_for
from jobmesh.contract.messages.v1 import JobSpec, ProcessRuntime, Resources, Submission
from jobmesh.dev.cluster import LocalCluster
from jobmesh.dev.servers import NatsServer, edge_server
from jobmesh.runtime.commands import LINK_SEED
from tests.cluster_fixtures import ClusterFactory, Service
from tests.helpers import eventually
from tests.natsauth_fixtures import AuthNats

pytestmark = pytest.mark.integration

EDGE_NODE = "edge-node"


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Iterator[AuthNats]:
    # The shipped fsync setting: this module kills a nats-server (tests/conftest.py).
    server = AuthNats(tmp_path_factory.mktemp("hub"), sync_always=True, leafnodes=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def edge(hub, tmp_path_factory) -> Iterator[NatsServer]:
    server = hub.edge(tmp_path_factory.mktemp("edge")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def services(hub, edge, database_url, tmp_path_factory, work_dir) -> LocalCluster:
    edge_env = {
        "JOBMESH_NATS_URL": edge.url,  # the executor knows the edge server only
        "JOBMESH_NODE_ID": EDGE_NODE,
        "JOBMESH_NODE_CPU_MILLI": "4000",
        "JOBMESH_NODE_MEMORY_MB": "4096",
        # Jobs see the real /tmp, where the test's marker is (a sandbox has its own).
        "JOBMESH_NODE_ISOLATION": "process",
        "JOBMESH_WORK_DIR": str(work_dir / "nodes"),  # which that uid can reach
    }
    # Every process connects with its own key; the executor's is issued, and the hub and the
    # edge reloaded, before it starts (AuthNats.prepare).
    with ClusterFactory(hub.plain_url, database_url, tmp_path_factory, auth=hub) as factory:
        yield await factory(
            ["trigger", "scheduler", "binder", "tracker", Service("executor", edge_env)],
            env={"JOBMESH_LOG_LEVEL": "WARNING"},
            name="leaf",
        )


@pytest.fixture
async def db(database_url):
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def _attempts(conn, job_id: str) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT attempt, state, node_id FROM tracker.attempts WHERE job_id = $1", job_id)


async def _job_state(conn, job_id: str) -> str | None:
    return await conn.fetchval("SELECT state FROM tracker.jobs WHERE job_id = $1", job_id)


async def _submit(hub_url: str, argv: list[str]) -> str:
    key = uuid.uuid4().hex
    client = await Client.connect(hub_url)
    try:
        spec = JobSpec(runtime=ProcessRuntime(argv=argv), resources=Resources(cpu_milli=100, memory_mb=16))
        (job_id,) = (await client.submit([Submission(spec=spec, idempotency_key=key)])).job_ids
    finally:
        await client.close()
    assert job_id == job_id_for(key)
    return job_id


async def test_the_edge_server_has_no_jetstream_and_only_dials_out(hub, edge):
    assert "jetstream" not in edge.config_text() and "listen" not in edge.config_text()
    # It signs the link with a seed it includes from a file of the owner's only, not in its text.
    assert (hub.credentials / LINK_SEED).read_text().strip() not in edge.config_text()
    varz = edge.monitor("/varz")
    assert not varz.get("leafnode", {}).get("port")  # the edge accepts no leaf nodes
    assert not varz.get("jetstream", {}).get("config")  # and stores nothing

    async def linked():
        return hub.server.monitor("/leafz")["leafs"]  # the hub sees the edge's connection come in

    (link,) = await eventually(linked, timeout=10, what="the edge to connect to the hub")
    assert link["account"] == "$G"


async def test_the_edge_lets_in_keys_only_and_the_hub_links_only_the_link_key(hub, edge, tmp_path):
    with pytest.raises(nats.errors.Error):
        await nats.connect(edge.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    # An edge server without the link's key dials the hub and is turned away.
    store = tmp_path / "rogue"
    rogue = edge_server(store, [hub.server.leafnode_url], log_file=store / "nats.log").start()
    try:

        async def refused():
            log = rogue.log_file.read_text(errors="replace") if rogue.log_file and rogue.log_file.exists() else ""
            return "Authorization Violation" in log

        await eventually(refused, timeout=15, what="the hub to refuse a link without the key")
        assert len(hub.server.monitor("/leafz")["leafs"]) == 1  # the edge's link only
    finally:
        rogue.stop()


async def test_an_edge_executor_pulls_a_job_bound_to_it_and_reports_it(hub, services, db):
    job_id = await _submit(hub.url, ["sh", "-c", "echo from the edge"])

    async def finished():
        return await _job_state(db, job_id) in ("succeeded", "failed")

    await eventually(finished, timeout=60, what="the edge job to finish")
    assert await _job_state(db, job_id) == "succeeded"
    assert [(r["attempt"], r["node_id"]) for r in await _attempts(db, job_id)] == [(1, EDGE_NODE)]
    services.check_alive()


async def test_an_attempt_finishes_while_the_leaf_link_is_down_and_reaches_the_hub(
    hub, edge, services, db, shared_dir: Path
):
    marker = shared_dir / "done"
    job_id = await _submit(hub.url, ["sh", "-c", f"sleep 3; echo done > {marker}"])

    async def started():
        return await db.fetchval("SELECT count(*) FROM tracker.events WHERE job_id = $1 AND kind = 'started'", job_id)

    await eventually(started, timeout=60, what="the edge job to start")
    edge.stop(kill=True)  # the link to the hub is gone: SIGKILL the edge's nats-server
    try:

        async def ran_locally():
            return marker.exists()

        # The job ends on the edge while nothing there can reach the hub.
        await eventually(ran_locally, timeout=30, what="the job to finish on the edge")
        assert await _job_state(db, job_id) == "running"  # the hub has not heard of it yet
    finally:
        edge.start()  # back on the same port, well within the node's heartbeat timeout (10 s)

    async def reached_the_hub():
        return await _job_state(db, job_id) == "succeeded"

    await eventually(reached_the_hub, timeout=60, what="the edge's result to reach the hub")
    assert [(r["attempt"], r["state"], r["node_id"]) for r in await _attempts(db, job_id)] == [
        (1, "succeeded", EDGE_NODE)
    ]
    started_events = await started()
    assert started_events == 1
    services.check_alive()
