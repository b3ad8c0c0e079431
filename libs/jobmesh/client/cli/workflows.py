"""``jobmesh workflow``: run a workflow file and follow it, show, list, cancel and retry runs.

Each command asks the trigger service through the client (``api.workflows.*``); what a
run's state is comes from ``jobmesh.client.workflows`` (its record plus its jobs as the
tracker lists them). A workflow file is read and checked before connecting, so a typo
costs no round trip and names the file and the field (``steps.b.needs[0]``); the trigger
checks it again, with its templates and every step's job.

Following a run polls its status about twice a second (two requests: the record and the
run's jobs), which is simple and survives a dropped message or a restarted service; each
step's exact start and end are read once from its job's view. On a terminal a ``rich``
live tree shows every step (state in colour, reason or item counts, duration); elsewhere
each change of a step is one plain line on stderr, so logs and scripts read what a person
reads. With ``--json`` stdout holds only the final status.

Exit codes: 0 the run succeeded (or the command did what it was asked), 1 a bad file or a
workflow the trigger refused, 2 a service unreachable, 3 the run failed, 4 no such run,
5 the run was cancelled, 130 interrupted (the run goes on).

The printing functions take the status and the current time, so they are tested on
structs built by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO

import msgspec
from rich.console import Console
from rich.live import Live
from rich.text import Text
from rich.tree import Tree

from jobmesh.client.cli import render
from jobmesh.client.cli.exitcodes import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK
from jobmesh.client.cli.specflags import MAX_LIMIT, page_size
from jobmesh.client.cli.triggers import moment, relative
from jobmesh.client.client import Client
from jobmesh.client.triggers import load_document
from jobmesh.client.workflows import StepStatus, StepTimes, WorkflowStatus, read_workflow_file, with_times
from jobmesh.contract.ids import new_idempotency_key, workflow_run_id
from jobmesh.contract.messages.v1 import (
    JobView,
    WorkflowCancelReply,
    WorkflowRetryReply,
    WorkflowRunReply,
    WorkflowSummary,
)
from jobmesh.errors import JobmeshError, Unavailable, UsageError

__all__ = [
    "EXIT_CANCELLED",
    "POLL_SECONDS",
    "PlainRunDisplay",
    "RunDisplay",
    "StepClock",
    "TreeRunDisplay",
    "change_lines",
    "exit_code_for",
    "follow",
    "register",
    "status_lines",
    "tree_of",
]

# The run was cancelled (``workflow run``, ``status --follow``, ``retry --follow``).
# Belongs with the others in ``exitcodes`` (asked for there); 3 stays "it failed".
POLL_SECONDS = 0.5
# How long a follower keeps asking while the trigger or the tracker does not answer.
UNAVAILABLE_GRACE = 30.0
# Job views read at once for the steps' exact times, and runs whose outcome ``list`` asks at once.
CONCURRENCY = 16
# A mapped step with more items than this gets a plain line per tenth of its items done,
# not per item.
ITEM_LINES = 20

_STYLES = {
    "waiting": "yellow",
    "queued": "cyan",
    "running": "bold blue",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "magenta",
    "skipped": "dim",
}
_MARKS = {
    "waiting": "…",
    "queued": "○",
    "running": "▶",
    "succeeded": "✓",
    "failed": "✗",
    "cancelled": "⊘",
    "skipped": "↷",
}
_OUTCOME_STYLES = {"running": "bold blue", "succeeded": "bold green", "failed": "bold red", "cancelled": "magenta"}


def register(sub: Any) -> None:
    """Add ``workflow`` and its actions to the top-level subparsers.

    Args:
        sub: the ``jobmesh`` subparsers action.
    """
    p = sub.add_parser("workflow", help="run workflows (DAGs of steps) and show, list, cancel or retry their runs")
    wsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    w = wsub.add_parser(
        "run", help="start a run of the workflow in FILE and follow it (0 succeeded, 3 failed, 5 cancelled)"
    )
    w.add_argument("file", metavar="FILE", help="a workflow file (.yaml, .yml or .json)")
    given = w.add_mutually_exclusive_group()
    given.add_argument("--input", default=None, metavar="JSON", help="the run's input, as JSON text")
    given.add_argument("--input-file", default=None, metavar="PATH", help="the run's input, from a YAML or JSON file")
    w.add_argument("--idempotency-key", default="", metavar="K", help="the same key always names the same run")
    w.add_argument("--detach", action="store_true", help="print the run id and return without following")
    w.add_argument("--json", action="store_true", help="print the final status (with --detach: the run id) as JSON")
    w.set_defaults(fn=cmd_run)

    w = wsub.add_parser("status", help="one run: every step's state, reason, items and duration")
    w.add_argument("run_id", metavar="RUN_ID")
    w.add_argument("-f", "--follow", action="store_true", help="follow it until it ends; exit with its outcome")
    w.add_argument("--json", action="store_true")
    w.set_defaults(fn=cmd_status)

    w = wsub.add_parser("list", help="recent runs, newest first, with their outcome")
    w.add_argument("--name", default="", metavar="N", help="only runs of this workflow")
    w.add_argument("--limit", type=page_size, default=50, help=f"at most this many (1-{MAX_LIMIT}, default 50)")
    w.add_argument("--json", action="store_true")
    w.set_defaults(fn=cmd_list)

    w = wsub.add_parser("cancel", help="cancel a run: its held and running steps (and their items)")
    w.add_argument("run_id", metavar="RUN_ID")
    w.add_argument("--reason", default="", metavar="R", help="why, recorded with the cancel")
    w.add_argument("--json", action="store_true")
    w.set_defaults(fn=cmd_cancel)

    w = wsub.add_parser("retry", help="run a run's failed, skipped and cancelled steps again")
    w.add_argument("run_id", metavar="RUN_ID")
    w.add_argument("-f", "--follow", action="store_true", help="follow it until it ends; exit with its outcome")
    w.add_argument("--json", action="store_true")
    w.set_defaults(fn=cmd_retry)


def exit_code_for(outcome: str) -> int:
    """The exit code of a run that has ended.

    Args:
        outcome: ``succeeded``, ``failed`` or ``cancelled``.

    Returns:
        0, 3 (``EXIT_FAILED``) or 5 (``EXIT_CANCELLED``).

    Raises:
        ValueError: for ``running`` (the run has not ended).
    """
    if outcome == "succeeded":
        return EXIT_OK
    if outcome == "cancelled":
        return EXIT_CANCELLED
    if outcome == "failed":
        return EXIT_FAILED
    raise ValueError(f"the run has not ended: it is {outcome}")


def input_of(args: argparse.Namespace) -> Any:
    """The run's input from ``--input JSON`` or ``--input-file PATH``; None when neither.

    Raises:
        UsageError: the text is not JSON, or the file cannot be read or parsed.
    """
    if args.input is not None:
        try:
            return json.loads(args.input)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--input is not JSON: {exc.msg} at column {exc.colno}", field="input") from exc
    if args.input_file is not None:
        return load_document(args.input_file, field="input-file")
    return None


# --- commands ----------------------------------------------------------------------------
async def cmd_run(args: argparse.Namespace) -> int:
    """``jobmesh workflow run FILE``: start a run, follow it, exit with its outcome.

    Returns:
        With ``--detach``, 0 once the run is started; else, once it has ended, 0 when it
        succeeded, 3 when it failed, 5 when it was cancelled. On Ctrl-C it says that the
        run goes on and how to follow it, then lets the interruption through (130).
    """
    # Before connecting: a bad file or input costs no round trip.
    spec = read_workflow_file(args.file)
    run_input = input_of(args)
    # A key made here names the run before the trigger answers, so an interrupted command
    # can still say which run it started.
    key = args.idempotency_key or new_idempotency_key()
    run_id = workflow_run_id(key)
    client = await Client.connect()
    confirmed = False
    try:
        reply = await client.run_workflow(spec, run_input, key)
        confirmed = True
        run_id = reply.run.run_id
        if args.detach:
            started(reply, args.json)
            return EXIT_OK
        render.err(started_line(reply))
        status = await _follow_shown(client, run_id)
    except asyncio.CancelledError:
        # Ctrl-C: asyncio cancels this task, then raises KeyboardInterrupt in main().
        _still_running(run_id, confirmed)
        raise
    finally:
        await client.close()
    if args.json:
        render.json_out(status)
    return exit_code_for(status.outcome)


async def cmd_status(args: argparse.Namespace) -> int:
    """``jobmesh workflow status RUN_ID``: one run (exit 4 when there is none).

    Returns:
        0; with ``--follow``, once the run has ended, its outcome's code.
    """
    client = await Client.connect()
    try:
        if args.follow:
            status = await _follow_shown(client, args.run_id)
        else:
            status = await StepClock(client).refresh(await client.workflow_status(args.run_id))
    except asyncio.CancelledError:
        render.err(f"stopped following; run {args.run_id} goes on")
        raise
    finally:
        await client.close()
    if args.json:
        render.json_out(status)
    elif not args.follow:
        for line in status_lines(status, time.time()):
            print(line)
    return exit_code_for(status.outcome) if args.follow else EXIT_OK


async def _follow_shown(client: Client, run_id: str) -> WorkflowStatus:
    """Follow a run on the display this terminal gets (``display_for``), which is closed
    before anything else is said, however following ends."""
    display = display_for()
    try:
        return await follow(client, run_id, display)
    finally:
        display.close()


async def cmd_list(args: argparse.Namespace) -> int:
    """``jobmesh workflow list``: recent runs with their outcome, newest first."""
    client = await Client.connect()
    try:
        reply = await client.list_workflows(limit=args.limit, name=args.name)
        outcomes = await _outcomes(client, reply.runs)
    finally:
        await client.close()
    run_list(reply.runs, outcomes, time.time(), args.json)
    return EXIT_OK


async def _outcomes(client: Client, runs: Sequence[WorkflowSummary]) -> dict[str, str]:
    """The outcome of each run whose record says ``running`` (only its jobs tell whether it ended)."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(run: WorkflowSummary) -> tuple[str, str]:
        async with gate:
            try:
                return run.run_id, (await client.workflow_status(run.run_id)).outcome
            except JobmeshError:
                # Removed since it was listed, or the tracker is away (Unavailable): the
                # list still shows what the trigger knows.
                return run.run_id, run.state

    answers = await asyncio.gather(*(one(r) for r in runs if r.state == "running"))
    return dict(answers)


async def cmd_cancel(args: argparse.Namespace) -> int:
    """``jobmesh workflow cancel RUN_ID``: cancel a run (exit 4 when there is none)."""
    client = await Client.connect()
    try:
        reply = await client.cancel_workflow(args.run_id, args.reason)
    finally:
        await client.close()
    if args.json:
        render.json_out(reply)
    else:
        print(cancelled_line(reply))
    return EXIT_OK


async def cmd_retry(args: argparse.Namespace) -> int:
    """``jobmesh workflow retry RUN_ID``: run the steps that did not succeed again.

    Returns:
        0; with ``--follow``, once the run has ended again, its outcome's code.
    """
    client = await Client.connect()
    try:
        reply = await client.retry_workflow(args.run_id)
        if not args.follow:
            if args.json:
                render.json_out(reply)
            else:
                print(retried_line(reply))
            return EXIT_OK
        render.err(retried_line(reply))
        status = await _follow_shown(client, args.run_id)
    except asyncio.CancelledError:
        render.err(f"stopped following; run {args.run_id} goes on")
        raise
    finally:
        await client.close()
    if args.json:
        render.json_out(status)
    return exit_code_for(status.outcome)


def _still_running(run_id: str, confirmed: bool) -> None:
    if confirmed:
        render.err(f"interrupted; run {run_id} keeps running in the cluster")
    else:
        render.err(f"interrupted before the trigger confirmed the run; run {run_id} may or may not exist")
    render.err(
        f"follow it with: jobmesh workflow status {run_id} --follow   or stop it: jobmesh workflow cancel {run_id}"
    )


# --- following ---------------------------------------------------------------------------
class StepClock:
    """The exact start and end of each step's job, read once from its view (twice: once
    when it starts running, once when it ends), since the tracker's job list has neither.

    Args:
        client: a connected client.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.times: dict[str, StepTimes] = {}
        self._final: set[str] = set()

    async def refresh(self, status: WorkflowStatus) -> WorkflowStatus:
        """``status`` with exact times for the steps whose jobs have started.

        Args:
            status: from ``Client.workflow_status``.

        Returns:
            The same status, with each started step's times from its job's attempts.
        """
        wanted = [
            s.job_id
            for s in status.steps
            if s.job_id
            and not s.mapped
            and s.job_id not in self._final
            and ((s.final and s.state != "skipped") or (s.state == "running" and s.job_id not in self.times))
        ]
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(job_id: str) -> JobView | None:
            async with gate:
                try:
                    return await self.client.get(job_id)
                except JobmeshError:
                    return None  # not recorded yet, or the tracker is away: the tracker's times stay

        for view in await asyncio.gather(*(one(j) for j in wanted)):
            if view is None:
                continue
            starts = [a.started_at for a in view.attempts if a.started_at]
            ends = [a.finished_at for a in view.attempts if a.finished_at]
            self.times[view.job_id] = StepTimes(min(starts) if starts else None, max(ends) if ends else None)
            if view.final:
                self._final.add(view.job_id)
        return with_times(status, self.times)


class RunDisplay(Protocol):
    """Where a follower shows a run as it goes."""

    def show(self, status: WorkflowStatus, elapsed: float, now: float) -> None:
        """Show the run's latest status (``elapsed``: seconds since following began)."""

    def close(self) -> None:
        """Stop showing (the run ended, or the command was interrupted)."""


async def follow(
    client: Client,
    run_id: str,
    display: RunDisplay,
    poll_seconds: float = POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
) -> WorkflowStatus:
    """Show a run on ``display`` until it has ended.

    Args:
        client: a connected client.
        run_id: the run.
        display: where to show it.
        poll_seconds: how long to wait between two reads of its status.
        clock: monotonic seconds, for the elapsed times shown.
        wall: the current time, for the durations of running steps.

    Returns:
        The run's last status (its outcome is not ``running``).

    Raises:
        NotFound: there is no such run.
        Unavailable: the trigger or the tracker did not answer for ``UNAVAILABLE_GRACE`` seconds.
    """
    began = clock()
    times = StepClock(client)
    away_since: float | None = None
    while True:
        try:
            status = await times.refresh(await client.workflow_status(run_id))
        except Unavailable as exc:
            # A service restarting (a deploy, a failover) should not end a follow of an
            # hour-long run: keep asking for a while, and say so once.
            now = clock()
            if away_since is None:
                away_since = now
                render.err(f"{exc}; still trying for {UNAVAILABLE_GRACE:g}s")
            elif now - away_since >= UNAVAILABLE_GRACE:
                raise
            await asyncio.sleep(max(poll_seconds, 0.5) if poll_seconds else 0)
            continue
        away_since = None
        display.show(status, clock() - began, wall())
        if status.outcome != "running":
            return status
        await asyncio.sleep(poll_seconds)


class PlainRunDisplay:
    """One line per change of a step, and one when the run ends (not a terminal).

    Args:
        write: where each line goes (``render.err`` when omitted).
    """

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self.write = write or render.err
        self.shown: dict[str, tuple[Any, ...]] = {}
        self.ended = False

    def show(self, status: WorkflowStatus, elapsed: float, now: float) -> None:
        """Print a line for each step that changed since the last call."""
        if self.ended:
            return
        for line in change_lines(self.shown, status, elapsed, now):
            self.write(line)
        self.ended = status.outcome != "running"

    def close(self) -> None:
        """Nothing to stop."""


class TreeRunDisplay:
    """A live tree of the run's steps on a terminal; the last one stays on the screen.

    Args:
        console: the terminal to draw on (stderr's when omitted).
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False, redirect_stdout=False)
        self.live.start()

    def show(self, status: WorkflowStatus, elapsed: float, now: float) -> None:
        """Draw the tree for ``status``."""
        self.live.update(tree_of(status, elapsed, now), refresh=True)

    def close(self) -> None:
        """Stop redrawing (the last tree stays)."""
        self.live.stop()


def display_for(stream: TextIO | None = None) -> RunDisplay:
    """The display that suits where the run is shown.

    Args:
        stream: the stream it is written to; stderr when omitted.

    Returns:
        A ``TreeRunDisplay`` on a terminal that can draw one, else a ``PlainRunDisplay``.
    """
    console = Console(file=stream or sys.stderr)
    if console.is_terminal and not console.is_dumb_terminal:
        return TreeRunDisplay(console)
    return PlainRunDisplay()


# --- what is printed ---------------------------------------------------------------------
def seconds_text(seconds: float | None) -> str:
    """A duration for people: ``0.42s``, ``12.3s``, ``4m05s``, ``2h03m``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def duration(step: StepStatus, now: float) -> float | None:
    """How long a step has run (while it runs) or ran; None when it never started or it is unknown.

    Args:
        step: the step.
        now: the current time.
    """
    if step.started_at is None:
        return None
    if step.final:
        return None if step.ended_at is None else step.ended_at - step.started_at
    return now - step.started_at if step.state == "running" else None


def step_detail(step: StepStatus) -> str:
    """What is said after a step's state: its reason or item counts, node, attempt, exit code.

    Args:
        step: the step.

    Returns:
        ``12/20 items done, 3 running``, ``waiting for: extract``, ``node a, attempt 2``...;
        "" when there is nothing to say.
    """
    parts = []
    if step.items is not None and step.items.total:
        parts.append(step.items.text())
    if step.reason and step.reason not in parts:
        parts.append(step.reason)
    if step.state == "running" and step.node_id:
        parts.append(f"node {step.node_id}")
    if step.attempt > 1 and step.state in ("running", "failed", "succeeded"):
        parts.append(f"attempt {step.attempt}")
    if step.state == "failed" and step.exit_code is not None and not step.reason:
        parts.append(f"exit code {step.exit_code}")  # a failure's reason says it already
    return ", ".join(parts)


def outcome_line(status: WorkflowStatus) -> str:
    """The line that says how a run stands: ``workflow etl run 1f3a... succeeded: 4 succeeded, 1 skipped``.

    Args:
        status: the run's status.
    """
    counts = ", ".join(f"{n} {state}" for state, n in status.counts().items())
    cancel = ""
    if status.cancel_requested:
        cancel = " (cancelled" + (f": {status.cancel_reason}" if status.cancel_reason else "") + ")"
        if status.outcome == "running":
            cancel = " (cancelling" + (f": {status.cancel_reason}" if status.cancel_reason else "") + ")"
    generation = f" generation {status.generation}" if status.generation else ""
    return f"workflow {status.name} run {status.run_id}{generation} {status.outcome}{cancel}: {counts}"


def _signature(step: StepStatus) -> tuple[Any, ...]:
    """What must change for a plain line to be printed about a step."""
    items: tuple[int, ...] = ()
    if step.items is not None and step.items.total:
        done, total = step.items.done, step.items.total
        items = (done if total <= ITEM_LINES else done * 10 // total, step.items.failed)
    reason = "" if step.mapped and step.state == "running" else step.reason
    # A held job's attempt number changes as the tracker records it: not news.
    attempt = step.attempt if step.state in ("running", "succeeded", "failed") else 0
    return (step.state, reason, step.node_id, attempt, items)


def change_lines(shown: dict[str, tuple[Any, ...]], status: WorkflowStatus, elapsed: float, now: float) -> list[str]:
    """The plain lines for what changed since the last status: one per step, one for the end.

    Args:
        shown: each step's last shown signature; updated here.
        status: the run's status now.
        elapsed: seconds since following began.
        now: the current time.

    Returns:
        ``[  1.20s] extract running (node a)`` per changed step (an ended step says how
        long it ran), then ``[  9.00s] workflow etl run ... succeeded: ...`` once the run
        has ended.
    """
    lines = []
    for step in status.steps:
        signature = _signature(step)
        if shown.get(step.name) == signature:
            continue
        shown[step.name] = signature
        lines.append(f"[{elapsed:6.2f}s] {step_line(step, now)}")
    if status.outcome != "running":
        lines.append(f"[{elapsed:6.2f}s] {outcome_line(status)}")
    return lines


def step_line(step: StepStatus, now: float) -> str:
    """One step in one line: ``extract succeeded (1.20s)``, ``load waiting (waiting for: extract)``.

    Args:
        step: the step.
        now: the current time.
    """
    detail = step_detail(step)
    took = duration(step, now) if step.final else None
    parts = [p for p in (detail, seconds_text(took) if took is not None else "") if p]
    return f"{step.name} {step.state}" + (f" ({', '.join(parts)})" if parts else "")


def tree_of(status: WorkflowStatus, elapsed: float, now: float) -> Tree:
    """The live tree: the run and its outcome at the root, one branch per step.

    Args:
        status: the run's status.
        elapsed: seconds since following began.
        now: the current time.

    Returns:
        A ``rich`` tree; each step shows its mark, name, state in colour, duration, and
        its reason or item counts.
    """
    counts = ", ".join(f"{n} {state}" for state, n in status.counts().items())
    root = Text()
    root.append(f"workflow {status.name} ", style="bold")
    root.append(f"run {status.run_id} ", style="dim")
    root.append(status.outcome, style=_OUTCOME_STYLES.get(status.outcome, ""))
    if status.cancel_requested and status.outcome == "running":
        root.append(" (cancelling)", style="magenta")
    root.append(f"  {counts}  {seconds_text(elapsed)}", style="dim")
    tree = Tree(root)
    width = max((len(s.name) for s in status.steps), default=0)
    for step in status.steps:
        style = _STYLES.get(step.state, "")
        # One line per step, however narrow the terminal: a long reason is cut, not wrapped.
        label = Text(no_wrap=True, overflow="ellipsis")
        label.append(f"{_MARKS.get(step.state, '?')} ", style=style)
        label.append(step.name.ljust(width) + "  ")
        label.append(step.state.ljust(9), style=style)
        label.append(f"  {seconds_text(duration(step, now)):>7}", style="dim")
        detail = step_detail(step)
        if detail:
            label.append(f"  {detail}", style="dim" if step.state != "failed" else "red")
        tree.add(label)
    return tree


def status_lines(status: WorkflowStatus, now: float) -> list[str]:
    """The lines of ``workflow status``: the run, then a table of its steps.

    Args:
        status: the run's status.
        now: the current time.

    Returns:
        ``run``, ``outcome``, ``created``/``updated`` and ``steps`` lines, then STEP,
        STATE, TOOK, NEEDS and DETAIL per step, in declaration order.
    """
    generation = f"  generation {status.generation}" if status.generation else ""
    lines = [f"run       {status.run_id}  {status.name}{generation}"]
    outcome = status.outcome
    if status.cancel_requested:
        outcome += " (cancelled" if status.outcome != "running" else " (cancelling"
        outcome += f": {status.cancel_reason})" if status.cancel_reason else ")"
    lines.append(f"outcome   {outcome}")
    lines.append(f"created   {moment(status.created_at, now)}")
    lines.append(f"updated   {moment(status.updated_at, now)}")
    lines.append("steps     " + ", ".join(f"{n} {state}" for state, n in status.counts().items()))
    rows = [
        [
            s.name,
            s.state,
            seconds_text(duration(s, now)),
            ",".join(s.needs) + ("" if s.when == "succeeded" or not s.needs else f" ({s.when})") or "-",
            step_detail(s) or "-",
        ]
        for s in status.steps
    ]
    lines.extend(render.table_lines(["STEP", "STATE", "TOOK", "NEEDS", "DETAIL"], rows, right=frozenset({2})))
    return lines


def started(reply: WorkflowRunReply, as_json: bool) -> None:
    """What ``workflow run --detach`` prints: the run id (or JSON with the duplicate flag).

    Args:
        reply: the trigger's reply.
        as_json: print ``{"run_id", "name", "duplicate"}``.
    """
    if as_json:
        render.json_out({"run_id": reply.run.run_id, "name": reply.run.spec.name, "duplicate": reply.duplicate})
    else:
        print(reply.run.run_id)


def started_line(reply: WorkflowRunReply) -> str:
    """The first line ``workflow run`` prints on stderr: ``workflow etl run 1f3a... started (5 steps)``.

    Args:
        reply: the trigger's reply.
    """
    run = reply.run
    steps = len(run.spec.steps)
    what = "was started already (same idempotency key)" if reply.duplicate else "started"
    return f"workflow {run.spec.name} run {run.run_id} {what} ({steps} step{'s' if steps != 1 else ''})"


def cancelled_line(reply: WorkflowCancelReply) -> str:
    """What ``workflow cancel`` prints: ``run 1f3a... cancelled (3 jobs stopped or dropped)``.

    Args:
        reply: the trigger's reply.
    """
    if not reply.cancelled:
        return f"run {reply.run_id}: no job left to cancel" + (f" ({reply.message})" if reply.message else "")
    jobs = f"{reply.cancelled} job{'s' if reply.cancelled != 1 else ''}"
    return f"run {reply.run_id} cancelled ({jobs} reached)" + (f": {reply.message}" if reply.message else "")


def retried_line(reply: WorkflowRetryReply) -> str:
    """What ``workflow retry`` prints: ``run 1f3a... retried (generation 1): load, report run again``.

    Args:
        reply: the trigger's reply.
    """
    run = reply.run
    again = ", ".join(reply.steps) + (" run again" if len(reply.steps) != 1 else " runs again")
    if not reply.steps:
        again = "no step to run again"
    return f"run {run.run_id} retried (generation {run.generation}): {again}"


def run_list(runs: Sequence[WorkflowSummary], outcomes: dict[str, str], now: float, as_json: bool) -> None:
    """What ``workflow list`` prints: one row per run, newest first.

    Args:
        runs: the trigger's summaries.
        outcomes: run id -> its outcome, for the runs whose record says ``running``.
        now: the current time, for the relative times.
        as_json: print a JSON list of the summaries, each with its ``outcome``.
    """
    if as_json:
        render.json_out([{**msgspec.to_builtins(r), "outcome": outcomes.get(r.run_id, r.state)} for r in runs])
        return
    for line in run_list_lines(runs, outcomes, now):
        print(line)
    if not runs:
        render.err("no workflow runs: start one with `jobmesh workflow run FILE`")


def run_list_lines(runs: Sequence[WorkflowSummary], outcomes: dict[str, str], now: float) -> list[str]:
    """The lines of ``workflow list``: RUN, NAME, OUTCOME, GEN, STEPS, CREATED, UPDATED.

    Args:
        runs: the trigger's summaries.
        outcomes: run id -> its outcome, for the runs whose record says ``running``.
        now: the current time.
    """
    rows = [
        [
            r.run_id,
            r.name,
            outcomes.get(r.run_id, r.state),
            str(r.generation),
            str(r.steps),
            relative(r.created_at, now),
            relative(r.updated_at, now),
        ]
        for r in runs
    ]
    return render.table_lines(
        ["RUN", "NAME", "OUTCOME", "GEN", "STEPS", "CREATED", "UPDATED"], rows, right=frozenset({3, 4})
    )
