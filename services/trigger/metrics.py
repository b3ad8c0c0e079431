"""The trigger's own instruments: fires per rule kind, rule failures and skips, HTTP ingress.

Every instrument comes from the meter handed in (the global provider's ``jobmesh.trigger``
meter in the service, a test's in-memory one in a test). The rule counters are kept beside
the per-rule figures of :class:`~jobmesh.trigger.stats.RuleStats`, which counts every fire,
failure and skip anyway; they add one ``add`` with attributes cached per rule. The
consumed events and answered submits are counted by the runtime
(``jobmesh.messages.processed``). docs/metrics.md lists them all.
"""

from __future__ import annotations

from opentelemetry import metrics

# Seconds an HTTP request takes, from a health check to a submit that waits for its PubAck.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class TriggerMetrics:
    """The trigger's instruments.

    Args:
        meter: where the instruments come from; ``metrics.get_meter("jobmesh.trigger")``
            when omitted (the API's no-op until the service installs a provider).
    """

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("jobmesh.trigger")
        self._fire_labels: dict[tuple[str, str], dict[str, str]] = {}
        self._rule_labels: dict[str, dict[str, str]] = {}
        self._fires = meter.create_counter(
            "jobmesh.trigger.fires",
            unit="{fire}",
            description=(
                "Jobs submitted and workflow runs started by trigger rules (not duplicates), by the kind "
                "of what fired: event, webhook, schedule, completion, debounce, batch, correlate"
            ),
        )
        self._failures = meter.create_counter(
            "jobmesh.trigger.failures",
            unit="{event}",
            description="Events a rule matched but could not make a job of (dead-lettered)",
        )
        self._skipped = meter.create_counter(
            "jobmesh.trigger.skipped",
            unit="{event}",
            description="Events that matched a paused rule",
        )
        # OTel's HTTP server metric (semantic conventions), for the webhook and submit ingress.
        self._http = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of the trigger's HTTP ingress requests (webhooks, POST /v1/jobs)",
            explicit_bucket_boundaries_advisory=HTTP_BUCKETS,
        )

    def _rule(self, rule: str) -> dict[str, str]:
        labels = self._rule_labels.get(rule)
        if labels is None:
            labels = self._rule_labels[rule] = {"rule": rule}
        return labels

    def fired(self, kind: str, rule: str, count: int = 1) -> None:
        """``rule`` fired ``count`` new jobs or runs; ``kind`` is their ``JobOrigin.kind``."""
        labels = self._fire_labels.get((kind, rule))
        if labels is None:
            labels = self._fire_labels[(kind, rule)] = {"kind": kind, "rule": rule}
        self._fires.add(count, labels)

    def failed(self, rule: str) -> None:
        """``rule`` could not make a job of an event it matched."""
        self._failures.add(1, self._rule(rule))

    def skipped(self, rule: str) -> None:
        """An event matched ``rule`` while it was paused."""
        self._skipped.add(1, self._rule(rule))

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """The ingress answered ``method`` on ``route`` (its path template; "" when no
        route matched) with ``status`` after ``seconds``."""
        labels: dict[str, str | int] = {"http.request.method": method, "http.response.status_code": status}
        if route:
            labels["http.route"] = route
        self._http.record(max(0.0, seconds), labels)
