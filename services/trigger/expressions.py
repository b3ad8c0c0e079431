"""CEL expressions: the filter, the keys of bursts and the placeholders of job templates.

CEL (the Common Expression Language, https://cel.dev) is what Kubernetes admission
policies, Envoy and Google IAM use for the same job: it has no side effects, always
terminates, cannot reach the file system or the network, and is typed (``1 + 'a'`` is an
error, not ``'1a'``). We evaluate it with the ``common-expression-language`` package
(cel-rust underneath): an evaluation costs about a microsecond once an event's variables
are bound, against hundreds for the pure-Python implementation. A rule is a user's code
running inside the trigger service, so it must not be Python's ``eval``.

Every expression of one event is evaluated against one :class:`Bindings`, so the event's
variables are converted to CEL once, not once per placeholder.
"""

from __future__ import annotations

from typing import Any

import cel

from jobmesh.errors import InvalidMessage

# The longest expression text a rule may hold (also the contract's limit).
MAX_EXPRESSION = 4096


class ExpressionError(InvalidMessage):
    """Raised when an expression does not compile, or fails on an event (a missing field,
    a type mismatch, a division by zero); names the rule field that holds it."""

    code = "invalid_expression"


class Bindings:
    """The variables of one event (``event``, ``subject``, ``headers``, ...), converted to
    CEL once and shared by every expression evaluated for that event.

    Args:
        variables: name to plain JSON-like value.
    """

    __slots__ = ("_context", "variables")

    def __init__(self, variables: dict[str, Any]) -> None:
        self.variables = variables
        self._context = cel.Context()
        self._context.update(variables)


class Expression:
    """One compiled CEL expression.

    Args:
        text: the CEL source.
        field: the rule field it came from (``filter``, ``job.runtime.input.name``), for errors.

    Raises:
        ExpressionError: when ``text`` does not parse.
    """

    __slots__ = ("_program", "field", "text")

    def __init__(self, text: str, field: str) -> None:
        self.text = text
        self.field = field
        if not text.strip():
            raise ExpressionError(f"{field}: an expression may not be empty", field=field)
        if len(text) > MAX_EXPRESSION:
            raise ExpressionError(f"{field}: an expression may hold at most {MAX_EXPRESSION} characters", field=field)
        try:
            self._program = cel.compile(text)
        except Exception as exc:  # the binding raises ValueError with the parser's message
            raise ExpressionError(f"{field}: not a valid CEL expression: {_first_line(exc)}", field=field) from exc

    def evaluate(self, bindings: Bindings) -> Any:
        """The expression's value for one event.

        Raises:
            ExpressionError: when evaluation fails; the message names the field and says why.
        """
        try:
            return self._program.execute(bindings._context)
        except KeyError as exc:
            raise ExpressionError(
                f"{self.field}: {self.text!r}: no such field {exc.args[0]!r} in this event "
                "(test for it with has(...) first)",
                field=self.field,
            ) from exc
        except Exception as exc:  # the binding's TypeError, RuntimeError, ZeroDivisionError...
            raise ExpressionError(f"{self.field}: {self.text!r}: {_first_line(exc)}", field=self.field) from exc

    def test(self, bindings: Bindings) -> bool:
        """Evaluate a condition (a filter): it must yield a boolean.

        Raises:
            ExpressionError: when it fails or yields something other than true or false.
        """
        value = self.evaluate(bindings)
        if value is True or value is False:
            return value
        raise ExpressionError(
            f"{self.field}: {self.text!r} gave {type(value).__name__} {value!r}; a condition must give true or false",
            field=self.field,
        )

    def key(self, bindings: Bindings) -> str:
        """Evaluate a key (of a debounce, batch or correlation) as text.

        Raises:
            ExpressionError: when it fails or yields a list, a map or null.
        """
        value = self.evaluate(bindings)
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ExpressionError(
            f"{self.field}: {self.text!r} gave {type(value).__name__}; a key must be a string or a number",
            field=self.field,
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    # The parser's message is several lines (the error, the text, a caret); keep them on one.
    return " | ".join(lines[:3]) if lines else text
