"""Bursts against a real nats-server: the state in jm_trigger_state, the jobs on JM_JOBS.

Events go through the real Router, Bursts and Firer over a real Publisher (the trigger
service's own path, in process); the jobs are counted from the JobSubmitted messages on
JM_JOBS. Windows and due times come from an injected clock, so nothing waits for them;
what fires on the timer is waited for with a deadline.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import nats.js.errors
import pytest

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import (
    BatchPolicy,
    CorrelatePart,
    CorrelatePolicy,
    DebouncePolicy,
    EventSource,
    JobSubmitted,
    TriggerRecord,
    TriggerRule,
)
from jobmesh.errors import Unavailable
from jobmesh.runtime.provisioning import provision
from jobmesh.runtime.publisher import Publisher
from jobmesh.trigger.bursts import Bursts
from jobmesh.trigger.firing import Firer
from jobmesh.trigger.router import Incoming, Router
from jobmesh.trigger.rules import CompiledRule, compile_record, event_variables
from jobmesh.trigger.ruleset import RuleSet
from jobmesh.trigger.stats import RuleStats
from tests.helpers import eventually

EVENTS = "jobmesh.v1.events"
_submitted = msgspec.json.Decoder(JobSubmitted)


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
async def js(nc):
    js = nc.jetstream()
    await provision(js)
    return js


async def jobs_of(js, rule: str) -> list[JobSubmitted]:
    """Every JobSubmitted on JM_JOBS that ``rule`` started, in stream order."""
    info = await js.stream_info(subjects.STREAM_JOBS)
    out = []
    if info.state.messages:
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(subjects.STREAM_JOBS, seq)
            job = _submitted.decode(msg.data)
            if job.origin is not None and job.origin.rule == rule:
                out.append(job)
    return out


def compiled(name: str, **kw: Any) -> CompiledRule:
    rule = TriggerRule(
        name=name,
        source=EventSource(subjects=[f"{EVENTS}.>"]),
        job={"name": "{{ key }}", "runtime": {"kind": "handler", "handler": "h", "input": "{{ events }}"}},
        **kw,
    )
    return compile_record(TriggerRecord(rule=rule, version=1))


class Trigger:
    """One trigger replica's burst path: router, bursts (with its timer running), firer."""

    def __init__(self, js, rule: CompiledRule, clock: Clock) -> None:
        self.rule = rule
        self.rules = RuleSet(None)
        self.rules.apply(rule.name, msgspec.json.encode(rule.record))
        self.rules.ready.set()
        stats = RuleStats(None, "test")
        self.firer = Firer(Publisher(js), 1, None, stats, clock=clock)
        self.bursts = Bursts(js, self.firer, stats, self.rules, clock=clock)
        self.router = Router(self.firer, stats, self.bursts, clock=clock)
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Trigger:
        self.task = asyncio.create_task(self.bursts.run())
        await asyncio.wait_for(self.bursts.ready.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def send(self, subject: str, data: Any, event_id: str):
        variables = event_variables(subject, data, {}, event_id, 0.0)
        return await self.router.route([Incoming("event", variables, event_id, subject, [self.rule])])


async def test_one_hundred_events_for_one_key_within_the_window_give_one_job(js):
    clock = Clock()
    rule = compiled("deb", debounce=DebouncePolicy(seconds=30, key="event.repo"))
    async with Trigger(js, rule, clock) as t:
        for i in range(100):
            clock.now += 0.2  # every event within 30 s of the one before
            routed = await t.send(f"{EVENTS}.push", {"repo": "a", "n": i}, f"JM_EVENTS:{i}")
            assert routed.failures == [] and routed.held == 1
        assert t.bursts.pending("deb")[0].events == 100
        assert await jobs_of(js, "deb") == []
        clock.now += 30
        (job,) = await eventually(lambda: jobs_of(js, "deb"), what="the debounced job")
        await eventually(lambda: asyncio.sleep(0, t.bursts.count("deb") == 0), what="the state deleted")
    assert job.origin.kind == "debounce" and job.origin.events == 100
    assert [item["data"]["n"] for item in job.spec.runtime.input] == [99]
    assert len(await jobs_of(js, "deb")) == 1


async def test_250_events_with_max_100_give_three_jobs_covering_every_event_once(js):
    clock = Clock()
    rule = compiled("bat", batch=BatchPolicy(max_events=100, max_seconds=60))
    async with Trigger(js, rule, clock) as t:
        for chunk in range(0, 250, 25):  # the consumer's batches
            items = []
            for i in range(chunk, chunk + 25):
                s = f"{EVENTS}.x"
                items.append(Incoming("event", event_variables(s, {"n": i}, {}, f"E:{i}", 0.0), f"E:{i}", s, [rule]))
            await t.router.route(items)
        assert len(await jobs_of(js, "bat")) == 2  # two full batches fired within add
        assert [p.events for p in t.bursts.pending("bat")] == [50]
        clock.now += 60
        jobs = await eventually(lambda: _at_least(js, "bat", 3), what="the third batch, at its age")
    seen = sorted(item["data"]["n"] for job in jobs for item in job.spec.runtime.input)
    assert seen == list(range(250))
    assert sorted(job.origin.events for job in jobs) == [50, 100, 100]


async def _at_least(js, rule: str, n: int) -> list[JobSubmitted] | None:
    jobs = await jobs_of(js, rule)
    return jobs if len(jobs) >= n else None


async def test_a_correlation_fires_once_for_its_key_when_both_arrived_and_not_for_another(js):
    clock = Clock()
    rule = compiled(
        "cor",
        correlate=CorrelatePolicy(
            key="subject.tokens[5]",
            window=3600,
            parts=[
                CorrelatePart(name="dataset", subject=f"{EVENTS}.dataset.updated.*"),
                CorrelatePart(name="model", subject=f"{EVENTS}.model.released.*"),
            ],
        ),
    )
    async with Trigger(js, rule, clock) as t:
        await t.send(f"{EVENTS}.dataset.updated.X", {}, "E:1")
        await t.send(f"{EVENTS}.model.released.Y", {}, "E:2")
        assert await jobs_of(js, "cor") == []
        clock.now += 1800
        await t.send(f"{EVENTS}.model.released.X", {}, "E:3")
        (job,) = await jobs_of(js, "cor")
        assert job.spec.name == "X" and job.origin.kind == "correlate" and job.origin.events == 2
        assert [i["id"] for i in job.spec.runtime.input] == ["E:1", "E:3"]
        assert [(p.key, p.parts) for p in t.bursts.pending("cor")] == [("Y", {"model": 1})]
        # Y's model release is older than an hour when its dataset comes: nothing fires.
        clock.now += 1801
        await t.send(f"{EVENTS}.dataset.updated.Y", {}, "E:4")
        assert len(await jobs_of(js, "cor")) == 1
        assert [(p.key, p.parts) for p in t.bursts.pending("cor")] == [("Y", {"dataset": 1})]
        clock.now += 3600  # and that one expires in turn
        await eventually(lambda: asyncio.sleep(0, t.bursts.count("cor") == 0), what="Y expired")
    assert len(await jobs_of(js, "cor")) == 1


async def test_five_alerts_for_a_host_within_ten_minutes_fire_at_the_fifth(js):
    clock = Clock()
    rule = compiled(
        "alerts",
        correlate=CorrelatePolicy(
            key="subject.tokens[5]",
            window=600,
            parts=[CorrelatePart(name="alert", subject=f"{EVENTS}.alert.raised.*", count=5)],
        ),
    )
    async with Trigger(js, rule, clock) as t:
        await t.send(f"{EVENTS}.alert.raised.db1", {}, "A:0")
        clock.now += 601  # A:0 is out of the window by the time the next ones come
        for i in range(1, 5):
            clock.now += 60
            await t.send(f"{EVENTS}.alert.raised.db1", {}, f"A:{i}")
            await t.send(f"{EVENTS}.alert.raised.web2", {}, f"W:{i}")
        assert await jobs_of(js, "alerts") == []
        await t.send(f"{EVENTS}.alert.raised.db1", {}, "A:5")
        (job,) = await jobs_of(js, "alerts")
    assert job.spec.name == "db1" and job.origin.events == 5
    assert [i["id"] for i in job.spec.runtime.input] == [f"A:{i}" for i in range(1, 6)]


async def test_partial_state_survives_a_restart_and_two_replicas_fire_it_once(js):
    clock = Clock()
    rule = compiled("surv", batch=BatchPolicy(max_events=10, max_seconds=60))
    async with Trigger(js, rule, clock) as t:
        for i in range(3):
            await t.send(f"{EVENTS}.x", {"n": i}, f"S:{i}")
    # That replica is gone; two new ones see its state and both fire it when it is due.
    async with Trigger(js, rule, clock) as one, Trigger(js, rule, clock) as two:
        assert [p.events for p in one.bursts.pending("surv")] == [3]
        assert [p.events for p in two.bursts.pending("surv")] == [3]
        clock.now += 60
        await asyncio.gather(one.bursts.tick(), two.bursts.tick())
        (job,) = await jobs_of(js, "surv")
        await eventually(lambda: asyncio.sleep(0, one.bursts.count("surv") == 0), what="the state deleted")
    assert sorted(i["data"]["n"] for i in job.spec.runtime.input) == [0, 1, 2]


async def test_a_crash_between_the_publish_and_the_state_write_gives_one_job(js):
    clock = Clock()
    rule = compiled("crash", batch=BatchPolicy(max_events=5, max_seconds=60))
    async with Trigger(js, rule, clock) as t:
        for i in range(4):
            await t.send(f"{EVENTS}.x", {"n": i}, f"C:{i}")

        async def lost(*_: object) -> None:
            raise Unavailable("the state write never happened")

        real = t.bursts._write
        t.bursts._write = lost  # the process dies after the PubAck, before the write
        with pytest.raises(Unavailable):
            await t.send(f"{EVENTS}.x", {"n": 4}, "C:4")
        assert len(await jobs_of(js, "crash")) == 1
        t.bursts._write = real
        # The event was not acknowledged, so it comes again: the same batch, the same job.
        await t.send(f"{EVENTS}.x", {"n": 4}, "C:4")
        assert len(await jobs_of(js, "crash")) == 1
        assert t.bursts.count("crash") == 0


async def test_remove_deletes_a_rules_pending_state(js):
    clock = Clock()
    rule = compiled("gone", debounce=DebouncePolicy(seconds=5, key="event.k"))
    async with Trigger(js, rule, clock) as t:
        for k in "abc":
            await t.send(f"{EVENTS}.x", {"k": k}, f"G:{k}")
        assert t.bursts.count("gone") == 3
        await t.bursts.remove("gone")
        assert t.bursts.count("gone") == 0
    async with Trigger(js, rule, clock) as fresh:
        assert fresh.bursts.count("gone") == 0


async def test_a_batch_redelivered_after_its_state_write_makes_no_second_job(js):
    clock = Clock()
    rule = compiled("redo", batch=BatchPolicy(max_events=3, max_seconds=60))
    async with Trigger(js, rule, clock) as t:
        batch = [
            Incoming(
                "event", event_variables(f"{EVENTS}.x", {"n": i}, {}, f"R:{i}", 0.0), f"R:{i}", f"{EVENTS}.x", [rule]
            )
            for i in range(1, 5)
        ]
        await t.router.route(batch)
        clock.now += 1
        await t.router.route(batch)  # the same consumer batch, its ack lost
        clock.now += 60
        jobs = await eventually(lambda: _at_least(js, "redo", 2), what="the rest, at its age")
    assert [[i["data"]["n"] for i in job.spec.runtime.input] for job in jobs] == [[1, 2, 3], [4]]


async def test_the_timer_deletes_a_pending_state_that_does_not_decode(js):
    clock = Clock()
    rule = compiled("bad", batch=BatchPolicy(max_events=10))
    kv = await js.key_value(subjects.KV_TRIGGER_STATE)
    key = subjects.trigger_pending_key("bad", "0" * 24)
    await kv.put(key, b"not a pending state")
    async with Trigger(js, rule, clock):

        async def gone() -> bool | None:
            try:
                await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return True
            return None

        await eventually(gone, what="the undecodable state deleted")
