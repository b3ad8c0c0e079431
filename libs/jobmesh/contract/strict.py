"""Unknown-field checks for what users send.

Events and records accept unknown fields (msgspec's default), so an older service reads a
newer writer's messages during a rolling upgrade. A *user's* request is different: a field we
do not know is almost always a typo ("prority", "queue_timout"), and silently ignoring it
would run the job without what the user asked for. Request structs therefore declare
``forbid_unknown_fields``, and the types they share with events (``JobSpec`` ...) are checked
against a strict twin: the same structs, fields, tags and constraints, with
``forbid_unknown_fields`` on, built once from the real types so the two can never drift
apart. Checking is then one decode in msgspec's C code (``Codec`` does it for every request).
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Any

import msgspec

from jobmesh.errors import InvalidMessage


@functools.cache
def strict_twin(kind: Any) -> Any:
    """The strict counterpart of a type: every struct inside forbids unknown fields."""
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return _strict_struct(kind)
    origin = typing.get_origin(kind)
    if origin is typing.Annotated:
        inner, *metadata = typing.get_args(kind)
        return typing.Annotated[(strict_twin(inner), *metadata)]
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(lambda a, b: a | b, (strict_twin(a) for a in typing.get_args(kind)))
    if origin in (list, tuple, set, frozenset, dict):
        return origin[tuple(strict_twin(a) for a in typing.get_args(kind))]
    return kind


def _strict_struct(kind: type[msgspec.Struct]) -> type[msgspec.Struct]:
    config = kind.__struct_config__
    hints = typing.get_type_hints(kind, include_extras=True)
    if config.forbid_unknown_fields and all(
        strict_twin(hints[f.name]) == hints[f.name] for f in msgspec.structs.fields(kind)
    ):
        # Strict already, all the way down (a request struct): it is its own twin, so its
        # codec decodes once.
        return kind
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(kind):
        if f.default is not msgspec.NODEFAULT:
            default = f.default
            if isinstance(default, msgspec.Struct):
                # A struct default must be an instance of the twin type.
                default = msgspec.convert(msgspec.to_builtins(default), strict_twin(type(default)))
            fields.append((f.name, strict_twin(hints[f.name]), default))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, strict_twin(hints[f.name]), msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, strict_twin(hints[f.name])))
    twin = msgspec.defstruct(
        kind.__name__,
        fields,
        tag=config.tag,
        tag_field=config.tag_field,
        kw_only=True,
        frozen=config.frozen,
        forbid_unknown_fields=True,
        rename={f.name: f.encode_name for f in msgspec.structs.fields(kind) if f.name != f.encode_name} or None,
    )
    twin.__doc__ = kind.__doc__  # the schema of a request describes its types as the real ones do
    return twin


@functools.lru_cache(maxsize=32)
def _decoder(kind: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(strict_twin(kind))


def reject_unknown_fields(payload: bytes, kind: Any) -> None:
    """Raise ``InvalidMessage`` naming the first field of ``payload`` that ``kind`` does not declare.

    Call after a successful typed decode (so every other problem was already reported).
    """
    try:
        _decoder(kind).decode(payload)
    except msgspec.ValidationError as exc:
        message = str(exc)
        # msgspec: "Object contains unknown field `prority` - at `$.jobs[0].spec`"
        if "unknown field" in message:
            name = message.split("`")[1]
            where = message.rsplit("`$", 1)[1].rstrip("`").lstrip(".") if "`$" in message else ""
            path = f"{where}.{name}" if where else name
            raise InvalidMessage(f"unknown field: {path} - at `$.{path}`", field=path) from exc
        raise InvalidMessage(message) from exc
