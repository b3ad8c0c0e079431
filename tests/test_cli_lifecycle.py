"""The job lifecycle from the command line, against a real cluster: cancel, retries seen by
``run``, progress in ``watch``, results, dead letters and their replay.

Each test runs the real ``jobmesh`` command in a subprocess against the module's cluster
(five service processes, real NATS and Postgres) and checks what the tracker recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import msgspec
import pytest

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import DeadLetter
from tests.cluster_fixtures import job_status, jobmesh_cli, submitted_job_id
from tests.helpers import eventually

pytestmark = pytest.mark.integration
UNKNOWN_JOB = "0" * 32


def _json_of(result) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def _recorded(job_id: str, url: str) -> dict | None:
    """The tracker's view of the job, None while it has not recorded it."""
    result = jobmesh_cli(["status", job_id, "--json"], url)
    return json.loads(result.stdout) if result.returncode == 0 else None


# --- cancel ----------------------------------------------------------------------------------
async def test_cancelling_a_queued_job_ends_it_cancelled_and_final(cluster, nats_server):
    url = nats_server.url
    job_id = _json_of(jobmesh_cli(["submit", "--json", "--noop", "--delay", "60", "--queue", "lc-cancel"], url))[
        "job_id"
    ]
    await eventually(lambda: _recorded(job_id, url), what="the tracker to record the delayed job")

    cancelled = _json_of(jobmesh_cli(["cancel", job_id, "--reason", "changed my mind", "--json"], url))
    assert cancelled["job_id"] == job_id and cancelled["state"] == "cancelled", cancelled

    async def ended_cancelled():
        status = await _recorded(job_id, url)
        return status if status and status["state"] == "cancelled" and status["final"] else None

    status = await eventually(ended_cancelled, what="the job to end cancelled")
    assert "started" not in [e["kind"] for e in status["events"]], status["events"]
    assert "cancelled" in [e["kind"] for e in status["events"]], status["events"]

    again = jobmesh_cli(["cancel", job_id], url)
    assert again.returncode == 0, again.stderr
    assert "already ended cancelled" in again.stdout


async def test_cancelling_a_finished_job_is_a_no_op_that_says_so(cluster, nats_server):
    url = nats_server.url
    ran = jobmesh_cli(["run", "--noop", "--queue", "lc-done"], url)
    assert ran.returncode == 0, ran.stderr
    job_id = submitted_job_id(ran.stderr)

    result = jobmesh_cli(["cancel", job_id], url)
    assert result.returncode == 0, result.stderr
    assert f"job {job_id} already ended succeeded; nothing to cancel" in result.stdout
    as_json = _json_of(jobmesh_cli(["cancel", job_id, "--json"], url))
    assert as_json == {"job_id": job_id, "state": "ended", "message": "already ended succeeded"}
    status = job_status(job_id, url)
    assert status["state"] == "succeeded" and status["final"] is True
    assert "cancelled" not in [e["kind"] for e in status["events"]]


async def test_cancelling_an_unknown_job_exits_4(cluster, nats_server):
    result = jobmesh_cli(["cancel", UNKNOWN_JOB], nats_server.url)
    assert result.returncode == 4, result.stderr
    assert UNKNOWN_JOB in result.stderr and result.stdout == ""


# --- run with retries ------------------------------------------------------------------------
async def test_run_shows_the_retry_and_exits_3_once_the_job_is_final(cluster, nats_server):
    url = nats_server.url
    result = jobmesh_cli(
        ["run", "--retries", "1", "--backoff", "0.2", "--queue", "lc-retry", "--", "sh", "-c", "echo try; exit 5"], url
    )
    assert result.returncode == 3, result.stderr
    timeline = [line.removeprefix("jobmesh: ") for line in result.stderr.splitlines()]
    retrying = [i for i, line in enumerate(timeline) if re.match(r"\[\s*\d+\.\d\ds\] retrying\b", line)]
    assert retrying, result.stderr
    # The tracker announces one update per job per committed batch, so the first attempt's
    # failure may arrive folded into the retry; the retry line names it either way.
    assert "after attempt 1: exit_code: exited with code 5" in timeline[retrying[0]], result.stderr
    # The last line is the end: the second attempt failed, and the job is final.
    assert re.match(r"\[\s*\d+\.\d\ds\] failed \(final, attempt 2\b", timeline[-1]), result.stderr
    assert result.stdout.splitlines() == ["try", "try"]  # both attempts' output

    status = job_status(submitted_job_id(result.stderr), url)
    assert status["final"] is True and status["state"] == "failed"
    assert [(a["attempt"], a["state"], a["exit_code"]) for a in status["attempts"]] == [
        (1, "failed", 5),
        (2, "failed", 5),
    ]
    assert "retrying" in [e["kind"] for e in status["events"]]
    shown = jobmesh_cli(["status", submitted_job_id(result.stderr)], url)
    assert shown.returncode == 0, shown.stderr
    assert "final    yes" in shown.stdout
    assert re.search(r"^  #1  failed .* exit 5$", shown.stdout, re.M), shown.stdout
    assert re.search(r"^      retry: .*released \d+\.\d\ds later\)$", shown.stdout, re.M), shown.stdout


# --- watch and progress ----------------------------------------------------------------------
async def test_watch_shows_the_progress_a_job_reports(cluster, nats_server):
    url = nats_server.url
    # The job reports half done, then waits until the test has seen that in watch's output
    # and put go-on into its working directory (the one place a sandboxed job sees).
    script = (
        "import os, pathlib, time\n"
        "os.write(int(os.environ['JOBMESH_PROGRESS_FD']), b'progress 0.5 half\\n')\n"
        "while not pathlib.Path('go-on').exists():\n"
        "    time.sleep(0.05)\n"
    )
    job_id = _json_of(
        jobmesh_cli(["submit", "--json", "--queue", "lc-watch", "--", sys.executable, "-c", script], url)
    )["job_id"]
    await eventually(lambda: _recorded(job_id, url), what="the tracker to record the job")

    async def workdir() -> list[Path]:
        return list((cluster.work_dir / "nodes").glob(f"*/{job_id}-1"))

    workdirs = await eventually(workdir, what="the job's working directory")

    def go_on() -> None:
        if workdirs[0].exists():
            (workdirs[0] / "go-on").touch()

    watch = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from jobmesh.client.cli import main; main()",
        "watch",
        job_id,
        env=dict(os.environ, JOBMESH_NATS_URL=url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    seen: list[str] = []
    try:

        async def progress_line() -> None:
            while True:
                line = (await watch.stderr.readline()).decode()
                assert line, f"watch ended before it showed the progress: {seen}"
                seen.append(line.rstrip("\n"))
                if "progress" in line:
                    return

        await asyncio.wait_for(progress_line(), 30)
        go_on()
        _, rest = await asyncio.wait_for(watch.communicate(), 30)
    finally:
        go_on()
        if watch.returncode is None:
            watch.kill()
            await watch.wait()
    assert watch.returncode == 0, (seen, rest)
    assert re.fullmatch(r"jobmesh: \[\s*\d+\.\d\ds\] progress 50% half", seen[-1]), seen
    assert any(re.search(r"\] running \(node ", line) for line in seen), seen
    ended = rest.decode().splitlines()
    assert re.search(r"\] succeeded \(node ", ended[-1]), ended


async def test_watch_of_a_job_that_has_ended_says_so_and_exits_with_its_outcome(cluster, nats_server):
    url = nats_server.url
    ran = jobmesh_cli(["run", "--queue", "lc-watch", "--", "sh", "-c", "exit 4"], url)
    assert ran.returncode == 3, ran.stderr
    job_id = submitted_job_id(ran.stderr)
    result = jobmesh_cli(["watch", job_id], url)
    assert result.returncode == 3, result.stderr
    assert f"job {job_id} already ended failed" in result.stderr
    unknown = jobmesh_cli(["watch", UNKNOWN_JOB], url)
    assert unknown.returncode == 4, unknown.stderr


# --- results ---------------------------------------------------------------------------------
async def test_result_prints_what_the_job_wrote_inline_or_from_the_object_store(cluster, nats_server, tmp_path):
    url = nats_server.url
    small = jobmesh_cli(
        ["run", "--queue", "lc-result", "--", "sh", "-c", 'printf "answer: 42" > "$JOBMESH_RESULT_PATH"'], url
    )
    assert small.returncode == 0, small.stderr
    job_id = submitted_job_id(small.stderr)
    shown = jobmesh_cli(["result", job_id], url)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "answer: 42"
    [attempt] = job_status(job_id, url)["attempts"]
    assert attempt["result"] == "answer: 42" and attempt["result_bytes"] == 10

    # Past the inline limit (16 KiB) the result goes to jm_results; -o writes it to a file.
    big = jobmesh_cli(
        [
            "run",
            "--queue",
            "lc-result",
            "--",
            "sh",
            "-c",
            'head -c 100000 /dev/zero | tr "\\0" x > "$JOBMESH_RESULT_PATH"',
        ],
        url,
    )
    assert big.returncode == 0, big.stderr
    big_id = submitted_job_id(big.stderr)
    [stored] = job_status(big_id, url)["attempts"]
    assert stored["result_ref"] == subjects.result_key(big_id, 1) and stored["result_bytes"] == 100_000
    out = tmp_path / "result.bin"
    written = jobmesh_cli(["result", big_id, "-o", str(out)], url)
    assert written.returncode == 0, written.stderr
    assert out.read_bytes() == b"x" * 100_000
    assert f"wrote 100000 bytes (attempt 1) to {out}" in written.stderr


async def test_result_of_a_job_without_one_exits_4_and_says_why(cluster, nats_server):
    url = nats_server.url
    ran = jobmesh_cli(["run", "--queue", "lc-result", "--", "true"], url)
    assert ran.returncode == 0, ran.stderr
    job_id = submitted_job_id(ran.stderr)
    none = jobmesh_cli(["result", job_id], url)
    assert none.returncode == 4, none.stderr
    assert "without writing a result file" in none.stderr and none.stdout == ""
    other = jobmesh_cli(["result", job_id, "--attempt", "2"], url)
    assert other.returncode == 4 and "has no attempt 2" in other.stderr, other.stderr
    assert jobmesh_cli(["result", UNKNOWN_JOB], url).returncode == 4


# --- dead letters ----------------------------------------------------------------------------
async def test_dead_letters_lists_a_refused_message_and_replay_republishes_it(cluster, nats_server, nc):
    url = nats_server.url
    js = nc.jetstream()
    subject = subjects.job_event(0, subjects.STARTED)  # only the tracker reads it
    payload = b'{"type": "job.started", "job_id": "lc-dead-letter", oops'
    await js.publish(subject, payload, headers={"Nats-Msg-Id": "lc-dead-letter"})

    async def listed():
        letters = _json_of(jobmesh_cli(["dead-letters", "--service", "tracker", "--json"], url))
        return [d for d in letters if d["subject"] == subject and "lc-dead-letter" in d["payload_head"]]

    [letter] = await eventually(listed, timeout=30, what="the tracker to dead-letter the malformed message")
    assert letter["service"] == "tracker" and "malformed JSON" in letter["reason"], letter
    seq = letter["seq"]

    table = jobmesh_cli(["dead-letters", "--service", "tracker"], url)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["SEQ", "AT", "SERVICE", "CODE", "SUBJECT", "REASON"]
    [row] = [line for line in table.stdout.splitlines()[1:] if line.split()[0] == str(seq)]
    assert "tracker" in row and subject in row and "malformed JSON" in row
    newest = _json_of(jobmesh_cli(["dead-letters", "--limit", "1", "--json"], url))
    assert len(newest) == 1

    replayed = _json_of(jobmesh_cli(["dead-letters", "replay", str(seq), "--json"], url))
    assert replayed["subject"] == subject and replayed["stream"] == subjects.STREAM_JOBS, replayed
    assert replayed["duplicate"] is False
    again = _json_of(jobmesh_cli(["dead-letters", "replay", str(seq), "--json"], url))
    assert again["duplicate"] is True  # a replay happens once
    republished = await js.get_msg(subjects.STREAM_JOBS, replayed["stream_seq"])
    assert republished.data == payload and republished.headers["Nats-Msg-Id"] == f"replay:{seq}"

    async def refused_again():
        info = await js.stream_info(subjects.STREAM_DEADLETTER)
        for n in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(subjects.STREAM_DEADLETTER, n)
            if msgspec.json.decode(msg.data, type=DeadLetter).stream_seq == replayed["stream_seq"]:
                return True
        return False

    # The same bytes are refused the same way: a second dead letter, for the replayed message.
    await eventually(refused_again, timeout=30, what="the replayed message to be dead-lettered again")

    missing = jobmesh_cli(["dead-letters", "replay", "999999"], url)
    assert missing.returncode == 4 and "no dead letter 999999" in missing.stderr, missing.stderr
