"""Workflows on the client side: the SDK builder, workflow files, and what a run's state is.

Three things, all pure (no NATS, no clock of their own), so they are tested without a
cluster:

- :class:`Workflow`: declare a workflow in Python (``wf.step("b", runtime, needs=[a])``)
  and get the ``WorkflowSpec`` that ``Client.run_workflow`` sends;
- :func:`read_workflow_file` / :func:`workflow_from_data`: a YAML or JSON file read into a
  ``WorkflowSpec`` and checked as strictly as a rule file (an unknown or mistyped field
  names its path, ``steps.b.needs[0]``), plus the graph checks that need no cluster
  (a need that names no step, a cycle). The trigger checks the whole workflow again at
  submit, templates and every step's job included;
- :func:`run_status`: each declared step's state (waiting, queued, running, succeeded,
  failed, cancelled, skipped, with a reason or its mapped items' counts) and the run's
  outcome, from the run's record (``WorkflowRun``) and its jobs as the tracker lists them.
  A run's state is never stored whole: the trigger keeps only what cannot be derived.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from jobmesh.client.triggers import load_document, strict_from_data
from jobmesh.contract.ids import child_step, job_id_for, map_item_key
from jobmesh.contract.messages.v1 import (
    Constraints,
    InputFile,
    JobRuntime,
    JobSummary,
    Locality,
    MapSpec,
    Resources,
    RetryPolicy,
    StepName,
    Timeouts,
    WorkflowRun,
    WorkflowSpec,
    WorkflowStep,
)
from jobmesh.errors import InvalidMessage, InvalidSpec

__all__ = [
    "OUTCOMES",
    "STEP_STATES",
    "ItemCounts",
    "Outcome",
    "StepHandle",
    "StepState",
    "StepStatus",
    "StepTimes",
    "Workflow",
    "WorkflowStatus",
    "graph_problem",
    "read_workflow_file",
    "run_status",
    "with_times",
    "workflow_from_data",
]

StepState = Literal["waiting", "queued", "running", "succeeded", "failed", "cancelled", "skipped"]
STEP_STATES: tuple[str, ...] = typing.get_args(StepState)
Outcome = Literal["running", "succeeded", "failed", "cancelled"]
OUTCOMES: tuple[str, ...] = typing.get_args(Outcome)
# States a step (or an item) has ended in.
ENDED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "skipped"})
# Tracker states of a job that has not been bound to a node yet.
_PRE_RUNNING = frozenset({"queued", "waiting", "ready"})
_STEP_NAME = re.compile(typing.get_args(StepName)[1].pattern)
_STEP_NAME_MAX: int = typing.get_args(StepName)[1].max_length
_RUNTIME_KINDS = tuple(str(kind.__struct_config__.tag) for kind in typing.get_args(JobRuntime))
# An item's submission is stamped by the scheduler, its map job's by the trigger: on
# another machine, whose clock may be a little behind.
_CLOCK_SKEW = 5.0


# --- the SDK builder -----------------------------------------------------------------------
@dataclass(frozen=True)
class StepHandle:
    """A step declared with :meth:`Workflow.step`: what later steps name in ``needs``.

    Attributes:
        name: the step's name.
    """

    name: str

    def result(self, *path: str | int) -> str:
        """The template of this step's result, or of a value inside it.

        Args:
            path: keys and list indexes below the result (``"files", 0``).

        Returns:
            ``${steps.<name>.result}`` or ``${steps.<name>.result.files.0}``, for a later
            step's strings or its ``map_over``.
        """
        return "${" + ".".join(["steps", self.name, "result", *(str(p) for p in path)]) + "}"

    def __str__(self) -> str:
        return self.name


class Workflow:
    """A workflow declared in Python; :meth:`spec` gives what ``Client.run_workflow`` sends.

    Example::

        wf = Workflow("etl")
        extract = wf.step("extract", ProcessRuntime(argv=["extract.sh"]))
        each = wf.step("each", ProcessRuntime(argv=["load", "${item}"]), needs=[extract],
                       map_over=extract.result("files"), concurrency=4)
        wf.step("report", HandlerRuntime(handler="report"), needs=[each], when="ended")
        await client.run_workflow(wf.spec())

    Args:
        name: what runs are listed under.
        description: free text.
        input: the input a run gets when none is given.
        concurrency_key: at most one run with this key at a time (may use ``${input...}``).
        priority: every step's priority, when set.
        tenant: every step's tenant, when set.
    """

    def __init__(
        self,
        name: str,
        *,
        description: str = "",
        input: Any = None,
        concurrency_key: str = "",
        priority: int | None = None,
        tenant: str = "",
    ) -> None:
        self.name = name
        self.description = description
        self.input = input
        self.concurrency_key = concurrency_key
        self.priority = priority
        self.tenant = tenant
        self._steps: dict[str, WorkflowStep] = {}

    def step(
        self,
        name: str,
        runtime: JobRuntime,
        *,
        needs: Iterable[StepHandle | str] = (),
        when: Literal["succeeded", "failed", "ended"] = "succeeded",
        on_error: Literal["fail", "continue"] = "fail",
        map_over: str = "",
        concurrency: int = 0,
        job_name: str = "",
        queue: str | None = None,
        tenant: str | None = None,
        priority: int | None = None,
        resources: Resources | None = None,
        constraints: Constraints | None = None,
        locality: Locality | None = None,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        concurrency_key: str | None = None,
        concurrency_limit: int | None = None,
        group: str | None = None,
        metadata: Mapping[str, str] | None = None,
        network: bool | None = None,
        secrets: Sequence[str] | None = None,
        secrets_as: Literal["file", "env"] | None = None,
        stdin: str | None = None,
        files: Sequence[InputFile] | None = None,
        **more: Any,
    ) -> StepHandle:
        """Declare a step: a job spec plus what it needs.

        Args:
            name: the step's name (letters, digits, ``_`` and ``-``).
            runtime: what runs (``ProcessRuntime``, ``HandlerRuntime``, ...).
            needs: the steps that must end first (handles or names).
            when: which end of every needed step lets this one run: ``succeeded``,
                ``failed`` (an on-failure step) or ``ended`` (whatever they did).
            on_error: ``fail`` (the run fails and the steps that need this one are
                skipped) or ``continue``.
            map_over: run once per item of this list (a template such as
                ``extract.result("files")``); ``${item}`` is the item.
            concurrency: at most this many items at once (``map_over`` only; 0: no cap).
            job_name: the job's name (``JobSpec.name``; "" names it after the step).
            queue: and the keywords below: the ``JobSpec`` fields of the step's job;
                one left out keeps the spec's default.
            tenant: see ``JobSpec``.
            priority: see ``JobSpec``.
            resources: see ``JobSpec``.
            constraints: see ``JobSpec``.
            locality: see ``JobSpec``.
            timeouts: see ``JobSpec``.
            retry: see ``JobSpec``.
            concurrency_key: see ``JobSpec``.
            concurrency_limit: see ``JobSpec``.
            group: see ``JobSpec``.
            metadata: see ``JobSpec``.
            network: see ``JobSpec``.
            secrets: see ``JobSpec``.
            secrets_as: see ``JobSpec``.
            stdin: see ``JobSpec``.
            files: see ``JobSpec``.
            **more: any other ``JobSpec`` field, by its name.

        Returns:
            The step's handle, for later steps' ``needs`` and templates.

        Raises:
            InvalidSpec: a step of that name was declared already, or ``concurrency``
                without ``map_over`` (``field`` names it).
        """
        if name in self._steps:
            raise InvalidSpec(f"step {name!r} is declared twice", field=f"steps.{name}")
        if concurrency and not map_over:
            raise InvalidSpec("concurrency limits a mapped step's items: give map_over too", field=f"steps.{name}.map")
        given: dict[str, Any] = {
            "queue": queue,
            "tenant": tenant,
            "priority": priority,
            "resources": resources,
            "constraints": constraints,
            "locality": locality,
            "timeouts": timeouts,
            "retry": retry,
            "concurrency_key": concurrency_key,
            "concurrency_limit": concurrency_limit,
            "group": group,
            "metadata": dict(metadata) if metadata is not None else None,
            "network": network,
            "secrets": list(secrets) if secrets is not None else None,
            "secrets_as": secrets_as,
            "stdin": stdin,
            "files": list(files) if files is not None else None,
        }
        fields = {k: v for k, v in given.items() if v is not None}
        fields.update(more)
        if job_name:
            fields["name"] = job_name
        if map_over:
            fields["map"] = MapSpec(over=map_over, concurrency=concurrency)
        self._steps[name] = WorkflowStep(
            runtime=runtime,
            needs=[str(n) for n in needs],
            when=when,
            on_error=on_error,
            **fields,
        )
        return StepHandle(name)

    def spec(self) -> WorkflowSpec:
        """The workflow as the trigger receives it, checked as a workflow file is.

        Returns:
            The ``WorkflowSpec``.

        Raises:
            InvalidMessage: a value the wire type refuses (a name's pattern, a range), a
                need that names no step, or a cycle; ``field`` names where.
        """
        spec = WorkflowSpec(
            name=self.name,
            steps=dict(self._steps),
            description=self.description,
            input=self.input,
            concurrency_key=self.concurrency_key,
            priority=self.priority,
            tenant=self.tenant,
        )
        # A struct built in Python is not checked against its constraints: check it as the wire would.
        return workflow_from_data(msgspec.to_builtins(spec), source=f"workflow {self.name}")


# --- workflow files ------------------------------------------------------------------------
def workflow_from_data(data: Any, source: str = "workflow") -> WorkflowSpec:
    """A workflow's data (a file's mapping) as a ``WorkflowSpec``, checked as strictly as the wire.

    Unknown fields are refused (a misspelt ``neds`` would otherwise be dropped and the step
    would start at once), and so are needs that name no step and cycles.

    Args:
        data: the decoded file.
        source: where it came from (the file's name), at the start of every error.

    Returns:
        The workflow.

    Raises:
        InvalidMessage: ``data`` is not a mapping, or a field is missing, unknown or of the
            wrong type or value; ``field`` names it (``steps.b.runtime.argv``).
        InvalidSpec: a need that names no step, or a cycle (``steps.b.needs[0]``).
    """
    if not isinstance(data, Mapping):
        raise InvalidMessage(f"{source}: a workflow must be a mapping of fields (name, steps...), not {_kind(data)}")
    steps = data.get("steps")
    if isinstance(steps, Mapping):
        # msgspec says "steps[...]" for a field inside a step: check each step on its own, so
        # that an error names the step (steps.load.runtime.argv).
        for name, step in steps.items():
            _check_step(name, step, source)
    spec = strict_from_data(data, WorkflowSpec, source)
    problem = graph_problem(spec)
    if problem is not None:
        message, field = problem
        raise InvalidSpec(f"{source}: {field}: {message}", field=field)
    return spec


def _check_step(name: Any, step: Any, source: str) -> None:
    where = f"steps.{name}"
    if not isinstance(name, str) or not _STEP_NAME.fullmatch(name) or len(name) > _STEP_NAME_MAX:
        raise InvalidMessage(
            f"{source}: {where}: a step's name is 1-{_STEP_NAME_MAX} letters, digits, '_' and '-',"
            " starting with a letter or digit",
            field=where,
        )
    if not isinstance(step, Mapping):
        raise InvalidMessage(
            f"{source}: {where}: a step must be a mapping of fields (runtime, needs...), not {_kind(step)}", field=where
        )
    try:
        strict_from_data(step, WorkflowStep, source)
    except InvalidMessage as exc:
        inner = exc.field or ""
        field = f"{where}.{inner}" if inner else where
        message = exc.message.removeprefix(f"{source}: ")
        if inner and inner in message:
            message = message.replace(inner, field, 1)
        else:
            message = f"{where}: {message}"
        if field.endswith("runtime.kind") and "Invalid value" in message:
            message += f" (one of {', '.join(_RUNTIME_KINDS)})"
        raise type(exc)(f"{source}: {message}", field=field) from exc


def read_workflow_file(path: str | Path) -> WorkflowSpec:
    """The workflow in a YAML or JSON file.

    Args:
        path: the file (``.json`` JSON, ``.yaml``/``.yml`` YAML, else by its content).

    Returns:
        The workflow, checked locally (fields, types, constraints, needs, cycles; not its
        templates or its steps' jobs, which the trigger checks).

    Raises:
        UsageError: the file cannot be read or parsed (``field`` is ``file``).
        InvalidMessage: it does not hold a valid workflow (the message names the file and field).
    """
    return workflow_from_data(load_document(path), str(path))


def graph_problem(spec: WorkflowSpec) -> tuple[str, str] | None:
    """What is wrong with a workflow's graph, if anything.

    Args:
        spec: the workflow.

    Returns:
        ``(message, field)`` for the first need that names no step or itself, or the first
        cycle (``field`` names the need that closes it); None when the steps form a DAG.
    """
    for name, step in spec.steps.items():
        for i, need in enumerate(step.needs):
            if need == name:
                return "a step cannot need itself", f"steps.{name}.needs[{i}]"
            if need not in spec.steps:
                known = ", ".join(sorted(spec.steps)[:10]) + (", ..." if len(spec.steps) > 10 else "")
                return f"{need!r} is not a step of this workflow (the steps are {known})", f"steps.{name}.needs[{i}]"
    # Depth-first search; colour 1 = on the current path, 2 = done.
    colour: dict[str, int] = {}
    for start in spec.steps:
        if colour.get(start):
            continue
        path: list[str] = [start]
        stack: list[Iterator[tuple[int, str]]] = [iter(enumerate(spec.steps[start].needs))]
        colour[start] = 1
        while stack:
            step_of_frame = path[-1]
            advanced = False
            for i, need in stack[-1]:
                if colour.get(need) == 1:
                    cycle = [*path[path.index(need) :], need]
                    return f"the needs form a cycle: {' -> '.join(cycle)}", f"steps.{step_of_frame}.needs[{i}]"
                if not colour.get(need):
                    colour[need] = 1
                    path.append(need)
                    stack.append(iter(enumerate(spec.steps[need].needs)))
                    advanced = True
                    break
            if not advanced:
                colour[path.pop()] = 2
                stack.pop()
    return None


def _kind(data: Any) -> str:
    if data is None:
        return "nothing"
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(data), type(data).__name__
    )


# --- a run's state -------------------------------------------------------------------------
class ItemCounts(msgspec.Struct, frozen=True, kw_only=True):
    """A mapped step's items, by state (only the items the scheduler has made so far).

    Attributes:
        total: items listed.
        waiting, queued, running, succeeded, failed, cancelled, skipped: items in each state.
    """

    total: int = 0
    waiting: int = 0
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    skipped: int = 0

    @property
    def done(self) -> int:
        """Items that have ended, however."""
        return self.succeeded + self.failed + self.cancelled + self.skipped

    def text(self) -> str:
        """``12/20 items done``, with ``3 running, 1 failed`` and the like after it."""
        parts = [f"{self.done}/{self.total} items done"]
        for state in ("running", "failed", "cancelled", "skipped"):
            n = getattr(self, state)
            if n:
                parts.append(f"{n} {state}")
        return ", ".join(parts)


class StepStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One declared step, as a person should see it.

    Attributes:
        name: the step.
        state: one of :data:`STEP_STATES`.
        reason: why (``waiting for: extract``, a failure's words), "" when nothing to say.
        job_id: the step's current job ("" before the trigger made one).
        needs: the steps it needs.
        when: which end of those lets it run.
        on_error: ``fail`` or ``continue``.
        mapped: whether it maps over a list (its job is the map job; ``items`` counts).
        items: its items by state (mapped steps only).
        attempt: its job's attempt.
        node_id: where its attempt runs or ran.
        exit_code: its attempt's exit code, when it has one.
        final: it has ended for good.
        started_at: when it started running (None when unknown or not yet).
        ended_at: when it ended (None when not yet or unknown).
    """

    name: str
    state: str
    reason: str = ""
    job_id: str = ""
    needs: list[str] = []
    when: str = "succeeded"
    on_error: str = "fail"
    mapped: bool = False
    items: ItemCounts | None = None
    attempt: int = 0
    node_id: str = ""
    exit_code: int | None = None
    final: bool = False
    started_at: float | None = None
    ended_at: float | None = None


class WorkflowStatus(msgspec.Struct, frozen=True, kw_only=True):
    """A run as a person should see it: its outcome and every declared step.

    Attributes:
        run_id: the run.
        name: the workflow's name.
        outcome: ``running`` while any step's job has not ended, then ``succeeded``,
            ``failed`` or ``cancelled`` (see :func:`run_status`).
        cancel_requested: somebody cancelled the run (its jobs may still be stopping).
        generation: how often the run was retried.
        steps: every declared step, in declaration order.
        cancel_reason: why it was cancelled.
        created_at: when the run was started.
        updated_at: when its record last changed.
    """

    run_id: str
    name: str
    outcome: str
    cancel_requested: bool
    generation: int
    steps: list[StepStatus]
    cancel_reason: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0

    def step(self, name: str) -> StepStatus:
        """The step called ``name``.

        Raises:
            KeyError: there is none.
        """
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def counts(self) -> dict[str, int]:
        """How many steps are in each state (states with none left out), in :data:`STEP_STATES` order."""
        out = {state: 0 for state in STEP_STATES}
        for s in self.steps:
            out[s.state] = out.get(s.state, 0) + 1
        return {state: n for state, n in out.items() if n}


@dataclass(frozen=True)
class StepTimes:
    """When a job's first attempt started and its last one finished (from its view).

    Attributes:
        started_at: the first attempt's start, None before it started.
        finished_at: the last attempt's end, None while it runs.
    """

    started_at: float | None
    finished_at: float | None


def _job_state(job: JobSummary) -> tuple[str, str]:
    """A job's step state and reason, needs aside."""
    if job.final:
        if job.state == "succeeded":
            return "succeeded", job.reason
        if job.state == "cancelled":
            return ("skipped" if job.skipped else "cancelled"), job.reason
        if job.state == "expired":
            return "failed", "expired" + (f": {job.reason}" if job.reason else "")
        return "failed", job.reason  # failed or lost, and no retry follows
    if job.state == "waiting":
        return "waiting", job.reason
    if job.state in _PRE_RUNNING:
        return "queued", job.reason
    if job.state == "retrying":
        return "running", "retrying" + (f": {job.reason}" if job.reason else "")
    if job.state in ("failed", "lost"):
        # The attempt ended; the scheduler has yet to say whether another follows.
        return "running", f"attempt {job.attempt} {job.state}" + (f": {job.reason}" if job.reason else "")
    return "running", job.reason


def _items_of(step: str, map_job: JobSummary | None, rows: Sequence[JobSummary]) -> list[JobSummary]:
    """The current map job's items among the rows of ``step`` (a retried run lists older ones too)."""
    if map_job is None:
        return []
    ours = [r for r in rows if r.job_id == job_id_for(map_item_key(map_job.job_id, r.index))]
    if ours or not rows:
        return ours
    # Items named otherwise than this version expects: those made after the map job was.
    return [r for r in rows if r.submitted_at >= map_job.submitted_at - _CLOCK_SKEW]


def _counts(items: Sequence[JobSummary]) -> ItemCounts:
    tally = dict.fromkeys(STEP_STATES, 0)
    for item in items:
        tally[_job_state(item)[0]] += 1
    return ItemCounts(total=len(items), **tally)


def run_status(record: WorkflowRun, jobs: Sequence[JobSummary]) -> WorkflowStatus:
    """Each declared step's state and the run's outcome, from its record and its jobs.

    A step's state is its current job's (``record.jobs``): ``waiting`` while a step it
    needs has not ended (the reason lists them) or the scheduler holds it for another
    reason, ``queued``, ``running`` (a failed attempt that will be retried included),
    then ``succeeded``, ``failed`` (expired included), ``cancelled`` or ``skipped`` (a
    needed step ended as it did not need). A mapped step runs while its items do and
    counts them by state.

    The outcome is ``running`` while any step's job (or a current item) has not ended;
    then ``cancelled`` when the run was cancelled and the cancel ended a step (one that
    came after every step had ended changes nothing); ``failed`` when a step with
    ``on_error: fail`` failed, expired or was cancelled without being skipped; else
    ``succeeded``. A skipped step never fails a run.

    Args:
        record: the run's record (``Client.get_workflow``).
        jobs: the run's jobs (``Client.workflow_jobs``), any order, older generations included.

    Returns:
        The run's status; times are the tracker's (a running step's start, an ended
        step's end), see :func:`with_times` for exact ones.
    """
    by_id = {j.job_id: j for j in jobs}
    item_rows: dict[str, list[JobSummary]] = {}
    for j in jobs:
        if j.step and j.index >= 0:
            item_rows.setdefault(j.step, []).append(j)
    current = {name: by_id.get(record.jobs.get(name, "")) for name in record.spec.steps}
    items = {
        name: sorted(_items_of(name, current[name], item_rows.get(name, [])), key=lambda r: r.index)
        for name, step in record.spec.steps.items()
        if step.map is not None
    }
    # Jobs a step's handler submitted: the steps that need it wait for them too.
    children = {
        name: [j for j in jobs if job is not None and j.step == child_step(name, job.job_id)]
        for name, job in current.items()
    }
    ended = {
        name: job is not None and job.final and all(c.final for c in children[name]) for name, job in current.items()
    }
    steps = []
    for name, step in record.spec.steps.items():
        job = current[name]
        pending = [n for n in step.needs if not ended.get(n, False)]
        counts = _counts(items[name]) if name in items else (_counts(children[name]) if children[name] else None)
        started_at: float | None = None
        ended_at: float | None = None
        if job is None:
            # Not recorded by the tracker yet: the trigger has submitted it.
            state, reason = ("waiting", _waiting_for(pending)) if pending else ("queued", "")
        else:
            state, reason = _job_state(job)
            if not job.final and job.state in _PRE_RUNNING and pending:
                state, reason = "waiting", _waiting_for(pending)
            if job.state in ("bound", "running") and not job.final:
                started_at = job.updated_at  # the tracker's last change: its start
            if job.final:
                ended_at = job.updated_at
        if counts is not None and items.get(name):
            started_at = min(i.submitted_at for i in items[name])
            if not (job is not None and job.final):
                state = "running"  # its map job is held while its items run
                reason = counts.text()
        kids = children[name]
        if kids and state == "succeeded":
            if not ended[name]:
                state, reason = "running", f"{sum(c.final for c in kids)}/{len(kids)} child jobs done"
            elif any(_job_state(c)[0] != "succeeded" for c in kids):
                bad = sum(_job_state(c)[0] != "succeeded" for c in kids)
                state, reason = "failed", f"{bad} of {len(kids)} child jobs did not succeed"
        steps.append(
            StepStatus(
                name=name,
                state=state,
                reason=reason,
                job_id=record.jobs.get(name, ""),
                needs=list(step.needs),
                when=step.when,
                on_error=step.on_error,
                mapped=step.map is not None,
                items=counts,
                attempt=job.attempt if job is not None else 0,
                node_id=job.node_id if job is not None and state in ("running", "succeeded", "failed") else "",
                exit_code=job.exit_code if job is not None else None,
                final=ended[name],
                started_at=started_at if state not in ("skipped", "waiting", "queued") else None,
                ended_at=ended_at if state != "skipped" else None,
            )
        )
    still = not all(ended.values()) or any(not i.final for rows in items.values() for i in rows)
    return WorkflowStatus(
        run_id=record.run_id,
        name=record.spec.name,
        outcome=_outcome(record, steps, still),
        cancel_requested=record.state == "cancelled",
        generation=record.generation,
        steps=steps,
        cancel_reason=record.cancel_reason,
        created_at=record.created_at,
        updated_at=record.updated_at,
    )


def _waiting_for(pending: Sequence[str]) -> str:
    return "waiting for: " + ", ".join(pending)


def _outcome(record: WorkflowRun, steps: Sequence[StepStatus], still_running: bool) -> Outcome:
    if still_running:
        return "running"
    # A cancel that came after every step had ended stopped nothing: the run keeps its outcome.
    if record.state == "cancelled" and any(s.state == "cancelled" for s in steps):
        return "cancelled"
    if any(s.on_error == "fail" and s.state in ("failed", "cancelled") for s in steps):
        return "failed"
    return "succeeded"


def with_times(status: WorkflowStatus, times: Mapping[str, StepTimes]) -> WorkflowStatus:
    """``status`` with each unmapped step's start and end taken from its job's attempts.

    Args:
        status: from :func:`run_status`.
        times: job id -> when its attempts started and finished (from its view); a job
            not in it keeps the tracker's times.

    Returns:
        The status with exact times where known.
    """
    steps = []
    for s in status.steps:
        known = times.get(s.job_id)
        if known is None or s.mapped or s.state in ("skipped", "waiting", "queued"):
            steps.append(s)
            continue
        steps.append(
            msgspec.structs.replace(
                s,
                started_at=known.started_at if known.started_at is not None else s.started_at,
                ended_at=(known.finished_at or s.ended_at) if s.final else None,
            )
        )
    return msgspec.structs.replace(status, steps=steps)
