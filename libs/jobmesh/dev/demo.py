"""The short demo ``make run`` shows: a few jobs with a live status table."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from pathlib import Path

import msgspec

from jobmesh.client.client import Client
from jobmesh.contract.messages.v1 import (
    TERMINAL_STATES,
    HandlerRuntime,
    JobRuntime,
    JobSpec,
    NoopRuntime,
    ProcessRuntime,
    Submission,
)
from jobmesh.errors import JobmeshError, NotFound

DEMO_JOBS: list[tuple[str, JobRuntime]] = [
    ("hello", ProcessRuntime(argv=["echo", "hello from jobmesh"])),
    ("count", ProcessRuntime(argv=["sh", "-c", "for i in 1 2 3; do echo step $i; sleep 0.4; done"])),
    ("fails", ProcessRuntime(argv=["sh", "-c", "echo about to fail >&2; exit 3"])),
    ("noop", NoopRuntime()),
    ("uname", ProcessRuntime(argv=["uname", "-a"])),
]
# The shipped machine-learning handler (examples/handlers/digits.py), run when an executor
# hosts it: `jobmesh dev` loads it when scikit-learn is installed (make installs it).
DIGITS_HANDLER = "digits.train"
DIGITS_JOB: tuple[str, JobRuntime] = (
    "digits",
    HandlerRuntime(handler=DIGITS_HANDLER, input={"model": "svc", "test_fraction": 0.25}),
)


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


async def run_demo(nats_url: str, timeout: float = 60.0) -> None:
    """Submit the demo jobs and redraw their states until all have ended."""
    client = await Client.connect(nats_url)
    try:
        jobs = list(DEMO_JOBS)
        if await _hosted(client, DIGITS_HANDLER):
            jobs.append(DIGITS_JOB)
        else:
            print(f"(no executor hosts the {DIGITS_HANDLER} handler: the demo runs without it)", file=sys.stderr)
        reply = await client.submit([Submission(spec=JobSpec(runtime=rt, name=name)) for name, rt in jobs])
        names = dict(zip(reply.job_ids, (name for name, _ in jobs), strict=True))
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
                print(f"demo jobs after {time.monotonic() - started:4.1f}s:\n{table}", file=sys.stderr, flush=True)
                shown = table
            if all(s.split(" ")[0] in TERMINAL_STATES for s in states.values()):
                break
            await asyncio.sleep(0.2)
        cli = command_path()
        if len(jobs) > len(DEMO_JOBS):
            await _show_digits(client, reply.job_ids[-1])
        print(f"try: {cli} status {reply.job_ids[0]}   or   {cli} logs {reply.job_ids[1]}", file=sys.stderr)
    finally:
        await client.close()


async def _hosted(client: Client, handler: str) -> bool:
    """Whether a live node hosts ``handler``."""
    try:
        nodes = (await client.nodes()).nodes
    except JobmeshError:
        return False
    return any(view.alive and handler in view.node.handlers for view in nodes)


async def _show_digits(client: Client, job_id: str) -> None:
    """Print what the digits handler job returned (its result is the handler's JSON)."""
    try:
        score = msgspec.json.decode((await client.result(job_id)).data)
    except (JobmeshError, msgspec.DecodeError) as exc:
        print(f"  digits: no result ({exc})", file=sys.stderr)
        return
    print(
        f"  digits: {score['model']} scored {score['accuracy']:.3f} on {score['test_samples']} held-out images "
        f"(fit {score['fit_seconds']:.2f}s in handler worker {score['worker_pid']})",
        file=sys.stderr,
    )
