"""The client's pure rules, without a cluster: the timeline ``status`` shows, the progress
line and bar of ``run`` and ``watch``, the retry flags, which attempt holds a result, and
the exit code a final job gives."""

from __future__ import annotations

import argparse
import io
import json

import msgspec
import pytest
from rich.console import Console

from jobmesh.client import jobstate
from jobmesh.client.cli import render
from jobmesh.client.cli.display import BarDisplay, PlainDisplay, display_for
from jobmesh.client.cli.exitcodes import EXIT_FAILED, EXIT_OK, for_final_view
from jobmesh.client.cli.parser import build_parser
from jobmesh.client.cli.specflags import fallback_from, retry_policy_from, spec_from
from jobmesh.client.client import Client
from jobmesh.client.jobstate import Progress, Seen
from jobmesh.client.results import result_attempt
from jobmesh.client.timeline import job_notes, timeline
from jobmesh.contract.messages.v1 import (
    AttemptLease,
    AttemptView,
    EventView,
    FallbackSpec,
    JobError,
    JobSpec,
    JobView,
    NodeInfo,
    NoopRuntime,
    ProcessRuntime,
    RetryPolicy,
    WorkflowSpec,
)
from jobmesh.errors import InvalidMessage, InvalidSpec, NotFound, UsageError

JOB = "a" * 32
T0 = 1_700_000_000.0


def view(**fields) -> JobView:
    base = dict(
        job_id=JOB,
        name="n",
        queue="default",
        tenant="default",
        state="running",
        reason="",
        attempt=1,
        node_id="node-a",
        submitted_at=T0,
        updated_at=T0,
        spec=JobSpec(runtime=NoopRuntime()),
    )
    base.update(fields)
    return JobView(**base)


def failed(n: int, node: str, start: float, end: float, exit_code: int = 1) -> AttemptView:
    return AttemptView(
        attempt=n,
        state="failed",
        node_id=node,
        exit_code=exit_code,
        error=JobError(code="exit_code", message=f"exited with {exit_code}"),
        started_at=start,
        finished_at=end,
    )


# --- the timeline of status ----------------------------------------------------------------
def test_the_timeline_shows_each_retry_under_the_attempt_it_followed_and_measures_the_backoff():
    attempts = [
        failed(1, "node-a", T0 + 1, T0 + 2),
        failed(2, "node-b", T0 + 5, T0 + 6, exit_code=3),
        AttemptView(
            attempt=3, state="succeeded", node_id="node-b", exit_code=0, started_at=T0 + 10, finished_at=T0 + 11
        ),
    ]
    events = [
        EventView(kind="submitted", attempt=0, at=T0),
        EventView(kind="ready", attempt=1, at=T0 + 0.5),
        EventView(kind="failed", attempt=1, at=T0 + 2),
        # The tracker files a retry under the attempt that ended.
        EventView(kind="retrying", attempt=1, at=T0 + 2.1, detail="attempt 2 in 1.5s"),
        EventView(kind="ready", attempt=2, at=T0 + 3.6),
        EventView(kind="retrying", attempt=2, at=T0 + 6.1, detail="attempt 3 in 3s"),
        EventView(kind="ready", attempt=3, at=T0 + 9.1),
        EventView(kind="ready", attempt=3, at=T0 + 9.5),  # a re-release: the first one counts
    ]
    steps = timeline(view(state="succeeded", attempt=3, attempts=attempts, events=events, final=True))
    assert [(s.attempt, s.state, s.node_id) for s in steps] == [
        (1, "failed", "node-a"),
        (2, "failed", "node-b"),
        (3, "succeeded", "node-b"),
    ]
    assert [s.retry for s in steps] == ["attempt 2 in 1.5s", "attempt 3 in 3s", ""]
    assert steps[0].waited == pytest.approx(1.5) and steps[1].waited == pytest.approx(3.0)
    assert steps[2].waited is None
    assert steps[0].error == "exit_code: exited with 1" and steps[0].ran_for == pytest.approx(1.0)
    lines = render.timeline_lines(steps[1])
    assert lines[0].split()[:3] == ["#2", "failed", "node-b"] and lines[0].endswith("(1.00s)  exit 3")
    assert "      error: exit_code: exited with 3" in lines
    assert "      retry: attempt 3 in 3s (the next attempt was released 3.00s later)" in lines


def test_the_timeline_notes_giving_up_a_cancel_and_the_result():
    attempts = [
        failed(1, "node-a", T0 + 1, T0 + 2),
        AttemptView(
            attempt=2,
            state="succeeded",
            node_id="node-a",
            exit_code=0,
            result_ref=f"{JOB}/2",
            result_bytes=3_000_000,
        ),
    ]
    events = [
        EventView(kind="retrying", attempt=1, at=T0 + 2.1, detail=""),
        EventView(kind="gave_up", attempt=2, at=T0 + 9, detail="attempts exhausted"),
        EventView(kind="cancelled", attempt=0, at=T0 + 1, detail="by hand"),
    ]
    steps = timeline(view(attempts=attempts, events=events))
    assert steps[0].retry == "retrying" and steps[0].waited is None  # no release recorded
    assert steps[1].notes == ("gave up: attempts exhausted",)
    assert steps[1].result == "3000000 bytes in jm_results"
    assert "      result: 3000000 bytes in jm_results" in render.timeline_lines(steps[1])
    assert job_notes(view(events=events)) == ["cancelled: by hand"]
    inline = AttemptView(attempt=1, state="succeeded", result="42\n", result_bytes=3)
    assert timeline(view(attempts=[inline]))[0].result == "3 bytes inline"


def test_status_shows_final_the_fallback_and_its_state(capsys):
    fallback = view(job_id="b" * 32, state="succeeded", final=True, fallback_of=JOB)
    shown = view(state="failed", final=True, fallback_job_id="b" * 32, attempts=[failed(1, "node-a", T0, T0 + 1)])
    render.job_status(shown, Seen("failed", final=True), as_json=False, fallback=fallback)
    out = capsys.readouterr().out.splitlines()
    assert "final    yes" in out
    assert f"fallback {'b' * 32}  succeeded, final" in out
    assert any(line.startswith("  #1  failed") for line in out), out
    render.job_status(shown, Seen("failed", final=True), as_json=False, fallback=None)
    assert "(not recorded by the tracker yet)" in capsys.readouterr().out
    render.job_status(fallback, Seen("succeeded", final=True), as_json=False)
    assert f"runs in place of {JOB}" in capsys.readouterr().out
    render.job_status(shown, Seen("failed", final=True), as_json=True)
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["final"] is True and as_json["fallback_job_id"] == "b" * 32


# --- progress: lines, bar, and where it comes from ------------------------------------------
def test_the_progress_line_says_the_percentage_and_the_message():
    assert render.progress_line(2.0, Progress(1, "node-a", 0.5, "half")) == "[  2.00s] progress 50% half"
    assert render.progress_line(0.1, Progress(1, "node-a", 1.7)) == "[  0.10s] progress 100%"
    assert render.progress_line(0.1, Progress(1, "node-a", None, "warming up")) == "[  0.10s] progress warming up"


def test_a_state_line_keeps_its_format_and_says_final_only_where_a_retry_could_follow():
    assert render.state_line(0.12, Seen("running", attempt=1, node_id="a")) == "[  0.12s] running (node a)"
    assert render.state_line(1, Seen("failed", attempt=1, node_id="a", exit_code=3)) == (
        "[  1.00s] failed (node a, exit code 3)"
    )
    assert render.state_line(1, Seen("failed", attempt=2, node_id="a", exit_code=3, final=True)) == (
        "[  1.00s] failed (final, attempt 2, node a, exit code 3)"
    )
    assert render.state_line(1, Seen("succeeded", attempt=1, node_id="a", exit_code=0, final=True)) == (
        "[  1.00s] succeeded (node a, exit code 0)"
    )


def test_the_plain_display_prints_one_line_per_state_and_report(capsys):
    display = PlainDisplay()
    display.state(0.5, Seen("running", attempt=1, node_id="a"))
    display.progress(2.5, Progress(1, "a", 0.5, "half"))
    display.close()
    assert capsys.readouterr().err.splitlines() == [
        "jobmesh: [  0.50s] running (node a)",
        "jobmesh: [  2.50s] progress 50% half",
    ]
    assert isinstance(display_for(io.StringIO()), PlainDisplay)  # not a terminal: plain lines


def test_the_bar_on_a_terminal_shows_the_state_and_the_reported_fraction():
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, color_system=None)
    bar = BarDisplay(console, redirect_stdout=False)
    try:
        bar.state(0.5, Seen("running", attempt=1, node_id="node-a"))
        bar.progress(2.5, Progress(1, "node-a", 0.5, "half"))
        [task] = bar.bar.tasks
        assert (task.description, task.total, task.completed) == ("running on node-a", 1.0, 0.5)
        assert task.fields["message"] == "half"
        bar.bar.refresh()
        bar.state(3.0, Seen("running", attempt=2, node_id="node-b"))  # a retry starts afresh
        [task] = bar.bar.tasks
        assert (task.description, task.total, task.completed, task.fields["message"]) == (
            "running on node-b (attempt 2)",
            None,
            0,
            "",
        )
        bar.state(4.0, Seen("succeeded", attempt=2, node_id="node-b", exit_code=0, final=True))
        assert task.completed == task.total == 1
    finally:
        bar.close()
    drawn = screen.getvalue()
    assert "jobmesh: [  0.50s] running (node node-a)" in drawn and "50%" in drawn and "half" in drawn
    assert "jobmesh: [  4.00s] succeeded (attempt 2, node node-b, exit code 0)" in drawn


def test_progress_comes_from_the_lease_of_that_very_attempt():
    record = NodeInfo(
        node_id="node-a",
        cpu_milli=1000,
        memory_mb=1024,
        attempts=[
            AttemptLease(job_id=JOB, attempt=1, partition=0, started_at=T0, progress=0.9),
            AttemptLease(job_id=JOB, attempt=2, partition=0, started_at=T0, progress=0.25, message="a quarter"),
        ],
    )
    assert jobstate.progress_in(record, JOB, 2) == Progress(2, "node-a", 0.25, "a quarter")
    assert jobstate.progress_in(record, JOB, 3) is None
    assert jobstate.progress_in(record, "b" * 32, 1) is None


def test_only_final_ends_a_job_and_a_final_state_is_never_followed_by_a_stale_one():
    assert not jobstate.is_final(Seen("failed", attempt=1))  # a retry may follow
    assert jobstate.is_final(Seen("failed", attempt=1, final=True))
    shown = Seen("failed", attempt=1, final=True)
    assert jobstate.goes_back(shown, Seen("failed", attempt=1))  # a poll older than the give-up
    assert not jobstate.goes_back(Seen("failed", attempt=1), shown)
    assert not jobstate.goes_back(Seen("failed", attempt=1), Seen("retrying", attempt=2))


# --- exit codes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "state, code",
    [
        ("succeeded", EXIT_OK),
        ("failed", EXIT_FAILED),
        ("lost", EXIT_FAILED),
        ("cancelled", EXIT_FAILED),
        ("expired", 3),
    ],
)
def test_the_exit_code_of_a_final_job(state, code):
    assert for_final_view(view(state=state, final=True)) == code


def test_a_job_that_is_not_final_has_no_exit_code_yet():
    with pytest.raises(ValueError, match="may be retried"):
        for_final_view(view(state="failed", final=False))


# --- the retry flags -------------------------------------------------------------------------
def _run_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *flags, "--", "true"])


def test_retry_flags_make_the_policy_and_flags_left_out_keep_its_defaults():
    assert retry_policy_from(_run_args()) == RetryPolicy()
    policy = retry_policy_from(
        _run_args(
            "--retries",
            "3",
            "--backoff",
            "0.5",
            "--backoff-max",
            "10",
            "--retry-on",
            "exit_code",
            "--retry-on",
            "oom",
            "--retry-on",
            "exit_code",
            "--migrate-after",
            "2",
            "--migrate-zone",
        )
    )
    assert policy == RetryPolicy(
        max_attempts=4, backoff=0.5, backoff_max=10, retry_on=["exit_code", "oom"], migrate_after=2, migrate_zone=True
    )
    spec = spec_from(_run_args("--retries", "1", "--heartbeat-timeout", "5", "--total-timeout", "60"), now=T0)
    assert spec.retry.max_attempts == 2
    assert (spec.timeouts.heartbeat, spec.timeouts.total) == (5, 60)


def test_a_fallback_comes_as_json_text_or_as_a_file(tmp_path):
    text = '{"runtime": {"kind": "process", "argv": ["echo", "plan b"]}, "queue": "fallbacks"}'
    expected = FallbackSpec(runtime=ProcessRuntime(argv=["echo", "plan b"]), queue="fallbacks")
    assert fallback_from(text) == expected
    path = tmp_path / "fallback.json"
    path.write_text(text)
    assert retry_policy_from(_run_args("--fallback-json", str(path))).fallback == expected


@pytest.mark.parametrize(
    "flags, field, flag",
    [
        (["--retry-on", "cancelled"], "spec.retry.retry_on[0]", "--retry-on"),
        (["--backoff", "5", "--backoff-max", "1"], "spec.retry.backoff_max", "--backoff-max"),
        (["--migrate-after", "2"], "spec.retry.migrate_after", "--migrate-after"),
        (["--migrate-zone", "--retries", "3"], "spec.retry.migrate_zone", "--migrate-zone"),
        (["--heartbeat-timeout", "0.5"], "timeouts.heartbeat", "--heartbeat-timeout"),
        (["--total-timeout", "1", "--queue-timeout", "5"], "spec.timeouts.total", "--total-timeout"),
        (
            ["--fallback-json", '{"runtime": {"kind": "process", "argv": [" "]}}'],
            "spec.retry.fallback.runtime.argv[0]",
            "--fallback-json",
        ),
        (
            ["--fallback-json", '{"runtime": {"kind": "noop"}, "prority": 1}'],
            "retry.fallback.prority",
            "--fallback-json",
        ),
        (
            ["--fallback-json", '{"runtime": {"kind": "noop"}, "priority": 12}'],
            "retry.fallback.priority",
            "--fallback-json",
        ),
        (["--fallback-json", "{not json"], "retry.fallback", "--fallback-json"),
    ],
)
def test_a_bad_retry_value_is_refused_naming_the_field_and_the_flag(flags, field, flag):
    with pytest.raises(InvalidMessage) as caught:
        spec_from(_run_args(*flags), now=T0)
    assert caught.value.field == field
    assert f"(flag {flag})" in str(caught.value)


def test_a_fallback_file_that_cannot_be_read_names_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--fallback-json: cannot read"):
        spec_from(_run_args("--fallback-json", str(tmp_path / "missing.json")), now=T0)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--retries", "100"], "argument --retries: 100 is more than 99"),
        (["--retries", "-1"], "argument --retries: -1 must be 0 or more"),
        (["--retry-on", "bogus"], "argument --retry-on: unknown failure code 'bogus'; the codes are: cancelled,"),
        (["--backoff", "0"], "argument --backoff: '0' must be a number of seconds > 0"),
        (["--migrate-after", "x"], "argument --migrate-after: 'x' is not a whole number"),
    ],
)
def test_a_retry_flag_of_the_wrong_kind_is_refused_by_the_parser(capsys, flags, says):
    with pytest.raises(SystemExit) as caught:
        _run_args(*flags)
    assert caught.value.code == 1
    assert says in capsys.readouterr().err


def test_a_valid_spec_with_a_policy_passes_the_contracts_checks():
    spec = spec_from(_run_args("--retries", "2", "--migrate-after", "2", "--migrate-zone"), now=T0)
    assert spec.retry.migrate_after == 2
    with pytest.raises(InvalidSpec):
        spec_from(_run_args("--retries", "1", "--migrate-after", "2"), now=T0)


# --- results ---------------------------------------------------------------------------------
def test_the_result_is_the_successful_attempts_and_its_absence_is_explained():
    ok = AttemptView(attempt=2, state="succeeded", result="42", result_bytes=2)
    first = failed(1, "node-a", T0, T0 + 1)
    assert result_attempt(view(attempts=[first, ok])) is ok
    assert result_attempt(view(attempts=[first, ok]), 2) is ok
    with pytest.raises(NotFound, match=r"attempt 1 of job \w+ has no result \(only a successful attempt keeps one"):
        result_attempt(view(attempts=[first, ok]), 1)
    with pytest.raises(NotFound, match=r"has no attempt 7 \(its attempts: 1, 2\)"):
        result_attempt(view(attempts=[first, ok]), 7)
    quiet = AttemptView(attempt=1, state="succeeded")
    with pytest.raises(NotFound, match=r"succeeded without writing a result file to \$JOBMESH_RESULT_PATH"):
        result_attempt(view(attempts=[quiet]))
    with pytest.raises(NotFound, match="has not succeeded yet; it is running"):
        result_attempt(view(attempts=[]))
    with pytest.raises(NotFound, match="it ended failed"):
        result_attempt(view(state="failed", final=True, attempts=[first]))


async def test_run_workflow_makes_the_runs_key_when_none_is_given(monkeypatch):
    sent = []

    async def request(self, subject, message, reply_type, service):
        sent.append(message)
        return None

    monkeypatch.setattr(Client, "request", request)
    client = Client.__new__(Client)
    spec = msgspec.convert({"name": "k", "steps": {"a": {"runtime": {"kind": "noop"}}}}, WorkflowSpec)
    await client.run_workflow(spec)
    await client.run_workflow(spec, idempotency_key="mine")
    assert len(sent[0].idempotency_key) == 32 and sent[1].idempotency_key == "mine"
