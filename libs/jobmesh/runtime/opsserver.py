"""Each replica's own operations endpoint: ``GET /healthz`` and ``GET /metrics``.

The health subject (``jobmesh.v1.health.<service>``) is answered by whichever replica of a
queue group is quickest, so it says that *a* replica is up. A compose or Nomad check must
know about the replica it runs beside: this endpoint, on ``JOBMESH_OPS_LISTEN`` inside the
replica's own network namespace, answers for this process alone.

- ``GET /healthz``: 200 ``{"status": "ok", ...}`` when healthy; 503 with
  ``{"status": "unhealthy", "problems": [...]}`` when not (not connected to NATS, a
  service's own check failing, stopping);
- ``GET /metrics``: this process's Prometheus exposition (:func:`metrics.render`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web

from jobmesh.contract.messages.v1 import HealthReply
from jobmesh.errors import InvalidSpec, Unavailable
from jobmesh.runtime import metrics

__all__ = ["OpsServer", "parse_listen"]

log = logging.getLogger("jobmesh.runtime.ops")

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def parse_listen(listen: str, variable: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464``; ``:9464`` is every interface) as host and port: every
    listen setting's one parser (the ops endpoint's, the trigger's HTTP ingress's).

    Args:
        listen: the value.
        variable: the environment variable it came from, for the error.

    Raises:
        InvalidSpec: naming ``variable``.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidSpec(
            f"{variable}: {listen!r} is not host:port (e.g. 127.0.0.1:9000, [::]:9000, :9000)",
            field=variable.removeprefix("JOBMESH_").lower(),
        )
    return host.strip("[]") or "0.0.0.0", int(port)


class OpsServer:
    """Serves ``/healthz`` and ``/metrics`` for one process, in its event loop.

    Args:
        listen: ``host:port`` (``JOBMESH_OPS_LISTEN``); port 0 picks a free one.
        health: this process's health now.
    """

    def __init__(self, listen: str, health: Callable[[], HealthReply]) -> None:
        self.host, self._port = parse_listen(listen, "JOBMESH_OPS_LISTEN")
        self._health = health
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._render)
        self.app = app

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the ops endpoint is not started")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        """Bind and serve.

        Raises:
            Unavailable: the address cannot be bound (in use, not local).
        """
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._port).start()
        except OSError as exc:
            await runner.cleanup()
            raise Unavailable(f"cannot listen on {self.host}:{self._port} (JOBMESH_OPS_LISTEN): {exc}") from exc
        self._runner = runner
        log.info("ops endpoint on http://%s:%d (/healthz, /metrics)", self.host, self.port)

    async def stop(self) -> None:
        """Stop listening."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        reply = self._health()
        body: dict[str, object] = {
            "status": "ok" if reply.ok else "unhealthy",
            "service": reply.service,
            "instance": reply.instance,
        }
        if not reply.ok:
            body["problems"] = reply.detail.split("; ")
        return web.json_response(body, status=200 if reply.ok else 503)

    async def _render(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": PROMETHEUS_TEXT})
