"""OpenTelemetry set-up and W3C trace-context propagation through NATS headers.

One :class:`Tracing` per process, built in the service's entry point and passed to the
runtime and the publisher (no module-level state). Exporting is off unless the standard
variables ask for it (``OTEL_TRACES_EXPORTER=otlp`` or ``console``, or
``OTEL_EXPORTER_OTLP_ENDPOINT``). Propagation always works:

- exporting on: the OTel propagator extracts and injects, and spans are recorded;
- exporting off (the default): nothing is recorded, so an incoming ``traceparent`` is
  carried on as it came (:class:`Carried`), without parsing, validating and rebuilding a
  span context per message. ``make bench`` prints what this fast path saves per message.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract as _otel_extract
from opentelemetry.propagate import inject as _otel_inject

Context = otel_context.Context


class Carried(Context):
    """A trace context that only carries an incoming ``traceparent`` on, unparsed.

    It is an (empty) OTel ``Context`` for any API that receives it, where it means "no
    span"; jobmesh's own inject writes its header back out as it came.
    """

    __slots__ = ("traceparent",)

    def __init__(self, traceparent: str) -> None:
        super().__init__()
        self.traceparent = traceparent


class Tracing:
    """How this process handles trace context: record and export spans, or only carry.

    Args:
        tracer: the tracer spans are started from.
        exporting: whether an SDK provider records and exports spans.
        provider: the SDK provider to flush at shutdown (None when not exporting).
    """

    def __init__(self, tracer: trace.Tracer, exporting: bool, provider: Any = None) -> None:
        self.tracer = tracer
        self.exporting = exporting
        self._provider = provider

    @classmethod
    def off(cls) -> Tracing:
        """Carry trace context, record nothing (tools, tests, and services by default)."""
        return cls(trace.get_tracer("jobmesh"), exporting=False)

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None) -> Tracing:
        """Install an SDK tracer provider when the OTEL_* variables ask for export.

        Args:
            service: becomes ``service.name`` unless OTEL_SERVICE_NAME is set.
            env: the environment to read; ``os.environ`` when omitted.
        """
        env = os.environ if env is None else env
        exporter_name = env.get("OTEL_TRACES_EXPORTER", "")
        wants_export = exporter_name in ("otlp", "console") or (
            bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")) and exporter_name != "none"
        )
        if not wants_export or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return cls.off()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", f"jobmesh-{service}")})
        provider = TracerProvider(resource=resource)
        exporter: SpanExporter
        if exporter_name == "console":
            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        # The API's global provider, as the OTel SDK expects; jobmesh itself reads only self.
        trace.set_tracer_provider(provider)
        return cls(provider.get_tracer("jobmesh"), exporting=True, provider=provider)

    def shutdown(self) -> None:
        """Flush and stop the SDK provider, if this process installed one."""
        if self._provider is not None:
            self._provider.shutdown()

    def extract(self, headers: Mapping[str, str] | None) -> Context:
        """The trace context carried by a message's headers (empty when there is none)."""
        if not self.exporting:
            return carried(headers)
        return _otel_extract(headers or {})

    def inject(self, headers: dict[str, str], ctx: Context | None) -> dict[str, str]:
        """Write ``traceparent``/``tracestate`` for ``ctx`` into ``headers`` and return them."""
        if isinstance(ctx, Carried):
            headers["traceparent"] = ctx.traceparent
            return headers
        if not self.exporting:
            if ctx is not None:
                sc = trace.get_current_span(ctx).get_span_context()
                if sc.is_valid:
                    headers["traceparent"] = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
            return headers
        _otel_inject(headers, context=ctx)
        return headers

    def open_span(
        self, name: str, headers: Mapping[str, str] | None, kind: trace.SpanKind
    ) -> tuple[trace.Span | None, Context]:
        """The span for handling one message (None when nothing is recorded) and the
        context that everything published for it continues.

        A message without a trace starts a fresh one, so every message of a job shares one
        trace id even when nothing is exported.
        """
        parent = self.extract(headers)
        if self.exporting:
            span = self.tracer.start_span(name, context=parent, kind=kind)
            return span, trace.set_span_in_context(span, parent)
        return None, parent if carries_trace(parent) else new_root()


def carried(headers: Mapping[str, str] | None) -> Context:
    """The carry-only context of a message's headers: its ``traceparent`` as it came, when
    it has the W3C shape, else an empty context."""
    parent = (headers or {}).get("traceparent", "")
    if len(parent) == 55 and parent[2] == "-" and parent[35] == "-" and parent[52] == "-":
        return Carried(parent)
    return otel_context.Context()


def carries_trace(ctx: Context | None) -> bool:
    """Whether ``ctx`` continues a trace (a carried header or a valid span)."""
    if isinstance(ctx, Carried):
        return True
    return ctx is not None and trace.get_current_span(ctx).get_span_context().is_valid


def new_root() -> Context:
    """A context starting a fresh trace, for messages that arrived without one."""
    return Carried(f"00-{random.getrandbits(128) or 1:032x}-{random.getrandbits(64) or 1:016x}-00")


def trace_id_of(headers: Mapping[str, str] | None) -> str:
    """The 32-hex trace id in a ``traceparent`` header, or "" (for tests and the CLI)."""
    parent = (headers or {}).get("traceparent", "")
    parts = parent.split("-")
    return parts[1] if len(parts) == 4 else ""
