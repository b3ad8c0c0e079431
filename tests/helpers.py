"""Test helpers: wait on a condition with a deadline instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], timeout: float = 20.0, what: str = "condition", interval: float = 0.05
) -> T:
    """Call ``probe`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)  # polling interval, not a wait before an assert (a deliberate sleep: noqa)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
