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

from jobmesh.errors import InvalidExpression

# The longest expression text a rule may hold (also the contract's limit).
MAX_EXPRESSION = 4096
# CEL always terminates, but a comprehension inside a comprehension, or one whose body
# scans the event again (`event.items.all(x, x in event.items)`), is quadratic in the
# event's size, and an evaluation holds the GIL: one such rule would stall a replica for
# minutes on a large event. So a comprehension may not hold another, its body may read
# only its own variable and small scalars, and an expression holds a few at most. Each
# pass is then linear in the data, and an event is at most JOBMESH_MAX_MESSAGE_BYTES.
COMPREHENSIONS = frozenset({"all", "exists", "exists_one", "map", "filter"})
MAX_COMPREHENSIONS = 8
# What a comprehension's body may read besides its own variables: small scalars (the event's
# data, a batch's events, a finished job, the headers, the subject and the burst key can
# all be large) and CEL's literals and operators.
BODY_SCALARS = frozenset({"count", "id", "time", "tick"})
BODY_NAMES = BODY_SCALARS | {"true", "false", "null", "in"}
QUOTES = "'" + '"'
# cel-rust builds the result of map() and filter() by copying it once per item, so they
# are quadratic in their list: ~90 ms for 1,000 items, seconds for 8,000 (all() and
# exists() are linear). An expression that maps or filters refuses an event holding a
# longer list; 1,000 is also the largest batch.
MAX_BUILT_LIST = 1000
BUILDERS = frozenset({"map", "filter"})
BACKSLASH = chr(92)


# The error lives in the shared tree, so a client raises it by its code too.
ExpressionError = InvalidExpression


class Bindings:
    """The variables of one event (``event``, ``subject``, ``headers``, ...), converted to
    CEL once and shared by every expression evaluated for that event.

    Args:
        variables: name to plain JSON-like value.
    """

    __slots__ = ("_context", "_longest", "variables")

    def __init__(self, variables: dict[str, Any]) -> None:
        self.variables = variables
        self._context = cel.Context()
        self._context.update(variables)
        self._longest = -1

    @property
    def longest_list(self) -> int:
        """The length of the longest list (or map) anywhere in the variables (walked once,
        when an expression that maps or filters first asks)."""
        if self._longest < 0:
            self._longest = _longest_list(self.variables)
        return self._longest


def _longest_list(value: Any) -> int:
    longest = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            longest = max(longest, len(item))  # map() and filter() over a map walk its keys
            stack.extend(item.values())
        elif isinstance(item, list):
            longest = max(longest, len(item))
            stack.extend(item)
    return longest


class Expression:
    """One compiled CEL expression.

    Args:
        text: the CEL source.
        field: the rule field it came from (``filter``, ``job.runtime.input.name``), for errors.

    Raises:
        ExpressionError: when ``text`` does not parse.
    """

    __slots__ = ("_builds", "_program", "comprehensions", "field", "text")

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
        problem, self.comprehensions, self._builds = _comprehensions(_tokens(text))
        if problem:
            raise ExpressionError(f"{field}: {text!r}: {problem}", field=field)

    def evaluate(self, bindings: Bindings) -> Any:
        """The expression's value for one event.

        Raises:
            ExpressionError: when evaluation fails; the message names the field and says why.
        """
        if self._builds and bindings.longest_list > MAX_BUILT_LIST:
            raise ExpressionError(
                f"{self.field}: {self.text!r}: map() and filter() take lists of at most {MAX_BUILT_LIST} items; "
                f"this event holds one of {bindings.longest_list}",
                field=self.field,
            )
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


def _tokens(text: str) -> list[str]:
    """CEL's tokens as far as the comprehension check needs them: identifiers, and each
    punctuation character; a string literal (any quoting, raw or not) is one token, and a
    ``//`` comment is none (a quote or a dot inside one must not fool the check)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        if text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        j = i
        while j < n and j - i < 2 and text[j] in "rRbB":
            j += 1
        if j < n and text[j] in QUOTES:
            raw = "r" in text[i:j].lower()
            triple = text[j : j + 3]
            quote = triple if triple in (QUOTES[0] * 3, QUOTES[1] * 3) else text[j]
            k = j + len(quote)
            while k < n and not text.startswith(quote, k):
                k += 2 if (text[k] == BACKSLASH and not raw) else 1
            out.append("<string>")
            i = k + len(quote)
            continue
        if c.isalpha() or c == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            out.append(text[i:j])
            i = j
            continue
        out.append(c)
        i += 1
    return out


def _comprehensions(tokens: list[str]) -> tuple[str, int, bool]:
    """Walk an expression's tokens: (the first problem or "", how many comprehensions it
    holds, whether one of them is a map() or filter())."""
    depth = 0
    # Each open comprehension: the bracket depth of its "(", whether its body (what follows
    # the variable) has begun, and its variables.
    opened: list[tuple[int, list[bool], set[str]]] = []
    closed_comprehension = False  # the last ")" closed a comprehension's call
    count = 0
    builds = False
    for i, token in enumerate(tokens):
        in_body = any(body[0] for _, body, _ in opened)
        after_dot = i > 0 and tokens[i - 1] == "."
        if token in ("(", "[", "{"):
            depth += 1
            if token == "(" and i >= 2 and tokens[i - 1] in COMPREHENSIONS and tokens[i - 2] == ".":
                name = tokens[i - 1]
                if in_body:
                    return f"a comprehension ({name}) may not be inside another", count, builds
                if name in BUILDERS:
                    builds = True
                    target = tokens[i - 3] if i >= 3 else ""
                    if not (target.isidentifier() or (target == ")" and closed_comprehension_before(tokens, i - 3))):
                        return (
                            f"{name}() applies to a field or to another comprehension's result, "
                            "not to a list built in the expression",
                            count,
                            builds,
                        )
                count += 1
                if count > MAX_COMPREHENSIONS:
                    return f"an expression may hold at most {MAX_COMPREHENSIONS} comprehensions", count, builds
                variable = tokens[i + 1] if i + 1 < len(tokens) else ""
                opened.append((depth, [False], {variable}))
            closed_comprehension = False
        elif token in (")", "]", "}"):
            closed_comprehension = bool(token == ")" and opened and opened[-1][0] == depth)
            if closed_comprehension:
                opened.pop()
            depth -= 1
        elif token == "," and opened and opened[-1][0] == depth:
            body = opened[-1][1]
            if not body[0] and i + 2 < len(tokens) and tokens[i + 2] == ",":
                opened[-1][2].add(tokens[i + 1])  # a two-variable form: all(k, v, ...)
            body[0] = True
        elif in_body and token.isidentifier() and not after_dot:
            called = i + 1 < len(tokens) and tokens[i + 1] == "("
            variables = set().union(*(names for _, _, names in opened))
            if not called and token not in variables and token not in BODY_NAMES:
                return (
                    f"a comprehension's body may read only its own variable and {', '.join(sorted(BODY_SCALARS))}, "
                    f"not {token!r} (a large value read once per item would make the rule quadratic)",
                    count,
                    builds,
                )
        if token not in (")", "]", "}") and token not in ("(", "[", "{"):
            closed_comprehension = False
    return "", count, builds


def closed_comprehension_before(tokens: list[str], close: int) -> bool:
    """Whether the ")" at ``close`` ends a comprehension's call (``x.filter(...)``)."""
    depth = 0
    for j in range(close, -1, -1):
        if tokens[j] == ")":
            depth += 1
        elif tokens[j] == "(":
            depth -= 1
            if depth == 0:
                return j >= 2 and tokens[j - 1] in COMPREHENSIONS and tokens[j - 2] == "."
    return False


def comprehension_problem(text: str) -> str:
    """Why an expression's comprehensions could cost more than a pass over the data ("" when
    they cannot): one nested in another, a body that reads anything but its own variable and
    small scalars, map() or filter() over a list the expression builds, or too many."""
    return _comprehensions(_tokens(text))[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    # The parser's message is several lines (the error, the text, a caret); keep them on one.
    return " | ".join(lines[:3]) if lines else text
