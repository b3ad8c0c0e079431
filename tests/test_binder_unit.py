"""The binder's cancel decisions, its bounded memory of cancelled attempts, and the guard
that cuts waits on NATS short at a reconnect (no I/O)."""

from __future__ import annotations

import asyncio

import pytest

from jobmesh.binder.cancels import RETRY_CAP, Forward, GiveUp, RecentAttempts, Wait, cancel_step
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
