"""The trigger checks a handler job's input against the handler's input type at submit.

Against a real trigger process: the test writes ``HandlerInfo`` records into ``jm_handlers``
itself (as an executor that loaded the handler would), then submits inputs that match and
inputs that do not. A mismatch is refused with the field named and nothing is published; a
handler without a record is accepted (the executor checks at run time).
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats.js.errors
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
from jobmesh.trigger.handlerschemas import HandlerSchema, HandlerSchemas
from tests.helpers import eventually


class AddIn(msgspec.Struct):
    n: int
    items: list[int] = []
    label: str = ""


class AddOut(msgspec.Struct):
    total: int


class TextIn(msgspec.Struct):
    n: str


class RatioIn(msgspec.Struct):
    a: float


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


class CountIn(msgspec.Struct):
    a: int


@pytest.mark.parametrize("kind", [CountIn, RatioIn])
@pytest.mark.parametrize("value", [1, 1.0, 1.5, -0.0, 100.0, 2**53, True, "1"])
def test_the_submit_check_accepts_exactly_what_the_workers_msgspec_decode_accepts(kind, value):
    raw = msgspec.json.encode({"a": value})
    try:
        msgspec.json.decode(raw, type=kind)
        worker_accepts = True
    except msgspec.ValidationError:
        worker_accepts = False
    # The trigger sees the input as the submit request decodes it.
    seen = msgspec.json.decode(raw)
    assert (HandlerSchema(info("h", kind)).problem(seen) is None) is worker_accepts, (kind, value, raw)


def test_a_float_with_no_fraction_is_not_an_int_and_an_int_is_a_float():
    assert HandlerSchema(info("add")).problem({"n": 1.0}) == (".n", "1.0 is not of type 'integer'")
    assert HandlerSchema(info("add")).problem({"n": 1, "items": [2.0]})[0] == ".items[0]"
    assert HandlerSchema(info("ratio", RatioIn)).problem({"a": 1}) is None


# --- the view's misses (no server: a KV that counts its reads) -----------------------------
class CountingKV:
    def __init__(self) -> None:
        self.reads = 0
        self.records: dict[str, bytes] = {}
        self.gate = asyncio.Event()
        self.gate.set()

    async def get(self, key: str):
        self.reads += 1
        await self.gate.wait()
        if key not in self.records:
            raise nats.js.errors.KeyNotFoundError()
        return type("Entry", (), {"value": self.records[key]})()


class FakeJS:
    def __init__(self, kv: CountingKV) -> None:
        self.kv = kv

    async def key_value(self, bucket: str) -> CountingKV:
        assert bucket == subjects.KV_HANDLERS
        return self.kv


async def test_a_flood_of_submits_for_an_unknown_handler_costs_one_read_until_the_miss_expires():
    kv = CountingKV()
    now = [100.0]
    view = HandlerSchemas(FakeJS(kv), clock=lambda: now[0], miss_ttl=2.0)  # type: ignore[arg-type]
    runtime = HandlerRuntime(handler="nobody", input={"n": "x"})
    kv.gate.clear()  # the first read is slow: submits arriving meanwhile share it
    flood = [asyncio.ensure_future(view.check(runtime, "jobs[0].spec.runtime")) for _ in range(50)]

    async def reading() -> bool:
        return kv.reads > 0

    await eventually(reading, what="the first read to start")  # every submit is waiting by now
    kv.gate.set()
    await asyncio.gather(*flood)
    for _ in range(50):
        await view.check(runtime, "jobs[0].spec.runtime")
    assert kv.reads == 1
    now[0] += 2.5  # the miss expires: a record written since the read is looked for again
    kv.records["nobody"] = encode(info("nobody"))
    with pytest.raises(InvalidSpec) as caught:
        await view.check(runtime, "jobs[0].spec.runtime")
    assert caught.value.field == "jobs[0].spec.runtime.input.n" and kv.reads == 2


async def test_a_record_the_watch_brings_ends_a_remembered_miss_at_once():
    kv = CountingKV()
    view = HandlerSchemas(FakeJS(kv), clock=lambda: 0.0, miss_ttl=60.0)  # type: ignore[arg-type]
    runtime = HandlerRuntime(handler="late", input={"n": "x"})
    await view.check(runtime, "jobs[0].spec.runtime")  # accepted: no record yet
    view.apply("late", encode(info("late")))  # the watch delivers it
    with pytest.raises(InvalidSpec):
        await view.check(runtime, "jobs[0].spec.runtime")
    view.apply("late", None)  # deleted: unknown again, read once more
    await view.check(runtime, "jobs[0].spec.runtime")
    assert kv.reads == 2


async def test_misses_are_remembered_for_a_bounded_number_of_names():
    kv = CountingKV()
    view = HandlerSchemas(FakeJS(kv), clock=lambda: 0.0, miss_ttl=60.0, max_misses=3)  # type: ignore[arg-type]
    for name in ("a", "b", "c", "d"):
        await view.check(HandlerRuntime(handler=name, input={}), "r")
    assert kv.reads == 4
    await view.check(HandlerRuntime(handler="d", input={}), "r")  # remembered
    assert kv.reads == 4
    await view.check(HandlerRuntime(handler="a", input={}), "r")  # the oldest went: read again
    assert kv.reads == 5


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
        # The worker's msgspec takes 1.0 for no int, so neither does the trigger.
        ([handler_job("add", {"n": 1.0})], "jobs[0].spec.runtime.input.n"),
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
