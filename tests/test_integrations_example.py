"""The integration example of docs/integrations.md runs as written against a real cluster.

``examples/integrations/nats_py_client.py`` uses nats-py and the standard library only; it
runs here in its own process (so nothing of jobmesh is imported into it) against the five
services on a real nats-server and Postgres: it submits a job, fires a rule with an event,
follows both jobs through their lifecycle events and reads one back.
"""

from __future__ import annotations

import ast
import asyncio
import json
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "integrations" / "nats_py_client.py"


def test_the_example_imports_nothing_of_jobmesh() -> None:
    tree = ast.parse(EXAMPLE.read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "jobmesh" not in imported
    allowed = {"argparse", "asyncio", "hashlib", "json", "sys", "time", "uuid", "typing", "nats"}
    assert imported - {"__future__"} <= allowed


async def test_the_nats_py_example_submits_fires_and_follows(cluster, nats_server) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",  # isolated: no current directory or user site on the path
        str(EXAMPLE),
        "--url",
        nats_server.url,
        "--timeout",
        "90",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=150)
    assert process.returncode == 0, stderr.decode(errors="replace") + stdout.decode(errors="replace")
    lines = [json.loads(line) for line in stdout.decode().splitlines()]
    submitted = next(line for line in lines if "submitted" in line)
    fired = next(line for line in lines if "fires" in line)["fires"]
    events = [(line["job_id"], line["event"]) for line in lines if "event" in line]
    for job_id in (submitted["submitted"], fired):
        kinds = [kind for j, kind in events if j == job_id]
        assert kinds[0] == "job.submitted" and kinds[-1] == "job.succeeded", (job_id, kinds)
    final = lines[-1]
    assert final["state"] == "succeeded" and "hello from nats-py" in final["output"]
