"""The private protocol between the executor's handler pool and one worker process.

Two pipes the worker inherits: commands from the pool, events from the worker. Each message
is a 4-byte big-endian length, then a tagged msgspec struct in msgpack. It never leaves the
node and is not part of the NATS contract: pool and worker always come from one install.
The worker's stdout and stderr are ordinary pipes beside these: the current job's log.

A job's conversation: ``Call`` -> ``Accepted`` -> (``Progress`` | ``Heartbeat`` |
``Submit`` -> ``SubmitDone``)* -> ``Done`` | ``Failed``; ``Cancel`` may come at any time.
``Accepted`` is sent before any of the job's code runs: a worker that goes away before it
sent one never started the job, so the pool may hand the job to another worker. Every job
message carries the job's sequence number on this worker, so a late message of an earlier
job is never taken for the current one's.
"""

from __future__ import annotations

import asyncio
import os
import struct

import msgspec

from jobmesh.contract.messages.v1 import HandlerInfo

__all__ = [
    "END_MARK",
    "MAX_FRAME",
    "Accepted",
    "Call",
    "Cancel",
    "Command",
    "Done",
    "Event",
    "Failed",
    "FrameReader",
    "Heartbeat",
    "LoadFailed",
    "Progress",
    "Ready",
    "Submit",
    "SubmitDone",
    "encode_frame",
    "end_mark",
    "read_frame",
]

MAX_FRAME = 256 * 1024 * 1024  # above the result store's 64 MiB limit; a guard against garbage
_LENGTH = struct.Struct(">I")
# Written by the worker on its stdout and stderr after each job, once the job's own output
# is flushed: the pool knows it has every line of the job when it has read this on both.
END_MARK = b"\x1e\x00jobmesh-worker-job-end "


def end_mark(seq: int) -> bytes:
    """The line that ends job ``seq``'s output on stdout and stderr."""
    return END_MARK + str(seq).encode() + b"\n"


# --- pool -> worker -----------------------------------------------------------------


class Call(msgspec.Struct, frozen=True, tag="call"):
    """Run handler ``handler`` with ``input`` (JSON) for one attempt."""

    seq: int
    handler: str
    input: bytes
    job_id: str
    attempt: int
    workdir: str
    checkpoint: str = ""


class Cancel(msgspec.Struct, frozen=True, tag="cancel"):
    """The attempt must stop: the handler's ``ctx.cancelled`` turns true."""

    seq: int


class SubmitDone(msgspec.Struct, frozen=True, tag="submit_done"):
    """The answer to a ``Submit``: the job id, or the error (``code`` not "")."""

    seq: int
    request: int
    job_id: str = ""
    code: str = ""
    message: str = ""
    field: str = ""


Command = Call | Cancel | SubmitDone

# --- worker -> pool -----------------------------------------------------------------


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    """Every module is imported; these are its handlers."""

    handlers: list[HandlerInfo]


class LoadFailed(msgspec.Struct, frozen=True, tag="load_failed"):
    """Importing ``module`` failed (the traceback went to stderr); the worker exits."""

    module: str
    message: str


class Accepted(msgspec.Struct, frozen=True, tag="accepted"):
    """The worker took job ``seq`` and is about to run it (nothing of it ran yet)."""

    seq: int


class Progress(msgspec.Struct, frozen=True, tag="progress"):
    """``ctx.progress(fraction, message)``."""

    seq: int
    fraction: float
    message: str = ""


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat"):
    """``ctx.heartbeat(checkpoint)``."""

    seq: int
    checkpoint: str = ""


class Submit(msgspec.Struct, frozen=True, tag="submit"):
    """``ctx.submit(spec)``: submit a follow-up job (spec as JSON) with ``key``."""

    seq: int
    request: int
    spec: bytes
    key: str


class Done(msgspec.Struct, frozen=True, tag="done"):
    """The handler returned; ``result`` is its output as JSON, checked against its type."""

    seq: int
    result: bytes


class Failed(msgspec.Struct, frozen=True, tag="failed"):
    """The job failed in the worker: ``code`` is a failure code (input_invalid, ...)."""

    seq: int
    code: str
    message: str


Event = Ready | LoadFailed | Accepted | Progress | Heartbeat | Submit | Done | Failed

_encoder = msgspec.msgpack.Encoder()


def encode_frame(message: Command | Event) -> bytes:
    """One message as a frame: its length, then its msgpack bytes."""
    body = _encoder.encode(message)
    return _LENGTH.pack(len(body)) + body


def read_frame(fd: int) -> bytes | None:
    """Read one frame's body from a blocking descriptor (the worker's side).

    Args:
        fd: the descriptor.

    Returns:
        The body, or None at end of file.

    Raises:
        ValueError: the frame is larger than :data:`MAX_FRAME`, or the pipe ends inside one.
    """
    head = _read_exactly(fd, _LENGTH.size)
    if head is None:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is larger than {MAX_FRAME}")
    body = _read_exactly(fd, size) if size else b""
    if body is None:
        raise ValueError("the pipe ended inside a frame")
    return body


def _read_exactly(fd: int, size: int) -> bytes | None:
    parts: list[bytes] = []
    left = size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            if left == size:
                return None
            raise ValueError("the pipe ended inside a frame")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


class FrameReader:
    """Reads frames from an asyncio stream (the pool's side) and decodes them as ``kind``.

    Args:
        reader: the stream.
        kind: the message type or union to decode.
    """

    def __init__(self, reader: asyncio.StreamReader, kind: object) -> None:
        self._reader = reader
        self._decoder: msgspec.msgpack.Decoder[object] = msgspec.msgpack.Decoder(kind)

    async def read(self) -> object | None:
        """The next message, or None at end of file.

        Raises:
            ValueError: the frame is too large, cut short, or does not decode.
        """
        try:
            head = await self._reader.readexactly(_LENGTH.size)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise ValueError("the pipe ended inside a frame") from exc
        (size,) = _LENGTH.unpack(head)
        if size > MAX_FRAME:
            raise ValueError(f"frame of {size} bytes is larger than {MAX_FRAME}")
        try:
            body = await self._reader.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            raise ValueError("the pipe ended inside a frame") from exc
        try:
            return self._decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise ValueError(f"undecodable message: {exc}") from exc
