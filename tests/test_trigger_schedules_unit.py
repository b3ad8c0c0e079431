"""Schedules as pure functions (cron and every, seconds, time zones and DST, the missed-tick
policy, bounded work, refusals), and the ticker's loop against an in-memory state."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from jobmesh.contract.messages.v1 import ScheduleSource, TriggerRecord, TriggerRule
from jobmesh.runtime.outcomes import Reject
from jobmesh.trigger import schedules
from jobmesh.trigger.firing import Fired
from jobmesh.trigger.router import Router
from jobmesh.trigger.rules import compile_record
from jobmesh.trigger.ruleset import RuleSet
from jobmesh.trigger.schedules import due_ticks, latest_tick, next_tick, schedule_problem
from jobmesh.trigger.stats import RuleStats
from jobmesh.trigger.ticker import Ticker, tick_id, tick_variables

UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()  # a Thursday, midnight UTC


def at(zone: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=zone).timestamp()


def local(t: float, zone: ZoneInfo = BERLIN) -> str:
    return datetime.fromtimestamp(t, zone).isoformat()


# --- schedule_problem -------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "field", "words"),
    [
        (ScheduleSource(), "cron", "needs cron"),
        (ScheduleSource(cron="* * * * *", every=5), "every", "not both"),
        (ScheduleSource(every=0.5), "every", "at least 1 second"),
        (ScheduleSource(every=1, timezone="Mars/Olympus"), "timezone", "'Mars/Olympus' is not a time zone"),
        (ScheduleSource(every=1, timezone="Europe"), "timezone", "not a time zone"),
        (ScheduleSource(every=1, timezone="../etc/passwd"), "timezone", "not a time zone"),
        (ScheduleSource(cron="* * * *"), "cron", "has 4 fields"),
        (ScheduleSource(cron="* * * * * 2026 *"), "cron", "has 7 fields"),
        (ScheduleSource(cron="61 * * * *"), "cron", "not a cron expression"),
        (ScheduleSource(cron="H * * * *"), "cron", "not a cron expression"),
        (ScheduleSource(cron="@daily now"), "cron", "stands alone"),
        (ScheduleSource(cron="0 0 31 2 *"), "cron", "never matches"),
        (ScheduleSource(cron="0 9 * * *", timezone="Nowhere/City"), "timezone", "not a time zone"),
    ],
)
def test_schedule_problem_names_the_field(source, field, words):
    problem = schedule_problem(source)
    assert problem is not None
    assert problem[0] == field
    assert words in problem[1], problem


@pytest.mark.parametrize(
    "source",
    [
        ScheduleSource(cron="*/5 * * * *"),
        ScheduleSource(cron="*/10 * * * * *"),
        ScheduleSource(cron="@hourly"),
        ScheduleSource(cron="0 9 * * mon-fri", timezone="Europe/Berlin"),
        ScheduleSource(every=1),
        ScheduleSource(every=86400, timezone="America/New_York"),
    ],
)
def test_valid_schedules_have_no_problem(source):
    assert schedule_problem(source) is None


def test_a_bad_schedule_is_refused_when_the_rule_compiles():
    from jobmesh.trigger.rules import RuleError

    rule = TriggerRule(
        name="r", source=ScheduleSource(cron="* * *"), job={"runtime": {"kind": "process", "argv": ["true"]}}
    )
    with pytest.raises(RuleError) as info:
        compile_record(TriggerRecord(rule=rule, version=1))
    assert info.value.field == "source.cron"


# --- next_tick and latest_tick ------------------------------------------------------
def test_every_ticks_on_multiples_since_the_epoch():
    src = ScheduleSource(every=60)
    assert next_tick(src, T0) == T0 + 60  # strictly after
    assert next_tick(src, T0 - 0.001) == T0
    assert next_tick(src, T0 + 59.9) == T0 + 60
    assert latest_tick(src, T0) == T0  # at or before
    assert latest_tick(src, T0 + 59.9) == T0
    # Two replicas that start at different moments compute the same ticks.
    assert next_tick(src, T0 + 7) == next_tick(src, T0 + 31) == T0 + 60


def test_fractional_every():
    src = ScheduleSource(every=1.5)
    assert next_tick(src, 3.0) == 4.5
    assert latest_tick(src, 4.4) == 3.0
    assert tick_id(4.5) == "tick:4.500"
    assert tick_id(6.0) == "tick:6"


def test_five_field_cron_is_minutes():
    src = ScheduleSource(cron="*/15 * * * *")
    assert next_tick(src, T0) == T0 + 900
    assert latest_tick(src, T0 + 1000) == T0 + 900
    assert latest_tick(src, T0 + 900) == T0 + 900


def test_six_field_cron_has_the_seconds_first():
    # croniter alone would read the sixth field as seconds (last); we read the first.
    src = ScheduleSource(cron="*/10 * * * * *")
    assert next_tick(src, T0) == T0 + 10
    assert next_tick(src, T0 + 10) == T0 + 20
    src = ScheduleSource(cron="30 0 * * * *")  # second 30 of minute 0 of every hour
    assert next_tick(src, T0) == T0 + 30
    assert next_tick(src, T0 + 30) == T0 + 3600 + 30
    every_second = ScheduleSource(cron="* * * * * *")
    assert next_tick(every_second, T0 + 0.25) == T0 + 1
    assert latest_tick(every_second, T0 + 0.25) == T0


def test_cron_in_a_time_zone():
    src = ScheduleSource(cron="0 9 * * *", timezone="America/New_York")
    tick = next_tick(src, T0)
    assert datetime.fromtimestamp(tick, ZoneInfo("America/New_York")).hour == 9
    assert tick == T0 + 14 * 3600  # 09:00 EST is 14:00 UTC


def test_daily_cron_across_the_spring_forward_in_berlin():
    # 2026-03-29: 02:00 CET becomes 03:00 CEST; the day is 23 hours long.
    src = ScheduleSource(cron="0 9 * * *", timezone="Europe/Berlin")
    before = next_tick(src, at(BERLIN, 2026, 3, 28, 12))
    after = next_tick(src, before)
    assert local(before) == "2026-03-29T09:00:00+02:00"
    assert after - before == 86400
    assert local(next_tick(src, at(BERLIN, 2026, 3, 27, 12))) == "2026-03-28T09:00:00+01:00"
    assert before - next_tick(src, at(BERLIN, 2026, 3, 27, 12)) == 23 * 3600


def test_hourly_cron_skips_the_missing_hour():
    src = ScheduleSource(cron="0 * * * *", timezone="Europe/Berlin")
    t = next_tick(src, at(BERLIN, 2026, 3, 29, 1, 30))
    assert local(t) == "2026-03-29T03:00:00+02:00"  # there is no 02:00
    assert t - at(BERLIN, 2026, 3, 29, 1, 0) == 3600  # one real hour after 01:00
    # A local time inside the gap fires at the first instant after it.
    gap = ScheduleSource(cron="30 2 * * *", timezone="Europe/Berlin")
    assert local(next_tick(gap, at(BERLIN, 2026, 3, 28, 12))) == "2026-03-29T03:00:00+02:00"


def test_due_ticks_across_the_spring_forward():
    src = ScheduleSource(cron="0 * * * *", timezone="Europe/Berlin", missed="catch_up", catch_up_max=10)
    ticks = due_ticks(src, at(BERLIN, 2026, 3, 29, 0, 30), at(BERLIN, 2026, 3, 29, 4, 0) + 1)
    assert [local(t) for t in ticks] == [
        "2026-03-29T01:00:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T04:00:00+02:00",
    ]


# --- due_ticks ------------------------------------------------------------------------
def test_an_on_time_replica_fires_the_current_tick():
    src = ScheduleSource(every=60)
    assert due_ticks(src, T0, T0 + 60.2) == [T0 + 60]
    assert due_ticks(src, T0, T0 + 59.9) == []
    assert due_ticks(src, T0 + 60, T0 + 60.2) == []  # already fired


def test_a_rule_without_a_baseline_fires_no_past_tick():
    assert due_ticks(ScheduleSource(every=1, missed="catch_up", catch_up_max=5), None, T0 + 0.1) == []


def test_skip_drops_the_ticks_of_a_downtime():
    src = ScheduleSource(every=60)  # grace: max(2 s, 6 s) = 6 s
    # Down for an hour; now is 3 s after a tick: that tick is on time, the rest are skipped.
    assert due_ticks(src, T0, T0 + 3600 + 3) == [T0 + 3600]
    # Now is 30 s after the latest tick: it is late too, so nothing fires.
    assert due_ticks(src, T0, T0 + 3600 + 30) == []


def test_skip_keeps_the_on_time_ticks_of_a_short_hiccup():
    src = ScheduleSource(every=1)  # grace 2 s
    assert due_ticks(src, T0, T0 + 2.5) == [T0 + 1, T0 + 2]
    assert due_ticks(src, T0, T0 + 100.5) == [T0 + 99, T0 + 100]


def test_skip_with_cron():
    src = ScheduleSource(cron="*/5 * * * *")  # grace 30 s
    assert due_ticks(src, T0, T0 + 86400 + 10) == [T0 + 86400]
    assert due_ticks(src, T0, T0 + 86400 + 40) == []


def test_catch_up_fires_at_most_catch_up_max_of_the_latest():
    src = ScheduleSource(every=60, missed="catch_up", catch_up_max=3)
    assert due_ticks(src, T0, T0 + 3600 + 30) == [T0 + 3480, T0 + 3540, T0 + 3600]
    assert due_ticks(src, T0, T0 + 130) == [T0 + 60, T0 + 120]
    cron = ScheduleSource(cron="0 * * * *", missed="catch_up", catch_up_max=2)
    assert due_ticks(cron, T0, T0 + 5 * 3600 + 1) == [T0 + 4 * 3600, T0 + 5 * 3600]


def test_the_work_is_bounded_for_a_huge_gap():
    # Thirty years of every-second ticks (about 10^9), and of a seconds cron.
    for source in (
        ScheduleSource(every=1, missed="catch_up", catch_up_max=1000),
        ScheduleSource(cron="* * * * * *", missed="catch_up", catch_up_max=1000),
        ScheduleSource(cron="* * * * * *"),
        ScheduleSource(every=1),
    ):
        started = time.perf_counter()
        ticks = due_ticks(source, 0.0, T0 + 0.5)
        assert time.perf_counter() - started < 2.0, source
        assert ticks[-1] == T0
        assert len(ticks) == (1000 if source.missed == "catch_up" else 2)
        assert ticks == sorted(set(ticks))


def test_tick_variables():
    variables = tick_variables(T0)
    assert variables["id"] == f"tick:{int(T0)}"
    assert variables["tick"] == {"unix": T0, "iso": "2026-01-01T00:00:00+00:00"}
    assert variables["time"]["unix"] == T0  # the tick's time: every replica builds the same job


# --- the ticker, with an in-memory state and a stand-in firer ---------------------------
class StubFirer:
    def __init__(self) -> None:
        self.keys: list[str] = []

    async def fire(self, fires):
        self.keys.extend(f.key for f in fires)
        return [Fired(job_id=f.key) for f in fires]


class FakeTime:
    """A clock that moves only when the ticker sleeps."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)  # the fake clock's sleep still yields to the loop (noqa: sleep)


def record(source: ScheduleSource, *, paused=False, version=1, created_at=T0, paused_at=0.0, job=None) -> bytes:
    from jobmesh.contract.codec import encode

    rule = TriggerRule(name="nightly", source=source, job=job or {"runtime": {"kind": "process", "argv": ["true"]}})
    return encode(TriggerRecord(rule=rule, version=version, paused=paused, created_at=created_at, paused_at=paused_at))


def ticker_of(clock: FakeTime, dead=None):
    stats = RuleStats(None, "test")
    firer = StubFirer()
    ruleset = RuleSet(None)
    router = Router(firer, stats, clock=clock)  # type: ignore[arg-type]

    async def dead_letter(subject, payload, outcome, deliveries=1, stream_seq=0, rule=""):
        if dead is not None:
            dead.append((subject, payload, outcome, rule))
        return True

    return Ticker(ruleset, router, None, dead_letter, clock=clock, sleep=clock.sleep), ruleset, firer, stats


async def test_ticker_fires_each_tick_once_and_sleeps_between():
    clock = FakeTime(T0 + 0.5)
    ticker, ruleset, firer, _ = ticker_of(clock)
    ruleset.apply("nightly", record(ScheduleSource(every=10)))
    for _ in range(12):
        await ticker.step()
    assert firer.keys == [f"trigger:nightly:1:tick:{int(T0) + 10 * i}" for i in range(1, 7)]
    assert ticker.next_tick_of(ruleset.get("nightly")) == T0 + 70


async def test_ticker_wakes_on_a_rule_change():
    clock = FakeTime(T0)
    ticker, ruleset, _, _ = ticker_of(clock)
    never = asyncio.Event()
    asleep = asyncio.Event()

    async def long_sleep(seconds: float) -> None:
        asleep.set()
        await never.wait()

    ticker._sleep = long_sleep
    waiting = asyncio.ensure_future(ticker.step())
    await asyncio.wait_for(asleep.wait(), 1.0)  # the ticker is waiting for its next tick
    assert not waiting.done()
    ruleset.apply("nightly", record(ScheduleSource(every=10)))
    await asyncio.wait_for(waiting, 1.0)


async def test_a_paused_rule_is_skipped_and_its_ticks_are_not_caught_up():
    clock = FakeTime(T0 + 0.5)
    ticker, ruleset, firer, stats = ticker_of(clock)
    source = ScheduleSource(every=10, missed="catch_up", catch_up_max=100)
    ruleset.apply("nightly", record(source, paused=True, paused_at=T0))
    for _ in range(6):
        await ticker.step()
    assert firer.keys == []
    assert stats.local("nightly").skipped == 3
    # Resumed later; the ticks between the last skip and the resume are not caught up either.
    clock.now += 100
    ruleset.apply("nightly", record(source, paused=False, paused_at=clock.now))
    for _ in range(2):
        await ticker.step()
    assert [k.rsplit(":", 1)[1] for k in firer.keys] == [str(int(T0) + 140)]


async def test_a_new_version_continues_from_the_stored_tick():
    clock = FakeTime(T0 + 0.5)
    ticker, ruleset, firer, _ = ticker_of(clock)
    source = ScheduleSource(every=10)
    ruleset.apply("nightly", record(source))
    for _ in range(2):
        await ticker.step()
    ruleset.apply("nightly", record(source, version=2))
    for _ in range(3):
        await ticker.step()
    assert firer.keys == [f"trigger:nightly:1:tick:{int(T0) + 10}", f"trigger:nightly:2:tick:{int(T0) + 20}"]


async def test_a_tick_the_template_cannot_use_is_dead_lettered():
    clock = FakeTime(T0 + 0.5)
    dead: list = []
    ticker, ruleset, firer, stats = ticker_of(clock, dead)
    job = {"runtime": {"kind": "process", "argv": ["{{ event.missing }}"]}}
    ruleset.apply("nightly", record(ScheduleSource(every=10), job=job))
    for _ in range(2):
        await ticker.step()
    assert firer.keys == []
    assert len(dead) == 1
    subject, payload, outcome, rule = dead[0]
    assert subject == "tick.nightly" and rule == "nightly"
    assert isinstance(outcome, Reject)
    assert b'"tick":' in payload
    assert stats.local("nightly").failures == 1
    # The tick moved on: the next wake is the next tick, not the failed one again.
    assert ticker.due_at(ruleset.get("nightly")) == T0 + 20


async def test_a_transient_error_retries_the_tick_after_a_backoff():
    clock = FakeTime(T0 + 0.5)
    ticker, ruleset, firer, _ = ticker_of(clock)
    ruleset.apply("nightly", record(ScheduleSource(every=10, missed="catch_up", catch_up_max=5)))
    from jobmesh.errors import Unavailable

    calls = {"n": 0}
    real = firer.fire

    async def flaky(fires):
        calls["n"] += 1
        if calls["n"] == 1:
            raise Unavailable("publish timed out")
        return await real(fires)

    firer.fire = flaky  # type: ignore[method-assign]
    for _ in range(4):
        await ticker.step()
    assert calls["n"] == 2
    assert firer.keys == [f"trigger:nightly:1:tick:{int(T0) + 10}"]


def test_grace_is_at_least_two_seconds():
    assert schedules.grace_of(ScheduleSource(every=1), 0.0) == 2.0
    assert schedules.grace_of(ScheduleSource(every=600), 0.0) == 60.0
