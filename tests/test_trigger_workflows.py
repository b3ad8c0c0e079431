"""Trigger rules that start a workflow: the five services as processes, events published with
plain nats-py (no jobmesh library), each starting a run with the event's data as its input."""

from __future__ import annotations

import json

import msgspec
import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.client.workflows import WorkflowStatus
from jobmesh.contract.ids import EVENT_ID_HEADER, trigger_key, workflow_run_id
from jobmesh.contract.messages.v1 import TriggerRule, WorkflowRun, WorkflowRunReply
from jobmesh.errors import InvalidMessage, InvalidSpec, NotFound
from jobmesh.trigger.firing import Firer
from jobmesh.trigger.router import Incoming, Router
from jobmesh.trigger.rules import check_rule, event_variables, workflow_input
from jobmesh.trigger.stats import RuleStats
from tests.cluster_fixtures import E2E_NODE_ENV, dead_letters
from tests.helpers import eventually

# The tests that run the services; the decisions below them need no cluster.
integration = pytest.mark.integration

SUBJECT = "jobmesh.v1.events.datasets.updated"

# extract lists one item per shard of the dataset the event names; process handles each
# (its result names the item); collect receives every result, in item order.
PIPELINE = {
    "name": "dataset-pipeline",
    "steps": {
        "extract": {
            "runtime": {
                "kind": "process",
                "argv": [
                    "sh",
                    "-c",
                    'seq 0 $(($1 - 1)) | sed "s/.*/\\"$0-&\\"/" | paste -sd, | sed "s/.*/{\\"items\\": [&]}/"'
                    ' > "$JOBMESH_RESULT_PATH"',
                    "${input.dataset}",
                    "${input.shards}",
                ],
            }
        },
        "process": {
            "needs": ["extract"],
            "map": {"over": "${steps.extract.result.items}", "concurrency": 8},
            "runtime": {
                "kind": "process",
                "argv": ["sh", "-c", 'echo "{\\"item\\": \\"$0\\"}" > "$JOBMESH_RESULT_PATH"', "${item}"],
            },
        },
        "collect": {
            "needs": ["process"],
            "runtime": {
                "kind": "process",
                "argv": ["sh", "-c", 'echo "$0" > "$JOBMESH_RESULT_PATH"', "${steps.process.result}"],
            },
        },
    },
}


def pipeline_rule(name: str, **changes) -> dict:
    rule = {
        "name": name,
        "source": {"kind": "event", "subjects": ["jobmesh.v1.events.datasets.*"]},
        "workflow": PIPELINE,
        "sample": {"subject": SUBJECT, "data": {"dataset": "books", "shards": 3}},
    }
    rule.update(changes)
    return rule


@pytest.fixture(scope="module")
async def wf_triggers(make_module_cluster):
    return await make_module_cluster(env=E2E_NODE_ENV, name="trigwf")


@pytest.fixture
async def client(wf_triggers, nats_server):
    cl = await Client.connect(nats_server.url)
    yield cl
    await cl.close()


@pytest.fixture
async def js(wf_triggers, nats_server):
    # The integrator's side: plain nats-py, JSON bytes.
    nc = await nats.connect(nats_server.url)
    yield nc.jetstream()
    await nc.close()


async def run_of(client: Client, rule: str, event_id: str, timeout: float = 30) -> WorkflowRun:
    """The run ``rule`` (version 1) started for ``event_id``, once its record exists."""
    run_id = workflow_run_id(trigger_key(rule, 1, event_id))

    async def recorded():
        try:
            return await client.get_workflow(run_id)
        except NotFound:
            return None

    return await eventually(recorded, timeout=timeout, what=f"the run {rule} started for {event_id}")


async def ended(client: Client, run_id: str, timeout: float = 120) -> WorkflowStatus:
    async def done():
        status = await client.workflow_status(run_id)
        return status if status.outcome != "running" else None

    return await eventually(done, timeout=timeout, what=f"run {run_id} to end")


@integration
async def test_an_event_starts_extract_a_fan_out_of_20_and_a_collect_of_every_result_in_order(client, js):
    await client.put_trigger(pipeline_rule("pipeline"))
    try:
        ack = await js.publish(SUBJECT, json.dumps({"dataset": "books", "shards": 20}).encode())
        run = await run_of(client, "pipeline", f"{ack.stream}:{ack.seq}")
        assert run.input == {"dataset": "books", "shards": 20}
        assert run.origin is not None and run.origin.rule == "pipeline" and run.origin.kind == "event"
        assert run.origin.subject == SUBJECT and run.origin.version == 1
        status = await ended(client, run.run_id)
        assert status.outcome == "succeeded", [(s.name, s.state, s.reason) for s in status.steps]
        items = status.step("process").items
        assert items is not None and items.succeeded == 20
        collected = json.loads((await client.get(run.jobs["collect"])).attempts[-1].result)
        assert collected == [{"item": f"books-{i}"} for i in range(20)]
        view = await client.get_trigger("pipeline")
        assert view.stats.fires == 1 and view.stats.failures == 0
    finally:
        await client.delete_trigger("pipeline")


@integration
async def test_the_same_event_twice_starts_one_run(client, js):
    await client.put_trigger(pipeline_rule("once"))
    try:
        event = json.dumps({"dataset": "maps", "shards": 2}).encode()
        # The same Nats-Msg-Id twice: the stream keeps one message.
        first = await js.publish(SUBJECT, event, headers={"Nats-Msg-Id": "maps-1"})
        again = await js.publish(SUBJECT, event, headers={"Nats-Msg-Id": "maps-1"})
        assert again.duplicate and again.seq == first.seq
        # The same event id on two stored messages (a dead letter replayed, say): each is
        # read and routed, and the second finds the run the first started.
        for _ in range(2):
            await js.publish(SUBJECT, event, headers={EVENT_ID_HEADER: "maps-replayed"})
        # One consumer reads the events in order: once the last one's run exists, the
        # rule has seen every event before it.
        last = await js.publish(SUBJECT, json.dumps({"dataset": "last", "shards": 1}).encode())
        by_msg_id = await run_of(client, "once", "id:maps-1")
        replayed = await run_of(client, "once", "maps-replayed")
        await run_of(client, "once", f"{last.stream}:{last.seq}")
        runs = [r for r in (await client.list_workflows(name="dataset-pipeline", limit=1000)).runs]
        ours = {by_msg_id.run_id, replayed.run_id}
        assert len([r for r in runs if r.run_id in ours]) == 2
        view = await eventually(
            lambda: _fires(client, "once", 3), what="the rule's figures: three runs started, none twice"
        )
        assert view.stats.fires == 3 and view.stats.failures == 0
        assert (await ended(client, replayed.run_id)).outcome == "succeeded"
    finally:
        await client.delete_trigger("once")


async def _fires(client: Client, rule: str, fires: int):
    view = await client.get_trigger(rule)
    return view if view.stats.fires >= fires else None


@integration
async def test_an_event_lacking_what_the_workflow_reads_is_dead_lettered_and_counted(client, js):
    await client.put_trigger(pipeline_rule("strict"))
    try:
        ack = await js.publish(SUBJECT, json.dumps({"dataset": "no-shards"}).encode())
        event_id = f"{ack.stream}:{ack.seq}"

        async def letter():
            found = [d for d in await dead_letters(js) if d.rule == "strict" and d.event_id == event_id]
            return found or None

        [dead] = await eventually(letter, what="a dead letter naming the rule")
        assert "workflow.steps.extract.runtime.argv" in dead.reason and "shards" in dead.reason
        assert dead.subject == SUBJECT
        view = await eventually(lambda: _failures(client, "strict"), what="the failure counted in the rule's figures")
        assert view.stats.fires == 0 and "shards" in view.stats.last_error
        with pytest.raises(NotFound):
            await client.get_workflow(workflow_run_id(trigger_key("strict", 1, event_id)))
    finally:
        await client.delete_trigger("strict")


async def _failures(client: Client, rule: str):
    view = await client.get_trigger(rule)
    return view if view.stats.failures >= 1 else None


@integration
async def test_a_rule_with_a_job_and_a_workflow_is_refused_naming_the_field(client):
    with pytest.raises(InvalidMessage) as refused:
        await client.put_trigger(pipeline_rule("both", job={"runtime": {"kind": "noop"}}))
    assert refused.value.field == "workflow"
    with pytest.raises(InvalidMessage) as neither:
        await client.put_trigger(pipeline_rule("neither", workflow=None))
    assert neither.value.field == "job"


@integration
async def test_a_workflow_rule_whose_sample_lacks_an_input_field_is_refused_naming_it(client):
    sample = {"subject": SUBJECT, "data": {"dataset": "books"}}
    with pytest.raises(InvalidMessage) as refused:
        await client.put_trigger(pipeline_rule("no-shards", sample=sample))
    assert refused.value.field == "workflow.steps.extract.runtime.argv[4]"
    assert "shards" in str(refused.value)
    typo = {**PIPELINE, "steps": {**PIPELINE["steps"], "collect": {**PIPELINE["steps"]["collect"], "neds": []}}}
    with pytest.raises(InvalidMessage) as unknown:
        await client.put_trigger(pipeline_rule("typo", workflow=typo))
    assert unknown.value.field == "workflow.steps.collect.neds"
    with pytest.raises(InvalidMessage) as burst:
        await client.put_trigger(pipeline_rule("burst", debounce={"seconds": 1}))
    assert burst.value.field == "debounce"
    with pytest.raises(NotFound):
        await client.get_trigger("no-shards")


@integration
async def test_a_schedule_starts_a_run_with_its_tick_as_the_input(client):
    rule = {
        "name": "nightly",
        "source": {"kind": "schedule", "every": 1},
        "workflow": {
            "name": "nightly",
            "steps": {
                "report": {
                    "runtime": {
                        "kind": "process",
                        "argv": ["sh", "-c", 'echo "{\\"tick\\": $0}" > "$JOBMESH_RESULT_PATH"', "${input.unix}"],
                    }
                }
            },
        },
    }
    await client.put_trigger(rule)
    try:

        async def a_run():
            runs = (await client.list_workflows(name="nightly")).runs
            return runs[-1] if runs else None

        summary = await eventually(a_run, timeout=30, what="a tick to start a run")
        run = await client.get_workflow(summary.run_id)
        assert run.origin is not None and run.origin.kind == "schedule" and run.origin.event.startswith("tick:")
        tick = int(run.origin.event.removeprefix("tick:"))
        assert run.input["unix"] == tick and run.input["iso"].startswith("20")
        assert run.run_id == workflow_run_id(trigger_key("nightly", 1, f"tick:{tick}"))
        assert (await ended(client, run.run_id)).outcome == "succeeded"
        assert json.loads((await client.get(run.jobs["report"])).attempts[-1].result) == {"tick": tick}
    finally:
        await client.delete_trigger("nightly")


@integration
async def test_trigger_test_shows_the_run_a_workflow_rule_starts(client):
    reply = await client.test_trigger(pipeline_rule("draft"))
    assert reply.matched and reply.job is None
    assert "starts a run of workflow dataset-pipeline" in reply.reason and '"shards":3' in reply.reason
    assert reply.idempotency_key == trigger_key("draft", 1, "sample")


# --- the decisions, without a cluster ----------------------------------------------------
class _Starter:
    """A stand-in for WorkflowApi.start: records the calls, answers as told."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[tuple] = []
        self.refuse = refuse
        self.seen: set[str] = set()

    async def start(self, spec, input=None, idempotency_key="", *, origin=None, context=None):
        self.calls.append((spec, input, idempotency_key, origin))
        if self.refuse:
            raise InvalidSpec("${input.shards}: the run's input has no shards", field="steps.extract.runtime.argv[4]")
        duplicate = idempotency_key in self.seen
        self.seen.add(idempotency_key)
        run = WorkflowRun(run_id=workflow_run_id(idempotency_key), spec=spec, input=input, origin=origin)
        return WorkflowRunReply(run=run, duplicate=duplicate)


def _compiled(rule: dict):
    compiled, _ = check_rule(msgspec.convert(rule, TriggerRule))
    return compiled


def _incoming(rule, data: dict, event_id: str = "JM_EVENTS:7", metadata: dict | None = None) -> Incoming:
    variables = event_variables(SUBJECT, data, {}, event_id, 1000.0)
    return Incoming("event", variables, event_id, SUBJECT, [rule], metadata=metadata or {})


async def test_routing_starts_one_run_per_event_with_the_jobs_origin_and_counts_it():
    starter = _Starter()
    stats = RuleStats(None, "test")
    firer = Firer(publisher=None, partitions=1, schemas=None, stats=stats, clock=lambda: 1000.0, workflows=starter)
    rule = _compiled(pipeline_rule("unit", filter="event.shards > 0"))
    router = Router(firer, stats, clock=lambda: 1000.0)
    body = {"dataset": "books", "shards": 4}
    routed = await router.route([_incoming(rule, body), _incoming(rule, {"dataset": "x", "shards": 0}, "JM_EVENTS:8")])
    assert routed.filtered == 1 and not routed.failures
    [(_, _, fired)] = routed.fired
    assert fired.run_id == workflow_run_id(trigger_key("unit", 1, "JM_EVENTS:7")) and not fired.duplicate
    [(spec, given, key, origin)] = starter.calls
    assert (spec.name, given, key) == ("dataset-pipeline", body, trigger_key("unit", 1, "JM_EVENTS:7"))
    assert origin.rule == "unit" and origin.kind == "event" and origin.event == "JM_EVENTS:7"
    again = await router.route([_incoming(rule, body)])
    assert again.fired[0][2].duplicate
    assert stats._of("unit").fires == 1  # the run found again does not count


async def test_a_run_refused_at_fire_time_is_a_failure_naming_the_workflow_field():
    stats = RuleStats(None, "test")
    firer = Firer(None, 1, None, stats, clock=lambda: 1000.0, workflows=_Starter(refuse=True))
    rule = _compiled(pipeline_rule("unit"))
    routed = await Router(firer, stats, clock=lambda: 1000.0).route([_incoming(rule, {"dataset": "x"})])
    [failure] = routed.failures
    assert failure.error.field == "workflow.steps.extract.runtime.argv[4]"
    assert "shards" in str(failure.error)
    assert stats._of("unit").failures == 1 and not routed.fired


async def test_a_run_a_completion_starts_carries_the_chain_depth_on_every_step():
    starter = _Starter()
    stats = RuleStats(None, "test")
    firer = Firer(None, 1, None, stats, workflows=starter)
    rule = _compiled(pipeline_rule("unit"))
    await Router(firer, stats).route(
        [_incoming(rule, {"dataset": "x", "shards": 1}, metadata={"jobmesh.chain_depth": "2"})]
    )
    [(spec, _, _, origin)] = starter.calls
    assert all(step.metadata == {"jobmesh.chain_depth": "2"} for step in spec.steps.values())
    assert origin is not None


def test_the_input_is_what_a_job_template_sees_as_event_and_a_schedule_gives_its_tick():
    tick = {"unix": 60.0, "iso": "1970-01-01T00:01:00+00:00"}
    assert workflow_input("schedule", {"event": None, "tick": tick}) == tick
    assert workflow_input("completion", {"event": {"id": "j"}, "tick": {}}) == {"id": "j"}
    assert workflow_input("webhook", {"event": {"ref": "main"}, "tick": {}}) == {"ref": "main"}
