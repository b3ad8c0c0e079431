"""Checking a workflow and turning a run into jobs (``jobmesh.trigger.workflows``), without a server."""

from __future__ import annotations

import time

import msgspec
import pytest

from jobmesh.contract import subjects
from jobmesh.contract.ids import job_id_for, step_key
from jobmesh.contract.messages.v1 import (
    Dependency,
    HandlerInfo,
    JobSpec,
    JobSummary,
    JobView,
    NoopRuntime,
    WorkflowSpec,
)
from jobmesh.errors import Conflict, InvalidSpec
from jobmesh.trigger.handlers import settle_after
from jobmesh.trigger.handlerschemas import HandlerSchema
from jobmesh.trigger.workflows import (
    check,
    concurrency_digest,
    concurrency_key,
    condition,
    depths,
    expand,
    handler_names,
    order,
    plan_retry,
    step_job_id,
)

NOW = 1_700_000_000.0
RUN = "r" * 32


def workflow(steps: dict, **extra) -> WorkflowSpec:
    return msgspec.convert({"name": "wf", "steps": steps, **extra}, WorkflowSpec)


def sh(*argv: str, **extra) -> dict:
    return {"runtime": {"kind": "process", "argv": ["sh", "-c", *argv]}, **extra}


def refused(spec: WorkflowSpec, input=None, handlers=None) -> InvalidSpec:
    with pytest.raises(InvalidSpec) as caught:
        check(spec, input, handlers, now=NOW)
    return caught.value


class AddIn(msgspec.Struct):
    n: int


class Part(msgspec.Struct):
    name: str
    size: int


class AddOut(msgspec.Struct):
    total: int
    parts: list[Part] = []
    tags: dict[str, int] = {}


def schema(name: str = "add") -> HandlerSchema:
    return HandlerSchema(
        HandlerInfo(
            name=name,
            input_type="tests.AddIn",
            output_type="tests.AddOut",
            input_schema=msgspec.json.schema(AddIn),
            output_schema=msgspec.json.schema(AddOut),
        )
    )


def handler_step(value, **extra) -> dict:
    return {"runtime": {"kind": "handler", "handler": "add", "input": value}, **extra}


DIAMOND = {
    "a": sh("echo a"),
    "b": sh("echo ${steps.a.result.x}", needs=["a"]),
    "c": sh("echo c", needs=["a"], on_error="continue"),
    "d": sh("echo ${steps.b.result} ${steps.a.result}", needs=["b", "c"]),
}


# --- check: what is refused, and where ------------------------------------------------------
def test_a_cycle_is_refused_naming_its_steps():
    error = refused(workflow({"a": sh("x", needs=["c"]), "b": sh("x", needs=["a"]), "c": sh("x", needs=["b"])}))
    assert error.field == "steps.a.needs"
    assert "a -> c -> b -> a" in error.message


def test_a_need_of_a_step_that_does_not_exist_is_refused():
    error = refused(workflow({"a": sh("x"), "b": sh("x", needs=["a", "nope"])}))
    assert error.field == "steps.b.needs[1]"
    assert "'nope' is not a step" in error.message and "a, b" in error.message


def test_a_step_that_needs_itself_is_refused():
    assert refused(workflow({"a": sh("x", needs=["a"])})).field == "steps.a.needs[0]"


@pytest.mark.parametrize(
    ("argv", "field", "says"),
    [
        ("${HOME}", "steps.b.runtime.argv[2]", "starts with steps."),
        ("${steps.a}", "steps.b.runtime.argv[2]", "steps.<step>.result"),
        ("${workflow.name}", "steps.b.runtime.argv[2]", "only ${workflow.id}"),
        ("${steps.c.result}", "steps.b.runtime.argv[2]", "not among the needs"),
        ("${steps.zz.result}", "steps.b.runtime.argv[2]", "'zz' is not a step"),
        ("${steps.b.result}", "steps.b.runtime.argv[2]", "its own result"),
        ("${item}", "steps.b.runtime.argv[2]", "only a mapped step"),
        ("${input.missing}", "steps.b.runtime.argv[2]", "the run's input has no missing"),
    ],
)
def test_a_bad_placeholder_is_refused_naming_the_field(argv, field, says):
    spec = workflow({"a": sh("x"), "b": sh(argv, needs=["a"]), "c": sh("x", needs=["b"])})
    error = refused(spec, {"present": 1})
    assert error.field == field, error
    assert says in error.message, error.message


def test_a_placeholder_may_name_any_ancestor_and_the_input():
    spec = workflow(
        {
            "a": sh("x"),
            "b": sh("x", needs=["a"]),
            "c": sh("${steps.a.result.x} ${input.who} ${workflow.id}", needs=["b"]),
        }
    )
    check(spec, {"who": "me"}, now=NOW)


def test_a_value_from_the_input_that_holds_a_placeholder_is_refused():
    spec = workflow({"a": sh("${input.cmd}")})
    assert refused(spec, {"cmd": "${steps.a.result}"}).field == "steps.a.runtime.argv[2]"


def test_map_over_must_be_one_placeholder_of_a_needed_steps_result():
    for over, says in [
        ("${steps.a.result.items} tail", "exactly one placeholder"),
        ("${input.items}", "exactly one placeholder"),
        ("${steps.x.result}", "'x' is not a step"),
    ]:
        spec = workflow({"a": sh("x"), "m": sh("${item}", needs=["a"], map={"over": over})})
        error = refused(spec, {"items": [1]})
        assert error.field == "steps.m.map.over", error
        assert says in error.message, error.message
    spec = workflow({"a": sh("x"), "b": sh("x"), "m": sh("${item}", needs=["a"], map={"over": "${steps.b.result}"})})
    assert "not among the needs" in refused(spec).message


def test_a_step_may_not_set_step_after_or_the_map_source():
    step = {"workflow_id": "w", "step": "a"}
    assert refused(workflow({"a": sh("x", step=step)})).field == "steps.a.step"
    assert refused(workflow({"a": sh("x", after=[{"job_id": "j"}])})).field == "steps.a.after"
    assert refused(workflow({"a": sh("x", when="failed")})).field == "steps.a.when"
    mapped = sh("${item}", needs=["a"], map={"over": "${steps.a.result}", "source": "j"})
    assert refused(workflow({"a": sh("x"), "m": mapped})).field == "steps.m.map.source"


def test_a_step_spec_is_checked_as_a_plain_submit_would_be():
    spec = workflow({"a": sh("x", concurrency_key="k")})
    error = refused(spec)
    assert error.field == "steps.a.concurrency_limit"
    spec = workflow({"a": {"runtime": {"kind": "process", "argv": [" "]}}})
    assert refused(spec).field == "steps.a.runtime.argv[0]"


def test_an_input_value_filled_into_argv_env_or_stdin_becomes_its_text():
    spec = workflow({"a": {**sh("${input.n}"), "stdin": "${input.tags}"}})
    spec = msgspec.structs.replace(
        spec,
        steps={
            "a": msgspec.structs.replace(
                spec.steps["a"], runtime=msgspec.structs.replace(spec.steps["a"].runtime, env={"N": "${input.n}"})
            )
        },
    )
    (job,) = expand(spec, {"n": 3, "tags": ["x", "y"]}, RUN, 0, 4, {}, NOW)
    assert job.spec.runtime.argv[2] == "3" and job.spec.runtime.env == {"N": "3"}
    assert job.spec.stdin == '["x","y"]'


def test_a_handler_input_is_checked_against_its_type_unless_it_reads_upstream():
    handlers = {"add": schema()}
    spec = workflow({"a": handler_step({"n": "three"})})
    error = refused(spec, handlers=handlers)
    assert error.field == "steps.a.runtime.input.n"
    assert "tests.AddIn" in error.message
    check(workflow({"a": handler_step({"n": "${input.n}"})}), {"n": 2}, handlers, now=NOW)
    assert refused(workflow({"a": handler_step({"n": "${input.n}"})}), {"n": "x"}, handlers).field == (
        "steps.a.runtime.input.n"
    )
    check(
        workflow({"a": handler_step({"n": 1}), "b": handler_step({"n": "${steps.a.result.total}"}, needs=["a"])}),
        None,
        handlers,
        now=NOW,
    )
    assert handler_names(workflow({"a": handler_step({"n": 1}), "b": sh("x")})) == {"add"}


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("total", True),
        ("parts", True),
        ("parts.0.name", True),
        ("parts.0.weight", False),
        ("tags.anything", True),
        ("nope", False),
        ("total.x", False),
    ],
)
def test_a_handler_steps_result_path_must_name_a_field_of_its_output(path, ok):
    spec = workflow({"a": handler_step({"n": 1}), "b": sh(f"${{steps.a.result.{path}}}", needs=["a"])})
    if ok:
        check(spec, None, {"add": schema()}, now=NOW)
    else:
        error = refused(spec, handlers={"add": schema()})
        assert error.field == "steps.b.runtime.argv[2]"
        assert "handler 'add'" in error.message and "tests.AddOut" in error.message
    # A handler whose type is not known is not checked.
    check(spec, None, {}, now=NOW)


def test_a_mapped_steps_result_is_a_list_indexed_by_item():
    mapped = sh("${item}", needs=["a"], map={"over": "${steps.a.result}"})
    spec = workflow({"a": sh("x"), "m": mapped, "z": sh("${steps.m.result.field}", needs=["m"])})
    assert "is mapped" in refused(spec).message
    check(workflow({"a": sh("x"), "m": mapped, "z": sh("${steps.m.result.0.f}", needs=["m"])}), None, now=NOW)


def test_a_concurrency_key_reads_the_input_only():
    assert concurrency_key(workflow({"a": sh("x")}, concurrency_key="ds-${input.ds}"), {"ds": "x"}) == "ds-x"
    error = refused(workflow({"a": sh("x")}, concurrency_key="${steps.a.result}"))
    assert error.field == "concurrency_key"
    assert refused(workflow({"a": sh("x")}, concurrency_key="${input.ds}"), {}).field == "concurrency_key"
    assert concurrency_digest("a") != concurrency_digest("b") and len(concurrency_digest("a")) == 32


# --- expand -------------------------------------------------------------------------------
def jobs_by_step(events) -> dict:
    return {event.spec.step.step: event for event in events}


def test_a_diamond_becomes_one_job_per_step_waiting_for_its_needs():
    spec = workflow(DIAMOND, priority=7, tenant="team")
    check(spec, None, now=NOW)
    events = expand(spec, None, RUN, 0, 4, {}, NOW)
    assert [e.spec.step.step for e in events] == ["a", "b", "c", "d"]
    by = jobs_by_step(events)
    ids = {name: job_id_for(step_key(RUN, name, 0)) for name in DIAMOND}
    for name, event in by.items():
        assert event.job_id == ids[name] == step_job_id(RUN, name, 0)
        assert event.idempotency_key == step_key(RUN, name, 0)
        assert event.partition == subjects.partition_of(event.spec.queue, 4)
        # Only a result another step reads is kept (a and b are read by b and d).
        assert event.spec.keep_result == (name in ("a", "b"))
        assert event.spec.priority == 7 and event.spec.tenant == "team"
        assert event.spec.metadata == {"jobmesh.workflow": RUN, "jobmesh.step": name}
        assert event.spec.step.workflow_id == RUN and event.spec.step.index == -1
        assert event.submitted_at == NOW
        assert event.spec.name == name
    assert by["a"].spec.after == []
    assert [(d.job_id, d.when, d.step) for d in by["b"].spec.after] == [(ids["a"], "succeeded", "a")]
    # c may fail without failing the run: d waits for it to end, however it ends.
    assert [(d.job_id, d.when) for d in by["d"].spec.after] == [(ids["b"], "succeeded"), (ids["c"], "ended")]
    assert set(by["d"].spec.step.upstream) == {"a", "b"}
    assert by["d"].spec.step.upstream["a"].job_id == ids["a"]
    assert set(by["b"].spec.step.upstream) == {"a"} and by["c"].spec.step.upstream == {}
    # The executor fills upstream results in when the job starts: left as written.
    assert by["d"].spec.runtime.argv[2] == "echo ${steps.b.result} ${steps.a.result}"


def test_the_input_and_the_run_id_are_filled_in_at_submit():
    spec = workflow({"a": sh("${input.who} ${workflow.id}", metadata={"n": "${input.n}"}, stdin="text: ${input.text}")})
    (event,) = expand(spec, {"who": "me", "n": "7", "text": {"a": 1}}, RUN, 0, 4, {}, NOW)
    assert event.spec.runtime.argv[2] == f"me {RUN}"
    assert event.spec.metadata["n"] == "7"
    # Inside a longer string a value that is not text becomes its JSON.
    assert event.spec.stdin == 'text: {"a":1}'


def test_a_mapped_step_is_one_job_that_names_its_list():
    spec = workflow(
        {
            "split": handler_step({"n": 1}),
            "work": sh("${item.name}", needs=["split"], map={"over": "${steps.split.result.parts}", "concurrency": 3}),
            "join": sh("${steps.work.result}", needs=["work"]),
        }
    )
    check(spec, None, {"add": schema()}, now=NOW)
    by = jobs_by_step(expand(spec, None, RUN, 0, 4, {}, NOW))
    assert len(by) == 3
    mapping = by["work"].spec.map
    assert mapping.source == by["split"].job_id and mapping.path == ["parts"] and mapping.concurrency == 3
    assert by["work"].spec.step.upstream["split"].mapped is False
    assert by["join"].spec.step.upstream["work"].mapped is True
    assert by["work"].spec.runtime.argv[2] == "${item.name}"


def test_root_steps_wait_for_every_job_of_the_earlier_run_with_the_key():
    spec = workflow(DIAMOND, concurrency_key="x")
    by = jobs_by_step(expand(spec, None, RUN, 0, 4, {}, NOW, after_jobs=[("p1", 1), ("p2", 3)]))
    assert [(d.job_id, d.when, d.partition) for d in by["a"].spec.after] == [("p1", "ended", 1), ("p2", "ended", 3)]
    assert all(d.job_id not in ("p1", "p2") for d in by["b"].spec.after + by["d"].spec.after)


def test_a_retry_keeps_succeeded_steps_and_drops_dependencies_on_them():
    spec = workflow(DIAMOND)
    kept = {"a": step_job_id(RUN, "a", 0), "c": step_job_id(RUN, "c", 0)}
    by = jobs_by_step(expand(spec, None, RUN, 1, 4, kept, NOW))
    assert set(by) == {"b", "d"}
    assert by["b"].job_id == step_job_id(RUN, "b", 1) != step_job_id(RUN, "b", 0)
    assert by["b"].idempotency_key == step_key(RUN, "b", 1)
    assert by["b"].spec.after == []
    assert [d.job_id for d in by["d"].spec.after] == [by["b"].job_id]
    # Results are still read from the kept jobs.
    assert by["b"].spec.step.upstream["a"].job_id == kept["a"]
    assert by["d"].spec.step.upstream["a"].job_id == kept["a"]


# --- retry plans ----------------------------------------------------------------------------
def row(job_id: str, state: str, final: bool = True) -> JobSummary:
    return JobSummary(
        job_id=job_id,
        name="",
        queue="default",
        tenant="default",
        state=state,
        attempt=1,
        node_id="",
        exit_code=None,
        submitted_at=time.time(),
        updated_at=time.time(),
        final=final,
    )


def test_a_retry_runs_again_what_did_not_succeed_and_can_run():
    spec = workflow(
        {
            **DIAMOND,
            "alert": sh("x", needs=["d"], when="failed"),
            "cleanup": sh("x", needs=["d"], when="ended"),
        }
    )
    jobs = {name: step_job_id(RUN, name, 0) for name in spec.steps}
    states = {"a": "succeeded", "b": "failed", "c": "succeeded", "d": "cancelled", "alert": "succeeded"}
    states["cleanup"] = "succeeded"
    plan = plan_retry(spec, jobs, {name: row(jobs[name], states[name]) for name in spec.steps})
    assert plan.steps == ["b", "d"]
    assert plan.jobs_kept == {name: jobs[name] for name in ("a", "c", "alert", "cleanup")}

    # An on-failure step whose need succeeded could not run this time either: left as it is.
    states = {name: "succeeded" for name in spec.steps}
    states["alert"] = "cancelled"
    plan = plan_retry(spec, jobs, {name: row(jobs[name], states[name]) for name in spec.steps})
    assert plan.steps == []


def test_a_retry_is_refused_while_a_step_has_not_ended():
    spec = workflow(DIAMOND)
    jobs = {name: step_job_id(RUN, name, 0) for name in spec.steps}
    current = {name: row(jobs[name], "succeeded") for name in spec.steps}
    current["d"] = row(jobs["d"], "running", final=False)
    with pytest.raises(Conflict, match="'d' has not ended"):
        plan_retry(spec, jobs, current)
    current["d"] = None
    with pytest.raises(Conflict, match="not recorded"):
        plan_retry(spec, jobs, current)


def test_conditions():
    assert condition("succeeded", "succeeded", True) == "met"
    assert condition("succeeded", "failed", True) == "never"
    assert condition("failed", "expired", True) == "met"
    assert condition("failed", "cancelled", True) == "never"
    assert condition("ended", "cancelled", True) == "met"
    assert condition("ended", "running", False) == "pending"


def test_order_and_depths():
    spec = workflow({"d": sh("x", needs=["b", "c"]), "b": sh("x", needs=["a"]), "c": sh("x"), "a": sh("x")})
    assert order(spec) == ["c", "a", "b", "d"]
    assert depths(spec) == {"c": 0, "a": 0, "b": 1, "d": 2}


# --- after on a plain submit (the decision, with a stand-in tracker) -------------------------
class StandInTracker:
    def __init__(self, views: dict) -> None:
        self._views = views
        self.asked: list[list[str]] = []

    async def views(self, job_ids, grace=None):
        asked = list(job_ids)
        self.asked.append(asked)
        return {job_id: self._views.get(job_id) for job_id in asked}


def view(job_id: str, state: str, final: bool):
    return JobView(
        job_id=job_id,
        name="",
        queue="default",
        tenant="default",
        state=state,
        reason="",
        attempt=1,
        node_id="",
        submitted_at=NOW,
        updated_at=NOW,
        spec=JobSpec(runtime=NoopRuntime()),
        final=final,
    )


def waits(*deps) -> JobSpec:
    return JobSpec(runtime=NoopRuntime(), after=[Dependency(job_id=j, when=w) for j, w in deps])


async def test_after_keeps_what_is_pending_drops_what_is_met_and_refuses_what_never_can_be():
    tracker = StandInTracker(
        {
            "done": view("done", "succeeded", True),
            "busy": view("busy", "running", False),
            "gone": view("gone", "cancelled", True),
        }
    )
    specs = [
        waits(("done", "succeeded"), ("busy", "succeeded")),
        waits(("gone", "ended")),
        JobSpec(runtime=NoopRuntime()),
    ]
    out = await settle_after(specs, ["j0", "j1", "j2"], tracker, 4)
    assert [d.job_id for d in out[0].after] == ["busy"]
    assert out[1].after == [] and out[2] is specs[2]
    assert len(tracker.asked) == 1 and sorted(tracker.asked[0]) == ["busy", "done", "gone"]

    with pytest.raises(InvalidSpec) as caught:
        await settle_after(
            [JobSpec(runtime=NoopRuntime()), waits(("busy", "ended"), ("gone", "failed"))], ["a", "b"], tracker, 4
        )
    assert caught.value.field == "jobs[1].spec.after[1].job_id"


async def test_after_on_jobs_of_the_same_request_is_kept_unless_they_form_a_cycle():
    tracker = StandInTracker({})
    chain = [waits()] + [waits((f"j{i - 1}", "succeeded")) for i in range(1, 1000)]
    out = await settle_after(chain, [f"j{i}" for i in range(1000)], tracker, 4)
    assert out[999].after[0].job_id == "j998" and tracker.asked == []
    with pytest.raises(InvalidSpec) as caught:
        await settle_after(
            [waits(("j2", "ended")), waits(("j0", "ended")), waits(("j1", "ended"))], ["j0", "j1", "j2"], tracker, 4
        )
    assert "cycle" in caught.value.message and caught.value.field.endswith(".after[0].job_id")
    with pytest.raises(InvalidSpec, match="itself"):
        await settle_after([waits(("j0", "ended"))], ["j0"], tracker, 4)


def test_a_step_cannot_map_over_a_mapped_step_nor_template_its_fallback():
    steps = {
        "a": sh("x"),
        "m": {**sh("${item}"), "needs": ["a"], "map": {"over": "${steps.a.result.items}"}},
        "mm": {**sh("${item}"), "needs": ["m"], "map": {"over": "${steps.m.result}"}},
    }
    assert refused(workflow(steps)).field == "steps.mm.map.over"
    fallback = {"runtime": {"kind": "process", "argv": ["echo", "${steps.a.result}"]}}
    steps = {"a": sh("x"), "b": {**sh("y"), "needs": ["a"], "retry": {"max_attempts": 2, "fallback": fallback}}}
    assert refused(workflow(steps)).field == "steps.b.retry.fallback.runtime.argv[1]"


def test_an_on_failure_step_cannot_read_the_result_of_the_step_whose_failure_it_waits_for():
    steps = {
        "a": sh("x"),
        "b": sh("y", needs=["a"]),
        "alert": sh("echo ${steps.b.result}", needs=["b"], when="failed"),
    }
    assert refused(workflow(steps)).field == "steps.alert.runtime.argv[2]"
    # What the failed step's own upstream made is there to read.
    steps["alert"] = sh("echo ${steps.a.result}", needs=["b"], when="failed")
    check(workflow(steps), None, now=NOW)
