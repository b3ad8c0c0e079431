"""Through the real services: every way a job ends for good publishes an event on JM_JOBS
that carries the job's queue, name and metadata (what a completion rule filters on), and
the tracker shows the origin of a job a trigger submitted.

The events are read back from the stream with a plain nats-py consumer, as any consumer
of job ends (the trigger's completion rules) would see them.
"""

from __future__ import annotations

import time
import uuid

import msgspec
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.ids import job_id_for, submit_id
from jobmesh.contract.messages.v1 import (
    JobCancelled,
    JobExpired,
    JobGaveUp,
    JobSpec,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    JobView,
    NoopRuntime,
    ProcessRuntime,
    Resources,
    Submission,
    Timeouts,
)
from jobmesh.contract.messages.v1.triggers import JobOrigin
from jobmesh.errors import NotFound
from jobmesh.runtime.publisher import Outgoing, Publisher
from tests.helpers import eventually

pytestmark = pytest.mark.integration

QUEUE = "labelled"
METADATA = {"team": "media", "pipeline": "thumbs"}


@pytest.fixture
async def client(nats_server, cluster):
    cl = await Client.connect(nats_server.url)
    yield cl
    await cl.close()


def labelled(name: str, runtime=None, **fields) -> JobSpec:
    return JobSpec(runtime=runtime or NoopRuntime(), name=name, queue=QUEUE, metadata=METADATA, **fields)


async def submit(client: Client, spec: JobSpec) -> str:
    [job_id] = (await client.submit([Submission(spec=spec)])).job_ids
    return job_id


async def event_of(nc, job_id: str, kind: str, type_: type, timeout: float = 30.0):
    """The first ``kind`` event of ``job_id`` on JM_JOBS, read from the stream's start."""
    decoder = msgspec.json.Decoder(type_)
    # An executor's kinds travel on the node form (jobmesh.v1.job.*.<kind>.<node>), the
    # services' on the partition form: one ordered consumer covers both (`>`), and the
    # kind token picks this kind's events.
    sub = await nc.jetstream().subscribe(subjects.JOBS_ALL, stream=subjects.STREAM_JOBS, ordered_consumer=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind} event of job {job_id} on {subjects.STREAM_JOBS} within {timeout}s")
            try:
                msg = await sub.next_msg(timeout=remaining)
            except TimeoutError:
                continue  # the loop's deadline check reports it
            if msg.subject.split(".")[4] != kind:
                continue
            event = decoder.decode(msg.data)
            if event.job_id == job_id:
                return event
    finally:
        await sub.unsubscribe()


def assert_labels(event, name: str) -> None:
    assert (event.queue, event.name, event.metadata) == (QUEUE, name, METADATA), event


async def test_a_success_carries_queue_name_and_metadata(client, nc) -> None:
    job_id = await submit(client, labelled("it-succeeds"))
    event = await event_of(nc, job_id, subjects.SUCCEEDED, JobSucceeded)
    assert_labels(event, "it-succeeds")


async def test_a_job_that_fails_for_good_gives_up_with_them(client, nc) -> None:
    job_id = await submit(client, labelled("it-fails", NoopRuntime(exit_code=3)))
    event = await event_of(nc, job_id, subjects.GAVE_UP, JobGaveUp)
    assert event.error.code == "exit_code"
    assert_labels(event, "it-fails")


async def test_a_held_job_cancelled_carries_them(client, nc) -> None:
    job_id = await submit(client, labelled("held", not_before=time.time() + 3600))
    outcome = await client.cancel(job_id, "not wanted")
    assert outcome.state == "cancelled", outcome
    event = await event_of(nc, job_id, subjects.CANCELLED, JobCancelled)
    assert event.reason == "not wanted"
    assert_labels(event, "held")


async def test_a_running_job_cancelled_carries_them(client, nc) -> None:
    sleeper = ProcessRuntime(argv=["sleep", "60"])
    job_id = await submit(client, labelled("running", sleeper))
    await event_of(nc, job_id, subjects.STARTED, JobStarted)
    outcome = await client.cancel(job_id, "stop it")
    assert outcome.state == "cancelling", outcome
    event = await event_of(nc, job_id, subjects.CANCELLED, JobCancelled)
    assert event.node_id and event.reason == "stop it"
    assert_labels(event, "running")


async def test_an_expired_job_carries_them(client, nc) -> None:
    spec = labelled("never-placed", resources=Resources(gpu=1, gpu_kind="tpu-v9"), timeouts=Timeouts(queue=1.0))
    job_id = await submit(client, spec)
    event = await event_of(nc, job_id, subjects.EXPIRED, JobExpired)
    assert "queue timeout" in event.reason
    assert_labels(event, "never-placed")


async def test_the_tracker_shows_the_origin_of_a_triggered_job(client, nc) -> None:
    # A plain submit first: it has no origin, and its JobSubmitted says which partition
    # the queue hashes to (the cluster's partition count is its own business).
    plain = await submit(client, labelled("plain"))
    partition = (await event_of(nc, plain, subjects.SUBMITTED, JobSubmitted)).partition
    assert (await eventually(lambda: _final(client, plain), what="the plain job to end")).origin is None
    # Published as the trigger does: on the submitted subject, Nats-Msg-Id = the key.
    key = f"trigger:thumbnails:3:{uuid.uuid4().hex}"
    origin = JobOrigin(
        kind="event", rule="thumbnails", version=3, event="JM_EVENTS:7", subject="jobmesh.v1.events.up", at=time.time()
    )
    job = JobSubmitted(
        job_id=job_id_for(key),
        partition=partition,
        spec=labelled("triggered"),
        idempotency_key=key,
        submitted_at=time.time(),
        origin=origin,
    )
    subject = subjects.job_event(partition, subjects.SUBMITTED)
    await Publisher(nc.jetstream()).publish([Outgoing(subject, job, submit_id(key))])
    view = await eventually(lambda: _final(client, job.job_id), timeout=30, what="the triggered job to end")
    assert view.origin == origin
    assert (view.state, view.queue, view.name) == ("succeeded", QUEUE, "triggered")
    # The job end it leads to carries its labels like any other.
    assert_labels(await event_of(nc, job.job_id, subjects.SUCCEEDED, JobSucceeded), "triggered")


async def _final(client: Client, job_id: str) -> JobView | None:
    """The job's view once it has ended for good, else None."""
    try:
        view = await client.get(job_id)
    except NotFound:
        return None
    return view if view.final else None
