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

:class:`AuthNatsCluster` does the same for a three-node cluster (``NatsCluster``): every
member includes the one ``auth.conf`` and is reloaded with each new key, so a service that
loses its server reconnects to another as itself. ``AuthNats(leafnodes=True)`` is a hub
whose leaf node port takes only the link's own key, and :meth:`AuthNats.edge` an edge
server that signs its link with it and lets in jobmesh's identities only: an executor
there connects with its own key, its grants written in the hub domain's form too.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from jobmesh.dev.devcluster import wait_key_accepted
from jobmesh.dev.servers import HUB_DOMAIN, NatsCluster, NatsServer, edge_server, free_port
from jobmesh.errors import InvalidSpec
from jobmesh.runtime.commands import AUTH_FILE, LINK_CONF, issue, link_key
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import Tracing

# The scheduler's identity is issued for this many partitions (its durables, its requests).
ISSUED_PARTITIONS = 16
ADMIN_USER = "test-admin"
PROVISIONED = ("trigger", "scheduler", "binder", "tracker")


def write_auth(directory: Path, nodes: list[str], password: str, domain: str | None = None) -> None:
    """Issue seeds for every identity (and ``nodes``' executors) and write ``auth.conf``
    with the test administrator's password entry added.

    Args:
        domain: the hub's JetStream domain when executors connect to an edge server: issued
            as ``jobmesh auth issue --edge-domain`` does (their grants in that form too, and
            the leaf link's own key).
    """
    issue(directory, nodes, ISSUED_PARTITIONS, domain)
    path = directory / AUTH_FILE
    text = path.read_text()
    entry = (
        f'    {{ user: "{ADMIN_USER}", password: "{password}", '
        'permissions: { publish: { allow: [">"] }, subscribe: { allow: [">"] } } }'
    )
    end = "\n  ]\n}\n"
    assert text.endswith(end), "auth.conf changed shape: the test administrator has no place in it"
    path.write_text(text[: -len(end)] + "\n" + entry + end)


def write_link_key(directory: Path) -> str:
    """The public key a hub requires of the leaf link (``commands.link_key``)."""
    return link_key(directory)["public_key"]


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


class AuthBase:
    """The identities' seeds and ``auth.conf`` for NATS servers that all include it, the
    test administrator's password, and what is done as the provisioner before a process
    starts. :class:`AuthNats` (one server) and :class:`AuthNatsCluster` (a cluster) say
    which servers those are.

    Attributes:
        credentials: the seeds and ``auth.conf`` of every identity.
    """

    def __init__(self, credentials: Path, domain: str | None = None) -> None:
        self.credentials = credentials
        self._password = secrets.token_hex(16)
        self._domain = domain
        write_auth(self.credentials, [], self._password, domain)
        self._nodes: set[str] = set()
        self._lock = threading.Lock()

    @property
    def auth_file(self) -> Path:
        return self.credentials / AUTH_FILE

    @property
    def plain_url(self) -> str:
        """Where services and the provisioner connect, without credentials."""
        raise NotImplementedError

    def key_servers(self) -> list[NatsServer]:
        """Every server a process may connect to with its key: each must take a new one."""
        raise NotImplementedError

    def reload(self) -> None:
        """Make every running server of :meth:`key_servers` read ``auth.conf`` again."""
        raise NotImplementedError

    def admin_url(self, url: str) -> str:
        """``url`` (one server's) with the test administrator's password."""
        return url.replace("nats://", f"nats://{ADMIN_USER}:{self._password}@", 1)

    def as_provisioner(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with the provisioner's key instead of any other (``jobmesh provision``)."""
        provisioner = {
            **env,
            "JOBMESH_NATS_URL": self.plain_url,
            "JOBMESH_NATS_NKEY_FILE": str(self.credentials / "provisioner.nk"),
            "JOBMESH_NATS_IDENTITY": "provisioner",
        }
        provisioner.pop("JOBMESH_NATS_NKEY", None)
        return provisioner

    # --- before a cluster process starts ---------------------------------------------------
    def preparer(self, database_url: str) -> Callable[[str, dict[str, str]], None]:
        """The ``LocalCluster.prepare`` hook of a cluster on these servers.

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
        as_provisioner = self.as_provisioner(
            {**env, **({"JOBMESH_DATABASE_URL": database_url} if database_url else {})}
        )
        if name == "executor":
            from jobmesh.executor.node import read_machine_facts, resolve_node_id
            from jobmesh.executor.service import provision_main

            settings = Settings.from_env("executor", as_provisioner)
            node = resolve_node_id(settings, read_machine_facts())
            env["JOBMESH_NODE_ID"] = as_provisioner["JOBMESH_NODE_ID"] = node
            if node not in self._nodes:
                write_auth(self.credentials, sorted(self._nodes | {node}), self._password, self._domain)
                await self._take_key(node)
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

    async def _take_key(self, node: str) -> None:
        """Reload every running server that must know ``node``'s new key, and wait until
        each lets it in: its executor may connect to any of them (a stopped one reads the
        file when it starts)."""
        self.reload()
        seed = self.credentials / f"executor-{node}.nk"
        for server in [server for server in self.key_servers() if server.running()]:
            await wait_key_accepted(server.url, seed, node, timeout=15.0)


class AuthNats(AuthBase):
    """The module's nats-server with authentication on.

    With ``leafnodes`` it is a hub (JetStream domain ``HUB_DOMAIN``) whose leaf node port
    takes only the link key's signature (``write_link_key``); :meth:`edge` makes an edge
    server linked to it with that key, whose clients connect with their own keys. The
    executors' grants are then issued in the hub domain's form too, which they need at
    the edge (``permissions.in_domain``).

    Attributes:
        server: the nats-server process.
        edges: the edge servers linked to it (:meth:`edge`).
        credentials: the seeds and ``auth.conf`` of every identity.
        plain_url: the server's address without credentials (what services get).
        url: the address with the test administrator's password (the tests' own).
    """

    def __init__(self, store: Path, sync_always: bool = False, *, leafnodes: bool = False) -> None:
        super().__init__(store / "credentials", HUB_DOMAIN if leafnodes else None)
        self._sync_always = sync_always
        self.server = NatsServer(
            store / "data",
            log_file=store / "nats.log",
            sync_always=sync_always,
            auth_file=self.auth_file,
            leafnode_port=free_port() if leafnodes else None,
            js_domain=HUB_DOMAIN if leafnodes else None,
            leafnode_nkey=write_link_key(self.credentials) if leafnodes else None,
        )
        self.edges: list[NatsServer] = []

    def start(self) -> AuthNats:
        self.server.start()
        return self

    def stop(self, kill: bool = False) -> None:
        self.server.stop(kill=kill)

    def restart(self, kill: bool = False) -> AuthNats:
        """Stop the server (SIGKILL when ``kill``) and start it again on the same ports and
        store, with the same keys: a NATS outage as the services live through it."""
        old = self.server
        old.stop(kill=kill)
        self.server = NatsServer(
            old.store_dir,
            port=old.port,
            log_file=old.log_file,
            sync_always=self._sync_always,
            auth_file=self.auth_file,
            leafnode_port=old.leafnode_port,
            js_domain=old.js_domain,
            leafnode_nkey=old.leafnode_nkey,
        ).start()
        return self

    def edge(self, store: Path) -> NatsServer:
        """An edge server (``edge_server``, not started) linked to this hub with the link's
        key. It includes the same ``auth.conf`` and takes each new key with the hub."""
        server = edge_server(
            store,
            [self.server.leafnode_url],
            log_file=store / "nats.log",
            auth_file=self.auth_file,
            leaf_credentials=self.credentials / LINK_CONF,
        )
        self.edges.append(server)
        return server

    def key_servers(self) -> list[NatsServer]:
        return [self.server, *self.edges]

    def reload(self) -> None:
        self.server.reload()
        for edge in self.edges:
            if edge.running():
                edge.reload()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def plain_url(self) -> str:
        return self.server.url

    @property
    def url(self) -> str:
        return self.admin_url(self.server.url)

    @property
    def log_file(self) -> Path | None:
        return self.server.log_file


class AuthNatsCluster(AuthBase):
    """A three-node nats-server cluster (``NatsCluster``, R3 streams) with authentication
    on: every member includes the same ``auth.conf`` and is reloaded with each new key, so
    a process that loses its server reconnects to another with the same identity. The
    routes between the members stay unauthenticated: they listen on loopback only.

    Attributes:
        cluster: the members.
        plain_url: every member's address, comma-separated (``JOBMESH_NATS_URL``).
        urls: every member's address with the administrator's password (nats-py's list).
    """

    def __init__(self, root: Path, size: int = 3) -> None:
        super().__init__(root / "credentials")
        self.cluster = NatsCluster(root / "servers", size=size, auth_file=self.auth_file)

    def start(self) -> AuthNatsCluster:
        self.cluster.start()
        return self

    def stop(self) -> None:
        self.cluster.stop()

    def key_servers(self) -> list[NatsServer]:
        return list(self.cluster.servers)

    def reload(self) -> None:
        self.cluster.reload()

    @property
    def plain_url(self) -> str:
        return self.cluster.url

    @property
    def urls(self) -> list[str]:
        return [self.admin_url(url) for url in self.cluster.urls]

    def url_of(self, server: NatsServer) -> str:
        """One member's address with the administrator's password."""
        return self.admin_url(server.url)


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
