"""Who may use the HTTP API and the dashboard: one bearer token, or nobody but local users.

A request carries the token as ``Authorization: Bearer <token>``. The dashboard cannot set
that header on an ``EventSource``, so it trades the token once for an HttpOnly,
``SameSite=Strict`` cookie (``POST /api/v1/session``) that every later request of the page,
the event stream included, carries by itself.

Without a token the server runs open, which it only does on a loopback address when
``jobmesh dev`` starts it (``--open-on-loopback``, or ``JOBMESH_WEB_OPEN_ON_LOOPBACK=1`` that
``jobmesh dev`` sets): :func:`check_listen` refuses anything else. Everything here is pure.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from jobmesh.errors import UsageError

COOKIE = "jobmesh_token"
TOKEN_ENV = "JOBMESH_WEB_TOKEN"
OPEN_ENV = "JOBMESH_WEB_OPEN_ON_LOOPBACK"  # "1": run without a token on loopback (jobmesh dev)
DEFAULT_LISTEN = "127.0.0.1:8080"


@dataclass(frozen=True)
class Listen:
    """Where the server listens.

    Attributes:
        host: an address or host name (``127.0.0.1``, ``::1``, ``0.0.0.0``, ``localhost``).
        port: the TCP port (0: the kernel picks one).
    """

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach it."""
        return is_loopback(self.host)

    def url(self, port: int | None = None) -> str:
        """The base URL a browser on this machine opens (``port``: the one actually bound)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port if port is None else port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(text: str) -> Listen:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) as a :class:`Listen`.

    Raises:
        UsageError: the text is not ``HOST:PORT`` with a port from 0 to 65535 (field ``listen``).
    """
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen must be HOST:PORT (such as {DEFAULT_LISTEN}), not {text!r}", field="listen")
    return Listen(host, int(port))


def read_token(token_file: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token from ``token_file`` (first line, stripped), else from ``JOBMESH_WEB_TOKEN``.

    Returns:
        The token, None when neither gives one.

    Raises:
        UsageError: the file cannot be read or is empty (field ``token_file``).
    """
    if token_file:
        try:
            lines = Path(token_file).read_text().strip().splitlines()
        except OSError as exc:
            raise UsageError(f"cannot read the token file {token_file}: {exc.strerror}", field="token_file") from exc
        if not lines or not lines[0].strip():
            raise UsageError(f"the token file {token_file} is empty", field="token_file")
        return lines[0].strip()
    return environ.get(TOKEN_ENV) or None


def check_listen(listen: Listen, token: str | None, open_on_loopback: bool = False) -> None:
    """Refuse to serve without a token, except on loopback when asked to (``jobmesh dev``).

    Args:
        listen: where the server would listen.
        token: its token; None to run open.
        open_on_loopback: running open on a loopback address was asked for explicitly.

    Raises:
        UsageError: no token is set and ``listen`` is reachable from other machines, or it
            is loopback but running open was not asked for (field ``token``).
    """
    if token is not None:
        return
    if not listen.loopback:
        raise UsageError(
            f"refusing to listen on {listen.host}:{listen.port} without a token: anyone who can reach it could"
            f" submit and cancel jobs. Give one with --token-file PATH or {TOKEN_ENV}",
            field="token",
        )
    if not open_on_loopback:
        raise UsageError(
            f"refusing to serve {listen.host}:{listen.port} without a token: every user and process of this"
            f" machine could submit jobs. Give one with --token-file PATH or {TOKEN_ENV}, or pass"
            f" --open-on-loopback to run open to this machine (what jobmesh dev does)",
            field="token",
        )


def refusal(token: str | None, authorization: str | None, cookie: str | None) -> str | None:
    """Why a request is refused, None when it may go on.

    Args:
        token: the server's token; None when it runs open (loopback only).
        authorization: the request's ``Authorization`` header.
        cookie: the request's ``jobmesh_token`` cookie.

    Returns:
        None, or the problem in words (what is missing or wrong).
    """
    if token is None:
        return None
    if authorization:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return "the Authorization header must be 'Bearer <token>'"
        return None if _same(given.strip(), token) else "the bearer token is not valid"
    if cookie:
        return None if _same(cookie, token) else f"the {COOKIE} cookie holds a token that is not valid; log in again"
    return f"authentication required: send 'Authorization: Bearer <token>' (or log in for the {COOKIE} cookie)"


def _same(given: str, token: str) -> bool:
    # In constant time, so the comparison does not tell how much of a guess was right.
    return hmac.compare_digest(given.encode(), token.encode())
