"""Registering handlers: the ``@handler("name")`` decorator, what it checks, and the registry.

A handler takes one msgspec struct (its input) and, optionally, a
:class:`~jobmesh.sdk.context.Context`, and returns one msgspec struct (its output); it may
be sync or async. The decorator checks that shape when the module is imported, so a wrong
signature fails the executor's start with the function named, never a job at run time.

The default registry is a module-level one on purpose: ``@handler`` runs at import time of
the user's module, before anything could hand it a registry. A test can pass its own.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from jobmesh.contract.messages.v1 import HandlerInfo
from jobmesh.sdk.context import Context

__all__ = ["DEFAULT_REGISTRY", "Handler", "Registry", "handler", "handler_info"]

F = TypeVar("F", bound=Callable[..., Any])

# The contract's Name: a handler name travels in HandlerRuntime.handler and is a KV key.
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Handler:
    """One registered handler.

    Attributes:
        name: what jobs call it by.
        fn: the function.
        input_type: the struct its input is converted into.
        output_type: the struct it returns.
        takes_context: whether it is called with a :class:`Context` as second argument.
        is_async: whether ``fn`` is a coroutine function.
        doc: the first line of its docstring.
    """

    name: str
    fn: Callable[..., Any]
    input_type: type[msgspec.Struct]
    output_type: type[msgspec.Struct]
    takes_context: bool
    is_async: bool
    doc: str = ""


class Registry:
    """Handlers by name; a name registered twice is refused."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def add(self, entry: Handler) -> None:
        """Register ``entry``.

        Args:
            entry: the handler.

        Raises:
            ValueError: another function already has that name.
        """
        known = self._handlers.get(entry.name)
        if known is not None and known.fn is not entry.fn:
            raise ValueError(
                f"handler name {entry.name!r} is registered twice: by {_where(known.fn)} and by {_where(entry.fn)}"
            )
        self._handlers[entry.name] = entry

    def get(self, name: str) -> Handler | None:
        """The handler called ``name``, or None."""
        return self._handlers.get(name)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._handlers)

    def handlers(self) -> list[Handler]:
        """Every registered handler, by name."""
        return [self._handlers[name] for name in self.names()]


DEFAULT_REGISTRY = Registry()


def handler(name: str, *, registry: Registry | None = None) -> Callable[[F], F]:
    """Register the decorated function as the handler ``name``.

    Args:
        name: what jobs call it by (``HandlerRuntime.handler``): letters, digits, ``_.-``.
        registry: where to register it; the default registry, which the worker reads,
            when omitted.

    Returns:
        The decorator; it returns the function unchanged.

    Raises:
        TypeError: the function does not take one struct (and optionally a Context) or
            does not declare a struct return type.
        ValueError: the name is not valid, or is already taken by another function.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"handler name {name!r} is not valid: 1-128 letters, digits, '_', '.' or '-'")

    def register(fn: F) -> F:
        (registry or DEFAULT_REGISTRY).add(inspect_handler(name, fn))
        return fn

    return register


def inspect_handler(name: str, fn: Callable[..., Any]) -> Handler:
    """Check ``fn``'s signature and describe it as a :class:`Handler`.

    Args:
        name: the handler's name.
        fn: the function.

    Returns:
        The description.

    Raises:
        TypeError: the signature is not ``(Struct[, Context]) -> Struct``.
    """
    where = _where(fn)
    if not callable(fn):
        raise TypeError(f"@handler({name!r}) decorates {fn!r}, which is not a function")
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # a NameError in a string annotation, typically
        raise TypeError(f"handler {name!r} ({where}): its annotations cannot be resolved: {exc}") from exc
    params = list(inspect.signature(fn).parameters.values())
    shape = f"handler {name!r} ({where}) must be declared as (input: SomeStruct[, ctx: Context]) -> OtherStruct"
    if not 1 <= len(params) <= 2 or any(
        p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.default is not p.empty for p in params
    ):
        raise TypeError(f"{shape}; it takes ({', '.join(str(p) for p in params)})")
    input_type = hints.get(params[0].name)
    if not _is_struct(input_type):
        raise TypeError(f"{shape}; its parameter {params[0].name!r} is annotated {input_type!r}, not a msgspec.Struct")
    if len(params) == 2 and hints.get(params[1].name, Context) is not Context:
        raise TypeError(f"{shape}; its second parameter {params[1].name!r} must be a Context")
    output_type = hints.get("return")
    if not _is_struct(output_type):
        raise TypeError(f"{shape}; its return annotation is {output_type!r}, not a msgspec.Struct")
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    return Handler(
        name=name,
        fn=fn,
        input_type=typing.cast(type[msgspec.Struct], input_type),
        output_type=typing.cast(type[msgspec.Struct], output_type),
        takes_context=len(params) == 2,
        is_async=inspect.iscoroutinefunction(fn),
        doc=doc[0] if doc else "",
    )


def handler_info(entry: Handler, module: str, at: float = 0.0) -> HandlerInfo:
    """The record an executor advertises for ``entry`` in ``jm_handlers``.

    Args:
        entry: the handler.
        module: the module (dotted name or file) that defines it, as the executor was told.
        at: when the record is written.

    Returns:
        The record, with the JSON Schemas of its input and output types.
    """
    return HandlerInfo(
        name=entry.name,
        input_type=_qualified(entry.input_type),
        output_type=_qualified(entry.output_type),
        input_schema=msgspec.json.schema(entry.input_type),
        output_schema=msgspec.json.schema(entry.output_type),
        doc=entry.doc,
        module=module,
        at=at,
    )


def _is_struct(kind: object) -> bool:
    return isinstance(kind, type) and issubclass(kind, msgspec.Struct)


def _qualified(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _where(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
