"""Calling a Python handler as a job and reading its typed result.

A handler job (``HandlerRuntime``) runs a function an executor hosts; its return value is
the job's result, as JSON. :meth:`jobmesh.client.Client.call` submits one and waits for its
end; this module holds what that needs besides the client: the input as JSON-ready data,
the result decoded into the caller's type, and the error a job that did not succeed
raises (:class:`JobFailed`, carrying the job's own failure code).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from jobmesh.contract.messages.v1 import JobView
from jobmesh.errors import InvalidMessage, JobmeshError

__all__ = ["JobFailed", "decode_result", "failure_of", "input_data"]

T = TypeVar("T")


class JobFailed(JobmeshError):
    """Raised by ``Client.call`` when the job ended without succeeding.

    ``code`` is the failure code of its last attempt (``handler_failed``, ``input_invalid``,
    ``timeout``...), or the job's state when no attempt ran (``expired``, ``cancelled``).

    Attributes:
        job_id: the job.
        state: how it ended (``failed``, ``lost``, ``expired``, ``cancelled``).
        attempt: its last attempt (0 when none started).
        output_tail: the end of the last attempt's output (a handler's traceback).
    """

    def __init__(
        self, message: str, *, code: str, job_id: str, state: str, attempt: int, output_tail: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code  # type: ignore[misc]  # per instance: the job's own failure code
        self.job_id = job_id
        self.state = state
        self.attempt = attempt
        self.output_tail = output_tail


def input_data(value: Any) -> Any:
    """A handler's input as the JSON-ready data ``HandlerRuntime.input`` holds.

    Args:
        value: a msgspec struct, a dataclass, or builtin data (dict, list, str, numbers).

    Returns:
        Builtin data.

    Raises:
        InvalidMessage: the value cannot be expressed as JSON (naming ``runtime.input``).
    """
    try:
        return msgspec.to_builtins(value)
    except TypeError as exc:
        raise InvalidMessage(f"the handler input cannot be sent as JSON: {exc}", field="runtime.input") from exc


def decode_result(data: bytes, output_type: type[T] | None = None) -> T | Any:
    """A handler job's result, decoded.

    Args:
        data: the result's bytes (JSON, as the handler's return value was written).
        output_type: convert into this type (a msgspec struct, say); None for builtin data.

    Returns:
        The decoded result.

    Raises:
        InvalidMessage: the result is not JSON, or does not fit ``output_type``; the field
            is named (``$.accuracy``).
    """
    try:
        if output_type is None:
            return msgspec.json.decode(data)
        return msgspec.json.decode(data, type=output_type)
    except msgspec.ValidationError as exc:
        raise InvalidMessage(f"the result does not fit {_name(output_type)}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"the result is not JSON: {exc}") from exc


def failure_of(view: JobView) -> JobFailed:
    """The error a final job that did not succeed stands for.

    Args:
        view: the tracker's final view of the job.

    Returns:
        The error, with the last attempt's code and message (or the job's state and reason
        when no attempt ran).
    """
    last = max(view.attempts, key=lambda a: a.attempt) if view.attempts else None
    if last is not None and last.error is not None:
        code, message = last.error.code, last.error.message
    else:
        code, message = view.state, view.reason or f"the job ended {view.state}"
    return JobFailed(
        f"job {view.job_id} ended {view.state}: {code}: {message}",
        code=code,
        job_id=view.job_id,
        state=view.state,
        attempt=view.attempt,
        output_tail=last.output_tail if last is not None else "",
    )


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", repr(kind))
