"""Running the app: connect to the cluster (showing the wait), bind, serve with uvicorn.

``jobmesh web`` and ``python -m jobmesh.web`` (what ``jobmesh dev``, compose and the tests
start) both end here. The socket is bound before uvicorn starts, so a port in use is a
clear error at once and the URL printed is the one bound (``:0`` picks a free port).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Callable

import nats
import uvicorn

from jobmesh.client.client import Client, connect_options, server_urls
from jobmesh.client.denials import Denials
from jobmesh.errors import Unavailable, UsageError
from jobmesh.web import auth
from jobmesh.web.app import create_app

CONNECT_NOTE_SECONDS = 2.0  # how often the wait for NATS says that it still waits


def bind(listen: auth.Listen) -> socket.socket:
    """A listening socket on ``listen``.

    Raises:
        UsageError: the address cannot be bound (in use, not this machine's), field ``listen``.
    """
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listen.host, listen.port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {listen.host}:{listen.port}: {exc.strerror}", field="listen") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


async def connect(url: str, wait: float, say: Callable[[str], None]) -> Client:
    """A client whose connection reconnects for as long as the server runs.

    The first connection is tried until ``wait`` seconds have passed (NATS may start
    after this server, as in compose), saying every few seconds that it still waits.

    Raises:
        Unavailable: NATS did not answer within ``wait``.
    """

    # Also the connection's error callback: nats-py logs each failed attempt (the wait is
    # said below instead), and a permission violation fails its request at once.
    options = connect_options(url)  # the client identity's credentials, as the CLI's
    denials = Denials(options["inbox_prefix"])
    # With reconnects unlimited nats-py also retries the first connect without end; the
    # wait is bounded here.
    connecting = asyncio.ensure_future(
        nats.connect(
            server_urls(url),
            **options,
            connect_timeout=2,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=denials.on_error,
        )
    )
    started = time.monotonic()
    while True:
        left = wait - (time.monotonic() - started)
        done, _ = await asyncio.wait([connecting], timeout=max(0.0, min(CONNECT_NOTE_SECONDS, left)))
        if done:
            try:
                return Client(connecting.result(), denials=denials)
            except Exception as exc:
                raise Unavailable(f"cannot reach NATS at {url}: {type(exc).__name__} {exc}".rstrip()) from exc
        if left <= 0:
            connecting.cancel()
            raise Unavailable(f"cannot reach NATS at {url} within {wait:g}s")
        say(f"waiting for NATS at {url} ... {time.monotonic() - started:.0f}s")


def say(message: str) -> None:
    print(f"jobmesh web: {message}", file=sys.stderr, flush=True)


async def serve(
    listen: auth.Listen,
    token: str | None,
    nats_url: str,
    *,
    wait: float = 60.0,
    on_ready: Callable[[str], None] | None = None,
    open_on_loopback: bool = False,
) -> None:
    """Serve the API and the dashboard until SIGINT or SIGTERM.

    Args:
        listen: where to listen.
        token: the bearer token; None to run open (loopback only, when asked: checked here).
        nats_url: the cluster's NATS.
        wait: seconds to wait for NATS at start.
        on_ready: called with the base URL once the server accepts connections.
        open_on_loopback: without a token, serve loopback anyway (``jobmesh dev``).

    Raises:
        UsageError: no token where one is needed (``auth.check_listen``), or an address
            that cannot be bound.
        Unavailable: NATS did not answer within ``wait``.
    """
    auth.check_listen(listen, token, open_on_loopback)
    sock = bind(listen)
    url = listen.url(sock.getsockname()[1])
    client = await connect(nats_url, wait, say)

    async def handed_over() -> Client:
        return client

    started = asyncio.Event()
    app = create_app(handed_over, token, on_started=started.set)
    # A bounded drain: open event streams would otherwise hold a stop up for as long as they last.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    # The socket listens already: once the app has started, a connection waits in the
    # backlog for uvicorn to accept it, so the URL may be given out now.
    waiter = asyncio.create_task(started.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if started.is_set() and on_ready is not None:
        on_ready(url)
    await task
    if not started.is_set():
        raise Unavailable(f"the web server did not start on {url}; see the lines above")
