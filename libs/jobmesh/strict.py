"""Unknown-field checks for what users send.

Wire types accept unknown fields (msgspec's default), so an older service reads a newer
writer's messages during a rolling upgrade. A *user's* request is different: a field we do
not know is almost always a typo ("prority", "queue_timout"), and silently ignoring it would
run the job without what the user asked for. The trigger therefore checks submit requests
against the declared types before it accepts them.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from msgspec import inspect

from jobmesh.errors import InvalidMessage


def _check(value: Any, info: inspect.Type, path: str, problems: list[str]) -> None:
    if isinstance(info, inspect.StructType) and isinstance(value, dict):
        known = {f.encode_name: f for f in info.fields}
        tag_field = info.tag_field
        for key, item in value.items():
            if key == tag_field:
                continue
            field = known.get(key)
            if field is None:
                problems.append(f"{path}.{key}" if path else key)
            else:
                _check(item, field.type, f"{path}.{key}" if path else key, problems)
    elif isinstance(info, inspect.UnionType):
        if isinstance(value, dict):
            for option in info.types:
                if isinstance(option, inspect.StructType) and option.tag is not None:
                    if value.get(option.tag_field) == option.tag:
                        _check(value, option, path, problems)
                        return
            for option in info.types:
                if isinstance(option, inspect.StructType) and option.tag is None:
                    _check(value, option, path, problems)
                    return
    elif isinstance(info, (inspect.ListType, inspect.TupleType, inspect.VarTupleType)) and isinstance(value, list):
        item_type = getattr(info, "item_type", None)
        if item_type is not None:
            for i, item in enumerate(value):
                _check(item, item_type, f"{path}[{i}]", problems)
    elif isinstance(info, inspect.DictType) and isinstance(value, dict):
        for key, item in value.items():
            _check(item, info.value_type, f"{path}.{key}", problems)
    elif isinstance(info, inspect.Metadata):
        _check(value, info.type, path, problems)


@functools.lru_cache(maxsize=32)
def _info(kind: Any) -> inspect.Type:
    # Building the type tree costs over a millisecond; it never changes for a type.
    return inspect.type_info(kind)


def reject_unknown_fields(payload: bytes, kind: Any) -> None:
    """Raise ``InvalidMessage`` naming the first field of ``payload`` that ``kind`` does not declare.

    Call after a successful typed decode (so the payload is known to be valid JSON).
    """
    problems: list[str] = []
    _check(msgspec.json.decode(payload), _info(kind), "", problems)
    if problems:
        raise InvalidMessage(
            f"unknown field{'s' if len(problems) > 1 else ''}: {', '.join(problems[:5])} - at `$.{problems[0]}`",
            field=problems[0],
        )
