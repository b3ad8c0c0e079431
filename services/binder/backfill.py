"""Backfill: a job that keeps finding no room gets a reservation of future capacity, and
shorter jobs run in the gap before it. Pure functions of a node's record and the clock.

Every reservation says when it has ended at the latest (``Reservation.ends_by``: when it
was made, plus the job's run timeout, plus ``STOP_SLACK`` for the stop and its report).
A large ready job (more than a quarter of a node's cpu, memory or GPUs) refused for want of
room on ``BACKFILL_AFTER_RELEASES - 1`` releases in a row is starving: the binder writes a
*future hold* for it (``Reservation.starts_at``) on the
candidate where it can start soonest, the earliest time by which enough of the node's
reservations have ended for it to fit. A node has at most one future hold.

The promise is kept by one rule, applied to every other job in the same compare-and-set
that reserves it: on a node with a future hold, a job may take room now only if it ends by
the hold's start (its ``ends_by`` is no later), or if it fits beside the held room (what is
free now, less the hold, still fits it). Whatever ran when the hold was made ends by its
start by construction, whatever came later either ends by then or leaves the room free,
so at ``starts_at`` the job fits (if every job keeps to its run timeout, which the
executor enforces). It starts earlier when the node drains earlier: its releases come
back as the scheduler retries it, and each one that finds it fitting binds it there.

A hold a job never came back for (a lost partition, a bug) must not block a node for ever:
past ``starts_at + EXPIRY`` it no longer constrains anything, and the next write to the
node's record that reserves drops it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from jobmesh.contract.messages.v1 import Allocation, NodeInfo, Reservation, Resources

BACKFILL_AFTER_RELEASES = 3  # a job refused for room on its first two releases is starving
# Only a large job gets a future hold: one that needs more than this share of a node's cpu,
# memory or GPUs. A small one finds room in the gaps as they come; were it to take the
# node's one hold, a big job behind it would find none.
LARGE_SHARE = 0.25
# Seconds past a run timeout until the attempt's end is reported and its room released:
# dispatch and set-up before the timeout's clock starts, the stop (the node's kill grace, 3 s
# by default, and the output's 2 s), the report. Generous, so that what is admitted beside a
# hold really is gone by its start.
STOP_SLACK = 15.0
EXPIRY = 300.0  # seconds past its start after which a future hold no longer constrains the node
BACKFILL_RETRY_MIN = 0.5  # the soonest a job with a future hold is released again
BACKFILL_EARLY = 1.0  # its release is due this long before the promise, so that it starts by it
RESERVED = "reserved: "  # how the refusal of a job with a future hold begins


def ends_by(at: float, run_timeout: float) -> float:
    """When an attempt reserved at ``at`` with run timeout ``run_timeout`` has ended at the latest."""
    return at + run_timeout + STOP_SLACK


def future_holds(alloc: Allocation | None, now: float) -> list[tuple[str, Reservation]]:
    """The future holds on a node that constrain it at ``now`` (expired ones do not)."""
    if alloc is None:
        return []
    return [(k, r) for k, r in alloc.reservations.items() if r.starts_at and now <= r.starts_at + EXPIRY]


def may_take(
    free_now: tuple[int, int, int, int],
    res: Resources,
    job_ends_by: float,
    holds: list[tuple[str, Reservation]],
    own: str = "",
) -> bool:
    """Whether a job needing ``res`` that ends by ``job_ends_by`` may take room now on a
    node with ``holds``, where ``free_now`` (cpu, memory, gpu, disk) is free (its fit on
    ``free_now`` itself is checked by the caller). ``own``: the job's own hold, which does
    not constrain it."""
    for key, hold in holds:
        if key == own or job_ends_by <= hold.starts_at:
            continue
        h = hold.resources
        if not (
            res.cpu_milli <= free_now[0] - h.cpu_milli
            and res.memory_mb <= free_now[1] - h.memory_mb
            and res.gpu <= free_now[2] - h.gpu
            and res.disk_mb <= free_now[3] - h.disk_mb
        ):
            return False
    return True


def earliest_start(node: NodeInfo, alloc: Allocation | None, res: Resources, now: float) -> float | None:
    """When ``res`` fits on ``node`` at the earliest, if its reservations end by their
    ``ends_by``: ``now`` or the end that frees enough. None when it never fits there (more
    than the node has), or when a reservation it must wait for has no known end."""
    if res.cpu_milli > node.cpu_milli or res.memory_mb > node.memory_mb or res.gpu > node.gpu:
        return None
    if res.disk_mb > node.disk_mb:
        return None
    held = [r for r in (alloc.reservations.values() if alloc else ()) if not r.starts_at]
    cpu = node.cpu_milli - sum(r.resources.cpu_milli for r in held)
    mem = node.memory_mb - sum(r.resources.memory_mb for r in held)
    gpu = node.gpu - sum(r.resources.gpu for r in held)
    disk = node.disk_mb - sum(r.resources.disk_mb for r in held)
    if res.cpu_milli <= cpu and res.memory_mb <= mem and res.gpu <= gpu and res.disk_mb <= disk:
        return now
    # The ones with no known end go last: reaching one means the wait has no bound.
    for r in sorted(held, key=lambda r: r.ends_by or float("inf")):
        if not r.ends_by:
            return None
        cpu += r.resources.cpu_milli
        mem += r.resources.memory_mb
        gpu += r.resources.gpu
        disk += r.resources.disk_mb
        if res.cpu_milli <= cpu and res.memory_mb <= mem and res.gpu <= gpu and res.disk_mb <= disk:
            return max(now, r.ends_by)
    return None


def is_large(node: NodeInfo, res: Resources) -> bool:
    """Whether ``res`` needs more than ``LARGE_SHARE`` of ``node``'s cpu, memory or GPUs."""
    return (
        res.cpu_milli > LARGE_SHARE * node.cpu_milli
        or res.memory_mb > LARGE_SHARE * node.memory_mb
        or (res.gpu > 0 and res.gpu > LARGE_SHARE * node.gpu)
    )


def choose_node(
    candidates: list[str],
    nodes: Mapping[str, NodeInfo],
    allocs: Mapping[str, Allocation],
    res: Resources,
    now: float,
) -> tuple[str, float] | None:
    """The candidate where ``res`` starts soonest, and when; nodes that are gone, draining
    or hold a future reservation already are passed over, and so are nodes ``res`` is not
    large for (:func:`is_large`). None when no candidate has a bounded start."""
    best: tuple[float, str] | None = None
    for node_id in candidates:
        node = nodes.get(node_id)
        if node is None or node.draining or not is_large(node, res):
            continue
        alloc = allocs.get(node_id)
        if future_holds(alloc, now):
            continue  # one future hold per node
        start = earliest_start(node, alloc, res, now)
        if start is not None and (best is None or (start, node_id) < best):
            best = (start, node_id)
    return None if best is None else (best[1], best[0])


def future_hold(
    node: NodeInfo, alloc: Allocation, key: str, res: Resources, partition: int, priority: int, now: float
) -> tuple[Allocation | None, float | None]:
    """The compare-and-set step that writes a future hold for attempt ``key`` on ``node``;
    pure (run again on the fresh record after a lost race).

    Returns:
        The record to write (None: no write), and the promised start: the stored one when
        the attempt holds room there already, None when the node cannot take a hold (one
        exists, or the start has no bound any more).
    """
    existing = alloc.reservations.get(key)
    if existing is not None:
        return None, existing.starts_at or now
    if future_holds(alloc, now):
        return None, None
    start = earliest_start(node, alloc, res, now)
    if start is None:
        return None, None
    hold = Reservation(resources=res, scratch_dir="", at=now, partition=partition, priority=priority, starts_at=start)
    # Expired future holds go with this write: nothing else removes a hold nobody came for.
    kept = {k: r for k, r in alloc.reservations.items() if not r.starts_at or now <= r.starts_at + EXPIRY}
    return Allocation(node_id=alloc.node_id, reservations={**kept, key: hold}), start


def promised_text(node_id: str, start: float) -> str:
    """The refusal reason of a job whose future hold promises it room."""
    # The time, not a count of seconds: the reason stays the same across the job's
    # releases, so its wait is recorded once.
    at = time.strftime("%H:%M:%S", time.gmtime(start))
    return f"{RESERVED}room on {node_id} is promised by {at} UTC at the latest; shorter jobs run there meanwhile (backfill)"
