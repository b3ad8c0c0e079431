"""``jobmesh web``, added to the command line through the ``jobmesh.commands`` entry point.

It imports the server (Starlette, uvicorn) only when the command runs, so the rest of the
command line stays as quick to start as before.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from jobmesh.web.auth import DEFAULT_LISTEN, OPEN_ENV, TOKEN_ENV

LISTEN_ENV = "JOBMESH_WEB_LISTEN"


def register(subparsers: Any) -> None:
    """Add the ``web`` subcommand.

    Args:
        subparsers: the ``jobmesh`` command line's subparsers action.
    """
    p = subparsers.add_parser("web", help="serve the HTTP API and the live web dashboard")
    p.add_argument(
        "--listen",
        default=None,
        metavar="HOST:PORT",
        help=f"where to listen (default {DEFAULT_LISTEN}, or {LISTEN_ENV}); a non-loopback address needs a token",
    )
    p.add_argument(
        "--token-file", default=None, metavar="PATH", help=f"the bearer token's file (first line); else {TOKEN_ENV}"
    )
    p.add_argument(
        "--open-on-loopback",
        action="store_true",
        default=None,
        help=f"run without a token on a loopback address (what jobmesh dev does; or {OPEN_ENV}=1)",
    )
    p.add_argument("--nats-url", default=None, help="the cluster's NATS (default JOBMESH_NATS_URL, or jobmesh dev's)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for NATS at start (default 60)")
    p.add_argument("--json", action="store_true", help="once serving, print {url, auth} as one JSON line")
    p.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted (a sync command: it owns its event loop).

    Returns:
        0 after a clean stop; errors are raised for the command line to report (1 a bad
        setting such as a non-loopback address without a token, 2 NATS unreachable).
    """
    import uvloop

    from jobmesh.client.client import resolve_nats_url
    from jobmesh.web import auth, server

    listen = auth.parse_listen(args.listen or os.environ.get(LISTEN_ENV) or DEFAULT_LISTEN)
    token = auth.read_token(args.token_file)
    open_on_loopback = bool(getattr(args, "open_on_loopback", None)) or os.environ.get(OPEN_ENV) == "1"
    # Before connecting: a refused setting should not wait for NATS.
    auth.check_listen(listen, token, open_on_loopback)
    nats_url = args.nats_url or resolve_nats_url()

    def ready(url: str) -> None:
        if args.json:
            print(json.dumps({"url": url, "auth": token is not None}), flush=True)
        mode = "token required" if token else "no token: open to this machine only"
        server.say(f"serving the API and dashboard at {url} ({mode}); NATS {nats_url}")

    uvloop.run(server.serve(listen, token, nats_url, wait=args.wait, on_ready=ready, open_on_loopback=open_on_loopback))
    return 0
