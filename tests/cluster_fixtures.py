"""A module-scoped cluster of the five services as separate processes."""

from __future__ import annotations

import os
import subprocess
import sys

import msgspec
import nats
import pytest

from jobmesh.contract import subjects
from jobmesh.dev.cluster import LocalCluster
from jobmesh.contract.messages.v1 import DeadLetter

NODE_ID = "node-e2e"


@pytest.fixture(scope="module")
async def cluster(nats_server, database_url, work_dir):
    """The five services, each its own process, on the module's NATS and database."""
    c = LocalCluster(
        nats_server.url,
        database_url,
        work_dir,
        env={"JOBMESH_NODE_ID": NODE_ID, "JOBMESH_NODE_CPU_MILLI": "8000", "JOBMESH_NODE_MEMORY_MB": "8192"},
    )
    c.start()
    try:
        await c.wait_healthy(timeout=60)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
async def nc(nats_server):
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


def jobmesh_cli(args: list[str], nats_url: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the real ``jobmesh`` command in a subprocess."""
    env = dict(os.environ, JOBMESH_NATS_URL=nats_url)
    return subprocess.run(
        [sys.executable, "-c", "from jobmesh.client.cli import main; main()", *args],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


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
