"""NATS authentication for the whole suite: the module server knows only jobmesh's identities
(``jobmesh auth issue``) and the tests' own administrator.

Every service process a test cluster starts on the module server connects with its own
identity's seed, as in production: the scheduler as ``scheduler``, an executor as
``executor-<node>``, the web API as ``client``. Before each process starts, what that
identity may not do itself is done as the provisioner, with the process's own environment:
the service's durables and tables (``--provision``), a new node's key (the server reloads
its authorization) and dispatch durable.

The tests' own connections (raw nats-py, the SDK client, the CLI, in-process runtimes and
executors started by hand) use :attr:`AuthNats.url`, which carries the password of a test
administrator allowed everything: a test stands for the operator and the integrator at
once, and asserts on what the services under their own identities did.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from jobmesh.dev.devcluster import wait_key_accepted
from jobmesh.dev.servers import NatsServer
from jobmesh.errors import InvalidSpec
from jobmesh.runtime.commands import AUTH_FILE, issue
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import Tracing

# The scheduler's identity is issued for this many partitions (its durables, its requests).
ISSUED_PARTITIONS = 16
ADMIN_USER = "test-admin"
PROVISIONED = ("trigger", "scheduler", "binder", "tracker")


def write_auth(directory: Path, nodes: list[str], password: str) -> None:
    """Issue seeds for every identity (and ``nodes``' executors) and write ``auth.conf``
    with the test administrator's password entry added."""
    issue(directory, nodes, ISSUED_PARTITIONS)
    path = directory / AUTH_FILE
    text = path.read_text()
    entry = (
        f'    {{ user: "{ADMIN_USER}", password: "{password}", '
        'permissions: { publish: { allow: [">"] }, subscribe: { allow: [">"] } } }'
    )
    end = "\n  ]\n}\n"
    assert text.endswith(end), "auth.conf changed shape: the test administrator has no place in it"
    path.write_text(text[: -len(end)] + "\n" + entry + end)


def run_blocking(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to its end on a loop of its own, in a thread: a process starts from
    synchronous code that may itself run inside the test's event loop."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="cluster-prepare")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


class AuthNats:
    """The module's nats-server with authentication on.

    Attributes:
        server: the nats-server process.
        credentials: the seeds and ``auth.conf`` of every identity.
        plain_url: the server's address without credentials (what services get).
        url: the address with the test administrator's password (the tests' own).
    """

    def __init__(self, store: Path, sync_always: bool = False) -> None:
        self.credentials = store / "credentials"
        self._password = secrets.token_hex(16)
        self._sync_always = sync_always
        write_auth(self.credentials, [], self._password)
        self.server = NatsServer(
            store / "data", log_file=store / "nats.log", sync_always=sync_always, auth_file=self.credentials / AUTH_FILE
        )
        self._nodes: set[str] = set()
        self._lock = threading.Lock()

    def start(self) -> AuthNats:
        self.server.start()
        return self

    def stop(self, kill: bool = False) -> None:
        self.server.stop(kill=kill)

    def restart(self, kill: bool = False) -> AuthNats:
        """Stop the server (SIGKILL when ``kill``) and start it again on the same port and
        store, with the same keys: a NATS outage as the services live through it."""
        old = self.server
        old.stop(kill=kill)
        self.server = NatsServer(
            old.store_dir,
            port=old.port,
            log_file=old.log_file,
            sync_always=self._sync_always,
            auth_file=self.credentials / AUTH_FILE,
        ).start()
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def plain_url(self) -> str:
        return self.server.url

    @property
    def url(self) -> str:
        return self.server.url.replace("nats://", f"nats://{ADMIN_USER}:{self._password}@", 1)

    @property
    def log_file(self) -> Path | None:
        return self.server.log_file

    # --- before a cluster process starts ---------------------------------------------------
    def preparer(self, database_url: str) -> Callable[[str, dict[str, str]], None]:
        """The ``LocalCluster.prepare`` hook of a cluster on this server.

        Args:
            database_url: the module's database itself. A cluster may reach it through a
                proxy that runs on the test's own event loop, which is blocked while a
                process is prepared, so tables are made on the database directly.
        """

        def prepare(name: str, env: dict[str, str]) -> None:
            self.prepare(name, env, database_url)

        return prepare

    def prepare(self, name: str, env: dict[str, str], database_url: str | None = None) -> None:
        """Do, as the provisioner, what process ``name`` may not do with its identity;
        ``env`` is its environment, completed here with the node id an executor connects as."""
        with self._lock:
            run_blocking(self._prepare(name, env, database_url))

    async def _prepare(self, name: str, env: dict[str, str], database_url: str | None) -> None:
        as_provisioner = {
            **env,
            **({"JOBMESH_DATABASE_URL": database_url} if database_url else {}),
            "JOBMESH_NATS_URL": self.plain_url,
            "JOBMESH_NATS_NKEY_FILE": str(self.credentials / "provisioner.nk"),
            "JOBMESH_NATS_IDENTITY": "provisioner",
        }
        as_provisioner.pop("JOBMESH_NATS_NKEY", None)
        if name == "executor":
            from jobmesh.executor.node import read_machine_facts, resolve_node_id
            from jobmesh.executor.service import provision_main

            settings = Settings.from_env("executor", as_provisioner)
            node = resolve_node_id(settings, read_machine_facts())
            env["JOBMESH_NODE_ID"] = as_provisioner["JOBMESH_NODE_ID"] = node
            if node not in self._nodes:
                write_auth(self.credentials, sorted(self._nodes | {node}), self._password)
                self.server.reload()
                seed = self.credentials / f"executor-{node}.nk"
                await wait_key_accepted(self.plain_url, seed, node, timeout=15.0)
                self._nodes.add(node)
            await provision_main(Settings.from_env("executor", as_provisioner), Tracing.off())
        elif name in PROVISIONED:
            settings = Settings.from_env(name, as_provisioner)
            if settings.partitions > ISSUED_PARTITIONS:
                raise InvalidSpec(
                    f"JOBMESH_PARTITIONS={settings.partitions}: the suite's scheduler identity is issued for "
                    f"{ISSUED_PARTITIONS} (tests/natsauth_fixtures.py ISSUED_PARTITIONS)"
                )
            await _service_provision(name)(settings, Tracing.off())


def _service_provision(name: str):
    if name == "trigger":
        from jobmesh.trigger.service import provision_main
    elif name == "scheduler":
        from jobmesh.scheduler.service import provision_main
    elif name == "binder":
        from jobmesh.binder.service import provision_main
    else:
        from jobmesh.tracker.service import provision_main
    return provision_main
