"""The tracker's own instrument: jobs that reached a final state, by that state.

The instrument comes from the meter handed in (the global provider's ``jobmesh.tracker``
meter in the service, a test's in-memory one in a test). It is counted from the watch
updates the tracker announces after each commit, one ``add`` per job the batch made
final, so it counts what the system of record holds. A batch redelivered after its commit
(the ack was lost) announces, and counts, its final states again. docs/metrics.md lists it.
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry import metrics

from jobmesh.contract.messages.v1 import JobUpdate


class TrackerMetrics:
    """The tracker's instruments.

    Args:
        meter: where the instruments come from; ``metrics.get_meter("jobmesh.tracker")``
            when omitted (the API's no-op until the service installs a provider).
    """

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("jobmesh.tracker")
        self._labels: dict[str, dict[str, str]] = {}
        self._finished = meter.create_counter(
            "jobmesh.jobs.finished",
            unit="{job}",
            description="Jobs the tracker recorded in a final state (succeeded, failed, cancelled, expired ...)",
        )

    def announced(self, changes: Iterable[JobUpdate]) -> None:
        """Count the jobs that ``changes`` (one batch's committed updates) made final."""
        for update in changes:
            if update.final:
                labels = self._labels.get(update.state)
                if labels is None:
                    labels = self._labels[update.state] = {"state": update.state}
                self._finished.add(1, labels)
