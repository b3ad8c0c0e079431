"""Reaping nodes gone for good, against a real nats-server: the binder's reaper removes
the allocation record, the dispatch consumer and the dispatches of a node absent past the
grace, and keeps them for a node that came back within it or still holds a reservation."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from nats.js.api import ConsumerConfig
from nats.js.errors import KeyNotFoundError, NotFoundError

from jobmesh.binder.allocations import Allocations
from jobmesh.binder.reaping import Reaper
from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import Allocation, NodeInfo, Reservation, Resources
from jobmesh.errors import InvalidSpec
from jobmesh.runtime.commands import forget_node
from jobmesh.runtime.nodes import NodeWatcher
from jobmesh.runtime.service import Runtime
from jobmesh.runtime.settings import Settings
from tests.helpers import eventually

pytestmark = pytest.mark.integration

GRACE = 3_600.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def binder(nats_server):
    """The binder's views and a reaper on them, with an injected clock."""
    rt = Runtime(Settings(nats_url=nats_server.url, service="binder", instance=f"reap-{uuid.uuid4().hex[:6]}"))
    await rt.connect()
    clock = Clock()
    nodes = NodeWatcher(rt.js, 10.0, clock=clock)
    allocations = Allocations(rt.js)
    await allocations.open()
    tasks = [asyncio.ensure_future(nodes.run()), asyncio.ensure_future(allocations.watch())]
    await nodes.wait_ready()
    await allocations.wait_ready()
    yield Reaper(rt.js, nodes, allocations, GRACE, clock=clock), nodes, allocations, clock, rt.js
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await rt.close()


async def register(js, nodes: NodeWatcher, node: str, at: float) -> None:
    kv = await js.key_value(subjects.KV_NODES)
    await kv.put(node, encode(NodeInfo(node_id=node, cpu_milli=1000, memory_mb=1024, heartbeat_at=at)))

    async def seen() -> bool:
        return any(n.node_id == node and n.heartbeat_at == at for n, _ in nodes.all())

    await eventually(seen, what=f"the binder to see node {node} at {at}")


async def deregister(js, nodes: NodeWatcher, node: str) -> None:
    await (await js.key_value(subjects.KV_NODES)).delete(node)

    async def gone() -> bool:
        return all(n.node_id != node for n, _ in nodes.all())

    await eventually(gone, what=f"the binder to see node {node} leave")


async def leave_traces(js, allocations: Allocations, node: str, reserved: bool = False) -> None:
    """What a node that ran work leaves: its dispatch durable, a dispatch, its record."""
    await js.add_consumer(
        subjects.STREAM_DISPATCH,
        ConsumerConfig(
            durable_name=subjects.durable("executor", node),
            filter_subjects=[subjects.node_dispatch(node), subjects.node_cancel(node)],
        ),
    )
    await js.publish(subjects.node_dispatch(node), b"an old dispatch")
    reservations = {"j:1": Reservation(resources=Resources(), scratch_dir="/s", at=1.0)} if reserved else {}
    await allocations.kv.put(node, encode(Allocation(node_id=node, reservations=reservations)))

    async def cached() -> bool:
        return node in allocations.records

    await eventually(cached, what=f"the binder to see node {node}'s allocation record")


async def has_record(allocations: Allocations, node: str) -> bool:
    try:
        await allocations.kv.get(node)
    except KeyNotFoundError:
        return False
    return True


async def has_consumer(js, node: str) -> bool:
    try:
        await js.consumer_info(subjects.STREAM_DISPATCH, subjects.durable("executor", node))
    except NotFoundError:
        return False
    return True


async def has_dispatch(js, node: str) -> bool:
    try:
        await js.get_last_msg(subjects.STREAM_DISPATCH, subjects.node_dispatch(node))
    except NotFoundError:
        return False
    return True


async def test_a_node_gone_past_the_grace_is_reaped_and_one_back_within_it_is_kept(binder):
    reaper, nodes, allocations, clock, js = binder
    gone, back, busy, alive = (f"n-{uuid.uuid4().hex[:8]}" for _ in range(4))
    for node in (gone, back, busy, alive):
        await register(js, nodes, node, clock.now)
        await leave_traces(js, allocations, node, reserved=node == busy)
    assert await reaper.round() == []

    for node in (gone, back, busy):
        await deregister(js, nodes, node)
    assert await reaper.round() == []  # absent from now on
    assert set(reaper.absent_since) == {gone, back, busy}

    # Within the grace, one node comes back (and keeps beating, as does the live one).
    clock.now += GRACE / 2
    for node in (back, alive):
        await register(js, nodes, node, clock.now)
    assert await reaper.round() == []
    assert set(reaper.absent_since) == {gone, busy}

    clock.now += GRACE / 2
    for node in (back, alive):
        await register(js, nodes, node, clock.now)
    assert await reaper.round() == [gone]

    assert not await has_record(allocations, gone)
    assert not await has_consumer(js, gone)
    assert not await has_dispatch(js, gone)
    for node in (back, busy, alive):
        assert await has_record(allocations, node), node
        assert await has_consumer(js, node), node
        assert await has_dispatch(js, node), node

    # A reaped node id that comes back starts clean: a new record can be created.
    await allocations.kv.create(gone, encode(Allocation(node_id=gone)))
    assert await has_record(allocations, gone)


async def test_a_record_written_after_the_decision_is_not_deleted(binder):
    reaper, nodes, allocations, clock, js = binder
    node = f"n-{uuid.uuid4().hex[:8]}"
    await register(js, nodes, node, clock.now)
    await leave_traces(js, allocations, node)
    await deregister(js, nodes, node)
    assert await reaper.round() == []
    clock.now += GRACE
    # The node re-registered a moment ago, but the binder's view has not seen it yet.
    kv = await js.key_value(subjects.KV_NODES)
    await kv.put(node, encode(NodeInfo(node_id=node, cpu_milli=1000, memory_mb=1024, heartbeat_at=clock.now)))
    assert not await reaper._reap(node)
    assert await has_record(allocations, node)
    assert await has_consumer(js, node)


async def test_a_binder_without_the_right_to_delete_leaves_the_durable_to_the_provisioner(binder):
    # With an identity of its own, the binder may remove its allocation record only; the
    # provisioner's `jobmesh provision --forget-node` removes the durable and the dispatches.
    _reaper, nodes, allocations, clock, js = binder
    reaper = Reaper(js, nodes, allocations, GRACE, clock=clock, nats_side=False)
    gone, busy = (f"n-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for node in (gone, busy):
        await register(js, nodes, node, clock.now)
        await leave_traces(js, allocations, node, reserved=node == busy)
    with pytest.raises(InvalidSpec, match="is registered"):
        await forget_node(js, gone)
    for node in (gone, busy):
        await deregister(js, nodes, node)
    assert await reaper.round() == []
    clock.now += GRACE
    reaped = await reaper.round()  # (nodes earlier tests left in this module's server too)
    assert gone in reaped and busy not in reaped
    assert not await has_record(allocations, gone)
    assert await has_consumer(js, gone) and await has_dispatch(js, gone)

    with pytest.raises(InvalidSpec, match="holds 1 reservations"):
        await forget_node(js, busy)
    assert await has_consumer(js, busy) and await has_dispatch(js, busy) and await has_record(allocations, busy)
    assert await forget_node(js, gone) is True
    assert not await has_consumer(js, gone) and not await has_dispatch(js, gone)
    with pytest.raises(NotFoundError):  # not even the reaper's delete marker is left
        await js.get_last_msg(f"KV_{subjects.KV_ALLOC}", f"$KV.{subjects.KV_ALLOC}.{gone}")
    assert await forget_node(js, gone) is False  # again: nothing left, no error
