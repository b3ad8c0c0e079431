"""Reading a job's output lines (stream ``JM_LOGS``, one subject per job).

The HTTP API's timeline shows them; ``jobmesh logs`` follows them itself.
"""

from __future__ import annotations

from collections import deque

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import LogLine
from jobmesh.errors import Unavailable

__all__ = ["LogPage", "read_log_lines"]

_READ_TIMEOUT = 5.0  # for the next stored line: they are all there already
_decoder = msgspec.json.Decoder(LogLine)


class LogPage(msgspec.Struct, frozen=True, kw_only=True):
    """The last lines of a job's output.

    Attributes:
        lines: at most the limit asked for, oldest first.
        total: how many lines the stream holds for the job (more than ``lines`` when cut).
    """

    lines: list[LogLine]
    total: int


async def read_log_lines(nc: NATS, job_id: str, limit: int = 500, timeout: float = 10.0) -> LogPage:
    """The newest ``limit`` output lines of ``job_id``, every attempt's.

    Args:
        nc: a connected NATS client.
        job_id: the job.
        limit: at most this many, the newest.
        timeout: seconds for each JetStream request.

    Returns:
        The lines, oldest first; none when the stream or the job's subject holds none.

    Raises:
        Unavailable: when the stream cannot be read.
    """
    subject = subjects.job_log(job_id)
    js = nc.jetstream(timeout=timeout)
    try:
        info = await js.stream_info(subjects.STREAM_LOGS, subjects_filter=subject)
        total = (info.state.subjects or {}).get(subject, 0)
        kept: deque[LogLine] = deque(maxlen=limit)
        if total:
            sub = await js.subscribe(subject, stream=subjects.STREAM_LOGS, ordered_consumer=True)
            try:
                while True:
                    msg = await sub.next_msg(timeout=_READ_TIMEOUT)
                    try:
                        kept.append(_decoder.decode(msg.data))
                    except msgspec.DecodeError:
                        pass  # a line of a newer version: left out, the rest still reads
                    if msg.metadata.num_pending == 0:
                        break
            finally:
                await sub.unsubscribe()
    except nats.js.errors.NotFoundError:
        return LogPage(lines=[], total=0)
    except nats.errors.Error as exc:
        raise Unavailable(f"cannot read {subjects.STREAM_LOGS}: {type(exc).__name__} {exc}".rstrip()) from exc
    return LogPage(lines=list(kept), total=total)
