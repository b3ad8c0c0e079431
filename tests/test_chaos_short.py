"""The chaos suite in its short form, as CI runs it: ``make chaos-short``.

1,200 mixed jobs over an 80 s window, with every fault kind (kill -9 of a random replica
every 2 s, executors included; a NATS and a Postgres restart; a SIGSTOPped executor),
authentication on, on a nats-server and a Postgres of the suite's own (both are killed, so
never the machine's). Every count of loss, duplication and leaks must be 0, and every fault
kind must have happened. The run is a subprocess: its report comes back as JSON, and on
failure the kept work directory (logs, evidence.json) is named in its stderr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from jobmesh.dev.chaosreport import ZERO_COUNTS

pytestmark = pytest.mark.integration

SHORT = ["--jobs", "1200", "--seconds", "80", "--settle", "150"]  # as `make chaos-short`


@pytest.mark.timeout(1080)  # start-up, the 80 s window, at most 150 s of settling, the history wait
def test_the_short_chaos_run_loses_duplicates_and_leaks_nothing():
    # A session of its own: on a timeout the whole run goes (its nats-server, Postgres and
    # replicas run in sessions of their own too, and it stops them when it is interrupted).
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobmesh.dev.chaos", *SHORT, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            stdout, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # chaos.main turns SIGTERM into a clean stop
            stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    tail = "\n".join(done.stderr.strip().splitlines()[-15:])
    assert done.stdout.strip(), f"no report (exit {done.returncode}):\n{tail}"
    report = json.loads(done.stdout)
    counts = {name: report[name] for name in ZERO_COUNTS}
    assert counts == dict.fromkeys(ZERO_COUNTS, 0), (counts, report["samples"], tail)
    assert report["problems"] == [], (report["problems"], tail)
    # The run did what it is for: faults of every kind, and jobs that got through them.
    assert all(report["faults"].get(kind, 0) >= 1 for kind in ("kill", "nats_restart", "postgres_restart", "sigstop"))
    assert report["jobs_acknowledged"] >= 1000, report["jobs_acknowledged"]
    assert done.returncode == 0, tail
