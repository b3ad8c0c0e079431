"""Per-rule figures: fires, failures, paused skips, the last fire and the last error.

Each trigger instance counts in memory and writes its own figures to ``jm_trigger_stats``
under ``<rule>.<instance>`` about once a second, when they changed: one KV put per rule
per second, never one per event. ``api.triggers.list`` sums every instance's key, so the
figures of an instance that died stay counted. Removing a rule removes its keys.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import msgspec
import nats.errors
from nats.js import JetStreamContext

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import TriggerStats
from jobmesh.runtime.kvwatch import bucket_keys
from jobmesh.trigger.metrics import TriggerMetrics

log = logging.getLogger("jobmesh.trigger.stats")

FLUSH_SECONDS = 1.0
_decoder = msgspec.json.Decoder(TriggerStats)
_encoder = msgspec.json.Encoder()


class _Counts:
    __slots__ = ("failures", "fires", "last_error", "last_error_at", "last_fire_at", "skipped")

    def __init__(self) -> None:
        self.fires = 0
        self.failures = 0
        self.skipped = 0
        self.last_fire_at = 0.0
        self.last_error = ""
        self.last_error_at = 0.0

    def frozen(self) -> TriggerStats:
        return TriggerStats(
            fires=self.fires,
            failures=self.failures,
            skipped=self.skipped,
            last_fire_at=self.last_fire_at,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
        )


class RuleStats:
    """This instance's figures, and the sums over every instance.

    Args:
        js: the JetStream context (None: count in memory only, for tests of the deciders).
        instance: this instance's name (``Settings.instance``).
        metrics: the trigger's instruments, which count the same fires, failures and
            skips for the metrics endpoint (the global meter's when omitted).
    """

    def __init__(self, js: JetStreamContext | None, instance: str, metrics: TriggerMetrics | None = None) -> None:
        self._metrics = metrics or TriggerMetrics()
        self._js = js
        self._instance = instance
        self._counts: dict[str, _Counts] = {}
        self._dirty: set[str] = set()

    def _of(self, rule: str) -> _Counts:
        counts = self._counts.get(rule)
        if counts is None:
            counts = self._counts[rule] = _Counts()
        self._dirty.add(rule)
        return counts

    def fired(self, rule: str, at: float, jobs: int = 1, kind: str = "") -> None:
        """Count ``jobs`` submitted (not duplicates) for ``rule``; ``kind`` is what fired
        (``JobOrigin.kind``)."""
        self._metrics.fired(kind, rule, jobs)
        counts = self._of(rule)
        counts.fires += jobs
        counts.last_fire_at = max(counts.last_fire_at, at)

    def failed(self, rule: str, reason: str, at: float) -> None:
        """Count an event the rule could not make a job of."""
        self._metrics.failed(rule)
        counts = self._of(rule)
        counts.failures += 1
        counts.last_error = reason[:500]
        counts.last_error_at = at

    def skipped(self, rule: str) -> None:
        """Count an event that matched while the rule was paused."""
        self._metrics.skipped(rule)
        self._of(rule).skipped += 1

    def local(self, rule: str) -> TriggerStats:
        """This instance's figures for ``rule`` (what it has not written yet included)."""
        counts = self._counts.get(rule)
        return counts.frozen() if counts is not None else TriggerStats()

    def forget(self, rule: str) -> None:
        """Drop a removed rule's figures from memory."""
        self._counts.pop(rule, None)
        self._dirty.discard(rule)

    async def run(self) -> None:
        """Write changed figures every second (a background task)."""
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            await self.flush()

    async def flush(self) -> None:
        """Write this instance's changed figures now (also at a graceful stop)."""
        if self._js is None or not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        try:
            kv = await self._js.key_value(subjects.KV_TRIGGER_STATS)
            for rule in dirty:
                counts = self._counts.get(rule)
                if counts is not None:
                    await kv.put(subjects.trigger_stats_key(rule, self._instance), _encoder.encode(counts.frozen()))
        except (TimeoutError, nats.errors.Error) as exc:
            self._dirty |= dirty  # written at the next flush
            log.warning("cannot write rule figures to %s: %s", subjects.KV_TRIGGER_STATS, exc)

    async def totals(self) -> dict[str, TriggerStats]:
        """Every rule's figures summed over every instance that ever counted them."""
        await self.flush()
        found: dict[str, list[TriggerStats]] = {}
        if self._js is not None:
            kv = await self._js.key_value(subjects.KV_TRIGGER_STATS)
            for key, value in await _entries(self._js, kv):
                rule = key.split(".", 1)[0]
                try:
                    found.setdefault(rule, []).append(_decoder.decode(value))
                except msgspec.DecodeError:
                    log.warning("ignoring malformed figures under %s", key)
        else:
            for rule, counts in self._counts.items():
                found[rule] = [counts.frozen()]
        return {rule: summed(items) for rule, items in found.items()}

    async def remove(self, rule: str) -> None:
        """Delete every instance's figures of a removed rule."""
        self.forget(rule)
        if self._js is None:
            return
        kv = await self._js.key_value(subjects.KV_TRIGGER_STATS)
        for key, _ in await _entries(self._js, kv):
            if key.split(".", 1)[0] == rule:
                await kv.purge(key)


def summed(items: Iterable[TriggerStats]) -> TriggerStats:
    """Several instances' figures as one."""
    fires = failures = skipped = 0
    last_fire = last_error_at = 0.0
    last_error = ""
    for s in items:
        fires += s.fires
        failures += s.failures
        skipped += s.skipped
        last_fire = max(last_fire, s.last_fire_at)
        if s.last_error_at >= last_error_at and s.last_error:
            last_error, last_error_at = s.last_error, s.last_error_at
    return TriggerStats(
        fires=fires,
        failures=failures,
        skipped=skipped,
        last_fire_at=last_fire,
        last_error=last_error,
        last_error_at=last_error_at,
    )


async def _entries(js: JetStreamContext, kv: Any) -> list[tuple[str, bytes]]:
    """Every live key and value of the figures bucket (an empty bucket has none)."""
    import nats.js.errors

    keys = await bucket_keys(js, subjects.KV_TRIGGER_STATS)
    out = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            continue
        if entry.value:
            out.append((key, entry.value))
    return out
