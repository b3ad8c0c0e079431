"""The short demo ``make run`` shows: a few jobs with a live status table."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from pathlib import Path

from jobmesh.client.client import Client
from jobmesh.contract.messages.v1 import TERMINAL_STATES, JobRuntime, JobSpec, NoopRuntime, ProcessRuntime, Submission
from jobmesh.errors import NotFound

DEMO_JOBS: list[tuple[str, JobRuntime]] = [
    ("hello", ProcessRuntime(argv=["echo", "hello from jobmesh"])),
    ("count", ProcessRuntime(argv=["sh", "-c", "for i in 1 2 3; do echo step $i; sleep 0.4; done"])),
    ("fails", ProcessRuntime(argv=["sh", "-c", "echo about to fail >&2; exit 3"])),
    ("noop", NoopRuntime()),
    ("uname", ProcessRuntime(argv=["uname", "-a"])),
]


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
                print(f"demo jobs after {time.monotonic() - started:4.1f}s:\n{table}", file=sys.stderr, flush=True)
                shown = table
            if all(s.split(" ")[0] in TERMINAL_STATES for s in states.values()):
                break
            await asyncio.sleep(0.2)
        cli = command_path()
        print(f"try: {cli} status {reply.job_ids[0]}   or   {cli} logs {reply.job_ids[1]}", file=sys.stderr)
    finally:
        await client.close()
