"""Job templates: a job spec whose strings hold ``{{ CEL }}`` placeholders.

A string that is exactly one placeholder (``"{{ event.rows }}"``) takes the expression's
value, so a number stays a number and a list stays a list. Any other string has each
placeholder replaced by its value as text (``"reindex {{ event.name }}"``). Keys are never
templated. A placeholder ends at the first ``}}``.

The template is compiled once when its rule is loaded; rendering walks a tree of compiled
parts, and a part without placeholders is returned as it is.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from jobmesh.contract.codec import Codec
from jobmesh.contract.messages.v1 import JobSpec
from jobmesh.contract.strict import reject_unknown_fields
from jobmesh.errors import InvalidMessage
from jobmesh.trigger.expressions import Bindings, Expression, ExpressionError

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
# Each placeholder is evaluated for every event; a template of thousands would make one
# event cost milliseconds of the replica's single thread.
MAX_PLACEHOLDERS = 256
_SPEC: Codec[JobSpec] = Codec(JobSpec, 1024 * 1024)


class _Whole:
    """A string that is one placeholder: its value as it is."""

    __slots__ = ("expr",)

    def __init__(self, expr: Expression) -> None:
        self.expr = expr

    def render(self, bindings: Bindings) -> Any:
        return self.expr.evaluate(bindings)


class _Text:
    """A string with placeholders inside: the values joined as text."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[str | Expression]) -> None:
        self.parts = parts

    def render(self, bindings: Bindings) -> str:
        return "".join(p if isinstance(p, str) else as_text(p.evaluate(bindings)) for p in self.parts)


class _Map:
    __slots__ = ("items",)

    def __init__(self, items: list[tuple[str, Any]]) -> None:
        self.items = items

    def render(self, bindings: Bindings) -> dict[str, Any]:
        return {k: _render(v, bindings) for k, v in self.items}


class _List:
    __slots__ = ("items",)

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def render(self, bindings: Bindings) -> list[Any]:
        return [_render(v, bindings) for v in self.items]


_Node = (_Whole, _Text, _Map, _List)


def _render(node: Any, bindings: Bindings) -> Any:
    return node.render(bindings) if isinstance(node, _Node) else node


def _expressions(node: Any) -> list[Expression]:
    """Every expression of a compiled template."""
    if isinstance(node, _Whole):
        return [node.expr]
    if isinstance(node, _Text):
        return [p for p in node.parts if isinstance(p, Expression)]
    if isinstance(node, _Map):
        return [e for _, item in node.items for e in _expressions(item)]
    if isinstance(node, _List):
        return [e for item in node.items for e in _expressions(item)]
    return []


def as_text(value: Any) -> str:
    """How a value reads inside a string: strings as they are, true/false, JSON for the rest."""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def _compile(value: Any, field: str) -> tuple[Any, int]:
    """Compile one value; returns the node (or the constant) and how many placeholders it holds."""
    if isinstance(value, str):
        pieces = _PLACEHOLDER.split(value)
        if len(pieces) == 1:
            return value, 0
        if len(pieces) == 3 and pieces[0] == "" and pieces[2] == "":
            return _Whole(Expression(pieces[1], field)), 1
        parts: list[str | Expression] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                parts.append(Expression(piece, field))
            elif piece:
                parts.append(piece)
        return _Text(parts), len(pieces) // 2
    if isinstance(value, dict):
        items = []
        count = 0
        for key, item in value.items():
            node, n = _compile(item, f"{field}.{key}")
            items.append((key, node))
            count += n
        return (_Map(items), count) if count else (value, 0)
    if isinstance(value, list):
        nodes = []
        count = 0
        for i, item in enumerate(value):
            node, n = _compile(item, f"{field}[{i}]")
            nodes.append(node)
            count += n
        return (_List(nodes), count) if count else (value, 0)
    return value, 0


class JobTemplate:
    """A rule's ``job``, compiled.

    Args:
        job: the template as the rule holds it (a job spec's JSON shape).
        field: where it sits in the rule, for errors (``job``).

    Raises:
        ExpressionError: when a placeholder does not compile; names its field.
    """

    __slots__ = ("_root", "comprehensions", "field", "placeholders")

    def __init__(self, job: dict[str, Any], field: str = "job") -> None:
        self.field = field
        self._root, self.placeholders = _compile(job, field)
        self.comprehensions = sum(e.comprehensions for e in _expressions(self._root))
        if self.placeholders > MAX_PLACEHOLDERS:
            raise ExpressionError(
                f"{field}: the template holds {self.placeholders} placeholders; at most {MAX_PLACEHOLDERS}", field=field
            )

    def render(self, bindings: Bindings) -> dict[str, Any]:
        """The job spec's JSON shape for one event.

        Raises:
            ExpressionError: when a placeholder fails for this event.
        """
        rendered = _render(self._root, bindings)
        return dict(rendered)

    def spec(self, bindings: Bindings) -> JobSpec:
        """The typed job spec for one event, checked field by field (types, ranges, unknown
        fields) like a submit; the relations between fields are the caller's to check
        (``jobmesh.contract.validation.validate_spec``).

        Raises:
            ExpressionError: when a placeholder fails.
            InvalidMessage: when the result is not a valid job spec; names the field
                under ``job`` (``job.priority``).
        """
        return build_spec(self.render(bindings), self.field)


def build_spec(rendered: dict[str, Any], field: str = "job") -> JobSpec:
    """Decode a rendered template into a ``JobSpec``.

    Raises:
        InvalidMessage: naming the field under ``field``.
    """
    try:
        payload = msgspec.json.encode(rendered)
    except (TypeError, OverflowError) as exc:
        raise InvalidMessage(f"{field}: the template gave a value JSON cannot hold: {exc}", field=field) from exc
    try:
        spec = _SPEC.decode(payload)
        reject_unknown_fields(payload, JobSpec)
    except InvalidMessage as exc:
        inner = exc.field or ""
        where = f"{field}.{inner}" if inner else field
        message = str(exc).replace("`$.", f"`$.{field}.").replace("`$`", f"`$.{field}`")
        raise InvalidMessage(f"{where}: {message}", field=where) from exc
    return spec
