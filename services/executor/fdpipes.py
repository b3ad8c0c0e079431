"""Pipe ends the executor owns until it closes them, once: a reader and a frame writer.

Not ``loop.connect_read_pipe`` / ``connect_write_pipe``: uvloop's pipe transports close the
descriptor through libuv and again through the Python file object (MagicStack/uvloop#763).
A number the kernel hands out in between, such as an attempt's result file being read in a
thread, is closed under its user. Here the descriptor is watched with ``add_reader`` /
``add_writer`` and closed by its owner alone, on any event loop.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

READ_SIZE = 64 * 1024


class PipeReadTransport(asyncio.ReadTransport):
    """Feeds ``reader`` from the read end ``fd``, which it owns: an ``asyncio.StreamReader``,
    or anything with its ``set_transport``, ``feed_data``, ``feed_eof`` and ``set_exception``.

    The reader pauses and resumes it as its buffer fills and empties (its own flow
    control); the end of the pipe, or an error reading it, ends the reader and closes ``fd``.

    Args:
        fd: the read end (made non-blocking here).
        reader: where the bytes go.
    """

    def __init__(self, fd: int, reader: Any) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._reader = reader
        self._reading = False
        self._closed = False
        os.set_blocking(fd, False)
        reader.set_transport(self)
        self.resume_reading()

    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self._closed:
            self._loop.add_reader(self._fd, self._readable)
            self._reading = True

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._reader.set_exception(exc)
            self.close()
            return
        if data:
            self._reader.feed_data(data)
            return
        self.close()  # the end of the pipe: the reader sees it there

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop reading and close the descriptor (once); the reader sees the end."""
        if self._closed:
            return
        self.pause_reading()
        self._closed = True
        os.close(self._fd)
        self._reader.feed_eof()


class PipeWriter:
    """Writes whole frames to the write end ``fd``, which it owns; one frame at a time.

    Args:
        fd: the write end (made non-blocking here).
    """

    def __init__(self, fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._closed = False
        self._lock = asyncio.Lock()  # frames never interleave
        self._waiting: asyncio.Future[None] | None = None  # a send's wait for room
        os.set_blocking(fd, False)

    def is_closing(self) -> bool:
        return self._closed

    async def send(self, data: bytes) -> None:
        """Write all of ``data``, waiting while the pipe is full.

        Raises:
            ConnectionError: the pipe is closed, or its reader is gone.
        """
        async with self._lock:
            view = memoryview(data)
            while view:
                if self._closed:
                    raise ConnectionResetError("the pipe is closed")
                try:
                    view = view[os.write(self._fd, view) :]
                except (BlockingIOError, InterruptedError):
                    await self._writable()
                except OSError as exc:
                    self.close()
                    raise ConnectionResetError(f"the pipe's reader is gone: {exc}") from exc

    async def _writable(self) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()
        self._waiting = ready

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_writer(self._fd, wake)
        try:
            await ready
        finally:
            self._waiting = None
            if not self._closed:
                self._loop.remove_writer(self._fd)

    def close(self) -> None:
        """Close the descriptor (once); a send waiting for room ends with ConnectionError."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_writer(self._fd)
        os.close(self._fd)
        if self._waiting is not None and not self._waiting.done():
            self._waiting.set_result(None)  # the send sees the pipe closed
