"""``jobmesh dev``, added to the command line through the ``jobmesh.commands`` entry point.

The client's command line imports nothing from the dev tooling; this module registers the
subcommand, and imports the cluster machinery only when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``dev`` subcommand.

    Args:
        subparsers: the ``jobmesh`` command line's subparsers action.
    """
    p = subparsers.add_parser(
        "dev", help="run a local cluster: nats-server, Postgres, the five services and the web dashboard"
    )
    p.add_argument("--detach", action="store_true", help="start in the background; return once healthy")
    p.add_argument("--stop", action="store_true", help="stop a detached cluster")
    p.add_argument("--demo", action="store_true", help="run a few demo jobs and a demo workflow once healthy")
    p.add_argument(
        "--auth",
        action="store_true",
        help="NATS authentication on (the default): one key per identity in .jobmesh/credentials, each "
        "process within its permissions (docs/operations.md, Security)",
    )
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="run NATS without authentication: any process that reaches it may publish anything",
    )
    p.add_argument(
        "--add-node",
        metavar="NODE_ID",
        help="let another executor join the running cluster: issue its NATS key, make the server take it "
        "and create its dispatch consumer; prints the key file for its JOBMESH_NATS_NKEY_FILE",
    )
    p.add_argument(
        "--reset",
        action="store_true",
        help="remove .jobmesh/ (NATS store, embedded Postgres, logs) and start afresh",
    )
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    """Run, start in the background, or stop a local cluster (a sync command: it owns its loop).

    Args:
        args: the parsed command line (``--detach``, ``--stop``, ``--demo``, ``--reset``).

    Returns:
        The exit code: 0 ok, 1 already running or did not stop, 2 the cluster did not come up.
    """
    from jobmesh.dev import devcluster

    if args.stop:
        return devcluster.stop()
    if args.add_node:
        return devcluster.add_node(args.add_node)
    if args.detach:
        code = devcluster.detach(reset=args.reset, auth=not args.no_auth)
        if code == 0 and args.demo:
            import uvloop

            from jobmesh.client.client import read_env_file, resolve_nats_url
            from jobmesh.dev.demo import run_demo

            web_url = read_env_file(devcluster.ENV_FILE).get("JOBMESH_WEB_URL", "")
            uvloop.run(run_demo(resolve_nats_url(), web_url=web_url))
        return code
    return devcluster.foreground(demo=args.demo, reset=args.reset, auth=not args.no_auth)
