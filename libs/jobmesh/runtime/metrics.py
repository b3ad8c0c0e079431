"""OpenTelemetry metrics for one service process, and the runtime's own instruments.

:func:`install` runs once per process, in :func:`jobmesh.runtime.entrypoint.run_service`:
it sets the OTel API's global meter provider, as the SDK expects, so every instrument made
from ``metrics.get_meter(...)``, the runtime's (:class:`Metrics`) and each service's own
(``services/<name>/metrics.py``), is exported the same way. Readers:

- Prometheus: when the replica has an ops endpoint (``JOBMESH_OPS_LISTEN``), its
  ``GET /metrics`` renders the process's instruments from prometheus_client's registry
  (unless ``OTEL_METRICS_EXPORTER`` names a list without ``prometheus``);
- OTLP: when ``OTEL_METRICS_EXPORTER`` contains ``otlp`` (endpoint, headers and interval
  from the standard ``OTEL_EXPORTER_OTLP_*`` and ``OTEL_METRIC_EXPORT_INTERVAL``).

With neither, no provider is installed and every instrument is the API's no-op. The
runtime records once per batch or per request, never per message of a batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

__all__ = ["Metrics", "install", "render"]


def install(service: str, scrape: bool, env: Mapping[str, str] | None = None) -> Any:
    """Install the global meter provider when a scrape endpoint or OTEL_* ask for one.

    Args:
        service: becomes ``service.name`` unless OTEL_SERVICE_NAME is set.
        scrape: whether this replica serves ``GET /metrics`` (it has an ops endpoint).
        env: the environment to read; ``os.environ`` when omitted.

    Returns:
        The SDK provider, to shut down at exit (flushes OTLP), or None.
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporters = _exporters(env.get("OTEL_METRICS_EXPORTER", ""))
    want_prometheus = scrape and (exporters is None or "prometheus" in exporters)
    want_otlp = exporters is not None and "otlp" in exporters
    if not (want_prometheus or want_otlp):
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource

    readers: list[MetricReader] = []
    if want_prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader())  # prometheus_client's default registry
    if want_otlp:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", f"jobmesh-{service}")})
    # No exemplars: neither reader exports them, and sampling one costs per recording.
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter

    provider = MeterProvider(metric_readers=readers, resource=resource, exemplar_filter=AlwaysOffExemplarFilter())
    metrics.set_meter_provider(provider)
    return provider


def render() -> bytes:
    """The Prometheus text exposition of this process: its OTel instruments (when a
    Prometheus reader is installed) and prometheus_client's process and GC figures."""
    from prometheus_client import REGISTRY, generate_latest

    return bytes(generate_latest(REGISTRY))


class Metrics:
    """The runtime's own instruments.

    Args:
        meter: where they come from; the global provider's ``jobmesh.runtime`` meter when
            omitted (the API's no-op until :func:`install` sets a provider).
    """

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("jobmesh.runtime")
        # consumer lag, kept by ConsumerLag's poll and read at collection time
        self._lag: dict[tuple[str, str], tuple[int, int]] = {}
        self._processed = meter.create_counter(
            "jobmesh.messages.processed",
            unit="{message}",
            description="Messages a service handled (consumed batches and answered requests), by subject template",
        )
        self._dead_letters = meter.create_counter(
            "jobmesh.dead_letters",
            unit="{message}",
            description="Messages a service refused and recorded on the dead-letter stream, by reason code",
        )
        meter.create_observable_gauge(
            "jobmesh.consumer.lag",
            callbacks=[self._observe_lag],
            unit="{message}",
            description="Messages in the stream that this durable consumer has not been delivered yet",
        )
        meter.create_observable_gauge(
            "jobmesh.consumer.ack_pending",
            callbacks=[self._observe_ack_pending],
            unit="{message}",
            description="Messages delivered to this durable consumer and not acknowledged yet",
        )

    # --- recording (per batch, per request, per dead letter) -------------------------
    def processed(self, service: str, destination: str, count: int = 1) -> None:
        """``count`` messages on ``destination`` (a subject template) were handled."""
        self._processed.add(count, {"service": service, "destination": destination})

    def dead_lettered(self, service: str, reason: str) -> None:
        """One message was refused with the reason code ``reason``."""
        self._dead_letters.add(1, {"service": service, "reason": reason})

    def set_lag(self, stream: str, durable: str, pending: int, ack_pending: int) -> None:
        """What the last consumer-info poll said about one durable."""
        self._lag[(stream, durable)] = (pending, ack_pending)

    def drop_lag(self, stream: str, durable: str) -> None:
        """Forget a durable this process no longer runs (a partition lease it lost)."""
        self._lag.pop((stream, durable), None)

    def _observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(p, {"stream": s, "durable": d}) for (s, d), (p, _) in list(self._lag.items())]

    def _observe_ack_pending(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(a, {"stream": s, "durable": d}) for (s, d), (_, a) in list(self._lag.items())]


def _exporters(value: str) -> set[str] | None:
    """OTEL_METRICS_EXPORTER as a set of names; None when unset (the default applies)."""
    names = {part.strip().lower() for part in value.split(",") if part.strip()}
    return names or None
