"""Encoding and decoding of wire messages, with errors that name the field."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from jobmesh.errors import InvalidMessage, OversizedMessage

T = TypeVar("T")

_encoder = msgspec.json.Encoder()


def encode(message: Any) -> bytes:
    """Encode a message struct as JSON bytes."""
    return _encoder.encode(message)


class Codec(Generic[T]):
    """One typed decoder for the messages a consumer accepts.

    Args:
        kind: a struct type or a union of tagged struct types.
        max_bytes: payloads larger than this are refused before decoding.
    """

    def __init__(self, kind: Any, max_bytes: int = 256 * 1024) -> None:
        self._decoder = msgspec.json.Decoder(kind)
        self.max_bytes = max_bytes

    def decode(self, payload: bytes) -> T:
        """Decode and validate ``payload``.

        Raises:
            OversizedMessage: when the payload is larger than ``max_bytes``.
            InvalidMessage: when it is not valid JSON or fails validation; the message
                names the field (``$.spec.priority``).
        """
        if len(payload) > self.max_bytes:
            raise OversizedMessage(f"message of {len(payload)} bytes exceeds the limit of {self.max_bytes}")
        try:
            decoded: T = self._decoder.decode(payload)
            return decoded
        except msgspec.ValidationError as exc:
            raise InvalidMessage(str(exc), field=_field_of(str(exc))) from exc
        except msgspec.DecodeError as exc:
            raise InvalidMessage(f"malformed JSON: {exc}") from exc
        except RecursionError as exc:
            # A value of type Any (an event, a handler's input) may nest arbitrarily; msgspec
            # stops at its recursion limit, and so must we, with a refusal, not a crash.
            raise InvalidMessage("malformed JSON: nested too deeply") from exc


def _field_of(message: str) -> str | None:
    # msgspec ends validation messages with "- at `$.path`".
    if "`$" in message:
        return message.rsplit("`$", 1)[1].rstrip("`").lstrip(".") or None
    return None
