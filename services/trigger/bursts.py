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
from typing import Any, Literal, NamedTuple, Protocol, cast

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
# Events a key already used (fired with a batch or a correlation, counted by a debounce)
# are remembered this long (seconds), and at most DONE_KEEP of them per key, so that a
# consumer batch redelivered after its state write (its ack lost, or a crash before the
# ack) does not use them again. The events consumer redelivers an unacknowledged batch
# after its ack_wait (10 s); ten minutes covers that and the backoff of a retried batch
# many times over. A key whose events all fired keeps a record of their ids only, until
# the last of them is this old. Each id costs about 30 bytes of the key's KV value. The
# count should stay above the consumer's batch size (JOBMESH_BATCH_SIZE, 256 by default):
# a redelivery brings at most that many events of one key back.
DONE_HORIZON = 600.0
DONE_KEEP = 4096
# A debounce remembers fewer: it rewrites its record with every consumer batch, however
# long its burst (a record of 4,096 ids would cost 130 KB a write), and what a redelivery
# beyond these can do to it is to count an event twice; the event it fired with is always
# among the last it remembers.
DEBOUNCE_KEEP = 512


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
        created: the rule's ``created_at`` when the state began: a rule deleted and added
            again starts its versions at 1 anew, and this tells the incarnations apart
            (0: a state written before this field, or a rule without it).
        done: events already used, by the digest of their id (:func:`done_token`), with
            when (unix seconds): within :data:`DONE_HORIZON` a redelivered event is not
            used again. A state whose ``events`` is empty holds only this record.
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
    created: float = 0.0
    done: dict[str, int] = {}

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


def done_token(event_id: str) -> str:
    """How :attr:`Pending.done` names an event: a digest of fixed size (an id may be long)."""
    return hashlib.blake2b(event_id.encode(), digest_size=8).hexdigest()


def _order(held: Held) -> tuple[float, int, str]:
    """Which of two events is newer: its stream time, then its stream sequence (the digits
    after the id's last ``:``), then its id."""
    try:
        at = float(held.item.get("time", 0.0))
    except (TypeError, ValueError):
        at = 0.0
    tail = held.id.rsplit(":", 1)[-1]
    return at, int(tail) if tail.isdigit() else -1, held.id


def _remember(state: Pending, held: Iterable[Held], now: float) -> None:
    """Record ``held`` as used in ``state.done``, and forget what is past the horizon."""
    done = dict(state.done)
    for h in held:
        token = done_token(h.id)
        done.pop(token, None)  # re-inserted: the dict stays in the order of use
        done[token] = int(now)
    horizon = now - DONE_HORIZON
    kept = [(t, at) for t, at in done.items() if at > horizon]
    state.done = dict(kept[-(DEBOUNCE_KEEP if state.kind == "debounce" else DONE_KEEP) :])


def _after(
    state: Pending | None, rule: CompiledRule, key: str, bursts: list[Burst], events: list[Held], now: float
) -> Pending:
    """The state once ``bursts`` fired (the events they used remembered) and ``events`` are
    what it still holds; the caller sets its times, or settles it when it holds none."""
    state = state if state is not None else _new(rule, key, now)
    for burst in bursts:
        _remember(state, burst.events, now)
    state.events = events
    if events:
        state.count = len(events)
    return state


def _settle(state: Pending, now: float) -> Pending | None:
    """``state`` as it is stored: one without events keeps only its record of used events,
    due when the last of them passes the horizon (None: nothing is left to keep)."""
    if state.events:
        return state
    _remember(state, (), now)
    if not state.done:
        return None
    state.count = 0
    state.due_at = max(state.done.values()) + DONE_HORIZON
    return state


Standing = Literal["same", "stale", "ahead"]


def standing(state: Pending, rule: CompiledRule, now: float) -> Standing:
    """How a stored state stands to the rule this replica knows.

    Returns:
        "same": the state is this rule's; "stale": it is of an older version or another
        incarnation (a rule deleted and added again), or it has been "ahead" for longer than
        :data:`ORPHAN_GRACE` (nothing may block a key forever): drop it; "ahead": it is of
        a newer version or incarnation this replica has not seen yet: wait.
    """
    created = rule.record.created_at
    if state.created and created and state.created != created:
        if state.created < created:
            return "stale"
        return "ahead" if now - state.last_at < ORPHAN_GRACE else "stale"
    if state.version > rule.version:
        return "ahead" if now - state.last_at < ORPHAN_GRACE else "stale"
    if state.version != rule.version or state.kind != rule.burst:
        return "stale"
    return "same"


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
    return Pending(
        rule=rule.name,
        version=rule.version,
        key=key,
        kind=kind,
        first_at=now,
        last_at=now,
        due_at=now,
        created=rule.record.created_at,
    )


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
        already or used within :data:`DONE_HORIZON`, i.e. redelivered, changes nothing).
    """
    known = {(h.part, h.id) for h in state.events} if state is not None else set()
    done = state.done if state is not None else {}
    fresh = [h for h in held if (h.part, h.id) not in known and done_token(h.id) not in done]
    if not fresh:
        return state, [], False
    match rule.burst:
        case "debounce":
            return _take_debounce(state, rule, key, fresh, now), [], True
        case "batch":
            new, bursts = _take_batch(state, rule, key, fresh, now)
        case "correlate":
            new, bursts = _take_correlate(state, rule, key, fresh, now)
        case _:
            raise AssertionError(f"rule {rule.name} is not a burst")
    if new is not None:
        _remember(new, (), now)  # every write forgets what passed the horizon
    return new, bursts, True


def _take_debounce(state: Pending | None, rule: CompiledRule, key: str, held: list[Held], now: float) -> Pending:
    policy = rule.rule.debounce
    assert policy is not None
    state = state if state is not None else _new(rule, key, now)
    if not state.events:  # a new quiet period (the state held only its record of used events)
        state.count, state.first_at = 0, now
    # The held event is replaced only by a newer one: two replicas' writes may land in any
    # order, and a batch that arrives late must not put an older event in place of a newer.
    newest = max(held, key=_order)
    if not state.events or _order(newest) > _order(state.events[-1]):
        state.events = [newest]
    # ``held`` is what take() found fresh: a redelivered event is counted once.
    state.count += len({h.id for h in held})
    _remember(state, held, now)
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
    state = _after(state, rule, key, bursts, events, now)
    if not events:
        return _settle(state, now), bursts
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
    state = _after(state, rule, key, bursts, events, now)
    if not events:
        return _settle(state, now), bursts
    state.dropped = dropped
    state.first_at = min(h.at for h in events)
    state.last_at = max(h.at for h in events)
    state.due_at = state.first_at + policy.window
    return state, bursts


def expire(state: Pending, window: float, now: float) -> Pending | None:
    """A correlation without its events older than ``window`` (None: nothing is left)."""
    events = [h for h in state.events if h.at > now - window]
    if not events:
        return _settle(msgspec.structs.replace(state, events=[]), now)
    out = msgspec.structs.replace(state, events=events, count=len(events))
    out.first_at = min(h.at for h in events)
    out.last_at = max(h.at for h in events)
    out.due_at = out.first_at + window
    return out


def without(state: Pending, fired: set[tuple[str, str]], now: float) -> Pending | None:
    """``state`` less the events a fire already took, which it remembers as used (None:
    nothing is left to keep)."""
    events = [h for h in state.events if (h.part, h.id) not in fired]
    if len(events) == len(state.events):
        return state
    out = msgspec.structs.replace(state, events=events, count=len(events))
    _remember(out, (h for h in state.events if (h.part, h.id) in fired), now)
    if not events:
        return _settle(out, now)
    out.first_at = min(h.at for h in events)
    return out


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


class Added(NamedTuple):
    """What :meth:`Bursts.add_counted` did with its items.

    Attributes:
        failures: the events a rule could not use (a filter, key or template that failed).
        held: the items a burst took (held, fired with a full batch or a complete
            correlation, or already held: a redelivery).
        filtered: the items the rule's filter let pass (or, for a correlation, that no part
            matched): not held.
    """

    failures: list[Failure]
    held: int
    filtered: int


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
        # pending key -> (revision, value) of a value that does not decode: the timer
        # deletes it, and the next events of its key overwrite it (either dead-letters it).
        self._corrupt: dict[str, tuple[int, bytes]] = {}
        self._restart = asyncio.Event()
        self.ready = asyncio.Event()  # the watch delivered every state the bucket held
        if js is None:
            self.ready.set()
        self.dropped: dict[str, int] = {}  # per rule: correlation keys dropped by the cap

    # --- reading ---------------------------------------------------------------------
    def pending(self, rule_name: str) -> list[PendingView]:
        """The bursts of ``rule_name`` waiting, oldest first (``jobmesh trigger show``)."""
        states = [s for _, s in self._view.values() if s.rule == rule_name and s.events]
        return [s.view() for s in sorted(states, key=lambda s: (s.first_at, s.key))]

    def count(self, rule_name: str) -> int:
        """How many keys of ``rule_name`` are waiting (a key that only remembers the ids
        of events that fired waits for nothing)."""
        return sum(1 for _, s in self._view.values() if s.rule == rule_name and s.events)

    # --- taking events ---------------------------------------------------------------
    async def add(self, items: Sequence[tuple[Incoming, CompiledRule]]) -> list[Failure]:
        """Take the events of burst rules, fire what they complete, and store the rest
        (:meth:`add_counted`, without its counts).

        Args:
            items: events with the (unpaused) burst rule each is for.

        Returns:
            The events a rule could not use (a filter, key or template that failed on them);
            the rest are durable (or fired) when this returns.

        Raises:
            Unavailable, Overloaded: the bucket or the publish failed; the caller retries
                the batch (taking the same events again changes nothing).
        """
        return (await self.add_counted(items)).failures

    async def add_counted(self, items: Sequence[tuple[Incoming, CompiledRule]]) -> Added:
        """Take the events of burst rules, fire what they complete, and store the rest.

        Args:
            items: events with the (unpaused) burst rule each is for.

        Returns:
            The failures (as :meth:`add`), how many items a burst held and how many the
            filters let pass.

        Raises:
            Unavailable, Overloaded: the bucket or the publish failed; the caller retries
                the batch (taking the same events again changes nothing).
        """
        now = self._clock()
        failures: list[Failure] = []
        taken = filtered = 0
        groups: dict[tuple[str, str], _Group] = {}
        for incoming, rule in items:
            try:
                if not rule.passes(incoming.bindings):
                    filtered += 1
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
                        filtered += 1
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
            taken += 1
        if groups:
            done = await asyncio.gather(*(self._add_group(g, now) for g in groups.values()))
            for found in done:
                failures.extend(found)
        return Added(failures, taken, filtered)

    async def _add_group(self, group: _Group, now: float) -> list[Failure]:
        rule = group.rule
        kv_key = subjects.trigger_pending_key(rule.name, digest(group.key))
        entry: tuple[int, Pending | None] | None = self._view.get(kv_key)
        held = group.held
        failures: list[Failure] = []
        reduced = False  # the stored state lost events that fired with ours: it must be written
        for _ in range(MAX_CONFLICTS):
            rev, state = entry if entry is not None else (0, None)
            if rev and state is None:
                reduced = True  # an undecodable value (_read logged it): a fresh state replaces it
            match standing(state, rule, now) if state is not None else "same":
                case "ahead":
                    # This replica's rule view is behind the one that wrote the state: the
                    # batch is retried once the view has the new version (or, past the
                    # grace, the state is dropped: standing() calls it stale then).
                    assert state is not None
                    raise Unavailable(
                        f"rule {rule.name}: version {state.version} is not here yet (this replica has {rule.version})"
                    )
                case "stale":
                    assert state is not None
                    log.warning(
                        "rule %s: dropping the pending %s of key %r, begun under version %d (now %d) of the rule"
                        " created at %.0f (now %.0f)",
                        rule.name, state.kind, state.key, state.version, rule.version,
                        state.created, rule.record.created_at,
                    )  # fmt: skip
                    state, reduced = None, True
            if state is not None:
                state = msgspec.structs.replace(state)  # take() changes it; the view's stays
            waiting = state is not None and bool(state.events)  # else a new key, for the cap
            new, bursts, changed = take(state, rule, group.key, held, now)
            if not changed and not reduced:
                return failures
            if not waiting and new is not None and new.events and rule.burst == "correlate":
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
                if read is not None and read[1] is not None:
                    left = without(read[1], fired, now)
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
            (s.first_at, k, rev)
            for k, (rev, s) in self._view.items()
            if s.rule == rule.name and k != kv_key and s.events  # a record of used ids only is small
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
            if state.kind == "correlate" or not state.events or rule is None or not rule.paused:
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
        for kv_key, (rev, _) in list(self._corrupt.items()):
            log.error("deleting the undecodable pending state under %s (revision %d)", kv_key, rev)
            await self._drop(kv_key, rev)
        for kv_key, (rev, state) in list(self._view.items()):
            if not state.events:
                # Only a record of used events: rewritten without what passed the horizon,
                # or deleted once nothing is left, whatever became of the rule.
                if state.due_at <= now:
                    await self._drop(kv_key, rev, _settle(msgspec.structs.replace(state), now))
                continue
            rule = self._rules.get(state.rule)
            if rule is None and now - state.last_at < ORPHAN_GRACE:
                continue  # a rule this replica has not seen yet, or one being removed
            match standing(state, rule, now) if rule is not None else "stale":
                case "ahead":
                    continue  # this replica's rule view is behind; the state is not stale
                case "stale":
                    why = (
                        "was removed"
                        if rule is None
                        else f"is now version {rule.version} created at {rule.record.created_at:.0f},"
                        f" not {state.version} created at {state.created:.0f}"
                    )
                    log.warning("rule %s %s: dropping its pending %s of key %r", state.rule, why, state.kind, state.key)
                    await self._drop(kv_key, rev)
                    continue
            assert rule is not None
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
                # What fired stays remembered as used (a redelivery must not use it again).
                await self._write(kv_key, rev, without(state, done, now))
                break
            except _Conflict:
                entry = await self._read(kv_key)
                if entry is None or entry[1] is None or state.kind == "debounce":
                    # A debounce that took an event meanwhile is due later, with that event
                    # (which is newer than the one that fired). An undecodable value is the
                    # next tick's to delete.
                    break
                rev, fresh = entry[0], entry[1]
                left = without(fresh, done, now)
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

    async def _drop(self, kv_key: str, rev: int, state: Pending | None = None) -> None:
        """Delete ``kv_key`` (or store ``state``) if it is still at ``rev``."""
        try:
            await self._write(kv_key, rev, state)
        except _Conflict:
            # Rewritten meanwhile (by a replica with a newer rule): the next tick decides.
            if self._corrupt.get(kv_key, (0, b""))[0] == rev:
                del self._corrupt[kv_key]  # not that value any more; the watch says what is

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
            self._corrupt.pop(key, None)

    # --- the bucket ------------------------------------------------------------------
    async def _bucket(self) -> Any:
        if self._kv is None:
            assert self._js is not None
            try:
                self._kv = await self._js.key_value(subjects.KV_TRIGGER_STATE)
            except (TimeoutError, nats.errors.Error) as exc:
                raise Unavailable(f"cannot open {subjects.KV_TRIGGER_STATE}: {type(exc).__name__}: {exc}") from exc
        return self._kv

    async def _read(self, kv_key: str) -> tuple[int, Pending | None] | None:
        """The key's revision and state (None: absent; a state of None: present but it
        does not decode, which the next write by that revision replaces)."""
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
            self._view.pop(kv_key, None)
            self._corrupt[kv_key] = (entry.revision, entry.value)
            return entry.revision, None
        self._see(kv_key, entry.revision, state)
        return entry.revision, state

    async def _write(self, kv_key: str, rev: int, state: Pending | None) -> None:
        """Store ``state`` (None: delete) if the key is still at ``rev`` (0: absent).

        Raises:
            _Conflict: it is not.
            Unavailable: the bucket is unreachable.
        """
        kv = await self._bucket()
        new = 0
        try:
            if state is None:
                if rev:
                    await kv.delete(kv_key, last=rev)
            else:
                value = _encoder.encode(state)
                new = await (kv.create(kv_key, value) if rev == 0 else kv.update(kv_key, value, last=rev))
        except (TimeoutError, nats.errors.Error) as exc:
            if _conflict(exc):
                raise _Conflict(kv_key) from exc
            raise Unavailable(f"cannot write {kv_key}: {type(exc).__name__}: {exc}") from exc
        await self._replaced(kv_key, rev)
        if state is None:
            self._view.pop(kv_key, None)
        else:
            self._see(kv_key, new, state)

    async def _replaced(self, kv_key: str, rev: int) -> None:
        """After a write by ``rev``: an undecodable value it replaced is dead-lettered (the
        replica that replaced it does, so it is recorded once)."""
        bad = self._corrupt.get(kv_key)
        if bad is None or bad[0] != rev:
            return
        del self._corrupt[kv_key]
        rule = kv_key.split(".", 1)[-1].rsplit(".", 1)[0]  # pending.<rule>.<digest>
        error = InvalidMessage(f"the pending state under {kv_key} does not decode; it was replaced")
        if self._dead_letter is not None:
            await self._dead_letter(f"pending.{rule}", bad[1], Reject(error.code, str(error)), rule=rule)

    def _see(self, kv_key: str, rev: int, state: Pending) -> None:
        current = self._view.get(kv_key)
        if current is None or current[0] <= rev:
            self._view[kv_key] = (rev, state)

    @staticmethod
    def _decode(kv_key: str, value: bytes) -> Pending | None:
        try:
            return _decoder.decode(value)
        except (msgspec.DecodeError, RecursionError) as exc:
            # RecursionError: an event nested near msgspec's limit, which moves with the depth
            # of the stack that decodes it; never a crash of the watch.
            log.error("a pending state under %s does not decode (%s): it will be replaced", kv_key, exc)
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
                self._corrupt.pop(entry.key, None)
                continue
            state = self._decode(entry.key, entry.value)
            if state is None:
                self._view.pop(entry.key, None)
                self._corrupt[entry.key] = (entry.revision, entry.value)
            else:
                self._view[entry.key] = (entry.revision, state)
                self._corrupt.pop(entry.key, None)
