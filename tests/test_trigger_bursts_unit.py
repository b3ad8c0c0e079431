"""Bursts, the deciding parts: debounce, batch and correlate state with an injected clock.

``take``/``expire`` are pure; ``Bursts`` runs here over its in-memory bucket (the same
compare-and-set rules as the KV) with a firer that records what it was given and, like
the stream's duplicate window, counts a key once. tests/test_trigger_bursts.py runs the
same over a real nats-server.
"""

from __future__ import annotations

from typing import Any

import msgspec
import nats.js.errors
import pytest

from jobmesh.contract.messages.v1 import (
    BatchPolicy,
    CorrelatePart,
    CorrelatePolicy,
    DebouncePolicy,
    EventSource,
    TriggerRecord,
    TriggerRule,
)
from jobmesh.errors import InvalidSpec, Unavailable
from jobmesh.trigger.bursts import (
    DEBOUNCE_KEEP,
    DONE_HORIZON,
    DONE_KEEP,
    ORPHAN_GRACE,
    SOFT_LIMIT,
    Bursts,
    Held,
    digest,
    expire,
    take,
)
from jobmesh.trigger.firing import Fire, Fired
from jobmesh.trigger.router import Incoming, Router
from jobmesh.trigger.rules import compile_record, event_variables
from jobmesh.trigger.ruleset import RuleSet
from jobmesh.trigger.stats import RuleStats

EVENTS = "jobmesh.v1.events"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingFirer:
    """Records fires; a key seen before is a duplicate (the stream's Nats-Msg-Id)."""

    def __init__(self, refuse: str = "") -> None:
        self.fires: list[Fire] = []
        self.keys: set[str] = set()
        self.refuse = refuse

    async def fire(self, fires):
        out = []
        for f in fires:
            if self.refuse and self.refuse in f.spec.name:
                out.append(Fired(error=InvalidSpec("refused", field="job.runtime")))
                continue
            duplicate = f.key in self.keys
            self.keys.add(f.key)
            if not duplicate:
                self.fires.append(f)
            out.append(Fired(job_id=f.key, duplicate=duplicate))
        return out


def rule_of(name: str = "r", version: int = 1, paused: bool = False, **kw: Any):
    subjects = kw.pop("subjects", [f"{EVENTS}.>"])
    job = kw.pop(
        "job", {"name": "n{{ count }}", "runtime": {"kind": "handler", "handler": "h", "input": "{{ events }}"}}
    )
    rule = TriggerRule(name=name, source=EventSource(subjects=subjects), job=job, **kw)
    return compile_record(TriggerRecord(rule=rule, version=version, paused=paused))


def incoming(subject: str, data: Any, event_id: str, rule, at: float = 0.0) -> Incoming:
    return Incoming("event", event_variables(subject, data, {}, event_id, at), event_id, subject, [rule])


def held(event_id: str, at: float, part: str = "", data: Any = None) -> Held:
    return Held(item={"id": event_id, "data": data, "subject": "s", "headers": {}, "time": at}, at=at, part=part)


def bursts_for(*rules, clock: Clock, firer: RecordingFirer | None = None, dead=None):
    ruleset = RuleSet(None)
    for r in rules:
        ruleset.apply(r.name, msgspec.json.encode(r.record))
    ruleset.ready.set()
    firer = firer or RecordingFirer()
    return Bursts(None, firer, RuleStats(None, "t"), ruleset, clock=clock, dead_letter=dead), firer, ruleset


# --- pure --------------------------------------------------------------------------------------
def test_debounce_keeps_the_last_event_and_counts_them_all():
    rule = rule_of(debounce=DebouncePolicy(seconds=30))
    state, bursts, changed = take(None, rule, "k", [held("a", 10), held("b", 10)], 10.0)
    assert changed and not bursts
    state, _, _ = take(state, rule, "k", [held("c", 20)], 20.0)
    assert [h.id for h in state.events] == ["c"]
    assert (state.count, state.first_at, state.last_at, state.due_at) == (3, 10.0, 20.0, 50.0)


def test_a_held_event_taken_again_changes_nothing():
    rule = rule_of(batch=BatchPolicy(max_events=10))
    state, _, _ = take(None, rule, "k", [held("a", 1)], 1.0)
    again, bursts, changed = take(state, rule, "k", [held("a", 2)], 2.0)
    assert not changed and not bursts and again is state


def test_a_batch_fires_at_max_events_and_the_rest_starts_the_next():
    rule = rule_of(batch=BatchPolicy(max_events=100, max_seconds=60))
    state, bursts, _ = take(None, rule, "k", [held(str(i), 5) for i in range(250)], 5.0)
    assert [b.count for b in bursts] == [100, 100]
    assert [h.id for h in bursts[1].events] == [str(i) for i in range(100, 200)]
    assert [h.id for h in state.events] == [str(i) for i in range(200, 250)]
    assert state.due_at == 65.0
    # The same batch gives the same id; another composition another.
    again, _, _ = take(None, rule, "k", [held(str(i), 9) for i in range(100)], 9.0)
    assert bursts[0].event_id == take(None, rule, "k", [held(str(i), 7) for i in range(100)], 7.0)[1][0].event_id
    # All of it fired: the key keeps only the ids it used, against a redelivery.
    assert again is not None and again.events == [] and len(again.done) == 100


def test_a_batch_past_the_size_limit_fires_early():
    rule = rule_of(batch=BatchPolicy(max_events=1000))
    big = "x" * (100 * 1024)
    state, bursts, _ = take(None, rule, "k", [held(str(i), 1, data=big) for i in range(7)], 1.0)
    assert len(bursts) == 1 and bursts[0].count == 6  # the sixth passed SOFT_LIMIT
    assert sum(len(h.item["data"]) for h in bursts[0].events) > SOFT_LIMIT
    assert [h.id for h in state.events] == ["6"]


def correlation(**kw):
    return rule_of(
        correlate=CorrelatePolicy(
            key="subject.tokens[5]",
            window=3600,
            parts=[
                CorrelatePart(name="data", subject=f"{EVENTS}.dataset.updated.*"),
                CorrelatePart(name="model", subject=f"{EVENTS}.model.released.*"),
            ],
            **kw,
        )
    )


def test_a_correlation_fires_when_every_part_is_there_and_keeps_the_extra():
    rule = correlation()
    state, bursts, _ = take(None, rule, "x", [held("d1", 1, "data"), held("d2", 2, "data")], 2.0)
    assert not bursts and state.parts() == {"data": 2}
    state, bursts, _ = take(state, rule, "x", [held("m1", 3, "model")], 3.0)
    assert len(bursts) == 1 and [h.id for h in bursts[0].events] == ["d1", "m1"]
    assert [h.id for h in state.events] == ["d2"]


def test_a_correlation_forgets_what_is_older_than_its_window():
    rule = correlation()
    state, _, _ = take(None, rule, "x", [held("d1", 0, "data")], 0.0)
    assert state.due_at == 3600
    state, bursts, _ = take(state, rule, "x", [held("m1", 3601, "model")], 3601.0)
    assert not bursts and state.parts() == {"model": 1}
    assert expire(state, 3600, 3601 + 3600) is None
    assert expire(state, 3600, 3601 + 3599) is not None


# --- Bursts over the in-memory bucket ----------------------------------------------------------
async def test_one_hundred_events_debounce_into_one_job_with_the_last_one():
    clock = Clock()
    rule = rule_of(debounce=DebouncePolicy(seconds=30, key="event.repo"))
    bursts, firer, _ = bursts_for(rule, clock=clock)
    router = Router(firer, RuleStats(None, "t"), bursts, clock=clock)  # type: ignore[arg-type]
    for i in range(100):
        clock.now += 0.1
        await router.route([incoming(f"{EVENTS}.push", {"repo": "a", "n": i}, f"E:{i}", rule)])
    assert bursts.count("r") == 1 and bursts.pending("r")[0].events == 100
    assert await bursts.tick() == 0
    clock.now += 30
    assert await bursts.tick() == 1
    assert await bursts.tick() == 0
    (fire,) = firer.fires
    assert fire.spec.name == "n100" and fire.origin.kind == "debounce" and fire.origin.events == 100
    assert fire.spec.runtime.input[0]["data"]["n"] == 99
    assert bursts.count("r") == 0


async def test_batches_cover_every_event_once_and_the_timer_fires_the_rest():
    clock = Clock()
    rule = rule_of(batch=BatchPolicy(max_events=100, max_seconds=60))
    bursts, firer, _ = bursts_for(rule, clock=clock)
    failures = await bursts.add([(incoming(f"{EVENTS}.x", {"n": i}, f"E:{i}", rule), rule) for i in range(250)])
    assert failures == [] and len(firer.fires) == 2
    clock.now += 60
    assert await bursts.tick() == 1
    seen = [item["data"]["n"] for f in firer.fires for item in f.spec.runtime.input]
    assert sorted(seen) == list(range(250))
    assert [f.origin.events for f in firer.fires] == [100, 100, 50]


async def test_a_filter_or_key_that_fails_fails_that_event_only():
    clock = Clock()
    rule = rule_of(batch=BatchPolicy(max_events=2, key="event.k"))
    bursts, firer, _ = bursts_for(rule, clock=clock)
    items = [(incoming(f"{EVENTS}.x", d, f"E:{i}", rule), rule) for i, d in enumerate([{"k": 1}, {}, {"k": 1}])]
    failures = await bursts.add(items)
    assert [f.incoming.event_id for f in failures] == ["E:1"]
    assert len(firer.fires) == 1


async def test_a_correlation_fires_once_for_its_key_and_not_for_another():
    clock = Clock()
    rule = correlation()
    bursts, firer, _ = bursts_for(rule, clock=clock)
    await bursts.add([(incoming(f"{EVENTS}.dataset.updated.x", {}, "E:1", rule), rule)])
    await bursts.add([(incoming(f"{EVENTS}.model.released.y", {}, "E:2", rule), rule)])
    assert not firer.fires and bursts.count(rule.name) == 2
    clock.now += 600
    await bursts.add([(incoming(f"{EVENTS}.model.released.x", {}, "E:3", rule), rule)])
    (fire,) = firer.fires
    assert fire.origin.kind == "correlate" and fire.origin.events == 2
    assert [p.key for p in bursts.pending(rule.name)] == ["y"]
    clock.now += 3600
    await bursts.tick()
    assert bursts.count(rule.name) == 0


async def test_the_correlation_cap_drops_the_oldest_key():
    clock = Clock()
    rule = correlation(max_pending=2)
    bursts, _, _ = bursts_for(rule, clock=clock)
    for i, host in enumerate("abc"):
        clock.now += 1
        await bursts.add([(incoming(f"{EVENTS}.dataset.updated.{host}", {}, f"E:{i}", rule), rule)])
    assert sorted(p.key for p in bursts.pending(rule.name)) == ["b", "c"]
    assert bursts.dropped == {rule.name: 1}


async def test_states_of_a_changed_or_removed_rule_are_dropped_and_a_paused_rule_waits():
    clock = Clock()
    rule = rule_of(debounce=DebouncePolicy(seconds=1))
    bursts, firer, ruleset = bursts_for(rule, clock=clock)
    await bursts.add([(incoming(f"{EVENTS}.x", {}, "E:1", rule), rule)])
    paused = compile_record(TriggerRecord(rule=rule.rule, version=1, paused=True))
    ruleset.apply(rule.name, msgspec.json.encode(paused.record))
    clock.now += 5
    assert await bursts.tick() == 0 and bursts.count("r") == 1
    v2 = compile_record(TriggerRecord(rule=rule.rule, version=2))
    ruleset.apply(rule.name, msgspec.json.encode(v2.record))
    await bursts.tick()
    assert bursts.count("r") == 0 and not firer.fires


async def test_a_template_that_fails_at_the_timer_dead_letters_the_events():
    clock = Clock()
    letters = []

    async def dead(subject, payload, outcome, deliveries=1, stream_seq=0, rule=""):
        letters.append((subject, payload, outcome, rule))
        return True

    rule = rule_of(debounce=DebouncePolicy(seconds=1), job={"name": "{{ event.missing }}", "runtime": {"kind": "noop"}})
    bursts, _, _ = bursts_for(rule, clock=clock, dead=dead)
    await bursts.add([(incoming(f"{EVENTS}.x", {}, "E:1", rule), rule)])
    clock.now += 1
    assert await bursts.tick() == 0
    ((subject, payload, outcome, name),) = letters
    assert subject == "pending.r" and name == "r" and outcome.code == "invalid_expression"
    assert b"E:1" in payload and bursts.count("r") == 0


async def test_a_conflict_rereads_and_applies_again():
    clock = Clock()
    rule = rule_of(batch=BatchPolicy(max_events=3))
    one, firer, ruleset = bursts_for(rule, clock=clock)
    two = Bursts(None, firer, RuleStats(None, "t"), ruleset, clock=clock)  # type: ignore[arg-type]
    two._kv = one._kv  # two replicas over one bucket
    await one.add([(incoming(f"{EVENTS}.x", {"n": 0}, "E:0", rule), rule)])
    await two.add([(incoming(f"{EVENTS}.x", {"n": 1}, "E:1", rule), rule)])  # two has no view of E:0 yet
    await one.add([(incoming(f"{EVENTS}.x", {"n": 2}, "E:2", rule), rule)])  # one's view is stale now
    (fire,) = firer.fires
    assert sorted(i["data"]["n"] for i in fire.spec.runtime.input) == [0, 1, 2]


@pytest.mark.parametrize("key", ["", "a", "a.b c/d", "ü" * 300])
def test_every_key_digests_into_one_kv_token(key):
    assert len(digest(key)) == 24 and digest(key).isalnum()


def test_a_redelivered_debounce_batch_keeps_the_newest_event():
    rule = rule_of(debounce=DebouncePolicy(seconds=30))
    state, _, _ = take(None, rule, "k", [held("a", 1), held("b", 1), held("c", 1)], 1.0)
    state, _, _ = take(state, rule, "k", [held("a", 2), held("b", 2), held("c", 2)], 2.0)
    assert [h.id for h in state.events] == ["c"] and state.count == 3


async def test_a_replica_whose_rules_are_behind_neither_drops_nor_overwrites_a_newer_state():
    clock = Clock()
    v2 = rule_of(debounce=DebouncePolicy(seconds=1), version=2)
    new, _, _ = bursts_for(v2, clock=clock)
    await new.add([(incoming(f"{EVENTS}.x", {}, "E:1", v2), v2)])
    v1 = rule_of(debounce=DebouncePolicy(seconds=1), version=1)
    old, firer, _ = bursts_for(v1, clock=clock)
    old._kv, old._view = new._kv, new._view  # the same bucket, and a view of it
    with pytest.raises(Unavailable):
        await old.add([(incoming(f"{EVENTS}.x", {}, "E:2", v1), v1)])
    clock.now += 5
    assert await old.tick() == 0 and old.count("r") == 1 and not firer.fires


async def test_a_state_of_a_rule_not_seen_yet_waits_out_a_grace_before_it_is_dropped():
    clock = Clock()
    rule = rule_of(debounce=DebouncePolicy(seconds=1))
    bursts, _, ruleset = bursts_for(rule, clock=clock)
    await bursts.add([(incoming(f"{EVENTS}.x", {}, "E:1", rule), rule)])
    ruleset.apply(rule.name, None)
    clock.now += 5
    await bursts.tick()
    assert bursts.count("r") == 1
    clock.now += ORPHAN_GRACE
    await bursts.tick()
    assert bursts.count("r") == 0


# --- redeliveries, replicas out of order, bad or foreign states ---------------------------------
def batch_items(rule, ids):
    return [(incoming(f"{EVENTS}.x", {"n": i}, f"E:{i}", rule), rule) for i in ids]


async def test_a_batch_redelivered_after_its_write_fires_no_event_again():
    clock = Clock()
    rule = rule_of(batch=BatchPolicy(max_events=3))
    bursts, firer, _ = bursts_for(rule, clock=clock)
    assert await bursts.add(batch_items(rule, [1, 2, 3, 4])) == []
    clock.now += 1
    assert await bursts.add(batch_items(rule, [1, 2, 3, 4])) == []  # its ack was lost
    assert len(firer.fires) == 1 and [p.events for p in bursts.pending("r")] == [1]
    await bursts.add(batch_items(rule, [5, 6]))
    seen = [[i["data"]["n"] for i in f.spec.runtime.input] for f in firer.fires]
    assert seen == [[1, 2, 3], [4, 5, 6]]
    # The key now only remembers what fired, which the timer forgets after the horizon.
    assert bursts.count("r") == 0 and len(bursts._view) == 1
    clock.now += DONE_HORIZON
    await bursts.tick()
    assert bursts._view == {}


async def test_a_correlation_redelivered_after_its_write_uses_no_event_again():
    clock = Clock()
    rule = correlation()
    bursts, firer, _ = bursts_for(rule, clock=clock)
    items = [
        (incoming(f"{EVENTS}.dataset.updated.x", {}, "E:1", rule), rule),
        (incoming(f"{EVENTS}.dataset.updated.x", {}, "E:2", rule), rule),
        (incoming(f"{EVENTS}.model.released.x", {}, "E:3", rule), rule),
    ]
    await bursts.add(items)
    clock.now += 1
    await bursts.add(items)
    (fire,) = firer.fires
    assert fire.origin.event.startswith("correlate:")
    assert bursts.pending("r")[0].parts == {"data": 1}


def test_a_debounce_keeps_its_newest_event_whatever_order_the_writes_land_in():
    rule = rule_of(debounce=DebouncePolicy(seconds=30))
    state, _, _ = take(None, rule, "k", [held("JM_EVENTS:3", 3)], 5.0)
    state, _, _ = take(state, rule, "k", [held("JM_EVENTS:1", 1), held("JM_EVENTS:2", 2)], 6.0)
    assert [h.id for h in state.events] == ["JM_EVENTS:3"] and state.count == 3 and state.due_at == 36.0
    # The same stream time: the stream sequence decides.
    state, _, _ = take(state, rule, "k", [held("JM_EVENTS:10", 3)], 7.0)
    assert [h.id for h in state.events] == ["JM_EVENTS:10"]


def test_a_debounce_counts_a_redelivered_event_once():
    rule = rule_of(debounce=DebouncePolicy(seconds=30))
    state, _, _ = take(None, rule, "k", [held("a", 1), held("b", 2), held("c", 3)], 1.0)
    again, _, changed = take(state, rule, "k", [held("b", 2)], 2.0)
    assert not changed and again.count == 3 and [h.id for h in again.events] == ["c"]


async def test_a_state_that_does_not_decode_is_replaced_and_dead_lettered():
    clock = Clock()
    letters = []

    async def dead(subject, payload, outcome, deliveries=1, stream_seq=0, rule=""):
        letters.append((subject, payload, outcome.code, rule))
        return True

    rule = rule_of(batch=BatchPolicy(max_events=10))
    bursts, _, _ = bursts_for(rule, clock=clock, dead=dead)
    kv_key = f"pending.r.{digest('')}"
    bursts._kv._put(kv_key, b"not a state")
    assert await bursts.add(batch_items(rule, [1])) == []
    assert [p.events for p in bursts.pending("r")] == [1]
    assert letters == [("pending.r", b"not a state", "invalid_message", "r")]


async def test_the_timer_deletes_a_state_that_does_not_decode():
    clock = Clock()
    rule = rule_of(batch=BatchPolicy(max_events=10))
    bursts, _, _ = bursts_for(rule, clock=clock)
    kv_key = f"pending.r.{digest('k')}"
    rev = bursts._kv._put(kv_key, b"{")

    async def watcher():
        yield Entry(kv_key, b"{", rev)

    await bursts._follow(watcher())
    await bursts.tick()
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await bursts._kv.get(kv_key)


class Entry(msgspec.Struct):
    key: str
    value: bytes
    revision: int
    operation: str | None = None


async def test_a_rule_deleted_and_added_again_drops_the_state_of_its_former_self():
    clock = Clock()
    old = compile_record(
        TriggerRecord(rule=rule_of(batch=BatchPolicy(max_events=10)).rule, version=3, created_at=100.0)
    )
    former, _, _ = bursts_for(old, clock=clock)
    await former.add(batch_items(old, [1]))
    new = compile_record(TriggerRecord(rule=old.rule, version=1, created_at=200.0))
    bursts, firer, _ = bursts_for(new, clock=clock)
    bursts._kv = former._kv
    await bursts.add(batch_items(new, [2]))  # no Unavailable: the version 3 is of the rule before
    assert [p.events for p in bursts.pending("r")] == [1]
    clock.now += 60
    await bursts.tick()
    (fire,) = firer.fires
    assert [i["data"]["n"] for i in fire.spec.runtime.input] == [2]


async def test_a_state_of_a_newer_version_is_dropped_after_the_grace():
    clock = Clock()
    v2 = rule_of(debounce=DebouncePolicy(seconds=1), version=2)
    new, _, _ = bursts_for(v2, clock=clock)
    await new.add([(incoming(f"{EVENTS}.x", {}, "E:1", v2), v2)])
    v1 = rule_of(debounce=DebouncePolicy(seconds=1), version=1)
    old, firer, _ = bursts_for(v1, clock=clock)
    old._kv, old._view = new._kv, new._view
    clock.now += ORPHAN_GRACE
    await old.add([(incoming(f"{EVENTS}.x", {}, "E:2", v1), v1)])  # no Unavailable past the grace
    assert [p.events for p in old.pending("r")] == [1]
    clock.now += 1
    assert await old.tick() == 1
    assert firer.fires[0].origin.event.endswith(":E:2")


async def test_add_counted_tells_what_it_held_from_what_the_filter_let_pass():
    clock = Clock()
    rule = rule_of(batch=BatchPolicy(max_events=10, key="event.k"), filter="event.n > 0")
    bursts, _, _ = bursts_for(rule, clock=clock)
    items = [(incoming(f"{EVENTS}.x", d, f"E:{i}", rule), rule) for i, d in enumerate([{"n": 0}, {"n": 1}, {"n": 2}])]
    failures, taken, filtered = await bursts.add_counted(items)
    assert [f.incoming.event_id for f in failures] == ["E:1", "E:2"]  # no "k": the key fails
    assert (taken, filtered) == (0, 1)
    items = [(incoming(f"{EVENTS}.x", {"n": 1, "k": 1}, "E:3", rule), rule)]
    assert await bursts.add_counted(items) == ([], 1, 0)


async def test_a_debounce_that_fired_is_not_started_again_by_a_redelivery():
    clock = Clock()
    rule = rule_of(debounce=DebouncePolicy(seconds=30))
    bursts, firer, _ = bursts_for(rule, clock=clock)
    items = batch_items(rule, [1, 2])
    await bursts.add(items)
    clock.now += 30
    assert await bursts.tick() == 1
    await bursts.add(items)  # the consumer batch again, its ack lost
    assert bursts.count("r") == 0 and len(firer.fires) == 1


def test_what_a_key_remembers_is_bounded():
    rule = rule_of(debounce=DebouncePolicy(seconds=30))
    state, _, _ = take(None, rule, "k", [held(f"E:{i}", i) for i in range(DEBOUNCE_KEEP + 10)], 1.0)
    assert len(state.done) == DEBOUNCE_KEEP and state.count == DEBOUNCE_KEEP + 10
    rule = rule_of(batch=BatchPolicy(max_events=1000))
    state, bursts, _ = take(None, rule, "k", [held(f"E:{i}", i) for i in range(DONE_KEEP + 1000)], 1.0)
    assert len(bursts) == 5 and len(state.done) == DONE_KEEP and len(state.events) == 96
    state, _, _ = take(state, rule, "k", [held("late", 1)], 1.0 + DONE_HORIZON)
    assert len(state.done) == 0  # past the horizon, forgotten


async def test_a_key_that_only_remembers_fired_events_counts_for_the_correlation_cap_when_it_waits_again():
    clock = Clock()
    rule = correlation(max_pending=1)
    bursts, _, _ = bursts_for(rule, clock=clock)

    def event(subject, event_id):
        return [(incoming(f"{EVENTS}.{subject}", {}, event_id, rule), rule)]

    await bursts.add(event("dataset.updated.a", "E:1") + event("model.released.a", "E:2"))  # a fired
    clock.now += 1
    await bursts.add(event("dataset.updated.b", "E:3"))
    clock.now += 1
    await bursts.add(event("dataset.updated.a", "E:4"))  # a waits again: b is the oldest
    assert [p.key for p in bursts.pending(rule.name)] == ["a"]
