"""OpenTelemetry set-up and W3C trace-context propagation through NATS headers.

Exporting is off unless the standard variables ask for it (``OTEL_TRACES_EXPORTER=otlp``
or ``console``, or ``OTEL_EXPORTER_OTLP_ENDPOINT``). Propagation always works: with no SDK
installed the API's non-recording spans still carry the incoming trace id forward, so a
trace is continuous from the first publish to the last consumer at almost no cost.
"""

from __future__ import annotations

import os
from typing import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract as _extract
from opentelemetry.propagate import inject as _inject

Context = otel_context.Context


def setup_tracing(service: str, env: Mapping[str, str] | None = None) -> trace.Tracer:
    """Install an SDK tracer provider when the OTEL_* variables ask for export.

    Args:
        service: becomes ``service.name`` unless OTEL_SERVICE_NAME is set.
        env: the environment to read; ``os.environ`` when omitted.

    Returns:
        The tracer the service runtime uses for its spans.
    """
    env = os.environ if env is None else env
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "")
    wants_export = exporter_name in ("otlp", "console") or (
        bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")) and exporter_name != "none"
    )
    global _exporting
    if wants_export and env.get("OTEL_SDK_DISABLED", "").lower() != "true":
        _exporting = True
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", f"jobmesh-{service}")})
        provider = TracerProvider(resource=resource)
        if exporter_name == "console":
            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
    return trace.get_tracer("jobmesh")


def shutdown_tracing() -> None:
    """Flush and stop the SDK provider, if one was installed."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        shutdown()


# Like OTel's own global tracer provider, this is process-wide: set once at start-up.
_exporting = False


def exporting() -> bool:
    """Whether spans are recorded and exported (an SDK provider is installed)."""
    return _exporting


class Carried(dict):
    """A trace context that only carries an incoming ``traceparent`` on, unparsed.

    With exporting off nothing is recorded, so there is no need to parse, validate and
    rebuild span contexts for every message: the header travels as it came. It is an
    (empty) OTel ``Context`` for any API that receives it, where it means "no span".
    """

    __slots__ = ("traceparent",)

    def __init__(self, traceparent: str) -> None:
        super().__init__()
        self.traceparent = traceparent


def extract(headers: Mapping[str, str] | None) -> Context:
    """The trace context carried by a message's headers (empty when there is none)."""
    if not _exporting:
        parent = (headers or {}).get("traceparent", "")
        if len(parent) == 55 and parent[2] == "-" and parent[35] == "-" and parent[52] == "-":
            return Carried(parent)
        return otel_context.Context()
    return _extract(headers or {})


def carries_trace(ctx: Context | None) -> bool:
    """Whether ``ctx`` continues a trace (a carried header or a valid span)."""
    if isinstance(ctx, Carried):
        return True
    return ctx is not None and trace.get_current_span(ctx).get_span_context().is_valid


def new_root() -> Context:
    """A context starting a fresh trace, for messages that arrived without one."""
    import random

    return Carried(f"00-{random.getrandbits(128) or 1:032x}-{random.getrandbits(64) or 1:016x}-00")


def inject(headers: dict[str, str], ctx: Context | None) -> dict[str, str]:
    """Write ``traceparent``/``tracestate`` for ``ctx`` into ``headers`` and return them."""
    if isinstance(ctx, Carried):
        headers["traceparent"] = ctx.traceparent
        return headers
    if not _exporting:
        if ctx is not None:
            sc = trace.get_current_span(ctx).get_span_context()
            if sc.is_valid:
                headers["traceparent"] = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
        return headers
    _inject(headers, context=ctx)
    return headers


def trace_id_of(headers: Mapping[str, str] | None) -> str:
    """The 32-hex trace id in a ``traceparent`` header, or "" (for tests and the CLI)."""
    parent = (headers or {}).get("traceparent", "")
    parts = parent.split("-")
    return parts[1] if len(parts) == 4 else ""
