"""Each jobmesh command of compose.yaml, run here and seen healthy through its own check.

The compose environment is applied as it is, with what only a container has rewritten:
hosts (``nats``, ``postgres``, ``tempo``) point at the test's NATS and Postgres (Tempo at a
port where nothing listens: traces are best effort), ``0.0.0.0:<port>`` listen addresses
at free loopback ports, container paths at temporary directories. The provisioner runs
first and exits 0; then each service starts and the compose health check itself (its
``python -c`` one-liner, ports rewritten the same way) must pass against that process's
own /healthz; SIGTERM must then stop it cleanly within its stop_grace_period.

NATS runs with authentication, as compose's does: the credentials service's own command
(``jobmesh auth issue``) writes the keys into a temporary directory in place of the
credentials volume, nats-server includes its ``auth.conf``, and each process's seed file
(``JOBMESH_NATS_NKEY_FILE``) is that directory's file of the same name.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

from jobmesh.dev import deploygen
from jobmesh.dev.servers import NatsServer, free_port
from tests.test_deploy_files import compose, duration_seconds, interpolate, jobmesh_services, listen_port

BIN = Path(sys.executable).parent
WEB_TOKEN = "deploy-test-token"
# What an operator sets in the shell or .env beside compose.yaml.
SHELL = {"JOBMESH_WEB_TOKEN": WEB_TOKEN}
HEALTH_DEADLINE = 90.0
# The long-running processes: the one-shots (the credentials, the provisioner) have no check.
SERVICES = [name for name, svc in jobmesh_services(compose()).items() if "healthcheck" in svc]
# Where compose's credentials service writes the keys: its --dir, the volume's mount.
_ISSUE = jobmesh_services(compose())[deploygen.CREDENTIALS_SERVICE]["command"]
CREDENTIALS_DIR = _ISSUE[_ISSUE.index("--dir") + 1]


@dataclass
class Local:
    """A compose process made runnable here."""

    command: list[str]
    env: dict[str, str]
    ports: dict[int, int]  # container port -> loopback port here


def localize(
    name: str,
    nats_url: str,
    database_url: str,
    work_dir: Path,
    tmp: Path,
    service: dict | None = None,
    credentials: Path | None = None,
) -> Local:
    """Rewrite one compose service's command and environment for this machine.

    Raises:
        AssertionError: when a URL names a host that is not a compose service.
    """
    doc = compose()
    service = service or doc["services"][name]
    hosts = set(doc["services"])
    ports: dict[int, int] = {}

    def local_listen(value: str) -> str:
        port = listen_port(value)
        assert port is not None, value
        return f"127.0.0.1:{ports.setdefault(port, free_port())}"

    def local_credentials(value: str) -> str | None:
        """A path in the credentials volume, as the directory that stands in for it holds it."""
        if value == CREDENTIALS_DIR or value.startswith(CREDENTIALS_DIR + "/"):
            assert credentials is not None, f"{name}: {value} needs the credentials"
            return str(credentials) + value[len(CREDENTIALS_DIR) :]
        return None

    env: dict[str, str] = {}
    for key, raw in service.get("environment", {}).items():
        value = interpolate(str(raw), SHELL)
        if "://" in value:
            host = urlparse(value).hostname
            assert host in hosts, f"{name}: {key} names {host}, which is not a compose service"
        if key == "JOBMESH_NATS_URL":
            value = nats_url
        elif key == "JOBMESH_DATABASE_URL":
            value = database_url
        elif key == "OTEL_EXPORTER_OTLP_ENDPOINT":
            value = f"http://127.0.0.1:{free_port()}"  # nothing listens: export fails, the service must not
        elif listen_port(value) is not None:
            value = local_listen(value)
        elif key == "JOBMESH_WORK_DIR":
            value = str(work_dir / name)
        elif local_credentials(value) is not None:
            value = local_credentials(value) or value
        elif value.startswith("/"):
            value = str(tmp / key.lower())
            Path(value).mkdir(parents=True, exist_ok=True)
        env[key] = value
    command = [
        local_listen(arg) if listen_port(arg) is not None else local_credentials(arg) or arg
        for arg in service["command"]
    ]
    command[0] = str(BIN / command[0])
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    return Local(command=command, env={**base, **env}, ports=ports)


def local_healthcheck(service: dict, ports: dict[int, int]) -> list[str]:
    """The compose health check's command, run here: this interpreter, the rewritten port."""
    test = list(service["healthcheck"]["test"])
    assert test[0] == "CMD" and test[1] == "python", test
    probe = re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{ports[int(m.group(1))]}", test[3])
    return [sys.executable, *test[2:3], probe]


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> Path:
    """compose's one-shot credentials service, run once into a directory that stands in for
    its volume: it must exit 0."""
    directory = tmp_path_factory.mktemp("credentials-volume") / "credentials"
    local = localize(
        deploygen.CREDENTIALS_SERVICE,
        "nats://127.0.0.1:1",
        "postgresql://unused",
        Path("/nonexistent"),
        tmp_path_factory.mktemp(deploygen.CREDENTIALS_SERVICE),
        credentials=directory,
    )
    result = subprocess.run(local.command, env=local.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory, credentials: Path) -> NatsServer:
    """This module's nats-server, with compose's authorization block: only the issued keys
    connect (it replaces the suite's server, which has none)."""
    store = tmp_path_factory.mktemp("nats-auth")
    server = NatsServer(
        store, log_file=store / "nats.log", sync_always=False, auth_file=credentials / "auth.conf"
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def provisioned(nats_server: NatsServer, database_url: str, work_dir: Path, tmp_path_factory, credentials) -> None:
    """compose's one-shot provisioner, run once as the provisioner: it must exit 0."""
    local = localize(
        "provision",
        nats_server.url,
        database_url,
        work_dir,
        tmp_path_factory.mktemp("provision"),
        credentials=credentials,
    )
    result = subprocess.run(local.command, env=local.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def started(nats_server: NatsServer, database_url: str, work_dir: Path, tmp_path: Path, provisioned, credentials):
    """Start one compose service here; stop it (SIGKILL if it outlives the test)."""
    procs: list[subprocess.Popen] = []

    def start(name: str) -> tuple[subprocess.Popen, Local, Path]:
        local = localize(name, nats_server.url, database_url, work_dir, tmp_path, credentials=credentials)
        log = tmp_path / f"{name}.log"
        with log.open("w") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                local.command, env=local.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs.append(proc)
        return proc, local, log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def wait_healthy(proc: subprocess.Popen, check: list[str], log: Path) -> None:
    """Run the health check until it passes, failing when the process exits or time runs out."""
    deadline = time.monotonic() + HEALTH_DEADLINE
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before it was healthy:\n{_tail(log)}")
        result = subprocess.run(check, capture_output=True, text=True, timeout=30)
        if result.returncode == 0:
            return
        last = (result.stderr.strip().splitlines() or [""])[-1]
        time.sleep(0.25)  # noqa: sleep - between probes, as compose's interval; not before an assert
    pytest.fail(f"not healthy within {HEALTH_DEADLINE}s (last check: {last}):\n{_tail(log)}")


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-30:])


def _healthz(port: int) -> tuple[int, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
        return reply.status, json.loads(reply.read())


@pytest.mark.parametrize("name", SERVICES)
def test_the_compose_command_becomes_healthy_and_stops_cleanly(name: str, started) -> None:
    service = compose()["services"][name]
    proc, local, log = started(name)
    check = local_healthcheck(service, local.ports)
    wait_healthy(proc, check, log)
    # The check passed against this process's own endpoint, without a token.
    (container_port,) = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", service["healthcheck"]["test"][3])}
    status, body = _healthz(local.ports[container_port])
    assert status == 200, body
    if name == "web":
        # jobmesh web's own shape; auth says the compose token reached it.
        assert body["ok"] is True and body["auth"] is True, body
    else:
        assert body["status"] == "ok", body
        metrics = f"http://127.0.0.1:{local.ports[container_port]}/metrics"
        with urllib.request.urlopen(metrics, timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
    grace = duration_seconds(service["stop_grace_period"])
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(grace)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {grace}s after SIGTERM (compose would SIGKILL it):\n{_tail(log)}")
    # uvicorn shuts jobmesh web down gracefully, then raises the captured SIGTERM again, so
    # it ends by the signal (compose shows 143); the services drain and exit 0.
    assert code in ((0, -signal.SIGTERM) if name == "web" else (0,)), _tail(log)


async def test_a_client_without_a_key_is_refused(nats_server: NatsServer, credentials: Path) -> None:
    """The server the processes passed their checks against lets no one in without a key."""
    import nats

    with pytest.raises(Exception, match=r"[Aa]uthorization"):
        await nats.connect(nats_server.url, allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=3)
    nc = await nats.connect(nats_server.url, nkeys_seed=str(credentials / "client.nk"), connect_timeout=3)
    await nc.close()


def test_a_check_fails_when_its_own_replica_is_gone(started, nats_server: NatsServer) -> None:
    """Two binder replicas: stopping one fails its check while the other's still passes, so
    the check answers for the replica beside it, not for the queue group."""
    service = compose()["services"]["binder"]
    first, one, log_one = started("binder")
    second, two, log_two = started("binder")
    check_one = local_healthcheck(service, one.ports)
    check_two = local_healthcheck(service, two.ports)
    wait_healthy(first, check_one, log_one)
    wait_healthy(second, check_two, log_two)
    first.send_signal(signal.SIGTERM)
    first.wait(duration_seconds(service["stop_grace_period"]))
    assert subprocess.run(check_one, capture_output=True, timeout=30).returncode != 0
    assert subprocess.run(check_two, capture_output=True, timeout=30).returncode == 0
