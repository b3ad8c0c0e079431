"""Bursts: the pending state of debounce, batch and correlate rules, and its timer.

An event of such a rule does not fire a job by itself: it is recorded in ``jm_trigger_state``
under ``pending.<rule>.<digest of the key>``, one :class:`Pending` per rule and key, and
the job fires later (a debounce after a quiet period, a batch at its size or its age) or
with a later event (a batch that is full, a correlation that has all its parts). The
caller acknowledges the events only after :meth:`Bursts.add` returned, that is after the
state is durable, so a crash loses nothing that was acknowledged.

Every write is a compare-and-set on the key's revision: another replica may have touched
the same key meanwhile (the events of one key arrive on whichever replica pulls them), and
then the state is read again and the events applied again. One call writes each (rule,
key) once, however many of its events the batch held.

Every job a burst fires has an idempotency key derived from what it stands for: the last
event of a debounce, the ids of the events of a batch or a correlation. A crash between the
publish and the state write fires the same thing again with the same key, and two replicas
whose timers fire the same state give one job (``jobmesh.trigger.firing``).

The deciding parts (:func:`take`, :func:`expire`, :func:`burst_fire`) are pure functions of
the state, the rule, the events and the clock; :class:`Bursts` does the I/O around them.
docs/triggers-bursts.md describes the semantics for rule authors and operators.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import msgspec
import nats.errors
import nats.js.errors
from msgspec import Struct
from nats.js import JetStreamContext

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobOrigin, PendingView
from jobmesh.errors import InvalidMessage, JobmeshError, Unavailable
from jobmesh.runtime.kvwatch import watch_forever
from jobmesh.runtime.outcomes import Reject
from jobmesh.trigger.expressions import Bindings
from jobmesh.trigger.firing import Fire, Firer
from jobmesh.trigger.router import Failure, Incoming, with_metadata
from jobmesh.trigger.rules import CompiledRule, as_event_item, event_variables, subject_matches
from jobmesh.trigger.ruleset import RuleSet
from jobmesh.trigger.stats import RuleStats

log = logging.getLogger("jobmesh.trigger.bursts")

BurstKind = Literal["debounce", "batch", "correlate"]

# A KV value may be 1 MiB (the server's max_payload). A batch fires early once its stored
# events pass half of that, so the state write after one more event can never be refused;
# a correlation drops its oldest events instead (it has nothing it could fire).
SOFT_LIMIT = 512 * 1024
# The timer looks at the view at least this often (seconds): a due state fires at most this
# late. The view is in memory, so a pass over thousands of states costs microseconds.
TICK = 0.25
# How often one group's write may meet a conflict before the call gives up (Unavailable:
# the caller's retry starts afresh). Each conflict means another replica wrote the key, so
# this many in a row means something is wrong, not a race.
MAX_CONFLICTS = 32
# The shortest sleep of the timer: a state it could not fire (a publish that failed) is not
# retried in a busy loop.
MIN_TICK = 0.02
# A state whose rule this replica does not know is dropped only after this long without an
# event (seconds): a rule just added may not be in this replica's view yet. A removed rule's
# states are deleted at once by remove().
ORPHAN_GRACE = 60.0


# --- the stored state ------------------------------------------------------------------
class Held(Struct, kw_only=True, omit_defaults=True):
    """One event a burst holds.

    Attributes:
        item: the event as an item of ``events`` (:func:`jobmesh.trigger.rules.as_event_item`).
        at: when the trigger took it (its clock): what windows and due times count from.
        part: the correlation part it counts for ("" for debounce and batch).
        job: the finished job of a completion event (``{}`` otherwise), for the template.
        depth: a completion chain's depth (:attr:`Incoming.depth`).
        metadata: labels its jobs carry (:attr:`Incoming.metadata`).
    """

    item: dict[str, Any]
    at: float
    part: str = ""
    job: dict[str, Any] = {}
    depth: int = 0
    metadata: dict[str, str] = {}

    @property
    def id(self) -> str:
        return str(self.item.get("id", ""))


class Pending(Struct, kw_only=True, omit_defaults=True, tag="trigger.pending"):
    """What ``jm_trigger_state`` holds under ``pending.<rule>.<key digest>``.

    Attributes:
        rule: the rule's name.
        version: the rule's version when the state began; a state of another version is
            dropped (the rule changed under it).
        key: the burst key, as the rule's key expression gave it.
        kind: debounce, batch or correlate.
        first_at: when the oldest event held was taken.
        last_at: when the newest was.
        due_at: when the timer fires it (debounce, batch) or drops its oldest events
            (correlate).
        count: events taken since the state began (a debounce keeps only the last one).
        events: the events held, oldest first.
        dropped: events a correlation dropped to stay within :data:`SOFT_LIMIT`.
    """

    rule: str
    version: int
    key: str
    kind: BurstKind
    first_at: float
    last_at: float
    due_at: float
    count: int = 0
    events: list[Held] = []
    dropped: int = 0

    def parts(self) -> dict[str, int]:
        """Events held per correlation part."""
        out: dict[str, int] = {}
        for held in self.events:
            if held.part:
                out[held.part] = out.get(held.part, 0) + 1
        return out

    def view(self) -> PendingView:
        """As ``jobmesh trigger show`` prints it."""
        return PendingView(
            key=self.key,
            kind=self.kind,
            events=self.count,
            first_at=self.first_at,
            last_at=self.last_at,
            due_at=self.due_at,
            parts=self.parts(),
        )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Pending)


def digest(key: str) -> str:
    """The KV key token of a burst key (any text; a KV key takes few characters)."""
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


def _ids_hash(held: Iterable[Held]) -> str:
    return hashlib.blake2b("\n".join(f"{h.part}/{h.id}" for h in held).encode(), digest_size=8).hexdigest()


def _size(held: Held) -> int:
    return len(_encoder.encode(held))


# --- deciding (pure) -------------------------------------------------------------------
@dataclass(slots=True)
class Burst:
    """Events that fire one job together.

    Attributes:
        kind: debounce, batch or correlate.
        key: the burst key.
        events: the events, oldest first (a debounce: its last one).
        count: how many events the job stands for.
        event_id: the deterministic id of what fired (the job's idempotency key and origin
            derive from it).
    """

    kind: BurstKind
    key: str
    events: list[Held]
    count: int
    event_id: str


def _new(rule: CompiledRule, key: str, now: float) -> Pending:
    kind = cast(BurstKind, rule.burst)
    return Pending(rule=rule.name, version=rule.version, key=key, kind=kind, first_at=now, last_at=now, due_at=now)


def _batch_burst(key: str, events: list[Held]) -> Burst:
    # Named by its content, not only its first event: a batch that a race or a redelivery
    # composed differently is another job (an event twice) rather than a duplicate that
    # swallows the events only it held (an event lost).
    d = digest(key)
    event_id = f"batch:{d}:{events[0].id}:{len(events)}:{_ids_hash(events)}"
    return Burst("batch", key, events, len(events), event_id)


def _correlate_burst(key: str, events: list[Held]) -> Burst:
    return Burst("correlate", key, events, len(events), f"correlate:{digest(key)}:{_ids_hash(events)}")


def debounce_burst(state: Pending) -> Burst:
    """What a due debounce fires: its last event, standing for every event it took. Named
    by that last event, which belongs to one quiet period only."""
    last = state.events[-1]
    return Burst("debounce", state.key, [last], state.count, f"debounce:{digest(state.key)}:{last.id}")


def take(
    state: Pending | None, rule: CompiledRule, key: str, held: Sequence[Held], now: float
) -> tuple[Pending | None, list[Burst], bool]:
    """Apply events to a key's state.

    Args:
        state: the stored state (None: none, or one that was dropped).
        rule: the rule, of the state's version.
        key: the burst key.
        held: the new events, in arrival order.
        now: the clock.

    Returns:
        The state to store (None: delete it, or write nothing), the bursts to fire now
        (full batches, complete correlations), and whether anything changed (an event held
        already, i.e. redelivered, changes nothing).
    """
    known = {(h.part, h.id) for h in state.events} if state is not None else set()
    fresh = [h for h in held if (h.part, h.id) not in known]
    if not fresh:
        return state, [], False
    match rule.burst:
        case "debounce":
            return _take_debounce(state, rule, key, list(held), now), [], True
        case "batch":
            new, bursts = _take_batch(state, rule, key, fresh, now)
            return new, bursts, True
        case "correlate":
            new, bursts = _take_correlate(state, rule, key, fresh, now)
            return new, bursts, True
    raise AssertionError(f"rule {rule.name} is not a burst")


def _take_debounce(state: Pending | None, rule: CompiledRule, key: str, held: list[Held], now: float) -> Pending:
    policy = rule.rule.debounce
    assert policy is not None
    if state is not None and state.events:
        # A redelivered batch holds the stored last event and those before it again: only
        # what came after it is new (else the debounce would fire with an older event).
        last = state.events[-1].id
        for i, h in enumerate(held):
            if h.id == last:
                held = held[i + 1 :]
                break
        if not held:
            return state
    state = state if state is not None else _new(rule, key, now)
    state.events = [held[-1]]
    state.count += len(held)
    state.last_at = now
    state.due_at = now + policy.seconds
    return state


def _take_batch(
    state: Pending | None, rule: CompiledRule, key: str, held: list[Held], now: float
) -> tuple[Pending | None, list[Burst]]:
    policy = rule.rule.batch
    assert policy is not None
    events = list(state.events) if state is not None else []
    first_at = state.first_at if state is not None and events else now
    size = sum(_size(h) for h in events)
    bursts = []
    for h in held:
        if not events:
            first_at = now
        events.append(h)
        size += _size(h)
        if len(events) >= policy.max_events or size > SOFT_LIMIT:
            bursts.append(_batch_burst(key, events))
            events, size = [], 0
    if not events:
        return None, bursts
    state = state if state is not None else _new(rule, key, now)
    state.events = events
    state.count = len(events)
    state.first_at = first_at
    state.last_at = now
    state.due_at = first_at + policy.max_seconds
    return state, bursts


def _take_correlate(
    state: Pending | None, rule: CompiledRule, key: str, held: list[Held], now: float
) -> tuple[Pending | None, list[Burst]]:
    policy = rule.rule.correlate
    assert policy is not None
    events = [h for h in (state.events if state is not None else []) if h.at > now - policy.window]
    events.extend(held)
    bursts = []
    while True:
        used: list[Held] = []
        for part in rule.parts:
            mine = [h for h in events if h.part == part.name]
            if len(mine) < part.count:
                used = []
                break
            used.extend(mine[: part.count])
        if not used:
            break
        used.sort(key=lambda h: h.at)
        bursts.append(_correlate_burst(key, used))
        gone = {h.id for h in used}  # an event counts once, even if it matched two parts
        events = [h for h in events if h.id not in gone]
    dropped = state.dropped if state is not None else 0
    size = sum(_size(h) for h in events)
    while events and size > SOFT_LIMIT:
        size -= _size(events.pop(0))
        dropped += 1
    if not events:
        return None, bursts
    state = state if state is not None else _new(rule, key, now)
    state.events = events
    state.count = len(events)
    state.dropped = dropped
    state.first_at = min(h.at for h in events)
    state.last_at = max(h.at for h in events)
    state.due_at = state.first_at + policy.window
    return state, bursts


def expire(state: Pending, window: float, now: float) -> Pending | None:
    """A correlation without its events older than ``window`` (None: nothing is left)."""
    events = [h for h in state.events if h.at > now - window]
    if not events:
        return None
    out = msgspec.structs.replace(state, events=events, count=len(events))
    out.first_at = min(h.at for h in events)
    out.last_at = max(h.at for h in events)
    out.due_at = out.first_at + window
    return out


def without(state: Pending, fired: set[tuple[str, str]]) -> Pending | None:
    """``state`` less the events a fire already took (None: nothing is left)."""
    events = [h for h in state.events if (h.part, h.id) not in fired]
    if len(events) == len(state.events):
        return state
    if not events:
        return None
    return msgspec.structs.replace(state, events=events, count=len(events), first_at=min(h.at for h in events))


def burst_variables(rule: CompiledRule, burst: Burst) -> dict[str, Any]:
    """The template variables of a fired burst: the last event's own variables, plus
    ``events``, ``count``, ``key`` and (correlate) ``parts``."""
    last = burst.events[-1]
    item = last.item
    variables = event_variables(
        str(item.get("subject", "")),
        item.get("data"),
        dict(item.get("headers") or {}),
        last.id,
        float(item.get("time", 0.0)),
    )
    variables["job"] = last.job
    variables["events"] = [h.item for h in burst.events]
    variables["count"] = burst.count
    variables["key"] = burst.key
    if burst.kind == "correlate":
        variables["parts"] = {p.name: [h.item for h in burst.events if h.part == p.name] for p in rule.parts}
    return variables


def burst_fire(rule: CompiledRule, burst: Burst, now: float) -> Fire:
    """The job a burst fires.

    Raises:
        ExpressionError, InvalidMessage: the template cannot make a job of it.
    """
    last = burst.events[-1]
    spec = rule.job(Bindings(burst_variables(rule, burst)), now)
    if last.metadata:
        spec = with_metadata(spec, last.metadata)
    origin = JobOrigin(
        kind=burst.kind,
        rule=rule.name,
        version=rule.version,
        event=burst.event_id,
        subject=str(last.item.get("subject", "")),
        at=now,
        events=burst.count,
        depth=last.depth,
    )
    return Fire(rule.name, spec, rule.idempotency_key(burst.event_id), origin)


# --- storage ---------------------------------------------------------------------------
class _Conflict(Exception):
    """A compare-and-set lost: another replica wrote the key."""


class DeadLetter(Protocol):
    """``Runtime.dead_letter``."""

    def __call__(
        self, subject: str, payload: bytes, outcome: Reject, deliveries: int = 1, stream_seq: int = 0, rule: str = ""
    ) -> Awaitable[bool]: ...


class MemoryKV:
    """A stand-in for the bucket with the same compare-and-set rules (``Bursts(js=None)``,
    for tests of the deciders; a real deployment always has the bucket)."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[int, bytes]] = {}
        self._seq = 0

    async def get(self, key: str) -> Any:
        if key not in self._data:
            raise nats.js.errors.KeyNotFoundError
        rev, value = self._data[key]
        return _Entry(key, value, rev)

    async def create(self, key: str, value: bytes) -> int:
        if key in self._data:
            raise nats.js.errors.KeyWrongLastSequenceError
        return self._put(key, value)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        if self._data.get(key, (0, b""))[0] != (last or 0):
            raise nats.js.errors.KeyWrongLastSequenceError
        return self._put(key, value)

    async def delete(self, key: str, last: int | None = None) -> bool:
        if last and self._data.get(key, (0, b""))[0] != last:
            raise nats.js.errors.KeyWrongLastSequenceError
        self._data.pop(key, None)
        self._seq += 1
        return True

    async def purge(self, key: str) -> bool:
        return await self.delete(key)

    async def keys(self, **_: Any) -> list[str]:
        if not self._data:
            raise nats.js.errors.NoKeysError
        return list(self._data)

    def _put(self, key: str, value: bytes) -> int:
        self._seq += 1
        self._data[key] = (self._seq, value)
        return self._seq


@dataclass(slots=True)
class _Entry:
    key: str
    value: bytes
    revision: int


def _conflict(exc: BaseException) -> bool:
    # nats-py translates a failed expected-revision check on create and update, but not on
    # delete (a raw APIError with the server's code).
    return isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or (
        isinstance(exc, nats.js.errors.APIError) and exc.err_code in (10071, 10164)
    )


@dataclass(slots=True)
class _Group:
    rule: CompiledRule
    key: str
    held: list[Held] = field(default_factory=list)
    incoming: dict[str, Incoming] = field(default_factory=dict)


class Bursts:
    """The pending bursts of every rule: taking events, firing, expiring (``BurstSink``).

    Args:
        js: the JetStream context (None: an in-memory bucket, for tests of the deciders).
        firer: submits the jobs bursts fire.
        stats: per-rule figures (failures at timer time).
        rules: the live rule set, to find a state's rule when its timer fires.
        clock: unix time.
        sleep: the timer loop's sleep (tests hand in their own).
        dead_letter: records a burst that cannot make a job when its timer fires
            (``Runtime.dead_letter``); None: it is only logged.
    """

    def __init__(
        self,
        js: JetStreamContext | None,
        firer: Firer,
        stats: RuleStats,
        rules: RuleSet,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        dead_letter: DeadLetter | None = None,
    ) -> None:
        self._js = js
        self._firer = firer
        self._stats = stats
        self._rules = rules
        self._clock = clock
        self._sleep = sleep
        self._dead_letter = dead_letter
        self._kv: Any = None if js is not None else MemoryKV()
        # pending key -> (revision, state): every state in the bucket, from the watch and
        # from this replica's own writes (whichever revision is newer wins).
        self._view: dict[str, tuple[int, Pending]] = {}
        self._restart = asyncio.Event()
        self.ready = asyncio.Event()  # the watch delivered every state the bucket held
        if js is None:
            self.ready.set()
        self.dropped: dict[str, int] = {}  # per rule: correlation keys dropped by the cap

    # --- reading ---------------------------------------------------------------------
    def pending(self, rule_name: str) -> list[PendingView]:
        """The bursts of ``rule_name`` waiting, oldest first (``jobmesh trigger show``)."""
        states = [s for _, s in self._view.values() if s.rule == rule_name]
        return [s.view() for s in sorted(states, key=lambda s: (s.first_at, s.key))]

    def count(self, rule_name: str) -> int:
        """How many keys of ``rule_name`` are waiting."""
        return sum(1 for _, s in self._view.values() if s.rule == rule_name)

    # --- taking events ---------------------------------------------------------------
    async def add(self, items: Sequence[tuple[Incoming, CompiledRule]]) -> list[Failure]:
        """Take the events of burst rules, fire what they complete, and store the rest.

        Args:
            items: events with the (unpaused) burst rule each is for.

        Returns:
            The events a rule could not use (a filter, key or template that failed on them);
            the rest are durable (or fired) when this returns.

        Raises:
            Unavailable, Overloaded: the bucket or the publish failed; the caller retries
                the batch (taking the same events again changes nothing).
        """
        now = self._clock()
        failures: list[Failure] = []
        groups: dict[tuple[str, str], _Group] = {}
        for incoming, rule in items:
            try:
                if not rule.passes(incoming.bindings):
                    continue
                parts = [""]
                if rule.burst == "correlate":
                    tokens = incoming.variables["subject"]["tokens"]
                    parts = [
                        p.name
                        for p in rule.parts
                        if subject_matches(p.pattern, tokens) and (p.filter is None or p.filter.test(incoming.bindings))
                    ]
                    if not parts:
                        continue
                key = rule.burst_key.key(incoming.bindings) if rule.burst_key is not None else ""
            except InvalidMessage as exc:
                failures.append(Failure(incoming, rule, exc))
                continue
            group = groups.get((rule.name, key))
            if group is None:
                group = groups[(rule.name, key)] = _Group(rule, key)
            item = as_event_item(incoming.variables)
            job = incoming.variables.get("job") or {}
            for part in parts:
                group.held.append(
                    Held(item=item, at=now, part=part, job=job, depth=incoming.depth, metadata=dict(incoming.metadata))
                )
            group.incoming[str(item["id"])] = incoming
        if groups:
            done = await asyncio.gather(*(self._add_group(g, now) for g in groups.values()))
            for found in done:
                failures.extend(found)
        return failures

    async def _add_group(self, group: _Group, now: float) -> list[Failure]:
        rule = group.rule
        kv_key = subjects.trigger_pending_key(rule.name, digest(group.key))
        entry: tuple[int, Pending | None] | None = self._view.get(kv_key)
        held = group.held
        failures: list[Failure] = []
        reduced = False  # the stored state lost events that fired with ours: it must be written
        for _ in range(MAX_CONFLICTS):
            rev, state = entry if entry is not None else (0, None)
            if state is not None and state.version > rule.version:
                # This replica's rule view is behind the one that wrote the state: the
                # batch is retried once the view has the new version.
                raise Unavailable(
                    f"rule {rule.name}: version {state.version} is not here yet (this replica has {rule.version})"
                )
            if state is not None and (state.version != rule.version or state.kind != rule.burst):
                log.warning(
                    "rule %s: dropping the pending %s of key %r, begun under version %d (now %d)",
                    rule.name, state.kind, state.key, state.version, rule.version,
                )  # fmt: skip
                state, reduced = None, True
            if state is not None:
                state = msgspec.structs.replace(state)  # take() changes it; the view's stays
            new, bursts, changed = take(state, rule, group.key, held, now)
            if not changed and not reduced:
                return failures
            if rev == 0 and new is not None and rule.burst == "correlate":
                await self._cap(rule, kv_key)
            fired = await self._fire_taken(rule, bursts, now, group, failures)
            try:
                await self._write(kv_key, rev, new)
                return failures
            except _Conflict:
                # Another replica wrote the key: start again from what it wrote, less the
                # events that fired with ours (they are in a job now).
                held = [h for h in held if (h.part, h.id) not in fired]
                read = await self._read(kv_key)
                entry, reduced = read, False
                if read is not None:
                    left = without(read[1], fired)
                    entry, reduced = (read[0], left), left is not read[1]
        raise Unavailable(
            f"rule {rule.name}: key {group.key!r}: {MAX_CONFLICTS} conflicts in a row on {subjects.KV_TRIGGER_STATE}"
        )

    async def _fire_taken(
        self, rule: CompiledRule, bursts: list[Burst], now: float, group: _Group, failures: list[Failure]
    ) -> set[tuple[str, str]]:
        """Fire the bursts events completed within :meth:`add`; a burst that cannot make a
        job fails its events (those of this call come back as failures; those stored by an
        earlier call are dead-lettered). Returns the events that are done with."""
        fires: list[Fire] = []
        fired_bursts: list[Burst] = []
        done: set[tuple[str, str]] = set()
        for burst in bursts:
            done |= {(h.part, h.id) for h in burst.events}
            try:
                fires.append(burst_fire(rule, burst, now))
                fired_bursts.append(burst)
            except InvalidMessage as exc:
                await self._fail_taken(rule, burst, exc, group, failures, now)
        if fires:
            for burst, result in zip(fired_bursts, await self._firer.fire(fires), strict=True):
                if result.error is not None:
                    await self._fail_taken(rule, burst, result.error, group, failures, now)
        return done

    async def _fail_taken(
        self, rule: CompiledRule, burst: Burst, error: JobmeshError, group: _Group, failures: list[Failure], now: float
    ) -> None:
        earlier = []
        for h in burst.events:
            incoming = group.incoming.get(h.id)
            if incoming is not None:
                if not any(f.incoming is incoming for f in failures):
                    failures.append(Failure(incoming, rule, error))
            else:
                earlier.append(h)
        if earlier:
            # The router counts the failures it returns; these it never sees.
            self._stats.failed(rule.name, f"{error.code}: {error}", now)
            state = _new(rule, burst.key, now)
            state.events, state.count = earlier, len(earlier)
            await self._record_dead(rule.name, state, error)

    async def _cap(self, rule: CompiledRule, kv_key: str) -> None:
        """Make room for one more correlation key of ``rule``: drop the oldest beyond
        ``max_pending``."""
        policy = rule.rule.correlate
        assert policy is not None
        mine = sorted(
            ((s.first_at, k, rev) for k, (rev, s) in self._view.items() if s.rule == rule.name and k != kv_key),
        )
        for first_at, key, rev in mine[: max(0, len(mine) - policy.max_pending + 1)]:
            state = self._view[key][1]
            try:
                await self._write(key, rev, None)
            except _Conflict:
                pass  # it changed (or went) meanwhile; it is not the oldest any more
            self.dropped[rule.name] = self.dropped.get(rule.name, 0) + 1
            log.warning(
                "rule %s: %d correlation keys pending, its max_pending; dropped the oldest, key %r (since %.0f, %d events)",
                rule.name, policy.max_pending, state.key, first_at, len(state.events),
            )  # fmt: skip

    # --- the timer -------------------------------------------------------------------
    async def run(self) -> None:
        """Watch ``jm_trigger_state`` and fire what is due, forever (a background task)."""
        watch = asyncio.ensure_future(self._watch())
        try:
            while True:
                if watch.done():
                    watch.result()  # the view failed: let the service see it
                delay = TICK
                if self.ready.is_set() and self._rules.ready.is_set():
                    try:
                        await self.tick()
                    except JobmeshError as exc:
                        log.warning("pending bursts: the timer could not fire (%s: %s); again soon", exc.code, exc)
                    else:
                        delay = min(TICK, max(MIN_TICK, self._next_due() - self._clock()))
                await self._sleep(delay)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    def _next_due(self) -> float:
        """When the timer has something to do next (a paused rule's bursts wait)."""
        due = float("inf")
        for _, state in self._view.values():
            rule = self._rules.get(state.rule)
            if state.kind == "correlate" or rule is None or not rule.paused:
                due = min(due, state.due_at)
        return due

    def restart(self) -> None:
        """Watch afresh (after a reconnect)."""
        self._restart.set()

    async def tick(self) -> int:
        """One pass of the timer: fire due debounces and batches, expire correlations, drop
        the states of rules removed or changed.

        Returns:
            How many bursts fired.

        Raises:
            Unavailable, Overloaded: the publish failed (what is due fires at a later tick).
        """
        now = self._clock()
        fired = 0
        for kv_key, (rev, state) in list(self._view.items()):
            rule = self._rules.get(state.rule)
            if rule is not None and rule.version < state.version:
                continue  # this replica's rule view is behind; the state is not stale
            if rule is None and now - state.last_at < ORPHAN_GRACE:
                continue  # a rule this replica has not seen yet, or one being removed
            if rule is None or rule.version != state.version or rule.burst != state.kind:
                why = "was removed" if rule is None else f"is now version {rule.version}, not {state.version}"
                log.warning("rule %s %s: dropping its pending %s of key %r", state.rule, why, state.kind, state.key)
                await self._drop(kv_key, rev)
                continue
            if state.due_at > now:
                continue
            if state.kind == "correlate":
                await self._expire(kv_key, rev, state, rule, now)
            elif not rule.paused:  # a paused rule's bursts wait; they fire after its resume
                fired += await self._fire_due(kv_key, rev, state, rule, now)
        return fired

    async def _fire_due(self, kv_key: str, rev: int, state: Pending, rule: CompiledRule, now: float) -> int:
        burst = debounce_burst(state) if state.kind == "debounce" else _batch_burst(state.key, state.events)
        error: JobmeshError | None = None
        try:
            fire = burst_fire(rule, burst, now)
        except InvalidMessage as exc:
            error = exc
        else:
            error = (await self._firer.fire([fire]))[0].error
        if error is not None:
            self._stats.failed(rule.name, f"{error.code}: {error}", now)
            await self._record_dead(rule.name, state, error)
        done = {(h.part, h.id) for h in state.events}
        for _ in range(MAX_CONFLICTS):
            try:
                await self._write(kv_key, rev, None)
                break
            except _Conflict:
                entry = await self._read(kv_key)
                if entry is None or state.kind == "debounce":
                    # A debounce that took an event meanwhile is due later, with that event.
                    break
                rev, fresh = entry
                left = without(fresh, done)
                if left is not None:
                    try:
                        await self._write(kv_key, rev, left)
                        break
                    except _Conflict:
                        continue
        return 0 if error is not None else 1

    async def _expire(self, kv_key: str, rev: int, state: Pending, rule: CompiledRule, now: float) -> None:
        policy = rule.rule.correlate
        assert policy is not None
        try:
            await self._write(kv_key, rev, expire(state, policy.window, now))
        except _Conflict:
            pass  # it took an event meanwhile; the next tick looks again

    async def _drop(self, kv_key: str, rev: int) -> None:
        try:
            await self._write(kv_key, rev, None)
        except _Conflict:
            pass  # rewritten meanwhile (by a replica with a newer rule): the next tick decides

    async def _record_dead(self, rule: str, state: Pending, error: JobmeshError) -> None:
        payload = _encoder.encode(state)
        log.warning(
            "rule %s: a burst of key %r (%d events) cannot make a job: %s", rule, state.key, len(state.events), error
        )
        if self._dead_letter is not None:
            await self._dead_letter(f"pending.{rule}", payload, Reject(error.code, str(error)), rule=rule)

    # --- removing --------------------------------------------------------------------
    async def remove(self, rule_name: str) -> None:
        """Delete every pending state of a removed rule.

        Raises:
            Unavailable: the bucket is unreachable.
        """
        prefix = subjects.trigger_pending_prefix(rule_name)[:-1]  # "pending.<rule>."
        keys = {k for k, (_, s) in self._view.items() if s.rule == rule_name}
        kv = await self._bucket()
        try:
            try:
                stored = await kv.keys(filters=[subjects.trigger_pending_prefix(rule_name)])
            except nats.js.errors.NoKeysError:
                stored = []
            keys |= {k for k in stored if k.startswith(prefix)}
            for key in keys:
                await kv.purge(key)
        except (TimeoutError, nats.errors.Error) as exc:
            raise Unavailable(f"cannot remove the pending state of {rule_name}: {type(exc).__name__}: {exc}") from exc
        for key in keys:
            self._view.pop(key, None)

    # --- the bucket ------------------------------------------------------------------
    async def _bucket(self) -> Any:
        if self._kv is None:
            assert self._js is not None
            try:
                self._kv = await self._js.key_value(subjects.KV_TRIGGER_STATE)
            except (TimeoutError, nats.errors.Error) as exc:
                raise Unavailable(f"cannot open {subjects.KV_TRIGGER_STATE}: {type(exc).__name__}: {exc}") from exc
        return self._kv

    async def _read(self, kv_key: str) -> tuple[int, Pending] | None:
        kv = await self._bucket()
        try:
            entry = await kv.get(kv_key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            self._view.pop(kv_key, None)
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            raise Unavailable(f"cannot read {kv_key}: {type(exc).__name__}: {exc}") from exc
        state = self._decode(kv_key, entry.value)
        if state is None:
            return None
        self._see(kv_key, entry.revision, state)
        return entry.revision, state

    async def _write(self, kv_key: str, rev: int, state: Pending | None) -> None:
        """Store ``state`` (None: delete) if the key is still at ``rev`` (0: absent).

        Raises:
            _Conflict: it is not.
            Unavailable: the bucket is unreachable.
        """
        kv = await self._bucket()
        try:
            if state is None:
                if rev:
                    await kv.delete(kv_key, last=rev)
                self._view.pop(kv_key, None)
                return
            value = _encoder.encode(state)
            new = await (kv.create(kv_key, value) if rev == 0 else kv.update(kv_key, value, last=rev))
        except (TimeoutError, nats.errors.Error) as exc:
            if _conflict(exc):
                raise _Conflict(kv_key) from exc
            raise Unavailable(f"cannot write {kv_key}: {type(exc).__name__}: {exc}") from exc
        self._see(kv_key, new, state)

    def _see(self, kv_key: str, rev: int, state: Pending) -> None:
        current = self._view.get(kv_key)
        if current is None or current[0] <= rev:
            self._view[kv_key] = (rev, state)

    @staticmethod
    def _decode(kv_key: str, value: bytes) -> Pending | None:
        try:
            return _decoder.decode(value)
        except msgspec.DecodeError as exc:
            log.error("ignoring a malformed pending state under %s: %s", kv_key, exc)
            return None

    async def _watch(self) -> None:
        js = self._js
        if js is None:
            return

        async def open_watch() -> Any:
            return await (await js.key_value(subjects.KV_TRIGGER_STATE)).watch("pending.>")

        await watch_forever(
            open_watch, self._follow, self._restart, name="pending bursts", bucket=subjects.KV_TRIGGER_STATE, log=log
        )

    async def _follow(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is None:
                self.ready.set()
                continue
            current = self._view.get(entry.key)
            if current is not None and current[0] > entry.revision:
                continue  # our own newer write came first
            if entry.operation in ("DEL", "PURGE"):
                self._view.pop(entry.key, None)
                continue
            state = self._decode(entry.key, entry.value)
            if state is not None:
                self._view[entry.key] = (entry.revision, state)
