"""``jobmesh dev``: a whole cluster on one machine, from nothing.

Starts a nats-server from the pinned wheel on a port of its own, Postgres
(``JOBMESH_DATABASE_URL`` when set, else an embedded one from the ``pgserver`` wheel) and the
five services as separate processes. State lives in ``.jobmesh/`` under the current
directory; ``.jobmesh/dev.env`` tells other commands where the cluster is.

The NATS store in ``.jobmesh/nats`` only makes sense beside the database it was used with
(the tracker's history and the scheduler's backlog live there), so the first start records
its database in ``.jobmesh/database`` and later starts use the same one or refuse
(:func:`plan_database`). ``reset`` removes ``.jobmesh/`` first, to start afresh.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from jobmesh.contract import permissions
from jobmesh.contract.subjects import SERVICES
from jobmesh.dev.cluster import LocalCluster, ServiceProcess
from jobmesh.dev.servers import NatsServer, embedded_postgres
from jobmesh.errors import Unavailable
from jobmesh.executor.node import sanitize_node_id
from jobmesh.runtime.commands import AUTH_FILE, issue
from jobmesh.runtime.settings import Settings

STATE = Path(".jobmesh")
ENV_FILE = STATE / "dev.env"
# The handlers that ship with the project (a checkout's examples/), each with the module it
# needs beyond jobmesh: the machine-learning one and the one the dataset-reindex rule calls.
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
EXAMPLE_HANDLERS: tuple[tuple[Path, str], ...] = (
    (EXAMPLES / "handlers" / "digits.py", "sklearn"),
    (EXAMPLES / "triggers" / "reindex.py", ""),
)
PID_FILE = STATE / "dev.pid"
NATS_PID_FILE = STATE / "nats.pid"  # the dev nats-server, for `--add-node` to reload it
CREDENTIALS = STATE / "credentials"
LOG_FILE = STATE / "dev.log"
DATABASE_FILE = STATE / "database"
EMBEDDED = "embedded"  # what DATABASE_FILE holds when the embedded Postgres is the database


@dataclass(frozen=True)
class StateDir:
    """What a state directory says about the database it belongs to.

    Attributes:
        path: the directory, as the user should see it in a message.
        recorded: the content of its ``database`` file (a URL or ``EMBEDDED``), None when absent.
        has_store: a NATS store from an earlier start is there.
        has_embedded_data: an embedded Postgres data directory is there.
    """

    path: Path
    recorded: str | None
    has_store: bool
    has_embedded_data: bool


@dataclass(frozen=True)
class DatabasePlan:
    """Which database to start with, and what to do to the state directory first.

    Attributes:
        database: a Postgres URL, or ``EMBEDDED``.
        wipe: remove the state directory before starting.
        record: write ``database`` into the state directory's record.
    """

    database: str
    wipe: bool = False
    record: bool = False


@dataclass(frozen=True)
class Refusal:
    """Why the state directory cannot be used with the database asked for, and what to do."""

    message: str


def plan_database(state: StateDir, env_url: str | None, reset: bool) -> DatabasePlan | Refusal:
    """Decide which database a start uses, given what the state directory recorded.

    A state directory from before the record existed is judged by what it holds: an
    embedded data directory means the embedded Postgres; a NATS store without one means a
    URL, which one is not known, so any URL given is trusted and then recorded.

    Args:
        state: what the state directory holds.
        env_url: ``JOBMESH_DATABASE_URL``; None or "" when unset.
        reset: the user asked to start afresh.

    Returns:
        A ``DatabasePlan``, or a ``Refusal`` whose message says what was used before and
        how to go on.
    """
    wanted = env_url or EMBEDDED
    if reset:
        return DatabasePlan(wanted, wipe=True, record=True)
    recorded = state.recorded
    if recorded is None and state.has_embedded_data:
        recorded = EMBEDDED
    if recorded is None and state.has_store:
        if env_url:
            return DatabasePlan(env_url, record=True)
        return Refusal(
            f"{state.path}/ holds a NATS store made with a database from JOBMESH_DATABASE_URL (before the URL was"
            f" recorded), but the variable is not set now. Set JOBMESH_DATABASE_URL to that URL again, or start"
            f" afresh with `jobmesh dev --reset` (or remove {state.path}/)"
        )
    if recorded is None:
        return DatabasePlan(wanted, record=True)
    if recorded == wanted:
        return DatabasePlan(wanted, record=state.recorded is None)
    return Refusal(_mismatch(state.path, recorded, env_url))


def _mismatch(path: Path, recorded: str, env_url: str | None) -> str:
    afresh = f"start afresh with `jobmesh dev --reset` (or remove {path}/)"
    if recorded == EMBEDDED:
        return (
            f"{path}/ was made with the embedded Postgres (in {path}/pg), but JOBMESH_DATABASE_URL is set to"
            f" {redacted(env_url or '')}. Unset JOBMESH_DATABASE_URL to use the embedded Postgres again, or"
            f" {afresh} with the new database"
        )
    now = f"JOBMESH_DATABASE_URL is {redacted(env_url)}" if env_url else "JOBMESH_DATABASE_URL is not set"
    return (
        f"{path}/ was made with the database JOBMESH_DATABASE_URL={redacted(recorded)}, but {now}. Set"
        f" JOBMESH_DATABASE_URL to that URL again (it is recorded in {path / 'database'}), or {afresh}"
    )


def redacted(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for messages).

    Args:
        url: a database URL.

    Returns:
        The same URL without the password.
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def read_state(path: Path = STATE) -> StateDir:
    """What the state directory at ``path`` holds (nothing when it does not exist).

    Args:
        path: the state directory.

    Returns:
        Its recorded database and whether a NATS store and embedded data are there.
    """
    try:
        recorded: str | None = (path / DATABASE_FILE.name).read_text().strip() or None
    except FileNotFoundError:
        recorded = None
    return StateDir(path, recorded, (path / "nats").is_dir(), (path / "pg").is_dir())


def _prepare_state(reset: bool) -> DatabasePlan | None:
    """Apply ``plan_database`` to ``STATE``: wipe it when asked; None (and a message) on refusal."""
    plan = plan_database(read_state(), os.environ.get("JOBMESH_DATABASE_URL"), reset)
    if isinstance(plan, Refusal):
        _say(plan.message)
        return None
    if plan.wipe and STATE.exists():
        _say(f"removing {STATE}/ to start afresh")
        shutil.rmtree(STATE)
    return plan


def _say(message: str) -> None:
    print(f"jobmesh dev: {message}", file=sys.stderr, flush=True)


def _running_pid() -> int | None:
    try:
        pid = int(PID_FILE.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def dev_service_env(
    environ: Mapping[str, str], examples: tuple[tuple[Path, str], ...] = EXAMPLE_HANDLERS
) -> dict[str, str]:
    """The settings `jobmesh dev` adds for its services.

    Its executor hosts the shipped handlers (digits, so the demo can call it; reindex, so
    the dataset-reindex rule of examples/triggers runs), unless ``JOBMESH_HANDLER_MODULES``
    names other modules. An example that cannot load here is left out: an installed package
    has no examples/, and scikit-learn is the ``examples`` extra.

    Args:
        environ: the environment `jobmesh dev` runs in.
        examples: each example module's path and the module it needs ("" for none).

    Returns:
        ``JOBMESH_*`` settings for every service.
    """
    if "JOBMESH_HANDLER_MODULES" in environ:
        return {}
    modules = [
        str(path)
        for path, needs in examples
        if path.is_file() and (not needs or importlib.util.find_spec(needs) is not None)
    ]
    return {"JOBMESH_HANDLER_MODULES": ",".join(modules)} if modules else {}


DEV_HTTP_PORT = 8480  # the trigger's HTTP ingress, when free (else any free port)
SUBMIT_TOKEN = "http-submit-token"  # the secret holding the bearer token of POST /v1/jobs


def _free_port(preferred: int) -> int:
    """``preferred`` when nothing listens there, else a port the kernel picks."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise Unavailable("no free TCP port on 127.0.0.1 for the HTTP ingress")


def dev_http_env(state: Path, port: int) -> dict[str, str]:
    """The trigger's HTTP ingress for `jobmesh dev`: on loopback, with hook secrets read from
    ``.jobmesh/secrets/`` and the submit endpoint's bearer token made there once (0600).

    Args:
        state: the state directory (``.jobmesh``, absolute).
        port: where the ingress listens.

    Returns:
        ``JOBMESH_*`` settings for the trigger (only: the secrets directory is not for jobs).
    """
    secrets = state / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    token = secrets / SUBMIT_TOKEN
    if not token.exists():
        token.touch(mode=0o600)
        token.write_text(secrets_token())
    return {
        "JOBMESH_HTTP_LISTEN": f"127.0.0.1:{port}",
        "JOBMESH_SECRETS_DIR": str(secrets),
        "JOBMESH_HTTP_SUBMIT_TOKEN_SECRET": SUBMIT_TOKEN,
    }


def secrets_token() -> str:
    """A fresh bearer token (256 bits, URL-safe)."""
    import secrets

    return secrets.token_urlsafe(32)


DEV_WEB_PORT = 8080  # the dashboard and HTTP API, when free (else any free port)


def start_dashboard(cluster: LocalCluster, port: int, token: str | None = None) -> ServiceProcess:
    """Start the HTTP API and dashboard (``python -m jobmesh.web``) as one of ``cluster``'s processes.

    Args:
        cluster: the cluster it serves (and which stops it with the services).
        port: where it listens on 127.0.0.1.
        token: its bearer token; None to run open, as on loopback ``jobmesh dev`` does.

    Returns:
        The process; :func:`wait_dashboard` waits until it answers.
    """
    # The caller's own token settings must not leak in: the token is the one given here.
    # Without one it runs open, which jobmesh web does on loopback only when told to.
    env = {
        "JOBMESH_WEB_LISTEN": f"127.0.0.1:{port}",
        "JOBMESH_WEB_TOKEN": token or "",
        "JOBMESH_WEB_TOKEN_FILE": "",
        "JOBMESH_WEB_OPEN_ON_LOOPBACK": "" if token else "1",
    }
    return cluster.start_service("web", env)


def wait_dashboard(cluster: LocalCluster, url: str, timeout: float = 30.0) -> None:
    """Wait until the dashboard at ``url`` answers ``GET /healthz`` with 200.

    Raises:
        Unavailable: it did not within ``timeout``, or its process (or a service) exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        cluster.check_alive()
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or not connected to NATS yet (503)
        if time.monotonic() > deadline:
            raise Unavailable(f"the dashboard at {url} did not answer within {timeout}s; see {cluster.log_of('web')}")
        time.sleep(0.1)


def foreground(demo: bool = False, reset: bool = False, auth: bool = True) -> int:
    """Run the cluster until Ctrl-C or SIGTERM, then stop everything cleanly.

    Args:
        demo: run the demo jobs once the cluster is healthy.
        reset: remove ``.jobmesh/`` first (its NATS store, embedded Postgres and logs).
        auth: NATS authentication on: one key per identity, each process within its
            permissions (docs/operations.md, "Security").

    Returns:
        The exit code: 0 after a clean stop, 1 when refused (a cluster already runs here, or
        the database differs from the one ``.jobmesh/`` was made with), 2 when it failed.
    """
    if _running_pid() not in (None, os.getpid()):
        _say(f"a cluster is already running (pid {_running_pid()}); `jobmesh dev --stop` stops it")
        return 1
    plan = _prepare_state(reset)
    if plan is None:
        return 1
    STATE.mkdir(exist_ok=True)
    if plan.record:
        DATABASE_FILE.touch(mode=0o600)  # the URL may hold a password
        DATABASE_FILE.write_text(plan.database + "\n")
    ENV_FILE.unlink(missing_ok=True)
    PID_FILE.write_text(str(os.getpid()))
    stop = {"now": False}

    def on_signal(signum, frame) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service_env = dev_service_env(os.environ)
    credentials: Path | None = None
    node_id = dev_node_id(os.environ)
    if auth:
        # As in production: one nkey per identity, kept across runs.
        service_env["JOBMESH_NODE_ID"] = node_id
        credentials = CREDENTIALS.resolve()
        issue(credentials, [node_id], Settings.from_env("provision").partitions)
    nats_server = NatsServer(
        STATE / "nats", log_file=STATE / "nats.log", auth_file=credentials / AUTH_FILE if credentials else None
    ).start()
    assert nats_server.proc is not None
    NATS_PID_FILE.write_text(str(nats_server.proc.pid))
    keys = f"; identities in {credentials}" if credentials else ""
    _say(f"nats-server on {nats_server.url} (store {STATE / 'nats'}{keys})")
    pg = None
    database_url = plan.database
    if database_url == EMBEDDED:
        pg = embedded_postgres((STATE / "pg").resolve())
        database_url = pg.get_uri()
        _say(f"embedded Postgres at {database_url}")
    else:
        _say(f"Postgres at {redacted(database_url)} (JOBMESH_DATABASE_URL)")
    http_port = _free_port(DEV_HTTP_PORT)
    # The ingress settings (its secrets directory above all) go to the trigger only: an
    # executor given them would hand the submit token to any job that names it.
    http_env = dev_http_env(STATE.resolve(), http_port)
    cluster = LocalCluster(nats_server.url, database_url, STATE.resolve(), env=service_env, credentials=credentials)
    try:
        if credentials is not None:
            _say("provisioning streams, buckets, tables and durables (as the provisioner)")
            provision_as_provisioner(nats_server.url, database_url, credentials, [node_id])
        for name in SERVICES:
            cluster.start_service(name, http_env if name == "trigger" else None)
        _say("starting services: " + ", ".join(SERVICES))
        asyncio.run(_wait_healthy_with_progress(cluster))
        # On loopback and without a token: the one case where the dashboard runs open.
        web_port = _free_port(DEV_WEB_PORT)
        start_dashboard(cluster, web_port)
        web_url = f"http://127.0.0.1:{web_port}"
        wait_dashboard(cluster, web_url)
        ENV_FILE.write_text(
            f"JOBMESH_NATS_URL={nats_server.url}\nJOBMESH_DATABASE_URL={database_url}\nJOBMESH_DEV_PID={os.getpid()}\n"
            f"JOBMESH_HTTP_URL=http://127.0.0.1:{http_port}\nJOBMESH_WEB_URL={web_url}\n"
            + (
                f"JOBMESH_NATS_NKEY_FILE={credentials / 'client.nk'}\n"
                f"JOBMESH_ADMIN_NKEY_FILE={credentials / 'provisioner.nk'}\n"
                f"JOBMESH_INTEGRATOR_NKEY_FILE={credentials / 'integrator.nk'}\n"
                if credentials
                else ""
            )
        )
        _say(
            f"ready. Dashboard and HTTP API {web_url} (loopback, no token); NATS {nats_server.url}; HTTP ingress"
            f" http://127.0.0.1:{http_port}; settings in {ENV_FILE}; logs in {STATE / 'logs'}/"
        )
        if demo:
            from jobmesh.dev.demo import run_demo

            asyncio.run(run_demo(nats_server.url, web_url=web_url))
        _say("press Ctrl-C to stop")
        while not stop["now"]:
            cluster.check_alive()
            time.sleep(0.5)
        return 0
    except Unavailable as exc:
        _say(str(exc))
        return 2
    finally:
        _say("stopping services")
        cluster.stop()
        nats_server.stop()
        if pg is not None:
            pg.cleanup()
        ENV_FILE.unlink(missing_ok=True)
        PID_FILE.unlink(missing_ok=True)
        NATS_PID_FILE.unlink(missing_ok=True)
        _say("stopped")


def add_node(node_id: str, timeout: float = 30.0) -> int:
    """``jobmesh dev --add-node``: let one more executor join the running dev cluster.

    Its key is issued beside the others, the nats-server reads its configuration again
    (SIGHUP) and is waited for until it accepts the key, and the provisioner creates the
    node's dispatch consumer. Prints the key file for the executor's JOBMESH_NATS_NKEY_FILE.

    Returns:
        0 once the node may join; 1 when no dev cluster runs here.
    """
    if not ENV_FILE.exists() or not NATS_PID_FILE.exists():
        _say("no dev cluster runs here: start one with `jobmesh dev --detach`")
        return 1
    if not CREDENTIALS.exists():
        _say("this dev cluster runs without authentication: any executor may join as it is")
        return 0
    from jobmesh.client.client import read_env_file

    env = read_env_file(ENV_FILE)
    credentials = CREDENTIALS.resolve()
    rows = issue(credentials, [node_id], Settings.from_env("provision").partitions)
    seed = next(Path(row["seed_file"]) for row in rows if row["identity"] == f"executor-{node_id}")
    os.kill(int(NATS_PID_FILE.read_text()), signal.SIGHUP)
    asyncio.run(wait_key_accepted(env["JOBMESH_NATS_URL"], seed, node_id, timeout))
    provision_as_provisioner(env["JOBMESH_NATS_URL"], env["JOBMESH_DATABASE_URL"], credentials, [node_id])
    _say(f"node {node_id} may join: start its executor with JOBMESH_NODE_ID={node_id} and")
    print(f"JOBMESH_NATS_NKEY_FILE={seed}")
    return 0


async def wait_key_accepted(url: str, seed: Path, node_id: str, timeout: float) -> None:
    """Connect with the new key until the reloaded server accepts it (a reload is not
    instant), or raise ``Unavailable``."""
    import nats

    deadline = time.monotonic() + timeout
    while True:
        try:
            nc = await nats.connect(
                url,
                nkeys_seed=str(seed),
                inbox_prefix=permissions.inbox_of(permissions.executor_identity(node_id)),
                allow_reconnect=False,
                max_reconnect_attempts=0,
                connect_timeout=2,
            )
            await nc.close()
            return
        except Exception as exc:  # refused until the reload is done
            if time.monotonic() > deadline:
                raise Unavailable(f"the dev nats-server did not take node {node_id}'s key: {exc}") from exc
            await asyncio.sleep(0.2)  # polling the reload, not a wait before an assert


def dev_node_id(environ: Mapping[str, str]) -> str:
    """The dev executor's node id: ``JOBMESH_NODE_ID``, else this host's name as a node id
    (its NATS key is issued for that id)."""
    return environ.get("JOBMESH_NODE_ID") or sanitize_node_id(socket.gethostname())


def provision_as_provisioner(nats_url: str, database_url: str, credentials: Path, nodes: list[str]) -> None:
    """Run ``jobmesh provision --services`` with the provisioner's key: with authentication
    on, the services may use their streams and durables but not create them.

    Raises:
        Unavailable: provisioning failed; its last lines are quoted.
    """
    env = {
        **os.environ,
        "JOBMESH_NATS_URL": nats_url,
        "JOBMESH_DATABASE_URL": database_url,
        "JOBMESH_NATS_NKEY_FILE": str(credentials / "provisioner.nk"),
    }
    env.pop("JOBMESH_NATS_NKEY", None)
    args = ["provision", "--services", *(f"--node={node}" for node in nodes)]
    done = subprocess.run(
        [sys.executable, "-c", "from jobmesh.client.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-5:])
        raise Unavailable(f"provisioning failed (exit {done.returncode}): {tail}")


async def _wait_healthy_with_progress(cluster: LocalCluster, timeout: float = 90.0) -> None:
    started = time.monotonic()
    waiter = asyncio.ensure_future(cluster.wait_healthy(timeout=timeout))
    while not waiter.done():
        await asyncio.wait([waiter], timeout=2.0)
        if not waiter.done():
            _say(f"waiting for services to report healthy ... {time.monotonic() - started:.0f}s")
    waiter.result()


def detach(reset: bool = False, auth: bool = True) -> int:
    """Start the cluster in the background; return once every service is healthy.

    Args:
        reset: remove ``.jobmesh/`` first; refused while a cluster runs here.
        auth: NATS authentication on (see :func:`foreground`).

    Returns:
        The exit code: 0 once healthy (or already running), 1 when refused, 2 when it failed.
    """
    pid = _running_pid()
    if pid is not None and reset:
        _say(f"a cluster is running here (pid {pid}); stop it with `jobmesh dev --stop` before a reset")
        return 1
    if pid is not None and ENV_FILE.exists():
        _say(f"already running (pid {pid}); settings in {ENV_FILE}")
        return 0
    # Decided here too, so a refusal is said here and not only in the background log.
    if _prepare_state(reset) is None:
        return 1
    STATE.mkdir(exist_ok=True)
    ENV_FILE.unlink(missing_ok=True)
    with open(LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from jobmesh.client.cli import main; main({['dev', *([] if auth else ['--no-auth'])]!r})",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    started = time.monotonic()
    next_note = 2.0
    while not ENV_FILE.exists():
        if proc.poll() is not None:
            _say(f"the cluster exited with code {proc.returncode}; last lines of {LOG_FILE}:")
            print(LOG_FILE.read_text(errors="replace")[-3000:], file=sys.stderr)
            return 2
        if time.monotonic() - started > 120:
            _say(f"not ready after 120s; see {LOG_FILE}")
            return 2
        if time.monotonic() - started > next_note:
            _say(f"starting ... {time.monotonic() - started:.0f}s")
            next_note += 2.0
        time.sleep(0.1)
    _say(f"running in the background (pid {proc.pid}); settings in {ENV_FILE}; stop with `jobmesh dev --stop`")
    print(ENV_FILE.read_text(), end="")
    return 0


def stop(timeout: float = 60.0) -> int:
    """Stop a detached cluster and wait until it is gone."""
    pid = _running_pid()
    if pid is None:
        _say("no cluster is running here")
        ENV_FILE.unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _say("stopped")
            return 0
        time.sleep(0.1)
    _say(f"pid {pid} did not stop within {timeout}s; killing it")
    os.kill(pid, signal.SIGKILL)
    return 1
