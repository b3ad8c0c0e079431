"""A child process whose exit is known apart from its pipes: what every runner starts.

On Python 3.11's own event loop ``Process.wait()`` returns only once every pipe is closed,
which a grandchild that escaped the process group can put off forever. The runners (process,
container) and the handler pool's workers (plain or isolated) therefore start their child
with :class:`ExitAwareProtocol`, and a worker is a :class:`PipedProcess`.
"""

from __future__ import annotations

import asyncio

READ_CHUNK = 64 * 1024  # bytes read from a child's pipe at a time (and a stream reader's limit)


class ExitAwareProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's stream protocol for a subprocess, plus a future set when it exits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=READ_CHUNK, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class PipedProcess:
    """A started child with its stdout and stderr piped: its pid, pipes and exit code.

    Args:
        transport: its subprocess transport.
        protocol: its :class:`ExitAwareProtocol`.
    """

    def __init__(self, transport: asyncio.SubprocessTransport, protocol: ExitAwareProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        assert protocol.stdout is not None and protocol.stderr is not None  # both were piped
        self._stdout: asyncio.StreamReader = protocol.stdout
        self._stderr: asyncio.StreamReader = protocol.stderr

    @property
    def pid(self) -> int:
        return self._transport.get_pid()

    @property
    def stdout(self) -> asyncio.StreamReader:
        return self._stdout

    @property
    def stderr(self) -> asyncio.StreamReader:
        return self._stderr

    async def wait(self) -> int:
        """Its exit code, once it exited (whoever still holds its pipes)."""
        await asyncio.shield(self._protocol.exited)
        code = self._transport.get_returncode()
        assert code is not None  # set before process_exited resolved ``exited``
        return code
