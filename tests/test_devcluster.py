"""``jobmesh dev`` remembers the database its state directory was made with, and its
embedded Postgres starts without warnings."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jobmesh.dev import devcluster
from jobmesh.dev.devcluster import EMBEDDED, DatabasePlan, Refusal, StateDir, plan_database, read_state, redacted
from tests.cluster_fixtures import jobmesh_cli

URL = "postgresql://jm:secret@db.example:5432/jobs"
OTHER = "postgresql://jm@other.example/jobs"
STATE = Path(".jobmesh")
NO_NATS = "nats://127.0.0.1:1"  # `jobmesh dev` starts its own nats-server and ignores JOBMESH_NATS_URL


def state(recorded: str | None = None, has_store: bool = False, has_embedded_data: bool = False) -> StateDir:
    return StateDir(STATE, recorded, has_store, has_embedded_data)


# --- the decision -----------------------------------------------------------------------


def test_a_new_state_directory_records_the_embedded_postgres_or_the_url() -> None:
    assert plan_database(state(), None, reset=False) == DatabasePlan(EMBEDDED, record=True)
    assert plan_database(state(), "", reset=False) == DatabasePlan(EMBEDDED, record=True)
    assert plan_database(state(), URL, reset=False) == DatabasePlan(URL, record=True)


def test_a_later_start_with_the_same_database_reuses_the_state() -> None:
    assert plan_database(state(EMBEDDED, True, True), None, reset=False) == DatabasePlan(EMBEDDED)
    assert plan_database(state(URL, True), URL, reset=False) == DatabasePlan(URL)


def test_a_url_state_started_without_the_variable_is_refused_saying_what_was_used() -> None:
    refusal = plan_database(state(URL, True), None, reset=False)
    assert isinstance(refusal, Refusal)
    message = refusal.message
    assert "JOBMESH_DATABASE_URL=postgresql://jm:***@db.example:5432/jobs" in message
    assert "secret" not in message
    assert "is not set" in message
    assert "Set JOBMESH_DATABASE_URL to that URL again" in message and ".jobmesh/database" in message
    assert "jobmesh dev --reset" in message and "remove .jobmesh/" in message


def test_a_url_state_started_with_another_url_is_refused_naming_both() -> None:
    refusal = plan_database(state(URL, True), OTHER, reset=False)
    assert isinstance(refusal, Refusal)
    assert "jm:***@db.example" in refusal.message and f"JOBMESH_DATABASE_URL is {OTHER}" in refusal.message


def test_an_embedded_state_started_with_a_url_is_refused() -> None:
    refusal = plan_database(state(EMBEDDED, True, True), URL, reset=False)
    assert isinstance(refusal, Refusal)
    assert "made with the embedded Postgres (in .jobmesh/pg)" in refusal.message
    assert "Unset JOBMESH_DATABASE_URL" in refusal.message and "jobmesh dev --reset" in refusal.message


def test_reset_starts_afresh_with_whatever_is_asked_for() -> None:
    assert plan_database(state(URL, True), None, reset=True) == DatabasePlan(EMBEDDED, wipe=True, record=True)
    assert plan_database(state(EMBEDDED, True, True), URL, reset=True) == DatabasePlan(URL, wipe=True, record=True)
    assert plan_database(state(), URL, reset=True) == DatabasePlan(URL, wipe=True, record=True)


def test_a_state_directory_from_before_the_record_is_judged_by_what_it_holds() -> None:
    # Embedded data there: the embedded Postgres was the database.
    assert plan_database(state(None, True, True), None, reset=False) == DatabasePlan(EMBEDDED, record=True)
    assert isinstance(plan_database(state(None, True, True), URL, reset=False), Refusal)
    assert plan_database(state(None, False, True), None, reset=False) == DatabasePlan(EMBEDDED, record=True)
    # A NATS store alone: some URL was, which one is not known.
    assert plan_database(state(None, True), URL, reset=False) == DatabasePlan(URL, record=True)
    refusal = plan_database(state(None, True), None, reset=False)
    assert isinstance(refusal, Refusal) and "Set JOBMESH_DATABASE_URL to that URL again" in refusal.message


def test_redacted_hides_only_the_password() -> None:
    assert redacted(URL) == "postgresql://jm:***@db.example:5432/jobs"
    assert redacted(OTHER) == OTHER
    assert redacted("postgresql://:pw@host/db") == "postgresql://:***@host/db"


def test_read_state_sees_the_record_the_store_and_the_embedded_data(tmp_path: Path) -> None:
    assert read_state(tmp_path / "none") == StateDir(tmp_path / "none", None, False, False)
    (tmp_path / "nats").mkdir()
    (tmp_path / "pg").mkdir()
    (tmp_path / "database").write_text(EMBEDDED + "\n")
    assert read_state(tmp_path) == StateDir(tmp_path, EMBEDDED, True, True)


# --- the real commands ------------------------------------------------------------------


@pytest.mark.integration
async def test_a_state_made_with_a_url_is_refused_without_it_and_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], database_url: str
) -> None:
    # `jobmesh dev --detach` runs in a process of its own, as a user runs it: its
    # background cluster must not be a child of this test process, which would never reap it.
    env = dict(os.environ, JOBMESH_DATABASE_URL=database_url)
    try:
        started = jobmesh_cli(["dev", "--detach"], NO_NATS, timeout=180, cwd=tmp_path, env=env)
        assert started.returncode == 0, started.stderr  # returns once every service is healthy
        record = tmp_path / ".jobmesh" / "database"
        assert record.read_text() == database_url + "\n"
        assert stat.S_IMODE(record.stat().st_mode) == 0o600
    finally:
        stopped = jobmesh_cli(["dev", "--stop"], NO_NATS, timeout=90, cwd=tmp_path, env=env)
        assert stopped.returncode == 0, stopped.stderr
    assert (tmp_path / ".jobmesh" / "nats").is_dir()
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / ".jobmesh").rglob("*"))

    del env["JOBMESH_DATABASE_URL"]
    refused = jobmesh_cli(["dev", "--detach"], NO_NATS, cwd=tmp_path, env=env)
    assert refused.returncode == 1, refused.stderr
    assert "but JOBMESH_DATABASE_URL is not set" in refused.stderr and "jobmesh dev --reset" in refused.stderr
    # The foreground command refuses the same way, before it starts anything.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JOBMESH_DATABASE_URL", raising=False)
    assert devcluster.foreground() == 1
    assert "but JOBMESH_DATABASE_URL is not set" in capsys.readouterr().err
    # Nothing started, nothing written: no embedded Postgres beside the old NATS store.
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / ".jobmesh").rglob("*")) == before
    assert not (tmp_path / ".jobmesh" / "pg").exists()


@pytest.mark.integration
def test_the_embedded_postgres_starts_without_a_runtime_dir_warning(tmp_path: Path) -> None:
    pytest.importorskip("pgserver")
    state_dir = tmp_path / ".jobmesh"
    state_dir.mkdir(mode=0o755)  # as `jobmesh dev` makes it, before Postgres starts
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    script = (
        "import os\n"
        "from jobmesh.dev.servers import embedded_postgres\n"
        f"s = embedded_postgres({str(state_dir / 'pg')!r})\n"
        "print(s.get_uri())\n"
        "print(os.environ.get('XDG_RUNTIME_DIR'))\n"
        "s.cleanup()\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr
    uri, runtime_dir = result.stdout.splitlines()
    assert uri.startswith("postgresql://")
    assert runtime_dir == "None"  # the services started later see the caller's environment
    assert stat.S_IMODE((state_dir / "run").stat().st_mode) == 0o700


# --- the dashboard ------------------------------------------------------------------------
class _Recorder:
    """Stands in for a LocalCluster: records what start_service is asked to start."""

    def __init__(self) -> None:
        self.started: list[tuple[str, dict[str, str]]] = []

    def start_service(self, name: str, extra_env: dict[str, str] | None = None) -> None:
        self.started.append((name, dict(extra_env or {})))


@pytest.mark.parametrize("token", [None, "given-token"])
def test_the_dashboard_gets_no_token_setting_of_the_caller(token: str | None) -> None:
    recorder = _Recorder()
    devcluster.start_dashboard(recorder, 8123, token=token)  # type: ignore[arg-type]
    ((name, env),) = recorder.started
    assert name == "web"
    assert env["JOBMESH_WEB_LISTEN"] == "127.0.0.1:8123"
    # Blanked, so a JOBMESH_WEB_TOKEN_FILE in the developer's shell cannot put a token in.
    assert env["JOBMESH_WEB_TOKEN_FILE"] == ""
    assert env["JOBMESH_WEB_TOKEN"] == (token or "")
    assert env["JOBMESH_WEB_OPEN_ON_LOOPBACK"] == ("" if token else "1")


def test_python_m_jobmesh_web_reads_the_open_flag_from_the_environment(tmp_path: Path) -> None:
    env = {**os.environ, "JOBMESH_WEB_LISTEN": "127.0.0.1:0", "JOBMESH_WEB_TOKEN": "", "JOBMESH_WEB_TOKEN_FILE": ""}
    env.pop("JOBMESH_WEB_OPEN_ON_LOOPBACK", None)
    env["JOBMESH_NATS_URL"], env["JOBMESH_WEB_WAIT"] = NO_NATS, "1"
    refused = subprocess.run([sys.executable, "-m", "jobmesh.web"], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--open-on-loopback" in refused.stderr, refused.stderr
    env["JOBMESH_WEB_OPEN_ON_LOOPBACK"] = "1"
    opened = subprocess.run([sys.executable, "-m", "jobmesh.web"], env=env, capture_output=True, text=True, timeout=60)
    # Past the token check: it waits for NATS (unreachable here) and gives up.
    assert opened.returncode == 2 and "cannot reach NATS" in opened.stderr, opened.stderr
