"""Gangs through the real services: a 4-member gang on 3 fitting nodes waits and says why;
a fourth node joins and all four members start within a second of each other, each seeing
its rank, the world size and its peers; kill -9 of one member stops every member and the
gang is retried whole; a cancel stops every member; bad input is refused naming the field."""

from __future__ import annotations

import os
import re
import signal

import msgspec
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.ids import job_id_for
from jobmesh.contract.messages.v1 import (
    JobFailed,
    JobSpec,
    JobStarted,
    LifecycleEvent,
    MemberSucceeded,
    ProcessRuntime,
    Resources,
    RetryPolicy,
    Submission,
)
from jobmesh.dev.cluster import LocalCluster
from jobmesh.errors import InvalidMessage, InvalidSpec, NotFound
from tests.cluster_fixtures import Service, jobmesh_cli
from tests.helpers import eventually

pytestmark = pytest.mark.integration

FAST_NODES = {"JOBMESH_NODE_TTL_SECONDS": "3", "JOBMESH_HEARTBEAT_SECONDS": "1"}


def _node(n: int) -> Service:
    env = {"JOBMESH_NODE_ID": f"gang-{n}", "JOBMESH_NODE_CPU_MILLI": "1000", "JOBMESH_NODE_MEMORY_MB": "2048"}
    return Service("executor", env, tag=f"-gang-{n}")


# A member takes a whole node, so each of the four nodes holds one.
MEMBER = Resources(cpu_milli=1000, memory_mb=64)
_decode = msgspec.json.Decoder(LifecycleEvent).decode


@pytest.fixture(scope="module")
async def gang_cluster(make_module_cluster) -> LocalCluster:
    return await make_module_cluster(
        ("trigger", "scheduler", "binder", "tracker", _node(1), _node(2), _node(3)), env=FAST_NODES, name="gangs"
    )


@pytest.fixture
async def client(nats_server):
    cl = await Client.connect(nats_server.url)
    yield cl
    await cl.close()


class Events:
    """Every member event the executors publish, as they arrive (an ordered consumer)."""

    def __init__(self) -> None:
        self.seen: list = []

    async def start(self, client: Client) -> None:
        js = client.nc.jetstream()
        for kind in (subjects.STARTED, subjects.FAILED, subjects.MEMBER_SUCCEEDED):
            await js.subscribe(subjects.node_event("*", kind, "*"), cb=self._on, ordered_consumer=True)

    async def _on(self, msg) -> None:
        self.seen.append(_decode(msg.data))

    def of(self, job_id: str, kind: type, attempt: int | None = None) -> list:
        return [
            e
            for e in self.seen
            if isinstance(e, kind) and e.job_id == job_id and (attempt is None or e.attempt == attempt)
        ]


def _members_on_host(job_id: str) -> dict[int, int]:
    """Rank -> host pid of the processes named ``member-<job_id>-<rank>``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue  # it ended meanwhile
        for arg in args:
            m = re.fullmatch(rf"member-{job_id}-(\d+)".encode(), arg)
            if m:
                found[int(m.group(1))] = int(entry)
    return found


async def _view(client: Client, job_id: str):
    try:
        return await client.get(job_id)
    except NotFound:
        return None


async def _state(client: Client, job_id: str, state: str):
    view = await _view(client, job_id)
    return view if view is not None and view.state == state else None


async def _all_released(client: Client) -> bool:
    return all(n.reservations == 0 for n in (await client.nodes()).nodes)


async def test_a_gang_waits_for_a_fourth_node_then_its_members_start_together_seeing_their_peers(
    gang_cluster, nats_server, client
):
    events = Events()
    await events.start(client)

    async def three_nodes():
        return len([n for n in (await client.nodes()).nodes if n.alive]) == 3

    await eventually(three_nodes, timeout=30, what="the three first nodes")
    argv = ["sh", "-c", 'echo "rank=$JOBMESH_RANK world=$JOBMESH_WORLD_SIZE peers=$JOBMESH_PEERS"']
    spec = JobSpec(runtime=ProcessRuntime(argv=argv), resources=MEMBER, replicas=4, name="train")
    [job_id] = (await client.submit([Submission(spec=spec)])).job_ids

    async def waits_with_reason():
        view = await _view(client, job_id)
        return view if view is not None and "needs 4 nodes" in view.reason else None

    waiting = await eventually(waits_with_reason, timeout=30, what="the gang to wait with its reason")
    assert waiting.state in ("pending", "waiting"), waiting.state
    assert waiting.reason == "needs 4 nodes with 1000m cpu and 64 MiB; 3 fit", waiting.reason
    assert not events.of(job_id, JobStarted)  # no member started alone
    shown = jobmesh_cli(["status", job_id], nats_server.url)
    assert shown.returncode == 0 and "needs 4 nodes with 1000m cpu and 64 MiB; 3 fit" in shown.stdout, shown

    gang_cluster.start_service(_node(4).name, dict(_node(4).env), tag=_node(4).tag)
    done = await eventually(lambda: _state(client, job_id, "succeeded"), timeout=60, what="the gang to succeed")

    started = events.of(job_id, JobStarted)
    assert sorted(e.rank for e in started) == [0, 1, 2, 3]
    assert len({e.node_id for e in started}) == 4  # a node of its own each
    spread = max(e.at for e in started) - min(e.at for e in started)
    assert spread <= 1.0, f"the members started {spread:.2f}s apart"

    ended = events.of(job_id, MemberSucceeded)
    assert sorted(e.rank for e in ended) == [0, 1, 2, 3]
    lines = {e.rank: e.output_tail.strip() for e in ended}
    peers = re.fullmatch(r"rank=0 world=4 peers=(\S+)", lines[0])
    assert peers is not None, lines[0]
    addresses = peers.group(1).split(",")
    assert len(addresses) == 4 and len(set(addresses)) == 4  # one port per rank
    for rank, line in lines.items():
        assert line == f"rank={rank} world=4 peers={peers.group(1)}", line
    # The job's one success is rank 0's (its output), after every member's.
    assert done.attempts[-1].output_tail.strip() == lines[0]
    assert done.attempts[-1].finished_at >= max(e.at for e in ended) - 0.01
    members = done.attempts[-1].members
    assert [(m.rank, m.state) for m in members] == [(r, "succeeded") for r in range(4)], members
    assert {m.node_id for m in members} == {e.node_id for e in started}
    shown = jobmesh_cli(["status", job_id], nats_server.url)
    assert shown.returncode == 0, shown.stderr
    for e in started:
        assert re.search(rf"member {e.rank}\s+{e.node_id}\s+succeeded", shown.stdout), shown.stdout
    await eventually(lambda: _all_released(client), timeout=30, what="every member's room released")


async def test_kill_9_of_one_member_stops_every_member_and_retries_the_gang_whole(gang_cluster, client):
    events = Events()
    await events.start(client)

    async def three_nodes():
        return len([n for n in (await client.nodes()).nodes if n.alive]) >= 3

    await eventually(three_nodes, timeout=30, what="three live nodes")
    # Attempt 1's members wait, each under a name that says its job and rank (the host's
    # /proc shows it, whatever pid namespace the sandbox gives it); attempt 2 just ends.
    argv = [
        "sh",
        "-c",
        'if [ "$JOBMESH_ATTEMPT" = 1 ]; then exec sh -c "sleep 300" "member-$JOBMESH_JOB_ID-$JOBMESH_RANK"; fi;'
        " echo second-done",
    ]
    spec = JobSpec(
        runtime=ProcessRuntime(argv=argv), resources=MEMBER, replicas=3, retry=RetryPolicy(max_attempts=2, backoff=0.1)
    )
    [job_id] = (await client.submit([Submission(spec=spec)])).job_ids

    async def members():
        found = _members_on_host(job_id)
        return found if len(found) == 3 else None

    by_rank = await eventually(members, timeout=60, what="every member of attempt 1 to run")
    os.kill(by_rank[1], signal.SIGKILL)

    done = await eventually(lambda: _state(client, job_id, "succeeded"), timeout=90, what="the retried gang")
    first = next(a for a in done.attempts if a.attempt == 1)
    assert first.state == "failed", first
    failed = events.of(job_id, JobFailed, attempt=1)
    killed = [e for e in failed if e.rank == 1]
    assert killed and killed[0].error.code != "cancelled", killed
    # The other two members were stopped for it, naming the member that failed.
    stopped = sorted(e.rank for e in failed if e.rank != 1)
    assert stopped == [0, 2], failed
    assert all("gang: member 1" in e.error.message for e in failed if e.rank != 1), failed
    assert _members_on_host(job_id) == {}  # every member of attempt 1 is gone
    # The second attempt ran every member again.
    assert sorted(e.rank for e in events.of(job_id, JobStarted, attempt=2)) == [0, 1, 2]
    assert sorted(e.rank for e in events.of(job_id, MemberSucceeded, attempt=2)) == [0, 1, 2]
    await eventually(lambda: _all_released(client), timeout=30, what="every member's room released")


async def test_a_cancel_stops_every_member_of_a_running_gang(gang_cluster, client):
    events = Events()
    await events.start(client)
    spec = JobSpec(runtime=ProcessRuntime(argv=["sh", "-c", "exec sleep 300"]), resources=MEMBER, replicas=2)
    [job_id] = (await client.submit([Submission(spec=spec)])).job_ids

    async def both_running():
        return len(events.of(job_id, JobStarted)) == 2

    await eventually(both_running, timeout=60, what="both members to run")
    await client.cancel(job_id, reason="enough")
    await eventually(lambda: _state(client, job_id, "cancelled"), timeout=60, what="the gang cancelled")

    async def both_stopped():
        return sorted(e.rank for e in events.of(job_id, JobFailed)) == [0, 1]

    await eventually(both_stopped, timeout=30, what="both members stopped")
    await eventually(lambda: _all_released(client), timeout=30, what="every member's room released")


@pytest.mark.parametrize(
    ("gang", "field", "words"),
    [
        ({"replicas": 5000}, "jobs[0].spec.replicas", "Expected `int` <= 1024 - at `$.jobs[0].spec.replicas`"),
        ({"replicas": 3, "same": "rack"}, "jobs[0].spec.same", "'rack' is no node attribute"),
    ],
)
async def test_a_bad_gang_is_refused_naming_the_field(gang_cluster, client, gang, field, words):
    key = f"bad-gang-{field}"
    spec = JobSpec(runtime=ProcessRuntime(argv=["true"]), resources=MEMBER, **gang)
    # A value out of the schema's range is refused as it is decoded, the rest by validation.
    with pytest.raises((InvalidMessage, InvalidSpec)) as refused:
        await client.submit([Submission(spec=spec, idempotency_key=key)])
    assert refused.value.field == field, refused.value
    assert words in str(refused.value) and field in str(refused.value), refused.value
    assert await _view(client, job_id_for(key)) is None  # nothing was created
