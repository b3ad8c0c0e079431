"""Fixtures and helpers for tests that run the five services as separate processes.

Registered once for every test module by ``pytest_plugins`` in ``tests/conftest.py``; test
modules name the fixtures as arguments and import only the helper functions.

``make_cluster`` (one test) and ``make_module_cluster`` (one module) hand out a factory that
starts a ``LocalCluster``, waits until it is healthy and stops every cluster it made at
teardown, whether the test passed or not.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
import pytest

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import DeadLetter, JobSubmitted, NodeInfo
from jobmesh.contract.subjects import SERVICES
from jobmesh.dev.cluster import LocalCluster
from tests.natsauth_fixtures import AuthBase

NODE_ID = "node-e2e"
E2E_NODE_ENV = {"JOBMESH_NODE_ID": NODE_ID, "JOBMESH_NODE_CPU_MILLI": "8000", "JOBMESH_NODE_MEMORY_MB": "8192"}


@dataclass(frozen=True)
class Service:
    """One service process to start: its name, environment of its own and log-name tag.

    Attributes:
        name: the service (``scheduler``, ``binder``, ...).
        env: settings for this process only, over the cluster's.
        tag: appended to the log file's name, so two processes of a service log apart.
    """

    name: str
    env: Mapping[str, str] = field(default_factory=dict)
    tag: str = ""


class ClusterFactory:
    """Starts clusters on one NATS server and database, and stops them all on ``close``.

    Args:
        nats_url: the default NATS server of every cluster.
        database_url: the default database of every cluster.
        tmp_path_factory: gives each cluster a fresh work directory.
    """

    def __init__(
        self,
        nats_url: str,
        database_url: str,
        tmp_path_factory: pytest.TempPathFactory,
        auth: AuthBase | None = None,
    ) -> None:
        self.nats_url = nats_url
        self.database_url = database_url
        self.tmp_path_factory = tmp_path_factory
        self.auth = auth  # the module server's credentials (clusters on it use them)
        self.clusters: list[LocalCluster] = []

    async def __call__(
        self,
        services: Iterable[str | Service] = SERVICES,
        *,
        env: Mapping[str, str] | None = None,
        nats_url: str | None = None,
        database_url: str | None = None,
        name: str = "cluster",
        timeout: float = 60.0,
        credentials: Path | None = None,
        server: AuthBase | None = None,
    ) -> LocalCluster:
        """Start ``services`` and wait until each answers its health check.

        Args:
            services: names, or ``Service`` for a process with its own settings or tag.
            env: settings for every process of this cluster.
            nats_url: another NATS server than the factory's.
            database_url: another database than the factory's (a proxy, say).
            name: the prefix of the cluster's work directory.
            timeout: how long the services have to become healthy.
            credentials: the directory of ``jobmesh auth issue``: each process connects
                with its own identity (see ``LocalCluster.credentials``).
            server: another authenticated server than the factory's (one a test kills and
                restarts): its processes connect with their own identities on it.

        Returns:
            The started cluster; the factory stops it at teardown.
        """
        shared = server if server is not None else self.auth if nats_url is None and credentials is None else None
        if server is not None:
            nats_url = server.plain_url
        cluster = LocalCluster(
            nats_url or self.nats_url,
            database_url or self.database_url,
            self.tmp_path_factory.mktemp(name),
            env=dict(env or {}),
            credentials=credentials if shared is None else shared.credentials,
            prepare=None if shared is None else shared.preparer(self.database_url),
        )
        self.clusters.append(cluster)  # before starting: a failed start is stopped too
        started: list[str] = []
        for service in services:
            one = service if isinstance(service, Service) else Service(service)
            cluster.start_service(one.name, dict(one.env), tag=one.tag)
            if one.name not in started:
                started.append(one.name)
        await cluster.wait_healthy(tuple(started), timeout=timeout)
        return cluster

    def close(self) -> None:
        """Stop every cluster this factory started, the last first."""
        while self.clusters:
            self.clusters.pop().stop()

    def __enter__(self) -> ClusterFactory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def make_cluster(nats_server, database_url, tmp_path_factory) -> Iterator[ClusterFactory]:
    """A cluster factory whose clusters are stopped when the test ends."""
    with ClusterFactory(nats_server.plain_url, database_url, tmp_path_factory, auth=nats_server) as factory:
        yield factory


@pytest.fixture(scope="module")
def make_module_cluster(nats_server, database_url, tmp_path_factory) -> Iterator[ClusterFactory]:
    """A cluster factory whose clusters are stopped when the module's tests are done."""
    with ClusterFactory(nats_server.plain_url, database_url, tmp_path_factory, auth=nats_server) as factory:
        yield factory


@pytest.fixture(scope="module")
async def cluster(make_module_cluster) -> LocalCluster:
    """The five services, each its own process, on the module's NATS and database."""
    return await make_module_cluster(env=E2E_NODE_ENV, name="e2e")


@pytest.fixture(scope="module")
async def nc(nats_server):
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


def jobmesh_cli(
    args: list[str],
    nats_url: str,
    timeout: float = 60,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run the real ``jobmesh`` command in a subprocess.

    Args:
        args: the command line after ``jobmesh``.
        nats_url: ``JOBMESH_NATS_URL`` of the command.
        timeout: seconds before the command is killed and the test fails.
        cwd: the working directory; this process's when omitted.
        env: the environment to start from; this process's when omitted.

    Returns:
        The finished process, with its stdout and stderr as text.
    """
    full_env = dict(os.environ if env is None else env, JOBMESH_NATS_URL=nats_url)
    return subprocess.run(
        [sys.executable, "-c", "from jobmesh.client.cli import main; main()", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def submitted_job_id(stderr: str) -> str:
    """The job id in the ``job <id> submitted`` line that ``jobmesh run`` prints."""
    match = re.search(r"job ([0-9a-f]{32}) submitted", stderr)
    assert match, stderr
    return match.group(1)


def job_status(job_id: str, nats_url: str) -> dict:
    """What the tracker recorded for ``job_id``, from ``jobmesh status ID --json``."""
    result = jobmesh_cli(["status", job_id, "--json"], nats_url)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def dead_letters(js) -> list[DeadLetter]:
    """Every dead letter recorded so far."""
    try:
        info = await js.stream_info(subjects.STREAM_DEADLETTER)
    except Exception:  # noqa: BLE001 - stream not there yet means none
        return []
    letters = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg(subjects.STREAM_DEADLETTER, seq)
        letters.append(msgspec.json.decode(msg.data, type=DeadLetter))
    return letters


async def submitted_where(js, keep: Callable[[JobSubmitted], bool]) -> list[tuple[JobSubmitted, dict]]:
    """Every JobSubmitted in JM_JOBS that ``keep`` accepts, with its headers, read to the
    stream's last message with a fresh ordered consumer."""
    found = []
    sub = await js.subscribe(subjects.job_event("*", subjects.SUBMITTED), ordered_consumer=True)
    try:
        last = (await js.stream_info(subjects.STREAM_JOBS)).state.last_seq
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except nats.errors.TimeoutError:
                break
            event = msgspec.json.decode(msg.data, type=JobSubmitted)
            if keep(event):
                found.append((event, dict(msg.headers or {})))
            if msg.metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()
    return found


async def fired_by(js, rule: str) -> list[JobSubmitted]:
    """Every JobSubmitted in JM_JOBS that trigger rule ``rule`` fired."""
    fired = await submitted_where(js, lambda event: event.origin is not None and event.origin.rule == rule)
    return [event for event, _headers in fired]


async def node_record(nats_url: str, node_id: str) -> NodeInfo | None:
    """The node's record (its attempts' leases) as it is in jm_nodes now."""
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(subjects.KV_NODES)
        try:
            entry = await kv.get(node_id)
        except Exception:  # noqa: BLE001 - nats-py raises KeyNotFoundError for a missing key
            return None
        return msgspec.json.decode(entry.value, type=NodeInfo) if entry.value else None
    finally:
        await nc.close()


async def stand_in_heartbeats(kv, nodes: Iterable[NodeInfo], period: float = 1.0) -> None:
    """Keep stand-in nodes' records alive in jm_nodes (``kv``), as their executors would:
    run it as a task and cancel it at the end."""
    nodes = list(nodes)
    while True:
        for node in nodes:
            await kv.put(node.node_id, encode(msgspec.structs.replace(node, heartbeat_at=time.time())))
        await asyncio.sleep(period)  # the stand-in nodes' heartbeat period (a deliberate sleep: noqa)


async def tracker_settled(nats_url: str, timeout: float = 60.0) -> None:
    """Wait until the tracker has recorded everything its streams hold: both its consumers
    have nothing pending and nothing delivered unacked.

    A tracker killed mid-batch leaves its in-hand events unacked; JetStream hands them out
    again only after the consumer's ack wait, behind newer events. So a job can already show
    ``succeeded`` while its ``started`` is still on its way back: count events after this.
    """
    from tests.helpers import eventually

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()

        async def settled() -> bool:
            for stream, durable in (
                (subjects.STREAM_JOBS, subjects.durable("tracker", "jobs")),
                (subjects.STREAM_DISPATCH, subjects.durable("tracker", "dispatch")),
            ):
                info = await js.consumer_info(stream, durable)
                if info.num_pending or info.num_ack_pending:
                    return False
            return True

        await eventually(settled, timeout=timeout, what="the tracker to record everything its streams hold")
    finally:
        await nc.close()
