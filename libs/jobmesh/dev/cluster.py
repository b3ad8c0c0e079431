"""Start the five services as separate processes on one machine.

Used by ``jobmesh dev``, the end-to-end tests and the benchmark, so all three run the
system the same way: real processes, real NATS, real Postgres.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats

from jobmesh.client.client import server_urls
from jobmesh.contract import permissions, subjects
from jobmesh.contract.messages.v1 import HealthReply
from jobmesh.contract.subjects import SERVICES
from jobmesh.errors import Unavailable


@dataclass
class ServiceProcess:
    """One running service process and where its log goes."""

    name: str
    proc: subprocess.Popen
    log_path: Path


@dataclass
class LocalCluster:
    """The five services (or a subset) as child processes.

    Attributes:
        nats_url: the NATS server every service connects to.
        database_url: Postgres for the scheduler and tracker.
        work_dir: logs go to ``work_dir/logs``; executors run jobs under ``work_dir/nodes``.
        env: extra environment for every service (``JOBMESH_*`` settings, and the
            ``OTEL_*`` variables that make the services export traces). The services log
            text lines (``JOBMESH_LOG_FORMAT=text``) unless this or the caller's
            environment says otherwise.
        credentials: the directory ``jobmesh auth issue`` wrote (NATS authentication on):
            each process connects with its own identity's seed (``<identity>.nk``), and
            the cluster's own health checks with the client's.
    """

    nats_url: str
    database_url: str
    work_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[ServiceProcess] = field(default_factory=list)
    credentials: Path | None = None
    # Called with a process's name and environment just before it starts (credentials on):
    # what its identity may not do itself (its durables, a new node's key) is done there.
    prepare: Callable[[str, dict[str, str]], None] | None = None

    def seed_file(self, identity: str) -> Path:
        """The seed file of ``identity`` in :attr:`credentials`.

        Raises:
            Unavailable: no credentials, or none issued for that identity.
        """
        if self.credentials is None:
            raise Unavailable("this cluster runs without NATS credentials")
        path = self.credentials / f"{identity}.nk"
        if not path.exists():
            raise Unavailable(f"no seed for {identity} in {self.credentials}: run `jobmesh auth issue` for it")
        return path

    def connect_options(self) -> dict[str, object]:
        """``nats.connect`` arguments for the harness's own connections (the client's)."""
        if self.credentials is None:
            return {}
        return {"nkeys_seed": str(self.seed_file("client")), "inbox_prefix": permissions.inbox_of("client")}

    def start_service(self, name: str, extra_env: dict[str, str] | None = None, tag: str = "") -> ServiceProcess:
        """Start one service process (``python -m jobmesh.<name>``)."""
        logs = self.work_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            {
                "JOBMESH_NATS_URL": self.nats_url,
                "JOBMESH_DATABASE_URL": self.database_url,
                "JOBMESH_WORK_DIR": str(self.work_dir / "nodes"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env)
        env.update(extra_env or {})
        if self.credentials is not None and self.prepare is not None:
            self.prepare(name, env)
        if self.credentials is not None:
            given = {**self.env, **(extra_env or {})}
            for variable in ("JOBMESH_NATS_NKEY", "JOBMESH_NATS_IDENTITY", "JOBMESH_ADMIN_NKEY_FILE"):
                if variable not in given:
                    env.pop(variable, None)  # the caller's shell's, not this process's
            node = env.get("JOBMESH_NODE_ID", "")
            # The web API is a client of the cluster, like the CLI: it has the client's identity.
            identity = f"executor-{node}" if name == "executor" and node else "client" if name == "web" else name
            if "JOBMESH_NATS_NKEY_FILE" not in {**self.env, **(extra_env or {})}:
                # Its own identity's, not one the caller's environment happens to carry.
                env["JOBMESH_NATS_NKEY_FILE"] = str(self.seed_file(identity))
        # Human-readable lines in a developer's or a test's logs; production's default is JSON.
        env.setdefault("JOBMESH_LOG_FORMAT", "text")
        log_path = logs / f"{name}{tag}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"jobmesh.{name}"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        sp = ServiceProcess(name, proc, log_path)
        self.procs.append(sp)
        return sp

    def start(self, services: tuple[str, ...] = SERVICES) -> LocalCluster:
        """Start each named service once."""
        for name in services:
            self.start_service(name)
        return self

    async def wait_healthy(self, services: tuple[str, ...] = SERVICES, timeout: float = 60.0) -> None:
        """Wait until every named service answers its health check with ok.

        Raises:
            Unavailable: on timeout or when a process exits; the message names the service
                and points at its log.
        """
        nc = await nats.connect(server_urls(self.nats_url), connect_timeout=5, **self.connect_options())
        try:
            deadline = time.monotonic() + timeout
            pending = list(services)
            while pending:
                self.check_alive()
                name = pending[0]
                try:
                    reply = await nc.request(subjects.health(name), b"{}", timeout=1.0)
                    health = msgspec.json.decode(reply.data, type=HealthReply)
                    if health.ok:
                        pending.pop(0)
                        continue
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError, msgspec.DecodeError):
                    pass
                if time.monotonic() > deadline:
                    raise Unavailable(f"service {name} not healthy within {timeout}s; see {self.log_of(name)}")
                await asyncio.sleep(0.1)
        finally:
            await nc.close()

    def check_alive(self) -> None:
        """Raise if any started service process has exited."""
        for sp in self.procs:
            code = sp.proc.poll()
            if code is not None:
                tail = sp.log_path.read_text(errors="replace")[-2000:] if sp.log_path.exists() else ""
                raise Unavailable(f"service {sp.name} exited with code {code}; log {sp.log_path}:\n{tail}")

    def log_of(self, name: str) -> Path:
        for sp in self.procs:
            if sp.name == name:
                return sp.log_path
        return self.work_dir / "logs" / f"{name}.log"

    def kill(self, name: str) -> None:
        """SIGKILL every process of service ``name`` (fault tests)."""
        for sp in [sp for sp in self.procs if sp.name == name]:
            sp.proc.kill()
            sp.proc.wait(10)
            self.procs.remove(sp)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every process, wait for the graceful drain, then SIGKILL what is left."""
        for sp in self.procs:
            if sp.proc.poll() is None:
                sp.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for sp in self.procs:
            try:
                sp.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                sp.proc.kill()
                sp.proc.wait(5)
        self.procs.clear()
