"""Handler workers started inside the node's isolation (``isolation/workers.py``) without a
cluster: releasing a worker never stops the executor's event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path

import pytest

from jobmesh.executor.isolation import workers
from jobmesh.executor.isolation.cgroups import CgroupEvents
from jobmesh.executor.isolation.launch import Launch
from jobmesh.executor.isolation.probe import NodeIsolation


@dataclasses.dataclass
class SlowLaunch(Launch):
    """A launch whose cgroup removal takes long (a process stuck in the kernel keeps the
    cgroup busy), and which notes whether the event loop ran meanwhile."""

    ticks: list[int] = dataclasses.field(default_factory=list)
    loop_ran: threading.Event = dataclasses.field(default_factory=threading.Event)

    def finish(self) -> CgroupEvents:
        seen = len(self.ticks)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # blocks as the cgroup's kill-and-wait does
            if len(self.ticks) >= seen + 5:
                self.loop_ran.set()
                break
            time.sleep(0.005)  # stands in for a blocking kill-and-wait (noqa: sleep)
        return CgroupEvents()


async def test_closing_a_hung_worker_leaves_the_event_loop_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    slow: list[SlowLaunch] = []
    real_prepare = workers.prepare_launch

    def prepare(isolation: NodeIsolation, spec: workers.LaunchSpec) -> Launch:
        launch = SlowLaunch(
            **{f.name: getattr(real_prepare(isolation, spec), f.name) for f in dataclasses.fields(Launch)}
        )
        slow.append(launch)
        return launch

    monkeypatch.setattr(workers, "prepare_launch", prepare)
    spawn = workers.isolated_spawn(NodeIsolation(), 256, [])
    worker = await spawn(["sleep", "3600"], {"PATH": "/usr/bin:/bin"}, tmp_path, ())  # a worker that hangs
    [launch] = slow

    async def ticker() -> None:
        while True:
            launch.ticks.append(len(launch.ticks))
            await asyncio.sleep(0.01)  # the loop's heartbeat, not a wait before an assert (noqa: sleep)

    ticking = asyncio.ensure_future(ticker())
    try:
        worker.kill()
        assert await asyncio.wait_for(worker.wait(), 10) == -9
        started = time.monotonic()
        await asyncio.wait_for(worker.close(), 10)
        took = time.monotonic() - started
    finally:
        ticking.cancel()
    assert launch.loop_ran.is_set(), "the event loop stood still while the worker's cgroup was removed"
    assert took < 2.5, took
