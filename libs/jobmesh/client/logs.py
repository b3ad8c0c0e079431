"""Reading a job's output lines (stream ``JM_LOGS``, one subject per job).

The HTTP API's timeline shows them; ``jobmesh logs`` follows them itself.

Only the newest lines are read, however many the job wrote: the stream's sequences are
shared by every job, so the first sequence of a job's newest ``limit`` lines is searched
for (:func:`newest_start`) by asking how many of its lines lie at or after a sequence (a
consumer's ``num_pending``, no message sent), and reading starts there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import api

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import LogLine
from jobmesh.errors import Unavailable

__all__ = ["LogPage", "newest_start", "read_log_lines"]

_READ_TIMEOUT = 5.0  # for the next stored line: they are all there already
_decoder = msgspec.json.Decoder(LogLine)
FIRST_STRIDE = 8  # stream sequences per wanted line in the first step back (other jobs' lines interleave)
MAX_PROBES = 64  # searching a 2**32 sequence range takes ~40; past this, reading starts where the search got


class LogPage(msgspec.Struct, frozen=True, kw_only=True):
    """The last lines of a job's output.

    Attributes:
        lines: at most the limit asked for, oldest first.
        total: how many lines the stream holds for the job (more than ``lines`` when cut).
        truncated: older lines exist that were not read (``total`` says how many there are).
    """

    lines: list[LogLine]
    total: int
    truncated: bool = False


async def newest_start(count_from: Callable[[int], Awaitable[int]], first: int, last: int, limit: int) -> int:
    """The largest stream sequence from which a subject still holds ``limit`` messages.

    Steps back from ``last`` in strides growing fourfold until ``limit`` are behind, then
    halves the range between the last two steps.

    Args:
        count_from: how many of the subject's messages have a sequence at or after the one given.
        first: the stream's first sequence (``count_from(first)`` is the subject's total).
        last: the subject's last message's sequence.
        limit: how many of the newest messages are wanted.

    Returns:
        Where reading starts so that about ``limit`` messages are read; ``first`` when the
        subject holds no more than that.
    """
    probes = 0
    high = last  # count_from(high) < limit, or high == last
    stride = max(1, limit * FIRST_STRIDE)
    low = max(first, last - stride)
    while low > first and probes < MAX_PROBES:
        probes += 1
        if await count_from(low) >= limit:
            break
        high, stride = low, stride * 4
        low = max(first, low - stride)
    # count_from(low) >= limit (or low is the stream's first): the answer is in [low, high].
    while high - low > 1 and probes < MAX_PROBES:
        probes += 1
        middle = (low + high) // 2
        if await count_from(middle) >= limit:
            low = middle
        else:
            high = middle
    if high != low and probes < MAX_PROBES and await count_from(high) >= limit:
        return high
    return low


async def read_log_lines(nc: NATS, job_id: str, limit: int = 500, timeout: float = 10.0) -> LogPage:
    """The newest ``limit`` output lines of ``job_id``, every attempt's.

    Args:
        nc: a connected NATS client.
        job_id: the job.
        limit: at most this many, the newest; older ones are not read.
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
            config = None
            if total > limit:
                last = (await js.get_last_msg(subjects.STREAM_LOGS, subject)).seq or info.state.last_seq

                async def count_from(seq: int) -> int:
                    return await _count_from(nc, subject, seq, timeout)

                start = await newest_start(count_from, info.state.first_seq, last, limit)
                config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
            sub = await js.subscribe(subject, stream=subjects.STREAM_LOGS, ordered_consumer=True, config=config)
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
    return LogPage(lines=list(kept), total=total, truncated=total > len(kept))


async def _count_from(nc: NATS, subject: str, seq: int, timeout: float) -> int:
    """How many of ``subject``'s messages have a sequence at or after ``seq`` (a consumer's
    ``num_pending``, read from its creation reply; no message is delivered)."""
    jsm = nc.jsm(timeout=timeout)
    # Unnamed (ephemeral, as the ordered consumer that reads the lines is): the same API
    # subject, so the same permissions, and the server names it.
    config = api.ConsumerConfig(
        filter_subject=subject,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=seq,
        ack_policy=api.AckPolicy.NONE,
        inactive_threshold=30.0,  # removed by the server should the delete below be lost
        mem_storage=True,
        num_replicas=1,
    )
    created = await jsm.add_consumer(subjects.STREAM_LOGS, config)
    try:
        return int(created.num_pending or 0)
    finally:
        try:
            await jsm.delete_consumer(subjects.STREAM_LOGS, created.name)
        except nats.js.errors.NotFoundError:
            pass  # gone already (its inactivity threshold)
