"""TLS to NATS, against a real nats-server that requires it.

A throwaway CA, a server certificate for 127.0.0.1 and localhost, and a client certificate
are made with the ``openssl`` command line in the module's tmp dir (``make system-packages``
installs it). Two servers run: one that requires TLS (``tls { cert_file, key_file }``) and
one that also requires a client certificate signed by the CA (``verify: true``).

What is checked: the SDK's ``Client.connect`` connects over TLS with ``JOBMESH_NATS_TLS_CA``
and a request round-trips; without the CA the server's certificate is not trusted and it
fails with jobmesh's ``Unavailable``; against mutual TLS it connects with
``JOBMESH_NATS_TLS_CERT``/``JOBMESH_NATS_TLS_KEY`` and is refused without them; and a real
service process (the trigger, which needs no Postgres) given a ``tls://`` URL and the CA
becomes healthy over TLS.

These servers are this module's own and run without NATS authentication (no
``auth.conf``): TLS and nkeys are independent settings, and the authenticated paths are
tested elsewhere (tests/test_auth_services.py, tests/test_permissions.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats.errors
import pytest

from jobmesh.client.client import ADMIN_KEY_VARIABLE, CREDENTIAL_VARIABLES, Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import HealthReply
from jobmesh.dev.servers import NatsServer, TlsBlock, nats_config
from jobmesh.errors import Unavailable
from tests.helpers import eventually
from tests.test_nats_configs import options

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Pki:
    """The PEM files of one throwaway CA and the certificates it signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")


def _signed(directory: Path, name: str, extensions: str, serial: int) -> tuple[Path, Path]:
    """A P-256 key and a certificate for it signed by ``ca.pem``, with ``extensions``."""
    key, csr, cert, ext = (directory / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem", ".ext"))
    # Python's default context checks X.509 strictly: a leaf needs its key identifiers.
    ext.write_text(
        extensions + "\nbasicConstraints = critical, CA:FALSE\n"
        "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key.name, "-out", csr.name, "-subj", f"/CN=jobmesh test {name}", cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr.name, "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", str(serial),
        "-days", "2", "-out", cert.name, "-extfile", ext.name, cwd=directory,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make this test's certificates: run `make system-packages`")
    directory = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=jobmesh test CA",
        "-addext", "basicConstraints = critical, CA:TRUE",
        "-addext", "keyUsage = critical, keyCertSign, cRLSign", cwd=directory,
    )  # fmt: skip
    server_cert, server_key = _signed(
        directory,
        "server",
        "subjectAltName = IP:127.0.0.1, DNS:localhost\nkeyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth",
        serial=2,
    )
    client_cert, client_key = _signed(
        directory, "client", "keyUsage = critical, digitalSignature\nextendedKeyUsage = clientAuth", serial=3
    )
    return Pki(directory / "ca.pem", server_cert, server_key, client_cert, client_key)


def _server(store: Path, tls: TlsBlock) -> NatsServer:
    return NatsServer(store, log_file=store / "nats.log", tls=tls).start()


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory) -> NatsServer:
    """Requires TLS; any client that trusts the CA may connect."""
    server = _server(tmp_path_factory.mktemp("nats-tls"), TlsBlock(pki.server_cert, pki.server_key))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(pki, tmp_path_factory) -> NatsServer:
    """Requires TLS and a client certificate signed by the CA."""
    tls = TlsBlock(pki.server_cert, pki.server_key, ca_file=pki.ca, verify=True)
    server = _server(tmp_path_factory.mktemp("nats-mtls"), tls)
    yield server
    server.stop()


@pytest.fixture
def env(monkeypatch) -> pytest.MonkeyPatch:
    """No credentials or TLS from the caller's shell (a dev cluster's, say) reach a test."""
    for name in (*CREDENTIAL_VARIABLES, ADMIN_KEY_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def _round_trip(client: Client) -> bytes:
    """A request answered by a subscriber on the same (TLS) connection."""

    async def echo(msg) -> None:
        await msg.respond(b"pong:" + msg.data)

    sub = await client.nc.subscribe("tls.echo", cb=echo)
    try:
        return (await client.nc.request("tls.echo", b"ping", timeout=5)).data
    finally:
        await sub.unsubscribe()


def test_config_has_the_tls_block(tmp_path):
    text = nats_config(
        port=4222,
        monitor_port=8222,
        store_dir=tmp_path,
        tls=TlsBlock(tmp_path / "s.pem", tmp_path / "s.key", ca_file=tmp_path / "ca.pem", verify=True),
    )
    found = options(text)
    assert found["tls.cert_file"] == str(tmp_path.resolve() / "s.pem")
    assert found["tls.key_file"] == str(tmp_path.resolve() / "s.key")
    assert found["tls.ca_file"] == str(tmp_path.resolve() / "ca.pem")
    assert found["tls.verify"] == "true"
    # Without a block nothing about TLS is written: every other server is unchanged.
    plain = options(nats_config(port=4222, monitor_port=8222, store_dir=tmp_path))
    assert not [key for key in plain if key.startswith("tls")]


async def test_client_connects_with_the_ca(tls_server, pki, env):
    env.setenv("JOBMESH_NATS_URL", tls_server.url)
    env.setenv("JOBMESH_NATS_TLS_CA", str(pki.ca))
    client = await Client.connect()
    try:
        assert await _round_trip(client) == b"pong:ping"
        # The server says the connection is TLS (what it negotiated), not just that it works.
        connz = tls_server.monitor("/connz")
        assert connz["connections"] and all(c.get("tls_version") for c in connz["connections"]), connz
    finally:
        await client.close()


async def test_client_without_the_ca_is_unavailable(tls_server, env):
    # The system's roots do not know this CA: the server's certificate is not trusted.
    env.setenv("JOBMESH_NATS_URL", tls_server.url)
    with pytest.raises(Unavailable, match=r"cannot reach NATS at nats://127\.0\.0\.1:\d+: .*(?i:certificate)"):
        await Client.connect()


async def test_tls_url_with_the_ca_connects(tls_server, pki, env):
    url = tls_server.url.replace("nats://", "tls://")
    env.setenv("JOBMESH_NATS_URL", url)
    env.setenv("JOBMESH_NATS_TLS_CA", str(pki.ca))
    client = await Client.connect()
    try:
        assert await _round_trip(client) == b"pong:ping"
    finally:
        await client.close()


async def test_mutual_tls_with_the_client_certificate(mtls_server, pki, env):
    env.setenv("JOBMESH_NATS_URL", mtls_server.url)
    env.setenv("JOBMESH_NATS_TLS_CA", str(pki.ca))
    env.setenv("JOBMESH_NATS_TLS_CERT", str(pki.client_cert))
    env.setenv("JOBMESH_NATS_TLS_KEY", str(pki.client_key))
    client = await Client.connect()
    try:
        assert await _round_trip(client) == b"pong:ping"
    finally:
        await client.close()


async def test_mutual_tls_without_a_client_certificate_is_refused(mtls_server, pki, env):
    env.setenv("JOBMESH_NATS_URL", mtls_server.url)
    env.setenv("JOBMESH_NATS_TLS_CA", str(pki.ca))
    with pytest.raises(Unavailable, match=r"cannot reach NATS at nats://127\.0\.0\.1:\d+"):
        client = await Client.connect()
        # Under TLS 1.3 the server checks the client's certificate after the client's side
        # of the handshake is done: a refusal may surface on the first round trip instead.
        try:
            await client.nc.flush(timeout=5)
        finally:
            await client.close()


def _start_trigger(url: str, ca: Path, work_dir: Path, log_path: Path) -> subprocess.Popen:
    """``python -m jobmesh.trigger`` on ``url`` trusting ``ca``, with no other ``JOBMESH_*``
    setting of the caller's shell (credentials of a dev cluster, say)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBMESH_")}
    env.update(
        JOBMESH_NATS_URL=url,
        JOBMESH_NATS_TLS_CA=str(ca),
        JOBMESH_WORK_DIR=str(work_dir),
        JOBMESH_LOG_FORMAT="text",
        PYTHONUNBUFFERED="1",
    )
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "jobmesh.trigger"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def test_a_service_process_becomes_healthy_over_tls(tls_server, pki, env, tmp_path):
    url = tls_server.url.replace("nats://", "tls://")
    log_path = tmp_path / "trigger.log"
    proc = _start_trigger(url, pki.ca, tmp_path / "work", log_path)
    env.setenv("JOBMESH_NATS_URL", url)
    env.setenv("JOBMESH_NATS_TLS_CA", str(pki.ca))
    client: Client | None = None
    try:
        client = await Client.connect()

        async def healthy() -> HealthReply | None:
            if proc.poll() is not None:
                raise AssertionError(f"trigger exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                reply = await client.nc.request(subjects.health("trigger"), b"{}", timeout=1)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                return None
            health = msgspec.json.decode(reply.data, type=HealthReply)
            return health if health.ok else None

        health = await eventually(healthy, timeout=60, what="the trigger to answer its health check with ok")
        assert health.service == "trigger"
        # Its own connection is a TLS one, as the server saw it.
        connz = tls_server.monitor("/connz")
        mine = [c for c in connz["connections"] if c.get("name", "").startswith("jobmesh-trigger")]
        assert mine and all(c.get("tls_version") for c in mine), connz
    finally:
        if client is not None:
            await client.close()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
