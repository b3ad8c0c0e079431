"""A child process whose exit is known apart from its pipes: what every runner starts.

On Python 3.11's own event loop ``Process.wait()`` returns only once every pipe is closed,
which a grandchild that escaped the process group can put off forever. The runners (process,
container) and the handler pool's workers (plain or isolated) therefore start their child
with :class:`ExitAwareProtocol`, and a worker is a :class:`PipedProcess`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

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


async def start_piped(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    stdin: Any = asyncio.subprocess.DEVNULL,
    pass_fds: Sequence[int] = (),
    preexec: Callable[[], None] | None = None,
) -> tuple[asyncio.SubprocessTransport, ExitAwareProtocol]:
    """Start ``argv`` in a session of its own, its stdout and stderr piped (what
    ``asyncio.create_subprocess_exec`` does, with an :class:`ExitAwareProtocol`).

    Args:
        argv: the command line.
        cwd: its working directory.
        env: its whole environment.
        stdin: a descriptor or file to read, else ``/dev/null``.
        pass_fds: descriptors it inherits under the same numbers.
        preexec: run in the child before it executes ``argv`` (its isolation).

    Returns:
        Its transport and protocol.

    Raises:
        OSError: it could not be started; ``subprocess.SubprocessError`` when ``preexec`` failed.
    """
    loop = asyncio.get_running_loop()
    return await loop.subprocess_exec(
        lambda: ExitAwareProtocol(loop),
        *argv,
        cwd=str(cwd),
        env=dict(env),
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        pass_fds=tuple(pass_fds),
        preexec_fn=preexec,
    )


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
