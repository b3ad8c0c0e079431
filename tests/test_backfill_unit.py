"""Backfill at the binder, pure: when a starving job can start on a node, the future hold
that promises it the room, and which other jobs may still take room there meanwhile
(services/binder/backfill.py, and its rule inside allocation.plan and allocation.reserve)."""

from __future__ import annotations

from jobmesh.binder.allocation import free_on, plan, reserve
from jobmesh.binder.backfill import (
    EXPIRY,
    STOP_SLACK,
    choose_node,
    earliest_start,
    ends_by,
    future_hold,
    future_holds,
    promised_text,
)
from jobmesh.contract.messages.v1 import (
    Allocation,
    JobReady,
    JobSpec,
    NodeInfo,
    NoopRuntime,
    Reservation,
    Resources,
    Timeouts,
)

NOW = 1_000.0
NODE = NodeInfo(node_id="n1", cpu_milli=8000, memory_mb=8192, heartbeat_at=NOW, started_at=0.0)


def small(at: float, timeout: float) -> Reservation:
    return Reservation(
        resources=Resources(cpu_milli=1000, memory_mb=0), scratch_dir="", at=at, ends_by=ends_by(at, timeout)
    )


def job(job_id: str, cpu: int, timeout: float = 3600.0, release: int = 1) -> JobReady:
    spec = JobSpec(
        runtime=NoopRuntime(), resources=Resources(cpu_milli=cpu, memory_mb=0), timeouts=Timeouts(run=timeout)
    )
    return JobReady(
        job_id=job_id,
        attempt=1,
        partition=0,
        spec=spec,
        candidates=["n1"],
        submitted_at=NOW,
        ready_at=NOW,
        release=release,
    )


# Eight 1-cpu jobs fill the node; they end (at the latest) 10 s to 17 s from now, plus the slack.
FULL = Allocation(node_id="n1", reservations={f"s{i}:1": small(NOW - i, 10 + 2 * i) for i in range(8)})
BIG = Resources(cpu_milli=8000, memory_mb=0)


def test_a_job_starts_once_enough_reservations_have_ended_by_their_bounds() -> None:
    assert earliest_start(NODE, None, BIG, NOW) == NOW  # an empty node: now
    # All eight must go for 8 cpus: the last one to end sets the start.
    assert earliest_start(NODE, FULL, BIG, NOW) == NOW + 17 + STOP_SLACK
    # Two cpus: the two that end first.
    two = Resources(cpu_milli=2000, memory_mb=0)
    assert earliest_start(NODE, FULL, two, NOW) == NOW + 11 + STOP_SLACK
    # More than the node has: never; a reservation with no known end: no bound.
    assert earliest_start(NODE, FULL, Resources(cpu_milli=9000, memory_mb=0), NOW) is None
    # One of them with no known end (from before ends_by existed): the 8 cpus have no bound,
    # though 2 still do (the unknown one is not needed for them).
    unknown = Allocation(
        node_id="n1",
        reservations={
            **FULL.reservations,
            "s7:1": Reservation(resources=Resources(cpu_milli=1000, memory_mb=0), scratch_dir="", at=0),
        },
    )
    assert earliest_start(NODE, unknown, two, NOW) == NOW + 11 + STOP_SLACK
    assert earliest_start(NODE, unknown, BIG, NOW) is None


def test_a_future_hold_books_nothing_now_and_is_written_once_per_node() -> None:
    new, start = future_hold(NODE, FULL, "big:1", BIG, 0, 5, NOW)
    assert new is not None and start == NOW + 17 + STOP_SLACK
    hold = new.reservations["big:1"]
    assert hold.starts_at == start and hold.resources == BIG
    assert free_on(NODE, new) == free_on(NODE, FULL)  # not in force before it is bound
    assert future_holds(new, NOW) == [("big:1", hold)]
    # Its own again: the stored promise, no write. Another job's: refused, one per node.
    assert future_hold(NODE, new, "big:1", BIG, 0, 5, NOW) == (None, start)
    assert future_hold(NODE, new, "other:1", BIG, 0, 5, NOW) == (None, None)
    assert choose_node(["n1"], {"n1": NODE}, {"n1": new}, BIG, NOW) is None


def test_beside_a_future_hold_only_jobs_that_end_before_it_or_fit_beside_it_take_room() -> None:
    held, start = future_hold(NODE, FULL, "big:1", BIG, 0, 5, NOW)
    assert held is not None and start is not None
    # One slot frees: the held node has 1 cpu free now.
    freed = Allocation(node_id="n1", reservations={k: v for k, v in held.reservations.items() if k != "s0:1"})
    allocs = {"n1": freed}
    nodes = {"n1": NODE}
    short = job("short", 1000, timeout=start - NOW - STOP_SLACK - 1)  # ends a second before the start
    long = job("long", 1000, timeout=3600)
    p = plan([short, long], nodes, allocs, now=NOW)
    assert [j.job_id for j in p.assign.get("n1", [])] == ["short"]
    assert [j.job_id for j, _ in p.refused] == ["long"]
    # The compare-and-set step keeps the same rule on the record it writes.
    new, won, lost = reserve(NODE, freed, [long, short], NOW)
    assert [b.job.job_id for b in won] == ["short"] and [j.job_id for j in lost] == ["long"]
    assert new is not None and new.reservations["short:1"].ends_by <= start


def test_a_job_that_fits_beside_the_held_room_may_stay_longer() -> None:
    # 9 cpus free on a 24-cpu node, 8 of them promised: a long 1-cpu job fits beside them,
    # a long 2-cpu one does not; a short one that ends before the promise may take any.
    wide = NodeInfo(node_id="n1", cpu_milli=24000, memory_mb=8192, heartbeat_at=NOW, started_at=0.0)
    hold = Reservation(resources=BIG, scratch_dir="", at=NOW, starts_at=NOW + 60)
    busy = Reservation(resources=Resources(cpu_milli=15000, memory_mb=0), scratch_dir="", at=NOW, ends_by=NOW + 30)
    record = Allocation(node_id="n1", reservations={"busy:1": busy, "big:1": hold})
    _, won, lost = reserve(wide, record, [job("long1", 1000), job("long2", 2000)], NOW)
    assert [b.job.job_id for b in won] == ["long1"] and [j.job_id for j in lost] == ["long2"]
    _, won, _ = reserve(wide, record, [job("short", 2000, timeout=20)], NOW)
    assert [b.job.job_id for b in won] == ["short"]


def test_the_held_job_takes_its_room_when_it_fits_and_the_hold_becomes_its_reservation() -> None:
    held, _ = future_hold(NODE, FULL, "big:1", BIG, 0, 5, NOW)
    assert held is not None
    drained = Allocation(node_id="n1", reservations={"big:1": held.reservations["big:1"]})
    big = job("big", 8000, release=4)
    new, won, lost = reserve(NODE, drained, [big], NOW + 3)
    assert [b.job.job_id for b in won] == ["big"] and won[0].new and not lost
    assert new is not None
    r = new.reservations["big:1"]
    assert r.starts_at == 0 and r.ends_by == ends_by(NOW + 3, 3600)  # in force now
    # Before it fits, it is refused, the hold staying.
    _, won, lost = reserve(NODE, held, [big], NOW + 3)
    assert not won and [j.job_id for j in lost] == ["big"]


def test_an_expired_future_hold_constrains_nothing_and_goes_with_the_next_write() -> None:
    held, start = future_hold(NODE, FULL, "big:1", BIG, 0, 5, NOW)
    assert held is not None and start is not None
    later = start + EXPIRY + 1
    freed = Allocation(node_id="n1", reservations={k: v for k, v in held.reservations.items() if k != "s0:1"})
    assert future_holds(freed, later) == []
    new, won, _ = reserve(NODE, freed, [job("long", 1000)], later)
    assert [b.job.job_id for b in won] == ["long"]
    assert new is not None and "big:1" not in new.reservations


def test_the_reason_names_the_node_and_a_time_that_stays_the_same() -> None:
    assert promised_text("n1", 0.0) == (
        "reserved: room on n1 is promised by 00:00:00 UTC at the latest; shorter jobs run there meanwhile (backfill)"
    )


def test_only_a_large_job_gets_a_future_hold() -> None:
    nodes = {"n1": NODE}
    assert choose_node(["n1"], nodes, {"n1": FULL}, Resources(cpu_milli=2000, memory_mb=0), NOW) is None
    assert choose_node(["n1"], nodes, {"n1": FULL}, Resources(cpu_milli=2001, memory_mb=0), NOW) == (
        "n1",
        NOW + 12 + STOP_SLACK,
    )
    assert choose_node(["n1"], nodes, {"n1": FULL}, BIG, NOW) == ("n1", NOW + 17 + STOP_SLACK)
