"""Traces end to end: the five services export to an OTLP receiver inside the test.

One job is one trace: its submit is the root, every span's parent is in the trace, and the
trigger, scheduler, binder, executor and tracker each add their spans (``receive``,
``process``, ``send``, named by subject template, with the messaging attributes), the wait
in the queue, the run, and the queries. A retry is a new attempt span linked to the
failed one; a workflow run is one trace with its steps beneath it. And when the endpoint
cannot be reached, jobs still run and the services still stop on time.
"""

from __future__ import annotations

import re
import socket
import time

import nats
import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from jobmesh.client.client import Client
from jobmesh.client.workflows import read_workflow_file
from jobmesh.contract.messages.v1 import JobSpec, ProcessRuntime, RetryPolicy, Submission
from jobmesh.contract.subjects import SERVICES
from jobmesh.dev.cluster import LocalCluster
from jobmesh.runtime.db import create_database, drop_database
from jobmesh.runtime.tracing import (
    AttemptIds,
    NoLoneQueries,
    Tracing,
    attempt_span_id,
    record_lost_attempt,
    start_attempt_span,
    subject_template,
)
from tests.cluster_fixtures import E2E_NODE_ENV, NODE_ID, fired_by
from tests.helpers import eventually
from tests.natsauth_fixtures import AuthNats
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.integration

MESSAGING = ("send", "receive", "process")


def exporting_to(endpoint: str) -> dict[str, str]:
    """The standard variables that make every service export to ``endpoint`` quickly."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds between exports (5 s by default)
    }


@pytest.fixture(scope="module")
async def receiver():
    otlp = await OtlpReceiver().start()
    yield otlp
    await otlp.stop()


@pytest.fixture(scope="module")
async def traced_cluster(make_module_cluster, receiver):
    return await make_module_cluster(env={**E2E_NODE_ENV, **exporting_to(receiver.endpoint)}, name="traced")


@pytest.fixture
async def client(traced_cluster, nats_server):
    cl = await Client.connect(nats_server.url)
    yield cl
    await cl.close()


async def _ended(client: Client, job_id: str, state: str = "succeeded") -> None:
    async def done() -> bool:
        try:
            return (await client.get(job_id)).state == state
        except Exception:  # noqa: BLE001 - not recorded yet
            return False

    await eventually(done, timeout=60, what=f"job {job_id} to be {state}")


def whole(spans: list[ReceivedSpan]) -> list[str]:
    """What keeps ``spans`` from being one whole trace (empty when it is one): a parent
    that is missing, or more than one root."""
    ids = {span.span_id for span in spans}
    problems = [
        f"{s.service} {s.name}: parent {s.parent_span_id} missing"
        for s in spans
        if s.parent_span_id and s.parent_span_id not in ids
    ]
    roots = [f"{s.service} {s.name}" for s in spans if not s.parent_span_id]
    if len(roots) != 1:
        problems.append(f"roots: {roots}")
    return problems


def tree(spans: list[ReceivedSpan]) -> str:
    """The trace as an indented outline (service, kind, name), for failure messages."""
    children: dict[str, list[ReceivedSpan]] = {}
    for span in sorted(spans, key=lambda s: s.start_ns):
        children.setdefault(span.parent_span_id, []).append(span)
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in children.get(parent, []):
            lines.append(f"{'  ' * depth}{span.name}  [{span.service.removeprefix('jobmesh-')} {span.kind}]")
            walk(span.span_id, depth + 1)

    walk("", 0)
    return "\n".join(lines)


def services_of(spans: list[ReceivedSpan]) -> set[str]:
    return {span.service.removeprefix("jobmesh-") for span in spans}


def job_trace(receiver: OtlpReceiver, job_id: str, wanted: set[tuple[str, str]]):
    """A checker for :meth:`OtlpReceiver.wait_for`: the job's spans once the trace is whole
    and has every (service, span name) in ``wanted``."""

    def check():
        trace_id = receiver.trace_of(job_id)
        spans = receiver.in_trace(trace_id) if trace_id else []
        if not spans or whole(spans) or not wanted <= {(s.service.removeprefix("jobmesh-"), s.name) for s in spans}:
            return None
        return spans

    return check


async def test_one_job_is_one_trace_through_the_five_services(client, receiver):
    reply = await client.submit([Submission(spec=JobSpec(runtime=ProcessRuntime(argv=["true"])))])
    job_id = reply.job_ids[0]
    await _ended(client, job_id)
    wanted = {
        ("trigger", "process jobmesh.v1.api.submit"),
        ("trigger", "send jobmesh.v1.job.{partition}.submitted"),
        ("scheduler", "receive jobmesh.v1.job.{partition}.submitted"),
        ("scheduler", "process jobmesh.v1.job.{partition}.submitted"),
        ("scheduler", "send jobmesh.v1.job.{partition}.ready"),
        ("binder", "process jobmesh.v1.job.{partition}.ready"),
        ("binder", "send jobmesh.v1.node.{node}.dispatch"),
        ("executor", "process jobmesh.v1.node.{node}.dispatch"),
        ("tracker", "process jobmesh.v1.node.{node}.dispatch"),
        ("executor", "send jobmesh.v1.job.{partition}.started"),
        ("executor", "attempt jobmesh.job"),
        ("executor", "wait jobmesh.job"),
        ("executor", "run jobmesh.job"),
        ("executor", "send jobmesh.v1.job.{partition}.succeeded"),
        ("scheduler", "process jobmesh.v1.job.{partition}.succeeded"),
        ("binder", "process jobmesh.v1.job.{partition}.succeeded"),
        ("tracker", "process jobmesh.v1.job.{partition}.succeeded"),
    }
    spans = await receiver.wait_for(job_trace(receiver, job_id, wanted), what=f"the whole trace of job {job_id}")

    print(tree(spans))  # shown with -s or on failure
    assert services_of(spans) >= set(SERVICES)
    [root] = [span for span in spans if not span.parent_span_id]
    assert (root.service, root.name, root.kind) == ("jobmesh-trigger", "process jobmesh.v1.api.submit", "SERVER")
    by_id = {span.span_id: span for span in spans}

    for span in spans:
        # Names are templates: no job id, no node id, no partition number.
        assert job_id not in span.name and NODE_ID not in span.name, span.name
        assert not re.search(r"\.\d+\.", span.name), span.name
        operation = span.name.split(" ")[0]
        if operation in MESSAGING and span.attributes.get("messaging.system"):
            attrs = span.attributes
            assert attrs["messaging.system"] == "nats"
            assert attrs["messaging.operation.type"] == operation
            assert attrs["messaging.destination.template"] == span.name.split(" ", 1)[1]
            assert "{" not in attrs["messaging.destination.name"]
            if operation in ("receive", "process") and span.kind != "SERVER":
                assert attrs["messaging.consumer.group.name"], span
                assert attrs["messaging.message.id"], span
            if operation == "send":
                assert span.kind == "PRODUCER" and attrs["messaging.message.id"], span

    # A receive's process span is below it, and the receive is below the send of the message.
    for span in spans:
        if span.name.startswith("process ") and span.kind == "CONSUMER":
            receive = by_id[span.parent_span_id]
            assert receive.name == span.name.replace("process ", "receive ", 1) and receive.kind == "CLIENT"
            send = by_id[receive.parent_span_id]
            assert (
                send.kind == "PRODUCER"
                and send.attributes["messaging.message.id"] == span.attributes["messaging.message.id"]
            )
    dispatch = next(s for s in spans if s.name == "send jobmesh.v1.node.{node}.dispatch")
    assert dispatch.attributes["messaging.destination.name"] == f"jobmesh.v1.node.{NODE_ID}.dispatch"
    assert dispatch.service == "jobmesh-binder"

    # The attempt: the wait in the queue from the submit, then the run, both below it.
    [attempt] = [s for s in spans if s.name == "attempt jobmesh.job"]
    [wait] = [s for s in spans if s.name == "wait jobmesh.job"]
    [run] = [s for s in spans if s.name == "run jobmesh.job"]
    assert attempt.service == "jobmesh-executor" and attempt.attributes["jobmesh.attempt"] == 1
    assert wait.parent_span_id == attempt.span_id and run.parent_span_id == attempt.span_id
    assert wait.end_ns <= run.start_ns and wait.start_ns < wait.end_ns
    assert by_id[attempt.parent_span_id].name == "process jobmesh.v1.node.{node}.dispatch"
    ended = next(s for s in spans if s.name == "send jobmesh.v1.job.{partition}.succeeded")
    assert ended.parent_span_id == attempt.span_id

    # The queries of the scheduler and the tracker are in the job's trace.
    queries = {
        s.service
        for s in spans
        if s.attributes.get("db.system") == "postgresql" or s.attributes.get("db.system.name") == "postgresql"
    }
    assert {"jobmesh-scheduler", "jobmesh-tracker"} <= queries, queries


async def test_a_retried_job_has_a_new_attempt_span_linked_to_the_failed_one(client, receiver):
    script = 'test "$JOBMESH_ATTEMPT" = 2 || exit 3'  # the first attempt fails, the retry succeeds
    spec = JobSpec(runtime=ProcessRuntime(argv=["sh", "-c", script]), retry=RetryPolicy(max_attempts=2, backoff=0.1))
    job_id = (await client.submit([Submission(spec=spec)])).job_ids[0]
    await _ended(client, job_id)

    def two_attempts():
        spans = receiver.in_trace(receiver.trace_of(job_id))
        attempts = sorted(
            (s for s in spans if s.name == "attempt jobmesh.job"), key=lambda s: s.attributes["jobmesh.attempt"]
        )
        if (
            len(attempts) < 2
            or whole(spans)
            or "send jobmesh.v1.job.{partition}.retrying" not in {s.name for s in spans}
        ):
            return None
        return spans, attempts

    spans, (first, second) = await receiver.wait_for(two_attempts, what=f"both attempts of {job_id}")
    assert (first.attributes["jobmesh.attempt"], second.attributes["jobmesh.attempt"]) == (1, 2)
    assert first.status == "ERROR" and second.status != "ERROR"
    assert first.span_id != second.span_id and first.trace_id == second.trace_id
    assert first.links == []
    [link] = second.links
    assert (link.trace_id, link.span_id) == (first.trace_id, first.span_id)
    assert link.attributes == {"jobmesh.link": "previous_attempt", "jobmesh.attempt": 1}
    # The retry decision is in the trace too, below the failed attempt's failure.
    retrying = next(s for s in spans if s.name == "send jobmesh.v1.job.{partition}.retrying")
    assert retrying.service == "jobmesh-scheduler"
    # The retry waited from its binding, not from the submit (the first attempt is not queue time).
    [_, second_wait] = sorted((s for s in spans if s.name == "wait jobmesh.job"), key=lambda s: s.start_ns)
    assert second_wait.parent_span_id == second.span_id and second_wait.start_ns >= first.end_ns - 10**9


async def test_a_workflow_run_is_one_trace_with_its_steps_beneath_it(client, receiver):
    from pathlib import Path

    spec = read_workflow_file(Path(__file__).resolve().parent.parent / "examples" / "workflows" / "diamond.yaml")
    run = (await client.run_workflow(spec)).run
    for job_id in run.jobs.values():
        await _ended(client, job_id)

    def run_trace():
        traces = {receiver.trace_of(job_id) for job_id in run.jobs.values()}
        if len(traces) != 1 or "" in traces:
            return None
        spans = receiver.in_trace(traces.pop())
        steps = [s for s in spans if s.name.startswith("step ")]
        finished = {
            s.attributes.get("jobmesh.job_id")
            for s in spans
            if s.name == "process jobmesh.v1.job.{partition}.succeeded"
        }
        if whole(spans) or len(steps) < len(run.jobs) or not set(run.jobs.values()) <= finished:
            return None
        return spans

    spans = await receiver.wait_for(run_trace, timeout=60, what=f"the trace of run {run.run_id}")
    by_id = {span.span_id: span for span in spans}
    [root] = [s for s in spans if not s.parent_span_id]
    assert root.name == "process jobmesh.v1.api.workflows.run" and root.service == "jobmesh-trigger"
    [workflow] = [s for s in spans if s.name.startswith("workflow ")]
    assert workflow.parent_span_id == root.span_id
    steps = {s.attributes["jobmesh.step"]: s for s in spans if s.name.startswith("step ")}
    assert set(steps) == set(run.jobs)
    for step, span in steps.items():
        assert span.parent_span_id == workflow.span_id
        assert span.attributes["jobmesh.job_id"] == run.jobs[step]
    # Each step's job runs beneath its step span: its attempt's chain of parents reaches it.
    for step, job_id in run.jobs.items():
        attempt = next(s for s in spans if s.name == "attempt jobmesh.job" and s.attributes["jobmesh.job_id"] == job_id)
        chain = []
        span = attempt
        while span.parent_span_id:
            span = by_id[span.parent_span_id]
            chain.append(span.span_id)
        assert steps[step].span_id in chain, step


async def test_a_trigger_event_is_the_root_of_the_trace_of_the_job_it_fires(client, receiver, nats_server):
    rule = {
        "name": "traced-orders",
        "source": {"kind": "event", "subjects": ["jobmesh.v1.events.orders.*"]},
        "job": {"name": "order {{ subject.tokens[4] }}", "runtime": {"kind": "process", "argv": ["true"]}},
        "sample": {"subject": "jobmesh.v1.events.orders.o1", "data": {}},
    }
    await client.put_trigger(rule)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        # A plain integrator's event: nats-py, JSON, no trace context of its own.
        await js.publish("jobmesh.v1.events.orders.o-77", b"{}")
        [job] = await eventually(lambda: fired_by(js, "traced-orders"), what="the rule to fire")
        await _ended(client, job.job_id)
        wanted = {
            ("trigger", "receive jobmesh.v1.events.>"),
            ("trigger", "process jobmesh.v1.events.>"),
            ("trigger", "send jobmesh.v1.job.{partition}.submitted"),
            ("executor", "run jobmesh.job"),
            ("tracker", "process jobmesh.v1.job.{partition}.succeeded"),
        }
        spans = await receiver.wait_for(job_trace(receiver, job.job_id, wanted), what=f"the trace of {job.job_id}")
    finally:
        await client.delete_trigger("traced-orders")
        await nc.close()
    [root] = [s for s in spans if not s.parent_span_id]
    assert (root.service, root.name, root.kind) == ("jobmesh-trigger", "receive jobmesh.v1.events.>", "CLIENT")
    assert root.attributes["messaging.destination.name"] == "jobmesh.v1.events.orders.o-77"
    assert root.attributes["messaging.consumer.group.name"] == "trigger-events"
    assert services_of(spans) >= set(SERVICES)


@pytest.mark.parametrize(
    ("subject", "template"),
    [
        ("jobmesh.v1.job.3.submitted", "jobmesh.v1.job.{partition}.submitted"),
        ("jobmesh.v1.node.node-1.dispatch", "jobmesh.v1.node.{node}.dispatch"),
        ("jobmesh.v1.log.0f0f", "jobmesh.v1.log.{job_id}"),
        ("jobmesh.v1.watch.0f0f", "jobmesh.v1.watch.{job_id}"),
        ("jobmesh.v1.api.scheduler.7.explain", "jobmesh.v1.api.scheduler.{partition}.explain"),
        ("jobmesh.v1.api.submit", "jobmesh.v1.api.submit"),
        ("jobmesh.v1.deadletter.binder", "jobmesh.v1.deadletter.binder"),
        ("jobmesh.v1.events.orders.created", None),
        ("orders.created", None),
    ],
)
def test_a_subject_template_has_placeholders_where_the_subject_has_ids(subject, template):
    assert subject_template(subject) == template


def test_an_attempt_span_has_a_derived_id_and_the_next_attempt_links_to_it():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=AttemptIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("dispatch") as dispatch:
        parent = trace.set_span_in_context(dispatch)
        first = start_attempt_span(tracer, "attempt jobmesh.job", parent, "job-1", 1)
        inner = tracer.start_span("run jobmesh.job", context=trace.set_span_in_context(first))
        second = start_attempt_span(tracer, "attempt jobmesh.job", parent, "job-1", 2)
    trace_id = dispatch.get_span_context().trace_id
    assert first.get_span_context().span_id == attempt_span_id(trace_id, "job-1", 1)
    assert second.get_span_context().span_id == attempt_span_id(trace_id, "job-1", 2)
    # Only the attempt's own span gets the derived id, not what starts below it.
    assert inner.get_span_context().span_id not in (first.get_span_context().span_id, 0)
    assert not first.links
    [link] = second.links
    assert link.context.span_id == first.get_span_context().span_id and link.context.trace_id == trace_id


def test_a_lost_attempt_gets_its_span_from_the_scheduler_so_the_next_attempt_s_link_resolves():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=AttemptIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider.get_tracer("test"), exporting=True)
    tracer = tracing.tracer
    with tracer.start_as_current_span("submit") as submit:
        parent = trace.set_span_in_context(submit)
        # The executor of attempt 1 was killed: only the scheduler's stand-in is recorded.
        record_lost_attempt(tracing, parent, "job-9", 1, "gpu-1", "no lease renewal for 3s", at=1_700_000_000.5)
        retry = start_attempt_span(tracer, "attempt jobmesh.job", parent, "job-9", 2)
        retry.end()
    [lost] = [s for s in exporter.get_finished_spans() if s.attributes.get("jobmesh.lost")]
    trace_id = submit.get_span_context().trace_id
    assert lost.context.span_id == attempt_span_id(trace_id, "job-9", 1)
    assert lost.parent.span_id == submit.get_span_context().span_id
    assert lost.status.status_code.name == "ERROR" and "no lease renewal" in lost.status.description
    assert lost.start_time == lost.end_time == 1_700_000_000_500_000_000
    assert lost.attributes["jobmesh.node_id"] == "gpu-1" and lost.attributes["jobmesh.attempt"] == 1
    [link] = retry.links
    assert (link.context.trace_id, link.context.span_id) == (trace_id, lost.context.span_id)
    # Nothing is recorded when the scheduler does not export.
    record_lost_attempt(Tracing.off(), parent, "job-9", 1, "gpu-1", "x", at=1.0)
    assert len([s for s in exporter.get_finished_spans() if s.attributes.get("jobmesh.lost")]) == 1


def test_a_query_outside_any_span_is_not_recorded_and_one_inside_is():
    sampler = NoLoneQueries(ALWAYS_ON)
    query = {"db.system": "postgresql"}
    assert not sampler.should_sample(Context(), 1, "SELECT", attributes=query).decision.is_sampled()
    assert sampler.should_sample(Context(), 1, "process x", attributes={}).decision.is_sampled()
    provider = TracerProvider()
    with provider.get_tracer("test").start_as_current_span("process x"):
        assert sampler.should_sample(None, 1, "SELECT", attributes=query).decision.is_sampled()


def test_nothing_is_exported_without_the_otel_variables():
    assert not Tracing.from_env("trigger", {}).exporting
    assert not Tracing.from_env(
        "trigger", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_TRACES_EXPORTER": "none"}
    ).exporting
    assert not Tracing.from_env("trigger", {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}).exporting


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed again)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def own_servers(tmp_path_factory, postgres_server_url):
    """A NATS server and a database of its own, so this test's cluster shares nothing with
    the module's traced one."""
    store = tmp_path_factory.mktemp("nats-no-otlp")
    server = AuthNats(store).start()
    database = await create_database(postgres_server_url, "jm_test")
    yield server, database
    server.stop()
    await drop_database(postgres_server_url, database)


async def test_jobs_run_and_services_stop_promptly_when_the_endpoint_cannot_be_reached(make_cluster, own_servers):
    server, database = own_servers
    # The exporter would retry each batch for 30 s (OTEL_EXPORTER_OTLP_TIMEOUT), and a stop
    # would wait for that, were the last flush not bounded.
    env = {**E2E_NODE_ENV, **exporting_to(f"http://127.0.0.1:{closed_port()}"), "OTEL_EXPORTER_OTLP_TIMEOUT": "30"}
    cluster = await make_cluster(env=env, name="no-otlp", server=server, database_url=database)
    client = await Client.connect(server.url)
    try:
        reply = await client.submit([Submission(spec=JobSpec(runtime=ProcessRuntime(argv=["true"])))])
        await _ended(client, reply.job_ids[0])
    finally:
        await client.close()
    began = time.monotonic()
    procs = list(cluster.procs)
    cluster.stop(timeout=30)
    took = time.monotonic() - began
    assert [sp.proc.returncode for sp in procs] == [0] * len(procs), [(sp.name, sp.proc.returncode) for sp in procs]
    assert took < 15, f"the services took {took:.1f}s to stop"
    logs = "".join(sp.log_path.read_text(errors="replace") for sp in procs)
    assert "Traceback" not in logs.replace("exporting", ""), logs[-3000:]


def test_cluster_services_log_text_lines_unless_told_otherwise(tmp_path, monkeypatch):
    started: list[dict[str, str]] = []

    class Started:
        def __init__(self, argv, env, **kwargs):
            started.append(env)

    monkeypatch.setattr("jobmesh.dev.cluster.subprocess.Popen", Started)
    monkeypatch.delenv("JOBMESH_LOG_FORMAT", raising=False)
    cluster = LocalCluster("nats://127.0.0.1:1", "postgresql://x/y", tmp_path, env={"OTEL_TRACES_EXPORTER": "otlp"})
    cluster.start_service("tracker")
    cluster.start_service("binder", {"JOBMESH_LOG_FORMAT": "json"})
    assert [env["JOBMESH_LOG_FORMAT"] for env in started] == ["text", "json"]
    assert started[0]["OTEL_TRACES_EXPORTER"] == "otlp"
