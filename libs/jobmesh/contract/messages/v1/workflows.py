"""Workflows: a DAG of steps, each a job spec plus what it needs, and a run of one.

A ``WorkflowSpec`` is what a user declares (YAML or JSON, or built with the SDK). The
trigger checks it whole at submit, turns every step into a job (``JobSpec.step`` says which
run and step it is, ``JobSpec.after`` what it waits for) and keeps the run's record
(``WorkflowRun``) in KV ``jm_workflows``. The scheduler holds each step until its
dependencies allow it and expands a mapped step into one job per item. A run's state is
read from its jobs (the tracker's views), so the record holds only what cannot be derived.

Templates in a step's strings, resolved when the step's job starts:

- ``${input.a.b}``: the run's input (resolved at submit);
- ``${steps.<name>.result}`` and ``${steps.<name>.result.a.0}``: an upstream step's result
  (read by reference from jm_results); for a mapped step, the list of its items' results,
  in item order;
- ``${item}``, ``${item.a}``: a mapped job's item;
- ``${workflow.id}``: the run's id.

A string that is exactly one placeholder takes the value itself (a list stays a list);
otherwise each placeholder is replaced by its text (JSON for what is not a string).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from jobmesh.contract.messages.v1.jobs import DependencyCondition, JobSpec, Priority
from jobmesh.contract.messages.v1.triggers import JobOrigin

__all__ = [
    "MAX_STEPS",
    "RUN_STATES",
    "StepName",
    "WorkflowCancelReply",
    "WorkflowCancelRequest",
    "WorkflowGetRequest",
    "WorkflowListReply",
    "WorkflowListRequest",
    "WorkflowRetryReply",
    "WorkflowRetryRequest",
    "WorkflowRun",
    "WorkflowRunReply",
    "WorkflowRunRequest",
    "WorkflowSpec",
    "WorkflowStep",
    "WorkflowSummary",
]

RUN_STATES = ("running", "cancelled")  # WorkflowRun.state; whether a run ended is read from its jobs
MAX_STEPS = 500  # steps declared in one workflow (a mapped step counts once)
StepName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")]
WorkflowName = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]


class WorkflowStep(JobSpec, frozen=True, kw_only=True, omit_defaults=True):
    """One step: a job spec (every field of ``jobmesh submit --spec``) plus its place.

    Attributes:
        needs: the steps that must end before this one starts.
        when: which end of every needed step lets it run: ``succeeded`` (the default),
            ``failed`` (an on-failure step: it runs only if a needed step failed), or
            ``ended`` (it runs whatever they did).
        on_error: ``fail`` (the default: the run fails, and steps that need this one are
            skipped) or ``continue`` (the run does not fail for it, and the steps that
            need it run as if it had succeeded).
    """

    # msgspec copies a mutable default per instance; ruff cannot see that JobSpec is a Struct.
    needs: Annotated[
        list[StepName],
        Meta(max_length=MAX_STEPS),
        Meta(description="The steps that must end before this one starts; empty: it starts at once."),
    ] = []  # noqa: RUF012
    when: Annotated[
        DependencyCondition,
        Meta(description="Which end of every needed step lets it run: succeeded (the default), failed, or ended."),
    ] = "succeeded"
    on_error: Annotated[
        Literal["fail", "continue"],
        Meta(description="fail (the default: the run fails and the steps that need this one are skipped) or continue."),
    ] = "fail"


class WorkflowSpec(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A workflow as its author writes it.

    Attributes:
        name: what runs are listed under.
        steps: the steps by name (at most :data:`MAX_STEPS`).
        description: free text.
        input: the input a run gets when none is given.
        concurrency_key: at most one run with this key runs at a time (``${input...}``
            may build it: one run per dataset); a later run waits for the earlier one.
        priority: every step's priority, when set.
        tenant: every step's tenant, when set.
    """

    name: Annotated[WorkflowName, Meta(description="What runs are listed under (letters, digits, _ . -).")]
    steps: Annotated[
        dict[StepName, WorkflowStep],
        Meta(min_length=1, max_length=MAX_STEPS),
        Meta(description="The steps by name (1 to 500)."),
    ]
    description: Annotated[str, Meta(max_length=1024), Meta(description="Free text for people; empty when none.")] = ""
    input: Annotated[Any, Meta(description="The input a run gets when none is given; null: none.")] = None
    concurrency_key: Annotated[
        str,
        Meta(max_length=256),
        Meta(description="At most one run with this key runs at a time (${input...} may build it); empty: no limit."),
    ] = ""
    priority: Annotated[
        Priority | None, Meta(description="Every step's priority (0 to 9), when set; null: the steps' own.")
    ] = None
    # As a job's tenant (it becomes every step's), or "" for the steps' own.
    tenant: Annotated[
        str,
        Meta(max_length=128, pattern=r"^[A-Za-z0-9_.\-]*$"),
        Meta(description="Every step's tenant, when set; empty: the steps' own."),
    ] = ""


class WorkflowRun(Struct, frozen=True, kw_only=True, tag="workflow.run"):
    """What ``jm_workflows`` holds under a run's id (owned by the trigger).

    Attributes:
        run_id: the run.
        spec: the workflow as submitted.
        input: the run's input.
        jobs: each step's current job (a retry gives the steps it runs again new jobs).
        generation: how often the run was retried (0 for the first run).
        state: ``running`` until cancelled; whether it has ended is read from its jobs.
        concurrency_key: the resolved key, when the workflow has one.
        after_run: the earlier run with that key this one waited for.
        after_runs: the earlier runs with that key, latest first (bounded); it waits for
            every job of them that has not ended, so a cancelled or lost run between
            does not let it pass one that still runs.
        published: every job of its generation was published (PubAcked); a record not
            published is published again by the trigger, one published is not.
        origin: the trigger rule and event that started it, if one did.
    """

    run_id: Annotated[
        str, Meta(description="The workflow run's id: 32 hex characters derived from the run's idempotency key.")
    ]
    spec: Annotated[WorkflowSpec, Meta(description="The workflow as submitted.")]
    input: Annotated[Any, Meta(description="The run's input; null when none.")] = None
    jobs: Annotated[
        dict[str, str],
        Meta(description="Each step's current job id, by step name (a retry gives the steps it runs again new jobs)."),
    ] = {}
    generation: Annotated[int, Meta(description="How often the run was retried (0 for the first run).")] = 0
    state: Annotated[
        Literal["running", "cancelled"],
        Meta(description="running until cancelled; whether it has ended is read from its jobs."),
    ] = "running"
    concurrency_key: Annotated[
        str, Meta(description="The resolved concurrency key; empty when the workflow has none.")
    ] = ""
    after_run: Annotated[
        str, Meta(description="The earlier run with that key this one waited for; empty when none.")
    ] = ""
    after_runs: Annotated[
        list[str], Meta(description="The earlier runs with that key, latest first (bounded); empty when none.")
    ] = []
    origin: Annotated[
        JobOrigin | None, Meta(description="The trigger rule and event that started the job; null for a plain submit.")
    ] = None
    published: Annotated[bool, Meta(description="True once every job of its generation was published (PubAcked).")] = (
        False
    )
    created_at: Annotated[
        float, Meta(description="When the record was created. Unix time, in seconds; 0 when unknown.")
    ] = 0.0
    updated_at: Annotated[float, Meta(description="When the record last changed. Unix time, in seconds.")] = 0.0
    cancel_reason: Annotated[str, Meta(description="Why it was cancelled; empty when it was not.")] = ""


class WorkflowRunRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.workflows.run"
):
    """Start a run of ``spec`` (``jobmesh.v1.api.workflows.run``). The same
    ``idempotency_key`` always names the same run: a second request returns it."""

    spec: Annotated[WorkflowSpec, Meta(description="The workflow to run.")]
    input: Annotated[Any, Meta(description="The run's input; null: the workflow's own default input.")] = None
    idempotency_key: Annotated[
        str,
        Meta(max_length=256),
        Meta(
            description="The run id derives from it: the same key always names the same run. Empty: a random key, so sending it twice starts two runs."
        ),
    ] = ""


class WorkflowRunReply(Struct, frozen=True, kw_only=True, tag="api.workflows.started"):
    run: Annotated[WorkflowRun, Meta(description="The run's record.")]
    duplicate: Annotated[
        bool,
        Meta(
            description="True when the idempotency key named a run that already existed: that run is returned, nothing new started."
        ),
    ] = False


class WorkflowGetRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.workflows.get"
):
    run_id: Annotated[str, Meta(description="The run to read.")]


class WorkflowSummary(Struct, frozen=True, kw_only=True):
    """A run in a list: the record without its spec's steps."""

    run_id: Annotated[str, Meta(description="The run.")]
    name: Annotated[str, Meta(description="Its workflow's name.")]
    state: Annotated[
        str,
        Meta(
            description="running or cancelled (whether it has ended is read from its jobs).",
            extra_json_schema={"enum": list(RUN_STATES)},
        ),
    ]
    generation: Annotated[int, Meta(description="How often it was retried.")]
    steps: Annotated[int, Meta(description="How many steps it has.")]
    created_at: Annotated[
        float, Meta(description="When the record was created. Unix time, in seconds; 0 when unknown.")
    ]
    updated_at: Annotated[float, Meta(description="When the record last changed. Unix time, in seconds.")]


class WorkflowListRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.workflows.list"
):
    limit: Annotated[int, Meta(ge=1, le=1000), Meta(description="At most this many runs (1 to 1000, default 50).")] = 50
    name: Annotated[str, Meta(description="Only runs of this workflow; empty: every workflow.")] = ""


class WorkflowListReply(Struct, frozen=True, kw_only=True, tag="api.workflows"):
    runs: Annotated[list[WorkflowSummary], Meta(description="The runs, newest first.")]


class WorkflowCancelRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.workflows.cancel"
):
    run_id: Annotated[str, Meta(description="The run to cancel.")]
    reason: Annotated[str, Meta(max_length=512), Meta(description="Why (at most 512 characters); empty when none.")] = (
        ""
    )


class WorkflowCancelReply(Struct, frozen=True, kw_only=True, tag="api.workflows.cancelled"):
    run_id: Annotated[str, Meta(description="The run.")]
    cancelled: Annotated[int, Meta(description="Jobs the cancel reached while they were held or running.")]
    message: Annotated[str, Meta(description="A message for a person; empty when there is nothing to add.")] = ""


class WorkflowRetryRequest(
    Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag="api.workflows.retry"
):
    run_id: Annotated[str, Meta(description="The run to retry.")]


class WorkflowRetryReply(Struct, frozen=True, kw_only=True, tag="api.workflows.retried"):
    run: Annotated[WorkflowRun, Meta(description="The run's record after the retry.")]
    steps: Annotated[list[str], Meta(description="The steps that run again.")]
