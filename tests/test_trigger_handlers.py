"""The trigger checks a handler job's input against the handler's input type at submit.

Against a real trigger process: the test writes ``HandlerInfo`` records into ``jm_handlers``
itself (as an executor that loaded the handler would), then submits inputs that match and
inputs that do not. A mismatch is refused with the field named and nothing is published; a
handler without a record is accepted (the executor checks at run time).
"""

from __future__ import annotations

import time

import msgspec
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import (
    FallbackSpec,
    HandlerInfo,
    HandlerRuntime,
    JobSpec,
    ProcessRuntime,
    RetryPolicy,
    Submission,
)
from jobmesh.errors import InvalidSpec
from jobmesh.trigger.handlerschemas import HandlerSchema
from tests.helpers import eventually


class AddIn(msgspec.Struct):
    n: int
    items: list[int] = []
    label: str = ""


class AddOut(msgspec.Struct):
    total: int


class TextIn(msgspec.Struct):
    n: str


def info(name: str, input_type: type[msgspec.Struct] = AddIn) -> HandlerInfo:
    return HandlerInfo(
        name=name,
        input_type=f"tests.{input_type.__name__}",
        output_type="tests.AddOut",
        input_schema=msgspec.json.schema(input_type),
        output_schema=msgspec.json.schema(AddOut),
        at=time.time(),
    )


def handler_job(name: str, value: object) -> Submission:
    return Submission(spec=JobSpec(runtime=HandlerRuntime(handler=name, input=value)))


# --- the check itself (pure) ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "path", "says"),
    [
        ({"n": "three"}, ".n", "is not of type 'integer'"),
        ({}, ".n", "'n' is a required property"),
        ({"n": 1, "items": [1, "x"]}, ".items[1]", "is not of type 'integer'"),
        ("just text", "", "is not of type 'object'"),
    ],
)
def test_a_mismatch_is_located_at_the_field_below_the_input(value, path, says):
    found = HandlerSchema(info("add")).problem(value)
    assert found is not None
    assert found[0] == path and says in found[1], found


def test_a_matching_input_has_no_problem():
    assert HandlerSchema(info("add")).problem({"n": 2, "items": [1, 2], "label": "x"}) is None


# --- against a real trigger -----------------------------------------------------------------
integration = pytest.mark.integration


@pytest.fixture(scope="module")
async def trigger(make_module_cluster):
    return await make_module_cluster(services=["trigger"], name="trigger-handlers")


@pytest.fixture(scope="module")
async def client(trigger, nats_server):
    c = await Client.connect(nats_server.url)
    yield c
    await c.close()


async def put_record(client: Client, record: HandlerInfo) -> None:
    kv = await client.nc.jetstream().key_value(subjects.KV_HANDLERS)
    await kv.put(record.name, encode(record))


async def jobs_published(client: Client) -> int:
    return (await client.nc.jetstream().stream_info(subjects.STREAM_JOBS)).state.messages


@integration
async def test_a_handler_input_that_does_not_match_is_refused_naming_the_field_and_nothing_is_created(client):
    await put_record(client, info("add"))
    before = await jobs_published(client)
    cases = [
        ([handler_job("add", {"n": "three"})], "jobs[0].spec.runtime.input.n"),
        ([handler_job("add", {})], "jobs[0].spec.runtime.input.n"),
        ([handler_job("add", {"n": 1, "items": [1, "x"]})], "jobs[0].spec.runtime.input.items[1]"),
        # One bad job refuses the whole request: the good one before it is not created either.
        ([handler_job("add", {"n": 1}), handler_job("add", {"n": None})], "jobs[1].spec.runtime.input.n"),
    ]
    for jobs, field in cases:
        with pytest.raises(InvalidSpec) as caught:
            await client.submit(jobs)
        assert caught.value.field == field, caught.value
        assert "handler 'add'" in caught.value.message and "tests.AddIn" in caught.value.message
    assert await jobs_published(client) == before

    reply = await client.submit([handler_job("add", {"n": 2, "items": [1, 2]})])
    assert len(reply.job_ids) == 1
    assert await jobs_published(client) == before + 1


@integration
async def test_a_handler_without_a_record_is_accepted_for_the_executor_to_check(client):
    reply = await client.submit([handler_job("nobody-hosts-this", {"anything": ["goes"]})])
    assert len(reply.job_ids) == 1


@integration
async def test_a_record_written_later_is_checked_and_a_changed_type_is_seen(client):
    # Written after the trigger started: found at once (the trigger reads a missed key).
    await put_record(client, info("late"))
    with pytest.raises(InvalidSpec) as caught:
        await client.submit([handler_job("late", {"n": "x"})])
    assert caught.value.field == "jobs[0].spec.runtime.input.n"

    # The type changes (an executor with a newer version): the watch brings it.
    await put_record(client, info("late", TextIn))

    async def refuses_an_int():
        try:
            await client.submit([handler_job("late", {"n": 1})])
        except InvalidSpec as exc:
            return exc.field
        return None

    assert await eventually(refuses_an_int, what="the trigger to see the new type") == "jobs[0].spec.runtime.input.n"
    await client.submit([handler_job("late", {"n": "now text"})])


@integration
async def test_a_fallback_handler_input_is_checked_too(client):
    await put_record(client, info("add"))
    spec = JobSpec(
        runtime=ProcessRuntime(argv=["true"]),
        retry=RetryPolicy(fallback=FallbackSpec(runtime=HandlerRuntime(handler="add", input={"n": []}))),
    )
    with pytest.raises(InvalidSpec) as caught:
        await client.submit([Submission(spec=spec)])
    assert caught.value.field == "jobs[0].spec.retry.fallback.runtime.input.n"


@integration
async def test_a_record_whose_schema_is_not_json_schema_leaves_the_input_to_the_executor(client):
    broken = msgspec.structs.replace(info("broken"), input_schema={"type": 12})
    await put_record(client, broken)
    reply = await client.submit([handler_job("broken", {"n": "whatever"})])
    assert len(reply.job_ids) == 1
