"""Responses of the HTTP API: JSON from msgspec structs, and one error shape for every failure.

Every error answers with a JSON body ``{"code", "message", "field", "retryable"}``, the
fields of the cluster's own ``ErrorReply``: a cluster error keeps its code and field, and
the API's own refusals (no token, a bad body, a bad query parameter) use the same shape.
Cluster errors are translated here, once (:func:`status_of`).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from starlette.responses import Response

from jobmesh.contract.strict import reject_unknown_fields
from jobmesh.errors import Conflict, InvalidMessage, JobmeshError, NotFound, Overloaded, Unavailable, UsageError

T = TypeVar("T")

_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object (missing required|contains unknown) field `(?P<name>[^`]+)`")


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """The body of every error response.

    Attributes:
        code: a stable code: the cluster's (``invalid_spec``, ``not_found``...) or the API's
            own (``unauthorized``, ``bad_request``, ``invalid_body``, ``invalid_parameter``).
        message: what is wrong, in words.
        field: the field, parameter or header at fault ("" when none), such as
            ``jobs[0].spec.priority`` or ``limit``.
        retryable: the same request may succeed later.
    """

    code: str
    message: str
    field: str = ""
    retryable: bool = False


class HttpProblem(Exception):
    """Raised when a request is refused by the API itself, before the cluster is asked.

    Args:
        status: the HTTP status.
        code: the ``Problem`` code.
        message: what is wrong.
        field: the part of the request at fault.
    """

    def __init__(self, status: int, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.problem = Problem(code=code, message=message, field=field)


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``value`` (a struct or builtin data) encoded by msgspec as a JSON response."""
    return Response(msgspec.json.encode(value), status_code=status, media_type="application/json", headers=headers)


def problem_response(status: int, problem: Problem, headers: dict[str, str] | None = None) -> Response:
    """An error response with the one error shape."""
    return json_response(problem, status, headers)


def status_of(error: JobmeshError) -> int:
    """The HTTP status of a cluster error.

    Args:
        error: what the client raised.

    Returns:
        404 not found, 422 invalid input, 400 bad usage, 409 a conflict, 503 overloaded or
        unreachable (retry later), 500 anything else.
    """
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, InvalidMessage):
        return 422
    if isinstance(error, UsageError):
        return 400
    if isinstance(error, Conflict):
        return 409
    if isinstance(error, Overloaded | Unavailable) or error.retryable:
        return 503
    return 500


def error_response(error: JobmeshError) -> Response:
    """The response for a cluster error (its code, message and field kept)."""
    status = status_of(error)
    problem = Problem(code=error.code, message=str(error), field=error.field or "", retryable=error.retryable)
    return problem_response(status, problem, {"Retry-After": "1"} if status == 503 else None)


def decode_body(raw: bytes, kind: type[T]) -> T:
    """A request body as ``kind``, checked as the wire checks it, and strictly.

    A field ``kind`` does not declare is refused rather than dropped: in a user's request
    it is almost always a typo (``prority``, a step's ``neds``) that would otherwise run
    the job without what was asked for (``contract.strict``).

    Raises:
        HttpProblem: 400 ``bad_request`` when the body is not JSON, 422 ``invalid_body``
            when it does not fit ``kind`` or holds an unknown field (the field named, such
            as ``jobs[0].spec.runtime`` or ``jobs[0].spec.prority``).
    """
    if not raw.strip():
        raise HttpProblem(400, "bad_request", "the request needs a JSON body", field="body")
    try:
        value = msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        message, field = str(exc), field_of(str(exc))
        raise HttpProblem(422, "invalid_body", message, field=field) from exc
    except msgspec.DecodeError as exc:
        raise HttpProblem(400, "bad_request", f"the body is not valid JSON: {exc}", field="body") from exc
    try:
        reject_unknown_fields(raw, kind)
    except InvalidMessage as exc:
        raise HttpProblem(422, "invalid_body", str(exc), field=exc.field or "") from exc
    return value


def field_of(message: str) -> str:
    """The field a msgspec validation message names (``jobs[0].spec.priority``), "" for the body.

    A missing or an unknown field is named itself (``jobs[0].spec``, ``jobs[0].extra``),
    not the object that lacks or holds it.
    """
    found = _PATH.search(message)
    path = found.group("path") if found else ""
    missing = _MISSING.match(message)
    if missing:
        path = f"{path}.{missing.group('name')}" if path else missing.group("name")
    return path
