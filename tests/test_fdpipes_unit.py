"""The executor's own pipe ends (executor.fdpipes): every byte through, flow control both
ways, and each descriptor closed once, by its owner."""

from __future__ import annotations

import asyncio
import os

import pytest
import uvloop

from jobmesh.executor import fdpipes
from jobmesh.executor.fdpipes import PipeReadTransport, PipeWriter
from tests.helpers import eventually


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


@pytest.fixture
def counted_closes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.close

    def close(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(fdpipes.os, "close", close)
    return calls


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_frame_larger_than_the_pipe_arrives_whole_and_both_ends_close_once(run, counted_closes):
    payload = bytes(range(256)) * 4096  # 1 MiB: many times a pipe's buffer

    async def main() -> tuple[bytes, int, int]:
        read_fd, write_fd = os.pipe()
        reader = asyncio.StreamReader(limit=64 * 1024)
        transport = PipeReadTransport(read_fd, reader)
        writer = PipeWriter(write_fd)

        async def send() -> None:
            await writer.send(payload)
            writer.close()
            writer.close()  # twice is harmless

        sending = asyncio.ensure_future(send())
        got = await reader.read()  # to the end of the pipe
        await sending
        assert transport.is_closing() and writer.is_closing()
        return got, read_fd, write_fd

    got, read_fd, write_fd = run(main())
    assert got == payload
    assert counted_closes.count(read_fd) == 1 and counted_closes.count(write_fd) == 1
    assert closed(read_fd) and closed(write_fd)


def test_the_reader_pauses_the_pipe_while_its_buffer_is_full():
    async def main() -> None:
        read_fd, write_fd = os.pipe()
        reader = asyncio.StreamReader(limit=1024)
        transport = PipeReadTransport(read_fd, reader)
        os.write(write_fd, b"x" * 8192)

        async def paused() -> bool:
            return not transport.is_reading()

        await eventually(paused, timeout=5, what="the reader to pause the pipe")
        assert len(await reader.readexactly(8192)) == 8192
        assert transport.is_reading()  # resumed once the buffer emptied
        os.close(write_fd)
        assert await reader.read() == b""
        assert transport.is_closing()

    uvloop.run(main())


def test_a_send_to_a_pipe_whose_reader_is_gone_or_that_closes_meanwhile_fails_with_a_connection_error():
    async def main() -> None:
        read_fd, write_fd = os.pipe()
        os.close(read_fd)
        writer = PipeWriter(write_fd)
        with pytest.raises(ConnectionError):
            await writer.send(b"frame")
        assert writer.is_closing() and closed(write_fd)

        read_fd, write_fd = os.pipe()
        writer = PipeWriter(write_fd)
        # Nobody reads: the send fills the pipe and waits for room.
        waiting = asyncio.ensure_future(writer.send(b"y" * (1 << 20)))

        async def blocked() -> bool:
            return writer._waiting is not None

        await eventually(blocked, timeout=5, what="the send to wait for room")
        writer.close()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(waiting, 5)
        os.close(read_fd)

    uvloop.run(main())
