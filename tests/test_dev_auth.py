"""`jobmesh dev` (authentication on by default): the dev cluster with one NATS key per
identity, used as documented in docs/operations.md ("Security"): the CLI as the client, the
operators' commands with the provisioner's key, and a node added while it runs. The server
refuses nothing of it. `--no-auth` runs it without keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _jobmesh(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from jobmesh.client.cli import main; main()", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dev_with_authentication_runs_jobs_and_takes_a_new_node(tmp_path: Path, postgres_server_url: str):
    # The commands find the cluster through .jobmesh/dev.env, as a user's shell does.
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBMESH_")}
    env["JOBMESH_DATABASE_URL"] = postgres_server_url
    started = _jobmesh(["dev", "--detach", "--reset"], tmp_path, env)
    try:
        assert started.returncode == 0, started.stderr
        settings = (tmp_path / ".jobmesh" / "dev.env").read_text()
        assert "JOBMESH_NATS_NKEY_FILE=" in settings and "JOBMESH_ADMIN_NKEY_FILE=" in settings
        assert "JOBMESH_INTEGRATOR_NKEY_FILE=" in settings
        ran = _jobmesh(["run", "--", "echo", "hello"], tmp_path, env)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == "hello"
        queue = _jobmesh(["queue", "set", "night", "--rate", "10"], tmp_path, env)
        assert queue.returncode == 0, queue.stderr
        added = _jobmesh(["dev", "--add-node", "gpu-1"], tmp_path, env)
        assert added.returncode == 0, added.stderr
        line = added.stdout.strip()
        assert line.startswith("JOBMESH_NATS_NKEY_FILE=") and line.endswith("executor-gpu-1.nk"), line
        log = (tmp_path / ".jobmesh" / "nats.log").read_text()
        assert "Violation" not in log, [entry for entry in log.splitlines() if "Violation" in entry][:5]
        # (An "authentication error" may be logged: --add-node tries the new key until the
        # reloaded server takes it.)
    finally:
        _jobmesh(["dev", "--stop"], tmp_path, env)


def test_dev_without_authentication_when_asked(tmp_path: Path, postgres_server_url: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBMESH_")}
    env["JOBMESH_DATABASE_URL"] = postgres_server_url
    started = _jobmesh(["dev", "--detach", "--no-auth", "--reset"], tmp_path, env)
    try:
        assert started.returncode == 0, started.stderr
        settings = (tmp_path / ".jobmesh" / "dev.env").read_text()
        assert "NKEY" not in settings, settings
        assert "include" not in (tmp_path / ".jobmesh" / "nats" / "nats.conf").read_text()
        ran = _jobmesh(["run", "--", "echo", "hello"], tmp_path, env)
        assert ran.returncode == 0 and ran.stdout.strip() == "hello", ran.stderr
    finally:
        _jobmesh(["dev", "--stop"], tmp_path, env)
