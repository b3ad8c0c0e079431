"""``jobmesh trigger``: add, list, show, pause, resume, test and remove trigger rules.

Each command asks the trigger service through the client (``api.triggers.*``) and prints
what it answered: tables and YAML for people, the reply struct as one line of JSON with
``--json``. A rule file is read and checked before connecting, so a typo costs no round
trip and names the file and the field; the service checks it again, with its CEL
expressions, job template and subjects. Errors become exit codes in one place
(``run_command``): 1 a refused rule or bad file, 2 the trigger service unreachable, 4 no
such rule.

The printing functions take the reply and the current time, so they are tested on
structs built by hand.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
import yaml

from jobmesh.client.cli import render
from jobmesh.client.cli.exitcodes import EXIT_OK
from jobmesh.client.client import Client
from jobmesh.client.triggers import event_from, is_rule_file, load_document, read_rule_file
from jobmesh.contract.messages.v1 import (
    PendingView,
    TriggerListReply,
    TriggerRecord,
    TriggerReply,
    TriggerRule,
    TriggerStats,
    TriggerTestReply,
    TriggerView,
)

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``trigger`` and its actions to the top-level subparsers.

    Args:
        sub: the ``jobmesh`` subparsers action.
    """
    p = sub.add_parser("trigger", help="manage trigger rules: jobs started by events, webhooks, schedules, job ends")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    t = tsub.add_parser("add", help="add a rule from a YAML or JSON file, or change the rule of its name")
    t.add_argument("file", metavar="FILE")
    t.add_argument("--paused", action="store_true", help="add it paused")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_add)

    t = tsub.add_parser("list", help="every rule: kind, version, state, fires, failures, last fire, next tick")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_list)

    t = tsub.add_parser("show", help="one rule: its definition, figures and pending partial state")
    t.add_argument("name", metavar="NAME")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_show)

    t = tsub.add_parser("rm", help="remove a rule, its figures and its partial state")
    t.add_argument("name", metavar="NAME")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_rm)

    t = tsub.add_parser("pause", help="stop a rule firing (matching events are counted as skipped)")
    t.add_argument("name", metavar="NAME")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_pause, paused=True)

    t = tsub.add_parser("resume", help="let a paused rule fire again")
    t.add_argument("name", metavar="NAME")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_pause, paused=False)

    t = tsub.add_parser("test", help="show the job an event would make of a rule, without submitting it")
    t.add_argument("rule", metavar="RULE", help="a stored rule's name, or a rule file (.yaml, .yml, .json)")
    t.add_argument(
        "event",
        metavar="EVENT.json",
        nargs="?",
        default=None,
        help='an event {"subject", "data", "headers"} (with --subject: its data only); default: the rule\'s sample',
    )
    t.add_argument("--subject", default="", metavar="S", help="the event's subject (EVENT.json is then its data)")
    t.add_argument("--header", action="append", default=[], metavar="K=V", help="a header of the event (repeatable)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=cmd_test)


# --- commands ----------------------------------------------------------------------------
async def cmd_add(args: argparse.Namespace) -> int:
    """``jobmesh trigger add FILE``: store the rule in FILE (a new version when it changed)."""
    rule = read_rule_file(args.file)  # before connecting: a bad file costs no round trip
    client = await Client.connect()
    try:
        reply = await client.put_trigger(rule, paused=args.paused)
    finally:
        await client.close()
    stored(reply, "add", args.json)
    return EXIT_OK


async def cmd_list(args: argparse.Namespace) -> int:
    """``jobmesh trigger list``: every rule with its figures."""
    client = await Client.connect()
    try:
        reply = await client.list_triggers()
    finally:
        await client.close()
    trigger_list(reply, time.time(), args.json)
    return EXIT_OK


async def cmd_show(args: argparse.Namespace) -> int:
    """``jobmesh trigger show NAME``: one rule (exit 4 when there is none of that name)."""
    client = await Client.connect()
    try:
        view = await client.get_trigger(args.name)
    finally:
        await client.close()
    trigger_show(view, time.time(), args.json)
    return EXIT_OK


async def cmd_rm(args: argparse.Namespace) -> int:
    """``jobmesh trigger rm NAME``: remove a rule (exit 4 when there is none of that name)."""
    client = await Client.connect()
    try:
        reply = await client.delete_trigger(args.name)
    finally:
        await client.close()
    stored(reply, "rm", args.json)
    return EXIT_OK


async def cmd_pause(args: argparse.Namespace) -> int:
    """``jobmesh trigger pause|resume NAME``."""
    client = await Client.connect()
    try:
        reply = await client.pause_trigger(args.name, paused=args.paused)
    finally:
        await client.close()
    stored(reply, "pause" if args.paused else "resume", args.json)
    return EXIT_OK


async def cmd_test(args: argparse.Namespace) -> int:
    """``jobmesh trigger test RULE [EVENT.json]``: the job an event would give, not submitted."""
    # Files first, before connecting, so their errors name the file without a round trip.
    rule: TriggerRule | None = read_rule_file(args.rule) if is_rule_file(args.rule) else None
    data = load_document(args.event, field="event") if args.event is not None else None
    client = await Client.connect()
    try:
        sample = rule.sample if rule is not None else None
        if data is None and (args.subject or args.header) and rule is None:
            # Flags over the stored rule's sample: it has to be read first.
            sample = (await client.get_trigger(args.rule)).record.rule.sample
        event = event_from(data, args.subject, args.header, sample, source=args.event or "event")
        reply = await client.test_trigger(rule if rule is not None else args.rule, event)
    finally:
        await client.close()
    tested(reply, args.json)
    return EXIT_OK


# --- what is printed ---------------------------------------------------------------------
def relative(ts: float, now: float) -> str:
    """A moment relative to now: ``12s ago``, ``in 3m``, ``-`` when there is none.

    Args:
        ts: seconds since the epoch; 0 for none.
        now: the current time.

    Returns:
        The text, in the largest whole unit (s, m, h, d).
    """
    if not ts:
        return "-"
    delta = ts - now
    span = abs(delta)
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if span >= seconds:
            amount = f"{int(span // seconds)}{unit}"
            break
    else:
        amount = f"{int(span)}s"
    return f"in {amount}" if delta > 0 else f"{amount} ago"


def moment(ts: float, now: float) -> str:
    """A moment as local date and time with its relative form: ``2026-12-01 14:03:05 (5m ago)``.

    Args:
        ts: seconds since the epoch; 0 for none.
        now: the current time.

    Returns:
        The text, ``-`` when there is none.
    """
    if not ts:
        return "-"
    return f"{datetime.fromtimestamp(ts).strftime('%Y-%m-%d %H:%M:%S')} ({relative(ts, now)})"


def state_of(paused: bool) -> str:
    """``paused`` or ``active``."""
    return "paused" if paused else "active"


def stored(reply: TriggerReply, action: str, as_json: bool) -> None:
    """What ``add``, ``rm``, ``pause`` and ``resume`` print: the rule and its state now.

    Args:
        reply: the service's reply.
        action: ``add``, ``rm``, ``pause`` or ``resume``.
        as_json: print the reply as JSON.
    """
    if as_json:
        render.json_out(reply)
        return
    print(stored_line(reply, action))


def stored_line(reply: TriggerReply, action: str) -> str:
    """The line ``add``, ``rm``, ``pause`` and ``resume`` print.

    Args:
        reply: the service's reply.
        action: ``add``, ``rm``, ``pause`` or ``resume``.

    Returns:
        ``rule t1 added (version 1, active)``, ``rule t1 unchanged (version 2, paused)``...
    """
    record = reply.record
    name, version, state = record.rule.name, record.version, state_of(record.paused)
    if action == "rm":
        return f"rule {name} removed (it was version {version}, {state})"
    if action in ("pause", "resume"):
        already = "" if reply.changed else " already"
        return f"rule {name} is{already} {state} (version {version})"
    if not reply.changed:
        return f"rule {name} unchanged (version {version}, {state})"
    done = "added" if version == 1 else "changed"
    return f"rule {name} {done} (version {version}, {state})"


def trigger_list(reply: TriggerListReply, now: float, as_json: bool) -> None:
    """What ``trigger list`` prints: one row per rule, by name.

    Args:
        reply: the service's reply.
        now: the current time, for the relative times.
        as_json: print the reply as JSON.
    """
    if as_json:
        render.json_out(reply)
        return
    rows = [
        [
            t.name,
            t.kind,
            str(t.version),
            state_of(t.paused),
            str(t.stats.fires),
            str(t.stats.failures),
            relative(t.stats.last_fire_at, now),
            relative(t.next_tick, now),
            str(t.pending),
        ]
        for t in reply.triggers
    ]
    render.table(
        ["NAME", "KIND", "VERSION", "STATE", "FIRES", "FAILURES", "LAST FIRE", "NEXT TICK", "PENDING"],
        rows,
        right=frozenset({2, 4, 5, 8}),
    )
    if not reply.triggers:
        render.err("no trigger rules: add one with `jobmesh trigger add FILE`")


def rule_yaml(rule: TriggerRule) -> str:
    """A rule as YAML, in the shape its author writes it (fields in declaration order).

    Args:
        rule: the rule.

    Returns:
        The YAML text, ending with a line break.
    """
    data = msgspec.to_builtins(rule)
    sample = data.get("sample")
    if isinstance(sample, dict) and not sample.get("headers"):
        del sample["headers"]  # SampleEvent keeps its defaults on the wire; nobody writes ``headers: {}``
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)


def trigger_show(view: TriggerView, now: float, as_json: bool) -> None:
    """What ``trigger show`` prints: the rule's state and figures, its definition, its pending keys.

    Args:
        view: the service's reply.
        now: the current time, for the relative times.
        as_json: print the view as JSON.
    """
    if as_json:
        render.json_out(view)
        return
    for line in show_lines(view, now):
        print(line)


def show_lines(view: TriggerView, now: float) -> list[str]:
    """The lines of ``trigger show``.

    Args:
        view: the service's reply.
        now: the current time.

    Returns:
        The header (name, version, state, times, figures, next tick), the rule as YAML
        under ``rule:``, and the pending partial state under ``pending:``.
    """
    record: TriggerRecord = view.record
    rule = record.rule
    lines = [f"rule      {rule.name}  version {record.version}  {state_of(record.paused)}"]
    if rule.description:
        lines.append(f"about     {rule.description}")
    lines.append(f"created   {moment(record.created_at, now)}")
    lines.append(f"updated   {moment(record.updated_at, now)}")
    if record.paused_at:
        lines.append(f"{'paused' if record.paused else 'resumed':9} {moment(record.paused_at, now)}")
    lines.append(f"fires     {stats_text(view.stats, now)}")
    if view.stats.last_error:
        lines.append(f"error     {moment(view.stats.last_error_at, now)}: {view.stats.last_error}")
    if view.next_tick:
        lines.append(f"next tick {moment(view.next_tick, now)}")
    lines.append("rule:")
    lines.extend(f"  {line}" for line in rule_yaml(rule).splitlines())
    if view.pending:
        lines.append(f"pending ({len(view.pending)}):")
        lines.extend(pending_lines(view.pending, now))
    return lines


def stats_text(stats: TriggerStats, now: float) -> str:
    """A rule's figures in one line: ``3 (last 5m ago), 1 failure, 0 skipped while paused``.

    Args:
        stats: the figures.
        now: the current time.

    Returns:
        The text.
    """
    last = f" (last {relative(stats.last_fire_at, now)})" if stats.last_fire_at else ""
    failures = f"{stats.failures} failure{'s' if stats.failures != 1 else ''}"
    return f"{stats.fires}{last}, {failures}, {stats.skipped} skipped while paused"


def pending_lines(pending: Sequence[PendingView], now: float) -> list[str]:
    """The table of a rule's debounces, batches and correlations that wait for more events.

    Args:
        pending: the partial states.
        now: the current time.

    Returns:
        The table's lines (KEY, KIND, EVENTS, FIRST, LAST, DUE, PARTS), indented.
    """
    headers = ["KEY", "KIND", "EVENTS", "FIRST", "LAST", "DUE", "PARTS"]
    rows = [
        [
            p.key or '""',
            p.kind,
            str(p.events),
            relative(p.first_at, now),
            relative(p.last_at, now),
            relative(p.due_at, now),
            ", ".join(f"{part}={n}" for part, n in sorted(p.parts.items())) or "-",
        ]
        for p in pending
    ]
    return [f"  {line}" for line in render.table_lines(headers, rows, right=frozenset({2}))]


def tested(reply: TriggerTestReply, as_json: bool) -> None:
    """What ``trigger test`` prints: matched or not and why, the key and the job as YAML.

    Args:
        reply: the service's reply.
        as_json: print the reply as JSON.
    """
    if as_json:
        render.json_out(reply)
        return
    for line in tested_lines(reply):
        print(line)


def tested_lines(reply: TriggerTestReply) -> list[str]:
    """The lines of ``trigger test``.

    Args:
        reply: the service's reply.

    Returns:
        ``matched`` (or ``not matched: <reason>``), the idempotency key, and the job spec
        as YAML under ``job:``.
    """
    if not reply.matched:
        return [f"not matched: {reply.reason or 'the event does not pass the rule'}"]
    lines = ["matched" + (f": {reply.reason}" if reply.reason else "")]
    if reply.idempotency_key:
        lines.append(f"idempotency key {reply.idempotency_key}")
    if reply.job is not None:
        lines.append("job:")
        text = yaml.safe_dump(reply.job, sort_keys=False, allow_unicode=True, default_flow_style=False)
        lines.extend(f"  {line}" for line in text.splitlines())
    return lines
