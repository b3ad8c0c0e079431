"""The schedule ticker: one loop per trigger replica that fires the schedule rules' ticks.

Every replica runs one. Each computes every schedule rule's next tick from the same pure
functions (:mod:`jobmesh.trigger.schedules`), sleeps until the earliest (waking early when
the rule set changes), and at a tick reads the rule's last fired tick from
``jm_trigger_state``, fires the due ticks through the router and moves the stored tick on
with compare-and-set.

Why several replicas give one job per tick: a tick's job has the idempotency key
``trigger:<rule>:<version>:tick:<t>``, the same on every replica, so two replicas that fire
the same tick publish the same Nats-Msg-Id and job id: the stream keeps one. The stored
tick only saves the work (and bounds what a replica that comes back after downtime
catches up); it is never moved backwards, so a slow replica cannot make a tick fire again
after the dedupe window.

Pausing: a paused rule's ticks still pass through the router, which counts each as a skip,
and the stored tick moves on; on resume, the ticks of the pause are not caught up (they
were skipped), even those no replica was up to skip, since a rule's baseline is never
earlier than when it was last paused or resumed. A new version of a rule continues from
the stored tick.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import ScheduleSource
from jobmesh.errors import Overloaded, Unavailable
from jobmesh.runtime.outcomes import Reject
from jobmesh.trigger import rules as rules_mod
from jobmesh.trigger.router import Incoming, Router
from jobmesh.trigger.rules import CompiledRule
from jobmesh.trigger.ruleset import RuleSet
from jobmesh.trigger.schedules import due_ticks, latest_tick, next_tick

log = logging.getLogger("jobmesh.trigger.ticker")

# The longest the loop sleeps without looking again: a wall clock that jumps (NTP, a
# suspended VM) is noticed within this.
MAX_SLEEP = 30.0
# Retry after a transient NATS error: the first delay, doubling up to the cap.
RETRY_BASE = 0.5
RETRY_CAP = 10.0


class DeadLetter(Protocol):
    """:meth:`jobmesh.runtime.service.Runtime.dead_letter`."""

    def __call__(
        self, subject: str, payload: bytes, outcome: Reject, deliveries: int = 1, stream_seq: int = 0, rule: str = ""
    ) -> Awaitable[bool]: ...


class TickState(msgspec.Struct, frozen=True, kw_only=True):
    """What ``jm_trigger_state`` holds under ``tick.<rule>``: the last tick the rule
    fired (or skipped), and the rule's version then."""

    tick: float
    version: int = 0


_state_decoder = msgspec.json.Decoder(TickState)
_encoder = msgspec.json.Encoder()


def tick_id(tick: float) -> str:
    """A tick's event id: ``tick:<unix seconds>``, with milliseconds only when the tick
    has a fraction (an ``every`` of 1.5 s). Every replica computes the same text."""
    if float(tick).is_integer():
        return f"tick:{int(tick)}"
    return f"tick:{tick:.3f}"


def tick_variables(tick: float) -> dict[str, Any]:
    """The CEL variables of one tick: ``tick`` and ``time`` are the tick's time (not the
    moment a replica got to it), so every replica builds the same job."""
    event_id = tick_id(tick)
    variables = rules_mod.event_variables("", None, {}, event_id, tick)
    variables["tick"] = rules_mod.time_of(tick)
    variables["id"] = event_id
    return variables


class Ticker:
    """Fires schedule rules' ticks.

    Args:
        rules: the live rule set (its schedule rules are the ones ticked).
        router: fires the ticks (skips of paused rules, failures, jobs).
        js: the JetStream context, for ``jm_trigger_state`` (None: in memory only, tests).
        dead_letter: records a tick a rule could not make a job of
            (:meth:`Runtime.dead_letter`).
        clock: unix time.
        sleep: ``asyncio.sleep`` (tests hand in their own).
    """

    def __init__(
        self,
        rules: RuleSet,
        router: Router,
        js: JetStreamContext | None,
        dead_letter: DeadLetter,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._rules = rules
        self._router = router
        self._js = js
        self._dead_letter = dead_letter
        self._clock = clock
        self._sleep = sleep
        self._changed = asyncio.Event()
        # What this replica knows of each rule's last tick (from the KV or its own writes).
        self._last: dict[str, float] = {}
        # When a rule first showed up here: the baseline of a record without created_at.
        self._seen: dict[str, float] = {}
        self._retry_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._memory: dict[str, tuple[TickState, int]] = {}  # js None: the "bucket"
        rules.on_change(self._changed.set)

    # --- reading -----------------------------------------------------------------
    def next_tick_of(self, rule: CompiledRule) -> float:
        """The rule's next tick after now (``jobmesh trigger list``); 0 when it is not a
        schedule."""
        source = rule.rule.source
        if not isinstance(source, ScheduleSource):
            return 0.0
        return next_tick(source, max(self._clock(), self._baseline(rule)))

    def due_at(self, rule: CompiledRule) -> float:
        """When this replica next looks at ``rule``: its next tick after what it knows was
        fired, or the retry of a failed tick."""
        source = rule.rule.source
        assert isinstance(source, ScheduleSource)
        at = next_tick(source, self._baseline(rule))
        return max(at, self._retry_at.get(rule.name, 0.0))

    def _baseline(self, rule: CompiledRule) -> float:
        """The time after which the rule's ticks are due: its last tick, and never before
        it was created or last paused or resumed."""
        record = rule.record
        seen = self._seen.setdefault(rule.name, self._clock())
        created = record.created_at or seen
        return max(self._last.get(rule.name, -math.inf), created, record.paused_at)

    # --- the loop ----------------------------------------------------------------
    async def run(self) -> None:
        """Tick forever (a background task)."""
        while True:
            await self.step()

    async def step(self) -> None:
        """Fire what is due now, then wait until the next tick or a change of the rules."""
        self._changed.clear()  # before looking: a change while we work wakes the wait
        now = self._clock()
        live = self._rules.of_kind("schedule")
        self._forget({r.name for r in live})
        due = [r for r in live if self.due_at(r) <= now]
        if due:
            await asyncio.gather(*(self.tick(r) for r in due))
            return
        earliest = min((self.due_at(r) for r in live), default=now + MAX_SLEEP)
        await self._wait(min(max(earliest - now, 0.0), MAX_SLEEP))

    async def _wait(self, seconds: float) -> None:
        sleeping = asyncio.ensure_future(self._sleep(seconds))
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait((sleeping, changed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeping, changed):
                task.cancel()

    def _forget(self, live: set[str]) -> None:
        for table in (self._last, self._seen, self._retry_at, self._failures):
            for name in [n for n in table if n not in live]:
                del table[name]

    async def tick(self, rule: CompiledRule) -> None:
        """Fire ``rule``'s due ticks and store the last one; on a transient error, retry
        it after a backoff."""
        try:
            await self._tick(rule)
        except (TimeoutError, nats.errors.Error, Unavailable, Overloaded) as exc:
            delay = self._back_off(rule.name)
            log.warning("rule %s: tick failed (%s: %s); retrying in %.1fs", rule.name, type(exc).__name__, exc, delay)
            return
        except Exception:
            # A bug, not the network: one rule must not stop every other rule's ticks.
            # The tick is kept and retried after the same backoff (its jobs dedupe).
            delay = self._back_off(rule.name)
            log.exception("rule %s: tick failed unexpectedly; retrying in %.1fs", rule.name, delay)
            return
        self._failures.pop(rule.name, None)
        self._retry_at.pop(rule.name, None)

    def _back_off(self, name: str) -> float:
        failures = self._failures.get(name, 0) + 1
        self._failures[name] = failures
        delay = min(RETRY_BASE * 2 ** (failures - 1), RETRY_CAP)
        self._retry_at[name] = self._clock() + delay
        return delay

    async def _tick(self, rule: CompiledRule) -> None:
        source = rule.rule.source
        assert isinstance(source, ScheduleSource)
        stored, revision = await self._read(rule.name)
        if stored is not None:
            self._remember(rule.name, stored.tick)
        now = self._clock()
        last = self._baseline(rule)
        latest = latest_tick(source, now)
        if latest <= last:
            return  # another replica got here first
        ticks = due_ticks(source, last, now)
        if ticks:
            await self._fire(rule, ticks)
        await self._store(rule, TickState(tick=latest, version=rule.version), revision)

    async def _fire(self, rule: CompiledRule, ticks: list[float]) -> None:
        items = [
            Incoming(kind="schedule", variables=tick_variables(t), event_id=tick_id(t), subject="", rules=[rule])
            for t in ticks
        ]
        routed = await self._router.route(items)
        for failure in routed.failures:
            payload = _encoder.encode(
                {"rule": rule.name, "version": rule.version, "tick": failure.incoming.variables["tick"]["unix"]}
            )
            recorded = await self._dead_letter(
                f"tick.{rule.name}",
                payload,
                Reject(failure.error.code, str(failure.error)),
                rule=rule.name,
            )
            if not recorded:
                # Not recorded: keep the tick, so the retry records it (its jobs dedupe).
                raise Unavailable(f"rule {rule.name}: could not record the dead letter of {failure.incoming.event_id}")

    # --- jm_trigger_state ----------------------------------------------------------
    def _remember(self, name: str, tick: float) -> None:
        self._last[name] = max(self._last.get(name, -math.inf), tick)

    async def _bucket(self) -> Any:
        assert self._js is not None
        return await self._js.key_value(subjects.KV_TRIGGER_STATE)

    async def _read(self, name: str) -> tuple[TickState | None, int]:
        """The stored state of a rule and its revision (0: none)."""
        if self._js is None:
            state, revision = self._memory.get(name, (None, 0))
            return state, revision
        kv = await self._bucket()
        try:
            entry = await kv.get(subjects.trigger_tick_key(name))
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        if not entry.value:
            return None, 0
        try:
            return _state_decoder.decode(entry.value), entry.revision or 0
        except msgspec.DecodeError:
            log.error("rule %s: unreadable tick state %r; overwriting it", name, entry.value[:100])
            return None, entry.revision or 0

    async def _store(self, rule: CompiledRule, state: TickState, revision: int) -> None:
        """Move the stored tick to ``state.tick`` (compare-and-set). A conflict means
        another replica moved it: read again, and write only if ours is still later."""
        for _ in range(5):
            if self._js is None:
                current = self._memory.get(rule.name)
                if current is None or current[1] == revision:
                    self._memory[rule.name] = (state, revision + 1)
                    break
            else:
                kv = await self._bucket()
                key = subjects.trigger_tick_key(rule.name)
                try:
                    if revision:
                        await kv.update(key, _encoder.encode(state), last=revision)
                    else:
                        await kv.create(key, _encoder.encode(state))
                    break
                except nats.js.errors.KeyWrongLastSequenceError:
                    pass
            stored, revision = await self._read(rule.name)
            if stored is not None and stored.tick >= state.tick:
                self._remember(rule.name, stored.tick)
                return
        else:
            raise Unavailable(f"rule {rule.name}: the tick state kept changing under us")
        self._remember(rule.name, state.tick)
