"""Permission violations, as the client says them.

With NATS authentication on, a request to a subject the client's key may not publish to is
dropped by the server, which reports the violation on the connection's error channel only
(``-ERR 'Permissions Violation for Publish to "..."'``). The request itself would just time
out, and the user would read "did not answer within 10s" about a service that is fine. So
the client's connection hands its errors to a :class:`Denials`, and a request waiting on a
subject the server refused fails at once with :class:`PermissionDenied`, naming the subject
and the key's variable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from jobmesh.errors import UsageError

T = TypeVar("T")

_MARK = "permissions violation"
_SUBSCRIBE = "permissions violation for subscription to"


class PermissionDenied(UsageError):
    """NATS refused this client's identity a subject it asked for (a key issued for another
    role, or a server that knows an older set of grants). Not retryable: fix the key."""


def refused_subject(error_text: str) -> str | None:
    """The subject a permission violation names, or None when ``error_text`` is no violation.

    Args:
        error_text: what nats-py reports, e.g. ``nats: permissions violation for publish
            to "jobmesh.v1.api.submit"`` (it lowercases the server's text).
    """
    if _MARK not in error_text.lower():
        return None
    quoted = error_text.split('"')
    return quoted[1] if len(quoted) >= 3 else ""


class Denials:
    """The requests of one connection waiting for a reply, by subject, failed at once when the
    server reports a violation for their subject, or for the connection's reply inbox (then
    every request, now and later, since nats-py subscribes that inbox once).

    Args:
        inbox_prefix: the connection's inbox prefix (``connect_options``); a refused
            subscription under it is the reply inbox, any other refused subscription (a
            watch) concerns its own caller only.
    """

    def __init__(self, inbox_prefix: str = "_INBOX") -> None:
        self._inbox = inbox_prefix.lower()
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}
        self._inbox_refused = ""  # the violation, once the reply inbox was refused

    async def on_error(self, exc: Exception) -> None:
        """The connection's ``error_cb``: fails the requests the violation concerns. Never
        raises: an error here would stop nats-py's read loop."""
        try:
            self._on_error(exc)
        except Exception:  # noqa: BLE001 - see above; the request then times out as before
            return

    def _on_error(self, exc: Exception) -> None:
        text = str(exc)
        subject = refused_subject(text)
        if subject is None:
            return
        violation = text.removeprefix("nats: ")
        if _SUBSCRIBE in text.lower():
            if not subject.lower().startswith(self._inbox):
                return  # a watch's own subscription: its caller's business, not the requests'
            self._inbox_refused = violation
            targets = [f for futures in self._waiting.values() for f in futures]
        else:
            targets = list(self._waiting.get(subject.lower(), ()))
        for future in targets:
            if not future.done():
                future.set_exception(_denied(violation))

    async def guard(self, request: Coroutine[Any, Any, T], subject: str) -> T:
        """Await ``request`` (to ``subject``), unless the server refuses that subject first.

        Raises:
            PermissionDenied: the server reported a violation for it, or had refused the
                connection's reply inbox.
        """
        if self._inbox_refused:
            request.close()
            raise _denied(self._inbox_refused)
        key = subject.lower()
        refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, set()).add(refused)
        task = asyncio.ensure_future(request)
        try:
            racing: set[asyncio.Future[Any]] = {task, refused}
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            if refused.done() and not task.done():
                refused.result()  # raises PermissionDenied
            return await task
        finally:
            if not task.done():
                task.cancel()  # refused, or this caller was cancelled: the request goes too
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.discard(refused)
                if not waiting:
                    del self._waiting[key]
            if not refused.done():
                refused.cancel()
            elif not refused.cancelled():
                refused.exception()  # read: it was raised above, or the reply won the race


def _denied(violation: str) -> PermissionDenied:
    return PermissionDenied(
        f"NATS refused this client's key: {violation}. The key (JOBMESH_NATS_NKEY_FILE, or "
        "JOBMESH_ADMIN_NKEY_FILE for administration) is not allowed that subject; see "
        "docs/operations.md, Security, for what each identity may do"
    )
