"""The executor's own instruments: the run time of each attempt, and attempts running.

Every instrument comes from the meter handed in (the global provider's
``jobmesh.executor`` meter in the service, a test's in-memory one in a test). An attempt's
run time is recorded once its terminal event is durable (the reporter hands every
published batch to :meth:`ExecutorMetrics.reported`), from the event's own ``started_at``
and ``at``, so what is counted is exactly what was reported (a gang member's
MemberSucceeded counts as a success of its node's attempt). JobFailed and MemberSucceeded
carry no queue:
the dispatch handler notes each attempt's queue when it starts it (one dict entry per
running attempt, dropped at its end). docs/metrics.md lists them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from jobmesh.contract.ids import attempt_key
from jobmesh.contract.messages.v1 import JobFailed, JobSucceeded, MemberSucceeded
from jobmesh.runtime.publisher import Outgoing

# Seconds: from a no-op (microseconds) to a long batch job.
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 10800, 43200)
SUCCEEDED = "succeeded"
FAILED = "failed"


class ExecutorMetrics:
    """The executor's instruments.

    Args:
        meter: where the instruments come from; ``metrics.get_meter("jobmesh.executor")``
            when omitted (the API's no-op until the service installs a provider).
    """

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter or metrics.get_meter("jobmesh.executor")
        self._meter = meter
        self._queues: dict[str, str] = {}  # attempt key -> its queue, while it runs
        self._labels: dict[tuple[str, str], dict[str, str]] = {}
        self._duration = meter.create_histogram(
            "jobmesh.attempt.duration",
            unit="s",
            description="Run time of an attempt on its node: from its JobStarted to its JobSucceeded or JobFailed",
            explicit_bucket_boundaries_advisory=RUN_BUCKETS,
        )

    def started(self, key: str, queue: str) -> None:
        """The attempt ``key`` (``job_id:attempt``) of a job in ``queue`` starts here."""
        self._queues[key] = queue

    def reported(self, batch: Iterable[Outgoing]) -> None:
        """A batch of messages is durable: record the run time of every attempt it ends."""
        for item in batch:
            message = item.message
            kind = type(message)
            if kind is JobSucceeded or kind is JobFailed or kind is MemberSucceeded:
                self._ended(message)

    def _ended(self, message: JobSucceeded | JobFailed | MemberSucceeded) -> None:
        queue = self._queues.pop(attempt_key(message.job_id, message.attempt), None)
        if not message.started_at:
            return  # refused without running (cancelled or superseded before it started)
        if isinstance(message, JobSucceeded):
            queue, error = queue if queue is not None else message.queue, ""
        elif isinstance(message, MemberSucceeded):
            queue, error = queue or "", ""
        else:
            queue, error = queue or "", message.error.code
        labels = self._labels.get((queue, error))
        if labels is None:
            # OTel's error.type: the failure code (a FailureCode); none on a success.
            labels = (
                {"queue": queue, "outcome": FAILED, "error.type": error}
                if error
                else {"queue": queue, "outcome": SUCCEEDED}
            )
            self._labels[(queue, error)] = labels
        self._duration.record(max(0.0, message.at - message.started_at), labels)

    def observe_running(self, node_id: str, running: Callable[[], int]) -> None:
        """Report how many attempts run on this node (``running()``) at each collection."""
        labels = {"node": node_id}

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(running(), labels)]

        self._meter.create_observable_gauge(
            "jobmesh.executor.attempts.running",
            callbacks=[observe],
            unit="{attempt}",
            description="Attempts running on the node (started and not ended)",
        )
