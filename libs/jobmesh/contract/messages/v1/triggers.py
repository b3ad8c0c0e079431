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
    "ORIGIN_KINDS",
    "SOURCE_KINDS",
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

# A rule's source kinds, and how a job's origin names what fired it (plain strings on the
# wire, so that a kind added later does not make older readers refuse the message).
SOURCE_KINDS = ("event", "webhook", "schedule", "completion")
ORIGIN_KINDS = (*SOURCE_KINDS, "debounce", "batch", "correlate")
RuleName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_\-]*$")]
Expression = Annotated[str, Meta(max_length=4096)]
Pattern = Annotated[str, Meta(min_length=1, max_length=256)]


class EventSource(Struct, frozen=True, kw_only=True, tag="event", tag_field="kind"):
    """Fire on messages whose subject matches one of ``subjects`` (NATS wildcards ``*``
    and ``>``): under ``jobmesh.v1.events.>``, or a subject the operator allows
    (``JOBMESH_TRIGGER_SUBJECTS``)."""

    subjects: Annotated[
        list[Pattern],
        Meta(min_length=1, max_length=16),
        Meta(
            description="Fire on messages whose subject matches one of these patterns (NATS wildcards * and >), 1 to 16."
        ),
    ]


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

    secret: Annotated[
        str,
        Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$"),
        Meta(
            description="The name of the secret the trigger reads (its secrets directory or JOBMESH_SECRET_<NAME>); the secret never travels."
        ),
    ]
    auth: Annotated[
        Literal["bearer", "hmac"],
        Meta(
            description="bearer (Authorization: Bearer <secret>, the default) or hmac (the body's HMAC-SHA256 in signature_header)."
        ),
    ] = "bearer"
    signature_header: Annotated[
        str,
        Meta(max_length=128),
        Meta(
            description="With hmac: the header holding the hex signature, optionally prefixed sha256= (default X-Hub-Signature-256)."
        ),
    ] = "X-Hub-Signature-256"
    id_header: Annotated[
        str,
        Meta(max_length=128),
        Meta(
            description="A header holding the sender's delivery id: the same id twice gives one job; empty: only Idempotency-Key counts."
        ),
    ] = ""
    max_body_bytes: Annotated[
        int, Meta(ge=1, le=1024 * 1024), Meta(description="The largest body accepted, in bytes (default 262144).")
    ] = 256 * 1024


class ScheduleSource(Struct, frozen=True, kw_only=True, tag="schedule", tag_field="kind"):
    """Fire on a cron expression (five fields, or six with seconds first) or every
    ``every`` seconds, in ``timezone``.

    After downtime, ``missed`` decides what happens to the ticks nobody fired: ``skip``
    fires none of them, ``catch_up`` fires at most ``catch_up_max`` of the latest.
    """

    cron: Annotated[
        str,
        Meta(max_length=256),
        Meta(description="A cron expression (five fields, or six with seconds first); empty when every is given."),
    ] = ""
    every: Annotated[
        float, Meta(ge=0, le=366 * 86400), Meta(description="Fire every this many seconds; 0 when cron is given.")
    ] = 0.0
    timezone: Annotated[
        str,
        Meta(max_length=64),
        Meta(description="The time zone the cron expression is read in (IANA name, default UTC)."),
    ] = "UTC"
    missed: Annotated[
        Literal["skip", "catch_up"],
        Meta(description="After downtime: skip the ticks nobody fired (the default), or catch_up on them."),
    ] = "skip"
    catch_up_max: Annotated[
        int,
        Meta(ge=1, le=1000),
        Meta(description="With catch_up: fire at most this many of the latest missed ticks (default 1)."),
    ] = 1


class CompletionSource(Struct, frozen=True, kw_only=True, tag="completion", tag_field="kind"):
    """Fire when a job ends for good: ``succeeded``, ``failed`` (gave up, expired or was
    cancelled) or ``any``; narrowed by queue, name and metadata labels (all must match;
    empty matches everything)."""

    outcome: Annotated[
        Literal["succeeded", "failed", "any"],
        Meta(description="Which end fires: succeeded, failed (gave up, expired or cancelled) or any."),
    ] = "succeeded"
    queue: Annotated[
        str, Meta(max_length=128), Meta(description="Only jobs of this queue; empty matches every queue.")
    ] = ""
    name: Annotated[
        str, Meta(max_length=256), Meta(description="Only jobs with this name; empty matches every name.")
    ] = ""
    labels: Annotated[
        dict[str, str], Meta(description="Only jobs whose metadata has all these labels; empty matches every job.")
    ] = {}


TriggerSource = EventSource | WebhookSource | ScheduleSource | CompletionSource


class DebouncePolicy(Struct, frozen=True, kw_only=True):
    """Fire once, with the last event, after events for a key stopped for ``seconds``."""

    seconds: Annotated[
        float, Meta(gt=0, le=86400), Meta(description="Fire once events for a key have stopped for this many seconds.")
    ]
    key: Annotated[
        Expression,
        Meta(
            description="A CEL expression that groups events; events with equal keys are treated together. \"''\" (the default) puts all in one group."
        ),
    ] = "''"


class BatchPolicy(Struct, frozen=True, kw_only=True):
    """Fire one job for up to ``max_events`` events or ``max_seconds`` after a batch's
    first event, per key; the job's template sees the batch as ``events``."""

    max_events: Annotated[
        int, Meta(ge=1, le=1000), Meta(description="Fire when a batch holds this many events (1 to 1000).")
    ]
    max_seconds: Annotated[
        float,
        Meta(gt=0, le=86400),
        Meta(description="Fire this many seconds after the batch's first event, however few it holds (default 60)."),
    ] = 60.0
    key: Annotated[
        Expression,
        Meta(
            description="A CEL expression that groups events; events with equal keys are treated together. \"''\" (the default) puts all in one group."
        ),
    ] = "''"


class CorrelatePart(Struct, frozen=True, kw_only=True):
    """One event the correlation waits for: ``count`` events on ``subject`` that pass
    ``filter``."""

    name: Annotated[RuleName, Meta(description="The part's name (as the job's template reads it).")]
    subject: Annotated[Pattern, Meta(description="The subject pattern of this part's events (NATS wildcards * and >).")]
    filter: Annotated[
        Expression,
        Meta(
            description="A CEL expression over the event that must be true for the rule to fire; empty lets every event pass."
        ),
    ] = ""
    count: Annotated[
        int,
        Meta(ge=1, le=1000),
        Meta(description="How many events of this part the correlation waits for (default 1)."),
    ] = 1


class CorrelatePolicy(Struct, frozen=True, kw_only=True):
    """Fire once when every part has its events, sharing a key, within ``window``
    seconds. At most ``max_pending`` keys wait per rule; beyond that the oldest is
    dropped."""

    key: Annotated[
        Expression, Meta(description="A CEL expression every part's events must agree on (e.g. the order id).")
    ]
    window: Annotated[
        float,
        Meta(gt=0, le=7 * 86400),
        Meta(
            description="Seconds within which every part must have its events; after that the partial correlation is dropped."
        ),
    ]
    parts: Annotated[
        list[CorrelatePart],
        Meta(min_length=1, max_length=8),
        Meta(description="The events the correlation waits for (1 to 8 parts)."),
    ]
    max_pending: Annotated[
        int,
        Meta(ge=1, le=100_000),
        Meta(description="At most this many keys wait per rule; beyond that the oldest is dropped (default 10000)."),
    ] = 10_000


class SampleEvent(Struct, frozen=True, kw_only=True):
    """An example event a rule is checked against when it is added (and the default
    event of ``jobmesh trigger test``)."""

    subject: Annotated[str, Meta(description="The sample event's subject; empty: the rule's first subject.")] = ""
    data: Annotated[Any, Meta(description="The sample event's payload (any JSON); null: none.")] = None
    headers: Annotated[dict[str, str], Meta(description="The sample event's headers; empty: none.")] = {}


class TriggerRule(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A rule as its author writes it (YAML or JSON).

    ``job`` is a job spec (the shape ``jobmesh submit --spec`` takes) whose strings may hold
    ``{{ expr }}``: a string that is exactly one such placeholder takes the expression's
    value (a number stays a number); otherwise each placeholder is replaced by its text.
    """

    name: Annotated[RuleName, Meta(description="The rule's name (lower-case letters, digits, _ and -), also its key.")]
    source: Annotated[
        TriggerSource,
        Meta(
            description="What fires it: events on subjects, a webhook, a schedule, or the end of a job (tagged by kind)."
        ),
    ]
    job: Annotated[
        dict[str, Any],
        Meta(
            description="The job spec to submit (JobSpec's JSON) whose strings may hold {{ CEL }} placeholders; empty when workflow is given."
        ),
    ] = {}
    # Instead of a job: a workflow spec (``WorkflowSpec``), run with the event's data as
    # its input. Exactly one of ``job`` and ``workflow`` is given.
    workflow: Annotated[
        dict[str, Any] | None,
        Meta(
            description="Instead of a job: a workflow spec (WorkflowSpec) run with the event's data as input; null when job is given."
        ),
    ] = None
    description: Annotated[str, Meta(max_length=1024), Meta(description="Free text for people; empty when none.")] = ""
    filter: Annotated[
        Expression,
        Meta(
            description="A CEL expression over the event that must be true for the rule to fire; empty lets every event pass."
        ),
    ] = ""
    debounce: Annotated[
        DebouncePolicy | None,
        Meta(description="Fire once, with the last event, after events for a key stopped; null: fire per event."),
    ] = None
    batch: Annotated[BatchPolicy | None, Meta(description="Fire one job for several events; null: fire per event.")] = (
        None
    )
    correlate: Annotated[
        CorrelatePolicy | None, Meta(description="Fire once when events of every part arrived; null: fire per event.")
    ] = None
    sample: Annotated[
        SampleEvent | None,
        Meta(description="An example event the rule is checked against when it is added; null: none."),
    ] = None


class TriggerRecord(Struct, frozen=True, kw_only=True, tag="trigger.record"):
    """What ``jm_triggers`` holds under a rule's name. ``version`` grows by one each time
    the rule's definition changes (pausing does not change it); the idempotency keys of
    the jobs a rule fires include it."""

    rule: Annotated[TriggerRule, Meta(description="The rule as written.")]
    version: Annotated[
        int,
        Meta(ge=1),
        Meta(description="The rule's version, from 1: it grows by one when the rule's definition changes."),
    ]
    paused: Annotated[
        bool, Meta(description="True when the rule is paused: its events are counted as skipped and fire nothing.")
    ] = False
    created_at: Annotated[
        float, Meta(description="When the record was created. Unix time, in seconds; 0 when unknown.")
    ] = 0.0
    updated_at: Annotated[float, Meta(description="When the record last changed. Unix time, in seconds.")] = 0.0
    paused_at: Annotated[
        float, Meta(description="When it was last paused or resumed. Unix time, in seconds; 0: never.")
    ] = 0.0


class JobOrigin(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Which rule and which event started a job (``JobSubmitted.origin``).

    ``event`` identifies the event: ``<stream>:<sequence>`` of a subject event, the
    sender's delivery id of a webhook, ``tick:<unix time>`` of a schedule, the finished
    job's id of a completion, or the first and last events of a batch.
    """

    # event, webhook, schedule, completion, debounce, batch or correlate. A plain string,
    # not a Literal: a kind added later must not make older readers refuse the message.
    kind: Annotated[
        str,
        Meta(
            description="How the rule fired: event, webhook, schedule, completion, debounce, batch or correlate. A later v1 may add kinds.",
            extra_json_schema={"enum": list(ORIGIN_KINDS)},
        ),
    ]
    rule: Annotated[str, Meta(description="The rule's name.")] = ""
    version: Annotated[int, Meta(description="The rule's version when it fired.")] = 0
    event: Annotated[
        str,
        Meta(
            description="The event's identity: <stream>:<sequence> or id:<Nats-Msg-Id> of a subject event, a webhook's delivery id, tick:<unix time> of a schedule, the ended job's id of a completion."
        ),
    ] = ""
    subject: Annotated[str, Meta(description="The event's subject (or the webhook's path); empty for a schedule.")] = ""
    at: Annotated[float, Meta(description="When the event happened. Unix time, in seconds.")] = 0.0
    events: Annotated[
        int, Meta(description="How many events the job stands for (a batch, debounce or correlation); 1 otherwise.")
    ] = 1
    depth: Annotated[
        int, Meta(description="Completion chains: 1 for a job a job's end started, 2 for the next, ...; 0 otherwise.")
    ] = 0


class TriggerStats(Struct, frozen=True, kw_only=True):
    """What one rule did, summed over every trigger replica."""

    fires: Annotated[
        int, Meta(description="Jobs submitted (a duplicate of a job already submitted does not count).")
    ] = 0
    failures: Annotated[
        int, Meta(description="Events dead-lettered because the rule could not make a job from them.")
    ] = 0
    skipped: Annotated[int, Meta(description="Events that matched while the rule was paused.")] = 0
    last_fire_at: Annotated[float, Meta(description="The last fire. Unix time, in seconds; 0: never.")] = 0.0
    last_error: Annotated[str, Meta(description="The last failure's message; empty: none.")] = ""
    last_error_at: Annotated[float, Meta(description="The last failure. Unix time, in seconds; 0: never.")] = 0.0


class PendingView(Struct, frozen=True, kw_only=True):
    """A debounce, batch or correlation waiting for more events, as stored."""

    key: Annotated[str, Meta(description="The group key's value (its digest when long).")]
    kind: Annotated[Literal["debounce", "batch", "correlate"], Meta(description="debounce, batch or correlate.")]
    events: Annotated[int, Meta(description="Events held so far.")]
    first_at: Annotated[float, Meta(description="The first held event's time. Unix time, in seconds.")]
    last_at: Annotated[float, Meta(description="The last held event's time. Unix time, in seconds.")]
    due_at: Annotated[
        float, Meta(description="When it fires (debounce, batch) or expires (correlate). Unix time, in seconds.")
    ]
    parts: Annotated[dict[str, int], Meta(description="Correlate: events held per part; empty otherwise.")] = {}


class TriggerSummary(Struct, frozen=True, kw_only=True):
    """One row of ``jobmesh trigger list``."""

    name: Annotated[str, Meta(description="The rule's name.")]
    kind: Annotated[
        str,
        Meta(
            description="Its source's kind: event, webhook, schedule or completion.",
            extra_json_schema={"enum": list(SOURCE_KINDS)},
        ),
    ]
    version: Annotated[int, Meta(description="Its version.")]
    paused: Annotated[bool, Meta(description="True when it is paused.")]
    description: Annotated[str, Meta(description="Its description; empty when none.")]
    stats: Annotated[TriggerStats, Meta(description="What the rule did, summed over every trigger replica.")]
    next_tick: Annotated[
        float, Meta(description="A schedule rule's next tick. Unix time, in seconds; 0 for other rules.")
    ] = 0.0
    pending: Annotated[
        int, Meta(description="Keys waiting for more events (debounce, batch, correlate); 0 for other rules.")
    ] = 0


class TriggerView(Struct, frozen=True, kw_only=True, tag="api.trigger"):
    """``jobmesh trigger show``: the record, its figures and its partial state."""

    record: Annotated[TriggerRecord, Meta(description="The rule's stored record (TriggerRecord).")]
    stats: Annotated[TriggerStats, Meta(description="What the rule did, summed over every trigger replica.")]
    next_tick: Annotated[
        float, Meta(description="A schedule rule's next tick. Unix time, in seconds; 0 for other rules.")
    ] = 0.0
    pending: Annotated[
        list[PendingView],
        Meta(description="Its partial state (debounces, batches, correlations waiting); empty: none."),
    ] = []


class TriggerPutRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.triggers.put"
):
    """Add a rule, or change the rule of that name (a new version when it differs)."""

    rule: Annotated[TriggerRule, Meta(description="The rule.")]
    paused: Annotated[bool, Meta(description="Add it paused (default false).")] = False


class TriggerReply(Struct, frozen=True, kw_only=True, tag="api.trigger.reply"):
    """The stored record after a put, pause, resume or delete; ``changed`` is false when
    nothing needed to change (the same rule added again)."""

    record: Annotated[TriggerRecord, Meta(description="The rule's stored record (TriggerRecord).")]
    changed: Annotated[bool, Meta(description="False when nothing needed to change (the same rule put again).")] = True


class TriggerGetRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.triggers.get"
):
    """Ask for one rule."""

    name: Annotated[RuleName, Meta(description="The rule to read.")]


class TriggerListRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.triggers.list"
):
    """Ask for every rule."""


class TriggerListReply(Struct, frozen=True, kw_only=True, tag="api.triggers"):
    """Every rule, by name."""

    triggers: Annotated[list[TriggerSummary], Meta(description="Every rule, by name.")]


class TriggerDeleteRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.triggers.delete"
):
    """Remove a rule, its figures and its partial state."""

    name: Annotated[RuleName, Meta(description="The rule to remove.")]


class TriggerPauseRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.triggers.pause"
):
    """Pause (``paused``) or resume a rule."""

    name: Annotated[RuleName, Meta(description="The rule to pause or resume.")]
    paused: Annotated[bool, Meta(description="True (the default) pauses, false resumes.")] = True


class TriggerTestRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.triggers.test"
):
    """Show the job an event would produce, without submitting it. Give a stored rule's
    ``name`` or a whole ``rule``; without ``event`` the rule's sample is used."""

    name: Annotated[str, Meta(description="A stored rule to test; empty when rule is given.")] = ""
    rule: Annotated[
        TriggerRule | None, Meta(description="A whole rule to test, not stored; null when name is given.")
    ] = None
    event: Annotated[SampleEvent | None, Meta(description="The event to test with; null: the rule's sample.")] = None


class TriggerTestReply(Struct, frozen=True, kw_only=True, tag="api.triggers.tested"):
    """``matched`` is false when the subject or the filter let the event pass; ``reason``
    says which. ``job`` is the spec (as JSON) the event yields; ``idempotency_key`` the
    key it would be submitted with. A rule that debounces, batches or correlates shows the
    job its first event would give if it fired alone."""

    matched: Annotated[
        bool, Meta(description="False when the subject or the filter let the event pass (reason says which).")
    ]
    reason: Annotated[str, Meta(description="Why it did not match; empty when it matched.")] = ""
    job: Annotated[
        dict[str, Any] | None, Meta(description="The job spec (JSON) the event yields; null when it did not match.")
    ] = None
    idempotency_key: Annotated[
        str, Meta(description="The key it would be submitted with; empty when it did not match.")
    ] = ""
