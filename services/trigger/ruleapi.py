"""The rule API: ``jobmesh.v1.api.triggers.*`` (put, get, list, delete, pause, test).

Any trigger replica answers (queue group ``trigger``). Writes go to ``jm_triggers`` with
compare-and-set on the key's revision, so two writers of one rule never lose an update;
every replica's rule view picks the change up from its watch. A put checks the rule
completely first (:func:`jobmesh.trigger.rules.check_rule`, plus the input of a handler
job against its handler's type; for a rule that starts a workflow, a run of it checked with
the sample's data as its input), so nothing invalid is ever stored.

Reads go to the bucket, not to this replica's view, so ``trigger add`` followed by
``trigger list`` shows the rule whichever replicas answer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import nats.js.errors
from nats.js import JetStreamContext

from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec
from jobmesh.contract.messages.v1 import (
    EventSource,
    HandlerRuntime,
    PendingView,
    SampleEvent,
    TriggerDeleteRequest,
    TriggerGetRequest,
    TriggerListReply,
    TriggerListRequest,
    TriggerPauseRequest,
    TriggerPutRequest,
    TriggerRecord,
    TriggerReply,
    TriggerRule,
    TriggerStats,
    TriggerSummary,
    TriggerTestReply,
    TriggerTestRequest,
    TriggerView,
)
from jobmesh.contract.strict import reject_unknown_fields
from jobmesh.errors import Conflict, InvalidMessage, NotFound, Unavailable
from jobmesh.runtime.kvwatch import bucket_keys
from jobmesh.runtime.service import Envelope, ResponderSpec
from jobmesh.trigger.completions import completion_matches
from jobmesh.trigger.expressions import Bindings
from jobmesh.trigger.handlerschemas import HandlerSchemas
from jobmesh.trigger.rules import (
    CompiledRule,
    WorkflowStart,
    burst_variables,
    check_rule,
    check_workflow_run,
    compile_record,
    sample_variables,
    source_kind,
    workflow_input,
)
from jobmesh.trigger.ruleset import RuleSet
from jobmesh.trigger.stats import RuleStats
from jobmesh.trigger.workflowapi import HandlerTypes
from jobmesh.trigger.workflows import handler_names

log = logging.getLogger("jobmesh.trigger.ruleapi")

_record = msgspec.json.Decoder(TriggerRecord)
_encoder = msgspec.json.Encoder()
CAS_TRIES = 5


class PendingSource(Protocol):
    """What the bursts module tells about partial state."""

    def pending(self, rule: str) -> list[PendingView]: ...

    async def remove(self, rule: str) -> None: ...


class TickSource(Protocol):
    """What the schedule ticker tells about the next tick."""

    def next_tick_of(self, rule: CompiledRule) -> float: ...


class RuleApi:
    """Answers the rule requests.

    Args:
        js: the JetStream context.
        allowed: subject patterns beyond ``jobmesh.v1.events.>`` that rules may watch.
        stats: the per-rule figures.
        schemas: handler input types (None: a handler job's input is not checked at put).
        bursts: partial state (None: none shown).
        ticker: next ticks (None: none shown).
        clock: unix time.
        max_bytes: the largest request accepted.
    """

    def __init__(
        self,
        js: JetStreamContext,
        allowed: tuple[tuple[str, ...], ...],
        stats: RuleStats,
        schemas: HandlerSchemas | None = None,
        bursts: PendingSource | None = None,
        ticker: TickSource | None = None,
        clock: Callable[[], float] = time.time,
        max_bytes: int = 1024 * 1024,
        view: RuleSet | None = None,
    ) -> None:
        self._js = js
        self._allowed = allowed
        self._stats = stats
        self._schemas = schemas
        self._bursts = bursts
        self._ticker = ticker
        self._clock = clock
        self._put_codec: Codec[TriggerPutRequest] = Codec(TriggerPutRequest, max_bytes)
        self._test_codec: Codec[TriggerTestRequest] = Codec(TriggerTestRequest, max_bytes)
        self._max_bytes = max_bytes
        self._view = view

    async def _applied(self, record: TriggerRecord | None, name: str) -> None:
        """Wait (briefly) until this replica's rule view shows the change just written."""
        if self._view is None:
            return
        version = record.version if record is not None else 0
        paused = record.paused if record is not None else None
        if not await self._view.wait_for(name, version, paused):
            log.warning("rule %s: this replica's view did not show the change within 2s", name)

    def responders(self) -> list[ResponderSpec]:
        """The six responders, for ``Runtime.serve``."""
        return [
            ResponderSpec(subjects.API_TRIGGERS_PUT, None, self.put, queue="trigger"),
            ResponderSpec(
                subjects.API_TRIGGERS_GET, Codec(TriggerGetRequest, self._max_bytes), self.get, queue="trigger"
            ),
            ResponderSpec(
                subjects.API_TRIGGERS_LIST, Codec(TriggerListRequest, self._max_bytes), self.list, queue="trigger"
            ),
            ResponderSpec(
                subjects.API_TRIGGERS_DELETE, Codec(TriggerDeleteRequest, self._max_bytes), self.delete, queue="trigger"
            ),
            ResponderSpec(
                subjects.API_TRIGGERS_PAUSE, Codec(TriggerPauseRequest, self._max_bytes), self.pause, queue="trigger"
            ),
            ResponderSpec(subjects.API_TRIGGERS_TEST, None, self.test, queue="trigger"),
        ]

    # --- bucket access -------------------------------------------------------------
    async def _kv(self) -> Any:
        try:
            return await self._js.key_value(subjects.KV_TRIGGERS)
        except Exception as exc:
            raise Unavailable(f"cannot open {subjects.KV_TRIGGERS}: {exc}") from exc

    async def _read(self, name: str) -> tuple[TriggerRecord | None, int]:
        kv = await self._kv()
        try:
            entry = await kv.get(name)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None, 0
        if not entry.value:
            return None, 0
        try:
            return _record.decode(entry.value), entry.revision or 0
        except msgspec.DecodeError as exc:
            # Written by hand or by a newer version: the rule view skips it too. It can be
            # removed (delete purges without decoding) or replaced by a put.
            log.error("rule %s: the stored record does not decode (%s); treating it as absent", name, exc)
            return None, entry.revision or 0

    async def _write(self, name: str, record: TriggerRecord, revision: int) -> None:
        kv = await self._kv()
        try:
            if revision:
                await kv.update(name, _encoder.encode(record), last=revision)
            else:
                await kv.create(name, _encoder.encode(record))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise Conflict(f"rule {name} changed meanwhile") from exc

    async def _records(self) -> list[TriggerRecord]:
        await self._kv()  # the bucket exists (or Unavailable)
        try:
            keys = await bucket_keys(self._js, subjects.KV_TRIGGERS)
        except nats.errors.Error as exc:
            raise Unavailable(f"cannot list {subjects.KV_TRIGGERS}: {exc}") from exc
        out = []
        for key in keys:
            record, _ = await self._read(key)
            if record is not None:
                out.append(record)
        return out

    async def _existing(self, name: str) -> tuple[TriggerRecord, int]:
        record, revision = await self._read(name)
        if record is None:
            raise _missing(name)
        return record, revision

    # --- requests ------------------------------------------------------------------
    async def put(self, env: Envelope) -> TriggerReply:
        """Check a rule completely, then store it (a new version when it changed)."""
        request = _decode_rule_request(self._put_codec, env.message, TriggerPutRequest)
        rule = request.rule
        _, spec = check_rule(rule, self._allowed, self._clock())
        if isinstance(spec, WorkflowStart):
            await self._check_handlers(spec)
        elif type(spec.runtime) is HandlerRuntime and self._schemas is not None:
            await self._schemas.check(spec.runtime, "job.runtime")
        for _ in range(CAS_TRIES):
            now = self._clock()
            old, revision = await self._read(rule.name)
            if old is not None and _same(old.rule, rule) and old.paused == request.paused:
                return TriggerReply(record=old, changed=False)
            if old is None:
                record = TriggerRecord(
                    rule=rule,
                    version=1,
                    paused=request.paused,
                    created_at=now,
                    updated_at=now,
                    paused_at=now if request.paused else 0.0,
                )
            else:
                changed = not _same(old.rule, rule)
                record = TriggerRecord(
                    rule=rule,
                    version=old.version + 1 if changed else old.version,
                    paused=request.paused,
                    created_at=old.created_at,
                    updated_at=now if changed else old.updated_at,
                    paused_at=now if request.paused != old.paused else old.paused_at,
                )
            try:
                await self._write(rule.name, record, revision)
            except Conflict:
                continue
            log.info("rule %s stored as version %d%s", rule.name, record.version, " (paused)" if record.paused else "")
            await self._applied(record, rule.name)
            return TriggerReply(record=record)
        raise Conflict(f"rule {rule.name} kept changing under {CAS_TRIES} tries; try again")

    async def pause(self, env: Envelope) -> TriggerReply:
        """Pause or resume a rule."""
        request: TriggerPauseRequest = env.message
        for _ in range(CAS_TRIES):
            old, revision = await self._existing(request.name)
            if old.paused == request.paused:
                return TriggerReply(record=old, changed=False)
            record = msgspec.structs.replace(old, paused=request.paused, paused_at=self._clock())
            try:
                await self._write(request.name, record, revision)
            except Conflict:
                continue
            await self._applied(record, request.name)
            return TriggerReply(record=record)
        raise Conflict(f"rule {request.name} kept changing under {CAS_TRIES} tries; try again")

    async def delete(self, env: Envelope) -> TriggerReply:
        """Remove a rule, its figures and its partial state."""
        request: TriggerDeleteRequest = env.message
        old, revision = await self._read(request.name)
        if old is None and not revision:
            raise _missing(request.name)
        if old is None:
            # A record that does not decode: removed all the same, so an operator needs no KV tool.
            old = TriggerRecord(
                rule=TriggerRule(name=request.name, source=EventSource(subjects=["-"]), job={}), version=1
            )
        kv = await self._kv()
        await kv.purge(request.name)
        await self._stats.remove(request.name)
        if self._bursts is not None:
            await self._bursts.remove(request.name)
        state = await self._js.key_value(subjects.KV_TRIGGER_STATE)
        try:
            await state.purge(subjects.trigger_tick_key(request.name))
        except nats.js.errors.KeyNotFoundError:
            pass
        await self._applied(None, request.name)
        log.info("rule %s removed", request.name)
        return TriggerReply(record=old)

    async def get(self, env: Envelope) -> TriggerView:
        """One rule with its figures, next tick and partial state."""
        request: TriggerGetRequest = env.message
        record, _ = await self._existing(request.name)
        totals = await self._stats.totals()
        return TriggerView(
            record=record,
            stats=totals.get(record.rule.name, TriggerStats()),
            next_tick=self._next_tick(record),
            pending=self._bursts.pending(record.rule.name) if self._bursts is not None else [],
        )

    async def list(self, env: Envelope) -> TriggerListReply:
        """Every rule with its figures."""
        totals = await self._stats.totals()
        rows = []
        for record in await self._records():
            name = record.rule.name
            rows.append(
                TriggerSummary(
                    name=name,
                    kind=source_kind(record.rule),
                    version=record.version,
                    paused=record.paused,
                    description=record.rule.description,
                    stats=totals.get(name, TriggerStats()),
                    next_tick=self._next_tick(record),
                    pending=len(self._bursts.pending(name)) if self._bursts is not None else 0,
                )
            )
        return TriggerListReply(triggers=rows)

    async def test(self, env: Envelope) -> TriggerTestReply:
        """The job an event would produce under a rule; nothing is submitted."""
        request = _decode_rule_request(self._test_codec, env.message, TriggerTestRequest)
        now = self._clock()
        if request.rule is not None:
            if request.event is not None:
                # The event given is what the draft is judged on below (it may have no sample,
                # or one it does not match): compile it without the check against a sample.
                compiled = compile_record(TriggerRecord(rule=request.rule, version=1), self._allowed)
            else:
                compiled, _ = check_rule(request.rule, self._allowed, now)
            record = compiled.record
        elif request.name:
            record, _ = await self._existing(request.name)
            compiled = compile_record(record, self._allowed)
        else:
            raise InvalidMessage("name: give a stored rule's name or a whole rule", field="name")
        rule = record.rule
        event = request.event or rule.sample or SampleEvent()
        variables = sample_variables(rule, event, now)
        kind = compiled.kind
        if kind == "event" and not compiled.watches(variables["subject"]["tokens"]):
            return TriggerTestReply(matched=False, reason=f"the rule does not watch subject {event.subject!r}")
        if kind == "completion" and not completion_matches(rule.source, variables["job"]):  # type: ignore[arg-type]
            return TriggerTestReply(matched=False, reason="the finished job is not one the rule's source waits for")
        bindings = Bindings(burst_variables(compiled, variables))
        if not compiled.passes(bindings):
            return TriggerTestReply(matched=False, reason=f"the filter {rule.filter!r} is false for this event")
        if compiled.workflow is not None:
            start = WorkflowStart(compiled.workflow, workflow_input(kind, variables))
            check_workflow_run(start.spec, start.input, None, now)
            await self._check_handlers(start)
            shown = json.dumps(start.input, separators=(",", ":"), default=str)
            shown = shown if len(shown) <= 200 else shown[:199] + "…"
            paused = "; paused: the rule lets events pass without a run" if record.paused else ""
            return TriggerTestReply(
                matched=True,
                reason=f"starts a run of workflow {start.spec.name} with input {shown}{paused}",
                idempotency_key=compiled.idempotency_key(variables["id"]),
            )
        spec = compiled.job(bindings, now)
        if type(spec.runtime) is HandlerRuntime and self._schemas is not None:
            await self._schemas.check(spec.runtime, "job.runtime")
        return TriggerTestReply(
            matched=True,
            reason="paused: the rule lets events pass without a job" if record.paused else "",
            job=msgspec.to_builtins(spec),
            idempotency_key=compiled.idempotency_key(variables["id"]),
        )

    async def _check_handlers(self, start: WorkflowStart) -> None:
        """Check the run again with the types of the handlers its steps call (those an
        executor advertised; the others are checked when their steps run)."""
        names = handler_names(start.spec)
        if names:
            check_workflow_run(start.spec, start.input, await HandlerTypes(self._js)(names), self._clock())

    def _next_tick(self, record: TriggerRecord) -> float:
        if self._ticker is None or source_kind(record.rule) != "schedule" or record.paused:
            return 0.0
        try:
            return self._ticker.next_tick_of(compile_record(record, self._allowed))
        except InvalidMessage:
            return 0.0


def _missing(name: str) -> NotFound:
    return NotFound(f"no trigger rule named {name!r} (jobmesh trigger list shows them)", field="name")


def _same(a: TriggerRule, b: TriggerRule) -> bool:
    return _encoder.encode(a) == _encoder.encode(b)


def _decode_rule_request(codec: Codec[Any], payload: bytes, kind: Any) -> Any:
    """Decode a request holding a rule, naming fields as they sit in the rule file
    (``filter``, not ``rule.filter``) and refusing unknown fields (a typo)."""
    try:
        request = codec.decode(payload)
        reject_unknown_fields(payload, kind)
    except InvalidMessage as exc:
        field = exc.field or ""
        if field.startswith("rule."):
            inner = field.removeprefix("rule.")
            message = str(exc).replace("`$.rule.", "`$.")
            raise InvalidMessage(message, field=inner) from exc
        raise
    return request
