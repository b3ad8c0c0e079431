"""``jobmesh provision``, added to the command line through the ``jobmesh.commands`` entry point.

Provisioning belongs to the runtime (bucket TTLs and stream limits come from the same
``JOBMESH_*`` settings the services read), so the command lives here and the client's
command line does not import the runtime. It reaches NATS at ``JOBMESH_NATS_URL``, as the
services do.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import nats

from jobmesh.errors import Unavailable
from jobmesh.runtime.provisioning import provision
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
    p.set_defaults(fn=run)


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
    settings = Settings.from_env("provision")
    try:
        nc = await nats.connect(
            servers=settings.nats_servers,
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
            await _provision_service(service)
        print(
            f"jobmesh: database tables and durable consumers are provisioned ({', '.join(PROVISIONED_SERVICES)})",
            file=sys.stderr,
        )
    return 0


# The services with something to prepare before they start: tables (scheduler, tracker)
# and shared durable consumers. An executor's consumer is its own node's, made at its start.
PROVISIONED_SERVICES = ("trigger", "scheduler", "binder", "tracker")


async def _provision_service(service: str) -> None:
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
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-5:]
        raise Unavailable(f"provisioning the {service} failed (exit {proc.returncode}): " + " | ".join(tail))


async def _quiet(exc: Exception) -> None:
    # nats-py logs connection errors itself; the one Unavailable line says it better.
    return None
