"""``jobmesh provision --services``: the one-shot provisioner a deployment runs before the
services start. Streams and buckets, every shared durable consumer and the scheduler's and
tracker's tables exist afterwards, a second run changes nothing, and a service that cannot
provision fails the whole run, naming itself."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncpg
import nats
import pytest

from jobmesh.contract import subjects

pytestmark = pytest.mark.integration

SHARED_DURABLES = {
    (subjects.STREAM_EVENTS, "trigger-events"),
    (subjects.STREAM_JOBS, "binder-ready"),
    (subjects.STREAM_JOBS, "binder-release"),
    (subjects.STREAM_JOBS, "binder-cancel"),
    (subjects.STREAM_JOBS, "tracker-jobs"),
    (subjects.STREAM_DISPATCH, "tracker-dispatch"),
    *((subjects.STREAM_JOBS, f"scheduler-p{n}") for n in range(4)),
}


def provision(nats_url: str, database_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "JOBMESH_NATS_URL": nats_url,
        "JOBMESH_DATABASE_URL": database_url,
        "JOBMESH_PARTITIONS": "4",
        "JOBMESH_LOG_FORMAT": "text",
    }
    command = [sys.executable, "-c", "from jobmesh.client.cli import main; main()", "provision", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


async def durables(nats_url: str) -> set[tuple[str, str]]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        found = set()
        for stream in (subjects.STREAM_EVENTS, subjects.STREAM_JOBS, subjects.STREAM_DISPATCH):
            for info in await js.consumers_info(stream):
                found.add((stream, info.name))
        return found
    finally:
        await nc.close()


async def tables(database_url: str) -> set[str]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT table_schema || '.' || table_name AS t FROM information_schema.tables"
            " WHERE table_schema IN ('scheduler', 'tracker')"
        )
        return {r["t"] for r in rows}
    finally:
        await conn.close()


async def test_the_provisioner_makes_every_durable_and_table_and_a_rerun_changes_nothing(nats_server, database_url):
    first = provision(nats_server.url, database_url, "--services")
    assert first.returncode == 0, first.stderr
    assert "database tables and durable consumers are provisioned (trigger, scheduler, binder, tracker)" in first.stderr
    made = await durables(nats_server.url)
    assert SHARED_DURABLES <= made, SHARED_DURABLES - made
    made_tables = await tables(database_url)
    assert {"scheduler.backlog", "tracker.jobs"} <= made_tables, made_tables

    again = provision(nats_server.url, database_url, "--services")
    assert again.returncode == 0, again.stderr
    assert await durables(nats_server.url) == made
    assert await tables(database_url) == made_tables


async def test_a_service_that_cannot_provision_fails_the_run_naming_itself(nats_server):
    refused = provision(nats_server.url, "postgresql://nobody@127.0.0.1:1/none", "--services")
    assert refused.returncode != 0
    assert "provisioning the scheduler failed" in refused.stderr, refused.stderr


def test_a_service_command_says_what_provision_does():
    shown = subprocess.run(
        [sys.executable, "-m", "jobmesh.tracker", "--help"], capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0 and "--provision" in shown.stdout, shown.stderr
