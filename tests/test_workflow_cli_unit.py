"""Workflows on the client side without a cluster: the SDK builder, workflow files (and the
errors a person sees for a bad one), each step's state and the run's outcome from a
record and jobs built by hand, the plain lines, table and live tree that ``jobmesh
workflow`` prints, its exit codes, and ``submit --after``."""

from __future__ import annotations

import argparse
import io
import json

import pytest
from rich.console import Console

from jobmesh.client.cli import render, run_command
from jobmesh.client.cli import workflows as cli
from jobmesh.client.cli.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from jobmesh.client.cli.parser import build_parser
from jobmesh.client.cli.specflags import dependency, spec_from
from jobmesh.client.client import _workflow_of
from jobmesh.client.jobstate import seen_in_view
from jobmesh.client.workflows import (
    ItemCounts,
    StepTimes,
    Workflow,
    WorkflowStatus,
    graph_problem,
    read_workflow_file,
    run_status,
    with_times,
    workflow_from_data,
)
from jobmesh.contract.ids import job_id_for, map_item_key
from jobmesh.contract.messages.v1 import (
    AttemptView,
    Dependency,
    HandlerRuntime,
    JobSpec,
    JobSummary,
    JobView,
    MapSpec,
    NoopRuntime,
    ProcessRuntime,
    Resources,
    WorkflowCancelReply,
    WorkflowRetryReply,
    WorkflowRun,
    WorkflowRunReply,
    WorkflowSpec,
    WorkflowStep,
    WorkflowSummary,
)
from jobmesh.errors import InvalidMessage, InvalidSpec, NotFound, Unavailable, UsageError

T0 = 1_700_000_000.0
RUN = "r" * 32
NOOP = {"kind": "noop"}

ETL_YAML = """\
name: etl
description: extract, load each file, report
steps:
  extract:
    runtime: {kind: process, argv: [extract.sh]}
  each:
    runtime: {kind: process, argv: [load, "${item}"]}
    needs: [extract]
    map: {over: "${steps.extract.result.files}", concurrency: 4}
    queue: loads
  report:
    runtime: {kind: handler, handler: report}
    needs: [each]
    when: ended
"""


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _spec(steps: dict[str, dict], name: str = "wf") -> WorkflowSpec:
    return workflow_from_data({"name": name, "steps": {k: {"runtime": NOOP, **v} for k, v in steps.items()}})


def _record(spec: WorkflowSpec, **fields) -> WorkflowRun:
    base = dict(
        run_id=RUN,
        spec=spec,
        jobs={name: f"job-{name}" for name in spec.steps},
        created_at=T0,
        updated_at=T0,
    )
    base.update(fields)
    return WorkflowRun(**base)


def _job(step: str, state: str, *, final: bool | None = None, index: int = -1, **fields) -> JobSummary:
    base = dict(
        job_id=f"job-{step}",
        name=step,
        queue="default",
        tenant="default",
        state=state,
        attempt=1 if state not in ("queued", "waiting") else 0,
        node_id="node-a" if state in ("bound", "running", "succeeded", "failed") else "",
        exit_code=None,
        submitted_at=T0,
        updated_at=T0 + 1,
        final=state in ("succeeded", "cancelled", "expired") if final is None else final,
        step=step,
        index=index,
    )
    base.update(fields)
    return JobSummary(**base)


def _item(step: str, map_job: str, index: int, state: str, **fields) -> JobSummary:
    return _job(step, state, index=index, job_id=job_id_for(map_item_key(map_job, index)), **fields)


# --- the SDK builder ---------------------------------------------------------------------
def test_the_builder_makes_the_spec_a_file_describes(tmp_path):
    wf = Workflow("etl", description="extract, load each file, report")
    extract = wf.step("extract", ProcessRuntime(argv=["extract.sh"]))
    each = wf.step(
        "each",
        ProcessRuntime(argv=["load", "${item}"]),
        needs=[extract],
        map_over=extract.result("files"),
        concurrency=4,
        queue="loads",
    )
    wf.step("report", HandlerRuntime(handler="report"), needs=[each], when="ended")
    spec = wf.spec()
    assert spec == read_workflow_file(_write(tmp_path, "etl.yaml", ETL_YAML))
    assert spec.steps["each"].map == MapSpec(over="${steps.extract.result.files}", concurrency=4)
    assert spec.steps["report"].needs == ["each"] and spec.steps["report"].when == "ended"


def test_the_builder_takes_job_spec_fields_by_keyword():
    wf = Workflow("w", tenant="team-a")
    a = wf.step(
        "a",
        NoopRuntime(),
        job_name="first",
        priority=7,
        resources=Resources(cpu_milli=500),
        metadata={"k": "v"},
        on_error="continue",
    )
    wf.step("b", NoopRuntime(), needs=["a"], keep_result=True)  # any other field, by name
    spec = wf.spec()
    step = spec.steps["a"]
    assert (step.name, step.priority, step.resources.cpu_milli, step.metadata) == ("first", 7, 500, {"k": "v"})
    assert step.on_error == "continue" and spec.tenant == "team-a"
    assert spec.steps["b"].keep_result and spec.steps["b"].needs == ["a"]
    assert a.result() == "${steps.a.result}" and a.result("rows", 0) == "${steps.a.result.rows.0}"
    assert str(a) == "a"


def test_the_builder_refuses_a_step_declared_twice():
    wf = Workflow("w")
    wf.step("a", NoopRuntime())
    with pytest.raises(InvalidSpec, match="declared twice") as caught:
        wf.step("a", NoopRuntime())
    assert caught.value.field == "steps.a"


def test_the_builder_refuses_concurrency_without_map_over():
    with pytest.raises(InvalidSpec) as caught:
        Workflow("w").step("a", NoopRuntime(), concurrency=3)
    assert caught.value.field == "steps.a.map"


def test_the_builders_spec_is_checked_as_the_wire_checks_it():
    wf = Workflow("w")
    wf.step("a b", NoopRuntime())
    with pytest.raises(InvalidMessage) as caught:
        wf.spec()
    assert caught.value.field == "steps.a b"
    wf = Workflow("w")
    wf.step("b", NoopRuntime(), needs=["nope"])
    with pytest.raises(InvalidSpec, match="'nope' is not a step of this workflow") as caught:
        wf.spec()
    assert caught.value.field == "steps.b.needs[0]"
    with pytest.raises(InvalidMessage) as caught:
        Workflow("bad name").spec()  # no steps, and a name with a space: the name comes first
    assert caught.value.field in ("name", "steps")


def test_the_client_checks_a_spec_built_in_python_before_sending_it():
    # A struct's constructor checks no constraints; the client checks it as the wire would.
    spec = WorkflowSpec(name="w", steps={"a": WorkflowStep(runtime=NoopRuntime(), needs=["a"])})
    with pytest.raises(InvalidSpec, match="cannot need itself") as caught:
        _workflow_of(spec)
    assert caught.value.field == "steps.a.needs[0]"
    assert _workflow_of({"name": "w", "steps": {"a": {"runtime": NOOP}}}).steps["a"].runtime == NoopRuntime()


# --- workflow files ----------------------------------------------------------------------
def test_a_json_workflow_file_reads_into_the_same_spec(tmp_path):
    import yaml

    text = json.dumps(yaml.safe_load(ETL_YAML))
    yaml_spec = read_workflow_file(_write(tmp_path, "etl.yaml", ETL_YAML))
    assert read_workflow_file(_write(tmp_path, "etl.json", text)) == yaml_spec
    assert read_workflow_file(_write(tmp_path, "etl.wf", text)) == yaml_spec  # by its content


@pytest.mark.parametrize(
    ("step", "field", "says"),
    [
        ({"runtime": NOOP, "neds": ["a"]}, "steps.b.neds", "unknown field steps.b.neds"),
        ({"needs": ["a"]}, "steps.b.runtime", "missing required field steps.b.runtime"),
        ({"runtime": {"kind": "proc"}}, "steps.b.runtime.kind", "(one of process, noop, handler, container)"),
        ({"runtime": {"kind": "process", "argv": "ls"}}, "steps.b.runtime.argv", "steps.b.runtime.argv: Expected"),
        ({"runtime": NOOP, "when": "ok"}, "steps.b.when", "steps.b.when: Invalid enum value 'ok'"),
        (
            {"runtime": NOOP, "needs": ["x"]},
            "steps.b.needs[0]",
            "steps.b.needs[0]: 'x' is not a step of this workflow (the steps are a, b)",
        ),
        ({"runtime": NOOP, "needs": ["b"]}, "steps.b.needs[0]", "a step cannot need itself"),
        (3, "steps.b", "a step must be a mapping"),
    ],
)
def test_a_bad_step_is_named_by_its_path(step, field, says):
    with pytest.raises(InvalidMessage) as caught:
        workflow_from_data({"name": "w", "steps": {"a": {"runtime": NOOP}, "b": step}}, "wf.yaml")
    assert caught.value.field == field
    assert str(caught.value).startswith("wf.yaml: ")
    assert says in str(caught.value)


def test_a_bad_step_name_and_a_bad_workflow_name_are_named():
    with pytest.raises(InvalidMessage) as caught:
        workflow_from_data({"name": "w", "steps": {"load files": {"runtime": NOOP}}}, "wf.yaml")
    assert caught.value.field == "steps.load files"
    with pytest.raises(InvalidMessage) as caught:
        workflow_from_data({"name": "a b", "steps": {"a": {"runtime": NOOP}}}, "wf.yaml")
    assert caught.value.field == "name"
    with pytest.raises(InvalidMessage, match="missing required field steps"):
        workflow_from_data({"name": "w"}, "wf.yaml")
    with pytest.raises(InvalidMessage, match="a workflow must be a mapping"):
        workflow_from_data(["a"], "wf.yaml")


def test_a_cycle_is_named_with_the_need_that_closes_it():
    data = {
        "name": "w",
        "steps": {
            "a": {"runtime": NOOP, "needs": ["c"]},
            "b": {"runtime": NOOP, "needs": ["a"]},
            "c": {"runtime": NOOP, "needs": ["x0", "b"]},
            "x0": {"runtime": NOOP},
        },
    }
    with pytest.raises(InvalidSpec, match=r"the needs form a cycle: a -> c -> b -> a") as caught:
        workflow_from_data(data, "wf.yaml")
    assert caught.value.field == "steps.b.needs[0]"


def test_a_diamond_is_no_cycle():
    spec = _spec({"a": {}, "b": {"needs": ["a"]}, "c": {"needs": ["a"]}, "d": {"needs": ["b", "c"]}})
    assert graph_problem(spec) is None


def test_bad_yaml_names_the_file_and_the_line(tmp_path):
    path = _write(tmp_path, "bad.yaml", "name: w\nsteps:\n  a:\n   runtime: {kind: noop}\n  b: [\n")
    with pytest.raises(UsageError, match=r"bad\.yaml: invalid YAML at line") as caught:
        read_workflow_file(path)
    assert caught.value.field == "file"


def test_a_bad_workflow_file_exits_1_with_the_field_before_connecting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JOBMESH_NATS_URL", "nats://127.0.0.1:1")  # nothing there: must not be asked
    path = _write(tmp_path, "wf.yaml", ETL_YAML.replace("needs: [each]", "needs: [eahc]"))
    code = run_command(build_parser([]).parse_args(["workflow", "run", path]))
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert (
        "invalid_spec" in err
        and "'eahc' is not a step of this workflow" in err
        and "(field steps.report.needs[0])" in err
    )


def test_bad_input_exits_1_before_connecting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JOBMESH_NATS_URL", "nats://127.0.0.1:1")
    path = _write(tmp_path, "wf.yaml", ETL_YAML)
    code = run_command(build_parser([]).parse_args(["workflow", "run", path, "--input", "{nope"]))
    assert code == EXIT_USAGE
    assert "--input is not JSON" in capsys.readouterr().err


def test_the_input_comes_from_json_text_or_a_file(tmp_path):
    def args(**kw) -> argparse.Namespace:
        return argparse.Namespace(**{"input": None, "input_file": None, **kw})

    assert cli.input_of(args()) is None
    assert cli.input_of(args(input='{"day": "2026-12-01"}')) == {"day": "2026-12-01"}
    assert cli.input_of(args(input_file=_write(tmp_path, "in.yaml", "day: '2026-12-01'\n"))) == {"day": "2026-12-01"}
    with pytest.raises(UsageError) as caught:
        cli.input_of(args(input_file=str(tmp_path / "missing.json")))
    assert caught.value.field == "input-file"


def test_input_and_input_file_do_not_go_together(capsys):
    with pytest.raises(SystemExit) as caught:
        build_parser([]).parse_args(["workflow", "run", "wf.yaml", "--input", "1", "--input-file", "x"])
    assert caught.value.code == EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


# --- a run's state -----------------------------------------------------------------------
DIAMOND = {"a": {}, "b": {"needs": ["a"]}, "c": {"needs": ["a"]}, "d": {"needs": ["b", "c"]}}


def test_a_diamond_in_progress():
    record = _record(_spec(DIAMOND))
    jobs = [
        _job("a", "succeeded"),
        _job("b", "running", updated_at=T0 + 2),
        _job("c", "succeeded"),
        _job("d", "waiting", reason="waiting for: b"),
    ]
    status = run_status(record, jobs)
    assert status.outcome == "running"
    assert [(s.name, s.state, s.reason) for s in status.steps] == [
        ("a", "succeeded", ""),
        ("b", "running", ""),
        ("c", "succeeded", ""),
        ("d", "waiting", "waiting for: b"),
    ]
    assert status.step("b").node_id == "node-a" and status.step("b").started_at == T0 + 2
    assert status.counts() == {"waiting": 1, "running": 1, "succeeded": 2}


def test_a_step_held_by_its_needs_waits_for_them_whatever_the_tracker_says():
    # The tracker may not have folded the scheduler's JobWaiting yet: the needs say it.
    status = run_status(_record(_spec(DIAMOND)), [_job("a", "running"), _job("b", "queued"), _job("c", "queued")])
    assert status.step("b").state == "waiting" and status.step("b").reason == "waiting for: a"
    assert status.step("d").state == "waiting" and status.step("d").reason == "waiting for: b, c"


def test_a_step_whose_needs_ended_is_queued_or_waits_for_the_schedulers_reason():
    spec = _spec({"a": {}, "b": {"needs": ["a"]}, "c": {"needs": ["a"]}})
    jobs = [_job("a", "succeeded"), _job("b", "queued"), _job("c", "waiting", reason="queue q: rate limited")]
    status = run_status(_record(spec), jobs)
    assert (status.step("b").state, status.step("b").reason) == ("queued", "")
    assert (status.step("c").state, status.step("c").reason) == ("waiting", "queue q: rate limited")


def test_a_failed_step_skips_its_dependents_runs_its_on_failure_step_and_fails_the_run():
    spec = _spec(
        {
            "a": {},
            "b": {"needs": ["a"]},
            "c": {"needs": ["b"]},
            "notify": {"needs": ["b"], "when": "failed"},
            "cleanup": {"needs": ["c"], "when": "ended"},
        }
    )
    jobs = [
        _job("a", "succeeded"),
        _job("b", "failed", final=True, exit_code=2, reason="exit code 2"),
        _job("c", "cancelled", skipped=True, reason="skipped: b failed"),
        _job("notify", "succeeded"),
        _job("cleanup", "succeeded"),
    ]
    status = run_status(_record(spec), jobs)
    assert status.outcome == "failed"
    assert [(s.name, s.state) for s in status.steps] == [
        ("a", "succeeded"),
        ("b", "failed"),
        ("c", "skipped"),
        ("notify", "succeeded"),
        ("cleanup", "succeeded"),
    ]
    assert status.step("b").exit_code == 2 and status.step("c").reason == "skipped: b failed"
    assert cli.exit_code_for(status.outcome) == EXIT_FAILED


def test_a_step_that_may_fail_does_not_fail_the_run_and_a_skipped_step_never_does():
    spec = _spec({"a": {"on_error": "continue"}, "b": {"needs": ["a"]}, "on_fail": {"needs": ["b"], "when": "failed"}})
    jobs = [_job("a", "failed", final=True), _job("b", "succeeded"), _job("on_fail", "cancelled", skipped=True)]
    status = run_status(_record(spec), jobs)
    assert status.outcome == "succeeded"
    assert status.step("on_fail").state == "skipped"


def test_an_expired_step_or_one_cancelled_alone_fails_the_run():
    spec = _spec({"a": {}, "b": {}})
    status = run_status(_record(spec), [_job("a", "expired", reason="queue timeout"), _job("b", "succeeded")])
    assert status.outcome == "failed"
    assert (status.step("a").state, status.step("a").reason) == ("failed", "expired: queue timeout")
    status = run_status(_record(spec), [_job("a", "cancelled", reason="by hand"), _job("b", "succeeded")])
    assert status.outcome == "failed" and status.step("a").state == "cancelled"


def test_a_failed_attempt_that_will_be_retried_is_still_running():
    spec = _spec({"a": {}})
    status = run_status(_record(spec), [_job("a", "retrying", attempt=1, reason="backoff 2s")])
    assert status.outcome == "running"
    assert (status.step("a").state, status.step("a").reason) == ("running", "retrying: backoff 2s")
    status = run_status(_record(spec), [_job("a", "failed", final=False, reason="exit code 1")])
    assert status.outcome == "running"
    assert (status.step("a").state, status.step("a").reason) == ("running", "attempt 1 failed: exit code 1")


def test_a_job_the_tracker_has_not_recorded_keeps_the_run_running():
    spec = _spec({"a": {}, "b": {"needs": ["a"]}})
    status = run_status(_record(spec), [])
    assert status.outcome == "running"
    assert (status.step("a").state, status.step("a").reason) == ("queued", "")
    assert (status.step("b").state, status.step("b").reason) == ("waiting", "waiting for: a")


MAPPED = {
    "extract": {},
    "each": {"needs": ["extract"], "map": {"over": "${steps.extract.result.files}"}},
    "report": {"needs": ["each"]},
}


def test_a_mapped_step_counts_its_items_and_runs_while_they_do():
    record = _record(_spec(MAPPED))
    items = [
        _item("each", "job-each", 0, "succeeded", submitted_at=T0 + 5),
        _item("each", "job-each", 1, "succeeded", submitted_at=T0 + 5),
        _item("each", "job-each", 2, "running", submitted_at=T0 + 5),
        _item("each", "job-each", 3, "failed", final=True, submitted_at=T0 + 5),
        _item("each", "job-each", 4, "queued", submitted_at=T0 + 5),
        # An item of the step's map job of an earlier generation: not this run's count.
        _item("each", "job-each-gen0", 0, "failed", final=True),
    ]
    jobs = [_job("extract", "succeeded"), _job("each", "waiting", reason="waiting for its 5 items"), *items]
    status = run_status(record, jobs)
    each = status.step("each")
    assert each.mapped and each.state == "running"
    assert each.items == ItemCounts(total=5, queued=1, running=1, succeeded=2, failed=1)
    assert each.items.text() == "3/5 items done, 1 running, 1 failed"
    assert each.reason == "3/5 items done, 1 running, 1 failed"
    assert each.started_at == T0 + 5  # its first item's submission
    assert status.step("report").state == "waiting" and status.outcome == "running"


def test_a_mapped_step_ends_as_its_map_job_does_and_keeps_its_counts():
    record = _record(_spec(MAPPED))
    items = [_item("each", "job-each", i, "succeeded") for i in range(3)]
    jobs = [_job("extract", "succeeded"), _job("each", "succeeded"), *items, _job("report", "succeeded")]
    status = run_status(record, jobs)
    assert status.outcome == "succeeded"
    each = status.step("each")
    assert each.state == "succeeded" and each.items is not None and each.items.text() == "3/3 items done"


def test_a_mapped_step_without_items_yet_shows_its_map_jobs_state():
    status = run_status(_record(_spec(MAPPED)), [_job("extract", "succeeded"), _job("each", "queued")])
    each = status.step("each")
    assert (each.state, each.items) == ("queued", ItemCounts())


def test_items_named_otherwise_are_those_made_after_their_map_job():
    record = _record(_spec(MAPPED))
    jobs = [
        _job("extract", "succeeded"),
        _job("each", "waiting", submitted_at=T0 + 100),
        _job("each", "running", index=0, job_id="x0", submitted_at=T0 + 101),
        _job("each", "succeeded", index=0, job_id="old0", submitted_at=T0),
    ]
    each = run_status(record, jobs).step("each")
    assert each.items == ItemCounts(total=1, running=1)


def test_a_cancelled_run_is_cancelled_once_its_jobs_have_ended():
    spec = _spec(DIAMOND)
    record = _record(spec, state="cancelled", cancel_reason="wrong input")
    jobs = [_job("a", "succeeded"), _job("b", "running"), _job("c", "cancelled"), _job("d", "queued")]
    status = run_status(record, jobs)
    assert status.outcome == "running" and status.cancel_requested  # the cancel has not reached b yet
    jobs = [
        _job("a", "succeeded"),
        _job("b", "cancelled", reason="wrong input"),
        _job("c", "cancelled", reason="wrong input"),
        _job("d", "cancelled", skipped=True),
    ]
    status = run_status(record, jobs)
    assert status.outcome == "cancelled" and status.cancel_reason == "wrong input"
    assert cli.exit_code_for(status.outcome) == cli.EXIT_CANCELLED


def test_a_cancel_after_every_step_ended_keeps_the_runs_outcome():
    record = _record(_spec({"a": {}, "b": {"needs": ["a"]}}), state="cancelled")
    status = run_status(record, [_job("a", "failed", final=True), _job("b", "cancelled", skipped=True)])
    assert status.outcome == "failed" and status.cancel_requested


def test_a_retried_run_follows_each_steps_current_job():
    spec = _spec({"a": {}, "b": {"needs": ["a"]}})
    record = _record(spec, generation=1, jobs={"a": "job-a", "b": "job-b2"})
    jobs = [_job("a", "succeeded"), _job("b", "failed", final=True), _job("b", "running", job_id="job-b2")]
    status = run_status(record, jobs)
    assert status.outcome == "running" and status.step("b").state == "running" and status.generation == 1


def test_exact_times_replace_the_trackers():
    spec = _spec({"a": {}, "b": {}, "c": {"needs": ["a"]}})
    jobs = [_job("a", "succeeded"), _job("b", "running"), _job("c", "queued")]
    status = with_times(
        run_status(_record(spec), jobs),
        {"job-a": StepTimes(T0 + 0.5, T0 + 1.7), "job-b": StepTimes(T0 + 0.25, None)},
    )
    assert (status.step("a").started_at, status.step("a").ended_at) == (T0 + 0.5, T0 + 1.7)
    assert (status.step("b").started_at, status.step("b").ended_at) == (T0 + 0.25, None)
    assert status.step("c").started_at is None


def test_the_status_encodes_as_json():
    status = run_status(_record(_spec(MAPPED)), [_job("extract", "succeeded")])
    data = json.loads(render._encoder.encode(status))
    assert data["outcome"] == "running" and data["run_id"] == RUN
    assert [s["name"] for s in data["steps"]] == ["extract", "each", "report"]
    assert data["steps"][1]["mapped"] is True and data["steps"][1]["items"]["total"] == 0


# --- what is printed ---------------------------------------------------------------------
def _status(jobs: list[JobSummary], spec=None, **record) -> WorkflowStatus:
    return run_status(_record(spec or _spec(DIAMOND), **record), jobs)


def test_the_plain_display_prints_one_line_per_step_change_then_the_outcome():
    lines: list[str] = []
    display = cli.PlainRunDisplay(lines.append)
    display.show(_status([_job("a", "running")]), 0.1, T0 + 1)
    assert lines == [
        "[  0.10s] a running (node node-a)",
        "[  0.10s] b waiting (waiting for: a)",
        "[  0.10s] c waiting (waiting for: a)",
        "[  0.10s] d waiting (waiting for: b, c)",
    ]
    lines.clear()
    display.show(_status([_job("a", "running")]), 0.6, T0 + 2)  # nothing changed
    assert lines == []
    display.show(_status([_job("a", "succeeded"), _job("b", "running"), _job("c", "queued")]), 1.2, T0 + 3)
    # a's start is not known from the tracker's list (see StepClock); d still waits for both.
    assert lines == ["[  1.20s] a succeeded", "[  1.20s] b running (node node-a)", "[  1.20s] c queued"]
    lines.clear()
    done = [_job(n, "succeeded", updated_at=T0 + 4) for n in "abcd"]
    display.show(_status(done), 4.0, T0 + 4)
    assert lines == [
        "[  4.00s] b succeeded",
        "[  4.00s] c succeeded",
        "[  4.00s] d succeeded",
        f"[  4.00s] workflow wf run {RUN} succeeded: 4 succeeded",
    ]
    lines.clear()
    display.show(_status(done), 4.5, T0 + 5)  # the run has ended: nothing more
    assert lines == []


def test_an_ended_step_says_how_long_it_ran():
    status = with_times(
        _status([_job("a", "failed", final=True, exit_code=3, reason="exit code 3")]),
        {"job-a": StepTimes(T0, T0 + 12.5)},
    )
    assert cli.step_line(status.step("a"), T0 + 20) == "a failed (exit code 3, 12.5s)"
    status = _status([_job("a", "failed", final=True, exit_code=3)])
    assert cli.step_line(status.step("a"), T0 + 20) == "a failed (exit code 3)"


def test_a_large_mapped_step_gets_a_line_per_tenth_of_its_items():
    spec = _spec(MAPPED)
    lines: list[str] = []
    display = cli.PlainRunDisplay(lines.append)

    def show(done: int) -> None:
        items = [_item("each", "job-each", i, "succeeded" if i < done else "running") for i in range(100)]
        display.show(_status([_job("extract", "succeeded"), _job("each", "waiting"), *items], spec), 1.0, T0)

    show(0)
    lines.clear()
    for done in range(1, 25):
        show(done)
    assert lines == [
        "[  1.00s] each running (10/100 items done, 90 running)",
        "[  1.00s] each running (20/100 items done, 80 running)",
    ]


def test_the_outcome_line_says_a_cancel_and_a_generation():
    jobs = [_job("a", "succeeded"), *(_job(n, "cancelled", reason="stop") for n in "bcd")]
    status = _status(jobs, state="cancelled", cancel_reason="stop", generation=2)
    assert cli.outcome_line(status) == (
        f"workflow wf run {RUN} generation 2 cancelled (cancelled: stop): 1 succeeded, 3 cancelled"
    )
    status = _status([_job("a", "running")], state="cancelled")
    assert cli.outcome_line(status).startswith(f"workflow wf run {RUN} running (cancelling):")


def test_status_prints_the_run_and_a_table_of_its_steps():
    spec = _spec({**MAPPED, "report": {"needs": ["each"], "when": "ended"}})
    items = [_item("each", "job-each", i, "succeeded" if i else "running") for i in range(4)]
    jobs = [_job("extract", "succeeded"), _job("each", "waiting"), *items, _job("report", "queued")]
    status = with_times(_status(jobs, spec), {"job-extract": StepTimes(T0, T0 + 1.25)})
    lines = cli.status_lines(status, T0 + 60)
    assert lines[0] == f"run       {RUN}  wf"
    assert lines[1] == "outcome   running"
    assert lines[4] == "steps     1 waiting, 1 running, 1 succeeded"
    assert lines[5].split() == ["STEP", "STATE", "TOOK", "NEEDS", "DETAIL"]
    assert lines[6].split()[:4] == ["extract", "succeeded", "1.25s", "-"]
    assert lines[7].split()[:4] == ["each", "running", "1m00s", "extract"]
    assert lines[7].endswith("3/4 items done, 1 running")
    assert lines[8].split()[:5] == ["report", "waiting", "-", "each", "(ended)"]
    assert lines[8].endswith("waiting for: each")


def test_the_live_tree_shows_every_step_with_its_state_and_detail():
    status = with_times(
        _status([_job("a", "succeeded"), _job("b", "running", updated_at=T0 + 1), _job("c", "queued")]),
        {"job-a": StepTimes(T0, T0 + 0.5)},
    )
    console = Console(file=io.StringIO(), width=160, record=True, color_system=None)
    console.print(cli.tree_of(status, 3.0, T0 + 3))
    text = console.export_text()
    assert f"workflow wf run {RUN} running  1 waiting, 1 queued, 1 running, 1 succeeded  3.00s" in text
    assert "✓ a  succeeded    0.50s" in text
    assert "▶ b  running      2.00s  node node-a" in text
    assert "○ c  queued           -" in text
    assert "… d  waiting          -  waiting for: b, c" in text


def test_the_lines_of_run_cancel_retry_and_list():
    spec = _spec(DIAMOND)
    reply = WorkflowRunReply(run=_record(spec))
    assert cli.started_line(reply) == f"workflow wf run {RUN} started (4 steps)"
    dup = WorkflowRunReply(run=_record(spec), duplicate=True)
    assert cli.started_line(dup) == f"workflow wf run {RUN} was started already (same idempotency key) (4 steps)"
    assert cli.cancelled_line(WorkflowCancelReply(run_id=RUN, cancelled=3)) == f"run {RUN} cancelled (3 jobs reached)"
    ended = WorkflowCancelReply(run_id=RUN, cancelled=0, message="0 of 3 jobs stopped, 3 had ended")
    assert cli.cancelled_line(ended) == f"run {RUN}: no job left to cancel (0 of 3 jobs stopped, 3 had ended)"
    retried = WorkflowRetryReply(run=_record(spec, generation=1), steps=["b", "d"])
    assert cli.retried_line(retried) == f"run {RUN} retried (generation 1): b, d run again"
    runs = [
        WorkflowSummary(
            run_id=RUN, name="wf", state="running", generation=0, steps=4, created_at=T0 - 120, updated_at=T0 - 5
        ),
        WorkflowSummary(
            run_id="s" * 32, name="wf", state="cancelled", generation=1, steps=4, created_at=T0, updated_at=T0
        ),
    ]
    lines = cli.run_list_lines(runs, {RUN: "succeeded"}, T0)
    assert lines[0].split() == ["RUN", "NAME", "OUTCOME", "GEN", "STEPS", "CREATED", "UPDATED"]
    assert lines[1].split() == [RUN, "wf", "succeeded", "0", "4", "2m", "ago", "5s", "ago"]
    assert lines[2].split()[:3] == ["s" * 32, "wf", "cancelled"]


def test_detach_prints_the_run_id_or_json(capsys):
    reply = WorkflowRunReply(run=_record(_spec(DIAMOND)))
    cli.started(reply, as_json=False)
    assert capsys.readouterr().out == RUN + "\n"
    cli.started(reply, as_json=True)
    assert json.loads(capsys.readouterr().out) == {"run_id": RUN, "name": "wf", "duplicate": False}


@pytest.mark.parametrize(
    ("outcome", "code"), [("succeeded", EXIT_OK), ("failed", EXIT_FAILED), ("cancelled", cli.EXIT_CANCELLED)]
)
def test_each_outcome_has_its_exit_code(outcome, code):
    assert cli.exit_code_for(outcome) == code


def test_a_run_that_has_not_ended_has_no_exit_code():
    with pytest.raises(ValueError, match="not ended"):
        cli.exit_code_for("running")


def test_the_exit_codes_are_distinct():
    from jobmesh.client.cli import exitcodes

    codes = [v for k, v in vars(exitcodes).items() if k.startswith("EXIT_")]
    assert len(codes) == len(set(codes)) and exitcodes.EXIT_CANCELLED == 5


# --- following ---------------------------------------------------------------------------
class _FakeClient:
    """Answers workflow_status with the statuses given, in turn, and get with the views given."""

    def __init__(self, statuses: list[WorkflowStatus], views: dict[str, JobView]) -> None:
        self.statuses = statuses
        self.views = views
        self.gets: list[str] = []

    async def workflow_status(self, run_id: str) -> WorkflowStatus:
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    async def get(self, job_id: str) -> JobView:
        self.gets.append(job_id)
        if job_id not in self.views:
            raise NotFound(job_id)
        return self.views[job_id]


def _view(job_id: str, started: float, finished: float | None, final: bool) -> JobView:
    attempt = AttemptView(attempt=1, state="succeeded" if final else "running", started_at=started)
    if finished is not None:
        attempt = AttemptView(attempt=1, state="succeeded", started_at=started, finished_at=finished)
    return JobView(
        job_id=job_id,
        name="",
        queue="default",
        tenant="default",
        state="succeeded" if final else "running",
        reason="",
        attempt=1,
        node_id="node-a",
        submitted_at=T0,
        updated_at=finished or started,
        spec=JobSpec(runtime=NoopRuntime()),
        attempts=[attempt],
        final=final,
    )


async def test_follow_shows_each_status_until_the_run_ends_and_reads_each_view_at_most_twice():
    spec = _spec({"a": {}, "b": {"needs": ["a"]}})
    statuses = [
        run_status(_record(spec), [_job("a", "running"), _job("b", "queued")]),
        run_status(_record(spec), [_job("a", "running"), _job("b", "queued")]),
        run_status(_record(spec), [_job("a", "succeeded"), _job("b", "running")]),
        run_status(_record(spec), [_job("a", "succeeded"), _job("b", "succeeded")]),
    ]
    client = _FakeClient(
        statuses,
        {"job-a": _view("job-a", T0 + 0.5, T0 + 2.0, True), "job-b": _view("job-b", T0 + 2.5, T0 + 3.0, True)},
    )
    lines: list[str] = []
    ticks = iter(range(100))
    status = await cli.follow(
        client,
        RUN,
        cli.PlainRunDisplay(lines.append),
        poll_seconds=0,
        clock=lambda: float(next(ticks)),
        wall=lambda: T0,
    )
    assert status.outcome == "succeeded"
    assert (status.step("a").started_at, status.step("a").ended_at) == (T0 + 0.5, T0 + 2.0)
    assert lines[-1] == f"[  4.00s] workflow wf run {RUN} succeeded: 2 succeeded"
    assert "[  3.00s] a succeeded (1.50s)" in lines
    # a: once running (the view was already final, so never again); b: once running.
    assert client.gets == ["job-a", "job-b"]


async def test_follow_raises_not_found_for_an_unknown_run():
    class Missing(_FakeClient):
        async def workflow_status(self, run_id: str) -> WorkflowStatus:
            raise NotFound(f"no workflow run {run_id}")

    with pytest.raises(NotFound):
        await cli.follow(Missing([], {}), RUN, cli.PlainRunDisplay(lambda line: None), poll_seconds=0)


async def test_follow_keeps_asking_while_a_service_is_away_for_a_while(capsys):
    spec = _spec({"a": {}})
    done = run_status(_record(spec), [_job("a", "succeeded")])

    class Flaky(_FakeClient):
        def __init__(self, failures: int) -> None:
            super().__init__([done], {})
            self.failures = failures

        async def workflow_status(self, run_id: str) -> WorkflowStatus:
            if self.failures:
                self.failures -= 1
                raise Unavailable("the tracker service did not answer")
            return done

    ticks = iter(range(1000))
    clock = lambda: float(next(ticks))  # noqa: E731 - one second a call
    status = await cli.follow(Flaky(3), RUN, cli.PlainRunDisplay(lambda line: None), poll_seconds=0, clock=clock)
    assert status.outcome == "succeeded"
    assert capsys.readouterr().err.count("still trying") == 1
    with pytest.raises(Unavailable):
        await cli.follow(Flaky(100), RUN, cli.PlainRunDisplay(lambda line: None), poll_seconds=0, clock=clock)


def test_the_display_is_plain_lines_when_not_on_a_terminal():
    assert isinstance(cli.display_for(io.StringIO()), cli.PlainRunDisplay)


# --- submit --after, and status of a job that waits for one ------------------------------
@pytest.mark.parametrize(
    ("flag", "when"), [("j1", "succeeded"), ("j1:ok", "succeeded"), ("j1:notok", "failed"), ("j1:any", "ended")]
)
def test_after_takes_slurms_conditions(flag, when):
    assert dependency(flag) == Dependency(job_id="j1", when=when)


@pytest.mark.parametrize("flag", ["", ":ok", "j1:maybe", "j1:"])
def test_after_refuses_a_missing_id_or_an_unknown_condition(flag):
    with pytest.raises(argparse.ArgumentTypeError):
        dependency(flag)


def test_submit_after_sets_the_specs_dependencies():
    args = build_parser([]).parse_args(["submit", "--after", "j1", "--after", "j2:notok", "--after", "j1:any", "true"])
    assert spec_from(args, now=T0).after == [
        Dependency(job_id="j1", when="ended"),  # the same job twice: the last flag wins
        Dependency(job_id="j2", when="failed"),
    ]
    assert spec_from(build_parser([]).parse_args(["submit", "true"]), now=T0).after == []


def test_a_bad_after_id_names_the_flag():
    args = build_parser([]).parse_args(["submit", "--after", "not/an/id", "true"])
    with pytest.raises(InvalidMessage, match=r"\(flag --after\)") as caught:
        spec_from(args, now=T0)
    assert caught.value.field == "after[0].job_id"


def test_a_bad_after_condition_exits_1(capsys):
    with pytest.raises(SystemExit) as caught:
        build_parser([]).parse_args(["submit", "--after", "j1:afterok", "true"])
    assert caught.value.code == EXIT_USAGE
    assert "is not ok, notok or any" in capsys.readouterr().err


def test_status_of_a_job_that_waits_for_its_dependencies_says_for_which(capsys):
    spec = JobSpec(runtime=NoopRuntime(), after=[Dependency(job_id="j1", step="extract")])
    view = JobView(
        job_id="j2",
        name="load",
        queue="default",
        tenant="default",
        state="waiting",
        reason="waiting for: extract",
        attempt=0,
        node_id="",
        submitted_at=T0,
        updated_at=T0,
        spec=spec,
    )
    render.job_status(view, seen_in_view(view, None), as_json=False)
    assert "state    waiting (waiting for: extract)" in capsys.readouterr().out.splitlines()


def test_a_held_step_recorded_by_the_tracker_is_no_news():
    # First its job is not recorded (attempt 0), then it is, waiting with attempt 1: same line.
    spec = _spec({"a": {}, "b": {"needs": ["a"]}})
    lines: list[str] = []
    display = cli.PlainRunDisplay(lines.append)
    display.show(run_status(_record(spec), [_job("a", "running")]), 0.0, T0)
    display.show(run_status(_record(spec), [_job("a", "running"), _job("b", "waiting", attempt=1)]), 0.5, T0)
    assert lines == ["[  0.00s] a running (node node-a)", "[  0.00s] b waiting (waiting for: a)"]
