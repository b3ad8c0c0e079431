"""A binder whose view of ``jm_alloc`` is stale neither leaks nor binds on it.

Binders on one real NATS server, in this process. A release is never acked before the
reservation is known to be gone: binder B reserves an attempt while binder A's view is stale
(its watch stopped), so A's cache does not show the reservation; A's release of that attempt
must still remove it, because the handler returns (which is what lets the runtime ack) only
after the record on the server no longer holds it. A view restarted after a reconnect counts
as stale until it caught up, and nothing is bound on a stale view.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import nats
import pytest
from nats.js import JetStreamContext

from jobmesh.binder import handlers
from jobmesh.binder.allocations import Allocations
from jobmesh.binder.handlers import Binder
from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import (
    Allocation,
    JobCancelled,
    JobExpired,
    JobReady,
    JobSpec,
    JobSucceeded,
    NodeInfo,
    NoopRuntime,
    Resources,
)
from jobmesh.errors import Unavailable
from jobmesh.runtime.nodes import NodeWatcher
from jobmesh.runtime.provisioning import provision
from jobmesh.runtime.publisher import Publisher
from jobmesh.runtime.service import Envelope
from tests.helpers import eventually

pytestmark = pytest.mark.integration

SPEC = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=100, memory_mb=1))


@dataclass
class InProcessBinder:
    """A binder's handlers with its views, and the tasks that keep the views current."""

    binder: Binder
    allocations: Allocations
    nodes: NodeWatcher
    tasks: list[asyncio.Task[None]]

    def stop_alloc_watch(self) -> None:
        """Freeze the allocation view: from now on it misses every write."""
        self.tasks[1].cancel()


async def _start_binder(js: JetStreamContext) -> InProcessBinder:
    nodes = NodeWatcher(js, ttl=10.0)
    allocations = Allocations(js)
    await allocations.open()
    tasks = [asyncio.ensure_future(nodes.run()), asyncio.ensure_future(allocations.watch())]
    await nodes.wait_ready()
    await allocations.wait_ready()
    return InProcessBinder(Binder(allocations, nodes, Publisher(js)), allocations, nodes, tasks)


@pytest.fixture
async def js(nats_server) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await provision(js)
    yield js
    await nc.close()


@pytest.fixture
async def node(js) -> str:
    """A node of its own for each test (the NATS server is shared by the module)."""
    node_id = f"node-{uuid.uuid4().hex[:12]}"
    info = NodeInfo(node_id=node_id, cpu_milli=1000, memory_mb=1024, heartbeat_at=time.time() + 3600)
    await (await js.key_value(subjects.KV_NODES)).put(node_id, encode(info))
    return node_id


def _envelope(message: object) -> Envelope:
    return Envelope(message=message, subject="test", headers={}, context=None)


def _ready(job_id: str, node: str) -> JobReady:
    return JobReady(job_id=job_id, attempt=1, partition=0, spec=SPEC, candidates=[node], submitted_at=0.0, ready_at=0.0)


def _succeeded(job_id: str, node: str) -> JobSucceeded:
    return JobSucceeded(
        job_id=job_id,
        attempt=1,
        partition=0,
        node_id=node,
        exit_code=0,
        output_tail="",
        submitted_at=0.0,
        started_at=0.0,
        at=time.time(),
    )


async def _reservations(js: JetStreamContext, node: str) -> set[str]:
    """The reservation keys the server holds for the node (read from the server, not a cache)."""
    kv = await js.key_value(subjects.KV_ALLOC)
    try:
        entry = await kv.get(node)
    except nats.js.errors.KeyNotFoundError:
        return set()
    return set(msgspec.json.decode(entry.value or b"{}", type=Allocation).reservations)


async def _stop(*binders: InProcessBinder) -> None:
    for b in binders:
        for task in b.tasks:
            task.cancel()
        await asyncio.gather(*b.tasks, return_exceptions=True)


async def test_a_stale_binder_releases_a_reservation_it_never_saw(js, node) -> None:
    stale = await _start_binder(js)
    fresh = await _start_binder(js)
    try:
        stale.stop_alloc_watch()
        await fresh.binder.bind([_envelope(_ready("unseen", node))])
        assert await _reservations(js, node) == {"unseen:1"}
        assert stale.allocations.holder("unseen:1") is None  # the stale view never saw it

        await stale.binder.release([_envelope(_succeeded("unseen", node))])
        # The handler returned: the runtime would ack now. The reservation must be gone.
        assert await _reservations(js, node) == set()
    finally:
        await _stop(stale, fresh)


async def test_a_stale_binder_releases_a_reservation_its_cache_shows_at_an_old_revision(js, node) -> None:
    stale = await _start_binder(js)
    fresh = await _start_binder(js)
    try:
        await fresh.binder.bind([_envelope(_ready("old", node))])

        async def seen() -> bool:
            return stale.allocations.holder("old:1") == node

        deadline = time.monotonic() + 10
        while not await seen():
            assert time.monotonic() < deadline, "the stale binder never saw the first reservation"
            await asyncio.sleep(0.02)  # polling the view (a deliberate sleep)
        stale.stop_alloc_watch()
        # The record moves on behind the stale view's back.
        await fresh.binder.bind([_envelope(_ready("newer", node))])
        assert await _reservations(js, node) == {"old:1", "newer:1"}

        await stale.binder.release([_envelope(_succeeded("old", node)), _envelope(_succeeded("newer", node))])
        assert await _reservations(js, node) == set()
    finally:
        await _stop(stale, fresh)


async def test_releases_that_name_no_node_need_nothing(js, node) -> None:
    binder = await _start_binder(js)
    try:
        await binder.binder.bind([_envelope(_ready("kept", node))])
        expired = JobExpired(job_id="gone", attempt=0, partition=0, reason="queue timeout", at=time.time())
        cancelled = JobCancelled(job_id="held", attempt=0, partition=0, reason="by test", at=time.time())
        await binder.binder.release([_envelope(expired), _envelope(cancelled)])
        assert await _reservations(js, node) == {"kept:1"}
    finally:
        await _stop(binder)


async def test_a_restarted_allocation_view_is_stale_until_it_caught_up(js, node) -> None:
    viewer = await _start_binder(js)
    writer = await _start_binder(js)
    try:
        await writer.binder.bind([_envelope(_ready("before", node))])
        first_fresh = viewer.allocations.fresh_since
        viewer.allocations.restart()  # as after a reconnect
        assert not viewer.allocations.fresh and viewer.allocations.fresh_since == 0.0
        await writer.binder.bind([_envelope(_ready("during", node))])

        async def caught_up() -> bool:
            allocs = viewer.allocations
            return allocs.fresh and allocs.holder("before:1") == node and allocs.holder("during:1") == node

        await eventually(caught_up, what="the restarted view to hold both reservations")
        assert viewer.allocations.fresh_since > first_fresh
    finally:
        await _stop(viewer, writer)


async def test_nothing_is_bound_on_a_view_that_has_not_caught_up(js, node, monkeypatch) -> None:
    monkeypatch.setattr(handlers, "FRESH_WAIT", 0.3)
    stale = await _start_binder(js)
    try:
        stale.stop_alloc_watch()
        stale.allocations.restart()  # a reconnect, and the watch does not come back
        with pytest.raises(Unavailable, match="catching up"):
            await stale.binder.bind([_envelope(_ready("waits", node))])
        assert await _reservations(js, node) == set()
    finally:
        await _stop(stale)
