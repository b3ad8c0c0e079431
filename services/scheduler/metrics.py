"""The scheduler's own instruments: queue depth, time in queue, submits, retries, losses.

Every instrument comes from the meter handed in (the global provider's
``jobmesh.scheduler`` meter in the service, a test's in-memory one in a test). Recording
is one ``add`` or ``record`` with attributes cached per queue and tenant, so the hot path
(every release, every submit) allocates nothing new once a queue and tenant were seen.
The queue depth is observed, not counted: at collection time the gauge reads the counts
each partition's backlog keeps anyway (``QueueState.pending_by_tenant``), which costs one
step per queue and tenant, however deep the backlog. docs/metrics.md lists them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from jobmesh.scheduler.backlog import Backlog

# Seconds: from a job that starts at once (milliseconds) to one that waited for hours.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)


class SchedulerMetrics:
    """The scheduler's instruments.

    Args:
        meter: where the instruments come from; ``metrics.get_meter("jobmesh.scheduler")``
            when omitted (the API's no-op until the service installs a provider).
    """

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("jobmesh.scheduler")
        self._meter = meter
        self._labels: dict[str, dict[str, dict[str, str]]] = {}
        self._wait = meter.create_histogram(
            "jobmesh.queue.wait",
            unit="s",
            description=(
                "Time an attempt waited in its queue: from when it could first start (its submit, "
                "its dependencies met, its not_before, or its retry backoff's end) to its first release"
            ),
            explicit_bucket_boundaries_advisory=WAIT_BUCKETS,
        )
        self._submitted = meter.create_counter(
            "jobmesh.jobs.submitted",
            unit="{job}",
            description="New jobs the scheduler took into its backlog (duplicate submits not counted)",
        )
        self._retries = meter.create_counter(
            "jobmesh.retries",
            unit="{attempt}",
            description="Failed or lost attempts followed by another attempt (JobRetrying)",
        )
        self._gave_up = meter.create_counter(
            "jobmesh.jobs.gave_up",
            unit="{job}",
            description="Jobs whose failed or lost attempt was their last (JobGaveUp)",
        )
        self._lost = meter.create_counter(
            "jobmesh.attempts.lost",
            unit="{attempt}",
            description="Attempts taken as lost: their lease ran out, or their executor restarted without them",
        )

    def _of(self, queue: str, tenant: str) -> dict[str, str]:
        by_tenant = self._labels.get(queue)
        if by_tenant is None:
            by_tenant = self._labels[queue] = {}
        labels = by_tenant.get(tenant)
        if labels is None:
            labels = by_tenant[tenant] = {"queue": queue, "tenant": tenant}
        return labels

    # --- recording -------------------------------------------------------------------
    def submitted(self, queue: str, tenant: str) -> None:
        """A new job joined the backlog."""
        self._submitted.add(1, self._of(queue, tenant))

    def waited(self, queue: str, tenant: str, seconds: float) -> None:
        """An attempt was released after waiting ``seconds`` in its queue."""
        self._wait.record(max(0.0, seconds), self._of(queue, tenant))

    def retried(self, queue: str, tenant: str) -> None:
        """A failed or lost attempt gets another attempt."""
        self._retries.add(1, self._of(queue, tenant))

    def gave_up(self, queue: str, tenant: str) -> None:
        """A job's last attempt failed or was lost."""
        self._gave_up.add(1, self._of(queue, tenant))

    def lost(self, queue: str, tenant: str) -> None:
        """An attempt was lost."""
        self._lost.add(1, self._of(queue, tenant))

    # --- observing -------------------------------------------------------------------
    def observe_backlogs(self, backlogs: Callable[[], Iterable[Backlog]]) -> None:
        """Report queue depth and jobs in flight from the backlogs ``backlogs`` returns
        (those of the partitions this process owns) at every collection.

        Args:
            backlogs: called at collection time, maybe on a reader's thread; must not block.
        """

        # An OTLP reader collects on its own thread while the event loop changes the
        # backlogs: each dict is copied in one step (list() of a view holds the GIL) before
        # it is walked.
        def depth(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(count, self._of(q.name, tenant))
                for backlog in list(backlogs())
                for q in list(backlog.queues.values())
                for tenant, count in list(q.pending_by_tenant.items())
            ]

        def in_flight(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(q.in_flight, {"queue": q.name})
                for backlog in list(backlogs())
                for q in list(backlog.queues.values())
            ]

        self._meter.create_observable_gauge(
            "jobmesh.queue.depth",
            callbacks=[depth],
            unit="{job}",
            description="Jobs held in a queue and not released yet, per tenant (waiting for any reason)",
        )
        self._meter.create_observable_gauge(
            "jobmesh.queue.in_flight",
            callbacks=[in_flight],
            unit="{job}",
            description="Jobs of a queue released to the binder or running",
        )
