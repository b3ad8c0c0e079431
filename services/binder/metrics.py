"""The binder's own instruments: placement latency, and each node's capacity and allocation.

Every instrument comes from the meter handed in (the global provider's ``jobmesh.binder``
meter in the service, a test's in-memory one in a test). The placement histogram is
recorded once per JobReady answered, with attributes cached per queue and outcome. The
node gauges are observed: at collection time they read this replica's node view and
allocation cache (``Binder.usage``), a step per node; every binder replica reports the
same nodes, so a dashboard takes ``max by (node)``. docs/metrics.md lists them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from jobmesh.contract.messages.v1 import NodeInfo, Resources

# Seconds from a release to its binding: milliseconds normally, seconds under contention.
PLACEMENT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
MIB = 1024 * 1024
# One collection calls every node gauge's callback in turn: they share one reading.
USAGE_REUSE_SECONDS = 1.0


class NodeUsage(NamedTuple):
    """One node as the binder sees it: its record, whether it is alive, what is reserved."""

    node: NodeInfo
    alive: bool
    used: Resources
    reservations: int


class BinderMetrics:
    """The binder's instruments.

    Args:
        meter: where the instruments come from; ``metrics.get_meter("jobmesh.binder")``
            when omitted (the API's no-op until the service installs a provider).
        monotonic: monotonic seconds (how long one node reading is reused).
    """

    def __init__(self, meter: metrics.Meter | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        meter = meter or metrics.get_meter("jobmesh.binder")
        self._meter = meter
        self._monotonic = monotonic
        self._labels: dict[str, dict[str, dict[str, str]]] = {}
        self._latency = meter.create_histogram(
            "jobmesh.placement.latency",
            unit="s",
            description=(
                "From the scheduler's release of an attempt (JobReady.ready_at) to the binder's "
                "answer: bound (JobBound published) or unplaceable"
            ),
            explicit_bucket_boundaries_advisory=PLACEMENT_BUCKETS,
        )
        self._preemptions = meter.create_counter(
            "jobmesh.preemptions",
            unit="{attempt}",
            description="Attempts stopped to make room for a higher-priority job, by the preempting job's queue",
        )

    def preempted(self, queue: str, victims: int) -> None:
        """A job of ``queue`` preempted ``victims`` attempts."""
        self._preemptions.add(victims, {"queue": queue})

    def placed(self, queue: str, outcome: str, seconds: float) -> None:
        """A JobReady was answered ``outcome`` (``bound`` or ``unplaceable``) after ``seconds``."""
        by_outcome = self._labels.get(queue)
        if by_outcome is None:
            by_outcome = self._labels[queue] = {}
        labels = by_outcome.get(outcome)
        if labels is None:
            labels = by_outcome[outcome] = {"queue": queue, "outcome": outcome}
        self._latency.record(max(0.0, seconds), labels)

    def observe_nodes(self, usage: Callable[[], Iterable[NodeUsage]]) -> None:
        """Report every node's capacity and allocation from ``usage`` at each collection.

        Args:
            usage: the nodes with their reservations (``Binder.usage``); called at
                collection time, maybe on a reader's thread, and must not block.
        """
        reading: list[list[NodeUsage]] = []
        read_at = [0.0]

        def current() -> list[NodeUsage]:
            now = self._monotonic()
            if not reading or now - read_at[0] > USAGE_REUSE_SECONDS:
                reading[:] = [list(usage())]
                read_at[0] = now
            return reading[0]

        def gauge(name: str, unit: str, description: str, value: Callable[[NodeUsage], float]) -> None:
            def observe(options: CallbackOptions) -> Iterable[Observation]:
                return [Observation(value(u), {"node": u.node.node_id}) for u in current()]

            self._meter.create_observable_gauge(name, callbacks=[observe], unit=unit, description=description)

        gauge("jobmesh.node.alive", "", "1 while the node's heartbeats are fresh, 0 after", lambda u: int(u.alive))
        gauge("jobmesh.node.cpu.capacity", "{cpu}", "CPU the node offers, in cores", lambda u: u.node.cpu_milli / 1000)
        gauge(
            "jobmesh.node.cpu.allocated",
            "{cpu}",
            "CPU reserved on the node, in cores",
            lambda u: u.used.cpu_milli / 1000,
        )
        gauge("jobmesh.node.memory.capacity", "By", "Memory the node offers", lambda u: u.node.memory_mb * MIB)
        gauge("jobmesh.node.memory.allocated", "By", "Memory reserved on the node", lambda u: u.used.memory_mb * MIB)
        gauge("jobmesh.node.gpu.capacity", "{gpu}", "GPUs the node offers", lambda u: u.node.gpu)
        gauge("jobmesh.node.gpu.allocated", "{gpu}", "GPUs reserved on the node", lambda u: u.used.gpu)
        gauge("jobmesh.node.disk.capacity", "By", "Scratch disk the node offers", lambda u: u.node.disk_mb * MIB)
        gauge("jobmesh.node.disk.allocated", "By", "Scratch disk reserved on the node", lambda u: u.used.disk_mb * MIB)
        gauge(
            "jobmesh.node.reservations",
            "{reservation}",
            "Attempts holding a reservation on the node",
            lambda u: u.reservations,
        )
