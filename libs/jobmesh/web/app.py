"""The ASGI application: the endpoints of ``routes`` behind the token check, and the
dashboard's static files at ``/``.

The app owns one cluster client for its lifetime (opened in the lifespan, by the
``connect`` callable it is given, so tests and ``jobmesh web`` choose how) and one live
hub on it. Every request passes ``guard.Guard`` first (Host, Origin, and the pages' CSP).
Errors raised by a handler become the one error shape here, so no handler
formats an error itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats.errors
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from jobmesh.client.client import Client
from jobmesh.errors import JobmeshError, Unavailable
from jobmesh.web import auth
from jobmesh.web.guard import Guard
from jobmesh.web.live import LiveHub
from jobmesh.web.problems import HttpProblem, Problem, error_response, problem_response
from jobmesh.web.routes import ENDPOINTS, Endpoint, WebState

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


def create_app(
    connect: Callable[[], Awaitable[Client]],
    token: str | None,
    live_period: float = 2.0,
    on_started: Callable[[], None] | None = None,
) -> Starlette:
    """The HTTP API and dashboard.

    Args:
        connect: opens the cluster client when the server starts (it is closed at stop).
        token: the bearer token every API request needs; None to run open (the caller
            checks that it listens on loopback only: ``auth.check_listen``).
        live_period: seconds between the live stream's node and queue snapshots.
        on_started: called once the client and the live hub are up.

    Returns:
        The Starlette app.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = await connect()
        hub = LiveHub(client, period=live_period)
        await hub.start()
        app.state.web = WebState(client=client, hub=hub, token=token)
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await hub.stop()
            await client.close()

    routes: list[Route | Mount] = [
        Route(e.path, _endpoint(e), methods=[e.method], name=e.operation_id) for e in ENDPOINTS
    ]
    routes.append(Mount("/", StaticFiles(directory=STATIC, html=True), name="dashboard"))
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(Guard, open_mode=token is None)],
        # What no handler answers (no such path, a wrong method, a crash) has the one error
        # shape too: the dashboard reads every answer of /api/v1 as JSON.
        exception_handlers={HTTPException: _http_error, Exception: _crash},
    )


_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    field = "method" if exc.status_code == 405 else "path" if exc.status_code == 404 else ""
    return problem_response(exc.status_code, Problem(code=code, message=message, field=field), dict(exc.headers or {}))


async def _crash(request: Request, exc: Exception) -> Response:
    # Starlette logs the traceback (and re-raises for the server) after this answer.
    log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__)
    return problem_response(500, Problem(code="internal", message=f"the server failed: {type(exc).__name__}"))


def _endpoint(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    """The Starlette endpoint of ``endpoint``: the token check, the handler, errors to JSON."""

    async def call(request: Request) -> Response:
        web: WebState = request.app.state.web
        if endpoint.auth:
            problem = auth.refusal(web.token, request.headers.get("authorization"), request.cookies.get(auth.COOKIE))
            if problem is not None:
                return problem_response(
                    401,
                    Problem(code="unauthorized", message=problem, field="Authorization"),
                    {"WWW-Authenticate": 'Bearer realm="jobmesh"'},
                )
        try:
            return await endpoint.handler(request, web)
        except HttpProblem as exc:
            return problem_response(exc.status, exc.problem)
        except JobmeshError as exc:
            if exc.code == "internal":
                log.exception("%s %s failed", request.method, request.url.path)
            return error_response(exc)
        except nats.errors.Error as exc:
            # A stream read the client did not translate (the connection dropped mid-read).
            return error_response(Unavailable(f"NATS failed: {type(exc).__name__} {exc}".rstrip()))

    call.__name__ = endpoint.operation_id
    return call
