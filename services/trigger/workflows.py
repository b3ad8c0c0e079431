"""Workflows, decided: checking a workflow whole, and turning a run of it into jobs.

Pure functions of the spec, the run's input, the handlers' types and the clock: the
responders (:mod:`jobmesh.trigger.workflowapi`) and a trigger rule that starts a run do the
I/O around them.

- :func:`check` refuses a workflow that could not run as written, naming the step and
  field, before anything is created: a cycle, an unknown need, a placeholder that is
  malformed or reads what the step cannot see, a step whose job would fail a plain submit.
- :func:`expand` makes one ``JobSubmitted`` per step (a mapped step is one job; the
  scheduler expands it into its items): ``after`` from the step's needs, ``${input...}`` and
  ``${workflow.id}`` filled in, the rest left for the executor to fill from upstream
  results (``StepRef.upstream``).
- :func:`plan_retry` decides which steps a retry runs again, from how each step's current
  job ended.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import msgspec

from jobmesh.contract import subjects
from jobmesh.contract.ids import job_id_for, step_key
from jobmesh.contract.messages.v1 import (
    Dependency,
    HandlerRuntime,
    JobOrigin,
    JobSpec,
    JobSubmitted,
    JobSummary,
    StepRef,
    UpstreamRef,
    WorkflowSpec,
    WorkflowStep,
)
from jobmesh.contract.messages.v1.jobs import DependencyCondition
from jobmesh.contract.steptemplates import MISSING, Ref, as_text, fill, refs_in, walk
from jobmesh.contract.validation import validate_spec
from jobmesh.errors import Conflict, InvalidSpec
from jobmesh.trigger.handlerschemas import HandlerSchema

__all__ = [
    "RetryPlan",
    "check",
    "concurrency_digest",
    "concurrency_key",
    "condition",
    "depths",
    "expand",
    "handler_names",
    "order",
    "plan_retry",
    "run_input",
    "step_job_id",
    "step_jobs",
]

# What the trigger fills in at submit; ``steps`` and ``item`` wait for the job's start.
SUBMIT_KINDS = frozenset({"input", "workflow"})
# The fields a step adds to a job spec: they say where it sits, not what runs.
_STEP_FIELDS = ("needs", "when", "on_error")
# The run id ``check`` fills ``${workflow.id}`` with: the run has none yet, and any id of
# the right shape tells whether the filled spec is valid.
_SAMPLE_RUN_ID = "0" * 32
# Labels every step's job carries, so a completion rule or a person can find a run's jobs.
LABEL_WORKFLOW = "jobmesh.workflow"
LABEL_STEP = "jobmesh.step"
# JobSummary states a dependency condition is met by, once the job is final.
_FAILED_STATES = frozenset({"failed", "lost", "expired"})


def run_input(spec: WorkflowSpec, given: Any) -> Any:
    """The input a run gets: the one given, else the workflow's default."""
    return given if given is not None else spec.input


def step_job_id(run_id: str, step: str, generation: int) -> str:
    """The job id of ``step`` in ``run_id`` at ``generation`` (derived from its step key)."""
    return job_id_for(step_key(run_id, step, generation))


def step_jobs(spec: WorkflowSpec, run_id: str, generation: int, jobs_kept: Mapping[str, str]) -> dict[str, str]:
    """Each step's current job: the kept one, else the one this generation makes."""
    return {name: jobs_kept.get(name) or step_job_id(run_id, name, generation) for name in spec.steps}


def handler_names(spec: WorkflowSpec) -> set[str]:
    """The handlers the steps call (their runtime or fallback): whose types :func:`check` needs."""
    names = set()
    for step in spec.steps.values():
        for runtime in (step.runtime, step.retry.fallback.runtime if step.retry.fallback else None):
            if type(runtime) is HandlerRuntime:
                names.add(runtime.handler)
    return names


def concurrency_key(spec: WorkflowSpec, input: Any) -> str:
    """The run's concurrency key with ``${input...}`` filled in ("" when it has none).

    Raises:
        InvalidSpec: the key reads something other than the input, or input it lacks.
    """
    if not spec.concurrency_key:
        return ""
    for _, ref in refs_in(spec.concurrency_key, "concurrency_key"):
        if ref.kind != "input":
            raise InvalidSpec(
                f"${{{ref.text}}}: a concurrency key is built from the run's input only - at `$.concurrency_key`",
                field="concurrency_key",
            )
        _input_present(input, ref, "concurrency_key")
    key = fill(spec.concurrency_key, lambda ref: walk(input, ref.path), SUBMIT_KINDS)
    return key if isinstance(key, str) else json.dumps(key, separators=(",", ":"), sort_keys=True)


def concurrency_digest(key: str) -> str:
    """The digest a concurrency key is stored under (a KV key holds no arbitrary text)."""
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


# --- the graph ---------------------------------------------------------------------
def order(spec: WorkflowSpec) -> list[str]:
    """The steps in an order where each comes after its needs (declaration order otherwise).

    Raises:
        InvalidSpec: a need names no step, or the needs form a cycle (its steps named).
    """
    for name, step in spec.steps.items():
        for i, need in enumerate(step.needs):
            if need not in spec.steps:
                _fail(name, f"needs[{i}]", f"{need!r} is not a step of this workflow ({_known(spec)})")
            if need == name:
                _fail(name, f"needs[{i}]", "a step cannot need itself")
    placed: list[str] = []
    done: set[str] = set()
    remaining = list(spec.steps)
    while remaining:
        ready = [name for name in remaining if all(need in done for need in spec.steps[name].needs)]
        if not ready:
            cycle = _a_cycle(spec, remaining)
            _fail(cycle[0], "needs", "the needs form a cycle: " + " -> ".join([*cycle, cycle[0]]))
        placed.extend(ready)
        done.update(ready)
        remaining = [name for name in remaining if name not in done]
    return placed


def _a_cycle(spec: WorkflowSpec, remaining: list[str]) -> list[str]:
    """One cycle among ``remaining`` (steps that never became ready), in need order."""
    left = set(remaining)
    path: list[str] = []
    at = remaining[0]
    # Every step left has a need left (else it would have become ready): following the
    # first such need must come back to a step on the path.
    while at not in path:
        path.append(at)
        at = next(need for need in spec.steps[at].needs if need in left)
    return path[path.index(at) :]


def _ancestors(spec: WorkflowSpec, placed: Sequence[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name in placed:
        seen: set[str] = set()
        for need in spec.steps[name].needs:
            seen.add(need)
            seen |= out[need]
        out[name] = seen
    return out


def depths(spec: WorkflowSpec) -> dict[str, int]:
    """How far each step sits from the roots (a root is 0; a step is one below its deepest need)."""
    out: dict[str, int] = {}
    for name in order(spec):
        out[name] = max((out[need] + 1 for need in spec.steps[name].needs), default=0)
    return out


# --- checking ----------------------------------------------------------------------
def check(
    spec: WorkflowSpec,
    input: Any,
    handlers: Mapping[str, HandlerSchema] | None = None,
    now: float | None = None,
) -> None:
    """Refuse a workflow that could not run as written; nothing is created before this passes.

    Args:
        spec: the workflow.
        input: the run's input (:func:`run_input`).
        handlers: the types of the handlers the steps call, by name (:func:`handler_names`);
            a handler missing here is not checked (the executor checks its input at run time).
        now: the submission time (checks ``not_before`` against queue timeouts, as a submit).

    Raises:
        InvalidSpec: naming the field as ``steps.<step>.<field>`` (or ``concurrency_key``).
    """
    handlers = handlers or {}
    placed = order(spec)
    ancestors = _ancestors(spec, placed)
    concurrency_key(spec, input)
    for name in placed:
        step = spec.steps[name]
        _check_step(spec, name, step, input, ancestors[name], handlers, now)


def _check_step(
    spec: WorkflowSpec,
    name: str,
    step: WorkflowStep,
    input: Any,
    ancestors: set[str],
    handlers: Mapping[str, HandlerSchema],
    now: float | None,
) -> None:
    if step.step is not None:
        _fail(name, "step", "set by the trigger on a workflow's jobs; a step does not set it")
    if step.after:
        _fail(name, "after", "a step waits for the steps in its needs; name them there")
    if step.when != "succeeded" and not step.needs:
        _fail(name, "when", f"when: {step.when} says which end of its needs lets it run, and it needs no step")
    if step.map is not None and (step.map.source or step.map.path):
        _fail(name, "map.source" if step.map.source else "map.path", "filled in by the trigger from map.over")
    raw = _raw(step)
    for where, ref in _refs(name, raw):
        if ref.kind == "input":
            _input_present(input, ref, f"steps.{name}.{where}")
    if step.map is not None:
        _check_over(name, step.map.over)
        over = next(ref for _where, ref in refs_in(step.map.over))
        if over.step in spec.steps and spec.steps[over.step].map is not None:
            _fail(
                name,
                "map.over",
                f"{step.map.over}: {over.step} is a mapped step; a step maps over a list in one job's result"
                f" (map over the list {over.step} maps over, or have a step after it build one)",
            )
    fallback = raw.get("retry", {}).get("fallback")
    if fallback is not None:
        for where, ref in refs_in(fallback, "retry.fallback"):
            _fail(
                name, where, f"${{{ref.text}}}: a fallback job is not a workflow step; its placeholders stay unfilled"
            )
    job = _filled(name, raw, input, _SAMPLE_RUN_ID)
    # What is left to fill when the job starts, read from the filled spec: a value taken
    # from the input may hold a placeholder too, and it must pass the same checks.
    for where, ref in _refs(name, msgspec.to_builtins(job)):
        if ref.kind in SUBMIT_KINDS:
            _fail(name, where, f"${{{ref.text}}}: a value filled in from the run's input holds a placeholder")
        elif ref.kind == "item" and step.map is None:
            _fail(name, where, f"${{{ref.text}}}: only a mapped step (one with map) has an item")
        elif ref.kind == "item" and where == "map.over":
            _fail(name, where, f"${{{ref.text}}}: map.over names the list the items come from")
        elif ref.kind == "steps":
            _check_upstream(spec, name, where, ref, ancestors, handlers)
    validate_spec(job, where=f"steps.{name}", now=now)
    _check_handler_input(name, job.runtime, "runtime", handlers)
    if job.retry.fallback is not None:
        _check_handler_input(name, job.retry.fallback.runtime, "retry.fallback.runtime", handlers)


def _refs(name: str, raw: dict[str, Any]) -> list[tuple[str, Ref]]:
    try:
        return list(refs_in(raw))
    except InvalidSpec as exc:
        field = f"steps.{name}.{exc.field}" if exc.field else f"steps.{name}"
        raise InvalidSpec(f"{exc} - at `$.{field}`", field=field) from None


def _input_present(input: Any, ref: Ref, field: str) -> None:
    if walk(input, ref.path) is MISSING:
        what = ".".join(str(p) for p in ref.path) or "input"
        raise InvalidSpec(
            f"${{{ref.text}}}: the run's input has no {what} (give it in the run's input or the workflow's)"
            f" - at `$.{field}`",
            field=field,
        )


def _check_upstream(
    spec: WorkflowSpec,
    name: str,
    field: str,
    ref: Ref,
    ancestors: set[str],
    handlers: Mapping[str, HandlerSchema],
) -> None:
    if ref.step == name:
        _fail(name, field, f"${{{ref.text}}}: a step cannot read its own result")
    if ref.step not in spec.steps:
        _fail(name, field, f"${{{ref.text}}}: {ref.step!r} is not a step of this workflow ({_known(spec)})")
    if ref.step not in ancestors:
        _fail(
            name,
            field,
            f"${{{ref.text}}}: {ref.step!r} is not among the needs of {name!r} (directly or through its needs),"
            " so its result may not exist yet; add it to needs",
        )
    step = spec.steps[name]
    if step.when == "failed" and ref.step in step.needs:
        _fail(
            name,
            field,
            f"${{{ref.text}}}: {name!r} runs only after {ref.step!r} failed, and a failed step keeps no"
            " result; read what its own upstream steps made instead",
        )
    upstream = spec.steps[ref.step]
    path = list(ref.path)
    if upstream.map is not None and path:
        if not isinstance(path[0], int):
            _fail(
                name,
                field,
                f"${{{ref.text}}}: {ref.step!r} is mapped, so its result is the list of its items' results;"
                f" index it (steps.{ref.step}.result.0...) or take it whole",
            )
        path = path[1:]
    runtime = upstream.runtime
    if not path or type(runtime) is not HandlerRuntime or runtime.handler not in handlers:
        return
    info = handlers[runtime.handler].info
    if not _schema_has(info.output_schema, info.output_schema, path):
        shown = ".".join(str(p) for p in path)
        _fail(
            name,
            field,
            f"${{{ref.text}}}: the result of {ref.step!r} (handler {runtime.handler!r}, {info.output_type})"
            f" has no {shown}",
        )


def _check_over(name: str, over: str) -> None:
    refs = list(refs_in(over, "map.over"))
    token = "\x00whole\x00"  # a value no placeholder fills with: the string was nothing else
    if len(refs) != 1 or refs[0][1].kind != "steps" or fill(over, lambda _: token) != token:
        _fail(
            name,
            "map.over",
            f"{over!r}: map.over is exactly one placeholder naming a list in a needed step's result,"
            " such as ${steps.extract.result.items}",
        )


def _check_handler_input(name: str, runtime: Any, where: str, handlers: Mapping[str, HandlerSchema]) -> None:
    if type(runtime) is not HandlerRuntime or runtime.handler not in handlers:
        return
    # An input that reads upstream results or the item is known only when the job starts.
    if any(True for _ in refs_in(runtime.input)):
        return
    found = handlers[runtime.handler].problem(runtime.input)
    if found is None:
        return
    path, reason = found
    field = f"steps.{name}.{where}.input{path}"
    schema = handlers[runtime.handler]
    raise InvalidSpec(
        f"the input does not match handler {runtime.handler!r} (input type {schema.info.input_type}): {reason}"
        f" - at `$.{field}`",
        field=field,
    )


def _schema_has(root: dict[str, Any], node: Any, path: list[str | int]) -> bool:
    """Whether ``path`` can name a value in what JSON Schema ``node`` describes.

    Lenient where the schema does not say (no properties, a $ref outside the document):
    only a path the schema rules out is refused.
    """
    node = _resolved(root, node)
    if not path or not isinstance(node, dict):
        return True
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(node.get(key), list):
            return any(_schema_has(root, branch, path) for branch in node[key])
    part, rest = path[0], path[1:]
    types = node.get("type")
    kinds = set(types) if isinstance(types, list) else {types} if isinstance(types, str) else set()
    if isinstance(part, int) and ("array" in kinds or "items" in node or "prefixItems" in node):
        prefix = node.get("prefixItems")
        if isinstance(prefix, list) and part < len(prefix):
            return _schema_has(root, prefix[part], rest)
        items = node.get("items")
        if isinstance(items, dict):
            return _schema_has(root, items, rest)
        return not isinstance(prefix, list) or items is not False
    props = node.get("properties")
    extra = node.get("additionalProperties")
    if isinstance(props, dict) and str(part) in props:
        return _schema_has(root, props[str(part)], rest)
    if isinstance(extra, dict):
        return _schema_has(root, extra, rest)
    if isinstance(props, dict) and extra in (None, False):
        return False  # a struct's fields are all there is
    return not kinds or bool(kinds & {"object", "array"})


def _resolved(root: dict[str, Any], node: Any) -> Any:
    for _ in range(32):  # a $ref chain longer than this is a loop
        if not isinstance(node, dict) or not isinstance(node.get("$ref"), str):
            return node
        target: Any = root
        ref = node["$ref"]
        if not ref.startswith("#/"):
            return {}
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        node = target if isinstance(target, dict) else {}
    return {}


# --- expanding ---------------------------------------------------------------------
def expand(
    spec: WorkflowSpec,
    input: Any,
    run_id: str,
    generation: int,
    partitions: int,
    jobs_kept: Mapping[str, str],
    now: float,
    *,
    after_jobs: Sequence[tuple[str, int]] = (),
    origin: JobOrigin | None = None,
) -> list[JobSubmitted]:
    """The jobs of a run (a checked workflow): one per step not kept, needs before dependents.

    Args:
        spec: the workflow, already :func:`check`-ed.
        input: the run's input (:func:`run_input`).
        run_id: the run (``ids.workflow_run_id``).
        generation: 0 for the first run, then one more per retry (new job ids).
        partitions: how many scheduler partitions queues hash onto.
        jobs_kept: steps that keep their job (a retry's succeeded steps), by name: not
            submitted again, and a dependency on one is dropped (it is met already).
        now: the submission time.
        after_jobs: jobs of the earlier run with the same concurrency key, with their
            partitions; every root step waits for each of them to end.
        origin: the trigger rule and event that started the run, if one did.

    Returns:
        One ``JobSubmitted`` per step not in ``jobs_kept``, in :func:`order`.
    """
    jobs = step_jobs(spec, run_id, generation, jobs_kept)
    read = read_steps(spec)
    out = []
    for name in order(spec):
        if name in jobs_kept:
            continue
        step = spec.steps[name]
        job = _filled(name, _raw(step), input, run_id)
        after = [
            Dependency(
                job_id=jobs[need],
                when=_when(step, spec.steps[need]),
                step=need,
                partition=subjects.partition_of(spec.steps[need].queue, partitions),
            )
            for need in dict.fromkeys(step.needs)
            if need not in jobs_kept
        ]
        if not step.needs:
            after.extend(
                Dependency(job_id=job_id, when="ended", partition=partition)
                for job_id, partition in dict.fromkeys(after_jobs)
            )
        upstream = {}
        source: tuple[str, list[str | int]] | None = None
        for where, ref in refs_in(msgspec.to_builtins(job)):
            if ref.kind != "steps":
                continue
            upstream[ref.step] = UpstreamRef(job_id=jobs[ref.step], mapped=spec.steps[ref.step].map is not None)
            if where == "map.over":
                source = (jobs[ref.step], list(ref.path))
        mapping = job.map
        if mapping is not None and source is not None:
            mapping = msgspec.structs.replace(mapping, source=source[0], path=source[1])
        key = step_key(run_id, name, generation)
        job = msgspec.structs.replace(
            job,
            name=job.name or name,
            priority=spec.priority if spec.priority is not None else job.priority,
            tenant=spec.tenant or job.tenant,
            metadata={**job.metadata, LABEL_WORKFLOW: run_id, LABEL_STEP: name},
            after=after,
            # Kept (stored by reference) only where a later step reads it: storing costs
            # an object-store write per job, which a step nobody reads need not pay.
            keep_result=name in read,
            step=StepRef(workflow_id=run_id, step=name, upstream=upstream),
            map=mapping,
        )
        partition = subjects.partition_of(job.queue, partitions)
        out.append(
            JobSubmitted(
                job_id=jobs[name],
                partition=partition,
                spec=job,
                idempotency_key=key,
                submitted_at=now,
                origin=origin,
            )
        )
    return out


def read_steps(spec: WorkflowSpec) -> set[str]:
    """The steps whose results another step reads (its templates or its ``map.over``)."""
    read: set[str] = set()
    for step in spec.steps.values():
        read.update(ref.step for _where, ref in refs_in(msgspec.to_builtins(step)) if ref.kind == "steps")
    return read


def _when(step: WorkflowStep, need: WorkflowStep) -> DependencyCondition:
    # A need that may fail without failing the run lets its dependents run as if it had
    # succeeded: any end will do.
    if need.on_error == "continue" and step.when == "succeeded":
        return "ended"
    return step.when


def _raw(step: WorkflowStep) -> dict[str, Any]:
    raw: dict[str, Any] = msgspec.to_builtins(step)
    for key in _STEP_FIELDS:
        raw.pop(key, None)
    return raw


def _filled(name: str, raw: dict[str, Any], input: Any, run_id: str) -> JobSpec:
    """The step's job with ``${input...}`` and ``${workflow.id}`` filled in (checked present)."""

    def lookup(ref: Ref) -> Any:
        return run_id if ref.kind == "workflow" else walk(input, ref.path)

    filled = _text_places(fill(raw, lookup, SUBMIT_KINDS))
    try:
        return msgspec.convert(filled, JobSpec)
    except msgspec.ValidationError as exc:
        message = str(exc)
        inner = message.rsplit("`$", 1)[1].rstrip("`").lstrip(".") if "`$" in message else ""
        field = f"steps.{name}.{inner}" if inner else f"steps.{name}"
        text = message.rsplit(" - at `", 1)[0]
        raise InvalidSpec(f"with the run's input filled in: {text} - at `$.{field}`", field=field) from None


def _text_places(raw: dict[str, Any]) -> dict[str, Any]:
    """A value filled into a place that holds text (argv, env, stdin) as its text: a number
    or a list from the input becomes its JSON, as the executor does for upstream results."""
    runtime = raw.get("runtime")
    if isinstance(runtime, dict):
        if isinstance(runtime.get("argv"), list):
            runtime["argv"] = [as_text(a) for a in runtime["argv"]]
        if isinstance(runtime.get("env"), dict):
            runtime["env"] = {k: as_text(v) for k, v in runtime["env"].items()}
    if "stdin" in raw:
        raw["stdin"] = as_text(raw["stdin"])
    return raw


# --- retrying ----------------------------------------------------------------------
def condition(when: str, state: str, final: bool) -> str:
    """Whether a dependency on a job in ``state`` is ``met``, can ``never`` be, or is ``pending``.

    Args:
        when: the dependency's condition (succeeded, failed, ended).
        state: the job's state (a ``JobState``).
        final: whether the job has ended for good.
    """
    if not final:
        return "pending"
    if when == "ended":
        return "met"
    if when == "succeeded":
        return "met" if state == "succeeded" else "never"
    return "met" if state in _FAILED_STATES else "never"


@dataclass(frozen=True, slots=True)
class RetryPlan:
    """What a retry does.

    Attributes:
        steps: the steps that run again (new jobs), in :func:`order`.
        jobs_kept: every other step with its current job: succeeded steps, and steps that
            could not run however their needs ended this time (an on-failure step whose
            need succeeded).
    """

    steps: list[str]
    jobs_kept: dict[str, str]


def plan_retry(spec: WorkflowSpec, jobs: Mapping[str, str], current: Mapping[str, JobSummary | None]) -> RetryPlan:
    """Which steps a retry runs again: each whose current job did not succeed, if the way
    its needs ended (or will, run again) lets it run.

    Args:
        spec: the workflow.
        jobs: each step's current job (``WorkflowRun.jobs``).
        current: the tracker's row of each step's current job (None: not recorded).

    Returns:
        The plan; no steps when every step succeeded.

    Raises:
        Conflict: a step's current job has not ended, or is not recorded yet.
    """
    for name in spec.steps:
        row = current.get(name)
        if row is None:
            raise Conflict(f"step {name!r}: its job {jobs.get(name, '?')} is not recorded yet; try again in a moment")
        if not row.final:
            raise Conflict(f"step {name!r} has not ended ({row.state}); retry a run once all its steps have ended")
    rerun: list[str] = []
    for name in order(spec):
        row = current[name]
        assert row is not None  # checked above
        if row.state == "succeeded":
            continue
        step = spec.steps[name]
        blocked = False
        for need in step.needs:
            if need in rerun:
                continue
            need_row = current[need]
            assert need_row is not None
            if condition(_when(step, spec.steps[need]), need_row.state, True) != "met":
                blocked = True
        if not blocked:
            rerun.append(name)
    kept = {name: jobs[name] for name in spec.steps if name not in rerun}
    return RetryPlan(steps=rerun, jobs_kept=kept)


# --- helpers -----------------------------------------------------------------------
def _known(spec: WorkflowSpec) -> str:
    shown = sorted(spec.steps)
    text = ", ".join(shown[:10])
    return f"the steps are {text}{', ...' if len(shown) > 10 else ''}"


def _fail(step: str, field: str, message: str) -> NoReturn:
    path = f"steps.{step}.{field}"
    raise InvalidSpec(f"{message} - at `$.{path}`", field=path)
