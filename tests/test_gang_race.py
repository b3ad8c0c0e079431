"""Four binder processes race two gangs of 3 onto 5 nodes: exactly one gang is bound at a
time, with every member on a node of its own; no allocation record ever written is
overbooked or holds both gangs whole; the other gang gets its turn once the first ends; and
every reservation goes when both have ended."""

from __future__ import annotations

import asyncio
import functools
import time

import msgspec
import nats
import pytest
from nats.js.errors import KeyNotFoundError

from jobmesh.binder.allocation import overbooked
from jobmesh.binder.gangs import RACE_LOST
from jobmesh.contract import subjects
from jobmesh.contract.ids import release_id
from jobmesh.contract.messages.v1 import (
    Allocation,
    JobBound,
    JobReady,
    JobSpec,
    JobSucceeded,
    JobUnplaceable,
    NodeInfo,
    NoopRuntime,
    Resources,
)
from jobmesh.runtime.provisioning import provision
from jobmesh.runtime.publisher import Outgoing, Publisher
from tests.cluster_fixtures import Service, stand_in_heartbeats
from tests.helpers import eventually

pytestmark = pytest.mark.integration

NODES = [f"gnode-{i}" for i in range(5)]
CAPACITY = {n: NodeInfo(node_id=n, cpu_milli=1000, memory_mb=1024, heartbeat_at=0.0) for n in NODES}
# A member takes a whole node: two gangs of 3 never fit on 5 nodes at once.
SPEC = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=1000, memory_mb=100), replicas=3)
ROUNDS = 8


def _ready(job_id: str, release: int) -> Outgoing:
    job = JobReady(
        job_id=job_id,
        attempt=1,
        partition=0,
        spec=SPEC,
        candidates=NODES,
        submitted_at=time.time(),
        ready_at=time.time(),
        release=release,
    )
    return Outgoing(subjects.job_event(0, subjects.READY), job, release_id(job_id, 1, subjects.READY, release))


def _done(job_id: str, node_id: str) -> Outgoing:
    # The scheduler's JobSucceeded of a whole gang (partition form) frees every member.
    message = JobSucceeded(
        job_id=job_id,
        attempt=1,
        partition=0,
        node_id=node_id,
        exit_code=0,
        output_tail="",
        submitted_at=0.0,
        started_at=0.0,
        at=time.time(),
    )
    return Outgoing(subjects.job_event(0, subjects.SUCCEEDED), message, f"{job_id}:1:succeeded")


async def test_four_binders_place_one_of_two_racing_gangs_at_a_time(nats_server, make_cluster):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await provision(js)
    nodes_kv = await js.key_value(subjects.KV_NODES)
    beats = asyncio.ensure_future(stand_in_heartbeats(nodes_kv, CAPACITY.values()))

    async def registered():
        try:
            return len(await nodes_kv.keys()) >= len(NODES)
        except Exception:  # noqa: BLE001 - nats-py raises while the bucket is empty
            return False

    await eventually(registered, what="fake nodes registered")

    # Every allocation record ever written is audited, not only the last.
    violations: list[str] = []
    latest: dict[str, Allocation] = {}
    alloc_kv = await js.key_value(subjects.KV_ALLOC)
    watcher = await alloc_kv.watchall()

    async def audit() -> None:
        async for entry in watcher:
            if entry is None or entry.operation in ("DEL", "PURGE"):
                continue
            alloc = msgspec.json.decode(entry.value, type=Allocation)
            latest[alloc.node_id] = alloc
            if overbooked(CAPACITY[alloc.node_id], alloc):
                violations.append(f"{alloc.node_id} rev {entry.revision} is overbooked")
            held = {key for a in latest.values() for key in a.reservations}
            counts = {key: sum(key in a.reservations for a in latest.values()) for key in held}
            if sum(n == 3 for n in counts.values()) > 1:
                violations.append(f"both gangs held whole at rev {entry.revision}")

    auditor = asyncio.ensure_future(audit())
    bound: dict[str, dict[int, str]] = {}
    refused: dict[str, list[str]] = {}
    pair: list[str] = []  # the two gangs of the current round

    async def on_bound(msg) -> None:
        m = msgspec.json.decode(msg.data, type=JobBound)
        assert m.world_size == 3 and len(m.peers) == 3
        bound[m.job_id][m.rank] = m.node_id

    async def on_refused(msg) -> None:
        m = msgspec.json.decode(msg.data, type=JobUnplaceable)
        refused[m.job_id].append(m.reason)

    async def one_bound_one_refused():
        whole = [g for g in pair if len(bound[g]) == 3]
        return whole if len(whole) == 1 and any(refused[g] for g in pair if g not in whole) else None

    async def released(gang: str):
        return all(f"{gang}:1" not in a.reservations for a in latest.values())

    try:
        cluster = await make_cluster([Service("binder", tag=f"-{i}") for i in range(4)], name="gangrace")
        await js.subscribe(subjects.DISPATCH_ALL, cb=on_bound, ordered_consumer=True)
        await js.subscribe(subjects.job_event("*", subjects.UNPLACEABLE), cb=on_refused, ordered_consumer=True)
        publisher = Publisher(js)
        # Rounds of two fresh gangs at once, ended after each, so the binders race often;
        # the last round's pair goes on below.
        for round_ in range(ROUNDS):
            gangs = [f"g{round_:02d}{k}" + "0" * 29 for k in range(2)]
            for g in gangs:
                bound[g], refused[g] = {}, []
            pair[:] = gangs
            await publisher.publish([_ready(g, 1) for g in gangs])
            [first] = await eventually(one_bound_one_refused, timeout=60, what="one gang bound, the other refused")
            [second] = [g for g in gangs if g != first]
            assert sorted(bound[first]) == [0, 1, 2] and len(set(bound[first].values())) == 3
            assert not bound[second], bound[second]  # no member of the loser was ever dispatched
            assert all("needs 3 nodes with 1000m cpu and 100 MiB" in r for r in refused[second]), refused[second]
            if round_ < ROUNDS - 1:
                await publisher.publish([_done(first, bound[first][0])])
                await eventually(
                    functools.partial(released, first), timeout=30, what="the first gang's members released"
                )
        races = sum(RACE_LOST in r for reasons in refused.values() for r in reasons)
        print(f"{races} of {ROUNDS} rounds were decided by a lost reservation race")

        # The loser, released again while the winner holds its nodes, is refused again:
        # only 2 nodes are free.
        await publisher.publish([_ready(second, 2)])

        async def refused_again():
            return len(refused[second]) >= 2

        await eventually(refused_again, timeout=30, what="the second gang refused again")
        assert refused[second][-1] == "needs 3 nodes with 1000m cpu and 100 MiB; 2 free"

        # The winner ends: the loser's next release takes three nodes.
        await publisher.publish([_done(first, bound[first][0])])

        await eventually(functools.partial(released, first), timeout=30, what="the first gang's members released")
        await publisher.publish([_ready(second, 3)])

        async def second_bound():
            return len(bound[second]) == 3

        await eventually(second_bound, timeout=30, what="the second gang bound")
        assert len(set(bound[second].values())) == 3

        await publisher.publish([_done(second, bound[second][0])])

        async def all_released():
            for n in NODES:
                try:
                    entry = await alloc_kv.get(n)
                except KeyNotFoundError:
                    continue  # never held anything
                if msgspec.json.decode(entry.value, type=Allocation).reservations:
                    return False
            return True

        await eventually(all_released, timeout=30, what="every reservation released")
        assert not violations, violations
        cluster.check_alive()
    finally:
        beats.cancel()
        auditor.cancel()
        await nc.close()
