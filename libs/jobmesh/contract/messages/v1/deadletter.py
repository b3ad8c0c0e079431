"""Dead letters: a record of a message a service refused, and why."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from jobmesh.errors import JobmeshError

__all__ = ["DEADLETTER_CODES", "ERROR_CODES", "DeadLetter"]


def _codes(kind: type[JobmeshError]) -> set[str]:
    own = {kind.code} if "code" in kind.__dict__ else set()
    return own.union(*(_codes(sub) for sub in kind.__subclasses__()))


# Every code an ErrorReply (and so a dead letter) may carry: each error class of
# jobmesh.errors that declares one. The schemas list them as an enum; a reader must still
# take a code it does not know (a later v1 may add one) as a permanent error.
ERROR_CODES: tuple[str, ...] = tuple(sorted(_codes(JobmeshError)))
# A dead letter's code: an error's, or how the runtime refused the message (a handler that
# kept failing, a dispatch for another node, an executor's event that speaks for another
# node than the one it came from or its attempt is bound to).
DEADLETTER_CODES: tuple[str, ...] = (*ERROR_CODES, "handler_error", "wrong_node", "forged")


class DeadLetter(Struct, frozen=True, kw_only=True, tag="deadletter"):
    """Published to ``jobmesh.v1.deadletter.<service>`` when a message is terminated."""

    service: Annotated[str, Meta(description="The service that refused the message.")]
    subject: Annotated[str, Meta(description="The subject the refused message came on.")]
    code: Annotated[
        str,
        Meta(
            description="Why it was refused: a stable code (an ErrorReply code, or handler_error / wrong_node / forged).",
            extra_json_schema={"enum": list(DEADLETTER_CODES)},
        ),
    ]
    reason: Annotated[str, Meta(description="Why it was refused, in words, naming the field when one is at fault.")]
    size: Annotated[int, Meta(description="The refused payload's size, in bytes.")]
    payload_head: Annotated[
        str, Meta(description="The payload's first bytes, decoded lossily as UTF-8, for a person to see what came.")
    ]
    stream_seq: Annotated[
        int, Meta(description="The refused message's sequence in its stream; 0 for a request (core NATS has none).")
    ] = 0
    deliveries: Annotated[
        int, Meta(description="How often it was delivered before it was refused; 0 when unknown.")
    ] = 0
    at: Annotated[float, Meta(description="When it was refused. Unix time, in seconds.")] = 0.0
    payload_b64: Annotated[
        str,
        Meta(
            description="The whole payload, base64, for `jobmesh dead-letters replay`; empty when it was too large to keep."
        ),
    ] = ""
    rule: Annotated[
        str,
        Meta(
            description="The trigger rule that could not make a job of it (the event itself was fine); empty otherwise."
        ),
    ] = ""
    event_id: Annotated[
        str,
        Meta(description="That event's identity, which a replay carries (header Jobmesh-Event-Id); empty otherwise."),
    ] = ""
