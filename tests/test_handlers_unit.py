"""The handler SDK without processes: what @handler accepts and refuses, the records it
advertises, the Context, run-time input errors, module loading and the pool's framing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec
import pytest

from jobmesh.contract.messages.v1 import JobSpec, NoopRuntime
from jobmesh.executor.handlerpool import MAX_HANDOFFS, WORKER_ENV_KEEP, hand_off, worker_environment
from jobmesh.sdk import Context, Registry, handler, handler_info, protocol
from jobmesh.sdk.modules import import_handler_module, is_path
from jobmesh.sdk.worker import input_error
from tests.helpers import eventually


class Numbers(msgspec.Struct):
    n: int
    label: str = ""


class Total(msgspec.Struct):
    value: int


def test_sync_and_async_handlers_are_registered_with_their_types():
    registry = Registry()

    @handler("sum.sync", registry=registry)
    def plain(request: Numbers) -> Total:
        """Adds it up.

        More words.
        """
        return Total(request.n)

    @handler("sum.async", registry=registry)
    async def later(request: Numbers, ctx: Context) -> Total:
        return Total(request.n)

    sync, asynchronous = registry.get("sum.sync"), registry.get("sum.async")
    assert sync is not None and asynchronous is not None
    assert (sync.input_type, sync.output_type, sync.takes_context, sync.is_async) == (Numbers, Total, False, False)
    assert (asynchronous.takes_context, asynchronous.is_async) == (True, True)
    assert sync.doc == "Adds it up."
    assert registry.names() == ["sum.async", "sum.sync"]


def test_a_handler_record_carries_the_json_schemas_of_its_types():
    registry = Registry()

    @handler("sum", registry=registry)
    def add(request: Numbers) -> Total:
        return Total(request.n)

    entry = registry.get("sum")
    assert entry is not None
    info = handler_info(entry, "my.module", at=12.5)
    assert info.name == "sum" and info.module == "my.module" and info.at == 12.5
    assert info.input_type == f"{__name__}.Numbers"
    assert info.input_schema == msgspec.json.schema(Numbers)
    assert info.input_schema["$defs"]["Numbers"]["required"] == ["n"]
    assert info.output_schema["$defs"]["Total"]["properties"] == {"value": {"type": "integer"}}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f(request: dict) -> Total: ...", "parameter 'request' is annotated <class 'dict'>, not a msgspec.Struct"),
        ("def f(request: Numbers) -> dict: ...", "its return annotation is <class 'dict'>, not a msgspec.Struct"),
        ("def f(request: Numbers): ...", "its return annotation is None, not a msgspec.Struct"),
        ("def f() -> Total: ...", "it takes ()"),
        ("def f(a: Numbers, b: Numbers, c: Context) -> Total: ...", "it takes (a:"),
        ("def f(request: Numbers, ctx: int) -> Total: ...", "its second parameter 'ctx' must be a Context"),
        ("def f(request: Numbers, *, ctx: Context) -> Total: ...", "it takes (request:"),
        ("def f(request: 'Missing') -> Total: ...", "its annotations cannot be resolved"),
    ],
)
def test_a_wrong_signature_is_refused_at_registration_naming_the_function(source: str, expected: str):
    namespace = {"Numbers": Numbers, "Total": Total, "Context": Context}
    exec(source, namespace)
    with pytest.raises(TypeError) as caught:
        handler("bad", registry=Registry())(namespace["f"])
    assert expected in str(caught.value)
    assert "handler 'bad'" in str(caught.value)


def test_bad_names_and_a_name_taken_twice_are_refused():
    registry = Registry()
    with pytest.raises(ValueError, match="handler name 'has space' is not valid"):
        handler("has space", registry=registry)

    @handler("one", registry=registry)
    def first(request: Numbers) -> Total:
        return Total(1)

    with pytest.raises(ValueError, match="handler name 'one' is registered twice"):

        @handler("one", registry=registry)
        def second(request: Numbers) -> Total:
            return Total(2)


def test_a_context_outside_a_worker_checks_progress_and_refuses_submits():
    ctx = Context(job_id="local")
    ctx.progress(0.5, "half")  # goes nowhere, but is checked
    ctx.heartbeat("cp")
    assert ctx.cancelled is False and ctx.attempt == 1 and ctx.checkpoint == ""
    for bad in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="progress fraction must be a number from 0 to 1"):
            ctx.progress(bad)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not linked to an executor"):
        ctx.submit(JobSpec(runtime=NoopRuntime()))


def test_a_linked_context_numbers_its_submits_for_their_idempotency_keys():
    from concurrent.futures import Future

    sent: list[tuple[bytes, str]] = []

    class Link:
        def progress(self, fraction: float, message: str) -> None: ...

        def heartbeat(self, checkpoint: str) -> None: ...

        def submit(self, spec_json: bytes, key: str) -> Future[str]:
            sent.append((spec_json, key))
            future: Future[str] = Future()
            future.set_result(f"id-{len(sent)}")
            return future

    ctx = Context(job_id="j1", link=Link())
    spec = JobSpec(runtime=NoopRuntime())
    assert ctx.submit(spec) == "id-1"
    assert asyncio.run(ctx.submit_async(spec)) == "id-2"
    assert ctx.submit(spec, key="mine") == "id-3"
    assert [key for _, key in sent] == ["j1.followup.1", "j1.followup.2", "mine"]
    assert msgspec.json.decode(sent[0][0], type=JobSpec) == spec
    with pytest.raises(TypeError, match="submit takes a JobSpec"):
        ctx.submit({"runtime": {}})  # type: ignore[arg-type]


def test_input_errors_name_the_field_under_the_jobs_input():
    registry = Registry()

    @handler("sum", registry=registry)
    def add(request: Numbers) -> Total:
        return Total(request.n)

    entry = registry.get("sum")
    assert entry is not None
    decoder = msgspec.json.Decoder(Numbers)
    cases = {
        b'{"n": "3"}': "Expected `int`, got `str` - at `$.runtime.input.n`",
        b'{"label": "x"}': "Object missing required field `n` - at `$.runtime.input`",
        b"[1]": "Expected `object`, got `array` - at `$.runtime.input`",
    }
    for raw, expected in cases.items():
        with pytest.raises(msgspec.ValidationError) as caught:
            decoder.decode(raw)
        message = input_error(entry, caught.value)
        assert message == f"the input of handler 'sum' does not match Numbers: {expected}"


def test_modules_load_by_dotted_name_or_file(tmp_path: Path):
    assert is_path("examples/handlers/digits.py") and is_path("x.py") and not is_path("pkg.mod")
    (tmp_path / "helper_for_handlers.py").write_text("VALUE = 41\n")
    path = tmp_path / "some_handlers.py"
    path.write_text("from helper_for_handlers import VALUE\nANSWER = VALUE + 1\n")
    module = import_handler_module(str(path))
    assert module.ANSWER == 42  # the file's own directory is importable, as for `python file.py`
    assert import_handler_module("json").__name__ == "json"
    with pytest.raises(ImportError, match="does not exist"):
        import_handler_module(str(tmp_path / "missing.py"))
    with pytest.raises(ModuleNotFoundError):
        import_handler_module("no_such_module_anywhere")


def test_frames_round_trip_over_a_pipe():
    read_fd, write_fd = os.pipe()
    try:
        messages = [protocol.Call(1, "h", b'{"n":1}', "job", 2, "/w", "cp"), protocol.Cancel(1)]
        for message in messages:
            os.write(write_fd, protocol.encode_frame(message))
        decoder = msgspec.msgpack.Decoder(protocol.Command)
        assert [decoder.decode(protocol.read_frame(read_fd) or b"") for _ in messages] == messages
        os.write(write_fd, b"\x00\x00")
        os.close(write_fd)
        write_fd = -1
        with pytest.raises(ValueError, match="ended inside a frame"):
            protocol.read_frame(read_fd)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def test_a_worker_gets_only_the_executors_path_lang_and_pythonpath():
    environ = {"PATH": "/bin", "LANG": "C.UTF-8", "PYTHONPATH": "/src", "AWS_SECRET_ACCESS_KEY": "x", "HOME": "/root"}
    env = worker_environment(environ, Path("/pool"), {"EXTRA": "1"})
    assert env == {"PATH": "/bin", "LANG": "C.UTF-8", "PYTHONPATH": "/src", "HOME": "/pool", "EXTRA": "1"}
    assert set(WORKER_ENV_KEEP) == {"PATH", "LANG", "PYTHONPATH"}


def test_only_a_job_its_worker_never_accepted_goes_to_another_worker_and_only_once():
    assert MAX_HANDOFFS == 1
    assert hand_off(accepted=False, handoffs=0, stopping=False)
    assert not hand_off(accepted=True, handoffs=0, stopping=False)  # some of it may have run: crashed
    assert not hand_off(accepted=False, handoffs=1, stopping=False)  # the second dying worker fails it
    assert not hand_off(accepted=False, handoffs=0, stopping=True)  # the pool stops: node_drained


def test_the_worker_accepts_a_call_before_running_any_of_it(tmp_path: Path):
    """A worker process gets one call and a closed pipe: Accepted comes before the job's end."""
    import subprocess
    import sys

    module = tmp_path / "accept_handlers.py"
    module.write_text(
        "import msgspec\nfrom jobmesh.sdk import handler\n"
        "class In(msgspec.Struct):\n    n: int\n"
        "class Out(msgspec.Struct):\n    n: int\n"
        "@handler('echo')\ndef echo(r: In) -> Out:\n    return Out(r.n)\n"
    )
    commands_in, commands_out = os.pipe()
    events_in, events_out = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobmesh.sdk.worker",
            "--commands",
            str(commands_in),
            "--events",
            str(events_out),
            str(module),
        ],
        pass_fds=(commands_in, events_out),
        stdout=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    os.close(commands_in)
    os.close(events_out)
    try:
        decoder = msgspec.msgpack.Decoder(protocol.Event)
        assert isinstance(decoder.decode(protocol.read_frame(events_in) or b""), protocol.Ready)
        os.write(commands_out, protocol.encode_frame(protocol.Call(7, "echo", b'{"n":3}', "j", 1, str(tmp_path))))
        first = decoder.decode(protocol.read_frame(events_in) or b"")
        second = decoder.decode(protocol.read_frame(events_in) or b"")
        assert first == protocol.Accepted(7)
        assert second == protocol.Done(7, b'{"n":3}')
    finally:
        os.close(commands_out)
        assert proc.wait(10) == 0
        os.close(events_in)


async def test_a_worker_that_comes_at_the_same_moment_as_the_abort_goes_back_to_the_idle_queue():
    from types import SimpleNamespace

    from jobmesh.executor.handlerpool import HandlerPool
    from jobmesh.executor.runner import AbortSignal

    pool = HandlerPool(["json"], workers=1)  # never started: only its idle queue is used
    abort = AbortSignal()
    acquiring = asyncio.ensure_future(pool._acquire(abort, 30.0))

    async def waiting() -> bool:
        return pool.waiting() == 1

    await eventually(waiting, timeout=5, what="the acquire to wait for a worker")
    worker = SimpleNamespace(dead=False, retired=False)
    pool._idle.put_nowait(worker)  # type: ignore[arg-type]
    abort.set("cancelled", "at the same moment")
    assert await asyncio.wait_for(acquiring, 5) == (None, pytest.approx(0.0, abs=1.0))
    assert pool._idle.qsize() == 1 and pool._idle.get_nowait() is worker
