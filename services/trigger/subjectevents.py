"""Subject events: messages on ``jobmesh.v1.events.>`` (and allowed subjects) become jobs.

One durable consumer, shared by every trigger replica, reads ``JM_EVENTS`` (and
``JM_EXTERNAL`` when the operator allows other subjects). Each batch is matched against
the event rules, every job it yields is submitted in one publish, and the batch is
acknowledged only after the PubAcks (and the burst state) are durable: a crash redelivers
it, and the idempotency keys (rule, version, event id) make the second pass submit the
same jobs. An event that a rule cannot make a job of is dead-lettered with the rule and the
reason; the event is still acknowledged, and the other rules still fire for it.

An event's payload is any JSON value (an object, usually; ``schemas/v1/ExternalEvent.json``).
A payload that is not JSON is refused by the codec: the runtime dead-letters it with the
reason (``invalid_message``) and no rule sees it, so garbage never fires a job.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from jobmesh.contract.codec import Codec
from jobmesh.contract.ids import EVENT_ID_HEADER
from jobmesh.errors import InvalidMessage, OversizedMessage, Unavailable
from jobmesh.runtime.outcomes import Reject
from jobmesh.runtime.service import Envelope
from jobmesh.trigger.router import Incoming, Router
from jobmesh.trigger.rules import event_variables
from jobmesh.trigger.ruleset import RuleSet

log = logging.getLogger("jobmesh.trigger.events")

DeadLetter = Callable[..., Awaitable[bool]]
_json = msgspec.json.Decoder()


class EventCodec(Codec[Any]):
    """Decodes an event's payload: any JSON value. Refuses a payload that is not JSON, or
    too large, or nested too deeply; rules decide what else they need of it."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(Any, max_bytes)

    def decode(self, payload: bytes) -> Any:
        if len(payload) > self.max_bytes:
            raise OversizedMessage(f"event of {len(payload)} bytes exceeds the limit of {self.max_bytes}")
        try:
            return _json.decode(payload)
        except msgspec.DecodeError as exc:
            raise InvalidMessage(f"event is not JSON: {exc}") from exc
        except RecursionError as exc:
            # ~1000 levels of brackets: refused (dead-lettered), never a crash of the consumer.
            raise InvalidMessage("malformed event: JSON nested too deeply") from exc


def event_identity(env: Envelope, stream: str) -> tuple[str, float]:
    """An event's id and time: the publisher's Nats-Msg-Id when it set one (the same id is
    the same event, even after the stream's duplicate window), else its stream sequence;
    and the time the stream stored it."""
    raw = env.raw
    meta = raw.metadata if raw is not None else None
    at = meta.timestamp.timestamp() if meta is not None and meta.timestamp is not None else 0.0
    replayed = env.headers.get(EVENT_ID_HEADER)
    if replayed:
        # A dead letter replayed (jobmesh dead-letters replay): the event it was, so the rules
        # that fired for it then make the same jobs (duplicates), not second ones.
        return replayed, at
    msg_id = env.headers.get("Nats-Msg-Id")
    if msg_id:
        return f"id:{msg_id}", at
    return f"{stream}:{env.stream_seq}", at


class EventHandler:
    """The batch handler of the events consumer.

    Args:
        rules: the live rule set.
        router: applies rules and submits.
        dead_letter: records an event a rule refused (``Runtime.dead_letter``).
        stream: the stream the consumer reads (``JM_EVENTS``), part of each event's id.
        clock: unix time (an event's time when the stream gave none).
    """

    def __init__(
        self,
        rules: RuleSet,
        router: Router,
        dead_letter: DeadLetter,
        stream: str,
        clock: Callable[[], float],
    ) -> None:
        self._rules = rules
        self._router = router
        self._dead_letter = dead_letter
        self._stream = stream
        self._clock = clock

    async def __call__(self, envelopes: list[Envelope]) -> None:
        items: list[Incoming] = []
        for env in envelopes:
            matched = self._rules.watching(env.subject)
            if not matched:
                continue  # no rule watches it: stored, and it starts nothing
            event_id, at = event_identity(env, self._stream)
            headers = {k: v for k, v in env.headers.items() if k not in ("traceparent", "tracestate", EVENT_ID_HEADER)}
            variables = event_variables(env.subject, env.message, headers, event_id, at or self._clock())
            items.append(Incoming("event", variables, event_id, env.subject, matched, env.context, extra=env))
        if not items:
            return
        routed = await self._router.route(items)
        for failure in routed.failures:
            env = failure.incoming.extra
            reason = f"rule {failure.rule.name} v{failure.rule.version}: {failure.error}"
            if not await self._dead_letter(
                failure.incoming.subject,
                env.data,
                Reject(failure.error.code, reason),
                1,
                env.stream_seq,
                rule=failure.rule.name,
                event_id=failure.incoming.event_id,
            ):
                # Not recorded: the whole batch comes again (its jobs are idempotent).
                raise Unavailable("cannot record a dead letter for a refused event")
