"""Pure parts of the library: settings, codec, outcomes, ids, validation, subjects."""

from __future__ import annotations

import pytest

from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec, encode
from jobmesh.contract.ids import job_id_for
from jobmesh.contract.messages.v1 import (
    JobSpec,
    LifecycleEvent,
    NoopRuntime,
    ProcessRuntime,
    Resources,
    Submission,
    SubmitRequest,
)
from jobmesh.contract.validation import validate_spec
from jobmesh.errors import Conflict, InvalidMessage, InvalidSpec, OversizedMessage, Unavailable
from jobmesh.runtime.backoff import backoff
from jobmesh.runtime.outcomes import Reject, Retry, fate_for
from jobmesh.runtime.settings import Settings


def test_settings_from_env_parse_and_name_the_variable():
    s = Settings.from_env("scheduler", {"JOBMESH_NATS_URL": "nats://x:1", "JOBMESH_PARTITIONS": "8"})
    assert s.nats_url == "nats://x:1" and s.partitions == 8 and s.service == "scheduler"
    with pytest.raises(InvalidSpec, match="JOBMESH_BATCH_SIZE"):
        Settings.from_env("x", {"JOBMESH_BATCH_SIZE": "lots"})
    with pytest.raises(InvalidSpec, match="JOBMESH_PARTITIONS"):
        Settings.from_env("x", {"JOBMESH_PARTITIONS": "0"})


def test_codec_names_the_field_and_refuses_oversized():
    codec = Codec(SubmitRequest, max_bytes=1000)
    good = SubmitRequest(jobs=[Submission(spec=JobSpec(runtime=NoopRuntime()))])
    assert codec.decode(encode(good)) == good
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(b'{"type":"api.submit","jobs":[{"spec":{"runtime":{"kind":"noop"},"queue":"a b"}}]}')
    assert caught.value.field == "jobs[0].spec.queue"
    with pytest.raises(OversizedMessage):
        codec.decode(b"x" * 1001)
    with pytest.raises(InvalidMessage, match="malformed JSON"):
        codec.decode(b"{nope")


def test_unknown_tag_is_invalid_for_a_union():
    with pytest.raises(InvalidMessage):
        Codec(LifecycleEvent).decode(b'{"type":"job.exploded","job_id":"a"}')


def test_fate_for_maps_errors_in_one_place():
    assert isinstance(fate_for(InvalidSpec("bad"), 1, 5), Reject)
    retry = fate_for(Conflict("race"), 1, 5)
    assert isinstance(retry, Retry) and retry.delay == backoff(1)
    assert isinstance(fate_for(RuntimeError("boom"), 2, 5), Retry)
    last = fate_for(RuntimeError("boom"), 5, 5)
    assert isinstance(last, Reject) and "gave up after 5 deliveries" in last.reason
    # An outage is retried however long it lasts: the message is fine, the world is not.
    assert isinstance(fate_for(Unavailable("postgres is down"), 500, 5), Retry)
    assert backoff(1) < backoff(3) <= 30.0 and backoff(50) == 30.0


def test_job_id_is_a_function_of_the_idempotency_key():
    assert job_id_for("k") == job_id_for("k") != job_id_for("k2")
    assert len(job_id_for("k")) == 32


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (JobSpec(runtime=ProcessRuntime(argv=[" "])), "spec.runtime.argv[0]"),
        (JobSpec(runtime=NoopRuntime(), resources=Resources(gpu_kind="h100")), "spec.resources.gpu"),
        (JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=10**9)), "spec.resources.cpu_milli"),
        (JobSpec(runtime=NoopRuntime(), concurrency_key="k"), "spec.concurrency_limit"),
        (JobSpec(runtime=NoopRuntime(), metadata={"owner": "a\x00b"}), "spec.metadata.owner"),
        (JobSpec(runtime=ProcessRuntime(argv=["echo", "\x00"])), "spec.runtime.argv[1]"),
    ],
)
def test_validate_spec_names_the_field(spec, field):
    with pytest.raises(InvalidSpec) as caught:
        validate_spec(spec)
    assert caught.value.field == field


def test_partition_is_stable_and_in_range():
    assert subjects.partition_of("default", 4) == subjects.partition_of("default", 4)
    assert {subjects.partition_of(f"q{i}", 4) for i in range(50)} == {0, 1, 2, 3}
    assert subjects.job_event(2, subjects.READY) == "jobmesh.v1.job.2.ready"


class _FakeRaw:
    """Just enough of a nats-py message for the runtime to settle it."""

    def __init__(self, payload: bytes) -> None:
        self.data = payload
        self.subject = "jobmesh.v1.job.0.started"
        self.headers = {}
        self.fate = ""

    @property
    def metadata(self):
        raise AttributeError("not a JetStream message")

    async def ack(self) -> None:
        self.fate = "ack"

    async def nak(self, delay=None) -> None:
        self.fate = "nak"

    async def term(self) -> None:
        self.fate = "term"


async def test_one_bad_message_does_not_take_its_batch_down():
    from jobmesh.contract.codec import encode
    from jobmesh.contract.messages.v1 import JobStarted
    from jobmesh.runtime.service import ConsumerSpec, Runtime

    rt = Runtime(Settings.from_env("unit", {}))
    seen_batches = []

    async def handle(envs):
        seen_batches.append(len(envs))
        if any(env.message.job_id == "poison" for env in envs):
            raise RuntimeError("a bug that only this message triggers")
        return None

    spec = ConsumerSpec("S", "d", ("x",), Codec(JobStarted), handle, "process x")
    raws = [
        _FakeRaw(encode(JobStarted(job_id=j, attempt=1, partition=0, node_id="n", at=0.0)))
        for j in ("a", "poison", "b")
    ]
    await rt.process_batch(spec, raws)
    assert [r.fate for r in raws] == ["ack", "nak", "ack"]
    assert seen_batches == [3, 1, 1, 1]
