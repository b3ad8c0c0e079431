"""The binder's cancel decisions, its bounded memory of cancelled attempts, the guard that
cuts waits on NATS short at a reconnect, and which GPU indices a reservation takes (no I/O)."""

from __future__ import annotations

import asyncio

import pytest

from jobmesh.binder.allocation import node_gpus, overbooked, pick_gpus, reserve, without
from jobmesh.binder.cancels import RETRY_CAP, Forward, GiveUp, RecentAttempts, Wait, cancel_step
from jobmesh.contract.messages.v1 import (
    Allocation,
    GpuDevice,
    JobReady,
    JobSpec,
    NodeInfo,
    NoopRuntime,
    Reservation,
    Resources,
)
from jobmesh.errors import Unavailable
from jobmesh.runtime.reconnects import Reconnects


def test_a_cancel_goes_to_the_holder_whenever_there_is_one() -> None:
    assert cancel_step("n1", issued_at=100.0, now=100.0, bind_timeout=30.0, deliveries=1, key="j:1") == Forward("n1")
    # Even long after the bind timeout: a node holds it, so it may be running.
    assert cancel_step("n1", issued_at=100.0, now=1000.0, bind_timeout=30.0, deliveries=9, key="j:1") == Forward("n1")


def test_without_a_holder_a_cancel_waits_shortly_and_never_past_the_bind_timeout() -> None:
    delays = []
    for deliveries in range(1, 8):
        step = cancel_step(None, issued_at=100.0, now=101.0, bind_timeout=30.0, deliveries=deliveries, key="j:1")
        assert isinstance(step, Wait)
        delays.append(step.delay)
    assert 0 < delays[0] <= 0.2 and max(delays) <= RETRY_CAP  # looked at again within a second
    near_end = cancel_step(None, issued_at=100.0, now=129.95, bind_timeout=30.0, deliveries=7, key="j:1")
    assert isinstance(near_end, Wait) and near_end.delay == pytest.approx(0.05)


def test_without_a_holder_a_cancel_gives_up_once_the_bind_timeout_passed() -> None:
    assert cancel_step(None, issued_at=100.0, now=130.0, bind_timeout=30.0, deliveries=40, key="j:1") == GiveUp()
    assert cancel_step("", issued_at=100.0, now=200.0, bind_timeout=30.0, deliveries=2, key="j:1") == GiveUp()


def test_cancelled_attempts_are_remembered_up_to_the_limit_the_oldest_going_first() -> None:
    memory = RecentAttempts(limit=3)
    for key in ("a:1", "b:1", "c:1"):
        memory.add(key)
    memory.add("a:1")  # seen again: now the most recent
    memory.add("d:1")
    assert len(memory) == 3
    assert "b:1" not in memory and all(k in memory for k in ("a:1", "c:1", "d:1"))


def test_a_memory_of_no_size_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="limit must be at least 1"):
        RecentAttempts(limit=0)


async def test_a_wait_on_nats_is_cut_short_by_a_reconnect_and_the_work_cancelled() -> None:
    reconnects = Reconnects()
    never = asyncio.Event()
    cancelled = asyncio.Event()

    async def hopeless() -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    guarded = asyncio.ensure_future(reconnects.guard(hopeless(), "publishing"))
    await asyncio.sleep(0)  # let the guarded work start (one loop turn, not a wait for time)
    reconnects.reconnected()
    with pytest.raises(Unavailable, match="NATS reconnected while publishing"):
        await guarded
    assert cancelled.is_set()


async def test_work_that_began_after_the_reconnect_is_not_cut_short() -> None:
    reconnects = Reconnects()
    reconnects.reconnected()

    async def quick() -> int:
        return 7

    assert await reconnects.guard(quick(), "reading") == 7
    assert reconnects.count == 1


# --- GPU reservation: specific indices, none shared -----------------------------------


def _gpu_node(devices: list[GpuDevice] | None = None, gpu: int = 0, gpu_kind: str = "") -> NodeInfo:
    return NodeInfo(
        node_id="g1",
        cpu_milli=64_000,
        memory_mb=64_000,
        gpu=len(devices) if devices else gpu,
        gpu_kind=gpu_kind,
        gpu_devices=devices or [],
        work_dir="/w",
    )


def _gpu_job(name: str, gpu: int, kind: str = "") -> JobReady:
    spec = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=100, memory_mb=10, gpu=gpu, gpu_kind=kind))
    return JobReady(job_id=name, attempt=1, partition=0, spec=spec, candidates=["g1"], submitted_at=0.0, ready_at=0.0)


FOUR = [GpuDevice(index=i, kind="a100", memory_mb=40_960, uuid=f"GPU-{i}") for i in range(4)]


def test_gpu_jobs_of_one_batch_get_the_lowest_free_indices_and_never_the_same() -> None:
    node = _gpu_node(FOUR)
    new, won, lost = reserve(
        node, Allocation(node_id="g1"), [_gpu_job("a", 1), _gpu_job("b", 2), _gpu_job("c", 2)], 1.0
    )
    assert [list(b.gpu_devices) for b in won] == [[0], [1, 2]]
    assert [j.job_id for j in lost] == ["c"]  # one GPU left, two asked for
    assert new is not None and new.reservations["a:1"].gpu_devices == [0]
    assert new.reservations["b:1"].gpu_devices == [1, 2] and not overbooked(node, new)


def test_a_gap_left_by_a_released_reservation_is_taken_first_and_indices_need_not_be_contiguous() -> None:
    node = _gpu_node(FOUR)
    first, _, _ = reserve(node, Allocation(node_id="g1"), [_gpu_job("a", 1), _gpu_job("b", 1), _gpu_job("c", 1)], 1.0)
    assert first is not None
    freed = without(first, {"b:1"})  # b's attempt ended: index 1 is free again
    assert freed is not None
    again, won, lost = reserve(node, freed, [_gpu_job("d", 2)], 2.0)
    assert not lost and list(won[0].gpu_devices) == [1, 3]
    assert again is not None and not overbooked(node, again)


def test_a_reserve_redone_on_the_record_another_binder_wrote_picks_other_indices() -> None:
    # Two binders planned from the same revision; the CAS let the first write win, so the
    # second recomputes on the winner's record (what Allocations.change does after a lost race).
    node = _gpu_node(FOUR[:2])
    base = Allocation(node_id="g1")
    theirs, _, _ = reserve(node, base, [_gpu_job("x", 1)], 1.0)
    mine_first_try, mine_won, _ = reserve(node, base, [_gpu_job("y", 1)], 1.0)
    assert list(mine_won[0].gpu_devices) == [0]  # the same pick: exactly what the CAS refuses
    assert theirs is not None and mine_first_try is not None
    retried, won, lost = reserve(node, theirs, [_gpu_job("y", 1)], 1.0)
    assert not lost and list(won[0].gpu_devices) == [1]
    assert retried is not None and not overbooked(node, retried)
    _, _, full = reserve(node, retried, [_gpu_job("z", 1)], 1.0)
    assert [j.job_id for j in full] == ["z"]


def test_a_redelivered_gpu_job_gets_the_indices_it_already_holds_and_writes_nothing() -> None:
    node = _gpu_node(FOUR)
    held, _, _ = reserve(node, Allocation(node_id="g1"), [_gpu_job("a", 1), _gpu_job("b", 2)], 1.0)
    assert held is not None
    new, won, lost = reserve(node, held, [_gpu_job("b", 2)], 5.0)
    assert new is None and not lost
    assert list(won[0].gpu_devices) == [1, 2] and not won[0].new


def test_gpus_of_the_asked_kind_only_and_a_device_without_a_kind_has_the_nodes() -> None:
    mixed = [
        GpuDevice(index=0, kind="t4"),
        GpuDevice(index=1, kind="a100"),
        GpuDevice(index=2),  # no kind of its own: the node's (a100)
        GpuDevice(index=3, kind="t4"),
    ]
    node = _gpu_node(mixed, gpu_kind="a100")
    assert pick_gpus(node, {}, Resources(gpu=2, gpu_kind="a100")) == [1, 2]
    assert pick_gpus(node, {}, Resources(gpu=2, gpu_kind="t4")) == [0, 3]
    assert pick_gpus(node, {}, Resources(gpu=3, gpu_kind="t4")) is None
    assert pick_gpus(node, {}, Resources(gpu=3)) == [0, 1, 2]  # no kind asked: any
    _, won, lost = reserve(node, Allocation(node_id="g1"), [_gpu_job("k", 3, "a100")], 1.0)
    assert not won and [j.job_id for j in lost] == ["k"]  # count fits, kind does not


def test_a_node_advertising_only_a_count_has_indices_zero_to_count() -> None:
    node = _gpu_node(gpu=2, gpu_kind="v100")
    assert [d.index for d in node_gpus(node)] == [0, 1] and all(d.kind == "v100" for d in node_gpus(node))
    _, won, lost = reserve(node, Allocation(node_id="g1"), [_gpu_job("a", 1), _gpu_job("b", 1)], 1.0)
    assert [list(b.gpu_devices) for b in won] == [[0], [1]] and not lost


def test_jobs_without_gpus_hold_no_index_and_leave_every_gpu_free() -> None:
    node = _gpu_node(FOUR)
    new, won, _ = reserve(node, Allocation(node_id="g1"), [_gpu_job("cpu", 0), _gpu_job("gpu", 4)], 1.0)
    assert new is not None and new.reservations["cpu:1"].gpu_devices == []
    assert list(won[0].gpu_devices) == [] and list(won[1].gpu_devices) == [0, 1, 2, 3]
    assert pick_gpus(node, new.reservations, Resources()) == []


def test_overbooked_sees_two_reservations_sharing_a_gpu() -> None:
    node = _gpu_node(FOUR)
    one = Reservation(resources=Resources(gpu=1), scratch_dir="", at=0.0, gpu_devices=[2])
    assert not overbooked(node, Allocation(node_id="g1", reservations={"a:1": one}))
    assert overbooked(node, Allocation(node_id="g1", reservations={"a:1": one, "b:1": one}))
