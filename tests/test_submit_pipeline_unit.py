"""Pipelined submits (libs/jobmesh/client/pipeline.py) against a fake trigger: a loop of
single submits travels in few requests, in order; job ids are known at once; a refused job's
error reaches its own handle only, named as if it had been submitted alone; an error of the
whole request reaches every handle of it; flush and close wait for every answer."""

from __future__ import annotations

import asyncio

import pytest

from jobmesh.client.pipeline import SubmitPipeline
from jobmesh.contract.ids import job_id_for
from jobmesh.contract.messages.v1 import (
    Dependency,
    JobSpec,
    NoopRuntime,
    ProcessRuntime,
    Submission,
    SubmitReply,
    SubmitRequest,
)
from jobmesh.errors import InvalidSpec, NotFound, Overloaded, OversizedMessage, Unavailable

SPEC = JobSpec(runtime=NoopRuntime())


class FakeTrigger:
    """Answers like the trigger: the whole request, or the first bad job's error."""

    def __init__(
        self, bad: set[str] | None = None, down: bool = False, delay: float = 0.01, max_jobs: int = 1000
    ) -> None:
        self.requests: list[list[str]] = []  # each request's idempotency keys
        self.accepted: list[str] = []
        self.bad = bad or set()
        self.down = down
        self.delay = delay
        self.max_jobs = max_jobs  # a request with more is refused as too large

    async def __call__(self, request: SubmitRequest) -> SubmitReply:
        keys = [s.idempotency_key for s in request.jobs]
        self.requests.append(keys)
        await asyncio.sleep(self.delay)  # a round trip: the fake's latency  # noqa: sleep
        if self.down:
            raise Unavailable("the trigger service did not answer on jobmesh.v1.api.submit within 10.0s")
        if len(keys) > self.max_jobs:
            raise OversizedMessage("the request is larger than the limit of 262144 bytes")
        for i, s in enumerate(request.jobs):
            if s.spec.name in self.bad:
                raise InvalidSpec(
                    f"priority {s.spec.name} is not allowed - at `$.jobs[{i}].spec.name`", field=f"jobs[{i}].spec.name"
                )
        self.accepted.extend(keys)
        return SubmitReply(job_ids=[job_id_for(k) for k in keys], duplicates=[False] * len(keys))


async def test_a_plain_loop_of_submits_travels_in_few_requests_in_order():
    trigger = FakeTrigger()
    pipe = SubmitPipeline(trigger, max_batch=100, linger=0.001)
    handles = [pipe.submit(Submission(spec=SPEC, idempotency_key=f"k{i}")) for i in range(1000)]
    await pipe.flush()
    assert [await h for h in handles] == [job_id_for(f"k{i}") for i in range(1000)]
    assert trigger.accepted == [f"k{i}" for i in range(1000)]  # in submission order
    assert len(trigger.requests) == 10 and all(len(r) == 100 for r in trigger.requests)


async def test_the_job_id_is_known_at_once_and_a_key_is_made_when_none_is_given():
    trigger = FakeTrigger()
    pipe = SubmitPipeline(trigger)
    handle = pipe.submit(SPEC)
    assert handle.idempotency_key and handle.job_id == job_id_for(handle.idempotency_key)
    assert not handle.done()
    assert await handle == handle.job_id and handle.done() and handle.error is None


async def test_a_refused_job_fails_its_own_handle_named_as_alone_and_its_neighbours_go_in():
    trigger = FakeTrigger(bad={"bad-a", "bad-b"})
    pipe = SubmitPipeline(trigger, linger=0.001)
    names = ["ok-0", "bad-a", "ok-2", "bad-b", "ok-4"]
    handles = [pipe.submit(Submission(spec=JobSpec(runtime=NoopRuntime(), name=n), idempotency_key=n)) for n in names]
    await pipe.flush()
    for name, handle in zip(names, handles, strict=True):
        if name.startswith("bad"):
            with pytest.raises(InvalidSpec) as refused:
                await handle
            assert refused.value.field == "jobs[0].spec.name"
            assert "$.jobs[0].spec.name" in str(refused.value) and name in str(refused.value)
        else:
            assert await handle == job_id_for(name)
    assert trigger.accepted == ["ok-0", "ok-2", "ok-4"]  # each exactly once


async def test_an_error_of_the_whole_request_reaches_every_handle_of_it():
    trigger = FakeTrigger(down=True)
    pipe = SubmitPipeline(trigger, linger=0.001)
    handles = [pipe.submit(SPEC) for _ in range(3)]
    await pipe.flush()
    for handle in handles:
        assert isinstance(handle.error, Unavailable)
        with pytest.raises(Unavailable):
            await handle


async def test_a_batch_never_overtakes_the_one_before_it():
    trigger = FakeTrigger(delay=0.02)
    pipe = SubmitPipeline(trigger, max_batch=3, linger=0.0)
    first = [pipe.submit(Submission(spec=SPEC, idempotency_key=f"a{i}")) for i in range(3)]
    await asyncio.sleep(0.005)  # the first request is out: submit during it  # noqa: sleep
    second = [pipe.submit(Submission(spec=SPEC, idempotency_key=f"b{i}")) for i in range(3)]
    assert not any(h.done() for h in second)
    await pipe.flush()
    assert trigger.requests == [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    assert all(h.done() for h in first + second)


async def test_close_sends_what_is_queued_and_refuses_what_comes_after():
    trigger = FakeTrigger()
    pipe = SubmitPipeline(trigger, linger=0.05)
    handle = pipe.submit(SPEC)
    await pipe.close()
    assert handle.done() and trigger.accepted == [handle.idempotency_key]
    with pytest.raises(RuntimeError, match="closed"):
        pipe.submit(SPEC)


def test_a_batch_size_outside_the_contract_is_refused():
    with pytest.raises(ValueError, match="1 to 1000"):
        SubmitPipeline(FakeTrigger(), max_batch=1001)


async def test_close_while_another_task_enqueues_answers_or_refuses_every_submit():
    trigger = FakeTrigger(delay=0.005)
    pipe = SubmitPipeline(trigger, linger=0.001)
    handles = []
    refused = 0

    async def producer() -> None:
        nonlocal refused
        for _ in range(200):
            try:
                handles.append(pipe.submit(SPEC))
            except RuntimeError:
                refused += 1
            await asyncio.sleep(0.0005)  # a producer that yields  # noqa: sleep

    task = asyncio.ensure_future(producer())
    await asyncio.sleep(0.02)  # let it queue some  # noqa: sleep
    await pipe.close()
    await task
    assert refused > 0 and handles  # some came before the close, some after
    assert all(h.done() for h in handles)  # none left hanging
    assert sorted(trigger.accepted) == sorted(h.idempotency_key for h in handles)


async def test_flush_waits_for_what_came_before_it_not_for_a_producer_that_goes_on():
    trigger = FakeTrigger(delay=0.01)
    pipe = SubmitPipeline(trigger, linger=0.002)
    first = [pipe.submit(SPEC) for _ in range(10)]
    stop = asyncio.Event()

    async def producer() -> None:
        while not stop.is_set():
            pipe.submit(SPEC)
            await asyncio.sleep(0.001)  # one job a millisecond  # noqa: sleep

    task = asyncio.ensure_future(producer())
    await asyncio.wait_for(pipe.flush(), 2)
    assert all(h.done() for h in first)
    stop.set()
    await task
    await pipe.close()


async def test_jobs_that_wait_for_a_refused_job_are_refused_with_it_and_the_rest_goes_in():
    trigger = FakeTrigger(bad={"parent"})
    pipe = SubmitPipeline(trigger, linger=0.001)
    parent = pipe.submit(Submission(spec=JobSpec(runtime=NoopRuntime(), name="parent"), idempotency_key="p"))
    children = [
        pipe.submit(
            Submission(
                spec=JobSpec(runtime=NoopRuntime(), name=f"child-{i}", after=[Dependency(job_id=parent.job_id)]),
                idempotency_key=f"c{i}",
            )
        )
        for i in range(4)
    ]
    other = pipe.submit(Submission(spec=SPEC, idempotency_key="other"))
    await pipe.flush()
    assert isinstance(parent.error, InvalidSpec)
    for child in children:
        assert isinstance(child.error, NotFound) and child.error.field == "jobs[0].spec.after[0].job_id"
        assert parent.job_id in str(child.error)
    assert await other == job_id_for("other")
    assert trigger.accepted == ["other"] and len(trigger.requests) == 2  # one refusal, one resend


async def test_a_request_too_large_is_split_and_sent_again():
    trigger = FakeTrigger(max_jobs=3)
    pipe = SubmitPipeline(trigger, linger=0.001)
    handles = [pipe.submit(Submission(spec=SPEC, idempotency_key=f"k{i}")) for i in range(10)]
    await pipe.flush()
    assert [await h for h in handles] == [job_id_for(f"k{i}") for i in range(10)]
    assert sorted(trigger.accepted) == sorted(f"k{i}" for i in range(10))
    assert len(trigger.accepted) == 10


async def test_batches_keep_under_the_byte_budget():
    trigger = FakeTrigger()
    pipe = SubmitPipeline(trigger, linger=0.001, max_bytes=5000)
    big = JobSpec(runtime=ProcessRuntime(argv=["sh", "-c", "x" * 1000]))
    for _ in range(20):
        pipe.submit(big)
    await pipe.flush()
    assert len(trigger.requests) >= 5 and all(len(r) <= 4 for r in trigger.requests)


async def test_enqueue_refuses_more_than_max_pending_unanswered_submits():
    pipe = SubmitPipeline(FakeTrigger(delay=0.05), max_pending=5)
    for _ in range(5):
        pipe.submit(SPEC)
    with pytest.raises(Overloaded, match="flush"):
        pipe.submit(SPEC)
    await pipe.close()
