"""Encoding and decoding of wire messages, with errors that name the field.

Two rules, one per kind of message (docs/integrations.md, "The rules every message follows"):

* **Requests are strict.** A request struct declares ``forbid_unknown_fields=True``; its
  codec refuses a field it does not know anywhere in the request (a typo such as
  ``prority`` must not run a job without what was asked), and refuses a request without its
  ``type`` tag. Nested types that events share (``JobSpec`` ...) stay lenient in their own
  declaration, so a request's nested objects are checked by a second decode against the
  strict twin (:mod:`jobmesh.contract.strict`). Requests are rare next to events, so that
  second pass is affordable; a request with nothing lenient inside is decoded once.
* **Events, replies and records are lenient** to unknown fields, so an older reader accepts
  a newer writer's additions during a rolling upgrade. Their ``type`` tag is still
  required. Lifecycle events are decoded at a high rate: one decode, never two.
"""

from __future__ import annotations

import functools
import re
import types
import typing
from typing import Any, Generic, TypeVar

import msgspec

from jobmesh.contract.strict import strict_twin
from jobmesh.errors import InvalidMessage, OversizedMessage

T = TypeVar("T")

_encoder = msgspec.json.Encoder()

# msgspec names the field of these errors in backquotes, and the object it is in after "- at".
_NAMED_FIELD = re.compile(r"^Object (missing required|contains unknown) field `([^`]*)`")
# No JSON string a sender means as a type is this; see _tag_required.
_NO_TAG = "\x00"


def encode(message: Any) -> bytes:
    """Encode a message struct as JSON bytes."""
    return _encoder.encode(message)


class Codec(Generic[T]):
    """One typed decoder for the messages a consumer accepts.

    Args:
        kind: a struct type or a union of tagged struct types.
        max_bytes: payloads larger than this are refused before decoding.
        strict: refuse unknown fields anywhere in the message; by default, whether ``kind``
            declares ``forbid_unknown_fields`` (every request struct does).
    """

    def __init__(self, kind: Any, max_bytes: int = 256 * 1024, strict: bool | None = None) -> None:
        self._kind = kind
        self._decoder = msgspec.json.Decoder(_tag_required(kind))
        self._sentinel = _sentinel_of(kind)
        strict = declares_strict(kind) if strict is None else strict
        twin = strict_twin(kind) if strict else kind
        self._strict: msgspec.json.Decoder[Any] | None = msgspec.json.Decoder(twin) if twin is not kind else None
        self.max_bytes = max_bytes

    def decode(self, payload: bytes) -> T:
        """Decode and validate ``payload``.

        Raises:
            OversizedMessage: when the payload is larger than ``max_bytes``.
            InvalidMessage: when it is not valid JSON or fails validation; ``field`` names
                the offending field (``jobs[0].spec.priority``; the missing or unknown one
                itself, ``type`` for a missing or wrong tag).
        """
        if len(payload) > self.max_bytes:
            raise OversizedMessage(f"message of {len(payload)} bytes exceeds the limit of {self.max_bytes}")
        try:
            decoded: T = self._decoder.decode(payload)
            if self._sentinel is not None and type(decoded) is self._sentinel:
                raise InvalidMessage(f"Invalid value {_NO_TAG!r} - at `$.type`", field="type")
            if self._strict is not None:
                self._strict.decode(payload)
            return decoded
        except msgspec.ValidationError as exc:
            raise invalid(str(exc)) from exc
        except msgspec.DecodeError as exc:
            raise InvalidMessage(f"malformed JSON: {exc}") from exc
        except RecursionError as exc:
            # A value of type Any (an event, a handler's input) may nest arbitrarily; msgspec
            # stops at its recursion limit, and so must we, with a refusal, not a crash.
            raise InvalidMessage("malformed JSON: nested too deeply") from exc


def invalid(message: str) -> InvalidMessage:
    """The ``InvalidMessage`` for one of msgspec's validation messages, naming the field.

    Args:
        message: msgspec's text, e.g. "Object missing required field `spec` - at `$.jobs[0]`".

    Returns:
        The error; an unknown field is reported as ``unknown field: jobs[0].spec.prority``.
    """
    path = field_of(message)
    if path is not None and message.startswith("Object contains unknown field"):
        return InvalidMessage(f"unknown field: {path} - at `$.{path}`", field=path)
    return InvalidMessage(message, field=path)


def field_of(message: str) -> str | None:
    """The path of the field a msgspec validation message is about (None when it names none).

    Args:
        message: msgspec's text; it ends in "- at `$.path`" unless the root is meant, and
            names a missing or unknown field in backquotes.

    Returns:
        ``jobs[0].spec.priority``-style path, or None.
    """
    where = message.rsplit("`$", 1)[1].rstrip("`").lstrip(".") if "`$" in message else ""
    named = _NAMED_FIELD.match(message)
    if named:
        name = named.group(2)
        return f"{where}.{name}" if where else name
    return where or None


def declares_strict(kind: Any) -> bool:
    """Whether ``kind`` (a struct, or a union of them) declares ``forbid_unknown_fields``.

    Args:
        kind: a struct type or a union.

    Returns:
        True when it, or every member of the union, is declared strict.
    """
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return bool(kind.__struct_config__.forbid_unknown_fields)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return all(declares_strict(k) for k in typing.get_args(kind))
    return False


def _tag_required(kind: Any) -> Any:
    """``kind`` as msgspec must decode it for its tag to be required.

    msgspec checks the tag of a tagged struct decoded on its own, but does not require it;
    inside a tagged union the tag is required, as it picks the member. A union with a member
    that no sender can mean (its tag is a NUL character) requires the tag at no cost.
    """
    sentinel = _sentinel_of(kind)
    return kind if sentinel is None else kind | sentinel


def _sentinel_of(kind: Any) -> type[msgspec.Struct] | None:
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct) and kind.__struct_config__.tag is not None:
        return _sentinel(kind.__struct_config__.tag_field)
    return None


@functools.cache
def _sentinel(tag_field: str) -> type[msgspec.Struct]:
    return msgspec.defstruct("NoSuchMessage", [], tag=_NO_TAG, tag_field=tag_field, frozen=True)
