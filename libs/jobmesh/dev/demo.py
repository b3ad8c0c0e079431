"""The short demo ``make run`` shows: a few jobs with a live status table, then a workflow
followed live with the tree ``jobmesh workflow run`` draws.

The workflow is the shipped ``examples/workflows/train-and-pick.yaml``: a data-prep step, a
fan-out of model-training handler jobs (``digits.train``, one per candidate) and a step
that picks the best (``digits.best``). ``jobmesh dev`` hosts those handlers when it runs
from a checkout with scikit-learn installed; otherwise the demo says so and runs
``examples/workflows/diamond.yaml``, which needs only ``sh``.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from pathlib import Path

import msgspec

from jobmesh.client.cli import render
from jobmesh.client.cli.workflows import display_for, follow, started_line
from jobmesh.client.client import Client
from jobmesh.client.workflows import WorkflowStatus, read_workflow_file
from jobmesh.contract.messages.v1 import (
    TERMINAL_STATES,
    JobRuntime,
    JobSpec,
    NoopRuntime,
    ProcessRuntime,
    Submission,
)
from jobmesh.dev.devcluster import EXAMPLES
from jobmesh.errors import JobmeshError, NotFound

DEMO_JOBS: list[tuple[str, JobRuntime]] = [
    ("hello", ProcessRuntime(argv=["echo", "hello from jobmesh"])),
    ("count", ProcessRuntime(argv=["sh", "-c", "for i in 1 2 3; do echo step $i; sleep 0.4; done"])),
    ("fails", ProcessRuntime(argv=["sh", "-c", "echo about to fail >&2; exit 3"])),
    ("noop", NoopRuntime()),
    ("uname", ProcessRuntime(argv=["uname", "-a"])),
]
# The workflows are found where `jobmesh dev` finds the handlers they call (devcluster's
# EXAMPLES: a checkout's examples/, which `make` installs the package from).
TRAIN_AND_PICK = EXAMPLES / "workflows" / "train-and-pick.yaml"
DIAMOND = EXAMPLES / "workflows" / "diamond.yaml"
# What train-and-pick calls (examples/handlers/digits.py).
DIGITS_HANDLERS = ("digits.train", "digits.best")


def command_path() -> str:
    """How to call ``jobmesh`` from here, as the user can paste it.

    ``make run`` runs the demo from the venv, which is usually not on PATH: the hint then
    names the venv's script relative to the current directory (``.venv/bin/jobmesh``).
    """
    script = Path(sys.executable).parent / "jobmesh"
    found = shutil.which("jobmesh")
    if found and Path(found).resolve() == script.resolve():
        return "jobmesh"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


async def run_demo(nats_url: str, timeout: float = 60.0, web_url: str = "") -> None:
    """Run the demo jobs, then the demo workflow, each shown live until it has ended.

    Args:
        nats_url: the cluster's NATS.
        timeout: how long each part (the jobs, the workflow) is followed at most; what is
            still running then goes on in the cluster.
        web_url: the dashboard's URL, to say where the workflow's graph is ("" for none).
    """
    client = await Client.connect(nats_url)
    try:
        await _run_jobs(client, timeout)
        await _run_workflow(client, timeout, web_url)
    finally:
        await client.close()


async def _run_jobs(client: Client, timeout: float) -> None:
    """Submit the demo jobs and redraw their states until all have ended."""
    reply = await client.submit([Submission(spec=JobSpec(runtime=rt, name=name)) for name, rt in DEMO_JOBS])
    names = dict(zip(reply.job_ids, (name for name, _ in DEMO_JOBS), strict=True))
    states: dict[str, str] = {job_id: "submitted" for job_id in names}
    started = time.monotonic()
    shown = ""
    while time.monotonic() - started < timeout:
        for job_id in names:
            try:
                view = await client.get(job_id)
            except NotFound:
                continue
            code = view.attempts[-1].exit_code if view.attempts else None
            states[job_id] = view.state + ("" if code is None else f" (exit {code})")
        table = "\n".join(f"  {names[j]:6} {j}  {states[j]}" for j in names)
        if table != shown:
            _say(f"demo jobs after {time.monotonic() - started:4.1f}s:\n{table}")
            shown = table
        if all(s.split(" ")[0] in TERMINAL_STATES for s in states.values()):
            break
        await asyncio.sleep(0.2)
    cli = command_path()
    _say(f"try: {cli} status {reply.job_ids[0]}   or   {cli} logs {reply.job_ids[1]}")


async def _run_workflow(client: Client, timeout: float, web_url: str = "") -> None:
    """Start the demo workflow, follow it with the CLI's live tree, then say what it made."""
    path = TRAIN_AND_PICK
    if not await _hosted(client, DIGITS_HANDLERS):
        _say(f"(no executor hosts {' and '.join(DIGITS_HANDLERS)}: the demo runs {DIAMOND.name} instead)")
        path = DIAMOND
    if not path.is_file():
        _say(f"(no {path} here, as in an installed package without the examples: no workflow to show)")
        return
    reply = await client.run_workflow(read_workflow_file(path))
    run_id = reply.run.run_id
    _say("")
    _say(f"workflow {path.relative_to(EXAMPLES.parent)}:")
    render.err(started_line(reply))  # the lines `jobmesh workflow run` prints, from here on
    if web_url:
        _say(f"its graph, live: {web_url}/#/workflows/{run_id}")
    display = display_for()
    try:
        status: WorkflowStatus | None = await asyncio.wait_for(follow(client, run_id, display), timeout)
    except TimeoutError:
        status = None
    finally:
        display.close()
    if status is None:
        _say(f"(still running after {timeout:g}s; it goes on in the cluster)")
    elif status.outcome == "succeeded":
        await _show_outcome(client, status)
    _say(f"try: {command_path()} workflow status {run_id}")


async def _show_outcome(client: Client, status: WorkflowStatus) -> None:
    """Print what the run made: the best model (train-and-pick) or the last step's output."""
    names = {s.name for s in status.steps}
    try:
        if "pick" in names:
            picked = msgspec.json.decode((await client.result(status.step("pick").job_id)).data)
            best = picked["best"]
            _say(
                f"  best model: {best['model']} scored {best['accuracy']:.3f} on {best['test_samples']} "
                f"held-out images (fit {best['fit_seconds']:.2f}s); ranking: {', '.join(picked['ranking'])}"
            )
        else:
            last = status.steps[-1]
            view = await client.get(last.job_id)
            output = view.attempts[-1].output_tail.strip() if view.attempts else ""
            _say(f"  {last.name} printed: {output}")
    except (JobmeshError, msgspec.DecodeError, KeyError) as exc:
        _say(f"  no result to show ({exc})")


async def _hosted(client: Client, handlers: tuple[str, ...]) -> bool:
    """Whether live nodes host every one of ``handlers``."""
    try:
        nodes = (await client.nodes()).nodes
    except JobmeshError:
        return False
    hosted = {h for view in nodes if view.alive for h in view.node.handlers}
    return all(h in hosted for h in handlers)


def _say(line: str) -> None:
    """The demo writes to stderr, beside the cluster's own lines."""
    print(line, file=sys.stderr, flush=True)
