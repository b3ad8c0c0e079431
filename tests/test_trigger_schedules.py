"""Schedules across replicas, with real processes: two trigger services fire an
seconds-level cron rule (``* * * * * *``), one is killed -9 half-way, and JM_JOBS holds exactly one JobSubmitted
per tick, with no gap.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import msgspec
import nats
import pytest

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import JobSubmitted, ScheduleSource, TriggerRecord, TriggerRule
from jobmesh.runtime.provisioning import provision

ROOT = Path(__file__).resolve().parents[1]
TICKS = 20
KILL_AFTER = 8  # ticks seen before one replica is killed
pytestmark = pytest.mark.timeout(120)


def schedule_record(name: str, now: float) -> bytes:
    rule = TriggerRule(
        name=name,
        source=ScheduleSource(cron="* * * * * *"),  # every second; missed ticks are skipped (the default)
        job={"name": "tick {{ tick.iso }}", "runtime": {"kind": "noop"}},
    )
    return encode(TriggerRecord(rule=rule, version=1, created_at=now, updated_at=now))


class Submitted:
    """Collects the JobSubmitted events of one rule from JM_JOBS, by tick."""

    def __init__(self, rule: str) -> None:
        self.rule = rule
        self.ticks: Counter[int] = Counter()
        self.late: list[float] = []  # how long after its tick each job was submitted
        self.changed = asyncio.Event()

    async def on_msg(self, msg) -> None:
        event = msgspec.json.decode(msg.data, type=JobSubmitted)
        if event.origin is not None and event.origin.rule == self.rule:
            tick = int(event.origin.event.removeprefix("tick:"))
            self.ticks[tick] += 1
            self.late.append(event.submitted_at - tick)
            self.changed.set()
        await msg.ack()

    async def wait_for(self, distinct: int, timeout: float) -> None:
        """Wait until ``distinct`` ticks have a job (or fail after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while len(self.ticks) < distinct:
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(self.ticks)} of {distinct} ticks fired: {sorted(self.ticks)}")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass

    def check(self, first: int, count: int) -> None:
        """Exactly one job for each of ``count`` consecutive ticks from ``first``."""
        window = range(first, first + count)
        missing = [t for t in window if t not in self.ticks]
        doubled = {t: n for t, n in self.ticks.items() if n != 1}
        assert not missing, f"ticks without a job: {missing}"
        assert not doubled, f"ticks with more than one job: {doubled}"


async def run_two_replicas_and_kill_one(nats_url: str, rule: str, kill) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await provision(js)
        seen = Submitted(rule)
        sub = await js.subscribe(subjects.job_event("*", subjects.SUBMITTED), cb=seen.on_msg, ordered_consumer=True)
        kv = await js.key_value(subjects.KV_TRIGGERS)
        await kv.put(rule, schedule_record(rule, time.time()))

        await seen.wait_for(KILL_AFTER, timeout=30)
        first = min(seen.ticks)
        await kill()
        # The tick after the last one we hear of proves no later duplicate is still on its way.
        await seen.wait_for(TICKS + 1, timeout=60)
        await sub.unsubscribe()

        seen.check(first, TICKS)
        assert max(seen.ticks) - first + 1 == len(seen.ticks), sorted(seen.ticks)  # no gap anywhere
        # On time: the default policy (skip) fires a tick only within its grace.
        assert max(seen.late) < 2.0, seen.late

        state = await js.key_value(subjects.KV_TRIGGER_STATE)
        stored = msgspec.json.decode((await state.get(subjects.trigger_tick_key(rule))).value)
        assert stored["tick"] >= first + TICKS - 1 and stored["version"] == 1
    finally:
        await nc.close()


async def test_two_trigger_services_fire_each_tick_exactly_once_through_a_kill(make_cluster, nats_server):
    from tests.cluster_fixtures import Service

    cluster = await make_cluster([Service("trigger", tag="-a"), Service("trigger", tag="-b")], name="ticks")
    victim = cluster.procs[0].proc

    async def kill() -> None:
        os.kill(victim.pid, signal.SIGKILL)
        assert await asyncio.to_thread(victim.wait, 10) == -signal.SIGKILL

    await run_two_replicas_and_kill_one(nats_server.url, "every-second-svc", kill)
    assert cluster.procs[1].proc.poll() is None


async def test_the_stored_tick_never_moves_backwards(nats_server):
    """A replica that read the state before another moved it on loses the compare-and-set,
    reads again, and leaves the later tick in place."""
    from jobmesh.trigger.router import Router
    from jobmesh.trigger.rules import compile_record
    from jobmesh.trigger.ruleset import RuleSet
    from jobmesh.trigger.stats import RuleStats
    from jobmesh.trigger.ticker import Ticker, TickState

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        await provision(js)
        rule = compile_record(msgspec.json.decode(schedule_record("cas", 1000.0), type=TriggerRecord))

        async def dead_letter(*args, **kwargs) -> bool:
            return True

        def ticker() -> Ticker:
            return Ticker(RuleSet(None), Router(None, RuleStats(None, "t")), js, dead_letter)  # type: ignore[arg-type]

        slow, fast = ticker(), ticker()
        _, revision = await slow._read("cas")  # absent
        await fast._store(rule, TickState(tick=1005.0, version=1), revision)
        await slow._store(rule, TickState(tick=1003.0, version=1), revision)  # loses: create on a key that exists
        stored, revision = await slow._read("cas")
        assert stored == TickState(tick=1005.0, version=1)
        await fast._store(rule, TickState(tick=1006.0, version=1), revision)
        await slow._store(rule, TickState(tick=1004.0, version=1), revision)  # loses: a stale revision
        stored, _ = await slow._read("cas")
        assert stored == TickState(tick=1006.0, version=1)
        assert slow.due_at(rule) == 1007.0  # it learnt the later tick
    finally:
        await nc.close()
