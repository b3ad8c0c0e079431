"""The runtime's KV views restart after a reconnect and say whether they have caught up."""

from __future__ import annotations

import asyncio

import nats

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import NodeInfo
from jobmesh.runtime.nodes import NodeWatcher
from jobmesh.runtime.provisioning import provision
from tests.helpers import eventually


async def test_a_restarted_node_view_is_stale_until_its_snapshot_arrived(nats_server) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await provision(js)
        kv = await js.key_value(subjects.KV_NODES)
        await kv.put("n1", encode(NodeInfo(node_id="n1", cpu_milli=1000, memory_mb=1000, heartbeat_at=9e9)))
        records: list[str] = []
        view = NodeWatcher(js, ttl=10.0, on_record=lambda node, _at: records.append(node.node_id))
        task = asyncio.ensure_future(view.run())
        await view.wait_ready()
        assert view.fresh and [n.node_id for n in view.alive()] == ["n1"]
        first_fresh = view.fresh_since
        view.restart()
        assert not view.fresh  # no decision on this view until it caught up again
        # Changes made while it restarts are in the new snapshot.
        await kv.delete("n1")
        await kv.put("n2", encode(NodeInfo(node_id="n2", cpu_milli=1000, memory_mb=1000, heartbeat_at=9e9)))

        async def caught_up() -> bool:
            return view.fresh and [n.node_id for n in view.alive()] == ["n2"]

        await eventually(caught_up, what="the restarted view to hold exactly n2")
        assert view.fresh_since > first_fresh and "n2" in records
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await nc.close()
