"""How ``run`` and ``watch`` show a job as it goes: plain lines, or a live bar on a terminal.

Both displays print the same timeline lines (``[  0.12s] running (node a)``, from
``render``). On a terminal (stderr is a TTY) a ``rich`` progress bar sits below them and
shows the current state and what the attempt last reported (fraction, message); elsewhere
each report is one more plain line, so that logs and scripts read what a person reads.

Uploads before a submit (``UploadDisplay``) get a bar per file on a terminal when they are
large enough to take a while, and one summary line either way.
"""

from __future__ import annotations

import sys
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from jobmesh.client.cli import render
from jobmesh.client.jobstate import Progress as JobProgress
from jobmesh.client.jobstate import Seen

__all__ = ["BarDisplay", "Display", "PlainDisplay", "UploadDisplay", "display_for"]

# Below this many bytes in all an upload is over before a bar could say anything.
UPLOAD_BAR_BYTES = 4 * 1024 * 1024


class Display(Protocol):
    """Where a follower shows what it learns about a job."""

    def state(self, elapsed: float, seen: Seen) -> None:
        """Show a new state of the job."""

    def progress(self, elapsed: float, progress: JobProgress) -> None:
        """Show what the running attempt last reported."""

    def close(self) -> None:
        """Stop showing (the job is final, or the command was interrupted)."""


class PlainDisplay:
    """One line on stderr per new state and per new report (not a terminal)."""

    def state(self, elapsed: float, seen: Seen) -> None:
        """Print the state's timeline line."""
        render.err(render.state_line(elapsed, seen))

    def progress(self, elapsed: float, progress: JobProgress) -> None:
        """Print the report's line."""
        render.err(render.progress_line(elapsed, progress))

    def close(self) -> None:
        """Nothing to stop."""


class BarDisplay:
    """A live progress bar on a terminal, with the timeline lines scrolling above it.

    Args:
        console: the terminal to draw on (stderr's when omitted).
        redirect_stdout: route ``print()`` to stdout through the console, so that a job's
            output lines appear above the bar; only when stdout is that same terminal,
            since a redirected stdout must receive the job's output unchanged.
    """

    def __init__(self, console: Console | None = None, redirect_stdout: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        if redirect_stdout is None:
            redirect_stdout = sys.stdout.isatty()
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[message]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,  # the bar goes at the end; the timeline lines stay
            redirect_stdout=redirect_stdout,
            redirect_stderr=True,
        )
        self.task: TaskID = self.bar.add_task("submitted", total=None, message="")
        self.attempt = -1
        self.bar.start()

    def state(self, elapsed: float, seen: Seen) -> None:
        """Print the state's line above the bar and show the state beside it."""
        self.console.print(render.PREFIX + render.state_line(elapsed, seen), markup=False, highlight=False)
        if seen.attempt != self.attempt:
            # Another attempt starts from nothing (or from its checkpoint, which it reports):
            # a fresh task, since rich cannot make a task's total unknown again.
            self.attempt = seen.attempt
            self.bar.remove_task(self.task)
            self.task = self.bar.add_task(render.bar_description(seen), total=None, message="")
        else:
            self.bar.update(self.task, description=render.bar_description(seen))
        if seen.final and seen.state == "succeeded":
            self.bar.update(self.task, total=1, completed=1)

    def progress(self, elapsed: float, progress: JobProgress) -> None:
        """Move the bar to the reported fraction, with the reported message beside it."""
        if progress.fraction is None:
            self.bar.update(self.task, message=progress.message)
        else:
            fraction = min(1.0, max(0.0, progress.fraction))
            self.bar.update(self.task, total=1.0, completed=fraction, message=progress.message)

    def close(self) -> None:
        """Take the bar away."""
        self.bar.stop()


def display_for(stream: TextIO | None = None) -> Display:
    """The display that suits where the timeline goes.

    Args:
        stream: the stream the timeline is written to; stderr when omitted.

    Returns:
        A ``BarDisplay`` on a terminal that can draw one, else a ``PlainDisplay``.
    """
    stream = stream or sys.stderr
    console = Console(file=stream)
    if console.is_terminal and not console.is_dumb_terminal:
        return BarDisplay(console)
    return PlainDisplay()


class UploadDisplay:
    """Shows the files going to ``jm_uploads``: a bar per file on a terminal, for large uploads.

    Args:
        total: the bytes of every file to upload (those already stored included).
        console: the terminal to draw on (stderr's when omitted); no bar unless it is one.
    """

    def __init__(self, total: int, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.bar: Progress | None = None
        self.tasks: dict[str, TaskID] = {}
        if total >= UPLOAD_BAR_BYTES and self.console.is_terminal and not self.console.is_dumb_terminal:
            self.bar = Progress(
                TextColumn("upload {task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.start()

    def update(self, dest: str, sent: int, size: int) -> None:
        """Move the bar of ``dest`` to ``sent`` of ``size`` bytes (an ``UploadProgress``)."""
        if self.bar is None:
            return
        task = self.tasks.get(dest)
        if task is None:
            task = self.tasks[dest] = self.bar.add_task(dest, total=size)
        self.bar.update(task, completed=sent)

    def close(self, files: int, total: int, sent: int) -> None:
        """Take the bars away and say what was uploaded.

        Args:
            files: how many uploads there were.
            total: their bytes.
            sent: the bytes actually sent (the rest was stored already).
        """
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        render.err(render.uploaded_line(files, total, sent))
