"""Least privilege on NATS: a real nats-server enforces each identity's allow lists.

The server runs with the authorization block rendered from ``contract.permissions`` and one
nkey per identity. For every identity, every subject of a catalogue of jobmesh's subjects
(lifecycle events, dispatch and cancel subjects, APIs, KV and object writes, the JetStream
API calls that create, change or delete streams and durables, other identities' inboxes)
is published or subscribed once; the server's refusals must be exactly the subjects the
model does not grant. Then the grants are shown to work for real (PubAcks, fetches, KV
reads and writes, request and reply across identities).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest

from jobmesh.contract import permissions as perms
from jobmesh.contract import streams, subjects
from jobmesh.contract.permissions import Permissions
from jobmesh.dev.servers import free_port, nats_server_binary, wait_for_port
from jobmesh.runtime import natsauth
from jobmesh.runtime.commands import identities as issued_identities
from jobmesh.runtime.provisioning import consumer_config, ensure_consumer, provision
from tests.helpers import eventually

pytestmark = pytest.mark.integration

PARTITIONS = 2
NODES = ("node-a", "node-b")
# JM_JOBS durables the probes name (the filters only need to be valid).
JOB_DURABLES = (
    *(subjects.durable("scheduler", f"p{n}") for n in range(PARTITIONS)),
    subjects.durable("binder", "ready"),
    subjects.durable("binder", "release"),
    subjects.durable("binder", "cancel"),
    subjects.durable("tracker", "jobs"),
    subjects.durable("trigger", "completions"),
)
DISPATCH_DURABLES = (subjects.durable("tracker", "dispatch"), *(subjects.durable("executor", n) for n in NODES))
# Subscribed to last: no identity may, so its refusal marks the end of a probe's refusals.
END = f"{subjects.PREFIX}.probe.end"
DESTRUCTIVE = re.compile(r"^\$JS\.API\.(STREAM\.(CREATE|UPDATE|DELETE|PURGE)|CONSUMER\.(DELETE|DURABLE\.CREATE))")


def identities() -> dict[str, Permissions]:
    # The set `jobmesh auth issue` writes into the server's authorization block.
    return issued_identities(list(NODES), PARTITIONS)


def publish_catalogue() -> list[str]:
    """Concrete subjects of everything jobmesh publishes, plus the JetStream API's."""
    out = [subjects.job_event(0, kind) for kind in _kinds()]
    out += [subjects.node_event(0, kind, node) for kind in subjects.EXECUTOR_KINDS for node in NODES]
    for node in NODES:
        out += [subjects.node_dispatch(node), subjects.node_cancel(node), f"$KV.{subjects.KV_NODES}.{node}"]
    out += [subjects.job_log("job1"), f"{subjects.PREFIX}.events.orders.created", subjects.job_watch("job1")]
    out += [subjects.deadletter(service) for service in subjects.SERVICES]
    out += [subjects.health(service) for service in subjects.SERVICES]
    out += [getattr(subjects, name) for name in dir(subjects) if name.startswith("API_")]
    out += [subjects.scheduler_explain(0), subjects.scheduler_cancel(0)]
    out += [f"$KV.{bucket.name}.somekey" for bucket in streams.BUCKETS]
    out += [f"$O.{store.name}.C.chunk" for store in streams.OBJECT_STORES]
    api = "$JS.API"
    for spec in streams.STREAMS:
        name = spec.name
        out += [f"{api}.STREAM.{verb}.{name}" for verb in ("CREATE", "UPDATE", "DELETE", "PURGE", "INFO")]
        out += [f"{api}.CONSUMER.CREATE.{name}", f"{api}.CONSUMER.DURABLE.CREATE.{name}.intruder"]
    for stream, durables in ((subjects.STREAM_JOBS, JOB_DURABLES), (subjects.STREAM_DISPATCH, DISPATCH_DURABLES)):
        for durable in durables:
            out += [
                f"{api}.CONSUMER.MSG.NEXT.{stream}.{durable}",
                f"{api}.CONSUMER.INFO.{stream}.{durable}",
                f"{api}.CONSUMER.DELETE.{stream}.{durable}",
                f"{api}.CONSUMER.CREATE.{stream}.{durable}",
                f"$JS.ACK.{stream}.{durable}.1.1.1.1.1",
            ]
    out += [f"{perms.inbox_of(identity)}.probe" for identity in identities()]
    return sorted(set(out))


def subscribe_catalogue() -> list[str]:
    out = [f"{perms.inbox_of(identity)}.>" for identity in identities()]
    out += [subjects.JOBS_ALL, subjects.DISPATCH_ALL, subjects.API_SUBMIT, subjects.API_JOB_GET]
    out += [subjects.health(service) for service in subjects.SERVICES]
    out += [subjects.job_watch("job1"), subjects.EVENTS_ALL]
    return sorted(set(out))


def _kinds() -> list[str]:
    return [value for name, value in vars(subjects).items() if name.isupper() and name in _KIND_NAMES]


_KIND_NAMES = {
    "SUBMITTED", "READY", "UNPLACEABLE", "WAITING", "BOUND", "STARTED", "SUCCEEDED", "FAILED", "EXPIRED",
    "LOST", "RETRYING", "GAVE_UP", "CANCELLING", "CANCELLED", "DEP_WATCH", "DEP_ENDED", "CHILD_ADDED",
    "MEMBER_SUCCEEDED",
}  # fmt: skip


class AuthServer:
    """A nats-server with JetStream whose only users are jobmesh's identities."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.seeds = {identity: natsauth.new_seed() for identity in identities()}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> AuthServer:
        users = {natsauth.public_key(self.seeds[identity]): p for identity, p in identities().items()}
        for identity, seed in self.seeds.items():
            natsauth.write_seed(self.root / f"{identity}.nk", seed)
        config = self.root / "nats.conf"
        config.write_text(
            f"host: 127.0.0.1\nport: {self.port}\n"
            f'jetstream {{\n  store_dir: "{self.root / "js"}"\n  max_file_store: 32GB\n}}\n'
            + natsauth.authorization_block(users)
        )
        log = self.root / "nats.log"
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(config), "-l", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_port("127.0.0.1", self.port, 15, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    async def connect(self, identity: str, errors: list[str] | None = None) -> nats.NATS:
        async def on_error(exc: Exception) -> None:
            if errors is not None:
                errors.append(str(exc))

        return await nats.connect(
            self.url,
            nkeys_seed=str(self.root / f"{identity}.nk"),
            inbox_prefix=identities()[identity].inbox,
            error_cb=on_error,
            allow_reconnect=False,
        )


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[AuthServer]:
    running = AuthServer(tmp_path_factory.mktemp("nats-auth")).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
async def provisioned(server: AuthServer) -> AuthServer:
    """Streams, buckets and the probed durables, made by the provisioner identity."""
    nc = await server.connect("provisioner")
    try:
        js = nc.jetstream()
        await provision(js)
        for durable in JOB_DURABLES:
            await ensure_consumer(
                js,
                subjects.STREAM_JOBS,
                consumer_config(durable, [subjects.JOBS_ALL], ack_wait=10, max_ack_pending=100),
            )
        for durable in DISPATCH_DURABLES:
            await ensure_consumer(
                js,
                subjects.STREAM_DISPATCH,
                consumer_config(durable, [subjects.DISPATCH_ALL], ack_wait=10, max_ack_pending=100),
            )
    finally:
        await nc.close()
    return server


async def _all_refusals_in(nc: nats.NATS, errors: list[str]) -> None:
    """Wait until the server has reported every refusal so far.

    The server may send its PONG before the -ERR lines of the operations that came before
    the PING, so a flush proves nothing. Its refusals do keep their order, so a last
    subscription no identity may make, once refused, comes after all of them.
    """
    await nc.subscribe(END)
    await eventually(lambda: _ready(END.lower() in _refused(errors, "subscription")), timeout=10, what="the refusals")


async def _ready(value: bool) -> bool:
    return value


def _refused(errors: list[str], verb: str) -> set[str]:
    """The subjects the server refused, lower-cased: nats-py lower-cases the server's error."""
    found = set()
    for text in errors:
        match = re.search(rf'permissions violation for {verb} to "([^"]+)"', text, re.IGNORECASE)
        if match:
            found.add(match.group(1))
    return found


@pytest.mark.parametrize("identity", sorted(set(identities()) - {"provisioner"}))
async def test_the_server_refuses_exactly_what_the_identity_is_not_granted(provisioned: AuthServer, identity: str):
    grants = identities()[identity]
    errors: list[str] = []
    nc = await provisioned.connect(identity, errors)
    try:
        probes = [s for s in publish_catalogue() if not (DESTRUCTIVE.match(s) and perms.allows(grants.publish, s))]
        for subject in probes:
            await nc.publish(subject, b"{}")
        for subject in subscribe_catalogue():
            await nc.subscribe(subject)
        await _all_refusals_in(nc, errors)
    finally:
        await nc.close()
    expected_pub = {s for s in probes if not perms.allows(grants.publish, s)}
    expected_sub = {s for s in subscribe_catalogue() if not perms.allows(grants.subscribe, s)} | {END}
    assert _refused(errors, "publish") == {s.lower() for s in expected_pub}
    assert _refused(errors, "subscription") == {s.lower() for s in expected_sub}
    # What no identity but the provisioner may do, whatever else it is granted.
    for subject in (
        f"$JS.API.STREAM.DELETE.{subjects.STREAM_JOBS}",
        f"$JS.API.STREAM.UPDATE.{subjects.STREAM_JOBS}",
        f"$JS.API.CONSUMER.DELETE.{subjects.STREAM_JOBS}.{subjects.durable('scheduler', 'p0')}",
        f"$JS.API.CONSUMER.CREATE.{subjects.STREAM_JOBS}.{subjects.durable('tracker', 'jobs')}",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.STREAM_JOBS}.intruder",
    ):
        assert subject in expected_pub, f"{identity} may publish {subject}"


def test_each_service_publishes_only_the_event_kinds_it_produces():
    own = {
        "trigger": {subjects.SUBMITTED, subjects.CHILD_ADDED},
        "binder": {subjects.BOUND, subjects.UNPLACEABLE},
        "tracker": set(),
        "executor-node-a": set(),  # it reports on its own node's subjects only (below)
        "client": set(),
        "integrator": set(),
    }
    granted = identities()
    for identity, kinds in own.items():
        allowed = {kind for kind in _kinds() if perms.allows(granted[identity].publish, subjects.job_event(0, kind))}
        assert allowed == kinds, identity
    # An executor reports on its own node's subjects, every kind it sends and no other.
    for node, other in (("node-a", "node-b"), ("node-b", "node-a")):
        grants = granted[perms.executor_identity(node)].publish
        assert {k for k in _kinds() if perms.allows(grants, subjects.node_event(3, k, node))} == set(
            subjects.EXECUTOR_KINDS
        )
        assert not any(perms.allows(grants, subjects.node_event(3, k, other)) for k in _kinds())
        # Nor may another service pose as a node.
        assert not perms.allows(granted["binder"].publish, subjects.node_event(3, subjects.SUCCEEDED, node))
    # The executor of one node neither reads another's dispatch nor writes its record.
    node_a = granted["executor-node-a"].publish
    assert not perms.allows(node_a, f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STREAM_DISPATCH}.executor-node-b")
    assert not perms.allows(node_a, f"$KV.{subjects.KV_NODES}.node-b")
    assert perms.allows(node_a, f"$KV.{subjects.KV_NODES}.node-a")


def test_an_edge_executor_gets_each_jetstream_grant_in_the_hub_domain_form_and_nothing_more():
    # An edge server maps its clients' $JS.API.> and $KV.> onto the hub's domain before it
    # checks their permissions (tests/test_leafnode.py runs an executor there).
    plain = perms.executor("node-a")
    edge = perms.executor("node-a", domain="hub")
    assert edge.subscribe == plain.subscribe and edge.inbox == plain.inbox and edge.responds
    assert edge.publish[: len(plain.publish)] == plain.publish  # every plain grant stays
    added = edge.publish[len(plain.publish) :]
    expected = [p.replace("$JS.API.", "$JS.hub.API.", 1) for p in plain.publish if p.startswith("$JS.API.")]
    expected += [f"$JS.hub.API.{p}" for p in plain.publish if p.startswith("$KV.")]
    assert sorted(added) == sorted(expected)
    for pattern in added:  # each is a plain grant addressed through the domain
        unprefixed = pattern.removeprefix("$JS.hub.API.")
        assert unprefixed in plain.publish or f"$JS.API.{unprefixed}" in plain.publish, pattern
    domain_next = f"$JS.hub.API.CONSUMER.MSG.NEXT.{subjects.STREAM_DISPATCH}"
    assert perms.allows(edge.publish, f"{domain_next}.executor-node-a")
    assert not perms.allows(edge.publish, f"{domain_next}.executor-node-b")
    assert perms.allows(edge.publish, f"$JS.hub.API.$KV.{subjects.KV_NODES}.node-a")
    assert not perms.allows(edge.publish, f"$JS.hub.API.$KV.{subjects.KV_NODES}.node-b")
    assert not perms.allows(edge.publish, "$JS.hub.API.STREAM.DELETE.JM_DISPATCH")
    for bad in ("*", ">", "a.b", ""):
        with pytest.raises(ValueError):
            perms.executor("node-a", domain=bad)


async def test_granted_operations_work_against_the_server(provisioned: AuthServer):
    # The binder publishes a Bound event and gets its PubAck in its own inbox.
    binder = await provisioned.connect("binder")
    executor_a = await provisioned.connect("executor-node-a")
    executor_b_errors: list[str] = []
    executor_b = await provisioned.connect("executor-node-b", executor_b_errors)
    try:
        ack = await binder.jetstream().publish(subjects.job_event(0, subjects.BOUND), b"{}")
        assert ack.stream == subjects.STREAM_JOBS
        await binder.jetstream().publish(subjects.node_dispatch("node-a"), b"{}")
        # The binder's own durable hands it messages; it reads and writes its allocations.
        sub = await binder.jetstream().pull_subscribe_bind(subjects.durable("binder", "ready"), subjects.STREAM_JOBS)
        got = await sub.fetch(1, timeout=5)
        await got[0].ack()
        alloc = await binder.jetstream().key_value(subjects.KV_ALLOC)
        await alloc.put("node-a", b"{}")
        assert (await alloc.get("node-a")).value == b"{}"
        # Node a's executor reads its own dispatch durable, writes its own record.
        own = await executor_a.jetstream().pull_subscribe_bind(
            subjects.durable("executor", "node-a"), subjects.STREAM_DISPATCH
        )
        assert len(await own.fetch(1, timeout=5)) == 1
        nodes = await executor_a.jetstream().key_value(subjects.KV_NODES)
        await nodes.put("node-a", b"{}")
        # Node b's executor cannot fetch from node a's durable: the server refuses the pull.
        other = await executor_b.jetstream().pull_subscribe_bind(
            subjects.durable("executor", "node-a"), subjects.STREAM_DISPATCH
        )
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
            await other.fetch(1, timeout=1)
        await _all_refusals_in(executor_b, executor_b_errors)
        assert _refused(executor_b_errors, "publish") >= {
            f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STREAM_DISPATCH}.executor-node-a".lower()
        }
    finally:
        for nc in (binder, executor_a, executor_b):
            await nc.close()


async def test_a_client_request_is_answered_by_the_service_identity(provisioned: AuthServer):
    tracker = await provisioned.connect("tracker")
    client = await provisioned.connect("client")
    integrator = await provisioned.connect("integrator")
    try:

        async def answer(msg) -> None:
            await msg.respond(b'{"type": "job.view"}')

        await tracker.subscribe(subjects.API_JOB_GET, queue="tracker", cb=answer)
        await tracker.flush()
        reply = await client.request(subjects.API_JOB_GET, b"{}", timeout=5)
        assert reply.data == b'{"type": "job.view"}'
        assert reply.subject.startswith(perms.inbox_of("client") + ".")
        # An integrator publishes trigger events into JM_EVENTS.
        ack = await integrator.jetstream().publish(f"{subjects.PREFIX}.events.orders.created", b"{}")
        assert ack.stream == subjects.STREAM_EVENTS
        # ... and follows job events with an ephemeral consumer of its own.
        follow = await integrator.jetstream().subscribe(
            subjects.JOBS_ALL, stream=subjects.STREAM_JOBS, ordered_consumer=True
        )
        first = await follow.next_msg(timeout=5)
        assert first.subject.startswith(f"{subjects.PREFIX}.job.")
        await follow.unsubscribe()
    finally:
        for nc in (tracker, client, integrator):
            await nc.close()


async def test_an_identity_cannot_take_over_a_durable_through_the_ephemeral_create(provisioned: AuthServer):
    # The integrator may create ephemeral consumers on JM_JOBS; a request naming a durable
    # there must not create or change one.
    integrator = await provisioned.connect("integrator")
    admin = await provisioned.connect("provisioner")
    try:
        request = (
            '{"stream_name": "JM_JOBS", "config": {"durable_name": "tracker-jobs", "ack_policy": "none",'
            ' "filter_subject": "jobmesh.v1.job.0.submitted"}}'
        )
        reply = await integrator.request(f"$JS.API.CONSUMER.CREATE.{subjects.STREAM_JOBS}", request.encode(), timeout=5)
        assert b'"error"' in reply.data, reply.data
        info = await admin.jetstream().consumer_info(subjects.STREAM_JOBS, subjects.durable("tracker", "jobs"))
        assert info.config.filter_subject == subjects.JOBS_ALL
        assert str(info.config.ack_policy) in ("explicit", "AckPolicy.EXPLICIT")
    finally:
        await integrator.close()
        await admin.close()


async def test_a_wrong_key_is_refused_at_connect(server: AuthServer, tmp_path):
    stranger = tmp_path / "stranger.nk"
    natsauth.write_seed(stranger, natsauth.new_seed())
    assert stranger.stat().st_mode & 0o777 == 0o600
    with pytest.raises((nats.errors.Error, asyncio.TimeoutError, OSError)):
        await nats.connect(server.url, nkeys_seed=str(stranger), allow_reconnect=False, max_reconnect_attempts=0)


async def test_the_provisioner_alone_creates_and_deletes_streams(provisioned: AuthServer):
    from nats.js.api import StreamConfig

    admin = await provisioned.connect("provisioner")
    binder_errors: list[str] = []
    binder = await provisioned.connect("binder", binder_errors)
    try:
        js = admin.jetstream()
        await js.add_stream(StreamConfig(name="SCRATCH", subjects=["scratch.>"]))
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
            await binder.jetstream(timeout=1).delete_stream("SCRATCH")
        await _all_refusals_in(binder, binder_errors)
        assert "$js.api.stream.delete.scratch" in _refused(binder_errors, "publish")
        assert (await js.stream_info("SCRATCH")).config.name == "SCRATCH"
        assert await js.delete_stream("SCRATCH")
    finally:
        await admin.close()
        await binder.close()
