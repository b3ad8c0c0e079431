"""Preemption through the real services: a priority-9 job on a full node stops the
lowest-priority job, which gets its SIGTERM and grace, is requeued with its attempt counted
``preempted`` (not failed: it had no retries to spend), and later completes; a job that
asks to preempt on a queue that does not allow it is refused naming the field."""

from __future__ import annotations

import pytest

from jobmesh.client.client import Client
from jobmesh.contract.ids import job_id_for
from jobmesh.contract.messages.v1 import JobSpec, ProcessRuntime, QueueConfig, Resources, Submission
from jobmesh.dev.cluster import LocalCluster
from jobmesh.errors import InvalidSpec, NotFound
from jobmesh.runtime.clusterconfig import put_config
from tests.cluster_fixtures import Service, jobmesh_cli
from tests.helpers import eventually

pytestmark = pytest.mark.integration

# One node with room for one of the jobs below at a time.
NODE = Service(
    "executor",
    {"JOBMESH_NODE_ID": "full-1", "JOBMESH_NODE_CPU_MILLI": "2000", "JOBMESH_NODE_MEMORY_MB": "4096"},
    tag="-full",
)
FAST_NODES = {"JOBMESH_NODE_TTL_SECONDS": "3", "JOBMESH_HEARTBEAT_SECONDS": "1"}
WHOLE_NODE = Resources(cpu_milli=2000, memory_mb=64)
# The first attempt runs until it is stopped, says it got the SIGTERM and exits within its
# grace; a later attempt finishes at once.
VICTIM = ProcessRuntime(
    argv=[
        "sh",
        "-c",
        'if [ "$JOBMESH_ATTEMPT" = 1 ]; then trap "echo got-sigterm; exit 0" TERM; echo trap-set;'
        " sleep 300 & wait $!; fi; echo victim-done",
    ]
)


@pytest.fixture(scope="module")
async def preempt_cluster(make_module_cluster, nats_server) -> LocalCluster:
    cluster = await make_module_cluster(
        ("trigger", "scheduler", "binder", "tracker", NODE), env=FAST_NODES, name="preempt"
    )
    client = await Client.connect(nats_server.url)
    try:
        await put_config(client.nc.jetstream(), "queue.urgent", QueueConfig(preempt_min_priority=8))
    finally:
        await client.close()
    return cluster


@pytest.fixture
async def client(nats_server):
    cl = await Client.connect(nats_server.url)
    yield cl
    await cl.close()


async def _view(client: Client, job_id: str):
    try:
        return await client.get(job_id)
    except NotFound:
        return None


async def test_a_priority_9_job_preempts_the_lowest_priority_one_which_is_requeued_and_completes(
    preempt_cluster, nats_server, client
):
    low = JobSpec(runtime=VICTIM, resources=WHOLE_NODE, priority=1, queue="batch", name="low")
    [victim] = (await client.submit([Submission(spec=low)])).job_ids

    async def victim_ready():
        # Its SIGTERM handler is in place once it says so (a stop before would kill it).
        return any(line.line == "trap-set" for line in (await client.logs(victim)).lines)

    await eventually(victim_ready, timeout=30, what="the low-priority job to run")

    urgent = JobSpec(
        runtime=ProcessRuntime(argv=["sh", "-c", "echo urgent-done"]),
        resources=WHOLE_NODE,
        priority=9,
        queue="urgent",
        preempt=True,
        name="urgent",
    )
    [winner] = (await client.submit([Submission(spec=urgent)])).job_ids

    async def succeeded(job_id: str):
        view = await _view(client, job_id)
        return view if view is not None and view.state == "succeeded" else None

    won = await eventually(lambda: succeeded(winner), timeout=60, what="the priority-9 job to run")
    done = await eventually(lambda: succeeded(victim), timeout=60, what="the preempted job to complete")

    # The victim's first attempt was stopped for the urgent job: preempted, after its
    # SIGTERM handler ran (the grace); its second ran to the end although the job asked
    # for one attempt only, so the preemption did not count against it.
    first, second = sorted(done.attempts, key=lambda a: a.attempt)
    assert first.error is not None and first.error.code == "preempted", first
    assert winner in first.error.message
    assert "got-sigterm" in first.output_tail
    assert second.state == "succeeded" and "victim-done" in second.output_tail
    assert done.spec.retry.max_attempts == 1
    # The urgent job started only once the victim had let go of the node, and before the
    # victim's second attempt.
    assert won.attempts[0].started_at >= first.finished_at
    assert second.started_at >= won.attempts[0].finished_at
    # It said why it waited meanwhile.
    reasons = [e.detail for e in won.events if e.kind == "unplaceable"]
    assert any("preempting 1 attempt of priority 1" in r for r in reasons), reasons

    # The CLI shows the stopped attempt as preempted.
    shown = jobmesh_cli(["status", victim], nats_server.url)
    assert shown.returncode == 0, shown.stderr
    assert "#1  preempted" in shown.stdout, shown.stdout

    async def released():
        return all(n.reservations == 0 for n in (await client.nodes()).nodes)

    await eventually(released, timeout=30, what="every reservation to be released")


async def test_a_job_that_may_not_be_preempted_is_left_running(preempt_cluster, client):
    pinned = JobSpec(
        runtime=ProcessRuntime(argv=["sh", "-c", "sleep 300"]),
        resources=WHOLE_NODE,
        priority=0,
        queue="batch",
        preemptible=False,
    )
    [held] = (await client.submit([Submission(spec=pinned)])).job_ids
    try:

        async def running():
            view = await _view(client, held)
            return view is not None and view.state == "running"

        await eventually(running, timeout=30, what="the pinned job to run")
        urgent = JobSpec(
            runtime=ProcessRuntime(argv=["true"]), resources=WHOLE_NODE, priority=9, queue="urgent", preempt=True
        )
        [waiting] = (await client.submit([Submission(spec=urgent)])).job_ids

        async def says_why():
            view = await _view(client, waiting)
            if view is None:
                return None
            found = [e.detail for e in view.events if e.kind == "unplaceable"]
            return found if any("no preemptible attempt" in r for r in found) else None

        await eventually(says_why, timeout=30, what="the urgent job to wait, saying nothing may be preempted")
        assert (await client.get(held)).state == "running"  # never stopped
        await client.cancel(waiting)
    finally:
        await client.cancel(held)


async def test_asking_to_preempt_on_a_queue_that_forbids_it_is_refused_naming_the_field(preempt_cluster, client):
    spec = JobSpec(runtime=ProcessRuntime(argv=["true"]), queue="batch", priority=9, preempt=True)
    with pytest.raises(InvalidSpec) as refused:
        await client.submit([Submission(spec=spec, idempotency_key="forbidden-preempt")])
    assert refused.value.field == "jobs[0].spec.preempt"
    assert "queue 'batch' does not allow preemption" in str(refused.value)
    # Below the queue's band: refused too, saying where the band starts.
    low = JobSpec(runtime=ProcessRuntime(argv=["true"]), queue="urgent", priority=7, preempt=True)
    with pytest.raises(InvalidSpec, match="allows preemption from priority 8, and the job has 7"):
        await client.submit([Submission(spec=low, idempotency_key="too-low-to-preempt")])
    # Nothing was created for either.
    for key in ("forbidden-preempt", "too-low-to-preempt"):
        assert await _view(client, job_id_for(key)) is None
