"""Progress from inside a process job: the pipe it writes to, and the lines it may write.

A process job finds the write end of a pipe in ``JOBMESH_PROGRESS_FD``. Each line it writes
there is one of::

    progress <fraction 0..1> [message]
    checkpoint <text>

The last values go into the attempt's lease (:class:`~jobmesh.executor.leases.LeaseState`)
and travel with the node's next heartbeat, never as a message per line. A checkpoint is
cut at :data:`CHECKPOINT_MAX_BYTES` and a message at :data:`MESSAGE_MAX_BYTES` (each with
one warning per attempt); any other line is ignored, with one warning per attempt. Empty
lines are ignored silently.

:func:`parse_line` is the format; :class:`LineSplitter` cuts a byte stream into bounded
lines; :class:`ProgressChannel` is the pipe and its reader.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from jobmesh.executor.fdpipes import PipeReadTransport
from jobmesh.executor.leases import LeaseState

log = logging.getLogger("jobmesh.executor.progress")

PROGRESS_FD_VAR = "JOBMESH_PROGRESS_FD"
CHECKPOINT_MAX_BYTES = 4096
MESSAGE_MAX_BYTES = 1024
# Longer lines are cut here (what is left of them is dropped): a checkpoint line is at most
# this long anyway, and a job that writes garbage must not make the executor buffer it.
LINE_MAX_BYTES = CHECKPOINT_MAX_BYTES + 64


@dataclass(frozen=True, slots=True)
class Progress:
    """A ``progress`` line: the fraction done and its message."""

    fraction: float
    message: str
    cut: bool = False  # the message was longer than MESSAGE_MAX_BYTES


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A ``checkpoint`` line: where a retry of the job may start from."""

    text: str
    cut: bool = False  # the text was longer than CHECKPOINT_MAX_BYTES


def _cut(text: str, limit: int) -> tuple[str, bool]:
    raw = text.encode()
    if len(raw) <= limit:
        return text, False
    # Cut on a character boundary: a half character would not be valid UTF-8 on the wire.
    return raw[:limit].decode("utf-8", "ignore"), True


def parse_line(line: str) -> Progress | Checkpoint | None:
    """What one line of the progress pipe says.

    Args:
        line: the line, without its newline.

    Returns:
        A :class:`Progress` or :class:`Checkpoint`, or None when the line is neither (a
        fraction that is not a number from 0 to 1, an unknown word).
    """
    word, _, rest = line.partition(" ")
    if word == "checkpoint":
        text, cut = _cut(rest, CHECKPOINT_MAX_BYTES)
        return Checkpoint(text, cut)
    if word != "progress":
        return None
    number, _, message = rest.strip().partition(" ")
    try:
        fraction = float(number)
    except ValueError:
        return None
    if not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
        return None
    text, cut = _cut(message.strip(), MESSAGE_MAX_BYTES)
    return Progress(fraction, text, cut)


class LineSplitter:
    """Cuts a byte stream into lines of at most ``limit`` bytes.

    Args:
        limit: the longest line handed over; the rest of a longer line is dropped.
    """

    def __init__(self, limit: int = LINE_MAX_BYTES) -> None:
        self._limit = limit
        self._buffer = b""
        self._dropping = False  # inside a line that was already cut

    def feed(self, data: bytes) -> list[str]:
        """Take ``data``; return the lines it completed (decoded, ``\\r`` stripped)."""
        lines: list[str] = []
        while data:
            newline = data.find(b"\n")
            piece, data = (data, b"") if newline < 0 else (data[:newline], data[newline + 1 :])
            if not self._dropping:
                self._buffer += piece[: self._limit - len(self._buffer) + 1]
            if newline < 0:
                if len(self._buffer) > self._limit:
                    lines.append(self._take())
                    self._dropping = True
                break
            if self._dropping:
                self._dropping = False
                self._buffer = b""
                continue
            lines.append(self._take())
        return lines

    def finish(self) -> list[str]:
        """The last line, if the stream ended without a newline."""
        if self._buffer and not self._dropping:
            return [self._take()]
        return []

    def _take(self) -> str:
        line = self._buffer[: self._limit].decode("utf-8", "replace").rstrip("\r")
        self._buffer = b""
        return line


class ProgressRecorder:
    """Applies a job's progress lines to its lease, warning once per attempt per kind of problem.

    Args:
        lease: the attempt's lease.
        name: how log lines name the attempt (``job <id> attempt <n>``).
        mask: applied to every message, checkpoint and logged excerpt first (the attempt's
            secrets out: the lease reaches ``jm_nodes``, checkpoints Postgres).
    """

    def __init__(self, lease: LeaseState, name: str, mask: Callable[[str], str] | None = None) -> None:
        self._lease = lease
        self._name = name
        self._mask = mask if mask is not None else _unmasked
        self._warned: set[str] = set()
        self.lines = 0

    def line(self, line: str) -> None:
        """Apply one line of the pipe."""
        if not line.strip():
            return
        self.lines += 1
        line = self._mask(line)
        parsed = parse_line(line)
        if isinstance(parsed, Progress):
            self._lease.progress = parsed.fraction
            self._lease.message = parsed.message
            if parsed.cut:
                self._warn("message", f"a progress message longer than {MESSAGE_MAX_BYTES} bytes was cut")
        elif isinstance(parsed, Checkpoint):
            self._lease.checkpoint = parsed.text
            if parsed.cut:
                self._warn("checkpoint", f"a checkpoint longer than {CHECKPOINT_MAX_BYTES} bytes was cut")
        else:
            self._warn(
                "format",
                f"ignoring a line on {PROGRESS_FD_VAR} that is neither 'progress <0..1> [message]' nor "
                f"'checkpoint <text>': {line[:80]!r} (further ones are ignored silently)",
            )

    def _warn(self, kind: str, text: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s: %s", self._name, text)


def _unmasked(text: str) -> str:
    return text


class _LineSink:
    """What :class:`~jobmesh.executor.fdpipes.PipeReadTransport` feeds: the pipe's bytes,
    cut into lines for ``on_line``; ``ended`` is set at the end of the pipe."""

    def __init__(self, on_line: Callable[[str], None], ended: asyncio.Future[None]) -> None:
        self._on_line = on_line
        self._splitter = LineSplitter()
        self._ended = ended

    def set_transport(self, transport: object) -> None:
        return None  # nothing to pause: lines are applied as they come

    def feed_data(self, data: bytes) -> None:
        self._deliver(self._splitter.feed(data))

    def feed_eof(self) -> None:
        if not self._ended.done():
            self._deliver(self._splitter.finish())
            self._ended.set_result(None)

    def set_exception(self, exc: BaseException) -> None:
        return None  # as good as the end: the transport closes, and feed_eof follows

    def _deliver(self, lines: Iterable[str]) -> None:
        for line in lines:
            try:
                self._on_line(line)
            except Exception:  # a reader's bug must not end the reading, nor reach the loop
                log.exception("a progress line could not be applied")


class ProgressChannel:
    """The pipe a process job reports progress on: the job gets the write end.

    Use: :meth:`open`, give :attr:`child_fd` to the process (``pass_fds``, and its number in
    ``JOBMESH_PROGRESS_FD``), call :meth:`spawned` right after the process started (or failed
    to), and :meth:`close` once it ended.

    The read end belongs to a :class:`~jobmesh.executor.fdpipes.PipeReadTransport`, which
    closes it once (not uvloop's pipe transport, which closes a descriptor twice).

    Args:
        on_line: called with every line the job writes.
    """

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._on_line = on_line
        self._read_fd, self.child_fd = os.pipe()
        self._transport: PipeReadTransport | None = None
        self._ended: asyncio.Future[None] | None = None

    async def spawned(self) -> None:
        """Close the parent's copy of the write end and start reading.

        From now on the pipe ends when the job and everything it started have closed it.
        """
        os.close(self.child_fd)
        self.child_fd = -1
        self._ended = asyncio.get_running_loop().create_future()
        self._transport = PipeReadTransport(self._read_fd, _LineSink(self._on_line, self._ended))
        self._read_fd = -1  # the transport's now

    async def close(self, grace: float = 0.5) -> None:
        """Read what the job still wrote (up to ``grace`` seconds), then close the pipe.

        Args:
            grace: how long to wait for the end of the pipe; only a process that escaped
                the attempt's process group can hold it open longer.
        """
        if self.child_fd >= 0:  # the process never started
            os.close(self.child_fd)
            self.child_fd = -1
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1
        if self._ended is not None and not self._ended.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._ended), grace)
            except TimeoutError:
                pass
        if self._transport is not None:
            self._transport.close()
            self._transport = None
