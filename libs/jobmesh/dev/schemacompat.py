"""Compatibility of the v1 message schemas with the last released ones.

Within v1 a change is additive only (docs/integrations.md, "Evolution within v1"). This module compares
each released schema (``schemas/released/v1/<Message>.json``, kept in the repository as
released) with the current one (``schemas/v1/<Message>.json``) and names every change that
would break a reader or a writer of the released version:

* a message that is gone;
* a field that is gone (at any depth: ``jobs[].spec.priority``; a variant of a tagged union
  by its tag, ``spec.runtime<process>.argv``);
* a field whose JSON type changed (``integer`` to ``string``, or no longer nullable);
* a field that was optional and is now required;
* an enum that lost a value (a tag counts: a renamed ``type`` is a lost value);
* in a request, an enum where there was none: it narrows what the service accepts.

Not breaking, and so accepted: new messages, new optional fields, descriptions, defaults
shown, an enum added to a field of an event, reply or record (it lists the values that
version sends; a reader must still take an unknown value, as a later v1 may add one), and
``additionalProperties: false`` on requests (a field no version declared was never part of
the contract; services refuse it so that a typo is not ignored).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON = Mapping[str, Any]


@dataclass(frozen=True)
class Break:
    """One incompatible change: the message, the field's path and what happened to it."""

    message: str
    field: str
    problem: str

    def __str__(self) -> str:
        where = f" field {self.field}" if self.field else ""
        return f"{self.message}:{where} {self.problem}"


class _Doc:
    """One schema file, with its local ``$ref``s resolved on demand."""

    def __init__(self, document: JSON) -> None:
        self.document = document

    def resolve(self, schema: JSON) -> JSON:
        seen = 0
        while "$ref" in schema and seen < 64:
            target: Any = self.document
            for part in str(schema["$ref"]).removeprefix("#/").split("/"):
                target = target[part]
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
            seen += 1
        return schema


def _variants(doc: _Doc, schema: JSON) -> list[JSON]:
    """The alternatives of a schema (anyOf/oneOf members, resolved), or the schema itself."""
    schema = doc.resolve(schema)
    members = schema.get("anyOf") or schema.get("oneOf")
    if not members:
        return [schema]
    found: list[JSON] = []
    for member in members:
        found.extend(_variants(doc, member))
    return found


def _kinds(doc: _Doc, schema: JSON) -> set[str]:
    """The JSON types a schema allows ("any" when it says nothing)."""
    kinds: set[str] = set()
    for variant in _variants(doc, schema):
        declared = variant.get("type")
        if isinstance(declared, str):
            kinds.add(declared)
        elif isinstance(declared, list):
            kinds.update(declared)
        elif "enum" in variant:
            kinds.update(_enum_kind(v) for v in variant["enum"])
        elif "properties" in variant:
            kinds.add("object")
        else:
            kinds.add("any")
    if "integer" in kinds and "number" in kinds:
        kinds.discard("integer")
    return kinds


def _enum_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return "string" if isinstance(value, str) else "object"


def _enum(doc: _Doc, schema: JSON) -> set[Any] | None:
    """Every value an enum allows, None when some variant is not an enum."""
    values: set[Any] = set()
    for variant in _variants(doc, schema):
        if "enum" not in variant:
            if variant.get("type") == "null":
                continue
            return None
        values.update(json.dumps(v, sort_keys=True) for v in variant["enum"])
    return values


def _objects(doc: _Doc, schema: JSON) -> dict[str, JSON]:
    """The object variants of a schema by a label: "" for a lone object, ``<tag>`` for a
    member of a tagged union (its ``type`` or ``kind`` value)."""
    found: dict[str, JSON] = {}
    objects = [v for v in _variants(doc, schema) if "properties" in v]
    for variant in objects:
        label = ""
        if len(objects) > 1:
            props = variant["properties"]
            for tag in ("type", "kind"):
                values = doc.resolve(props.get(tag, {})).get("enum", [])
                if len(values) == 1:
                    label = f"<{values[0]}>"
                    break
        found[label] = variant
    return found


def _items(doc: _Doc, schema: JSON) -> list[JSON]:
    return [v["items"] for v in _variants(doc, schema) if isinstance(v.get("items"), Mapping)]


def _values(doc: _Doc, schema: JSON) -> list[JSON]:
    return [
        v["additionalProperties"] for v in _variants(doc, schema) if isinstance(v.get("additionalProperties"), Mapping)
    ]


def _compare(
    message: str, path: str, old: tuple[_Doc, JSON], new: tuple[_Doc, JSON], request: bool, depth: int = 0
) -> Iterator[Break]:
    (old_doc, old_schema), (new_doc, new_schema) = old, new
    if depth > 24:  # recursive types: deep enough for any real message
        return
    old_kinds, new_kinds = _kinds(old_doc, old_schema), _kinds(new_doc, new_schema)
    if "any" not in new_kinds and not old_kinds <= new_kinds:
        yield Break(message, path, f"changed type {'|'.join(sorted(old_kinds))} -> {'|'.join(sorted(new_kinds))}")
        return
    old_enum, new_enum = _enum(old_doc, old_schema), _enum(new_doc, new_schema)
    if old_enum is not None and new_enum is not None and not old_enum <= new_enum:
        lost = ", ".join(sorted(old_enum - new_enum))
        yield Break(message, path, f"enum lost {lost}")
    elif old_enum is None and new_enum is not None and request:
        yield Break(message, path, "became an enum in a request (narrows what is accepted)")
    new_objects = _objects(new_doc, new_schema)
    for label, old_object in _objects(old_doc, old_schema).items():
        here = f"{path}{label}"
        new_object = new_objects.get(label)
        if new_object is None:
            yield Break(message, here, "variant removed")
            continue
        old_required, new_required = set(old_object.get("required", ())), set(new_object.get("required", ()))
        new_props = new_object.get("properties", {})
        for name, old_prop in old_object.get("properties", {}).items():
            field = f"{here}.{name}" if here else name
            if name not in new_props:
                yield Break(message, field, "removed")
                continue
            if name in new_required and name not in old_required:
                yield Break(message, field, "became required")
            yield from _compare(message, field, (old_doc, old_prop), (new_doc, new_props[name]), request, depth + 1)
        # A new field that is required at once: a reader of the new schema refuses what an
        # old writer sends (a rolling upgrade would dead-letter it).
        for name in sorted(new_required - set(old_object.get("properties", {}))):
            yield Break(message, f"{here}.{name}" if here else name, "added as required (must have a default)")
    for old_items in _items(old_doc, old_schema):
        for new_items in _items(new_doc, new_schema)[:1]:
            yield from _compare(message, f"{path}[]", (old_doc, old_items), (new_doc, new_items), request, depth + 1)
    for old_values in _values(old_doc, old_schema):
        for new_values in _values(new_doc, new_schema)[:1]:
            yield from _compare(
                message, f"{path}{{}}", (old_doc, old_values), (new_doc, new_values), request, depth + 1
            )


def compare(name: str, released: JSON, current: JSON, request: bool = False) -> list[Break]:
    """Every incompatible change from ``released`` to ``current`` (one message's schemas).

    Args:
        name: the message's name, for the report.
        released: its released schema document.
        current: its current schema document.
        request: whether it is a request (an enum added then narrows what is accepted).

    Returns:
        The breaks found, in field order; empty when ``current`` is compatible.
    """
    old, new = _Doc(released), _Doc(current)
    return list(_compare(name, "", (old, released), (new, current), request))


def check_dir(released_dir: Path, current_dir: Path, requests: frozenset[str] = frozenset()) -> list[Break]:
    """Compare every released message schema with the current one.

    Args:
        released_dir: ``schemas/released/v1``.
        current_dir: ``schemas/v1``.
        requests: the names of the request messages.

    Returns:
        Every break, message by message (sorted by name); empty when all are compatible.
    """
    breaks: list[Break] = []
    for path in sorted(released_dir.glob("*.json")):
        name = path.stem
        target = current_dir / path.name
        if not target.exists():
            breaks.append(Break(name, "", "message removed"))
            continue
        released = json.loads(path.read_text(encoding="utf-8"))
        current = json.loads(target.read_text(encoding="utf-8"))
        breaks.extend(compare(name, released, current, request=name in requests))
    return breaks
