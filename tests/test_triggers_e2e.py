"""Trigger rules end to end: the five services as processes, events published with plain nats-py."""

from __future__ import annotations

import asyncio
import json

import msgspec
import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import (
    DeadLetter,
    JobView,
    SampleEvent,
    TriggerReply,
    TriggerRule,
    TriggerTestReply,
)
from jobmesh.errors import NotFound
from jobmesh.runtime.tracing import trace_id_of
from tests.cluster_fixtures import E2E_NODE_ENV, dead_letters, fired_by, jobmesh_cli
from tests.helpers import eventually
from tests.natsauth_fixtures import AuthNats

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def triggers(make_module_cluster):
    return await make_module_cluster(env=E2E_NODE_ENV, name="triggers")


async def put_rule(nc, rule: dict, paused: bool = False) -> TriggerReply:
    return await Client(nc).put_trigger(rule, paused=paused)


async def remove_rule(nc, name: str) -> None:
    await Client(nc).delete_trigger(name)


async def job_view(nc, job_id: str) -> JobView | None:
    try:
        return await Client(nc).get(job_id)
    except NotFound:
        return None


REINDEX = {
    "name": "dataset-reindex",
    "source": {"kind": "event", "subjects": ["jobmesh.v1.events.dataset.updated.*"]},
    "filter": "event.rows > 0",
    "job": {
        "name": "reindex {{ subject.tokens[5] }}",
        "runtime": {
            "kind": "process",
            "argv": ["sh", "-c", "echo reindexing $DATASET with $ROWS rows"],
            "env": {"DATASET": "{{ subject.tokens[5] }}", "ROWS": "{{ string(event.rows) }}"},
        },
    },
    "sample": {"subject": "jobmesh.v1.events.dataset.updated.books", "data": {"rows": 3}},
}


async def test_an_event_published_by_an_integrator_runs_a_job_with_its_fields(triggers, nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        reply = await put_rule(nc, REINDEX)
        assert reply.record.version == 1
        # A plain integrator: nats-py, JSON, no jobmesh library. The first event does not
        # pass the filter; the second does. One consumer reads them in order, so once the
        # second one's job exists, the first one's would too.
        await js.publish("jobmesh.v1.events.dataset.updated.empty", json.dumps({"rows": 0}).encode())
        await js.publish("jobmesh.v1.events.dataset.updated.books", json.dumps({"rows": 42}).encode())
        fired = await eventually(lambda: fired_by(js, "dataset-reindex"), what="the rule to fire")
        assert len(fired) == 1
        [job] = fired
        assert job.spec.name == "reindex books"
        assert job.spec.runtime.env == {"DATASET": "books", "ROWS": "42"}
        assert job.origin.kind == "event" and job.origin.version == 1
        assert job.origin.subject == "jobmesh.v1.events.dataset.updated.books"
        assert job.origin.event.startswith(f"{subjects.STREAM_EVENTS}:")

        async def succeeded():
            view = await job_view(nc, job.job_id)
            return view if view is not None and view.state == "succeeded" else None

        view = await eventually(succeeded, timeout=60, what="the reindex job to succeed")
        assert view.origin is not None and view.origin.rule == "dataset-reindex"
        assert "reindexing books with 42 rows" in view.attempts[-1].output_tail
    finally:
        await remove_rule(nc, "dataset-reindex")
        await nc.close()


async def test_a_template_failure_is_dead_lettered_and_the_rule_keeps_firing(triggers, nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    rule = {
        "name": "needs-owner",
        "source": {"kind": "event", "subjects": ["jobmesh.v1.events.owned.>"]},
        "job": {"name": "for {{ event.owner }}", "runtime": {"kind": "noop"}},
        "sample": {"subject": "jobmesh.v1.events.owned.x", "data": {"owner": "ann"}},
    }
    try:
        await put_rule(nc, rule)
        await js.publish("jobmesh.v1.events.owned.a", json.dumps({"nobody": 1}).encode())
        await js.publish("jobmesh.v1.events.owned.b", b"not json at all")
        await js.publish("jobmesh.v1.events.owned.c", json.dumps({"owner": "bob"}).encode())
        fired = await eventually(lambda: fired_by(js, "needs-owner"), what="the good event's job")
        assert [j.spec.name for j in fired] == ["for bob"]

        async def letters():
            found = [d for d in await dead_letters(js) if d.subject.startswith("jobmesh.v1.events.owned.")]
            return found if len(found) == 2 else None

        # The event without an owner fails the rule's template; the bytes that are not JSON
        # are refused before any rule sees them.
        found = {d.subject: d for d in await eventually(letters, what="two dead letters")}
        template = found["jobmesh.v1.events.owned.a"]
        assert template.rule == "needs-owner" and "owner" in template.reason and "needs-owner" in template.reason
        assert template.service == "trigger" and template.code == "invalid_expression"
        garbage = found["jobmesh.v1.events.owned.b"]
        assert garbage.rule == "" and garbage.code == "invalid_message" and "not JSON" in garbage.reason
        assert garbage.service == "trigger" and garbage.payload_head.startswith("not json")

        listed = await Client(nc).list_triggers()
        [row] = [r for r in listed.triggers if r.name == "needs-owner"]

        async def counted():
            again = await Client(nc).list_triggers()
            [r] = [r for r in again.triggers if r.name == "needs-owner"]
            return r if r.stats.fires == 1 and r.stats.failures == 1 else None

        row = await eventually(counted, what="the figures")
        assert row.stats.last_fire_at > 0 and "owner" in row.stats.last_error
    finally:
        await remove_rule(nc, "needs-owner")
        await nc.close()


async def test_a_paused_rule_lets_events_pass_and_fires_again_after_resume(triggers, nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    rule = {
        "name": "pausable",
        "source": {"kind": "event", "subjects": ["jobmesh.v1.events.pausable"]},
        "job": {"name": "n{{ string(event.n) }}", "runtime": {"kind": "noop"}},
        "sample": {"subject": "jobmesh.v1.events.pausable", "data": {"n": 0}},
    }
    try:
        await put_rule(nc, rule, paused=True)
        await js.publish("jobmesh.v1.events.pausable", json.dumps({"n": 1}).encode())

        async def skipped():
            listed = await Client(nc).list_triggers()
            return [r for r in listed.triggers if r.name == "pausable" and r.stats.skipped == 1]

        await eventually(skipped, what="the paused rule to count a skip")
        resumed = await Client(nc).pause_trigger("pausable", paused=False)
        assert not resumed.record.paused and resumed.record.version == 1  # pausing is not a new version

        async def resumed_view():
            # The trigger's view of the rule follows the bucket's watch; fire once it has.
            await js.publish("jobmesh.v1.events.pausable", json.dumps({"n": 2}).encode())
            return await fired_by(js, "pausable")

        fired = await eventually(resumed_view, interval=0.5, what="the resumed rule to fire")
        # The event that came while it was paused never makes a job: resuming does not replay.
        assert "n1" not in {j.spec.name for j in fired}
    finally:
        await remove_rule(nc, "pausable")
        await nc.close()


async def test_a_completion_rule_chains_three_jobs(triggers, nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    step = "{{ job.name }}"
    chain = [
        {
            "name": "after-one",
            "source": {"kind": "completion", "outcome": "succeeded", "name": "one"},
            "job": {"name": "two", "metadata": {"after": step}, "runtime": {"kind": "noop"}},
        },
        {
            "name": "after-two",
            "source": {"kind": "completion", "outcome": "succeeded", "name": "two"},
            "job": {"name": "three", "metadata": {"after": step, "from": "{{ job.id }}"}, "runtime": {"kind": "noop"}},
        },
    ]
    try:
        for rule in chain:
            await put_rule(nc, rule)

        async def consuming():
            try:
                await js.consumer_info(subjects.STREAM_JOBS, "trigger-completions")
                return True
            except nats.js.errors.NotFoundError:
                return False

        await eventually(consuming, what="the completions consumer to exist")
        reply = await nc.request(
            subjects.API_SUBMIT,
            json.dumps(
                {"type": "api.submit", "jobs": [{"spec": {"name": "one", "runtime": {"kind": "noop"}}}]}
            ).encode(),
            timeout=10,
        )
        [first] = json.loads(reply.data)["job_ids"]
        [two] = await eventually(lambda: fired_by(js, "after-one"), timeout=30, what="job two")
        [three] = await eventually(lambda: fired_by(js, "after-two"), timeout=30, what="job three")
        assert two.origin.event == f"end:{first}" and two.origin.depth == 1
        assert two.spec.metadata["jobmesh.chain_depth"] == "1"
        assert three.origin.event == f"end:{two.job_id}" and three.origin.depth == 2
        assert three.spec.metadata == {"after": "two", "from": two.job_id, "jobmesh.chain_depth": "2"}

        async def third_done():
            view = await job_view(nc, three.job_id)
            return view if view is not None and view.state == "succeeded" else None

        await eventually(third_done, timeout=30, what="job three to succeed")
    finally:
        for rule in chain:
            await remove_rule(nc, rule["name"])
        await nc.close()


async def test_kill_9_mid_burst_every_event_gives_exactly_one_job(triggers, nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    rule = {
        "name": "burst",
        "source": {"kind": "event", "subjects": ["jobmesh.v1.events.burst.*"]},
        "job": {"name": "b{{ string(event.i) }}", "queue": "burst", "runtime": {"kind": "noop"}},
        "sample": {"subject": "jobmesh.v1.events.burst.x", "data": {"i": 0}},
    }
    total = 5000
    try:
        await put_rule(nc, rule)
        acks = []
        for i in range(total):
            acks.append(await js.publish_async(f"jobmesh.v1.events.burst.k{i % 7}", b'{"i": %d}' % i))
        await asyncio.gather(*acks)

        async def some_fired():
            info = await js.consumer_info(subjects.STREAM_EVENTS, "trigger-events")
            return info.ack_floor.stream_seq > 0 and info.num_pending > 0

        await eventually(some_fired, interval=0.01, what="the trigger to be mid-burst")
        triggers.kill("trigger")
        triggers.start_service("trigger", tag="-restarted")
        await triggers.wait_healthy(("trigger",))

        async def drained():
            info = await js.consumer_info(subjects.STREAM_EVENTS, "trigger-events")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(drained, timeout=120, what="every event to be handled")
        fired = await fired_by(js, "burst")
        names = [j.spec.name for j in fired]
        assert len(names) == total, f"{len(names)} jobs for {total} events"
        assert set(names) == {f"b{i}" for i in range(total)}
    finally:
        await remove_rule(nc, "burst")
        await nc.close()


async def test_the_job_continues_the_trace_of_the_events_publish(triggers, nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    rule = {
        "name": "traced",
        "source": {"kind": "event", "subjects": ["jobmesh.v1.events.traced"]},
        "job": {"name": "traced", "runtime": {"kind": "noop"}},
        "sample": {"subject": "jobmesh.v1.events.traced", "data": {}},
    }
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        await put_rule(nc, rule)
        await js.publish(
            "jobmesh.v1.events.traced", b"{}", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
        )
        [job] = await eventually(lambda: fired_by(js, "traced"), what="the rule to fire")

        async def traces():
            found = {}
            info = await js.stream_info(subjects.STREAM_JOBS)
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(subjects.STREAM_JOBS, seq)
                body = msgspec.json.decode(msg.data)
                if body.get("job_id") == job.job_id:
                    found[body["type"]] = trace_id_of(msg.headers)
            return found if "job.succeeded" in found else None

        found = await eventually(traces, what="the job to succeed")
        assert set(found.values()) == {trace_id}, found
    finally:
        await remove_rule(nc, "traced")
        await nc.close()


async def test_bursts_through_the_service_debounce_and_batch(triggers, nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    debounce = {
        "name": "settle",
        "source": {"kind": "event", "subjects": ["jobmesh.v1.events.settle.*"]},
        "debounce": {"seconds": 1, "key": "subject.tokens[4]"},
        "job": {"name": "settled {{ key }} after {{ string(count) }}", "runtime": {"kind": "noop"}},
        "sample": {"subject": "jobmesh.v1.events.settle.a", "data": {}},
    }
    batch = {
        "name": "gather",
        "source": {"kind": "event", "subjects": ["jobmesh.v1.events.gather"]},
        "batch": {"max_events": 100, "max_seconds": 2},
        "job": {
            "name": "gathered",
            "runtime": {"kind": "handler", "handler": "none.here", "input": "{{ events.map(e, e.data.i) }}"},
        },
        "sample": {"subject": "jobmesh.v1.events.gather", "data": {"i": 0}},
    }
    try:
        await put_rule(nc, debounce)
        await put_rule(nc, batch)
        acks = [await js.publish_async("jobmesh.v1.events.settle.a", b"{}") for _ in range(100)]
        acks += [await js.publish_async("jobmesh.v1.events.gather", b'{"i": %d}' % i) for i in range(250)]
        await asyncio.gather(*acks)
        [settled] = await eventually(lambda: fired_by(js, "settle"), what="the debounce to fire")
        assert settled.spec.name == "settled a after 100" and settled.origin.kind == "debounce"

        async def three():
            found = await fired_by(js, "gather")
            return found if len(found) >= 3 else None

        gathered = await eventually(three, what="three batches")
        inputs = [j.spec.runtime.input for j in gathered]
        assert sorted(len(i) for i in inputs) == [50, 100, 100]
        assert sorted(i for batch_ in inputs for i in batch_) == list(range(250))
        assert len(await fired_by(js, "settle")) == 1  # still one, after the batches were fired
    finally:
        await remove_rule(nc, "settle")
        await remove_rule(nc, "gather")
        await nc.close()


async def test_subjects_the_operator_allows_reach_rules_and_others_are_refused(make_cluster, tmp_path):
    # A NATS server of its own: every trigger replica of one cluster must allow the same subjects.
    server = AuthNats(tmp_path / "nats").start()
    await make_cluster(["trigger"], env={"JOBMESH_TRIGGER_SUBJECTS": "legacy.orders.>"}, server=server, name="external")
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    rule = {
        "name": "legacy-orders",
        "source": {"kind": "event", "subjects": ["legacy.orders.*"]},
        "job": {"name": "order {{ subject.tokens[2] }}", "runtime": {"kind": "noop"}},
        "sample": {"subject": "legacy.orders.o1", "data": {}},
    }
    try:
        await put_rule(nc, rule)
        await nc.publish("legacy.orders.o42", b'{"total": 3}')  # core NATS: JM_EXTERNAL stores it
        [job] = await eventually(lambda: fired_by(js, "legacy-orders"), what="the external event's job")
        assert job.spec.name == "order o42" and job.origin.event.startswith(f"{subjects.STREAM_EXTERNAL}:")
        outside = {**rule, "name": "elsewhere", "source": {"kind": "event", "subjects": ["billing.>"]}}
        with pytest.raises(Exception) as refused:
            await put_rule(nc, outside)
        assert getattr(refused.value, "field", "") == "source.subjects[0]"
        assert "JOBMESH_TRIGGER_SUBJECTS" in str(refused.value)
    finally:
        await remove_rule(nc, "legacy-orders")
        await nc.close()
        server.stop()


async def test_a_deeply_nested_event_is_dead_lettered_and_the_service_goes_on(triggers, nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    rule = {
        "name": "after-nesting",
        "source": {"kind": "event", "subjects": ["jobmesh.v1.events.nesting"]},
        "job": {"name": "fine", "runtime": {"kind": "noop"}},
        "sample": {"subject": "jobmesh.v1.events.nesting", "data": {}},
    }
    try:
        await put_rule(nc, rule)
        await js.publish("jobmesh.v1.events.nesting", b"[" * 1000 + b"]" * 1000)
        await js.publish("jobmesh.v1.events.nesting", b"{}")
        [job] = await eventually(lambda: fired_by(js, "after-nesting"), what="the next event's job")
        assert job.spec.name == "fine"

        async def letter():
            return [d for d in await dead_letters(js) if "nested too deeply" in d.reason]

        [found] = await eventually(letter, what="the nested event's dead letter")
        assert found.subject == "jobmesh.v1.events.nesting" and found.service == "trigger"
        triggers.check_alive()  # the trigger did not stop
    finally:
        await remove_rule(nc, "after-nesting")
        await nc.close()


async def test_a_replayed_dead_letter_fires_only_the_rule_that_failed(triggers, nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    good = {
        "name": "replay-good",
        "source": {"kind": "event", "subjects": ["jobmesh.v1.events.replayed"]},
        "job": {"name": "good", "runtime": {"kind": "noop"}},
        "sample": {"subject": "jobmesh.v1.events.replayed", "data": {}},
    }
    picky = {**good, "name": "replay-picky", "job": {"name": "for {{ event.owner }}", "runtime": {"kind": "noop"}}}
    picky["sample"] = {"subject": "jobmesh.v1.events.replayed", "data": {"owner": "x"}}
    try:
        await put_rule(nc, good)
        await put_rule(nc, picky)
        await js.publish("jobmesh.v1.events.replayed", b'{"name": "ann"}')
        await eventually(lambda: fired_by(js, "replay-good"), what="the good rule's job")

        async def letter():
            return [d for d in await dead_letters(js) if d.rule == "replay-picky"]

        [refused] = await eventually(letter, what="the picky rule's dead letter")
        assert refused.event_id.startswith(f"{subjects.STREAM_EVENTS}:")
        # Fixed: the rule now reads the field the event has. The replay fires it, and only it.
        fixed_rule = {**picky, "job": {"name": "for {{ event.name }}", "runtime": {"kind": "noop"}}}
        await put_rule(nc, {**fixed_rule, "sample": {"subject": "jobmesh.v1.events.replayed", "data": {"name": "x"}}})
        seq = await _letter_seq(js, refused)
        result = jobmesh_cli(["dead-letters", "replay", str(seq)], nats_server.url)
        assert result.returncode == 0, result.stderr
        [fixed] = await eventually(lambda: fired_by(js, "replay-picky"), what="the fixed rule's job")
        assert fixed.spec.name == "for ann" and fixed.origin.version == 2
        assert fixed.origin.event == refused.event_id  # the event's identity survived the replay
        assert len(await fired_by(js, "replay-good")) == 1  # the good rule made no second job
    finally:
        await remove_rule(nc, "replay-good")
        await remove_rule(nc, "replay-picky")
        await nc.close()


async def _letter_seq(js, letter) -> int:
    info = await js.stream_info(subjects.STREAM_DEADLETTER)
    for seq in range(info.state.last_seq, info.state.first_seq - 1, -1):
        msg = await js.get_msg(subjects.STREAM_DEADLETTER, seq)
        if msgspec.json.decode(msg.data, type=DeadLetter) == letter:
            return seq
    raise AssertionError("the dead letter is not in the stream")


async def test_the_rule_api_gets_past_a_record_that_does_not_decode(triggers, nats_server):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        kv = await js.key_value(subjects.KV_TRIGGERS)
        await kv.put("broken", b'{"type": "trigger.record", "rule": 42}')  # by hand, or a newer version
        listed = await Client(nc).list_triggers()
        assert "broken" not in {r.name for r in listed.triggers}
        rule = {
            "name": "broken",
            "source": {"kind": "event", "subjects": ["jobmesh.v1.events.broken"]},
            "job": {"runtime": {"kind": "noop"}},
            "sample": {"subject": "jobmesh.v1.events.broken", "data": {}},
        }
        replaced = await put_rule(nc, rule)  # a put replaces it
        assert replaced.record.version == 1
        await kv.put("broken", b"not even json")
        await remove_rule(nc, "broken")  # and a delete removes it, without decoding it
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get("broken")
    finally:
        await nc.close()


async def test_trigger_test_judges_a_draft_on_the_event_given(triggers, nats_server):
    nc = await nats.connect(nats_server.url)
    draft = msgspec.convert({k: v for k, v in REINDEX.items() if k != "sample"}, TriggerRule)
    try:

        async def test(subject: str, data) -> TriggerTestReply:
            return await Client(nc).test_trigger(draft, SampleEvent(subject=subject, data=data))

        fired = await test("jobmesh.v1.events.dataset.updated.maps", {"rows": 7})
        assert fired.matched and fired.job["name"] == "reindex maps"
        elsewhere = await test("jobmesh.v1.events.other.thing", {"rows": 7})
        assert not elsewhere.matched and "does not watch" in elsewhere.reason
        empty = await test("jobmesh.v1.events.dataset.updated.maps", {"rows": 0})
        assert not empty.matched and "filter" in empty.reason
    finally:
        await nc.close()
