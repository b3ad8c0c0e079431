"""Trigger rules on the client side: rule and event files read into their wire form.

A rule file is YAML or JSON (``.json`` is read as JSON, ``.yaml``/``.yml`` as YAML, any
other name by its content). It is decoded into a ``TriggerRule`` here, before anything is
sent, so a typo or a wrong type is reported with the file and the field at once; the
trigger service decodes and checks it again and also compiles its CEL expressions, its
job template and its subjects, which only it can.

What decides whether ``jobmesh trigger test RULE`` means a stored rule or a file is here
too (``is_rule_file``), pure, so it is tested without a disk.
"""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import yaml

from jobmesh.contract.messages.v1 import SampleEvent, TriggerRule, TriggerSource
from jobmesh.contract.strict import strict_twin
from jobmesh.errors import InvalidMessage, UsageError

__all__ = [
    "RULE_FILE_SUFFIXES",
    "event_from",
    "is_rule_file",
    "load_document",
    "read_rule_file",
    "rule_from_data",
    "sample_event_from_data",
]

RULE_FILE_SUFFIXES = (".yaml", ".yml", ".json")
# A rule file is a few KiB; anything much larger is a wrong file, not a rule.
MAX_FILE_BYTES = 1024 * 1024
S = TypeVar("S", bound=msgspec.Struct)
SOURCE_KINDS = tuple(kind.__struct_config__.tag for kind in typing.get_args(TriggerSource))


def is_rule_file(arg: str, exists: Callable[[str], bool] = os.path.exists) -> bool:
    """Whether ``jobmesh trigger test RULE`` names a rule file rather than a stored rule.

    A rule's name holds no dot or slash, so an existing path or a name with a rule file's
    suffix cannot be a stored rule's name.

    Args:
        arg: what was given as RULE.
        exists: tells whether a path exists (injected for tests).

    Returns:
        True for a file, False for a stored rule's name.
    """
    return arg.lower().endswith(RULE_FILE_SUFFIXES) or exists(arg)


def load_document(path: str | Path, field: str = "file") -> Any:
    """The data a YAML or JSON file holds.

    Args:
        path: the file; ``.json`` is JSON, ``.yaml``/``.yml`` YAML, anything else JSON when
            it starts with ``{`` or ``[`` and YAML otherwise.
        field: the command-line argument named in errors.

    Returns:
        The decoded builtin data (dicts, lists, strings, numbers...).

    Raises:
        UsageError: the file cannot be read, is too large, is empty, or is not valid YAML
            or JSON (the message names the file and the line).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}", field=field) from exc
    if len(raw) > MAX_FILE_BYTES:
        raise UsageError(f"{path} is larger than {MAX_FILE_BYTES} bytes: not a rule or event file", field=field)
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text (byte {exc.start})", field=field) from exc
    if not text.strip():
        raise UsageError(f"{path} is empty", field=field)
    suffix = Path(path).suffix.lower()
    as_json = suffix == ".json" or (suffix not in (".yaml", ".yml") and text.lstrip()[:1] in ("{", "["))
    if as_json:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", field=field
            ) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: invalid YAML{_yaml_where(exc)}: {_yaml_problem(exc)}", field=field) from exc


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # PyYAML's str() spans several lines with a caret drawing; its problem is the short part.
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if problem:
        return f"{problem} ({context})" if context else str(problem)
    return " ".join(str(exc).split())


def rule_from_data(data: Any, source: str = "rule") -> TriggerRule:
    """A rule's data (a file's mapping) as a ``TriggerRule``, checked as strictly as the wire.

    Unknown fields are refused (a misspelt ``fliter`` would otherwise be dropped and the
    rule would match every event); the job template inside is the service's to check.

    Args:
        data: the decoded file.
        source: where it came from (the file's name), at the start of every error.

    Returns:
        The rule.

    Raises:
        InvalidMessage: ``data`` is not a mapping, or a field is missing, unknown or of
            the wrong type or value; ``field`` names it (``source.subjects[0]``).
    """
    if not isinstance(data, Mapping):
        raise InvalidMessage(f"{source}: a rule must be a mapping of fields (name, source, job...), not {_kind(data)}")
    return strict_from_data(data, TriggerRule, source)


def sample_event_from_data(data: Any, source: str = "event") -> SampleEvent:
    """An event file's mapping (``{"subject", "data", "headers"}``) as a ``SampleEvent``.

    Args:
        data: the decoded file.
        source: where it came from, at the start of every error.

    Returns:
        The event.

    Raises:
        InvalidMessage: ``data`` is not a mapping, or holds an unknown or mistyped field.
    """
    if not isinstance(data, Mapping):
        raise InvalidMessage(
            f"{source}: an event must be a mapping with subject, data and headers, not {_kind(data)}"
            " (give --subject to send the file as the event's data)"
        )
    if data and not data.keys() & {"subject", "data", "headers"}:
        # Most likely the event's data itself, given without --subject.
        raise InvalidMessage(
            f"{source}: an event holds subject, data and headers, and this has none of them"
            " (give --subject to send the file as the event's data)"
        )
    return strict_from_data(data, SampleEvent, source)


def read_rule_file(path: str | Path) -> TriggerRule:
    """The rule in a YAML or JSON file.

    Args:
        path: the file.

    Returns:
        The rule, checked locally (fields, types, constraints; not CEL or templates).

    Raises:
        UsageError: the file cannot be read or parsed.
        InvalidMessage: it does not hold a valid rule (the message names the file and field).
    """
    return rule_from_data(load_document(path), str(path))


def event_from(
    data: Any, subject: str = "", headers: Sequence[str] = (), sample: SampleEvent | None = None, source: str = "event"
) -> SampleEvent | None:
    """The event ``jobmesh trigger test`` sends, from an event file and the flags.

    Args:
        data: the event file's decoded content, None when no file was given.
        subject: ``--subject``: the file is then only the event's data, and this its subject.
        headers: ``--header K=V`` flags, over the file's (or the sample's) headers.
        sample: the rule's sample, the base when no file is given (None when unknown).
        source: the event file's name, for errors.

    Returns:
        The event; None when nothing was given, so the service uses the rule's sample.

    Raises:
        UsageError: a header flag without ``=``.
        InvalidMessage: the file is not an event (without ``--subject``).
    """
    extra = _headers(headers)
    if data is None:
        if not subject and not extra:
            return None
        base = sample or SampleEvent()
        return SampleEvent(subject=subject or base.subject, data=base.data, headers={**base.headers, **extra})
    if subject:
        return SampleEvent(subject=subject, data=data, headers=extra)
    event = sample_event_from_data(data, source)
    return msgspec.structs.replace(event, headers={**event.headers, **extra}) if extra else event


def _headers(flags: Sequence[str]) -> dict[str, str]:
    out = {}
    for flag in flags:
        key, eq, value = flag.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--header {flag!r} is not KEY=VALUE", field="header")
        out[key.strip()] = value
    return out


def strict_from_data(data: Mapping[str, Any], kind: type[S], source: str) -> S:
    try:
        value = msgspec.convert(data, kind)
        # The wire types accept unknown fields (rolling upgrades); a person's file should not.
        msgspec.convert(data, strict_twin(kind))
    except msgspec.ValidationError as exc:
        message, field = _described(str(exc))
        raise InvalidMessage(f"{source}: {message}", field=field) from exc
    return value


def _described(message: str) -> tuple[str, str | None]:
    """msgspec's "Expected ... - at `$.source.subjects[0]`" as a message and a field path."""
    where = ""
    if "`$" in message:
        message, _, tail = message.rpartition(" - at `$")
        where = tail.rstrip("`").lstrip(".")
    if message.startswith("Object contains unknown field"):
        name = message.split("`")[1]
        path = f"{where}.{name}" if where else name
        return f"unknown field {path}", path
    if message.startswith("Object missing required field"):
        name = message.split("`")[1]
        path = f"{where}.{name}" if where else name
        return f"missing required field {path}", path
    if where == "source.kind" and message.startswith("Invalid value"):
        message += f" (one of {', '.join(SOURCE_KINDS)})"
    return (f"{where}: {message}" if where else message), where or None


def _kind(data: Any) -> str:
    if data is None:
        return "nothing"
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(data), type(data).__name__
    )
