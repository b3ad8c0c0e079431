"""The ``jobmesh`` command line: what a new user runs into, against a real cluster.

Each integration test runs the real command in a subprocess against the module's cluster
(five service processes, real NATS and Postgres). The rules behind it that are pure (how
``run`` keeps a job from going backwards, how a held job resolves to "waiting", how
``queues`` words what jobs wait for, how a broken plugin command is shown) are tested
directly, without a cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

from jobmesh.client.cli import render, run_command
from jobmesh.client.cli.parser import PLUGIN_GROUP, build_parser
from jobmesh.client.jobstate import Seen, goes_back, resolve
from jobmesh.contract import subjects
from jobmesh.contract.ids import job_id_for
from jobmesh.contract.messages.v1 import ExplainReply, QueueStats
from jobmesh.dev.cluster import LocalCluster
from tests.cluster_fixtures import NODE_ID, jobmesh_cli, submitted_job_id
from tests.helpers import eventually

integration = pytest.mark.integration
UNKNOWN_JOB = "0" * 32


def _json_of(result) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- logs of a job nobody knows ------------------------------------------------------------
@integration
@pytest.mark.parametrize("follow", [[], ["-f"]], ids=["once", "follow"])
async def test_logs_of_an_unknown_job_says_so_and_exits_4(cluster, nats_server, follow):
    result = jobmesh_cli(["logs", *follow, UNKNOWN_JOB], nats_server.url, timeout=30)
    assert result.returncode == 4, result.stderr
    assert f"job {UNKNOWN_JOB} is not known" in result.stderr
    assert result.stdout == ""


# --- list: refused states, and the state status shows ----------------------------------------
@integration
async def test_list_refuses_an_unknown_state_naming_the_valid_ones(nats_server):
    result = jobmesh_cli(["list", "--state", "bogus"], nats_server.url)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("usage: jobmesh list")
    for state in ("queued", "waiting", "ready", "bound", "running", "succeeded", "failed", "expired", "lost"):
        assert repr(state) in result.stderr
    assert result.stdout == ""


@integration
async def test_a_delayed_job_is_waiting_in_status_list_and_queues(cluster, nats_server):
    url = nats_server.url
    submitted = _json_of(jobmesh_cli(["submit", "--json", "--noop", "--delay", "60", "--queue", "held"], url))
    job_id = submitted["job_id"]

    async def waiting_in_status():
        status = _json_of(jobmesh_cli(["status", job_id, "--json"], url))
        return status if status["state"] == "waiting" else None

    status = await eventually(waiting_in_status, what="status to show the delayed job waiting")
    assert status["reason"], status  # the scheduler says what it waits for

    waiting = _json_of(jobmesh_cli(["list", "--state", "waiting", "--json"], url))
    [row] = [j for j in waiting if j["job_id"] == job_id]
    # The same reason, but for its countdown ("... (in 59s)"), which moves between the two calls.
    assert row["state"] == "waiting" and _without_countdown(row["reason"]) == _without_countdown(status["reason"])
    assert all(j["state"] == "waiting" for j in waiting)
    queued = _json_of(jobmesh_cli(["list", "--state", "queued", "--json"], url))
    assert job_id not in [j["job_id"] for j in queued]

    table = jobmesh_cli(["list"], url)
    assert table.returncode == 0, table.stderr
    [line] = [line for line in table.stdout.splitlines() if line.startswith(job_id)]
    assert line.split()[1] == "waiting"

    queues = jobmesh_cli(["queues"], url)
    assert queues.returncode == 0, queues.stderr
    [held] = [line for line in queues.stdout.splitlines() if line.startswith("held ")]
    assert re.search(r"\S \(1\)$", held), held  # "<why it waits> (1)", not "timer=1"


def _without_countdown(reason: str) -> str:
    return re.sub(r" \(in [^)]*\)$", "", reason)


# --- bad delays ------------------------------------------------------------------------------
@integration
async def test_a_negative_delay_is_refused_naming_the_flag(nats_server):
    result = jobmesh_cli(["submit", "--delay", "-5", "--", "true"], nats_server.url)
    assert result.returncode == 1, result.stderr
    assert "--delay" in result.stderr
    assert result.stdout == ""


@integration
async def test_a_delay_past_the_queue_timeout_is_refused_and_nothing_is_created(cluster, nats_server):
    key = "cli-delay-past-queue-timeout"
    result = jobmesh_cli(
        ["submit", "--key", key, "--delay", "10", "--queue-timeout", "3", "--", "true"], nats_server.url
    )
    assert result.returncode == 1, result.stderr
    assert "timeouts.queue" in result.stderr and "--queue-timeout" in result.stderr
    assert jobmesh_cli(["status", job_id_for(key)], nats_server.url).returncode == 4


# --- run: Ctrl-C -----------------------------------------------------------------------------
@integration
async def test_ctrl_c_on_run_says_the_job_keeps_running_and_how_to_follow_it(cluster, nats_server):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from jobmesh.client.cli import main; main()",
        "run",
        "--noop",
        "--delay",
        "60",
        "--queue",
        "interrupted",
        env=dict(os.environ, JOBMESH_NATS_URL=nats_server.url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        first = await asyncio.wait_for(proc.stderr.readline(), 30)
        job_id = submitted_job_id(first.decode())
        proc.send_signal(signal.SIGINT)
        _, rest = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130
    said = rest.decode()
    assert f"job {job_id} keeps running" in said, said
    assert f"jobmesh status {job_id}" in said and f"jobmesh logs -f {job_id}" in said
    status = _json_of(jobmesh_cli(["status", job_id, "--json"], nats_server.url))
    assert status["state"] in ("queued", "waiting"), status  # still there, still held by its delay


# --- unknown options -------------------------------------------------------------------------
@integration
@pytest.mark.parametrize(
    "argv, command",
    [
        (["status", "--bogus", "x"], "status"),
        (["list", "--frobnicate"], "list"),
        (["submit", "--bogus", "--", "true"], "submit"),
        (["run", "--bogus", "--", "true"], "run"),
        (["queue", "set", "q", "--bogus"], "queue set"),
    ],
)
async def test_an_unknown_option_prints_the_subcommands_usage(nats_server, argv, command):
    result = jobmesh_cli(argv, nats_server.url)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"usage: jobmesh {command} "), result.stderr
    assert "unrecognized arguments: --bogus" in result.stderr or "--frobnicate" in result.stderr


@integration
async def test_everything_after_the_double_dash_is_the_command(cluster, nats_server):
    result = jobmesh_cli(["run", "--", "echo", "--bogus", "-x"], nats_server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["--bogus -x"]


# --- nodes: disk and datasets ----------------------------------------------------------------
@integration
async def test_nodes_shows_disk_and_datasets(cluster, nats_server, database_url, tmp_path):
    data = LocalCluster(
        nats_server.url,
        database_url,
        tmp_path,
        env={
            "JOBMESH_NODE_ID": "data-1",
            "JOBMESH_NODE_CPU_MILLI": "1000",
            "JOBMESH_NODE_MEMORY_MB": "1024",
            "JOBMESH_NODE_DISK_MB": "2048",
            "JOBMESH_NODE_DATASETS": "imagenet,wiki",
        },
    )
    data.start(("executor",))
    try:

        async def data_node_alive():
            nodes = _json_of(jobmesh_cli(["nodes", "--json"], nats_server.url))
            return [n for n in nodes if n["node"]["node_id"] == "data-1" and n["alive"]]

        [view] = await eventually(data_node_alive, what="the data node to register")
        assert view["node"]["datasets"] == ["imagenet", "wiki"] and view["node"]["disk_mb"] == 2048
        result = jobmesh_cli(["nodes"], nats_server.url)
        assert result.returncode == 0, result.stderr
        header, *rows = result.stdout.splitlines()
        assert "DISK (MiB) used/cap" in header and "DATASETS" in header
        [row] = [r for r in rows if r.startswith("data-1 ")]
        assert re.search(r"\b0/2048\b", row) and "imagenet,wiki" in row, row
        [e2e] = [r for r in rows if r.startswith(f"{NODE_ID} ")]
        assert re.search(r"\b\d+/10240\b", e2e), e2e  # the executor's default disk
    finally:
        data.stop()


# --- configuration read back -----------------------------------------------------------------
@integration
async def test_tenant_and_queue_settings_read_back(cluster, nats_server, nc):
    url = nats_server.url
    assert jobmesh_cli(["tenant", "set", "cli-tenant", "--weight", "3"], url).returncode == 0
    assert jobmesh_cli(["queue", "set", "cli-queue", "--rate", "2", "--max-in-flight", "5"], url).returncode == 0

    tenants = _json_of(jobmesh_cli(["tenant", "list", "--json"], url))
    assert {"tenant": "cli-tenant", "weight": 3.0} in tenants
    queues = _json_of(jobmesh_cli(["queue", "list", "--json"], url))
    assert {
        "queue": "cli-queue",
        "rate": 2.0,
        "burst": 0,
        "max_in_flight": 5,
        "preempt_min_priority": None,
        "preemptible_fraction": 1.0,
    } in queues

    plain = jobmesh_cli(["queue", "list"], url)
    assert plain.returncode == 0, plain.stderr
    [row] = [line for line in plain.stdout.splitlines() if line.startswith("cli-queue ")]
    assert row.split() == ["cli-queue", "2/s", "-", "5", "-", "100%"]  # no preemption policy, no cap

    # A hand-written bad value is shown as ignored, beside the good ones.
    kv = await nc.jetstream().key_value(subjects.KV_CONFIG)
    await kv.put("tenant.cli-bad", b'{"weight": -1}')
    listed = jobmesh_cli(["tenant", "list"], url)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split() == ["cli-tenant", "3"] for line in listed.stdout.splitlines()), listed.stdout
    assert "tenant.cli-bad holds an invalid value" in listed.stderr
    await kv.delete("tenant.cli-bad")


@integration
async def test_zones_show_prints_what_zones_set_reads(cluster, nats_server, tmp_path):
    zones = {"distances": {"eu-1": {"eu-2": 5, "us-1": 80}}, "default": 120}
    path = tmp_path / "zones.json"
    path.write_text(json.dumps(zones))
    result = jobmesh_cli(["zones", "set", str(path)], nats_server.url)
    assert result.returncode == 0, result.stderr

    shown = _json_of(jobmesh_cli(["zones", "show", "--json"], nats_server.url))
    assert shown == zones
    plain = jobmesh_cli(["zones", "show"], nats_server.url)
    assert plain.returncode == 0, plain.stderr
    assert "default distance 120" in plain.stdout
    assert any(line.split() == ["eu-1", "us-1", "80"] for line in plain.stdout.splitlines()), plain.stdout


# --- plugin commands -------------------------------------------------------------------------
@integration
async def test_provision_and_dev_come_from_their_entry_points(cluster, nats_server):
    helped = jobmesh_cli(["--help"], nats_server.url)
    assert helped.returncode == 0, helped.stderr
    assert "provision" in helped.stdout and "dev" in helped.stdout and "unavailable" not in helped.stdout
    provisioned = jobmesh_cli(["provision"], nats_server.url)
    assert provisioned.returncode == 0, provisioned.stderr
    assert "provisioned" in provisioned.stderr


def test_a_plugin_that_fails_to_load_is_listed_unavailable_and_the_rest_work(capsys):
    parser = build_parser(
        plugins=[
            EntryPoint(name="broken", value="jobmesh.no_such_module:register", group=PLUGIN_GROUP),
            EntryPoint(name="provision", value="jobmesh.runtime.commands:register", group=PLUGIN_GROUP),
        ]
    )
    text = parser.format_help()
    assert re.search(r"broken\s+\(unavailable: ModuleNotFoundError", text), text
    assert "provision" in text

    code = run_command(parser.parse_args(["broken", "--any", "thing"]))
    assert code == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "the broken command is unavailable" in err[0] and "jobmesh.no_such_module" in err[0]
    assert parser.parse_args(["status", "x"]).job_id == "x"


# --- pure rules ------------------------------------------------------------------------------
def _shown(sequence: list[Seen]) -> list[str]:
    """What ``run`` shows for states learnt in this order (its rule, without the I/O)."""
    shown: Seen | None = None
    out = []
    for seen in sequence:
        if goes_back(shown, seen) or seen == shown:
            continue
        out.append(seen.state)
        shown = seen
    return out


def test_run_never_shows_a_state_below_one_it_showed_for_the_same_attempt():
    bound = Seen("bound", attempt=1, node_id="vm")
    # The race a user saw: a poll brought "ready" after the watch had said "bound".
    learnt = [
        Seen("queued"),
        Seen("ready", attempt=1),
        bound,
        Seen("ready", attempt=1),
        Seen("waiting", "no room", attempt=1),
        Seen("running", attempt=1, node_id="vm"),
        bound,
        Seen("succeeded", attempt=1, node_id="vm", exit_code=0),
    ]
    assert _shown(learnt) == ["queued", "ready", "bound", "running", "succeeded"]


def test_pre_running_states_move_freely_and_a_later_attempt_always_moves_forward():
    ready = Seen("ready", attempt=1)
    assert not goes_back(ready, Seen("waiting", "candidates full", attempt=1))  # the binder found no room
    assert not goes_back(Seen("waiting", "rate limit", attempt=0), Seen("queued"))
    assert not goes_back(Seen("lost", attempt=1), Seen("queued", attempt=2))
    assert goes_back(Seen("running", attempt=2), Seen("succeeded", attempt=1))  # a stale attempt
    assert goes_back(Seen("ready", attempt=1), Seen("queued", attempt=0))
    assert not goes_back(None, Seen("succeeded", attempt=3))


def test_a_held_job_resolves_to_waiting_with_the_schedulers_reason():
    def explained(where: str, reason: str) -> ExplainReply:
        return ExplainReply(job_id=UNKNOWN_JOB, where=where, reason=reason)

    assert resolve("queued", "", explained("timer", "delayed until 12:00")) == ("waiting", "delayed until 12:00")
    assert resolve("ready", "", explained("parked", "no node with gpu kind h100")) == (
        "waiting",
        "no node with gpu kind h100",
    )
    assert resolve("queued", "", explained("ready", "queued: next when its turn comes")) == ("queued", "")
    assert resolve("queued", "", explained("ready", "queue rate limit 1/s")) == ("waiting", "queue rate limit 1/s")
    assert resolve("ready", "", explained("released", "released to the binder")) == (
        "ready",
        "released to the binder",
    )
    # The scheduler no longer holds it, or the tracker already saw it bound: the tracker's word.
    assert resolve("queued", "x", explained("", "")) == ("queued", "x")
    assert resolve("bound", "", explained("timer", "stale")) == ("bound", "")
    assert resolve("queued", "", None) == ("queued", "")


def test_queues_words_what_jobs_wait_for_most_common_first():
    assert render.waiting_text({"parked": 3, "timer": 1, "no node with gpu kind h100": 5}) == (
        "no node with gpu kind h100 (5); parked (3); timer (1)"
    )
    assert render.waiting_text({}) == "-"
    stats = QueueStats(
        queue="q",
        pending=3,
        in_flight=0,
        tenants={},
        waiting={"timer": 2, "ready": 1},
        reasons={"delayed until its start time (not_before)": 2},
    )
    assert render.queue_waiting(stats) == "delayed until its start time (not_before) (2)"
    older = QueueStats(queue="q", pending=3, in_flight=0, tenants={}, waiting={"timer": 2, "ready": 1})
    assert render.queue_waiting(older) == "timer (2)"


def test_output_piped_into_a_reader_that_stops_early_is_no_error(cluster, nats_server):
    # `jobmesh logs ID | head -1`: the reader goes away after one line while the command
    # still writes; it must end quietly, without a traceback about the broken pipe.
    env = dict(os.environ, JOBMESH_NATS_URL=nats_server.url)
    run = jobmesh_cli(["run", "--", "sh", "-c", "seq 1 20000"], nats_server.url, timeout=120)
    assert run.returncode == 0, run.stderr
    job_id = submitted_job_id(run.stderr)
    cli = f'"{sys.executable}" -c "from jobmesh.client.cli import main; main()"'
    result = subprocess.run(
        ["sh", "-c", f"{cli} logs {job_id} | head -1"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.stdout == "1\n", result.stdout[:200]
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
