"""``jobmesh provision``, added to the command line through the ``jobmesh.commands`` entry point.

Provisioning belongs to the runtime (bucket TTLs and stream limits come from the same
``JOBMESH_*`` settings the services read), so the command lives here and the client's
command line does not import the runtime. It reaches NATS at ``JOBMESH_NATS_URL``, as the
services do.
"""

from __future__ import annotations

import argparse
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
    p.set_defaults(fn=run)


async def run(args: argparse.Namespace) -> int:
    """Create every missing stream and bucket, and apply today's limits to existing streams.

    Args:
        args: the parsed command line (no options).

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
    return 0


async def _quiet(exc: Exception) -> None:
    # nats-py logs connection errors itself; the one Unavailable line says it better.
    return None
