"""What the HTTP API answers beyond the cluster's own replies: request bodies, and the
views the dashboard draws (queues merged across schedulers, a job's whole timeline, a
workflow with its graph). Building them is pure; ``routes`` fetches what they are made of.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from jobmesh.client.jobstate import Progress, progress_in
from jobmesh.client.logs import LogPage
from jobmesh.client.timeline import Step, job_notes, timeline
from jobmesh.client.workflows import WorkflowStatus
from jobmesh.contract.messages.v1 import JobView, NodesReply, QueuesReply, Submission, WorkflowSpec
from jobmesh.web.graph import Layout, layered

RESULT_PREVIEW_BYTES = 64 * 1024  # the most of a result a timeline carries


class SubmitBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/v1/jobs``: the jobs to submit, as ``jobmesh.v1.api.submit`` takes them."""

    jobs: Annotated[list[Submission], Meta(min_length=1, max_length=1000)]


class WorkflowBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /api/v1/workflows``: a run of a workflow.

    Attributes:
        spec: the workflow.
        input: the run's input (``${input...}``); null for the workflow's own.
        idempotency_key: the same key names the same run; a fresh one when empty.
    """

    spec: WorkflowSpec
    input: Any = None
    idempotency_key: Annotated[str, Meta(max_length=256)] = ""


class CancelBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST .../cancel``: why (recorded with the cancel)."""

    reason: Annotated[str, Meta(max_length=1000)] = ""


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /healthz``: whether this server reaches NATS."""

    ok: bool
    nats: str
    auth: bool


class Session(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /api/v1/session``: the token was right; the cookie is set.

    Attributes:
        auth: whether the server needs a token at all.
    """

    auth: bool


class QueueRow(msgspec.Struct, frozen=True, kw_only=True):
    """One queue's depth, as the scheduler owning its partition counts it.

    Attributes:
        queue: the queue.
        partition: its scheduler partition.
        owner: the scheduler instance that answered for it.
        pending: jobs not yet placed.
        in_flight: jobs released and not ended.
        tenants: tenant -> pending jobs of that tenant.
        waiting: where the held ones wait (ready, timer, group, key, parked, room) -> count.
        reasons: why they wait, in words -> count.
        rate: its release rate limit per second (0: none).
        max_in_flight: its in-flight limit (0: none).
    """

    queue: str
    partition: int
    owner: str
    pending: int
    in_flight: int
    tenants: dict[str, int]
    waiting: dict[str, int]
    reasons: dict[str, int] = {}
    rate: float = 0.0
    max_in_flight: int = 0


class QueuesView(msgspec.Struct, frozen=True, kw_only=True):
    """Every queue of the cluster.

    Attributes:
        partitions: the cluster's partition count.
        answered: the partitions some scheduler answered for (fewer than ``partitions``
            while a partition has no owner: its queues are missing).
        queues: by queue name.
    """

    partitions: int
    answered: list[int]
    queues: list[QueueRow]


class Timeline(msgspec.Struct, frozen=True, kw_only=True):
    """Everything about one job for its page.

    Attributes:
        job: the tracker's view (every transition in ``events``, every attempt).
        attempts: each attempt with what followed it (``jobmesh status``'s timeline).
        notes: what happened before any attempt was released (a cancel of a held job).
        progress: what the running attempt last reported; null when none runs.
        logs: its newest output lines.
        result: the successful attempt's result as text (the first
            :data:`RESULT_PREVIEW_BYTES`), "" when none.
        result_bytes: the whole result's size.
    """

    job: JobView
    attempts: list[Step]
    notes: list[str]
    progress: Progress | None
    logs: LogPage
    result: str = ""
    result_bytes: int = 0


class WorkflowView(msgspec.Struct, frozen=True, kw_only=True):
    """A workflow run's page: its steps' states and how to draw them."""

    status: WorkflowStatus
    layout: Layout


def queues_view(replies: Iterable[QueuesReply]) -> QueuesView:
    """Merge the schedulers' answers: one row per queue, from the newest owner of its partition.

    Args:
        replies: every scheduler's reply (during a takeover two may answer for one partition).

    Returns:
        The queues by name.
    """
    partitions = 0
    newest: dict[int, tuple[float, str, Any]] = {}
    for reply in replies:
        partitions = max(partitions, reply.partitions)
        for part in reply.owned:
            if part.partition not in newest or part.at > newest[part.partition][0]:
                newest[part.partition] = (part.at, part.owner, part)
    rows = [
        QueueRow(
            queue=q.queue,
            partition=p,
            owner=owner,
            pending=q.pending,
            in_flight=q.in_flight,
            tenants=dict(q.tenants),
            waiting=dict(q.waiting),
            reasons=dict(q.reasons),
            rate=q.rate,
            max_in_flight=q.max_in_flight,
        )
        for p, (_, owner, part) in newest.items()
        for q in part.queues
    ]
    return QueuesView(partitions=partitions, answered=sorted(newest), queues=sorted(rows, key=lambda r: r.queue))


def job_timeline(view: JobView, nodes: NodesReply | None, logs: LogPage, result: bytes | None) -> Timeline:
    """A job's page from its view, the nodes' leases, its output and its result.

    Args:
        view: the tracker's view.
        nodes: the binder's nodes (for the running attempt's progress); None when not asked.
        logs: the job's output lines.
        result: the successful attempt's result bytes; None when it has none.

    Returns:
        The timeline.
    """
    progress = None
    if nodes is not None and not view.final:
        for node in nodes.nodes:
            progress = progress or progress_in(node.node, view.job_id, view.attempt)
    text = ""
    if result is not None:
        text = result[:RESULT_PREVIEW_BYTES].decode(errors="replace")
    return Timeline(
        job=view,
        attempts=timeline(view),
        notes=job_notes(view),
        progress=progress,
        logs=logs,
        result=text,
        result_bytes=len(result) if result is not None else 0,
    )


def workflow_view(status: WorkflowStatus) -> WorkflowView:
    """A run's status with the layout of its graph (columns by dependency depth)."""
    needs: dict[str, Sequence[str]] = {s.name: s.needs for s in status.steps}
    return WorkflowView(status=status, layout=layered(needs))
