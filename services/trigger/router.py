"""Routing: what a batch of incoming events does under the rules that watch them.

Subject events, webhook bodies, finished jobs and schedule ticks all arrive here as
:class:`Incoming` with the rules that apply to them. For each pair the router either
counts a skip (a paused rule), lets the event pass (the filter said no), hands it to the
rule's burst (debounce, batch, correlate), or builds the job; then it submits every job of
the batch at once. What could not make a job comes back as a :class:`Failure` for the
caller to dead-letter (an event) or to answer with (a webhook); the other rules and
events are not held back by it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import msgspec

from jobmesh.contract.messages.v1 import JobOrigin
from jobmesh.errors import InvalidMessage, JobmeshError
from jobmesh.runtime.tracing import Context
from jobmesh.trigger.expressions import Bindings
from jobmesh.trigger.firing import Fire, Fired, Firer
from jobmesh.trigger.rules import CompiledRule, WorkflowStart
from jobmesh.trigger.stats import RuleStats

SourceKind = Literal["event", "webhook", "schedule", "completion"]


@dataclass(slots=True)
class Incoming:
    """One event and the rules it is for.

    Attributes:
        kind: the kind of source it came from.
        variables: its CEL variables (:func:`jobmesh.trigger.rules.event_variables`).
        event_id: its identity (``JM_EVENTS:<seq>``, the Nats-Msg-Id, a delivery id, a tick).
        subject: the subject it came on ("" for a webhook or a tick).
        rules: the rules to apply (already matched by subject, hook name or completion filter).
        context: its trace context.
        depth: for a finished job, how deep in a completion chain it was.
        metadata: labels to add to the jobs it makes (a completion chain's depth).
        extra: what the source keeps with it (the event's envelope, for its dead letter).
    """

    kind: SourceKind
    variables: dict[str, Any]
    event_id: str
    subject: str
    rules: Sequence[CompiledRule]
    context: Context | None = None
    depth: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    extra: Any = None
    _bindings: Bindings | None = None

    @property
    def bindings(self) -> Bindings:
        """The variables, converted to CEL once for every rule and expression."""
        if self._bindings is None:
            self._bindings = Bindings(self.variables)
        return self._bindings


@dataclass(slots=True)
class Failure:
    """An event a rule could not make a job of, and why."""

    incoming: Incoming
    rule: CompiledRule
    error: JobmeshError


@dataclass(slots=True)
class Routed:
    """What a batch did: the jobs submitted, the failures, and how many events the filters
    let pass or paused rules skipped."""

    fired: list[tuple[Incoming, CompiledRule, Fired]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    filtered: int = 0
    skipped: int = 0
    held: int = 0  # events a burst took (they fire later, or with a later event)


class BurstSink(Protocol):
    """Where events of debounce, batch and correlate rules go (``jobmesh.trigger.bursts``)."""

    async def add(self, items: Sequence[tuple[Incoming, CompiledRule]]) -> list[Failure]:
        """Record the events durably (and fire what they complete); return the failures.

        Raises:
            Unavailable: the state or the publish is unreachable (the caller retries the batch).
        """
        ...

    async def add_counted(self, items: Sequence[tuple[Incoming, CompiledRule]]) -> tuple[list[Failure], int, int]:
        """As :meth:`add`, plus how many items a burst held and how many its filter let pass."""
        ...


def origin_of(incoming: Incoming, rule: CompiledRule, at: float, kind: str | None = None, events: int = 1) -> JobOrigin:
    """The origin a job fired by ``rule`` for ``incoming`` records."""
    return JobOrigin(
        kind=kind or incoming.kind,
        rule=rule.name,
        version=rule.version,
        event=incoming.event_id,
        subject=incoming.subject,
        at=at,
        events=events,
        depth=incoming.depth,
    )


class Router:
    """Applies rules to incoming events.

    Args:
        firer: submits the jobs.
        stats: counts fires, failures and skips.
        bursts: takes the events of debounce, batch and correlate rules (None: such rules
            fail their events, which only tests of the plain path do).
        clock: unix time.
    """

    def __init__(
        self,
        firer: Firer,
        stats: RuleStats,
        bursts: BurstSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.firer = firer
        self._stats = stats
        self._bursts = bursts
        self._clock = clock

    async def route(self, items: Sequence[Incoming]) -> Routed:
        """Apply every item's rules; submit the jobs in one batch.

        Raises:
            Unavailable, Overloaded: a publish or the burst state failed; nothing of the
                batch may be acknowledged (a retry is idempotent).
        """
        now = self._clock()
        routed = Routed()
        fires: list[Fire] = []
        fired_for: list[tuple[Incoming, CompiledRule]] = []
        held: list[tuple[Incoming, CompiledRule]] = []
        for item in items:
            for rule in item.rules:
                if rule.paused:
                    routed.skipped += 1
                    self._stats.skipped(rule.name)
                    continue
                if rule.burst:
                    held.append((item, rule))
                    continue
                try:
                    spec = rule.decide(item.bindings, now)
                except InvalidMessage as exc:
                    routed.failures.append(Failure(item, rule, exc))
                    continue
                if spec is None:
                    routed.filtered += 1
                    continue
                key, origin = rule.idempotency_key(item.event_id), origin_of(item, rule, now)
                if isinstance(spec, WorkflowStart):
                    if item.metadata:
                        spec = WorkflowStart(workflow_with_metadata(spec.spec, item.metadata), spec.input)
                    fires.append(Fire(rule.name, None, key, origin, item.context, run=spec))
                else:
                    if item.metadata:
                        spec = with_metadata(spec, item.metadata)
                    fires.append(Fire(rule.name, spec, key, origin, item.context))
                fired_for.append((item, rule))
        if fires:
            for (item, rule), result in zip(fired_for, await self.firer.fire(fires), strict=True):
                if result.error is not None:
                    routed.failures.append(Failure(item, rule, result.error))
                else:
                    routed.fired.append((item, rule, result))
        if held:
            if self._bursts is None:
                for item, rule in held:
                    routed.failures.append(
                        Failure(item, rule, InvalidMessage(f"rule {rule.name}: bursts are off here"))
                    )
            else:
                failures, taken, filtered = await self._bursts.add_counted(held)
                routed.failures.extend(failures)
                routed.held += taken
                routed.filtered += filtered
        for failure in routed.failures:
            self._stats.failed(failure.rule.name, f"{failure.error.code}: {failure.error}", now)
        return routed


def with_metadata(spec: Any, metadata: dict[str, str]) -> Any:
    """``spec`` with ``metadata`` added to its labels (the trigger's own keys win)."""
    return msgspec.structs.replace(spec, metadata={**spec.metadata, **metadata})


def workflow_with_metadata(spec: Any, metadata: dict[str, str]) -> Any:
    """``spec`` with ``metadata`` added to every step's labels: a run a completion started
    carries the chain's depth on each of its jobs, so the chain stays bounded through it."""
    steps = {name: with_metadata(step, metadata) for name, step in spec.steps.items()}
    return msgspec.structs.replace(spec, steps=steps)
