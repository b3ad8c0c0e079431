"""The live set of rules: every trigger replica's view of ``jm_triggers``.

A KV watch (started afresh after a reconnect) keeps it current, so a rule that is added,
changed, paused or removed applies on every replica without a restart. A record that
does not compile (written by hand, or by a newer version) is logged and skipped; the rest
keep working. Parts of the service that react to changes (the schedule ticker, the
completion consumer) register a listener.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from nats.js import JetStreamContext

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import TriggerRecord
from jobmesh.errors import InvalidMessage
from jobmesh.runtime.kvwatch import watch_forever
from jobmesh.trigger.rules import CompiledRule, compile_record

log = logging.getLogger("jobmesh.trigger.rules")

_decoder = msgspec.json.Decoder(TriggerRecord)


class RuleSet:
    """Compiled rules by name, and by source kind.

    Args:
        js: the JetStream context (None: fed by :meth:`apply` only, in tests).
        allowed: subject patterns beyond ``jobmesh.v1.events.>`` rules may watch.
    """

    def __init__(self, js: JetStreamContext | None, allowed: Sequence[tuple[str, ...]] = ()) -> None:
        self._js = js
        self.allowed = tuple(allowed)
        self._rules: dict[str, CompiledRule] = {}
        self._by_kind: dict[str, list[CompiledRule]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._restart = asyncio.Event()
        self.ready = asyncio.Event()  # the watch delivered every record the bucket held

    # --- reading -------------------------------------------------------------------
    def get(self, name: str) -> CompiledRule | None:
        """The rule of that name, or None."""
        return self._rules.get(name)

    def all(self) -> list[CompiledRule]:
        """Every rule, by name."""
        return [self._rules[n] for n in sorted(self._rules)]

    def of_kind(self, kind: str) -> list[CompiledRule]:
        """The rules whose source is ``kind`` (event, webhook, schedule, completion)."""
        return self._by_kind.get(kind, [])

    def watching(self, subject: str) -> list[CompiledRule]:
        """The event rules that watch ``subject``. A linear scan over the event rules: a
        handful to a few hundred per cluster, each a few token comparisons."""
        tokens = subject.split(".")
        return [r for r in self._by_kind.get("event", ()) if r.watches(tokens)]

    async def wait_for(self, name: str, version: int, paused: bool | None = None, timeout: float = 2.0) -> bool:
        """Wait until this view holds ``name`` at ``version`` or later (and in the given
        paused state), or, with ``version`` 0, no longer holds it. Returns False on timeout.
        A put waits for this, so events this replica handles after the reply see the rule."""

        def holds() -> bool:
            rule = self._rules.get(name)
            if version == 0:
                return rule is None
            return rule is not None and rule.version >= version and (paused is None or rule.paused == paused)

        changed = asyncio.Event()
        self._listeners.append(changed.set)
        try:
            async with asyncio.timeout(timeout):
                while not holds():
                    await changed.wait()
                    changed.clear()
            return True
        except TimeoutError:
            return False
        finally:
            self._listeners.remove(changed.set)

    # --- changing ------------------------------------------------------------------
    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every change of the set."""
        self._listeners.append(listener)

    def apply(self, key: str, value: bytes | None) -> None:
        """Apply one record of ``jm_triggers`` (None: deleted)."""
        if value is None:
            self._rules.pop(key, None)
        else:
            try:
                record = _decoder.decode(value)
                self._rules[key] = compile_record(record, self.allowed)
            except (msgspec.DecodeError, InvalidMessage) as exc:
                log.error("rule %s: the stored record does not compile, so it fires nothing: %s", key, exc)
                self._rules.pop(key, None)
        by_kind: dict[str, list[CompiledRule]] = {}
        for name in sorted(self._rules):
            rule = self._rules[name]
            by_kind.setdefault(rule.kind, []).append(rule)
        self._by_kind = by_kind
        for listener in self._listeners:
            listener()

    def restart(self) -> None:
        """Watch afresh (after a reconnect)."""
        self._restart.set()

    async def run(self) -> None:
        """Watch ``jm_triggers`` forever (a background task)."""
        js = self._js
        if js is None:
            self.ready.set()
            return

        async def open_watch() -> Any:
            return await (await js.key_value(subjects.KV_TRIGGERS)).watchall()

        await watch_forever(
            open_watch, self._follow, self._restart, name="rule view", bucket=subjects.KV_TRIGGERS, log=log
        )

    async def _follow(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is None:
                self.ready.set()
                continue
            self.apply(entry.key, None if entry.operation in ("DEL", "PURGE") else entry.value)
