"""``jobmesh dev``: a whole cluster on one machine, from nothing.

Starts a nats-server from the pinned wheel on a port of its own, Postgres
(``JOBMESH_DATABASE_URL`` when set, else an embedded one from the ``pgserver`` wheel) and the
five services as separate processes. State lives in ``.jobmesh/`` under the current
directory; ``.jobmesh/dev.env`` tells other commands where the cluster is.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jobmesh.contract.subjects import SERVICES
from jobmesh.dev.cluster import LocalCluster
from jobmesh.errors import Unavailable
from jobmesh.dev.servers import NatsServer, embedded_postgres

STATE = Path(".jobmesh")
ENV_FILE = STATE / "dev.env"
PID_FILE = STATE / "dev.pid"
LOG_FILE = STATE / "dev.log"


def _say(message: str) -> None:
    print(f"jobmesh dev: {message}", file=sys.stderr, flush=True)


def _running_pid() -> int | None:
    try:
        pid = int(PID_FILE.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def foreground(demo: bool = False) -> int:
    """Run the cluster until Ctrl-C or SIGTERM, then stop everything cleanly."""
    if _running_pid() not in (None, os.getpid()):
        _say(f"a cluster is already running (pid {_running_pid()}); `jobmesh dev --stop` stops it")
        return 1
    STATE.mkdir(exist_ok=True)
    ENV_FILE.unlink(missing_ok=True)
    PID_FILE.write_text(str(os.getpid()))
    stop = {"now": False}

    def on_signal(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    nats_server = NatsServer(STATE / "nats", log_file=STATE / "nats.log").start()
    _say(f"nats-server on {nats_server.url} (store {STATE / 'nats'})")
    pg = None
    database_url = os.environ.get("JOBMESH_DATABASE_URL")
    if not database_url:
        pg = embedded_postgres((STATE / "pg").resolve())
        database_url = pg.get_uri()
        _say(f"embedded Postgres at {database_url}")
    cluster = LocalCluster(nats_server.url, database_url, STATE.resolve())
    try:
        cluster.start()
        _say("starting services: " + ", ".join(SERVICES))
        asyncio.run(_wait_healthy_with_progress(cluster))
        ENV_FILE.write_text(
            f"JOBMESH_NATS_URL={nats_server.url}\nJOBMESH_DATABASE_URL={database_url}\nJOBMESH_DEV_PID={os.getpid()}\n"
        )
        _say(f"ready. NATS {nats_server.url}; settings in {ENV_FILE}; logs in {STATE / 'logs'}/")
        if demo:
            from jobmesh.dev.demo import run_demo

            asyncio.run(run_demo(nats_server.url))
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
        _say("stopped")


async def _wait_healthy_with_progress(cluster: LocalCluster, timeout: float = 90.0) -> None:
    started = time.monotonic()
    waiter = asyncio.ensure_future(cluster.wait_healthy(timeout=timeout))
    while not waiter.done():
        await asyncio.wait([waiter], timeout=2.0)
        if not waiter.done():
            _say(f"waiting for services to report healthy ... {time.monotonic() - started:.0f}s")
    waiter.result()


def detach() -> int:
    """Start the cluster in the background; return once every service is healthy."""
    pid = _running_pid()
    if pid is not None and ENV_FILE.exists():
        _say(f"already running (pid {pid}); settings in {ENV_FILE}")
        return 0
    STATE.mkdir(exist_ok=True)
    ENV_FILE.unlink(missing_ok=True)
    with open(LOG_FILE, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from jobmesh.client.cli import main; main(['dev'])"],
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
