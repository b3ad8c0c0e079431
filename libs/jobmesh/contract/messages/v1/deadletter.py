"""Dead letters: a record of a message a service refused, and why."""

from __future__ import annotations

from msgspec import Struct

__all__ = ["DeadLetter"]


class DeadLetter(Struct, frozen=True, kw_only=True, tag="deadletter"):
    """Published to ``jobmesh.v1.deadletter.<service>`` when a message is terminated."""

    service: str
    subject: str
    code: str
    reason: str
    size: int
    payload_head: str  # the first bytes, lossily decoded, so a person can see what came
    stream_seq: int = 0
    deliveries: int = 0
    at: float = 0.0
    payload_b64: str = ""  # the whole payload, base64, for ``jobmesh dead-letters replay``
    rule: str = ""  # the trigger rule that could not make a job of it (the event itself was fine)
    event_id: str = ""  # that event's identity, which a replay carries (ids.EVENT_ID_HEADER)
