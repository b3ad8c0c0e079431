"""What keeps other web pages out: Host, Origin and Content-Type checks, and the pages' CSP.

A page on any site can make the browser send a "simple" request (a form post, a
``text/plain`` fetch) to ``http://127.0.0.1:8080``, and a DNS-rebinding page can even read
the answers. So, before a request reaches a handler:

- in open mode (no token, loopback only) the ``Host`` must be a loopback name: a rebinding
  page's requests carry its own host name;
- a request that may change something (POST, PUT, PATCH, DELETE) is refused when the
  browser says it comes from another origin (``Origin``, ``Sec-Fetch-Site: cross-site``);
- a body must be ``application/json``, which no page can send elsewhere without a CORS
  preflight this server never grants (:func:`content_type_refusal`, checked where bodies
  are read).

The decisions are pure; :class:`Guard` is the ASGI middleware that applies them.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobmesh.web.problems import Problem, problem_response

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
# The dashboard loads only its own script and style sheet; its graph's styles are set through
# the CSSOM (app.js), which a policy without 'unsafe-inline' allows.
CONTENT_SECURITY_POLICY = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"


def host_name(host: str) -> str:
    """The name part of a ``Host`` header: ``127.0.0.1:8080`` -> ``127.0.0.1``, ``[::1]:80`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.partition(":")[0]


def host_refusal(host: str | None) -> str | None:
    """Why an open (token-less) server refuses a request for ``host``, None when it is loopback.

    Args:
        host: the request's ``Host`` header.

    Returns:
        None, or the problem in words.
    """
    if host and host_name(host) in LOOPBACK_HOSTS:
        return None
    return (
        f"the Host {host or '(none)'!r} is not this machine's loopback (127.0.0.1, localhost or [::1]): a server"
        " without a token answers only those"
    )


def origin_refusal(method: str, headers: Mapping[str, str]) -> str | None:
    """Why a request that may change something is refused as coming from another site.

    Args:
        method: the HTTP method.
        headers: the request's headers (names in lower case).

    Returns:
        None for a safe method, or one from this server's own origin (or from no browser);
        else the problem in words.
    """
    if method.upper() not in UNSAFE_METHODS:
        return None
    if headers.get("sec-fetch-site", "").lower() == "cross-site":
        return "the browser says this request comes from another site (Sec-Fetch-Site: cross-site)"
    origin = headers.get("origin")
    if origin is None:
        return None  # not sent by a browser page of another origin (curl, or a same-origin GET form)
    own = headers.get("host", "").strip().lower()
    parts = urlsplit(origin.strip().lower())
    if parts.scheme in ("http", "https") and own and _netloc(parts.scheme, parts.netloc) == _netloc(parts.scheme, own):
        return None
    return f"the Origin {origin!r} is not this server's own ({own or 'no Host'})"


def _netloc(scheme: str, netloc: str) -> str:
    # An origin leaves out its scheme's default port; a Host header may or may not.
    default = {"http": ":80", "https": ":443"}[scheme]
    return netloc[: -len(default)] if netloc.endswith(default) else netloc


def content_type_refusal(content_type: str | None) -> str | None:
    """Why a request body is refused for its ``Content-Type``, None when it is JSON.

    Args:
        content_type: the request's ``Content-Type`` header.

    Returns:
        None for ``application/json`` (with any parameters such as ``charset``), else the problem.
    """
    media = (content_type or "").partition(";")[0].strip().lower()
    if media == "application/json":
        return None
    return f"a request body must be sent as Content-Type: application/json, not {content_type or '(none)'!r}"


class Guard:
    """ASGI middleware: the Host check (open mode), the Origin check, and the pages' CSP header.

    Args:
        app: the application behind it.
        open_mode: the server runs without a token (only loopback Host names are answered).
    """

    def __init__(self, app: ASGIApp, open_mode: bool) -> None:
        self.app = app
        self.open_mode = open_mode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refused = None
        if self.open_mode:
            problem = host_refusal(headers.get("host"))
            if problem is not None:
                refused = problem_response(403, Problem(code="forbidden", message=problem, field="Host"))
        if refused is None:
            problem = origin_refusal(scope["method"], headers)
            if problem is not None:
                refused = problem_response(403, Problem(code="forbidden", message=problem, field="Origin"))
        if refused is not None:
            await refused(scope, receive, send)
            return

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
                out.setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        await self.app(scope, receive, send_with_policy)
