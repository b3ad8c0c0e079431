"""Filling a workflow step's ``${steps...}`` and ``${item...}`` from kept results
(``jobmesh.executor.stepinputs``) with an in-memory object store, and keeping a result
(``ResultStore.collect(keep=True)``)."""

from __future__ import annotations

import asyncio
import io
import json

import msgspec
import nats.errors
import pytest
from nats.js.errors import ObjectNotFoundError

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import (
    ContainerRuntime,
    HandlerRuntime,
    ItemRef,
    JobSpec,
    ProcessRuntime,
    StepRef,
    UpstreamRef,
)
from jobmesh.errors import InvalidSpec, Unavailable
from jobmesh.executor.results import ResultLimits, ResultStore
from jobmesh.executor.stepinputs import (
    Absent,
    ResultReader,
    StepValues,
    Wanted,
    decode_result,
    fill_inputs,
    resolve,
    wanted,
)


class Stored:
    """What nats-py's ObjectStore.get returns, as far as the reader looks."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class MemoryObjects:
    """An in-memory ``jm_results``: counts reads, how many run at once, fails some first."""

    def __init__(self, objects: dict[str, bytes] | None = None, failures: int = 0) -> None:
        self.objects: dict[str, bytes] = dict(objects or {})
        self.failures = failures
        self.reads: list[str] = []
        self.running = 0
        self.most = 0

    def keep(self, job_id: str, value: object) -> None:
        self.objects[subjects.step_result_key(job_id)] = json.dumps(value).encode()

    async def get(self, name: str) -> Stored:
        self.reads.append(name)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0)  # one loop turn for other reads to start, not a wait for time (noqa: sleep)
            if self.failures:
                self.failures -= 1
                raise nats.errors.TimeoutError()
            if name not in self.objects:
                raise ObjectNotFoundError()
            return Stored(self.objects[name])
        finally:
            self.running -= 1

    async def put(self, name: str, data: bytes | io.BufferedIOBase) -> object:
        self.objects[name] = data if isinstance(data, bytes) else data.read()
        return None


def step(upstream: dict[str, UpstreamRef] | None = None, item: ItemRef | None = None, index: int = -1) -> StepRef:
    return StepRef(workflow_id="w1", step="b", upstream=upstream or {}, item=item, index=index)


def process(*argv: str, env: dict[str, str] | None = None, stdin: str = "", on: StepRef | None = None) -> JobSpec:
    return JobSpec(runtime=ProcessRuntime(argv=list(argv), env=env or {}), stdin=stdin, step=on, keep_result=True)


async def filled(spec: JobSpec, store: MemoryObjects, **reader: float):
    return await resolve(spec, ResultReader(store, **reader))


# --- the pure part -------------------------------------------------------------------


def test_wanted_names_the_steps_and_the_item_the_placeholders_read() -> None:
    on = step({"a": UpstreamRef(job_id="ja"), "c": UpstreamRef(job_id="jc")})
    spec = process("run", "${steps.a.result.x}", "${item}", env={"V": "${ steps.a.result }"}, stdin="${input.q}", on=on)
    assert wanted(spec) == Wanted(frozenset({"a"}), True)
    # A job that is no workflow step reads nothing, whatever its strings hold.
    assert not wanted(process("echo", "${steps.a.result}"))
    assert not wanted(process("echo", "plain", on=on))
    with pytest.raises(InvalidSpec) as bad:
        wanted(process("echo", "${HOME}", on=on))
    assert bad.value.field == "runtime.argv[1]"


def test_values_fill_argv_env_and_stdin_as_text_and_a_handlers_input_as_values() -> None:
    on = step({"a": UpstreamRef(job_id="ja")})
    result = {"path": "/data/x.csv", "rows": [1, 2, 3], "n": 3, "ok": True}
    values = StepValues({"a": result})
    spec = process(
        "wc",
        "${steps.a.result.path}",
        "${steps.a.result.rows}",  # a list inside argv: its JSON text
        "--n=${steps.a.result.n} of ${steps.a.result.rows.1}",
        "${input.kept}",  # the trigger's kind: left as written
        env={"ROWS": "${steps.a.result.n}", "PLAIN": "x"},
        stdin="${steps.a.result}",
        on=on,
    )
    out = fill_inputs(spec, values)
    assert out.runtime.argv == ["wc", "/data/x.csv", "[1,2,3]", "--n=3 of 2", "${input.kept}"]
    assert out.runtime.env == {"ROWS": "3", "PLAIN": "x"}
    assert json.loads(out.stdin) == result
    handler = JobSpec(
        runtime=HandlerRuntime(handler="h", input={"rows": "${steps.a.result.rows}", "k": ["${steps.a.result.ok}"]}),
        step=on,
    )
    assert fill_inputs(handler, values).runtime.input == {"rows": [1, 2, 3], "k": [True]}
    container = JobSpec(runtime=ContainerRuntime(image="alpine", argv=["cat", "${steps.a.result.path}"]), step=on)
    assert fill_inputs(container, values).runtime.argv == ["cat", "/data/x.csv"]


def test_an_item_is_its_element_of_the_list_it_comes_from() -> None:
    item = ItemRef(job_id="jsrc", path=["files"], index=1)
    on = step(item=item, index=1)
    source = {"files": [{"name": "a.txt"}, {"name": "b.txt", "size": 7}]}
    spec = process("cp", "${item.name}", "${item}", on=on)
    out = fill_inputs(spec, StepValues(item_source=source))
    assert out.runtime.argv == ["cp", "b.txt", '{"name":"b.txt","size":7}']
    with pytest.raises(InvalidSpec, match=r"\$\{item.owner\}: item 1 has no owner"):
        fill_inputs(process("x", "${item.owner}", on=on), StepValues(item_source=source))
    short = step(item=ItemRef(job_id="jsrc", path=["files"], index=5))
    with pytest.raises(InvalidSpec, match="has 2 items, none at index 5"):
        fill_inputs(process("x", "${item}", on=short), StepValues(item_source=source))
    elsewhere = step(item=ItemRef(job_id="jsrc", path=["dirs"], index=0))
    with pytest.raises(InvalidSpec, match="the result of job jsrc has no dirs"):
        fill_inputs(process("x", "${item}", on=elsewhere), StepValues(item_source=source))
    with pytest.raises(InvalidSpec, match="is no mapped item"):
        fill_inputs(process("x", "${item}", on=step()), StepValues())


def test_what_cannot_be_filled_names_the_placeholder_and_the_field() -> None:
    on = step({"a": UpstreamRef(job_id="ja")})
    values = StepValues({"a": {"path": "p"}})
    with pytest.raises(InvalidSpec) as undeclared:
        fill_inputs(process("x", "${steps.z.result}", on=on), values)
    assert str(undeclared.value) == (
        "runtime.argv[1]: ${steps.z.result}: step 'z' is not an upstream of this step (upstream: a)"
    )
    assert undeclared.value.field == "runtime.argv[1]"
    with pytest.raises(InvalidSpec) as no_path:
        fill_inputs(process("x", env={"P": "at ${steps.a.result.dir.0}"}, on=on), values)
    assert str(no_path.value) == "runtime.env.P: ${steps.a.result.dir.0}: the result of step 'a' has no dir.0"
    absent = StepValues({"a": Absent("the result of step 'a' (job ja) is not stored")})
    with pytest.raises(InvalidSpec, match=r"^stdin: \$\{steps.a.result\}: the result of step 'a' \(job ja\) is not"):
        fill_inputs(process("x", stdin="${steps.a.result}", on=on), absent)


def test_a_result_that_is_not_json_is_its_text() -> None:
    assert decode_result(b'{"a": 1}') == {"a": 1}
    assert decode_result(b"null") is None
    assert decode_result(b"hello world\n") == "hello world\n"
    assert decode_result(b"\xff binary") == "\ufffd binary"


# --- reading -------------------------------------------------------------------------


async def test_a_step_reads_its_upstream_once_however_often_it_names_it() -> None:
    store = MemoryObjects()
    store.keep("ja", {"path": "/x", "n": 2})
    store.keep("jc", "unused")
    on = step({"a": UpstreamRef(job_id="ja"), "c": UpstreamRef(job_id="jc")})
    out = await filled(
        process("x", "${steps.a.result.path}", "${steps.a.result.n}", stdin="${steps.a.result}", on=on), store
    )
    assert out is not None and out.runtime.argv == ["x", "/x", "2"] and json.loads(out.stdin) == {"path": "/x", "n": 2}
    assert store.reads == [subjects.step_result_key("ja")]  # once, and never the unnamed upstream


async def test_a_mapped_upstream_is_the_list_of_its_items_results_in_item_order() -> None:
    store = MemoryObjects()
    children = [f"jm-{i}" for i in range(100)]
    store.objects[subjects.map_manifest_key("jmap")] = msgspec.json.encode({"jobs": children, "count": 100})
    for i, child in enumerate(children):
        store.keep(child, {"i": i})
    store.objects[subjects.step_result_key(children[7])] = b"plain text"  # not JSON: its text
    on = step({"m": UpstreamRef(job_id="jmap", mapped=True)})
    spec = JobSpec(runtime=HandlerRuntime(handler="h", input={"all": "${steps.m.result}"}), step=on)
    out = await filled(spec, store, concurrency=8)
    assert out is not None
    expected = [{"i": i} for i in range(100)]
    expected[7] = "plain text"
    assert out.runtime.input == {"all": expected}
    assert 1 < store.most <= 8  # concurrent, and bounded
    one = await filled(process("x", "${steps.m.result.3.i}", on=on), store)
    assert one is not None and one.runtime.argv == ["x", "3"]


async def test_a_missing_object_fails_with_the_placeholder_named() -> None:
    store = MemoryObjects()
    on = step({"a": UpstreamRef(job_id="ja"), "m": UpstreamRef(job_id="jmap", mapped=True)})
    with pytest.raises(InvalidSpec, match=r"\$\{steps.a.result\}: the result of step 'a' \(job ja\) is not stored"):
        await filled(process("x", "${steps.a.result}", on=on), store)
    with pytest.raises(InvalidSpec, match=r"\$\{steps.m.result\}: the item list of mapped step 'm' \(job jmap\)"):
        await filled(process("x", "${steps.m.result}", on=on), store)
    store.objects[subjects.map_manifest_key("jmap")] = b'{"jobs": ["k0", "k1"]}'
    store.keep("k0", 0)
    with pytest.raises(InvalidSpec, match=r"the result of item 1 of step 'm' \(job k1\) is not stored"):
        await filled(process("x", "${steps.m.result}", on=on), store)
    store.objects[subjects.map_manifest_key("jmap")] = b"[1, 2]"
    with pytest.raises(InvalidSpec, match="is malformed"):
        await filled(process("x", "${steps.m.result}", on=on), store)
    mapped = step(item=ItemRef(job_id="gone", path=[], index=0))
    with pytest.raises(
        InvalidSpec, match=r"\$\{item\}: the result of job gone \(the list the item comes from\) is not"
    ):
        await filled(process("x", "${item}", on=mapped), store)


async def test_an_item_is_read_by_reference() -> None:
    store = MemoryObjects()
    store.keep("jsrc", {"out": {"files": ["a", "b", "c"]}})
    on = step(item=ItemRef(job_id="jsrc", path=["out", "files"], index=2), index=2)
    out = await filled(process("cat", "${item}", on=on), store)
    assert out is not None and out.runtime.argv == ["cat", "c"]


async def test_nothing_is_read_or_changed_without_step_placeholders() -> None:
    store = MemoryObjects()
    assert await filled(process("echo", "${steps.a.result}"), store) is None  # no workflow step
    assert await filled(process("echo", "hi", on=step({"a": UpstreamRef(job_id="ja")})), store) is None
    assert store.reads == []
    with pytest.raises(InvalidSpec, match="no result store"):
        await resolve(process("x", "${steps.a.result}", on=step({"a": UpstreamRef(job_id="ja")})), None)


async def test_an_outage_is_retried_then_reported_unavailable() -> None:
    on = step({"a": UpstreamRef(job_id="ja")})
    store = MemoryObjects(failures=2)
    store.keep("ja", "v")
    out = await filled(process("x", "${steps.a.result}", on=on), store, retry_base=0.001)
    assert out is not None and out.runtime.argv == ["x", "v"]
    down = MemoryObjects(failures=10)
    with pytest.raises(Unavailable, match=r"cannot read jm_results/step/ja: TimeoutError"):
        await filled(process("x", "${steps.a.result}", on=on), down, retry_base=0.001, tries=3)
    assert len(down.reads) == 3


# --- keeping -------------------------------------------------------------------------


async def test_a_kept_result_is_stored_by_job_whatever_its_size(tmp_path) -> None:
    store = MemoryObjects()
    results = ResultStore(store, ResultLimits(inline_bytes=16, max_bytes=64))
    path = tmp_path / "result"
    kept = subjects.step_result_key("j")
    assert await results.collect("j", 1, path, keep=True) is None
    assert store.objects == {kept: b"null"}  # none left: null
    path.write_text('{"a": 1}')
    inline = await results.collect("j", 1, path, keep=True)
    assert inline is not None and inline.text == '{"a": 1}' and not inline.ref
    assert store.objects == {kept: b'{"a": 1}'}  # inline as before, and kept besides
    path.write_text("")
    assert await results.collect("j", 2, path, keep=True) is not None and store.objects[kept] == b"null"
    path.write_bytes(b"y" * 40)
    big = await results.collect("j", 3, path, keep=True)
    assert big is not None and big.ref == "j/3" and store.objects["j/3"] == store.objects[kept] == b"y" * 40
    path.write_bytes(b"z" * 65)
    over = await results.collect("j", 4, path, keep=True)
    assert over is not None and over.too_large and store.objects[kept] == b"y" * 40  # nothing kept for it
    path.write_text("not kept")
    assert await results.collect("k", 1, path) is not None
    assert subjects.step_result_key("k") not in store.objects


def test_a_filled_argument_the_kernel_would_refuse_fails_as_the_inputs_fault():
    from jobmesh.contract.messages.v1 import JobSpec, ProcessRuntime, StepRef, UpstreamRef
    from jobmesh.errors import InvalidSpec
    from jobmesh.executor.stepinputs import MAX_ARG_BYTES, StepValues, fill_inputs

    step = StepRef(workflow_id="w", step="b", upstream={"a": UpstreamRef(job_id="ja")})
    spec = JobSpec(runtime=ProcessRuntime(argv=["echo", "${steps.a.result}"]), step=step)
    with pytest.raises(InvalidSpec, match="over the 131072-byte limit") as caught:
        fill_inputs(spec, StepValues(results={"a": "x" * (MAX_ARG_BYTES + 1)}))
    assert caught.value.field == "runtime.argv[1]"
    with pytest.raises(InvalidSpec, match="NUL") as caught:
        fill_inputs(spec, StepValues(results={"a": "a\x00b"}))
    assert fill_inputs(spec, StepValues(results={"a": "fine"})).runtime.argv == ["echo", "fine"]
