"""Scheduling through the real services: visible waits, placement when a fitting node
joins, fair share between tenants, node and queue views, and rejected specs."""

from __future__ import annotations

import json
import time

import msgspec
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import (
    Constraints,
    JobSpec,
    NoopRuntime,
    ProcessRuntime,
    QueueConfig,
    Resources,
    Submission,
    SubmitReply,
    TenantConfig,
)
from jobmesh.dev.cluster import LocalCluster
from jobmesh.errors import InvalidMessage, InvalidSpec, NotFound
from jobmesh.runtime.clusterconfig import put_config
from tests.cluster_fixtures import Service, job_status, jobmesh_cli, submitted_job_id
from tests.helpers import eventually

pytestmark = pytest.mark.integration

FAST_NODES = {"JOBMESH_NODE_TTL_SECONDS": "3", "JOBMESH_HEARTBEAT_SECONDS": "1"}


CPU_NODE = Service(
    "executor", {"JOBMESH_NODE_ID": "cpu-1", "JOBMESH_NODE_CPU_MILLI": "64000", "JOBMESH_NODE_ZONE": "eu"}, tag="-cpu"
)


@pytest.fixture(scope="module")
async def sched_cluster(make_module_cluster) -> LocalCluster:
    """Every service but the executor, plus one CPU node; more nodes join in the tests."""
    services = ("trigger", "scheduler", "binder", "tracker", CPU_NODE)
    return await make_module_cluster(services, env=FAST_NODES, name="sched")


@pytest.fixture
async def client(nats_server):
    cl = await Client.connect(nats_server.url)
    yield cl
    await cl.close()


async def _state(client: Client, job_id: str) -> str:
    try:
        return (await client.get(job_id)).state
    except NotFound:
        return ""


async def test_unplaceable_job_waits_with_reason_and_runs_when_a_fitting_node_joins(sched_cluster, nats_server, client):
    spec = JobSpec(
        runtime=ProcessRuntime(argv=["sh", "-c", "echo on-gpu"]), resources=Resources(gpu=1, gpu_kind="h100")
    )
    [job_id] = (await client.submit([Submission(spec=spec)])).job_ids

    async def waiting_with_reason():
        status = job_status(job_id, nats_server.url) if await _state(client, job_id) else {}
        return status if status.get("state") == "waiting" else None

    status = await eventually(waiting_with_reason, what="the job to wait with a reason")
    assert status["reason"] == "no node with gpu kind h100"

    gpu = sched_cluster.start_service(
        "executor", {"JOBMESH_NODE_ID": "gpu-1", "JOBMESH_NODE_GPU": "1", "JOBMESH_NODE_GPU_KIND": "h100"}, tag="-gpu"
    )
    await eventually(lambda: _is(client, job_id, "succeeded"), timeout=30, what="the job to run on the new node")
    assert (await client.get(job_id)).node_id == "gpu-1"

    nodes = json.loads(jobmesh_cli(["nodes", "--json"], nats_server.url).stdout)
    by_id = {n["node"]["node_id"]: n for n in nodes}
    assert by_id["gpu-1"]["alive"] and by_id["gpu-1"]["node"]["gpu_kind"] == "h100"
    assert by_id["cpu-1"]["node"]["cpu_milli"] == 64000

    # A node that stops heartbeating leaves the candidate set: jobs wait again.
    gpu.proc.kill()
    gpu.proc.wait(10)
    sched_cluster.procs.remove(gpu)

    async def gpu_gone():
        nodes = json.loads(jobmesh_cli(["nodes", "--json"], nats_server.url).stdout)
        return not any(n["alive"] for n in nodes if n["node"]["node_id"] == "gpu-1")

    await eventually(gpu_gone, timeout=15, what="the silent node to leave the candidate set")
    [again] = (await client.submit([Submission(spec=spec)])).job_ids

    async def parked_again():
        status = await _waiting(nats_url=nats_server.url, client=client, job_id=again)
        # The binder may see the node gone a beat before the scheduler does and hand the
        # job back ("candidate nodes are gone"); it then settles on the real reason.
        return status if status and status["reason"] == "no node with gpu kind h100" else None

    await eventually(parked_again, timeout=15, what="the second gpu job to wait for a gpu node")


async def _is(client: Client, job_id: str, state: str) -> bool:
    return await _state(client, job_id) == state


async def _waiting(nats_url: str, client: Client, job_id: str):
    if not await _state(client, job_id):
        return None
    status = job_status(job_id, nats_url)
    return status if status["state"] == "waiting" else None


async def test_status_names_every_kind_of_wait(sched_cluster, nats_server, client):
    js = client.nc.jetstream()
    await put_config(js, "queue.slow", QueueConfig(rate=0.01, burst=1))
    sleeper = ProcessRuntime(argv=["sleep", "30"])
    jobs = await client.submit(
        [
            Submission(spec=JobSpec(runtime=NoopRuntime(), queue="slow")),  # takes the one token
            Submission(spec=JobSpec(runtime=NoopRuntime(), queue="slow")),  # rate limit
            Submission(
                spec=JobSpec(
                    runtime=sleeper, queue="keys", concurrency_key="db", concurrency_limit=1, timeouts={"run": 60.0}
                )
            ),
            Submission(spec=JobSpec(runtime=NoopRuntime(), queue="keys", concurrency_key="db", concurrency_limit=1)),
            Submission(spec=JobSpec(runtime=NoopRuntime(), not_before=time.time() + 3600)),
            Submission(spec=JobSpec(runtime=sleeper, queue="seq", group="g1", timeouts={"run": 60.0})),
            Submission(spec=JobSpec(runtime=NoopRuntime(), queue="seq", group="g1")),
        ]
    )
    ids = jobs.job_ids
    expected = {
        ids[1]: "rate limit",
        ids[3]: "concurrency key db at its limit of 1",
        ids[4]: "not before",
        ids[6]: "sequential group g1",
    }
    for job_id, words in expected.items():
        status = await eventually(lambda j=job_id: _waiting(nats_server.url, client, j), what=f"{words} wait")
        assert words in status["reason"], status
    assert "rate limit" in jobmesh_cli(["status", ids[1]], nats_server.url).stdout

    queues = json.loads(jobmesh_cli(["queues", "--json"], nats_server.url).stdout)
    slow = next(q for q in queues if q["queue"] == "slow")
    assert slow["pending"] == 1 and slow["rate"] == 0.01


async def test_fair_share_between_a_flooding_tenant_and_a_small_one(sched_cluster, nats_server, client):
    js = client.nc.jetstream()
    await put_config(js, "queue.shared", QueueConfig(max_in_flight=2))
    await put_config(js, "tenant.light", TenantConfig(weight=1.0))
    order: list[str] = []

    async def on_ready(msg) -> None:
        body = msgspec.json.decode(msg.data)
        if body["spec"].get("queue") == "shared":
            order.append(body["spec"]["tenant"])

    await client.nc.subscribe(subjects.job_event("*", subjects.READY), cb=on_ready)
    # The sleep keeps both tenants backlogged while slots free up one by one.
    slow = ProcessRuntime(argv=["sleep", "0.05"])
    heavy = [Submission(spec=JobSpec(runtime=slow, queue="shared", tenant="heavy")) for _ in range(100)]
    light = [Submission(spec=JobSpec(runtime=slow, queue="shared", tenant="light")) for _ in range(10)]
    await client.submit(heavy)
    await client.submit(light)

    async def enough():
        return len(order) >= 24

    await eventually(enough, timeout=60, what="24 releases from the shared queue")
    window = order[4:24]  # once both tenants are queued, starts alternate
    assert window.count("light") >= 8, order[:24]


async def test_bad_specs_are_rejected_naming_the_field_and_nothing_is_created(sched_cluster, nats_server, client):
    cases = [
        ({"spec": {"runtime": {"kind": "noop"}, "priority": -1}}, "jobs[0].spec.priority"),
        # Retry policies: negative and absurd values, an unknown code, an invalid fallback.
        ({"spec": {"runtime": {"kind": "noop"}, "retry": {"max_attempts": -1}}}, "jobs[0].spec.retry.max_attempts"),
        ({"spec": {"runtime": {"kind": "noop"}, "retry": {"max_attempts": 5000}}}, "jobs[0].spec.retry.max_attempts"),
        ({"spec": {"runtime": {"kind": "noop"}, "retry": {"backoff": -2}}}, "jobs[0].spec.retry.backoff"),
        (
            {"spec": {"runtime": {"kind": "noop"}, "retry": {"max_attempts": 3, "retry_on": ["exit_code", "typo"]}}},
            "jobs[0].spec.retry.retry_on[1]",
        ),
        (
            {
                "spec": {
                    "runtime": {"kind": "noop"},
                    "retry": {"fallback": {"runtime": {"kind": "process", "argv": [" "]}}},
                }
            },
            "jobs[0].spec.retry.fallback.runtime.argv[0]",
        ),
        (
            {"spec": {"runtime": {"kind": "noop"}, "retry": {"fallback": {"runtime": {"kind": "noop"}, "retry": {}}}}},
            "jobs[0].spec.retry.fallback.retry",
        ),
        ({"spec": {"runtime": {"kind": "noop"}, "timeouts": {"heartbeat": 0}}}, "jobs[0].spec.timeouts.heartbeat"),
        ({"spec": {"runtime": {"kind": "noop"}, "queue_options": {"rate": 5}}}, "jobs[0].spec.queue_options"),
        (
            {"spec": {"runtime": {"kind": "noop"}, "resources": {"cpu_milli": 10**12}}},
            "jobs[0].spec.resources.cpu_milli",
        ),
        (
            {"spec": {"runtime": {"kind": "noop"}, "constraints": {"labels": ["gpu"]}}},
            "jobs[0].spec.constraints.labels",
        ),
        (
            {"spec": {"runtime": {"kind": "noop"}, "constraints": {"isolation": "chroot"}}},
            "jobs[0].spec.constraints.isolation",
        ),
        ({"spec": {"runtime": {"kind": "noop"}, "resources": {"gpu_kind": "h100"}}}, "jobs[0].spec.resources.gpu"),
        ({"spec": {"runtime": {"kind": "noop"}, "metadata": {"owner": "a\u0000b"}}}, "jobs[0].spec.metadata.owner"),
    ]
    js = client.nc.jetstream()

    async def submitted_count() -> int:
        info = await js.stream_info(subjects.STREAM_JOBS, subjects_filter=subjects.job_event("*", subjects.SUBMITTED))
        return sum((info.state.subjects or {}).values())

    before = await submitted_count()
    for body, field in cases:
        with pytest.raises((InvalidMessage, InvalidSpec)) as caught:
            await client.request(subjects.API_SUBMIT, {"type": "api.submit", "jobs": [body]}, SubmitReply, "trigger")
        assert caught.value.field == field, (body, str(caught.value))
    # A request with one bad job among good ones is refused whole.
    with pytest.raises(InvalidSpec):
        await client.submit(
            [
                Submission(spec=JobSpec(runtime=NoopRuntime())),
                Submission(spec=JobSpec(runtime=NoopRuntime(), constraints=Constraints(labels={"a=b": "c"}))),
            ]
        )
    assert await submitted_count() == before, "a rejected submit published a job"


async def test_queue_timeout_expires_a_job_that_never_started(sched_cluster, nats_server):
    result = jobmesh_cli(
        ["run", "--queue-timeout", "1", "--gpu", "1", "--gpu-kind", "tpu-v9", "--", "true"], nats_server.url
    )
    assert result.returncode == 3, result.stderr
    assert "expired" in result.stderr
    status = job_status(submitted_job_id(result.stderr), nats_server.url)
    assert status["state"] == "expired"
    assert "queue timeout of 1s" in status["reason"] and "no node with gpu kind tpu-v9" in status["reason"]
    assert "started" not in [e["kind"] for e in status["events"]], status["events"]


async def test_an_attempt_on_a_node_that_dies_ends_lost_and_frees_everything(sched_cluster, nats_server, client):
    js = client.nc.jetstream()
    await put_config(js, "queue.fragile", QueueConfig(max_in_flight=1))
    node = sched_cluster.start_service(
        "executor", {"JOBMESH_NODE_ID": "doomed-1", "JOBMESH_NODE_LABELS": "pool=doomed"}, tag="-doomed"
    )
    spec = JobSpec(
        runtime=ProcessRuntime(argv=["sleep", "60"]),
        queue="fragile",
        constraints=Constraints(labels={"pool": "doomed"}),
        timeouts={"run": 120.0},
    )
    [job_id] = (await client.submit([Submission(spec=spec)])).job_ids
    await eventually(lambda: _is(client, job_id, "running"), timeout=30, what="the job to run on doomed-1")
    node.proc.kill()  # the node dies with the attempt on it
    node.proc.wait(10)
    sched_cluster.procs.remove(node)

    await eventually(lambda: _is(client, job_id, "lost"), timeout=30, what="the attempt to be declared lost")
    view = await client.get(job_id)
    assert view.attempts[-1].state == "lost" and view.node_id == "doomed-1"

    async def freed():
        nodes = json.loads(jobmesh_cli(["nodes", "--json"], nats_server.url).stdout)
        doomed = [n for n in nodes if n["node"]["node_id"] == "doomed-1"]
        queues = json.loads(jobmesh_cli(["queues", "--json"], nats_server.url).stdout)
        fragile = [q for q in queues if q["queue"] == "fragile"]
        return all(n["reservations"] == 0 for n in doomed) and fragile and fragile[0]["in_flight"] == 0

    await eventually(freed, timeout=30, what="the reservation and the queue slot to be freed")
