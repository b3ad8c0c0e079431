"""Consistency checks of the channel table (:mod:`jobmesh.contract.channels`).

The table is kept by hand, so it can drift from the code it describes. These checks compare
it with the stream configuration (:mod:`jobmesh.contract.streams`), the subject builders and
the message types: every party is known, every parameter is defined, every stored subject
is captured by exactly the stream the row names (and a core-NATS subject by none), every
stream has a channel, and every wire message travels on some channel.

The schema generator refuses an inconsistent table (:func:`checked_channels`);
``tests/test_schemas.py`` also fails on :func:`unmapped_messages`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import msgspec

from jobmesh.contract import streams
from jobmesh.contract.channels import (
    JOB_KINDS,
    PARAMETER_PATTERN,
    PARAMETERS,
    PARTIES,
    Channel,
    Payload,
    channels,
    job_kinds,
    message_name,
    wire_messages,
)


class ChannelTableError(Exception):
    """Raised when the channel table disagrees with subjects, streams or messages."""


def checked_channels() -> list[Channel]:
    """The completed channel table (:func:`jobmesh.contract.channels.channels`), checked.

    Returns:
        The rows, in table order.

    Raises:
        ChannelTableError: when a row names an unknown party, stream, bucket or parameter,
            or its subject would not be stored by (or would wrongly be captured by) a stream;
            the message lists every problem found.
    """
    rows = channels()
    _validate(rows, job_kinds())
    return rows


def unmapped_messages() -> list[str]:
    """Wire messages that no channel carries: each needs a row in ``channels.CHANNELS``.

    Returns:
        Their names, sorted; empty when every wire message has a channel.
    """
    carried = {message_name(m) for c in channels() for m in c.messages}
    return [m.__name__ for m in wire_messages() if m.__name__ not in carried]


def sample_subject(address: str, kinds: Sequence[str] | None = None) -> str:
    """A concrete subject for a template, using each parameter's first example or enum value.

    Args:
        address: a channel address such as ``jobmesh.v1.node.{node_id}.dispatch``.
        kinds: the lifecycle kinds to take ``{kind}`` from; :func:`job_kinds` when omitted.

    Returns:
        The address with every ``{name}`` replaced, e.g. ``jobmesh.v1.node.node-1.dispatch``.
    """

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "kind":
            return (kinds or job_kinds())[0]
        spec = PARAMETERS[name]
        return str((spec.get("examples") or spec["enum"])[0])

    return PARAMETER_PATTERN.sub(value, address)


def _subject_matches(subject: str, pattern: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` one or more trailing tokens."""
    tokens, parts = subject.split("."), pattern.split(".")
    for i, part in enumerate(parts):
        if part == ">":
            return len(tokens) > i
        if i >= len(tokens) or (part != "*" and part != tokens[i]):
            return False
    return len(tokens) == len(parts)


def _validate(rows: Sequence[Channel], kinds: Sequence[str]) -> None:
    """Raise :class:`ChannelTableError` listing every inconsistency of ``rows``."""
    problems: list[str] = []
    keys = [c.key for c in rows]
    if len(set(keys)) != len(keys):
        problems.append("duplicate channel keys")
    by_key = {c.key: c for c in rows}
    kv_buckets = set(streams.BUCKETS_BY_NAME)
    for kind in kinds:
        if kind not in JOB_KINDS:
            problems.append(f"job channel kind {kind!r} is not a lifecycle kind in subjects.py")
    for c in rows:
        for party in (*c.producers, *c.consumers):
            if party not in PARTIES:
                problems.append(f"{c.key}: unknown party {party!r}")
        for message in c.messages:
            if not isinstance(message, Payload) and not (
                isinstance(message, type) and issubclass(message, msgspec.Struct)
            ):
                problems.append(f"{c.key}: {message!r} is neither a struct nor a Payload")
        if c.reply is not None and (c.reply not in by_key or by_key[c.reply].address is not None):
            problems.append(f"{c.key}: reply channel {c.reply!r} must be a row with address None")
        if c.address is None:
            continue
        for name in PARAMETER_PATTERN.findall(c.address):
            if name not in PARAMETERS:
                problems.append(f"{c.key}: parameter {{{name}}} has no definition in PARAMETERS")
        subject = sample_subject(c.address, kinds)
        captured_by = [
            spec.name for spec in streams.STREAMS if any(_subject_matches(subject, f) for f in spec.subjects)
        ]
        if c.kv_bucket is not None:
            if c.kv_bucket not in kv_buckets or c.stream != f"KV_{c.kv_bucket}":
                problems.append(f"{c.key}: unknown KV bucket {c.kv_bucket!r} or stream {c.stream!r}")
        elif c.stream is None:
            if captured_by:
                problems.append(f"{c.key}: core-NATS subject {subject} is captured by stream(s) {captured_by}")
        elif c.stream not in streams.STREAMS_BY_NAME:
            problems.append(f"{c.key}: stream {c.stream} is not provisioned (contract.streams.STREAMS)")
        elif captured_by != [c.stream]:
            problems.append(f"{c.key}: subject {subject} is stored by {captured_by or 'no stream'}, not {c.stream}")
    used = {c.stream for c in rows}
    for name in streams.STREAMS_BY_NAME:
        if name not in used:
            problems.append(f"stream {name} has no channel in jobmesh.contract.channels.CHANNELS")
    if problems:
        raise ChannelTableError("channel table is inconsistent:\n  " + "\n  ".join(problems))
