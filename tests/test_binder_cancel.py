"""The binder forwards a cancel to the node that holds the attempt, and never binds an
attempt cancelled before its binding. A real binder process on a real NATS server, with
fake node records (no executor: the test plays the nodes and the scheduler)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.ids import event_id, release_id
from jobmesh.contract.messages.v1 import (
    Allocation,
    AttemptCancel,
    JobBound,
    JobCancelling,
    JobReady,
    JobSpec,
    JobUnplaceable,
    NodeInfo,
    NoopRuntime,
    Resources,
)
from jobmesh.runtime.provisioning import provision
from jobmesh.runtime.publisher import Outgoing, Publisher
from tests.helpers import eventually

pytestmark = pytest.mark.integration

BIND_TIMEOUT = 2.0
SPEC = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=100, memory_mb=1))


class Seen:
    """What the binder published, as a node and the scheduler would see it."""

    def __init__(self) -> None:
        self.bound: dict[str, list[str]] = {}  # job id -> nodes it was bound to
        self.cancels: dict[str, list[tuple[str, str, str]]] = {}  # job id -> (subject, msg id, node)
        self.refused: dict[str, list[str]] = {}  # job id -> reasons

    async def on_bound(self, msg: Msg) -> None:
        m = msgspec.json.decode(msg.data, type=JobBound)
        self.bound.setdefault(m.job_id, []).append(m.node_id)

    async def on_cancel(self, msg: Msg) -> None:
        m = msgspec.json.decode(msg.data, type=AttemptCancel)
        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
        self.cancels.setdefault(m.job_id, []).append((msg.subject, msg_id, m.node_id))

    async def on_refused(self, msg: Msg) -> None:
        m = msgspec.json.decode(msg.data, type=JobUnplaceable)
        self.refused.setdefault(m.job_id, []).append(m.reason)


@pytest.fixture
async def nc(nats_server) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    await provision(conn.jetstream())
    yield conn
    await conn.close()


@pytest.fixture
async def seen(nc) -> Seen:
    s = Seen()
    await nc.subscribe(subjects.DISPATCH_ALL, cb=s.on_bound)
    await nc.subscribe(subjects.CANCEL_ALL, cb=s.on_cancel)
    await nc.subscribe(subjects.job_event("*", subjects.UNPLACEABLE), cb=s.on_refused)
    return s


@pytest.fixture
async def nodes(nc) -> list[str]:
    """Three live nodes of this test's own."""
    kv = await nc.jetstream().key_value(subjects.KV_NODES)
    ids = [f"cancel-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    for node_id in ids:
        info = NodeInfo(node_id=node_id, cpu_milli=1000, memory_mb=1024, heartbeat_at=time.time() + 3600)
        await kv.put(node_id, encode(info))
    return ids


@pytest.fixture
async def binder(make_cluster, nats_server, nc) -> None:
    """A binder of this test's own, on a cancel consumer with no earlier test's cancel in it.

    The tests share the module's NATS server, so the binder's durable cancel consumer too,
    and they read its counters. A cancel that no node took (refused in the race test, say)
    is handed back until the bind timeout since it was issued, well past the end of its
    test: until it is given up, it would count as this test's.
    """
    await make_cluster(("binder",), env={"JOBMESH_BIND_TIMEOUT_SECONDS": str(BIND_TIMEOUT)}, name="cancel")
    await eventually(lambda: _cancels_settled(nc), timeout=BIND_TIMEOUT + 10, what="earlier tests' cancels to settle")


def _ready(job_id: str, nodes: list[str]) -> Outgoing:
    ready = JobReady(
        job_id=job_id, attempt=1, partition=0, spec=SPEC, candidates=nodes, submitted_at=0.0, ready_at=time.time()
    )
    return Outgoing(subjects.job_event(0, subjects.READY), ready, release_id(job_id, 1, subjects.READY, 1))


def _cancelling(job_id: str) -> Outgoing:
    cancel = JobCancelling(job_id=job_id, attempt=1, partition=0, reason="by the test", at=time.time())
    return Outgoing(subjects.job_event(0, subjects.CANCELLING), cancel, event_id(job_id, 1, subjects.CANCELLING))


async def _cancels_settled(nc: NATS) -> bool:
    """Whether the binder has acked every JobCancelling (forwarded or given up)."""
    info = await nc.jetstream().consumer_info(subjects.STREAM_JOBS, subjects.durable("binder", "cancel"))
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_a_cancel_goes_to_the_node_that_holds_the_attempt(nc, seen, nodes, binder) -> None:
    job = f"bound-{uuid.uuid4().hex[:8]}"
    publisher = Publisher(nc.jetstream())
    await publisher.publish([_ready(job, nodes)])
    holder = (await eventually(lambda: _value(seen.bound.get(job)), what="the binding"))[0]

    await publisher.publish([_cancelling(job)])
    cancels = await eventually(lambda: _value(seen.cancels.get(job)), what="the AttemptCancel")
    assert cancels == [(subjects.node_cancel(holder), event_id(job, 1, "cancel"), holder)]
    await eventually(lambda: _cancels_settled(nc), what="the cancel to be acked")
    assert seen.bound[job] == [holder] and job not in seen.refused


async def test_an_attempt_cancelled_before_its_binding_is_refused_and_never_bound(nc, seen, nodes, binder) -> None:
    job = f"early-{uuid.uuid4().hex[:8]}"
    publisher = Publisher(nc.jetstream())
    started = time.monotonic()
    await publisher.publish([_cancelling(job)])
    # No node holds it: the binder looks again until the bind timeout, then remembers it.
    await eventually(lambda: _cancels_settled(nc), timeout=BIND_TIMEOUT + 10, what="the binder to give up waiting")
    assert time.monotonic() - started >= BIND_TIMEOUT * 0.9  # it did wait for a binding
    assert job not in seen.cancels

    await publisher.publish([_ready(job, nodes)])
    reasons = await eventually(lambda: _value(seen.refused.get(job)), what="the refusal")
    assert reasons == ["cancelled"]
    await eventually(lambda: _ready_settled(nc), what="the JobReady to be acked")
    assert job not in seen.bound
    assert not await _held(nc, nodes, job)


async def test_a_cancel_racing_its_binding_stops_the_attempt_either_way(nc, seen, nodes, binder) -> None:
    jobs = [f"race-{uuid.uuid4().hex[:8]}" for _ in range(20)]
    publisher = Publisher(nc.jetstream())
    # Cancels first, then the releases: each attempt is either refused, or bound and then
    # cancelled on the node it was bound to.
    await publisher.publish([_cancelling(j) for j in jobs])
    await publisher.publish([_ready(j, nodes) for j in jobs])

    async def each_answered() -> bool:
        return all(j in seen.refused or (j in seen.bound and j in seen.cancels) for j in jobs)

    await eventually(each_answered, timeout=BIND_TIMEOUT + 10, what="every attempt refused or cancelled on its node")
    for j in jobs:
        if j in seen.bound:
            node = seen.bound[j][0]
            assert seen.cancels[j][0] == (subjects.node_cancel(node), event_id(j, 1, "cancel"), node)
        else:
            assert seen.refused[j] == ["cancelled"] and j not in seen.cancels


async def test_a_release_that_arrives_while_its_cancel_waits_is_refused(nc, seen, nodes, binder) -> None:
    jobs = [f"wait-{uuid.uuid4().hex[:8]}" for _ in range(5)]
    publisher = Publisher(nc.jetstream())
    await publisher.publish([_cancelling(j) for j in jobs])

    async def all_waiting() -> bool:
        info = await nc.jetstream().consumer_info(subjects.STREAM_JOBS, subjects.durable("binder", "cancel"))
        # Handed back once (no holder) and delivered again, none acked: this binder remembers
        # them and they still wait. The counters are this test's own (the binder fixture).
        return info.num_pending == 0 and info.num_ack_pending == info.num_redelivered == len(jobs)

    await eventually(all_waiting, timeout=BIND_TIMEOUT / 2, what="the cancels to wait for their bindings")
    await publisher.publish([_ready(j, nodes) for j in jobs])

    async def all_refused() -> bool:
        return all(j in seen.refused for j in jobs)

    await eventually(all_refused, what="every attempt refused")
    await eventually(lambda: _cancels_settled(nc), timeout=BIND_TIMEOUT + 10, what="the cancels to be acked")
    assert all(seen.refused[j] == ["cancelled"] for j in jobs)
    assert not any(j in seen.bound or j in seen.cancels for j in jobs)


async def _value(value: object) -> object:
    return value


async def _ready_settled(nc: NATS) -> bool:
    info = await nc.jetstream().consumer_info(subjects.STREAM_JOBS, subjects.durable("binder", "ready"))
    return info.num_pending == 0 and info.num_ack_pending == 0


async def _held(nc: NATS, nodes: list[str], job: str) -> bool:
    """Whether any node's allocation record (read from the server) holds the job's attempt."""
    kv = await nc.jetstream().key_value(subjects.KV_ALLOC)
    for node_id in nodes:
        try:
            entry = await kv.get(node_id)
        except nats.js.errors.KeyNotFoundError:
            continue
        if f"{job}:1" in msgspec.json.decode(entry.value or b"{}", type=Allocation).reservations:
            return True
    return False
