"""The services' own metrics: each instrument records what the service code did, the
Prometheus exporter gives them the names docs/metrics.md lists, and the Grafana dashboard
queries only names the exporter really produces.

Each service's code path runs for real (a scheduler partition on a real Postgres, a binder
on a real NATS server, the executor's dispatch handler running real processes, the
trigger's firer and HTTP ingress, the tracker's handler), with its instruments made from a
meter of an SDK provider that reads into memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest
from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, NumberDataPoint
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from jobmesh.binder.allocations import Allocations
from jobmesh.binder.handlers import Binder
from jobmesh.binder.metrics import BinderMetrics, NodeUsage
from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import (
    AttemptLease,
    JobBound,
    JobError,
    JobFailed,
    JobLost,
    JobOrigin,
    JobReady,
    JobSpec,
    JobSubmitted,
    JobSucceeded,
    JobUpdate,
    NodeInfo,
    NoopRuntime,
    ProcessRuntime,
    QueueConfig,
    Resources,
    RetryPolicy,
    Submission,
    Timeouts,
)
from jobmesh.contract.subjects import SERVICES
from jobmesh.dev.servers import free_port
from jobmesh.executor.attempts import Attempts
from jobmesh.executor.handlers import DispatchHandler
from jobmesh.executor.leases import LeaseBook
from jobmesh.executor.metrics import ExecutorMetrics
from jobmesh.executor.reporter import Reporter
from jobmesh.executor.runner import ProcessRunner
from jobmesh.executor.service import job_base_env
from jobmesh.runtime.db import connect_pool
from jobmesh.runtime.metrics import Metrics as RuntimeMetrics
from jobmesh.runtime.nodes import NodeWatcher
from jobmesh.runtime.provisioning import provision
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.service import Envelope
from jobmesh.runtime.tracing import Tracing, carried
from jobmesh.scheduler import store
from jobmesh.scheduler.backlog import Backlog, Job
from jobmesh.scheduler.handlers import PartitionScheduler, Round
from jobmesh.scheduler.metrics import SchedulerMetrics
from jobmesh.tracker.metrics import TrackerMetrics
from jobmesh.trigger.firing import Fire, Firer
from jobmesh.trigger.metrics import TriggerMetrics
from jobmesh.trigger.stats import RuleStats
from jobmesh.trigger.webhooks import HttpIngress
from tests.cluster_fixtures import Service
from tests.helpers import eventually

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards" / "jobmesh.json"
MIB = 1024 * 1024


# --- reading an in-memory provider ---------------------------------------------------------
def points(reader: InMemoryMetricReader, name: str) -> dict[frozenset, object]:
    """Every data point of instrument ``name``: attributes -> value (a histogram: (count, sum))."""
    data = reader.get_metrics_data()
    out: dict[frozenset, object] = {}
    if data is None:
        return out
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:
                    key = frozenset(point.attributes.items())
                    if isinstance(point, HistogramDataPoint):
                        out[key] = (point.count, point.sum)
                    else:
                        assert isinstance(point, NumberDataPoint)
                        out[key] = point.value
    return out


def at(**labels: str | int) -> frozenset:
    return frozenset(labels.items())


class Meters:
    """An SDK provider reading into memory, and meters from it."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def meter(self, name: str = "test"):
        return self.provider.get_meter(name)

    def points(self, name: str) -> dict[frozenset, object]:
        return points(self.reader, name)


@pytest.fixture
def meters() -> Iterator[Meters]:
    m = Meters()
    yield m
    m.provider.shutdown()


# --- scheduler: a partition on a real Postgres ---------------------------------------------
class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingPublisher:
    def __init__(self) -> None:
        self.sent: list = []

    async def publish(self, items):
        items = list(items)
        self.sent.extend(items)
        return [type("Ack", (), {"duplicate": False})() for _ in items]


class Anywhere:
    class _Placement:
        def place_job(self, job):
            return ["n1"], [0], ""

        def zone_of(self, node):
            return ""

    _p = _Placement()

    def current(self):
        return self._p


class Config:
    zones = None

    def queue(self, name):
        return QueueConfig()

    def weight(self, tenant):
        return 1.0


@pytest.fixture
async def pool(database_url):
    pool = await connect_pool(database_url, "scheduler", store.DDL)
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE backlog, dep_ends, dep_watches, dep_children, dep_edges")
    yield pool
    await pool.close()


def env(message) -> Envelope:
    return Envelope(message=message, subject="x", headers={}, context=None)


def submit(job_id: str, tenant: str, **fields) -> JobSubmitted:
    spec = JobSpec(runtime=NoopRuntime(), queue="q", tenant=tenant, **fields)
    return JobSubmitted(job_id=job_id, partition=0, spec=spec, idempotency_key=job_id, submitted_at=1000.0)


async def test_the_scheduler_counts_submits_waits_depth_retries_losses_and_give_ups(pool, meters):
    clock = Clock(1004.0)
    instruments = SchedulerMetrics(meters.meter())
    mono = Clock(0.0)
    part = PartitionScheduler(
        0, pool, RecordingPublisher(), Anywhere(), Config(), Tracing.off(), clock=clock, monotonic=mono,
        metrics=instruments,
    )  # fmt: skip
    instruments.observe_backlogs(lambda: [part.backlog])
    await part.load()
    retry = RetryPolicy(max_attempts=2, backoff=1.0, jitter=0.0)
    # a and b start at once (after 4 s in the queue); c waits for its start time.
    await part.handle(
        [env(submit("a", "t", retry=retry)), env(submit("b", "u")), env(submit("c", "t", not_before=5000.0))]
    )
    assert meters.points("jobmesh.jobs.submitted") == {at(queue="q", tenant="t"): 2, at(queue="q", tenant="u"): 1}
    assert meters.points("jobmesh.queue.wait") == {
        at(queue="q", tenant="t"): (1, 4.0),
        at(queue="q", tenant="u"): (1, 4.0),
    }
    assert meters.points("jobmesh.queue.depth") == {at(queue="q", tenant="t"): 1, at(queue="q", tenant="u"): 0}
    assert meters.points("jobmesh.queue.in_flight") == {at(queue="q"): 2}

    # a's first attempt fails: attempt 2 after a 1 s backoff, released 2 s after that.
    clock.now = 1010.0
    failed = JobFailed(
        job_id="a", attempt=1, partition=0, node_id="n1", exit_code=3,
        error=JobError(code="exit_code", message="exit 3"), output_tail="", submitted_at=1000.0,
        started_at=1005.0, at=1010.0,
    )  # fmt: skip
    await part.handle([env(failed)])
    assert meters.points("jobmesh.retries") == {at(queue="q", tenant="t"): 1}
    clock.now = 1013.0
    async with pool.acquire() as conn, conn.transaction():
        await part._publish_and_record(conn, part._plan(clock.now), Round(clock.now))
    assert part.backlog.jobs["a"].attempt == 2 and part.backlog.jobs["a"].where == "released"
    assert meters.points("jobmesh.queue.wait")[at(queue="q", tenant="t")] == (2, 6.0)  # the retry waited 2 s

    # Its second attempt is lost: it was the last one.
    clock.now = 1020.0
    await part.handle([env(JobLost(job_id="a", attempt=2, partition=0, node_id="n1", at=1020.0, reason="gone"))])
    assert meters.points("jobmesh.attempts.lost") == {at(queue="q", tenant="t"): 1}
    assert meters.points("jobmesh.jobs.gave_up") == {at(queue="q", tenant="t"): 1}
    assert meters.points("jobmesh.retries") == {at(queue="q", tenant="t"): 1}
    assert meters.points("jobmesh.queue.in_flight") == {at(queue="q"): 1}  # b runs on

    # b's node renews its lease once, then falls silent past b's heartbeat timeout.
    lease = AttemptLease(job_id="b", attempt=1, partition=0, started_at=1005.0)
    part.observe(NodeInfo(node_id="n1", cpu_milli=1000, memory_mb=1000, incarnation="i1", attempts=[lease]), 1.0)
    mono.now = 1.0 + JobSpec(runtime=NoopRuntime()).timeouts.heartbeat + 1.0
    await part.handle([])
    assert meters.points("jobmesh.attempts.lost") == {at(queue="q", tenant="t"): 1, at(queue="q", tenant="u"): 1}
    assert meters.points("jobmesh.jobs.gave_up") == {at(queue="q", tenant="t"): 1, at(queue="q", tenant="u"): 1}
    assert meters.points("jobmesh.queue.in_flight") == {at(queue="q"): 0}


# --- binder: a real NATS server ------------------------------------------------------------
@pytest.fixture
async def js(nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await provision(js)
    yield js
    await nc.close()


async def test_the_binder_times_placements_and_reports_each_nodes_capacity_and_allocation(js, meters):
    node_id = f"node-{uuid.uuid4().hex[:8]}"
    info = NodeInfo(
        node_id=node_id, cpu_milli=2000, memory_mb=1024, gpu=1, disk_mb=100, heartbeat_at=time.time() + 3600
    )
    await (await js.key_value(subjects.KV_NODES)).put(node_id, encode(info))
    nodes = NodeWatcher(js, ttl=10.0)
    allocations = Allocations(js)
    await allocations.open()
    tasks = [asyncio.ensure_future(nodes.run()), asyncio.ensure_future(allocations.watch())]
    try:
        await nodes.wait_ready()
        await allocations.wait_ready()
        instruments = BinderMetrics(meters.meter())
        binder = Binder(allocations, nodes, Publisher(js), metrics=instruments)
        instruments.observe_nodes(binder.usage)

        def ready(job_id: str, resources: Resources, waited: float) -> JobReady:
            spec = JobSpec(runtime=NoopRuntime(), queue="batch", resources=resources)
            return JobReady(
                job_id=job_id, attempt=1, partition=0, spec=spec, candidates=[node_id], submitted_at=0.0,
                ready_at=time.time() - waited,
            )  # fmt: skip

        fits = ready(f"fits-{node_id}", Resources(cpu_milli=500, memory_mb=256, gpu=1, disk_mb=10), 0.5)
        too_big = ready(f"big-{node_id}", Resources(cpu_milli=4000, memory_mb=1), 0.0)
        await binder.bind([env(fits), env(too_big)])

        latency = meters.points("jobmesh.placement.latency")
        assert set(latency) == {at(queue="batch", outcome="bound"), at(queue="batch", outcome="unplaceable")}
        count, seconds = latency[at(queue="batch", outcome="bound")]
        assert count == 1 and 0.5 <= seconds < 30
        mine = at(node=node_id)

        def of(name: str) -> object:
            return meters.points(name)[mine]

        async def reserved() -> bool:
            return bool(binder.usage()) and of("jobmesh.node.reservations") == 1

        await eventually(reserved, timeout=10, what="the reservation in the binder's view")
        assert (of("jobmesh.node.cpu.capacity"), of("jobmesh.node.cpu.allocated")) == (2.0, 0.5)
        assert (of("jobmesh.node.memory.capacity"), of("jobmesh.node.memory.allocated")) == (1024 * MIB, 256 * MIB)
        assert (of("jobmesh.node.gpu.capacity"), of("jobmesh.node.gpu.allocated")) == (1, 1)
        assert (of("jobmesh.node.disk.capacity"), of("jobmesh.node.disk.allocated")) == (100 * MIB, 10 * MIB)
        assert of("jobmesh.node.alive") == 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- executor: the dispatch handler running real processes ---------------------------------
class FakeRecord:
    def put_soon(self) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class AckingPublisher:
    async def publish(self, items):
        return [None] * len(list(items))


def bound(job_id: str, queue: str, runtime) -> JobBound:
    return JobBound(
        job_id=job_id, attempt=1, partition=0, node_id="n1", spec=JobSpec(runtime=runtime, queue=queue,
        timeouts=Timeouts(run=30.0)), scratch_dir="", submitted_at=1.0, bound_at=2.0,
    )  # fmt: skip


async def test_the_executor_records_each_attempts_run_time_by_queue_and_outcome(tmp_path, meters):
    instruments = ExecutorMetrics(meters.meter())
    reporter = Reporter(AckingPublisher(), on_durable=instruments.reported)
    reporter.start()
    runner = ProcessRunner(job_base_env(os.environ), kill_grace=0.5, pipe_grace=0.5)
    attempts = Attempts("n1", tmp_path, reporter, runner, trace.get_tracer("test"), leases=LeaseBook())
    handler = DispatchHandler("n1", attempts, reporter, FakeRecord(), metrics=instruments)
    instruments.observe_running("n1", lambda: attempts.running)
    try:
        jobs = [
            bound("slow", "batch", ProcessRuntime(argv=["sleep", "0.3"])),
            bound("bad", "batch", ProcessRuntime(argv=["sh", "-c", "exit 3"])),
            bound("noop", "fast", NoopRuntime()),
        ]
        envelopes = [Envelope(job, subjects.node_dispatch("n1"), {}, carried({})) for job in jobs]
        assert await handler(envelopes) is None
        assert meters.points("jobmesh.executor.attempts.running")[at(node="n1")] == 2

        async def finished() -> bool:
            return attempts.running == 0

        await eventually(finished, timeout=10, what="the attempts to finish")
        await reporter.flush()
        runs = meters.points("jobmesh.attempt.duration")
        assert set(runs) == {
            at(queue="batch", outcome="succeeded"),
            at(queue="batch", outcome="failed", **{"error.type": "exit_code"}),
            at(queue="fast", outcome="succeeded"),
        }
        count, seconds = runs[at(queue="batch", outcome="succeeded")]
        assert count == 1 and 0.3 <= seconds < 10
        assert runs[at(queue="fast", outcome="succeeded")][0] == 1
        assert meters.points("jobmesh.executor.attempts.running")[at(node="n1")] == 0
    finally:
        await reporter.close(1)


# --- trigger: the firer, the per-rule figures and the HTTP ingress --------------------------
class Acks:
    """Acknowledges a publish; the message ids in ``seen`` come back as duplicates."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def publish(self, items):
        acks = []
        for item in items:
            acks.append(type("Ack", (), {"duplicate": item.msg_id in self.seen})())
            self.seen.add(item.msg_id)
        return acks


async def test_the_trigger_counts_fires_by_kind_and_rule_failures_and_skips(meters):
    instruments = TriggerMetrics(meters.meter())
    stats = RuleStats(None, "i1", instruments)
    firer = Firer(Acks(), 4, None, stats)
    spec = JobSpec(runtime=NoopRuntime())

    def fire(rule: str, kind: str, key: str) -> Fire:
        return Fire(rule, spec, key, JobOrigin(kind=kind, rule=rule))

    await firer.fire([fire("nightly", "schedule", "k1"), fire("hook", "webhook", "k2"), fire("hook", "webhook", "k3")])
    await firer.fire([fire("nightly", "schedule", "k1")])  # a redelivery: a duplicate, not a fire
    stats.failed("hook", "template: missing field", 1.0)
    stats.skipped("paused-rule")
    assert meters.points("jobmesh.trigger.fires") == {
        at(kind="schedule", rule="nightly"): 1,
        at(kind="webhook", rule="hook"): 2,
    }
    assert meters.points("jobmesh.trigger.failures") == {at(rule="hook"): 1}
    assert meters.points("jobmesh.trigger.skipped") == {at(rule="paused-rule"): 1}
    assert stats.local("hook").fires == 2  # the per-rule figures count the same


async def test_the_trigger_times_each_http_request_by_route_and_status(meters):
    instruments = TriggerMetrics(meters.meter())
    ingress = HttpIngress("127.0.0.1:0", None, None, None, lambda _n: None, None, None, metrics=instruments)  # type: ignore[arg-type]
    await ingress.start()
    try:
        base = f"http://127.0.0.1:{ingress.port}"
        async with aiohttp.ClientSession() as http:
            for method, path in (("GET", "/v1/health"), ("POST", "/v1/jobs"), ("GET", "/nowhere")):
                async with http.request(method, base + path) as resp:
                    await resp.read()
    finally:
        await ingress.stop()
    requests = meters.points("http.server.request.duration")
    method, status, route = "http.request.method", "http.response.status_code", "http.route"
    assert {key: value[0] for key, value in requests.items()} == {  # type: ignore[index]
        at(**{method: "GET", status: 200, route: "/v1/health"}): 1,
        at(**{method: "POST", status: 403, route: "/v1/jobs"}): 1,  # no submit token configured
        at(**{method: "GET", status: 404}): 1,
    }


# --- tracker -------------------------------------------------------------------------------
def test_the_tracker_counts_the_jobs_a_batch_made_final(meters):
    instruments = TrackerMetrics(meters.meter())
    instruments.announced(
        [
            JobUpdate(job_id="a", state="succeeded", attempt=1, final=True),
            JobUpdate(job_id="b", state="failed", attempt=1, final=False),  # a retry follows
            JobUpdate(job_id="c", state="failed", attempt=2, final=True),
            JobUpdate(job_id="d", state="running", attempt=1),
        ]
    )
    assert meters.points("jobmesh.jobs.finished") == {at(state="succeeded"): 1, at(state="failed"): 1}


# --- a running cluster: each replica's /metrics --------------------------------------------
async def test_each_service_process_serves_its_metrics_on_its_ops_endpoint(make_cluster, nats_server):
    ports = {name: free_port() for name in SERVICES}
    await make_cluster([Service(name, {"JOBMESH_OPS_LISTEN": f"127.0.0.1:{ports[name]}"}) for name in SERVICES])
    client = await Client.connect(nats_server.url)
    try:
        spec = JobSpec(runtime=ProcessRuntime(argv=["true"]), queue="scraped", tenant="acme")
        reply = await client.submit([Submission(spec=spec, idempotency_key=f"scraped-{uuid.uuid4().hex}")])

        async def succeeded() -> bool:
            try:
                return (await client.get(reply.job_ids[0])).state == "succeeded"
            except Exception:  # noqa: BLE001 - not recorded yet
                return False

        await eventually(succeeded, what="the job to succeed")
        node_id = (await client.get(reply.job_ids[0])).node_id
    finally:
        await client.close()
    wanted = {
        "scheduler": ("jobmesh_queue_wait_seconds_count{", 'queue="scraped"', 'tenant="acme"'),
        "binder": ("jobmesh_placement_latency_seconds_count{", 'outcome="bound"', 'queue="scraped"'),
        "executor": ("jobmesh_attempt_duration_seconds_count{", 'outcome="succeeded"', 'queue="scraped"'),
        "tracker": ("jobmesh_jobs_finished_total{", 'state="succeeded"'),
    }
    async with aiohttp.ClientSession() as http:

        async def scraped(name: str) -> str:
            async with http.get(f"http://127.0.0.1:{ports[name]}/metrics") as resp:
                assert resp.status == 200
                return await resp.text()

        for name, parts in wanted.items():

            async def shows(name: str = name, parts: tuple[str, ...] = parts) -> bool:
                text = await scraped(name)
                return any(all(part in line for part in parts) for line in text.splitlines())

            await eventually(shows, timeout=20, what=f"{name}'s /metrics to show {parts}")
        lines = (await scraped("binder")).splitlines()
        assert any(line.startswith("jobmesh_node_cpu_capacity{") and f'node="{node_id}"' in line for line in lines)
        assert "jobmesh_executor_attempts_running{" in await scraped("executor")
        assert "jobmesh_queue_depth{" in await scraped("scheduler")
        # The runtime's own: the submit request counted by subject, and consumer lag for
        # the durables running now, the scheduler's partition consumers (added after its
        # leases, after start) included. The lag poll runs every 10 s.
        submits = [
            line
            for line in (await scraped("trigger")).splitlines()
            if line.startswith("jobmesh_messages_processed_total{") and 'destination="jobmesh.v1.api.submit"' in line
        ]
        assert submits and float(submits[0].rsplit(" ", 1)[1]) >= 1, submits

        async def lag_of(name: str, durable: str) -> bool:
            return any(
                line.startswith("jobmesh_consumer_lag{") and f'durable="{durable}"' in line
                for line in (await scraped(name)).splitlines()
            )

        await eventually(
            lambda: lag_of("tracker", "tracker-jobs"), timeout=40, interval=0.5, what="the tracker's consumer lag"
        )
        await eventually(
            lambda: lag_of("scheduler", "scheduler-p0"), timeout=40, interval=0.5, what="a scheduler partition's lag"
        )


# --- the exported names and the dashboard --------------------------------------------------
def exported_names() -> set[str]:
    """Every sample name the Prometheus exporter produces for every instrument of the
    services and the runtime, each instrument made by its own class and given a value."""
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    try:
        meter = provider.get_meter("names")
        scheduler = SchedulerMetrics(meter)
        backlog = Backlog()
        spec = JobSpec(runtime=NoopRuntime())
        backlog.add(
            Job.of(JobSubmitted(job_id="j", partition=0, spec=spec, idempotency_key="j", submitted_at=0.0), 1), 0.0
        )
        scheduler.observe_backlogs(lambda: [backlog])
        scheduler.submitted("q", "t")
        scheduler.waited("q", "t", 1.0)
        scheduler.retried("q", "t")
        scheduler.gave_up("q", "t")
        scheduler.lost("q", "t")
        binder = BinderMetrics(meter)
        binder.placed("q", "bound", 0.01)
        node = NodeInfo(node_id="n", cpu_milli=1000, memory_mb=1)
        binder.observe_nodes(lambda: [NodeUsage(node, True, Resources(cpu_milli=0, memory_mb=0), 0)])
        executor = ExecutorMetrics(meter)
        executor.started("j:1", "q")
        ended = JobSucceeded(
            job_id="j", attempt=1, partition=0, node_id="n", exit_code=0, output_tail="", submitted_at=0.0,
            started_at=1.0, at=2.0,
        )  # fmt: skip
        executor.reported([Outgoing("s", ended, "j:1:succeeded")])
        executor.observe_running("n", lambda: 0)
        trigger = TriggerMetrics(meter)
        trigger.fired("event", "r")
        trigger.failed("r")
        trigger.skipped("r")
        trigger.http_request("GET", "/v1/health", 200, 0.001)
        TrackerMetrics(meter).announced([JobUpdate(job_id="j", state="succeeded", attempt=1, final=True)])
        runtime = RuntimeMetrics(meter)
        runtime.processed("scheduler", "jobmesh.v1.job.{partition}.submitted")
        runtime.dead_lettered("trigger", "invalid")
        runtime.set_lag("JM_JOBS", "binder-ready", 3, 1)
        text = generate_latest(registry).decode()
    finally:
        provider.shutdown()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if target.get("datasource", panel.get("datasource", {})).get("type") == "prometheus":
                exprs.append(target["expr"])
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("datasource", {}).get("type") == "prometheus":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


METRIC_NAME = re.compile(r"\b(?:jobmesh|http_server)_[a-z0-9_]+")


def test_the_exporter_names_every_instrument_as_the_docs_say():
    names = exported_names()
    expected = {
        "jobmesh_queue_depth", "jobmesh_queue_in_flight", "jobmesh_queue_wait_seconds_bucket",
        "jobmesh_jobs_submitted_total", "jobmesh_retries_total", "jobmesh_jobs_gave_up_total",
        "jobmesh_attempts_lost_total", "jobmesh_placement_latency_seconds_bucket", "jobmesh_node_alive",
        "jobmesh_node_cpu_capacity", "jobmesh_node_cpu_allocated", "jobmesh_node_memory_capacity_bytes",
        "jobmesh_node_memory_allocated_bytes", "jobmesh_node_gpu_capacity", "jobmesh_node_gpu_allocated",
        "jobmesh_node_disk_capacity_bytes", "jobmesh_node_disk_allocated_bytes", "jobmesh_node_reservations",
        "jobmesh_attempt_duration_seconds_bucket", "jobmesh_executor_attempts_running", "jobmesh_trigger_fires_total",
        "jobmesh_trigger_failures_total", "jobmesh_trigger_skipped_total", "http_server_request_duration_seconds_bucket",
        "jobmesh_jobs_finished_total", "jobmesh_messages_processed_total", "jobmesh_dead_letters_total",
        "jobmesh_consumer_lag",
    }  # fmt: skip
    assert expected <= names, sorted(expected - names)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text(encoding="utf-8")
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in names if METRIC_NAME.fullmatch(name)}
    assert not [f for f in sorted(families) if f"`{f}" not in docs], "docs/metrics.md misses a metric"


def test_the_dashboard_queries_only_exported_names_and_links_to_traces():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"]
    names = exported_names()
    exprs = dashboard_exprs(dashboard)
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert used, "the dashboard queries no metric"
    assert used <= names, sorted(used - names)
    # Every metric family of the services is on the dashboard.
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in names if METRIC_NAME.fullmatch(name)}
    shown = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    assert families <= shown, sorted(families - shown)
    # Datasources: Prometheus and Tempo by their provisioned uids, nothing else.
    sources = {
        (ds["type"], ds["uid"])
        for panel in dashboard["panels"]
        for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]
        if isinstance(ds, dict)
    }
    assert sources <= {("prometheus", "prometheus"), ("tempo", "tempo")}, sources
    assert ("tempo", "tempo") in sources and ("prometheus", "prometheus") in sources
    # Links to the traces: a Tempo search panel, and links into Explore with Tempo.
    assert any(
        t.get("queryType") in ("traceql", "traceqlSearch")
        for p in dashboard["panels"]
        if p.get("datasource", {}).get("type") == "tempo"
        for t in p.get("targets", [])
    )
    links = json.dumps(dashboard["links"]) + json.dumps(
        [p.get("fieldConfig", {}).get("defaults", {}).get("links", []) for p in dashboard["panels"]]
    )
    assert "/explore" in links and "tempo" in links
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert msgspec.json.decode(DASHBOARD.read_bytes())  # strict JSON, no trailing commas
