"""The workflow API (``api.workflows.*``) and ``after`` on plain submits, against real services.

A trigger, a scheduler and a tracker run as processes; no executor does, so every job waits
and nothing runs: the tests look at what the trigger stores (``jm_workflows``) and publishes
(``JobSubmitted`` on ``JM_JOBS``), at how a cancel reaches waiting jobs, and at what a retry
submits once they have ended. The spans of a run are looked at without a server (a bucket
and a publisher that keep what they get, and an in-memory span exporter).
"""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
import nats.errors
import nats.js.errors
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.ids import child_step, job_id_for, new_idempotency_key, step_key, workflow_run_id
from jobmesh.contract.messages.v1 import (
    Dependency,
    JobSpec,
    JobSubmitted,
    NoopRuntime,
    Submission,
    WorkflowRun,
    WorkflowRunReply,
    WorkflowRunRequest,
    WorkflowSpec,
)
from jobmesh.errors import Conflict, InvalidMessage, InvalidSpec, NotFound, Unavailable
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.tracing import Tracing, trace_id_of
from jobmesh.trigger.workflowapi import WorkflowApi
from jobmesh.trigger.workflows import step_jobs
from tests.cluster_fixtures import submitted_where
from tests.helpers import eventually

integration = pytest.mark.integration


@pytest.fixture(scope="module")
async def services(make_module_cluster):
    return await make_module_cluster(services=["trigger", "scheduler", "tracker"], name="workflow-api")


@pytest.fixture(scope="module")
async def client(services, nats_server):
    c = await Client.connect(nats_server.url)
    yield c
    await c.close()


def sh(*argv: str, **extra) -> dict:
    return {"runtime": {"kind": "process", "argv": ["sh", "-c", *argv]}, "queue": "wf-api", **extra}


def diamond(name: str = "diamond", **extra) -> WorkflowSpec:
    steps = {
        "a": sh("echo ${input.who}"),
        "b": sh("echo ${steps.a.result.x}", needs=["a"]),
        "c": sh("echo c", needs=["a"], on_error="continue"),
        "d": sh("echo ${steps.b.result}", needs=["b", "c"]),
    }
    return msgspec.convert({"name": name, "steps": steps, **extra}, WorkflowSpec)


async def run(client: Client, spec: WorkflowSpec, input=None, key: str = "") -> WorkflowRunReply:
    # Straight to the service: the client checks what it can before sending, and these
    # tests are about what the service checks.
    request = WorkflowRunRequest(spec=spec, input=input, idempotency_key=key)
    return await client.request(subjects.API_WORKFLOWS_RUN, request, WorkflowRunReply, "trigger")


async def submitted(client: Client, label: str, value: str) -> list[tuple[JobSubmitted, dict]]:
    """Every JobSubmitted in JM_JOBS whose metadata has ``label=value``, with its headers."""
    return await submitted_where(client.nc.jetstream(), lambda event: event.spec.metadata.get(label) == value)


async def stored(client: Client, run_id: str) -> WorkflowRun | None:
    kv = await client.nc.jetstream().key_value(subjects.KV_WORKFLOWS)
    try:
        entry = await kv.get(subjects.workflow_key(run_id))
    except Exception:  # noqa: BLE001 - nats-py raises KeyNotFoundError for a missing key
        return None
    return msgspec.json.decode(entry.value, type=WorkflowRun)


async def stored_keys(client: Client) -> list[str]:
    kv = await client.nc.jetstream().key_value(subjects.KV_WORKFLOWS)
    try:
        return sorted(await kv.keys())
    except Exception:  # noqa: BLE001 - NoKeysError when the bucket is empty
        return []


async def recorded(client: Client, job_ids, final: bool = False) -> bool:
    for job_id in job_ids:
        try:
            view = await client.get(job_id)
        except NotFound:
            return False
        if final and not view.final:
            return False
    return True


# --- run -----------------------------------------------------------------------------------
@integration
async def test_a_run_stores_its_record_and_publishes_one_job_per_step(client):
    key = new_idempotency_key()
    reply = await run(client, diamond(), {"who": "me"}, key)
    record = reply.run
    run_id = workflow_run_id(key)
    assert record.run_id == run_id and not reply.duplicate
    assert record.input == {"who": "me"} and record.generation == 0 and record.state == "running"
    assert record.jobs == {step: job_id_for(step_key(run_id, step, 0)) for step in "abcd"}
    assert await stored(client, run_id) == record

    events = await submitted(client, "jobmesh.workflow", run_id)
    by = {event.spec.step.step: (event, headers) for event, headers in events}
    assert sorted(by) == ["a", "b", "c", "d"]
    for step, (event, headers) in by.items():
        assert event.job_id == record.jobs[step]
        assert headers["Nats-Msg-Id"] == f"submit:{step_key(run_id, step, 0)}"
        assert event.spec.metadata["jobmesh.step"] == step
    assert by["a"][0].spec.runtime.argv[2] == "echo me"
    assert [(d.job_id, d.when) for d in by["d"][0].spec.after] == [
        (record.jobs["b"], "succeeded"),
        (record.jobs["c"], "ended"),
    ]
    assert by["b"][0].spec.step.upstream["a"].job_id == record.jobs["a"]
    # One trace for the run, a span (and so a traceparent) of its own for each step.
    parents = {headers["traceparent"] for _, headers in by.values()}
    assert len(parents) == 4
    assert len({trace_id_of(headers) for _, headers in by.values()}) == 1

    # The same key names the same run: its jobs are published again, as duplicates.
    again = await run(client, diamond(), {"who": "someone else"}, key)
    assert again.duplicate and again.run == record
    assert len(await submitted(client, "jobmesh.workflow", run_id)) == 4


@integration
@pytest.mark.parametrize(
    ("steps", "field"),
    [
        ({"a": sh("x", needs=["b"]), "b": sh("x", needs=["a"])}, "steps.a.needs"),
        ({"a": sh("x"), "b": sh("${steps.c.result}", needs=["a"]), "c": sh("x")}, "steps.b.runtime.argv[2]"),
        ({"a": sh("${input.missing}")}, "steps.a.runtime.argv[2]"),
        ({"a": sh("x", concurrency_limit=2)}, "steps.a.concurrency_key"),
    ],
)
async def test_a_refused_workflow_creates_nothing(client, steps, field):
    spec = msgspec.convert({"name": "refused", "steps": steps}, WorkflowSpec)
    keys = await stored_keys(client)
    key = new_idempotency_key()
    with pytest.raises(InvalidSpec) as caught:
        await run(client, spec, {}, key)
    assert caught.value.field == field, caught.value
    assert await submitted(client, "jobmesh.workflow", workflow_run_id(key)) == []
    assert await stored_keys(client) == keys


@integration
async def test_an_unknown_field_in_a_step_is_refused(client):
    payload = msgspec.json.encode(
        {"type": "api.workflows.run", "spec": {"name": "typo", "steps": {"a": {**sh("x"), "prority": 3}}}}
    )
    reply = await client.nc.request(subjects.API_WORKFLOWS_RUN, payload, timeout=10)
    assert b"prority" in reply.data and b"api.error" in reply.data


# --- get and list --------------------------------------------------------------------------
@integration
async def test_get_and_list(client):
    first = (await run(client, diamond("listed"), {"who": "1"})).run
    second = (await run(client, diamond("listed"), {"who": "2"})).run
    await run(client, diamond("other"), {"who": "3"})
    assert await client.get_workflow(first.run_id) == first
    with pytest.raises(NotFound) as caught:
        await client.get_workflow("f" * 32)
    assert caught.value.field == "run_id"
    listed = (await client.list_workflows(name="listed")).runs
    assert [row.run_id for row in listed] == [second.run_id, first.run_id]
    assert listed[0].name == "listed" and listed[0].steps == 4 and listed[0].state == "running"
    everything = (await client.list_workflows(limit=1000)).runs
    assert {"listed", "other"} <= {row.name for row in everything}
    assert [row.created_at for row in everything] == sorted((row.created_at for row in everything), reverse=True)
    assert len((await client.list_workflows(limit=1)).runs) == 1


# --- cancel and retry ----------------------------------------------------------------------
@integration
async def test_cancel_reaches_every_waiting_job_and_a_retry_runs_them_again(client):
    record = (await run(client, diamond("cancelled"), {"who": "me"})).run
    await eventually(lambda: recorded(client, record.jobs.values()), what="the tracker to record the jobs")
    with pytest.raises(Conflict, match="has not ended"):
        await client.retry_workflow(record.run_id)

    reply = await client.cancel_workflow(record.run_id, reason="test")
    assert reply.cancelled == 4, reply
    assert (await client.get_workflow(record.run_id)).state == "cancelled"
    await eventually(lambda: recorded(client, record.jobs.values(), final=True), what="every job to end")
    for job_id in record.jobs.values():
        assert (await client.get(job_id)).state == "cancelled"

    retried = await client.retry_workflow(record.run_id)
    assert retried.steps == ["a", "b", "c", "d"]
    run_id = record.run_id
    assert retried.run.generation == 1 and retried.run.state == "running"
    assert retried.run.jobs == {step: job_id_for(step_key(run_id, step, 1)) for step in "abcd"}
    assert await stored(client, run_id) == retried.run
    events = [
        e for e, _ in await submitted(client, "jobmesh.workflow", run_id) if e.job_id in retried.run.jobs.values()
    ]
    assert len(events) == 4
    by = {e.spec.step.step: e for e in events}
    assert [d.job_id for d in by["b"].spec.after] == [retried.run.jobs["a"]]
    await client.cancel_workflow(run_id)


@integration
async def test_a_run_with_a_concurrency_key_waits_for_the_earlier_run(client):
    spec = diamond("keyed", concurrency_key="ds-${input.who}")
    first = (await run(client, spec, {"who": "x"})).run
    second = (await run(client, spec, {"who": "x"})).run
    assert first.concurrency_key == second.concurrency_key == "ds-x"
    assert first.after_run == "" and second.after_run == first.run_id
    by = {e.spec.step.step: e for e, _ in await submitted(client, "jobmesh.workflow", second.run_id)}
    waited = [(d.job_id, d.when) for d in by["a"].spec.after]
    assert sorted(waited) == sorted((job, "ended") for job in first.jobs.values())
    # Another key's run waits for nobody.
    third = (await run(client, spec, {"who": "y"})).run
    assert third.after_run == ""
    for one in (first, second, third):
        await client.cancel_workflow(one.run_id)


# --- after on a plain submit ---------------------------------------------------------------
def waiting_job(**extra) -> JobSpec:
    return JobSpec(runtime=NoopRuntime(), queue="wf-api", **extra)


@integration
async def test_after_on_a_plain_submit_is_checked_against_the_tracker(client):
    unknown = "0" * 32
    with pytest.raises(NotFound) as caught:
        await client.submit([Submission(spec=waiting_job(after=[Dependency(job_id=unknown)]))])
    assert caught.value.field == "jobs[0].spec.after[0].job_id"

    # A job of the same request is waited for as it is; a cycle among them never runs.
    first_key = new_idempotency_key()
    first_id = job_id_for(first_key)
    reply = await client.submit(
        [
            Submission(spec=waiting_job(), idempotency_key=first_key),
            Submission(spec=waiting_job(after=[Dependency(job_id=first_id)])),
        ]
    )
    assert reply.job_ids[0] == first_id
    with pytest.raises(InvalidMessage) as caught:
        key = new_idempotency_key()
        await client.submit(
            [Submission(spec=waiting_job(after=[Dependency(job_id=job_id_for(key))]), idempotency_key=key)]
        )
    assert caught.value.field == "jobs[0].spec.after[0].job_id"

    # A job that has not ended is waited for; one that ended is dropped when its end
    # allows, refused when it never can.
    await eventually(lambda: recorded(client, [first_id]), what="the tracker to record the job")
    label = new_idempotency_key()
    await client.submit([Submission(spec=waiting_job(after=[Dependency(job_id=first_id)], metadata={"t": label}))])
    (event, _), *_ = await submitted(client, "t", label)
    # It names the partition of the job it waits for (where the scheduler asks of its end).
    assert [d.job_id for d in event.spec.after] == [first_id]
    assert event.spec.after[0].partition >= 0
    await client.cancel(first_id)
    await eventually(lambda: recorded(client, [first_id], final=True), what="the cancel to be recorded")
    with pytest.raises(InvalidSpec) as caught:
        await client.submit([Submission(spec=waiting_job(after=[Dependency(job_id=first_id, when="succeeded")]))])
    assert caught.value.field == "jobs[0].spec.after[0].job_id" and "cancelled" in caught.value.message
    label = new_idempotency_key()
    await client.submit(
        [Submission(spec=waiting_job(after=[Dependency(job_id=first_id, when="ended")], metadata={"t": label}))]
    )
    (event, _), *_ = await submitted(client, "t", label)
    assert event.spec.after == []


# --- spans (no server) ---------------------------------------------------------------------
class KeptKV:
    """A bucket in memory: get, create and update with compare-and-set."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[bytes, int]] = {}
        self.revision = 0

    async def get(self, key: str):
        if key not in self.values:
            raise nats.js.errors.KeyNotFoundError()
        value, revision = self.values[key]
        return SimpleNamespace(key=key, value=value, revision=revision)

    async def create(self, key: str, value: bytes) -> int:
        if key in self.values:
            raise nats.js.errors.KeyWrongLastSequenceError()
        return self._put(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        if self.values.get(key, (b"", 0))[1] != last:
            raise nats.js.errors.KeyWrongLastSequenceError()
        return self._put(key, value)

    async def keys(self) -> list[str]:
        if not self.values:
            raise nats.js.errors.NoKeysError()
        return list(self.values)

    def _put(self, key: str, value: bytes) -> int:
        self.revision += 1
        self.values[key] = (value, self.revision)
        return self.revision


class KeptPublisher:
    def __init__(self) -> None:
        self.sent: list[Outgoing] = []

    async def publish(self, items):
        items = list(items)
        self.sent.extend(items)
        return [SimpleNamespace(duplicate=False) for _ in items]


def api_in_memory(tracing: Tracing) -> tuple[WorkflowApi, KeptKV, KeptPublisher]:
    kv, publisher = KeptKV(), KeptPublisher()

    async def key_value(_name):
        return kv

    async def stream_info(_stream, subjects_filter=None):
        # What bucket_keys reads: the subject of every key the bucket holds.
        names = {f"$KV.{subjects.KV_WORKFLOWS}.{key}": 1 for key in kv.values}
        return SimpleNamespace(state=SimpleNamespace(subjects=names))

    js = SimpleNamespace(key_value=key_value, stream_info=stream_info)
    api = WorkflowApi(None, js, publisher, 4, jobs=None, tracing=tracing)  # type: ignore[arg-type]
    return api, kv, publisher


async def test_a_run_is_one_span_with_a_child_span_per_step_whose_job_carries_it():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider.get_tracer("test"), exporting=True, provider=provider)
    api, kv, publisher = api_in_memory(tracing)
    reply = await api.start(diamond("traced"), {"who": "me"}, "k1")
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"workflow traced", "step a", "step b", "step c", "step d"}
    run_span = spans["workflow traced"]
    for step in "abcd":
        span = spans[f"step {step}"]
        assert span.parent.span_id == run_span.context.span_id
        assert span.context.trace_id == run_span.context.trace_id
        assert span.attributes["jobmesh.job_id"] == reply.run.jobs[step]
    for item in publisher.sent:
        headers = tracing.inject({}, item.context)
        step = item.message.spec.step.step
        assert headers["traceparent"].split("-")[2] == f"{spans[f'step {step}'].context.span_id:016x}"
    assert list(kv.values) == [subjects.workflow_key(reply.run.run_id)]


async def test_a_second_request_and_a_later_run_with_the_key_in_memory():
    api, kv, publisher = api_in_memory(Tracing.off())
    spec = diamond("keyed", concurrency_key="${input.who}")
    first = await api.start(spec, {"who": "x"}, "k1")
    again = await api.start(spec, {"who": "x"}, "k1")
    assert again.duplicate and again.run == first.run and first.run.published
    # A run whose jobs were all published is not published again: long after, its jobs
    # may be forgotten by the scheduler and would run a second time.
    assert len(publisher.sent) == 4
    # Nothing has ended as far as a tracker knows: the later run waits for every job.
    api._jobs = SimpleNamespace(views=_nothing_known)  # type: ignore[assignment]
    second = await api.start(spec, {"who": "x"}, "k2")
    assert second.run.after_run == first.run.run_id
    roots = [item.message for item in publisher.sent[4:] if item.message.spec.step.step == "a"]
    assert sorted(d.job_id for d in roots[0].spec.after) == sorted(first.run.jobs.values())
    # Cancelled: a second request for it publishes nothing again.
    key = subjects.workflow_key(first.run.run_id)
    value, revision = kv.values[key]
    cancelled = msgspec.structs.replace(msgspec.json.decode(value, type=WorkflowRun), state="cancelled")
    await kv.update(key, msgspec.json.encode(cancelled), last=revision)
    sent = len(publisher.sent)
    assert (await api.start(spec, {"who": "x"}, "k1")).duplicate
    assert len(publisher.sent) == sent


async def _nothing_known(job_ids, grace=None):
    return dict.fromkeys(job_ids)


async def test_a_run_left_unpublished_is_published_by_the_sweep_and_once():
    api, kv, publisher = api_in_memory(Tracing.off())
    spec = diamond("swept")
    # A trigger that wrote the record and died before publishing: the record alone.
    jobs = step_jobs(spec, "r1", 0, {})
    record = WorkflowRun(run_id="r1", spec=spec, input={"who": "me"}, jobs=jobs, created_at=0.0, updated_at=0.0)
    await kv.create(subjects.workflow_key("r1"), msgspec.json.encode(record))
    assert await api.sweep_unpublished(older_than=30) == 1
    assert sorted(o.message.spec.step.step for o in publisher.sent) == ["a", "b", "c", "d"]
    stored = msgspec.json.decode(kv.values[subjects.workflow_key("r1")][0], type=WorkflowRun)
    assert stored.published
    assert await api.sweep_unpublished(older_than=30) == 0
    assert len(publisher.sent) == 4


async def test_a_later_run_waits_for_every_earlier_run_still_going_not_only_the_last():
    api, _kv, publisher = api_in_memory(Tracing.off())
    api._jobs = SimpleNamespace(views=_nothing_known)  # type: ignore[assignment]
    spec = diamond("keyed2", concurrency_key="${input.who}")
    first = await api.start(spec, {"who": "y"}, "k1")
    second = await api.start(spec, {"who": "y"}, "k2")
    # The second run is cancelled while it waits; its jobs end, the first's still run.
    cancelled = {**second.run.jobs}
    known = {job: SimpleNamespace(final=True, state="cancelled") for job in cancelled.values()}

    async def views(job_ids, grace=None):
        return {job: known.get(job) for job in job_ids}

    api._jobs = SimpleNamespace(views=views)  # type: ignore[assignment]
    third = await api.start(spec, {"who": "y"}, "k3")
    assert third.run.after_runs[:2] == [second.run.run_id, first.run.run_id]
    roots = [o.message for o in publisher.sent if o.message.job_id == third.run.jobs["a"]]
    assert sorted(d.job_id for d in roots[0].spec.after) == sorted(first.run.jobs.values())


def test_a_workflow_tenant_is_checked_as_a_jobs_tenant():
    with pytest.raises(msgspec.ValidationError, match="tenant"):
        msgspec.convert({"name": "t", "tenant": "a b", "steps": {"a": {"runtime": {"kind": "noop"}}}}, WorkflowSpec)


async def test_a_run_whose_filled_job_would_not_fit_a_message_is_refused_and_nothing_made():
    api, kv, publisher = api_in_memory(Tracing.off())
    argv = ["echo", *["${input.blob}"] * 40]
    spec = msgspec.convert(
        {"name": "big", "steps": {"a": {"runtime": {"kind": "process", "argv": argv}}}}, WorkflowSpec
    )
    with pytest.raises(InvalidSpec, match="message limit") as caught:
        await api.start(spec, {"blob": "x" * 150_000}, "big")
    assert caught.value.field == "steps.a"
    assert kv.values == {} and publisher.sent == []


async def test_a_keyed_run_the_tracker_cannot_vouch_for_fails_and_the_sweep_publishes_it_later():
    api, _kv, publisher = api_in_memory(Tracing.off())
    spec = diamond("keyed3", concurrency_key="${input.who}")
    await api.start(spec, {"who": "z"}, "e1")

    async def down(job_ids, grace=None):
        raise Unavailable("the tracker does not answer")

    api._jobs = SimpleNamespace(views=down)  # type: ignore[assignment]
    sent = len(publisher.sent)
    with pytest.raises(Unavailable):
        await api.start(spec, {"who": "z"}, "e2")
    assert len(publisher.sent) == sent  # nothing of the second run went out
    api._jobs = SimpleNamespace(views=_nothing_known)  # type: ignore[assignment]
    api._clock = lambda: 10**10  # long after: the sweep takes it
    assert await api.sweep_unpublished() == 1
    assert len(publisher.sent) == sent + 4


def test_a_childs_child_is_listed_under_the_root_step():
    assert child_step("split", "p1") == "split.children.p1"
    assert child_step(child_step("split", "p1"), "p2") == "split.children.p2"
