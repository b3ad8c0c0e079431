"""A TCP proxy the fault tests put between a service and Postgres, to cut the link."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit, urlunsplit


class CuttableProxy:
    """Forwards a loopback port to Postgres (TCP or unix socket); ``cut`` drops everything.

    Args:
        database_url: where Postgres really is.
    """

    def __init__(self, database_url: str) -> None:
        self._target = urlsplit(database_url)
        self._server: asyncio.base_events.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self.cut_now = False
        self.port = 0

    async def start(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self) -> str:
        """The database URL, pointed at the proxy."""
        query = "&".join(f"{k}={v[0]}" for k, v in parse_qs(self._target.query).items() if k != "host")
        user = self._target.username or "postgres"
        auth = f"{user}:{self._target.password}@" if self._target.password else f"{user}@"
        return urlunsplit((self._target.scheme, f"{auth}127.0.0.1:{self.port}", self._target.path, query, ""))

    async def _open_target(self):
        socket_dir = parse_qs(self._target.query).get("host", [None])[0]
        if socket_dir and socket_dir.startswith("/"):
            port = self._target.port or 5432
            return await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{port}")
        return await asyncio.open_connection(self._target.hostname or "127.0.0.1", self._target.port or 5432)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_now:
            writer.close()
            return
        up_reader, up_writer = await self._open_target()
        self._links.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._links.difference_update((writer, up_writer))

    def cut(self) -> None:
        """Drop every open connection and refuse new ones."""
        self.cut_now = True
        for link in list(self._links):
            link.close()

    def restore(self) -> None:
        self.cut_now = False

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
