"""The ``jobmesh`` command line: subcommands, their flags, and commands other layers add.

A usage error exits 1 (2 means "cluster unreachable") and prints the usage of the
subcommand that was given, not the top-level one. Commands that need more than the client
(``provision`` from the runtime, ``dev`` from the dev tooling) register themselves through
the ``jobmesh.commands`` entry point group, so this package imports neither; a plugin that
fails to load is listed as unavailable and says why when it is invoked.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any, NoReturn

from jobmesh.client import jobstate
from jobmesh.client.cli import commands, render, triggers, workflows
from jobmesh.client.cli.exitcodes import EXIT_USAGE
from jobmesh.client.cli.specflags import MAX_LIMIT, add_spec_flags, page_size
from jobmesh.contract.subjects import SERVICES

PLUGIN_GROUP = "jobmesh.commands"


class _Parser(argparse.ArgumentParser):
    """An argparse parser that exits 1 on a bad command line and names its own subcommand.

    Args:
        swallow_unknown: accept any arguments (the stand-in for an unavailable plugin,
            which only reports that it is unavailable).
    """

    def __init__(self, *args: Any, swallow_unknown: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.swallow_unknown = swallow_unknown

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # argparse hands a subcommand's unknown options up to the top-level parser, which
        # then prints its own usage; refuse them here, with this subcommand's usage. For
        # submit and run, everything after "--" belongs to the command and is never unknown.
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and not self.swallow_unknown:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, [] if self.swallow_unknown else extras

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not {what} (they count from 1)")
    return value


def _attempt(text: str) -> int:
    return _positive(text, "an attempt number")


def _sequence(text: str) -> int:
    return _positive(text, "a dead letter's sequence")


def build_parser(plugins: Iterable[EntryPoint] | None = None) -> argparse.ArgumentParser:
    """The parser of the whole command line; each subcommand sets ``fn`` to its command.

    Args:
        plugins: the entry points that add commands; the installed ``jobmesh.commands``
            group when omitted.

    Returns:
        The parser.
    """
    parser = _Parser(prog="jobmesh", description="Distributed job management over NATS JetStream.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="submit a job; prints its id")
    p.add_argument("--json", action="store_true")
    add_spec_flags(p)
    p.set_defaults(fn=commands.cmd_submit)

    p = sub.add_parser("run", help="submit a job, follow it until it is final, exit with its outcome (0 ok, 3 not)")
    add_spec_flags(p)
    p.set_defaults(fn=commands.cmd_run)

    p = sub.add_parser("watch", help="follow a job until it is final: states and progress (0 succeeded, 3 not)")
    p.add_argument("job_id")
    p.set_defaults(fn=commands.cmd_watch)

    p = sub.add_parser("status", help="show one job: its attempts as a timeline, its fallback, whether it is final")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=commands.cmd_status)

    p = sub.add_parser("cancel", help="cancel a job (one that has ended stays as it is)")
    p.add_argument("job_id")
    p.add_argument("--reason", default="", help="why, recorded with the cancel")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=commands.cmd_cancel)

    p = sub.add_parser("result", help="print the result a job wrote to $JOBMESH_RESULT_PATH")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", default="", metavar="FILE", help="write it to FILE instead of stdout")
    p.add_argument(
        "--attempt", type=_attempt, default=None, metavar="N", help="that attempt's (default: the one that succeeded)"
    )
    p.set_defaults(fn=commands.cmd_result)

    p = sub.add_parser("dead-letters", help="messages the services refused, and why (newest last)")
    p.add_argument(
        "--service", default="", choices=SERVICES, metavar="SERVICE", help="only this service's: " + ", ".join(SERVICES)
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=page_size, default=50, help=f"the newest this many (1-{MAX_LIMIT}, default 50)")
    p.set_defaults(fn=commands.cmd_dead_letters)
    dsub = p.add_subparsers(dest="action", metavar="ACTION")
    d = dsub.add_parser("replay", help="publish a dead letter's message again to the subject it was refused on")
    d.add_argument("seq", type=_sequence, help="its SEQ, as dead-letters lists it")
    d.add_argument("--json", action="store_true")
    d.set_defaults(fn=commands.cmd_replay)

    p = sub.add_parser("logs", help="print a job's output")
    p.add_argument("job_id")
    p.add_argument("-f", "--follow", action="store_true", help="keep following until the job ends")
    p.set_defaults(fn=commands.cmd_logs)

    p = sub.add_parser("list", help="recent jobs, newest first")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=page_size, default=50, help=f"at most this many (1-{MAX_LIMIT}, default 50)")
    p.add_argument(
        "--state",
        default="",
        choices=jobstate.JOB_STATES,
        metavar="STATE",
        help="only jobs in this state, as status shows it: " + ", ".join(jobstate.JOB_STATES),
    )
    p.add_argument("--queue", default="")
    p.set_defaults(fn=commands.cmd_list)

    p = sub.add_parser("nodes", help="executor nodes with capacity, allocation and last heartbeat")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=commands.cmd_nodes)

    p = sub.add_parser("queues", help="depth per queue and tenant, and what held jobs wait for")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=commands.cmd_queues)

    p = sub.add_parser("queue", help="configure queues")
    qsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = qsub.add_parser(
        "set",
        help="set a queue's release rate, in-flight cap and preemption policy; sets them all"
        " (omitted = unlimited, no preemption)",
    )
    q.add_argument("name")
    q.add_argument("--rate", type=float, default=0.0, help="jobs released per second")
    q.add_argument("--burst", type=int, default=0, help="token bucket size (default: max(1, rate))")
    q.add_argument("--max-in-flight", type=int, default=0, help="released and not yet ended")
    q.add_argument(
        "--preempt-min-priority",
        type=int,
        default=None,
        metavar="N",
        help="jobs of this queue at priority N or higher that ask to (--preempt) may stop lower-priority"
        " jobs when they fit nowhere (default: none may)",
    )
    q.add_argument(
        "--preemptible-fraction",
        type=float,
        default=1.0,
        metavar="F",
        help="at most this fraction (0-1) of this queue's running jobs is stopped by one preemption (default 1)",
    )
    q.set_defaults(fn=commands.cmd_queue_set)
    q = qsub.add_parser("list", help="every configured queue (queues not listed are unlimited)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=commands.cmd_queue_list)

    p = sub.add_parser("tenant", help="configure tenants")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tsub.add_parser("set", help="set a tenant's fair-share weight (default 1)")
    t.add_argument("name")
    t.add_argument("--weight", type=float, required=True)
    t.set_defaults(fn=commands.cmd_tenant_set)
    t = tsub.add_parser("list", help="every configured tenant weight (tenants not listed weigh 1)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(fn=commands.cmd_tenant_list)

    p = sub.add_parser("zones", help="configure zone distances for data locality")
    zsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    z = zsub.add_parser("set", help='load {"distances": {"a": {"b": 1}}, "default": 100} from a JSON file')
    z.add_argument("file")
    z.set_defaults(fn=commands.cmd_zones_set)
    z = zsub.add_parser("show", help="the zone distance map (--json prints what zones set reads)")
    z.add_argument("--json", action="store_true")
    z.set_defaults(fn=commands.cmd_zones_show)

    triggers.register(sub)  # ``trigger add|list|show|rm|pause|resume|test``
    workflows.register(sub)  # ``workflow run|status|list|cancel|retry``

    p = sub.add_parser("health", help="ask a service whether it is healthy")
    p.add_argument("service", choices=SERVICES)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=commands.cmd_health)

    add_plugins(sub, entry_points(group=PLUGIN_GROUP) if plugins is None else plugins)
    return parser


def add_plugins(sub: Any, plugins: Iterable[EntryPoint]) -> None:
    """Let each entry point add its subcommand; one that fails stays listed, as unavailable.

    Each entry point names a ``register(subparsers) -> None`` that adds one subparser and
    sets its ``fn`` (sync or async, taking the parsed arguments, returning an exit code).

    Args:
        sub: the top-level subparsers action.
        plugins: the entry points, in the order to add them.
    """
    for plugin in sorted(plugins, key=lambda ep: ep.name):
        if plugin.name in sub.choices:
            continue  # the same plugin installed twice, or one shadowing a built-in command
        try:
            register = plugin.load()
            register(sub)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the other commands down
            if plugin.name in sub.choices:
                continue  # it registered, then failed: what it registered is what runs
            why = f"{type(exc).__name__}: {exc}"
            stand_in = sub.add_parser(plugin.name, help=f"(unavailable: {why})", swallow_unknown=True, add_help=False)
            stand_in.set_defaults(fn=_unavailable(plugin.name, plugin.value, why))


def _unavailable(name: str, target: str, why: str) -> Callable[[argparse.Namespace], int]:
    def fn(args: argparse.Namespace) -> int:
        render.err(f"the {name} command is unavailable ({target} did not load: {why})")
        return EXIT_USAGE

    return fn
