"""What happens to a consumed message, decided in one place.

Handlers return an outcome per message (or raise); :func:`fate_for` turns an exception into
an outcome. The runtime then acks, naks with a delay, or terminates and dead-letters.
"""

from __future__ import annotations

from msgspec import Struct

from jobmesh.errors import JobmeshError
from jobmesh.runtime.backoff import backoff


class Ack(Struct, frozen=True):
    """The message's effect is durable; do not deliver it again."""


class Retry(Struct, frozen=True):
    """Deliver the message again after ``delay`` seconds."""

    delay: float
    reason: str = ""


class Reject(Struct, frozen=True):
    """Never deliver the message again; record it as a dead letter with the reason."""

    code: str
    reason: str


Outcome = Ack | Retry | Reject
ACK = Ack()

# Redelivery backoff for retryable failures: about 0.5s, 1s, 2s ... capped at about 30s.
REDELIVERY_BASE = 0.5
REDELIVERY_CAP = 30.0


def redelivery_delay(deliveries: int, key: object = None) -> float:
    """Delay before the next delivery of a message that has been delivered ``deliveries``
    times; ``key`` (its stream sequence) spreads the retries of different messages."""
    return backoff(deliveries, base=REDELIVERY_BASE, cap=REDELIVERY_CAP, key=key)


def fate_for(exc: BaseException, deliveries: int, max_deliver: int, key: object = None) -> Outcome:
    """Map an exception raised while handling a message to its outcome.

    Args:
        exc: what the handler raised.
        deliveries: how many times this message has been delivered, this time included.
        max_deliver: how often an unexpected exception (a bug) may recur before the message
            is rejected and recorded as a dead letter, instead of looping forever.
        key: what the retry delay's jitter derives from (the message's stream sequence).

    Returns:
        ``Retry`` for retryable errors (always: outages end) and for unexpected exceptions
        below ``max_deliver``; ``Reject`` for permanent errors and for an unexpected
        exception on its last allowed delivery.
    """
    if isinstance(exc, JobmeshError) and not exc.retryable:
        return Reject(exc.code, str(exc))
    reason = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, JobmeshError):
        # A known transient condition (NATS or Postgres away, a lost race): the message is
        # fine, so it waits for as long as the outage lasts instead of becoming a dead letter.
        return Retry(redelivery_delay(deliveries, key), reason)
    if deliveries >= max_deliver:
        return Reject("handler_error", f"gave up after {deliveries} deliveries: {reason}")
    return Retry(redelivery_delay(deliveries, key), reason)
