"""``jobmesh provision`` and ``jobmesh auth issue``, added to the command line through the
``jobmesh.commands`` entry point.

Provisioning belongs to the runtime (bucket TTLs and stream limits come from the same
``JOBMESH_*`` settings the services read), so the command lives here and the client's
command line does not import the runtime. It reaches NATS at ``JOBMESH_NATS_URL``, as the
services do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import msgspec
import nats

from jobmesh.contract import permissions
from jobmesh.errors import InvalidSpec, Unavailable
from jobmesh.runtime import natsauth
from jobmesh.runtime.provisioning import forget_dispatch, kv_stream, kv_subject, provision
from jobmesh.runtime.settings import Settings


def register(subparsers: Any) -> None:
    """Add the ``provision`` subcommand.

    Args:
        subparsers: the ``jobmesh`` command line's subparsers action.
    """
    p = subparsers.add_parser(
        "provision", help="create missing streams and buckets, and bring existing streams to today's limits"
    )
    p.add_argument(
        "--services",
        action="store_true",
        help="also run each service's own part: the scheduler's and tracker's database tables and every "
        "shared durable consumer (needs JOBMESH_DATABASE_URL); what a deployment's one-shot provisioner runs",
    )
    p.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NODE_ID",
        help="also create this executor node's dispatch consumer (repeat for several): with NATS "
        "authentication on, an executor may read its durable but not create it",
    )
    p.add_argument(
        "--forget-node",
        action="append",
        default=[],
        metavar="NODE_ID",
        help="remove what this node, gone for good, left on NATS: its dispatch durable, its dispatch and "
        "cancel subjects and its allocation record (repeat for several). Refused while the node is "
        "registered or holds reservations. With NATS authentication on, the binder's reaper removes "
        "only the allocation record and its log names the nodes to forget",
    )
    p.set_defaults(fn=run)
    auth = subparsers.add_parser("auth", help="NATS credentials: one nkey per identity")
    verbs = auth.add_subparsers(dest="verb", required=True)
    issue = verbs.add_parser(
        "issue",
        help="write a seed file for every identity that has none yet in --dir, and the server's "
        "authorization block (auth.conf) for all of them",
    )
    issue.add_argument("--dir", required=True, type=Path, help="where the seed files and auth.conf go")
    issue.add_argument(
        "--node", action="append", default=[], metavar="NODE_ID", help="an executor node (repeat for several)"
    )
    issue.add_argument(
        "--edge-domain",
        metavar="DOMAIN",
        help="the hub's JetStream domain, for executors behind a leaf node (docs/nats-cluster.md): every "
        "executor's grants are also written in that domain's form, and the leaf link gets a key of its own "
        "(leaf-link.nk, and leaf-link.conf for the edge's remote). Remembered in --dir for later issues",
    )
    issue.add_argument("--json", action="store_true", help="print what was issued as JSON")
    issue.set_defaults(fn=run_issue)


async def run(args: argparse.Namespace) -> int:
    """Create every missing stream and bucket, and apply today's limits to existing streams.

    Args:
        args: the parsed command line (`--services`: each service's tables and durables too).

    Returns:
        0 once everything is provisioned.

    Raises:
        Unavailable: when NATS cannot be reached.
        InvalidSpec: when a ``JOBMESH_*`` variable does not parse.
    """
    # The operators' key when one is named (a dev cluster's dev.env names it beside the
    # client's): provisioning is the provisioner's, whatever key the shell holds besides.
    environ = dict(os.environ)
    admin = environ.get("JOBMESH_ADMIN_NKEY_FILE")
    if admin:
        environ.pop("JOBMESH_NATS_NKEY", None)
        environ.update({"JOBMESH_NATS_NKEY_FILE": admin, "JOBMESH_NATS_IDENTITY": "provisioner"})
    settings = Settings.from_env("provision", environ)
    try:
        nc = await nats.connect(
            servers=settings.nats_servers,
            **natsauth.connect_options(settings),
            connect_timeout=3,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.2,
            error_cb=_quiet,
        )
    except Exception as exc:
        raise Unavailable(f"cannot reach NATS at {settings.nats_url}: {type(exc).__name__} {exc}".rstrip()) from exc
    try:
        await provision(
            nc.jetstream(),
            node_ttl=settings.node_ttl_seconds,
            lease_ttl=settings.lease_ttl_seconds,
            update=True,
            replicas=settings.stream_replicas,
            result_retention=settings.result_retention_seconds,
        )
    finally:
        await nc.close()
    print(
        "jobmesh: streams and buckets are provisioned (existing streams updated to the current limits)", file=sys.stderr
    )
    if getattr(args, "services", False):
        for service in PROVISIONED_SERVICES:
            await _provision_service(service, environ)
        print(
            f"jobmesh: database tables and durable consumers are provisioned ({', '.join(PROVISIONED_SERVICES)})",
            file=sys.stderr,
        )
    for node in getattr(args, "node", []):
        await _provision_service("executor", {**environ, "JOBMESH_NODE_ID": node})
        print(f"jobmesh: the dispatch consumer of node {node} is provisioned", file=sys.stderr)
    forget = list(getattr(args, "forget_node", []))
    if forget:
        nc = await nats.connect(servers=settings.nats_servers, **natsauth.connect_options(settings), connect_timeout=3)
        try:
            for node in forget:
                had = await forget_node(nc.jetstream(), node)
                what = "its dispatch durable, dispatches and allocation record" if had else "its dispatches"
                print(f"jobmesh: node {node} is forgotten: removed {what}", file=sys.stderr)
        finally:
            await nc.close()
    return 0


async def forget_node(js: Any, node_id: str) -> bool:
    """Remove a gone node's dispatch durable, dispatches and allocation record.

    Args:
        js: the provisioner's JetStream context.
        node_id: the node.

    Returns:
        Whether it had a dispatch durable.

    Raises:
        InvalidSpec: the node is registered (its executor runs, or stopped less than the
            node TTL ago), or its allocation record holds reservations.
    """
    from nats.js.errors import KeyNotFoundError

    from jobmesh.contract import subjects
    from jobmesh.contract.messages.v1 import Allocation

    # What is purged is older than the checks below: a node that registers again right
    # after them keeps the dispatches bound to it since.
    last = (await js.stream_info(subjects.STREAM_DISPATCH)).state.last_seq
    registrations = await js.key_value(subjects.KV_NODES)
    try:
        entry = await registrations.get(node_id)
    except KeyNotFoundError:
        entry = None
    if entry is not None and entry.value:
        raise InvalidSpec(
            f"--forget-node: node {node_id} is registered (its executor runs, or stopped less than the node TTL ago): "
            "stop it and wait for its record to expire first",
        )
    allocations = await js.key_value(subjects.KV_ALLOC)
    try:
        record = await allocations.get(node_id)
    except KeyNotFoundError:
        record = None
    if record is not None and record.value:
        # A future hold (backfill) holds nothing yet; its job plans anew without the node.
        held = [r for r in msgspec.json.decode(record.value, type=Allocation).reservations.values() if not r.starts_at]
        if held:
            raise InvalidSpec(
                f"--forget-node: node {node_id} holds {len(held)} reservations: they are released as their attempts end",
            )
    # The record, and the delete marker a binder's reaper left of it: nothing of the node stays.
    await js.purge_stream(kv_stream(subjects.KV_ALLOC), subject=kv_subject(subjects.KV_ALLOC, node_id))
    return await forget_dispatch(js, node_id, up_to=last)


# The services with something to prepare before they start: tables (scheduler, tracker)
# and shared durable consumers. An executor's consumer is its own node's, made at its start.
PROVISIONED_SERVICES = ("trigger", "scheduler", "binder", "tracker")


async def _provision_service(service: str, env: dict[str, str] | None = None) -> None:
    """Run ``python -m jobmesh.<service> --provision`` (the service's own code knows its
    tables and durables; the runtime does not import the services).

    Raises:
        Unavailable: the service's provisioning failed; its last output lines are quoted.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"jobmesh.{service}",
        "--provision",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # It runs with this command's credentials: the provisioner's.
        env={**(os.environ if env is None else env), "JOBMESH_NATS_IDENTITY": "provisioner"},
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-5:]
        raise Unavailable(f"provisioning the {service} failed (exit {proc.returncode}): " + " | ".join(tail))


async def _quiet(exc: Exception) -> None:
    # nats-py logs connection errors itself; the one Unavailable line says it better.
    return None


AUTH_FILE = "auth.conf"
EXECUTOR_PREFIX = "executor-"
# With executors behind a leaf node: the hub's JetStream domain (kept for later issues),
# the leaf link's own seed, and the line an edge server's remote includes to sign with it.
EDGE_DOMAIN_FILE = "edge-domain"
LINK_SEED = "leaf-link.nk"
LINK_CONF = "leaf-link.conf"
_DOMAIN = re.compile(r"[A-Za-z0-9_-]+")


def identities(nodes: list[str], partitions: int, edge_domain: str | None = None) -> dict[str, permissions.Permissions]:
    """Every identity of a cluster with these executor nodes, by name (an executor's grants
    also in ``edge_domain``'s form, when executors connect through a leaf node)."""
    found = {"provisioner": permissions.provisioner()}
    for name in ("trigger", "scheduler", "binder", "tracker"):
        found[name] = permissions.service(name, partitions=partitions)
    for node in nodes:
        found[permissions.executor_identity(node)] = permissions.executor(node, domain=edge_domain)
    found["client"] = permissions.client()
    found["integrator"] = permissions.integrator()
    return found


def issue(directory: Path, nodes: list[str], partitions: int, edge_domain: str | None = None) -> list[dict[str, str]]:
    """Write a seed for each identity that has none in ``directory``, and ``auth.conf``.

    Nodes whose seed is already there stay in the block, so issuing a key for a new node
    keeps every earlier one; nothing existing is overwritten.

    Args:
        edge_domain: the hub's JetStream domain when executors connect through a leaf node:
            their grants are written in its form too, and the leaf link gets its own key
            (:func:`link_key`). Kept in the directory: a later issue without it keeps it.

    Returns:
        One row per identity: its name, public key, seed file and whether it is new.

    Raises:
        InvalidSpec: a node id or the domain is not one subject token, or the domain differs
            from the one issued before.
    """
    for node in nodes:
        if not node or any(c in node for c in ".*> \t"):
            raise InvalidSpec(f"--node: {node!r} is not a node id (one subject token: no dots, wildcards or spaces)")
    if edge_domain is not None and not _DOMAIN.fullmatch(edge_domain):
        raise InvalidSpec(f"--edge-domain: {edge_domain!r} is not a JetStream domain (letters, digits, - and _)")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    domain_file = directory / EDGE_DOMAIN_FILE
    kept = domain_file.read_text().strip() if domain_file.exists() else None
    if kept is not None and not _DOMAIN.fullmatch(kept):
        raise InvalidSpec(f"{domain_file} holds {kept!r}, not a JetStream domain: remove it or write the hub's domain")
    if edge_domain is not None and kept is not None and edge_domain != kept:
        raise InvalidSpec(f"--edge-domain: {edge_domain!r}, but the keys in {directory} were issued for {kept!r}")
    edge_domain = edge_domain or kept
    known = sorted(p.stem.removeprefix(EXECUTOR_PREFIX) for p in directory.glob(f"{EXECUTOR_PREFIX}*.nk"))
    everyone = identities(sorted(set(known) | set(nodes)), partitions, edge_domain)
    rows, users = [], {}
    for name, grants in everyone.items():
        path = directory / f"{name}.nk"
        new = not path.exists()
        if new:
            natsauth.write_seed(path, natsauth.new_seed())
        key = natsauth.public_key(natsauth.read_seed(path))
        users[key] = grants
        rows.append({"identity": name, "public_key": key, "seed_file": str(path), "new": "yes" if new else "no"})
    (directory / AUTH_FILE).write_text(
        "# Written by `jobmesh auth issue`: public keys only, no secret. Include it in the\n"
        "# nats-server configuration and reload the server after each issue.\n" + natsauth.authorization_block(users)
    )
    if edge_domain is not None:
        domain_file.write_text(edge_domain + "\n")
        rows.append(link_key(directory))
    return rows


def link_key(directory: Path) -> dict[str, str]:
    """The leaf link's own key: its seed (``leaf-link.nk``, made once) and the ``nkey:`` line
    an edge server's remote includes (``leaf-link.conf``), both readable by their owner only.
    The hub's ``leafnodes`` block accepts a link signed by it alone; it carries no grants
    (the edge checks its own clients).

    Returns:
        Its row, as :func:`issue` lists identities.
    """
    seed_file = directory / LINK_SEED
    new = not seed_file.exists()
    if new:
        natsauth.write_seed(seed_file, natsauth.new_seed())
    seed = natsauth.read_seed(seed_file)
    fd = os.open(directory / LINK_CONF, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through open(): narrow it first
    with os.fdopen(fd, "w") as out:
        out.write(f'nkey: "{seed.decode()}"\n')
    key = natsauth.public_key(seed)
    return {"identity": "leaf-link", "public_key": key, "seed_file": str(seed_file), "new": "yes" if new else "no"}


async def run_issue(args: argparse.Namespace) -> int:
    """``jobmesh auth issue``: seeds for new identities and the server's authorization block.

    Returns:
        0 once the files are written.
    """
    settings = Settings.from_env("provision")
    rows = issue(args.dir, args.node, settings.partitions, args.edge_domain)
    if args.json:
        print(json.dumps({"auth_file": str(args.dir / AUTH_FILE), "identities": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("identity", "public key", "seed file", "new")
    for row in rows:
        table.add_row(row["identity"], row["public_key"], row["seed_file"], row["new"])
    Console(stderr=True).print(table)
    print(
        f"jobmesh: {args.dir / AUTH_FILE} holds the authorization block: include it in nats-server's configuration "
        '(include "auth.conf") and reload the server (nats-server --signal reload, or SIGHUP). Give each process '
        "its own seed file through JOBMESH_NATS_NKEY_FILE.",
        file=sys.stderr,
    )
    link = next((row for row in rows if row["identity"] == "leaf-link"), None)
    if link is not None:
        print(
            f"jobmesh: the leaf link: the hub's leafnodes block takes it alone "
            f'(authorization {{ nkey: "{link["public_key"]}" }}), and the edge server\'s remote includes '
            f"{args.dir / LINK_CONF} (its seed). The edge server includes auth.conf too (docs/nats-cluster.md).",
            file=sys.stderr,
        )
    return 0
