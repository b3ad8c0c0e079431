"""Trigger rules: when to fire and which job to build, and the API that manages them.

A rule is stored in the ``jm_triggers`` KV bucket under its name as a ``TriggerRecord``
(the rule, its version and whether it is paused). Every trigger replica watches the
bucket, so a rule added, changed, paused or removed takes effect without a restart.

Expressions (``filter``, the keys of ``debounce``/``batch``/``correlate``, and every
``{{ ... }}`` in the job template) are CEL (https://cel.dev): side-effect free, always
terminating, and typed. The trigger service compiles and checks them; this module only
carries them as strings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

__all__ = [
    "BatchPolicy",
    "CompletionSource",
    "CorrelatePart",
    "CorrelatePolicy",
    "DebouncePolicy",
    "EventSource",
    "JobOrigin",
    "PendingView",
    "SampleEvent",
    "ScheduleSource",
    "TriggerDeleteRequest",
    "TriggerGetRequest",
    "TriggerListReply",
    "TriggerListRequest",
    "TriggerPauseRequest",
    "TriggerPutRequest",
    "TriggerRecord",
    "TriggerReply",
    "TriggerRule",
    "TriggerSource",
    "TriggerStats",
    "TriggerSummary",
    "TriggerTestReply",
    "TriggerTestRequest",
    "TriggerView",
    "WebhookSource",
]

RuleName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_\-]*$")]
Expression = Annotated[str, Meta(max_length=4096)]
Pattern = Annotated[str, Meta(min_length=1, max_length=256)]


class EventSource(Struct, frozen=True, kw_only=True, tag="event", tag_field="kind"):
    """Fire on messages whose subject matches one of ``subjects`` (NATS wildcards ``*``
    and ``>``): under ``jobmesh.v1.events.>``, or a subject the operator allows
    (``JOBMESH_TRIGGER_SUBJECTS``)."""

    subjects: Annotated[list[Pattern], Meta(min_length=1, max_length=16)]


class WebhookSource(Struct, frozen=True, kw_only=True, tag="webhook", tag_field="kind"):
    """Fire on ``POST /v1/hooks/<rule name>``.

    ``auth`` is ``bearer`` (``Authorization: Bearer <secret>``) or ``hmac`` (the body's
    HMAC-SHA256 under the secret, hex, in ``signature_header``, optionally prefixed
    ``sha256=`` as GitHub sends it). ``secret`` names the secret the trigger service
    reads from its secrets directory or ``JOBMESH_SECRET_<NAME>``; it never travels.
    ``id_header`` names a header holding the sender's delivery id (GitHub:
    ``X-GitHub-Delivery``): the same id twice gives one job. ``Idempotency-Key`` always
    counts as one.
    """

    secret: Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")]
    auth: Literal["bearer", "hmac"] = "bearer"
    signature_header: Annotated[str, Meta(max_length=128)] = "X-Hub-Signature-256"
    id_header: Annotated[str, Meta(max_length=128)] = ""
    max_body_bytes: Annotated[int, Meta(ge=1, le=1024 * 1024)] = 256 * 1024


class ScheduleSource(Struct, frozen=True, kw_only=True, tag="schedule", tag_field="kind"):
    """Fire on a cron expression (five fields, or six with seconds first) or every
    ``every`` seconds, in ``timezone``.

    After downtime, ``missed`` decides what happens to the ticks nobody fired: ``skip``
    fires none of them, ``catch_up`` fires at most ``catch_up_max`` of the latest.
    """

    cron: Annotated[str, Meta(max_length=256)] = ""
    every: Annotated[float, Meta(ge=0, le=366 * 86400)] = 0.0
    timezone: Annotated[str, Meta(max_length=64)] = "UTC"
    missed: Literal["skip", "catch_up"] = "skip"
    catch_up_max: Annotated[int, Meta(ge=1, le=1000)] = 1


class CompletionSource(Struct, frozen=True, kw_only=True, tag="completion", tag_field="kind"):
    """Fire when a job ends for good: ``succeeded``, ``failed`` (gave up, expired or was
    cancelled) or ``any``; narrowed by queue, name and metadata labels (all must match;
    empty matches everything)."""

    outcome: Literal["succeeded", "failed", "any"] = "succeeded"
    queue: Annotated[str, Meta(max_length=128)] = ""
    name: Annotated[str, Meta(max_length=256)] = ""
    labels: dict[str, str] = {}


TriggerSource = EventSource | WebhookSource | ScheduleSource | CompletionSource


class DebouncePolicy(Struct, frozen=True, kw_only=True):
    """Fire once, with the last event, after events for a key stopped for ``seconds``."""

    seconds: Annotated[float, Meta(gt=0, le=86400)]
    key: Expression = "''"


class BatchPolicy(Struct, frozen=True, kw_only=True):
    """Fire one job for up to ``max_events`` events or ``max_seconds`` after a batch's
    first event, per key; the job's template sees the batch as ``events``."""

    max_events: Annotated[int, Meta(ge=1, le=1000)]
    max_seconds: Annotated[float, Meta(gt=0, le=86400)] = 60.0
    key: Expression = "''"


class CorrelatePart(Struct, frozen=True, kw_only=True):
    """One event the correlation waits for: ``count`` events on ``subject`` that pass
    ``filter``."""

    name: RuleName
    subject: Pattern
    filter: Expression = ""
    count: Annotated[int, Meta(ge=1, le=1000)] = 1


class CorrelatePolicy(Struct, frozen=True, kw_only=True):
    """Fire once when every part has its events, sharing a key, within ``window``
    seconds. At most ``max_pending`` keys wait per rule; beyond that the oldest is
    dropped."""

    key: Expression
    window: Annotated[float, Meta(gt=0, le=7 * 86400)]
    parts: Annotated[list[CorrelatePart], Meta(min_length=1, max_length=8)]
    max_pending: Annotated[int, Meta(ge=1, le=100_000)] = 10_000


class SampleEvent(Struct, frozen=True, kw_only=True):
    """An example event a rule is checked against when it is added (and the default
    event of ``jobmesh trigger test``)."""

    subject: str = ""
    data: Any = None
    headers: dict[str, str] = {}


class TriggerRule(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A rule as its author writes it (YAML or JSON).

    ``job`` is a job spec (the shape ``jobmesh submit --spec`` takes) whose strings may hold
    ``{{ expr }}``: a string that is exactly one such placeholder takes the expression's
    value (a number stays a number); otherwise each placeholder is replaced by its text.
    """

    name: RuleName
    source: TriggerSource
    job: dict[str, Any] = {}
    # Instead of a job: a workflow spec (``WorkflowSpec``), run with the event's data as
    # its input. Exactly one of ``job`` and ``workflow`` is given.
    workflow: dict[str, Any] | None = None
    description: Annotated[str, Meta(max_length=1024)] = ""
    filter: Expression = ""
    debounce: DebouncePolicy | None = None
    batch: BatchPolicy | None = None
    correlate: CorrelatePolicy | None = None
    sample: SampleEvent | None = None


class TriggerRecord(Struct, frozen=True, kw_only=True, tag="trigger.record"):
    """What ``jm_triggers`` holds under a rule's name. ``version`` grows by one each time
    the rule's definition changes (pausing does not change it); the idempotency keys of
    the jobs a rule fires include it."""

    rule: TriggerRule
    version: Annotated[int, Meta(ge=1)]
    paused: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    paused_at: float = 0.0  # when it was last paused or resumed


class JobOrigin(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Which rule and which event started a job (``JobSubmitted.origin``).

    ``event`` identifies the event: ``<stream>:<sequence>`` of a subject event, the
    sender's delivery id of a webhook, ``tick:<unix time>`` of a schedule, the finished
    job's id of a completion, or the first and last events of a batch.
    """

    # event, webhook, schedule, completion, debounce, batch or correlate. A plain string,
    # not a Literal: a kind added later must not make older readers refuse the message.
    kind: str
    rule: str = ""
    version: int = 0
    event: str = ""
    subject: str = ""
    at: float = 0.0
    events: int = 1  # how many events the job stands for (a batch, a debounce, a correlation)
    depth: int = 0  # completion chains: 1 for a job that a job's end started, and so on


class TriggerStats(Struct, frozen=True, kw_only=True):
    """What one rule did, summed over every trigger replica."""

    fires: int = 0  # jobs submitted (a duplicate of a job already submitted does not count)
    failures: int = 0  # events dead-lettered because the rule could not make a job from them
    skipped: int = 0  # events that matched while the rule was paused
    last_fire_at: float = 0.0
    last_error: str = ""
    last_error_at: float = 0.0


class PendingView(Struct, frozen=True, kw_only=True):
    """A debounce, batch or correlation waiting for more events, as stored."""

    key: str
    kind: Literal["debounce", "batch", "correlate"]
    events: int
    first_at: float
    last_at: float
    due_at: float  # when it fires (debounce, batch) or expires (correlate)
    parts: dict[str, int] = {}  # correlate: events held per part


class TriggerSummary(Struct, frozen=True, kw_only=True):
    """One row of ``jobmesh trigger list``."""

    name: str
    kind: str
    version: int
    paused: bool
    description: str
    stats: TriggerStats
    next_tick: float = 0.0  # schedules: the next tick (unix time); 0 otherwise
    pending: int = 0  # keys waiting (debounce, batch, correlate)


class TriggerView(Struct, frozen=True, kw_only=True, tag="api.trigger"):
    """``jobmesh trigger show``: the record, its figures and its partial state."""

    record: TriggerRecord
    stats: TriggerStats
    next_tick: float = 0.0
    pending: list[PendingView] = []


class TriggerPutRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.triggers.put"
):
    """Add a rule, or change the rule of that name (a new version when it differs)."""

    rule: TriggerRule
    paused: bool = False  # add it paused


class TriggerReply(Struct, frozen=True, kw_only=True, tag="api.trigger.reply"):
    """The stored record after a put, pause, resume or delete; ``changed`` is false when
    nothing needed to change (the same rule added again)."""

    record: TriggerRecord
    changed: bool = True


class TriggerGetRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.triggers.get"
):
    """Ask for one rule."""

    name: RuleName


class TriggerListRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.triggers.list"
):
    """Ask for every rule."""


class TriggerListReply(Struct, frozen=True, kw_only=True, tag="api.triggers"):
    """Every rule, by name."""

    triggers: list[TriggerSummary]


class TriggerDeleteRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.triggers.delete"
):
    """Remove a rule, its figures and its partial state."""

    name: RuleName


class TriggerPauseRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.triggers.pause"
):
    """Pause (``paused``) or resume a rule."""

    name: RuleName
    paused: bool = True


class TriggerTestRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.triggers.test"
):
    """Show the job an event would produce, without submitting it. Give a stored rule's
    ``name`` or a whole ``rule``; without ``event`` the rule's sample is used."""

    name: str = ""
    rule: TriggerRule | None = None
    event: SampleEvent | None = None


class TriggerTestReply(Struct, frozen=True, kw_only=True, tag="api.triggers.tested"):
    """``matched`` is false when the subject or the filter let the event pass; ``reason``
    says which. ``job`` is the spec (as JSON) the event yields; ``idempotency_key`` the
    key it would be submitted with. A rule that debounces, batches or correlates shows the
    job its first event would give if it fired alone."""

    matched: bool
    reason: str = ""
    job: dict[str, Any] | None = None
    idempotency_key: str = ""
