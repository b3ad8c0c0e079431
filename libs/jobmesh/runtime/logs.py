"""Log lines for a service: JSON for a log pipeline, plain text for a person.

``JOBMESH_LOG_FORMAT=json`` (the default for a deployed service) writes one JSON object
per line on stderr: ``ts`` (RFC 3339, UTC), ``level``, ``service``, ``logger``, ``msg``,
and, when known, ``trace_id``, ``span_id`` and ``job_id``, plus ``exc`` with the traceback.
``text`` (what ``jobmesh dev`` and the test clusters set) writes the same as one readable
line.

Where the ids come from: a call may pass them, ``log.info(..., extra={"job_id": id})``;
otherwise they are read from :data:`current`, which the runtime sets while it answers one
request. A line that names a job the way every jobmesh line does (``job <32 hex>``) and
has no job id otherwise gets that one, so the lines of batch handlers are found by job id
too.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from dataclasses import dataclass

__all__ = ["JsonFormatter", "LogIds", "TextFormatter", "configure", "current", "ids_from_traceparent"]


@dataclass(frozen=True, slots=True)
class LogIds:
    """The ids a log line of the message being handled carries ("" when unknown)."""

    trace_id: str = ""
    span_id: str = ""
    job_id: str = ""


# The message being handled in this task, if one; asyncio copies it into each task.
current: contextvars.ContextVar[LogIds | None] = contextvars.ContextVar("jobmesh_log_ids", default=None)

_FIELDS = ("trace_id", "span_id", "job_id")
_NAMED_JOB = re.compile(r"\bjob ([0-9a-f]{32})\b")


def ids_from_traceparent(traceparent: str, job_id: str = "") -> LogIds:
    """The ids of a W3C ``traceparent`` header (empty ids when it is not one)."""
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return LogIds(job_id=job_id)
    return LogIds(trace_id=parts[1], span_id=parts[2], job_id=job_id)


class JsonFormatter(logging.Formatter):
    """One JSON object per record.

    Args:
        service: the ``service`` field of every line.
    """

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _rfc3339(record.created),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ambient = current.get()
        for field in _FIELDS:
            value = getattr(record, field, "") or (getattr(ambient, field) if ambient is not None else "")
            if value:
                out[field] = value
        if "job_id" not in out and (named := _NAMED_JOB.search(str(out["msg"]))):
            out["job_id"] = named.group(1)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # default=str: a log line never fails on a value JSON cannot hold.
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Plain, greppable lines; the job id is appended when the line has one."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ambient = current.get()
        job_id = getattr(record, "job_id", "") or (ambient.job_id if ambient is not None else "")
        return f"{line} [job {job_id}]" if job_id and job_id not in line else line


def configure(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Send this process's log records to stderr in ``fmt`` ("json" or "text")."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _rfc3339(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"
