"""Provisioning asks a JetStream that timed out again, and gives up at its deadline."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from jobmesh.errors import Unavailable
from jobmesh.runtime.provisioning import retry_timeouts


class Flaky:
    """A JetStream step that times out ``failures`` times before it answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise nats.errors.TimeoutError
        return "created"


async def test_a_timed_out_step_is_asked_again_until_it_answers():
    step = Flaky(failures=2)
    deadline = asyncio.get_running_loop().time() + 60
    assert await retry_timeouts(step, "stream JM_JOBS", deadline) == "created"
    assert step.calls == 3


async def test_past_the_deadline_the_step_is_named_in_the_error():
    step = Flaky(failures=1)
    deadline = asyncio.get_running_loop().time()  # already due: the first timeout is final
    with pytest.raises(Unavailable, match="provisioning bucket jm_nodes: JetStream did not answer"):
        await retry_timeouts(step, "bucket jm_nodes", deadline)
    assert step.calls == 1


async def test_other_errors_are_not_retried():
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise nats.errors.NoRespondersError

    with pytest.raises(nats.errors.NoRespondersError):
        await retry_timeouts(refused, "stream JM_JOBS", asyncio.get_running_loop().time() + 60)
    assert calls == 1
