"""A trigger rule, compiled: its subject patterns, filter, burst keys and job template (or
the workflow it starts).

:func:`check_rule` checks a rule completely (patterns, every CEL expression, the job its
sample yields, or the workflow run it starts checked with the sample as its input) and is
what ``api.triggers.put`` runs before storing anything, so a rule in ``jm_triggers`` always
compiles. Deciding what an event does under a rule
(:meth:`CompiledRule.decide`) is a pure function of the rule, the event's bindings and the
clock; publishing is :mod:`jobmesh.trigger.firing`'s job.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from jobmesh.contract import subjects
from jobmesh.contract.ids import trigger_key
from jobmesh.contract.messages.v1 import (
    CompletionSource,
    EventSource,
    JobSpec,
    SampleEvent,
    ScheduleSource,
    TriggerRecord,
    TriggerRule,
    WebhookSource,
    WorkflowSpec,
    WorkflowStep,
)
from jobmesh.contract.strict import reject_unknown_fields
from jobmesh.contract.validation import validate_spec
from jobmesh.errors import InvalidMessage, InvalidRule, InvalidSpec
from jobmesh.trigger import workflows
from jobmesh.trigger.expressions import Bindings, Expression
from jobmesh.trigger.handlerschemas import HandlerSchema
from jobmesh.trigger.templates import JobTemplate

# The variables every expression may read. Each is always bound (empty where the source has
# none), so a rule that reads ``job.id`` on an event fails with "no such field", not with
# an undefined variable.
VARIABLES = ("event", "subject", "headers", "id", "time", "job", "tick", "events", "parts", "key", "count")
# Comprehensions in a whole rule (filter, keys, part filters, template): each is a pass over
# the data, and an evaluation holds the replica's only thread.
MAX_RULE_COMPREHENSIONS = 8


# The error lives in the shared tree, so a client raises it by its code too.
RuleError = InvalidRule


# --- subject patterns ------------------------------------------------------------------
def pattern_problem(pattern: str) -> str:
    """Why ``pattern`` is not a NATS subject pattern ("" when it is one)."""
    if any(c.isspace() for c in pattern):
        return "a subject holds no whitespace"
    tokens = pattern.split(".")
    for i, token in enumerate(tokens):
        if token == "":
            return "a subject has no empty tokens (no leading, trailing or double dots)"
        if token == ">" and i != len(tokens) - 1:
            return "'>' may only be the last token"
        if token not in ("*", ">") and ("*" in token or ">" in token):
            return "'*' and '>' stand for whole tokens only"
    return ""


def subject_matches(pattern: Sequence[str], tokens: Sequence[str]) -> bool:
    """Whether a subject (split into tokens) matches a pattern (split into tokens)."""
    for i, p in enumerate(pattern):
        if p == ">":
            return len(tokens) > i
        if i >= len(tokens) or (p != "*" and p != tokens[i]):
            return False
    return len(tokens) == len(pattern)


def covers(outer: Sequence[str], inner: Sequence[str]) -> bool:
    """Whether every subject that ``inner`` matches is also matched by ``outer``."""
    for i, o in enumerate(outer):
        if o == ">":
            return len(inner) > i
        if i >= len(inner):
            return False
        if inner[i] == ">":
            return False
        if o != "*" and (inner[i] == "*" or o != inner[i]):
            return False
    return len(inner) == len(outer)


EVENTS_PATTERN = tuple(subjects.EVENTS_ALL.split("."))


def check_pattern(pattern: str, allowed: Sequence[tuple[str, ...]], where: str) -> tuple[str, ...]:
    """Split and check one pattern of a rule.

    Args:
        pattern: the pattern as written.
        allowed: patterns the operator lets rules watch beyond ``jobmesh.v1.events.>``.
        where: its field in the rule.

    Returns:
        Its tokens.

    Raises:
        RuleError: when it is malformed, or reaches beyond what rules may watch.
    """
    problem = pattern_problem(pattern)
    if problem:
        raise RuleError(f"{where}: {pattern!r} is not a subject pattern: {problem}", field=where)
    tokens = tuple(pattern.split("."))
    if covers(EVENTS_PATTERN, tokens) or any(covers(a, tokens) for a in allowed):
        return tokens
    extra = ", ".join(".".join(a) for a in allowed) or "none"
    raise RuleError(
        f"{where}: {pattern!r} is outside what rules may watch: {subjects.EVENTS_ALL}, and the subjects "
        f"the operator allows with JOBMESH_TRIGGER_SUBJECTS ({extra})",
        field=where,
    )


# --- bindings --------------------------------------------------------------------------
def time_of(at: float) -> dict[str, Any]:
    """The ``time``/``tick`` variable: unix seconds and ISO 8601 in UTC."""
    return {"unix": at, "iso": datetime.fromtimestamp(at, UTC).isoformat()}


def event_variables(subject: str, data: Any, headers: dict[str, str], event_id: str, at: float) -> dict[str, Any]:
    """The variables of one event (a subject event or a webhook's body)."""
    return {
        "event": data,
        "subject": {"name": subject, "tokens": subject.split(".") if subject else []},
        "headers": headers,
        "id": event_id,
        "time": time_of(at),
        "job": {},
        "tick": {},
        "events": [],
        "parts": {},
        "key": "",
        "count": 1,
    }


def as_event_item(variables: dict[str, Any]) -> dict[str, Any]:
    """One event as an item of ``events`` (a batch) or ``parts.<name>`` (a correlation)."""
    return {
        "data": variables["event"],
        "subject": variables["subject"]["name"],
        "headers": variables["headers"],
        "id": variables["id"],
        "time": variables["time"]["unix"],
    }


# --- the compiled rule -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Part:
    """One compiled part of a correlation."""

    name: str
    pattern: tuple[str, ...]
    filter: Expression | None
    count: int


@dataclass(slots=True)
class CompiledRule:
    """A stored rule, ready to match events.

    Attributes:
        record: the record from ``jm_triggers``.
        patterns: the subject patterns it watches (event sources and correlation parts).
        filter: the rule's condition, or None.
        template: the job template (None for a rule that starts a workflow).
        burst_key: the key expression of a debounce, batch or correlation.
        parts: a correlation's parts.
        workflow: the workflow a run of which each event starts (None for a job rule).
    """

    record: TriggerRecord
    patterns: tuple[tuple[str, ...], ...]
    filter: Expression | None
    template: JobTemplate | None
    burst_key: Expression | None = None
    parts: tuple[Part, ...] = ()
    workflow: WorkflowSpec | None = None

    @property
    def rule(self) -> TriggerRule:
        return self.record.rule

    @property
    def name(self) -> str:
        return self.record.rule.name

    @property
    def version(self) -> int:
        return self.record.version

    @property
    def paused(self) -> bool:
        return self.record.paused

    @property
    def kind(self) -> str:
        """The source's kind: event, webhook, schedule or completion."""
        return source_kind(self.record.rule)

    @property
    def burst(self) -> str:
        """``debounce``, ``batch``, ``correlate``, or "" for a rule that fires per event."""
        rule = self.record.rule
        if rule.debounce is not None:
            return "debounce"
        if rule.batch is not None:
            return "batch"
        if rule.correlate is not None:
            return "correlate"
        return ""

    def watches(self, tokens: Sequence[str]) -> bool:
        """Whether a subject (as tokens) is one this rule watches."""
        return any(subject_matches(p, tokens) for p in self.patterns)

    def passes(self, bindings: Bindings) -> bool:
        """Whether an event passes the rule's filter.

        Raises:
            ExpressionError: the filter failed on this event.
        """
        return self.filter is None or self.filter.test(bindings)

    def job(self, bindings: Bindings, now: float) -> JobSpec:
        """The job spec an event (or a fired burst) yields, checked like a submit.

        Raises:
            ExpressionError: a placeholder failed for this event.
            InvalidMessage: the result is not a valid job spec (names the field under ``job``).
        """
        if self.template is None:
            raise InvalidRule(f"rule {self.name} starts a workflow, not a job", field="workflow")
        spec = self.template.spec(bindings)
        validate_spec(spec, where="job", now=now)
        return spec

    def decide(self, bindings: Bindings, now: float) -> JobSpec | WorkflowStart | None:
        """What one event does under a rule that fires per event: a job spec, the workflow
        run to start, or None when the filter lets it pass.

        A workflow run is checked where it starts (:meth:`WorkflowApi.start`, which knows
        the handlers' types), so its refusal comes from there.

        Raises:
            ExpressionError, InvalidMessage: the event cannot make a job (dead-lettered).
        """
        if not self.passes(bindings):
            return None
        if self.workflow is not None:
            return WorkflowStart(self.workflow, workflow_input(self.kind, bindings.variables))
        return self.job(bindings, now)

    def idempotency_key(self, event_id: str) -> str:
        """The key of the job this rule fires for ``event_id``: rule, version and event, so
        a redelivery or a second replica submits the same job, and a new version of the rule
        fires afresh."""
        return trigger_key(self.name, self.version, event_id)


@dataclass(frozen=True, slots=True)
class WorkflowStart:
    """A run a workflow rule starts for one event: the workflow and the run's input."""

    spec: WorkflowSpec
    input: Any


def workflow_input(kind: str, variables: dict[str, Any]) -> Any:
    """The input of the run a workflow rule starts: what a job template sees as ``event``
    (a subject event's data, a webhook's body, the finished job of a completion); for a
    schedule, which has no data, its tick (``{"unix": ..., "iso": ...}``)."""
    if kind == "schedule" and variables.get("event") is None:
        return variables["tick"]
    return variables["event"]


def decode_workflow(raw: dict[str, Any]) -> WorkflowSpec:
    """A rule's ``workflow``, decoded strictly (a field the workflow does not know is a typo).

    Raises:
        InvalidRule: naming the field as ``workflow.<field>`` (``workflow.steps.b.needs[0]``).
    """
    steps = raw.get("steps")
    if isinstance(steps, dict):
        # msgspec says "steps[...]" for a field inside a step: decode each step on its own
        # first, so that an error names the step (workflow.steps.b.needs[0]).
        for name, step in steps.items():
            _decode_part(step, WorkflowStep, f"steps.{name}")
    return _decode_part(raw, WorkflowSpec, "")


def _decode_part(raw: Any, kind: Any, where: str) -> Any:
    """Decode (strictly) a workflow or one of its steps; ``where`` is its field in the workflow."""
    payload = msgspec.json.encode(raw)
    try:
        value = msgspec.json.decode(payload, type=kind)
        reject_unknown_fields(payload, kind)
    except msgspec.ValidationError as exc:
        message, inner = str(exc), _path_of(str(exc))
    except InvalidMessage as exc:
        message, inner = str(exc), exc.field or ""
    else:
        return value
    if where:
        message = message.replace("`$.", f"`$.{where}.").replace("`$`", f"`$.{where}`")
        inner = f"{where}.{inner}" if inner else where
    raise workflow_error(message, inner)


def _path_of(message: str) -> str:
    """The field of a msgspec error (`` - at `$.steps.b.needs[0]` ``), without ``$.``."""
    if " - at `$" not in message:
        return ""
    return message.rsplit(" - at `$", 1)[1].rstrip("`").lstrip(".")


def workflow_error(message: str, inner: str) -> InvalidRule:
    """An error of the workflow, named as its field sits in the rule."""
    field = f"workflow.{inner}" if inner else "workflow"
    text = message.replace("`$.", "`$.workflow.").replace("`$`", "`$.workflow`")
    if not text.startswith(field):
        text = f"{field}: {text}"
    return InvalidRule(text, field=field)


def check_workflow_run(
    spec: WorkflowSpec, input: Any, handlers: Mapping[str, HandlerSchema] | None = None, now: float | None = None
) -> None:
    """Check a run of a rule's workflow with ``input`` as a run would be checked.

    Raises:
        InvalidRule: naming the field as ``workflow.<field>`` (``workflow.steps.a.runtime``).
    """
    try:
        workflows.check(spec, workflows.run_input(spec, input), handlers, now)
    except InvalidSpec as exc:
        raise workflow_error(str(exc), exc.field or "") from None


def source_kind(rule: TriggerRule) -> str:
    """The rule's source kind (its wire tag)."""
    match rule.source:
        case EventSource():
            return "event"
        case WebhookSource():
            return "webhook"
        case ScheduleSource():
            return "schedule"
        case CompletionSource():
            return "completion"
    raise AssertionError(f"unknown source {rule.source!r}")


def compile_record(record: TriggerRecord, allowed: Sequence[tuple[str, ...]] = ()) -> CompiledRule:
    """Compile a stored rule (no sample check: it passed one when it was put).

    Raises:
        RuleError, ExpressionError: the rule does not compile (a record written by hand, or
            by a newer version).
    """
    rule = record.rule
    patterns: list[tuple[str, ...]] = []
    if isinstance(rule.source, EventSource):
        for i, pattern in enumerate(rule.source.subjects):
            patterns.append(check_pattern(pattern, allowed, f"source.subjects[{i}]"))
    bursts = [n for n in ("debounce", "batch", "correlate") if getattr(rule, n) is not None]
    if len(bursts) > 1:
        raise RuleError(f"{bursts[1]}: a rule takes one of debounce, batch and correlate, not both", field=bursts[1])
    parts: list[Part] = []
    burst_key = None
    if rule.correlate is not None:
        if not isinstance(rule.source, EventSource):
            raise RuleError("correlate: a correlation waits for subject events (source kind event)", field="correlate")
        names = set()
        for i, part in enumerate(rule.correlate.parts):
            where = f"correlate.parts[{i}]"
            if part.name in names:
                raise RuleError(f"{where}.name: {part.name!r} is named twice", field=f"{where}.name")
            names.add(part.name)
            tokens = check_pattern(part.subject, allowed, f"{where}.subject")
            if not any(covers(p, tokens) for p in patterns):
                raise RuleError(
                    f"{where}.subject: {part.subject!r} is not within the rule's source.subjects",
                    field=f"{where}.subject",
                )
            flt = Expression(part.filter, f"{where}.filter") if part.filter else None
            parts.append(Part(part.name, tokens, flt, part.count))
        burst_key = Expression(rule.correlate.key, "correlate.key")
    elif rule.debounce is not None:
        burst_key = Expression(rule.debounce.key, "debounce.key")
    elif rule.batch is not None:
        burst_key = Expression(rule.batch.key, "batch.key")
    if isinstance(rule.source, ScheduleSource):
        _check_schedule(rule.source)
    flt = Expression(rule.filter, "filter") if rule.filter else None
    template: JobTemplate | None = None
    workflow: WorkflowSpec | None = None
    if rule.workflow is not None:
        if rule.job:
            raise RuleError("workflow: a rule gives either a job or a workflow to start, not both", field="workflow")
        if bursts:
            # A burst fires with many events (``events``, ``parts``): a run has one input,
            # and which of them it should be is not for the trigger to guess.
            raise RuleError(
                f"{bursts[0]}: a rule that starts a workflow fires per event; {bursts[0]} is for job rules "
                "(start the workflow from a job rule's job, or filter the events instead)",
                field=bursts[0],
            )
        workflow = decode_workflow(rule.workflow)
    elif not rule.job:
        raise RuleError(
            "job: the job template may not be empty (it needs at least a runtime); or give a workflow to start",
            field="job",
        )
    else:
        template = JobTemplate(rule.job, "job")
    # The limit per expression multiplies with the number of expressions: count the rule's.
    in_template = template.comprehensions if template is not None else 0
    total = in_template + sum(e.comprehensions for e in (flt, burst_key, *(p.filter for p in parts)) if e is not None)
    if total > MAX_RULE_COMPREHENSIONS:
        raise RuleError(
            f"the rule holds {total} comprehensions (all, exists, exists_one, map, filter) in its filter, keys and "
            f"template; at most {MAX_RULE_COMPREHENSIONS}",
            field="job" if in_template else "filter",
        )
    return CompiledRule(record, tuple(patterns), flt, template, burst_key, tuple(parts), workflow)


def _check_schedule(source: ScheduleSource) -> None:
    # Imported here: croniter is the schedules' business, and this keeps the import light.
    from jobmesh.trigger.schedules import schedule_problem

    problem = schedule_problem(source)
    if problem:
        where, reason = problem
        raise RuleError(f"source.{where}: {reason}", field=f"source.{where}")


def sample_variables(rule: TriggerRule, sample: SampleEvent | None, now: float) -> dict[str, Any]:
    """The variables a rule is checked against: its sample's (or the one given), or for a
    schedule or a completion, a tick or a finished job made up for the check.

    Raises:
        RuleError: the rule needs a sample and has none, or the sample's subject is not one
            the rule watches.
    """
    kind = source_kind(rule)
    if sample is None and kind in ("event", "webhook"):
        raise RuleError(
            "sample: required for an event or webhook rule: an example event (subject, data, headers) that the "
            "rule's filter and template are checked against",
            field="sample",
        )
    sample = sample or SampleEvent()
    subject = sample.subject
    if kind == "event":
        if not subject:
            raise RuleError("sample.subject: required for an event rule", field="sample.subject")
        problem = pattern_problem(subject)
        if problem or "*" in subject.split(".") or ">" in subject.split("."):
            raise RuleError(
                f"sample.subject: {subject!r} is not a subject ({problem or 'no wildcards'})", field="sample.subject"
            )
    if kind == "webhook" and not subject:
        subject = f"hooks.{rule.name}"
    variables = event_variables(subject, sample.data, dict(sample.headers), "sample", now)
    if kind == "schedule":
        variables["tick"] = time_of(now)
        variables["id"] = f"tick:{int(now)}"
    if kind == "completion":
        variables["job"] = completion_sample(rule, sample.data)
        variables["event"] = sample.data if sample.data is not None else {}
    return variables


def completion_sample(rule: TriggerRule, data: Any) -> dict[str, Any]:
    """A finished job for checking a completion rule (the sample's ``data`` overrides)."""
    source = rule.source
    assert isinstance(source, CompletionSource)
    outcome = "failed" if source.outcome == "failed" else "succeeded"
    job: dict[str, Any] = {
        "id": "0" * 32,
        "outcome": outcome,
        "state": outcome,
        "queue": source.queue or "default",
        "name": source.name or "sample",
        "labels": dict(source.labels),
        "attempt": 1,
        "result": "",
        "result_ref": "",
        "result_bytes": 0,
        "error": {"code": "exit_code", "message": "sample"} if outcome == "failed" else {},
    }
    if isinstance(data, dict):
        job.update(data)
    return job


def check_rule(
    rule: TriggerRule,
    allowed: Sequence[tuple[str, ...]] = (),
    now: float | None = None,
    handlers: Mapping[str, HandlerSchema] | None = None,
) -> tuple[CompiledRule, JobSpec | WorkflowStart]:
    """Check a rule completely, as ``api.triggers.put`` does before storing it.

    Args:
        rule: the rule.
        allowed: patterns the operator lets rules watch beyond ``jobmesh.v1.events.>``.
        now: unix time (the clock's when None).
        handlers: the types of the handlers a workflow's steps call (``workflows.handler_names``);
            a handler missing here is not checked.

    Returns:
        The compiled rule (as version 1) and the job spec its sample yields, or for a rule
        that starts a workflow, the run it starts (checked as a run with the sample's data
        as its input).

    Raises:
        RuleError, ExpressionError, InvalidMessage: naming the field and the reason
            (``workflow.<field>`` for the workflow).
    """
    at = time.time() if now is None else now
    compiled = compile_record(TriggerRecord(rule=rule, version=1), allowed)
    variables = sample_variables(rule, rule.sample, at)
    if rule.sample is not None and compiled.kind == "event":
        tokens = variables["subject"]["tokens"]
        if not compiled.watches(tokens):
            raise RuleError(
                f"sample.subject: {rule.sample.subject!r} is not a subject the rule watches", field="sample.subject"
            )
    bindings = Bindings(burst_variables(compiled, variables))
    compiled.passes(bindings)  # it must evaluate (true or false) on the sample
    for part in compiled.parts:
        if part.filter is not None:
            part.filter.test(bindings)
    if compiled.burst_key is not None:
        compiled.burst_key.key(bindings)
    if compiled.workflow is not None:
        start = WorkflowStart(compiled.workflow, workflow_input(compiled.kind, variables))
        check_workflow_run(start.spec, start.input, handlers, at)
        return compiled, start
    return compiled, compiled.job(bindings, at)


def burst_variables(rule: CompiledRule, variables: dict[str, Any]) -> dict[str, Any]:
    """The variables of a burst that fires with only this event (a check, or a test)."""
    if not rule.burst:
        return variables
    item = as_event_item(variables)
    out = dict(variables)
    out["events"] = [item]
    out["count"] = 1
    if rule.parts:
        out["parts"] = {p.name: [item] for p in rule.parts}
    if rule.burst_key is not None:
        try:
            out["key"] = rule.burst_key.key(Bindings(variables))
        except InvalidMessage:
            out["key"] = ""
    return out
