"""``${...}`` placeholders in a workflow step's spec: finding them, and filling them in.

Pure functions, shared by the trigger (which checks the references at submit and fills in
``${input...}`` and ``${workflow.id}``) and the executor (which fills in ``${steps...}`` and
``${item...}`` when the step's job starts, from results it reads by reference).

A reference is a root and a path: ``steps.extract.result.files.0`` is the root
``steps.extract.result`` and the path ``["files", 0]``. A path element that is all digits
indexes a list.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from jobmesh.errors import InvalidSpec

__all__ = ["MISSING", "Ref", "as_text", "fill", "has_placeholders", "parse_ref", "refs_in", "walk"]

# ``${ ... }``: a dotted path of names and indexes, spaces allowed around it.
_PLACEHOLDER = re.compile(r"\$\{\s*([A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*)\s*\}")
_WHOLE = re.compile(r"^\$\{\s*([A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*)\s*\}$")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # what ``walk`` returns for a path that is not there


class Ref:
    """One parsed reference.

    Attributes:
        kind: ``input``, ``steps``, ``item`` or ``workflow``.
        step: the step named (``steps`` only).
        path: the path below the root (below ``result`` for ``steps``).
        text: the reference as written.
    """

    __slots__ = ("kind", "path", "step", "text")

    def __init__(self, kind: str, step: str, path: list[str | int], text: str) -> None:
        self.kind = kind
        self.step = step
        self.path = path
        self.text = text

    def __repr__(self) -> str:
        return f"Ref({self.text!r})"


def parse_ref(text: str) -> Ref:
    """Parse ``steps.x.result.a``, ``item.a``, ``input.a`` or ``workflow.id``.

    Raises:
        InvalidSpec: the reference has an unknown root or shape (the message says which).
    """
    parts = text.split(".")
    path: list[str | int] = [int(p) if p.isdigit() else p for p in parts]
    root = parts[0]
    if root == "steps":
        if len(parts) < 3 or parts[2] not in ("result", "results"):
            raise InvalidSpec(f"${{{text}}}: a step reference is steps.<step>.result[.<field>...]")
        return Ref("steps", parts[1], path[3:], text)
    if root in ("item", "input"):
        return Ref(root, "", path[1:], text)
    if root == "workflow":
        if parts[1:] != ["id"]:
            raise InvalidSpec(f"${{{text}}}: the workflow offers only ${{workflow.id}}")
        return Ref("workflow", "", [], text)
    raise InvalidSpec(f"${{{text}}}: a placeholder starts with steps., item, input or workflow.id")


def as_text(value: Any) -> str:
    """A filled-in value where text goes (inside a string, an argv element, a variable, the
    stdin): a string as it is, anything else as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def has_placeholders(value: Any) -> bool:
    """Whether any string inside ``value`` may hold a placeholder: one encode (in C) spares
    walking a spec that has none, as most of a workflow's steps do not."""
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, list | dict):
        return b"${" in msgspec.json.encode(value)
    return False


def refs_in(value: Any, where: str = "") -> Iterator[tuple[str, Ref]]:
    """Every reference in ``value`` (strings inside lists and dicts), with the field path
    it is at (``runtime.argv[2]``).

    Raises:
        InvalidSpec: a reference is malformed; ``field`` names where.
    """
    if not where and not has_placeholders(value):
        return
    if isinstance(value, str):
        for match in _PLACEHOLDER.finditer(value):
            try:
                yield where, parse_ref(match.group(1))
            except InvalidSpec as exc:
                raise InvalidSpec(str(exc), field=where) from None
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from refs_in(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from refs_in(item, f"{where}.{key}" if where else str(key))


def walk(value: Any, path: list[str | int]) -> Any:
    """The value at ``path`` inside ``value``, or :data:`MISSING`."""
    for part in path:
        if isinstance(value, dict):
            if str(part) not in value:
                return MISSING
            value = value[str(part)]
        elif isinstance(value, list) and isinstance(part, int):
            if part >= len(value):
                return MISSING
            value = value[part]
        else:
            return MISSING
    return value


def fill(value: Any, lookup: Callable[[Ref], Any], kinds: frozenset[str] | None = None) -> Any:
    """``value`` with its placeholders replaced by what ``lookup`` gives for each.

    A string that is exactly one placeholder becomes the value itself; in a longer string
    a placeholder becomes its text (a string as it is, anything else as JSON).

    Args:
        value: a spec's JSON (strings, lists, dicts and scalars).
        lookup: the value of a reference; raises ``InvalidSpec`` when it has none.
        kinds: only references of these kinds are replaced (the rest stay as written).
    """
    if isinstance(value, list | dict) and not has_placeholders(value):
        return value
    return _fill(value, lookup, kinds)


def _fill(value: Any, lookup: Callable[[Ref], Any], kinds: frozenset[str] | None) -> Any:
    if isinstance(value, str):
        if "${" not in value:
            return value
        whole = _WHOLE.match(value)
        if whole:
            ref = parse_ref(whole.group(1))
            return lookup(ref) if kinds is None or ref.kind in kinds else value

        def one(match: re.Match[str]) -> str:
            ref = parse_ref(match.group(1))
            if kinds is not None and ref.kind not in kinds:
                return match.group(0)
            found = lookup(ref)
            return as_text(found)

        return _PLACEHOLDER.sub(one, value)
    if isinstance(value, list):
        return [_fill(item, lookup, kinds) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, lookup, kinds) for key, item in value.items()}
    return value
