"""An OTLP/HTTP trace receiver for tests: what the services export, kept in memory.

It listens on loopback, takes ``POST /v1/traces`` (protobuf, as the OpenTelemetry
exporter sends it with ``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``, gzipped or not) and
turns each span into a :class:`ReceivedSpan`. Tests start it before the cluster, point
``OTEL_EXPORTER_OTLP_ENDPOINT`` at :attr:`OtlpReceiver.endpoint` and wait on
:meth:`OtlpReceiver.trace` for what they expect.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


@dataclass(frozen=True)
class ReceivedLink:
    """A span link as received: where it points, and its attributes."""

    trace_id: str
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, with hex ids ("" for no parent) and plain attribute values.

    Attributes:
        service: the resource's ``service.name``.
        kind: the OTLP span kind's name without its prefix (``SERVER``, ``CONSUMER``...).
    """

    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: list[ReceivedLink] = field(default_factory=list)
    status: str = ""


class OtlpReceiver:
    """A loopback OTLP/HTTP endpoint keeping every span it is sent.

    Args:
        status: the HTTP status it answers with (a test of a failing collector may set 503).
    """

    def __init__(self, status: int = 200) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._status = status
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._arrived = asyncio.Event()

    @property
    def endpoint(self) -> str:
        """The base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporter appends /v1/traces)."""
        return f"http://127.0.0.1:{self._port}"

    async def start(self) -> OtlpReceiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        self.requests += 1
        for resource_spans in export.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(_received(service, span))
        self._arrived.set()
        return web.Response(
            status=self._status,
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def in_trace(self, trace_id: str) -> list[ReceivedSpan]:
        """Every span received so far of ``trace_id``."""
        return [span for span in self.spans if span.trace_id == trace_id]

    def trace_of(self, job_id: str) -> str:
        """The trace id of the spans that name ``job_id`` (``jobmesh.job_id``), or ""."""
        for span in self.spans:
            if span.attributes.get("jobmesh.job_id") == job_id:
                return span.trace_id
        return ""

    async def wait_for(self, check: Callable[[], Any], timeout: float = 30.0, what: str = "spans") -> Any:
        """Wait until ``check()`` returns something truthy, re-checking as spans arrive.

        Raises:
            AssertionError: on timeout, naming ``what`` and the last value.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._arrived.clear()
            found = check()
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {found!r}")
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                pass


def _received(service: str, span: Any) -> ReceivedSpan:
    kind = type(span).SpanKind.Name(span.kind).removeprefix("SPAN_KIND_")
    return ReceivedSpan(
        service=service,
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        name=span.name,
        kind=kind,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        attributes=_attributes(span.attributes),
        links=[
            ReceivedLink(link.trace_id.hex(), link.span_id.hex(), _attributes(link.attributes)) for link in span.links
        ],
        status=type(span.status).StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
    )


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which in (None, "kvlist_value", "bytes_value"):
        return None if which is None else str(value)
    return getattr(value, which)
