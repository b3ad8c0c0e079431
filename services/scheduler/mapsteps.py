"""Mapped steps and dependency messages: what the scheduler publishes for them. Pure.

A mapped step (``JobSpec.map``) is one job in the backlog that never runs itself. Once its
dependencies are met the scheduler reads the list it maps over (by reference, from
``jm_results``), submits one job per item (ids derived from the step's job id and the item's
index, so a take-over that expands it again submits the same jobs) and waits for them all.
The step then ends as its items did: it succeeds when every item succeeded (its result is
the manifest of its items' jobs, which later steps read their results through), else it
gives up.
"""

from __future__ import annotations

import msgspec

from jobmesh.contract import subjects
from jobmesh.contract.ids import dep_ended_id, job_id_for, map_item_key, submit_id, watch_id
from jobmesh.contract.messages.v1 import (
    AttemptError,
    DependencyEnded,
    DependencyWatch,
    ItemRef,
    JobError,
    JobSubmitted,
)
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.tracing import Context
from jobmesh.scheduler import lifecycle

MAX_ITEMS = 10_000  # items one mapped step may run


class MapError(Exception):
    """Raised when a mapped step's list cannot be read, is not a list, or is too long."""


def items_of(result: object, path: list[str | int]) -> list:
    """The list at ``path`` inside an upstream ``result`` (the decoded JSON).

    Raises:
        MapError: the path is not there, does not hold a list, or the list is too long.
    """
    value = result
    for part in path:
        if isinstance(value, dict) and str(part) in value:
            value = value[str(part)]
        elif isinstance(value, list) and isinstance(part, int) and part < len(value):
            value = value[part]
        else:
            where = ".".join(str(p) for p in path)
            raise MapError(f"the upstream result has no field result.{where}")
    if not isinstance(value, list):
        raise MapError(f"maps over a {type(value).__name__}, not a list")
    if len(value) > MAX_ITEMS:
        raise MapError(f"maps over {len(value)} items; a mapped step runs at most {MAX_ITEMS}")
    return value


def item_ids(step_job_id: str, count: int) -> list[str]:
    """The job ids of a mapped step's ``count`` items, in item order."""
    return [job_id_for(map_item_key(step_job_id, index)) for index in range(count)]


def item_jobs(step: JobSubmitted, count: int, partition: int, now: float) -> list[JobSubmitted]:
    """The JobSubmitted of each of ``count`` items of mapped step ``step``, in item order.

    Each item is the step's spec without ``map`` and ``after``, knowing its item by
    reference (``StepRef.item``), and keeping its result when the step's is read. The step's concurrency cap becomes a concurrency key of
    its own, scoped to the step's queue like any key.
    """
    spec = step.spec
    mapping = spec.map
    ref = spec.step
    if mapping is None or ref is None:
        return []
    base = msgspec.structs.replace(
        spec,
        map=None,
        after=[],
        keep_result=spec.keep_result,  # the items' results are read when the step's are
        concurrency_key=f"map:{step.job_id}" if mapping.concurrency else spec.concurrency_key,
        concurrency_limit=mapping.concurrency or spec.concurrency_limit,
    )
    jobs = []
    for index in range(count):
        key = map_item_key(step.job_id, index)
        item = ItemRef(job_id=mapping.source, path=list(mapping.path), index=index)
        item_spec = msgspec.structs.replace(
            base,
            name=f"{spec.name or ref.step}[{index}]"[:256],
            step=msgspec.structs.replace(ref, index=index, item=item),
        )
        jobs.append(
            JobSubmitted(
                job_id=job_id_for(key),
                partition=partition,
                spec=item_spec,
                idempotency_key=key,
                submitted_at=now,
                origin=step.origin,
            )
        )
    return jobs


def manifest(item_ids: list[str], source: str) -> bytes:
    """What ``map/<step job>`` holds: the items' jobs in item order, and the list's source."""
    return msgspec.json.encode({"jobs": item_ids, "source": source, "items": len(item_ids)})


def submitted(job: JobSubmitted, context: Context | None) -> Outgoing:
    return Outgoing(subjects.job_event(job.partition, subjects.SUBMITTED), job, submit_id(job.idempotency_key), context)


def step_ended(
    step: JobSubmitted, attempt: int, partition: int, items: int, failed: int, now: float, context: Context | None
) -> Outgoing:
    """JobSucceeded of a mapped step whose items all succeeded, else its JobGaveUp."""
    spec = step.spec
    if failed == 0:
        result = msgspec.json.encode({"items": items}).decode()
        outgoing, _ = lifecycle.succeeded(
            step.job_id,
            attempt,
            partition,
            spec,
            node_id="",
            output_tail="",
            submitted_at=step.submitted_at,
            started_at=now,
            at=now,
            result=result,
            result_ref=subjects.map_manifest_key(step.job_id),
            result_bytes=len(result),
            context=context,
        )
        return outgoing
    return step_failed(
        step, attempt, partition, f"{failed} of {items} items did not succeed", "items_failed", now, context
    )


def step_failed(
    step: JobSubmitted, attempt: int, partition: int, message: str, code: str, now: float, context: Context | None
) -> Outgoing:
    """JobGaveUp of a mapped step that could not be expanded or whose items failed."""
    ended = AttemptError(attempt=attempt, node_id="", error=JobError(code=code, message=message), at=now)
    [gave_up] = lifecycle.gave_up(
        step.job_id, partition, ended, "failed", message, [], None, now, context, spec=step.spec
    )
    return gave_up


def watch(job_id: str, job_partition: int, watcher: int, now: float) -> Outgoing:
    """DependencyWatch: partition ``watcher`` waits for ``job_id`` of ``job_partition``."""
    message = DependencyWatch(job_id=job_id, partition=job_partition, watcher=watcher, at=now)
    return Outgoing(subjects.job_event(job_partition, subjects.DEP_WATCH), message, watch_id(job_id, watcher), None)


def dependency_ended(job_id: str, outcome: str, watcher: int, now: float) -> Outgoing:
    """DependencyEnded: tell partition ``watcher`` how ``job_id`` ended."""
    message = DependencyEnded(job_id=job_id, partition=watcher, outcome=outcome, at=now)  # type: ignore[arg-type]
    return Outgoing(subjects.job_event(watcher, subjects.DEP_ENDED), message, dep_ended_id(job_id, watcher), None)
