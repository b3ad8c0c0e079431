"""The handler pool against real worker processes: results, log lines, progress, every
failure code, a fresh worker (a new pid) after a crash, a timeout or an abort, and the same
one after a raise."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from jobmesh.contract.messages.v1 import HandlerRuntime
from jobmesh.executor.handlerpool import HandlerLoadError, HandlerPool, spawn_plain
from jobmesh.executor.results import RESULT_FILE
from jobmesh.executor.runner import AbortSignal
from jobmesh.executor.runrequest import RunRequest
from tests.helpers import eventually

HANDLERS = '''
"""Handlers for the pool tests: each mode is one way a handler ends."""
import asyncio
import os
import sys
import time

import msgspec
from jobmesh.sdk import Context, handler

PID_AT_IMPORT = os.getpid()
print("imported in", PID_AT_IMPORT)


class Ask(msgspec.Struct):
    n: int
    mode: str = "ok"


class Answer(msgspec.Struct):
    value: int
    pid: int
    cwd: str = ""
    checkpoint: str = ""
    env_secret: str = ""


@handler("square")
def square(ask: Ask, ctx: Context) -> Answer:
    """Square a number, misbehaving as asked."""
    print(f"squaring {ask.n} in {os.getpid()}")
    print("to stderr", file=sys.stderr)
    ctx.progress(0.5, "half way")
    if ask.mode == "raise":
        raise ValueError(f"cannot square {ask.n}")
    if ask.mode == "sys_exit":
        sys.exit(4)
    if ask.mode == "exit":
        print("leaving with os._exit(3)")
        os._exit(3)
    if ask.mode == "hang":
        time.sleep(3600)  # the handler that hangs past its timeout  # noqa: sleep
    if ask.mode == "child_hang":
        import subprocess
        child = subprocess.Popen(["sleep", "3600"])
        print(f"child {child.pid}")
        time.sleep(3600)  # hangs with a child of its own  # noqa: sleep
    if ask.mode == "cooperate":
        while not ctx.cancelled:
            time.sleep(0.01)  # a handler polling ctx.cancelled, as a user's would  # noqa: sleep
        print("saw the cancel")
        return Answer(value=-1, pid=os.getpid())
    if ask.mode == "bad_output":
        return {"value": "not a number", "pid": 0}
    if ask.mode == "no_newline":
        sys.stdout.write("last words")
    ctx.heartbeat(f"done {ask.n}")
    return Answer(
        value=ask.n * ask.n,
        pid=os.getpid(),
        cwd=os.getcwd(),
        checkpoint=ctx.checkpoint,
        env_secret=os.environ.get("EXECUTOR_ONLY_SECRET", ""),
    )


@handler("slow_async")
async def slow_async(ask: Ask) -> Answer:
    await asyncio.sleep(ask.n / 1000)  # the handler's work: it is slow on purpose (noqa: sleep)
    return Answer(value=ask.n, pid=os.getpid())
'''


@dataclass
class Ran:
    """What a job did: its outcome and everything it reported."""

    outcome: object
    lines: list[tuple[str, str]] = field(default_factory=list)
    progress: list[tuple[float, str]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    result: dict | None = None
    seconds: float = 0.0

    @property
    def code(self) -> str | None:
        error = self.outcome.error  # type: ignore[attr-defined]
        return None if error is None else error.code


async def run_job(
    pool: HandlerPool,
    workdir: Path,
    handler: str,
    payload: object,
    *,
    timeout: float = 30.0,
    abort: AbortSignal | None = None,
    checkpoint: str = "",
    into: Ran | None = None,
) -> Ran:
    """Run one handler attempt through the pool, as an Attempt would; ``into`` collects its reports."""
    workdir.mkdir(parents=True, exist_ok=True)
    ran = into if into is not None else Ran(outcome=None)

    async def on_line(stream: str, line: str) -> None:
        ran.lines.append((stream, line))

    request = RunRequest(
        job_id="job1",
        attempt=2,
        name="job job1 attempt 2",
        runtime=HandlerRuntime(handler=handler, input=payload),
        workdir=workdir,
        env={},
        timeout=timeout,
        abort=abort or AbortSignal(),
        on_line=on_line,
        checkpoint=checkpoint,
        on_progress=lambda fraction, message: ran.progress.append((fraction, message)),
        on_checkpoint=ran.checkpoints.append,
    )
    started = time.perf_counter()
    ran.outcome = await pool.run(request)
    ran.seconds = time.perf_counter() - started
    path = workdir / RESULT_FILE
    if path.exists():
        ran.result = msgspec.json.decode(path.read_bytes())
    return ran


@pytest.fixture(scope="module")
def module_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("handlers") / "pool_test_handlers.py"
    path.write_text(HANDLERS)
    return path


@pytest.fixture
async def pool(module_path: Path, monkeypatch):
    monkeypatch.setenv("EXECUTOR_ONLY_SECRET", "must-not-leak")
    one = HandlerPool([str(module_path)], workers=1, kill_grace=0.5, pipe_grace=1.0)
    infos = await one.start()
    assert sorted(info.name for info in infos) == ["slow_async", "square"]
    yield one
    await one.stop()


async def test_a_job_returns_its_output_as_the_result_file_with_its_lines_progress_and_checkpoint(pool, tmp_path):
    ran = await run_job(pool, tmp_path / "w", "square", {"n": 7}, checkpoint="from attempt 1")
    assert ran.code is None and ran.outcome.exit_code == 0
    pid = pool.pids()[0]
    assert ran.result == {
        "value": 49,
        "pid": pid,
        "cwd": str(tmp_path / "w"),
        "checkpoint": "from attempt 1",
        "env_secret": "",  # the worker's environment is cleared
    }
    assert ("stdout", f"squaring 7 in {pid}") in ran.lines and ("stderr", "to stderr") in ran.lines
    assert ran.progress == [(0.5, "half way")] and ran.checkpoints == ["done 7"]
    assert f"squaring 7 in {pid}" in ran.outcome.output_tail
    # A last line without a newline is the job's too, not the next one's.
    ran = await run_job(pool, tmp_path / "w2", "square", {"n": 1, "mode": "no_newline"})
    stdout = [line for stream, line in ran.lines if stream == "stdout"]
    assert ran.code is None and stdout[-1] == "last words"


async def test_a_raise_fails_handler_failed_with_its_traceback_and_the_worker_serves_the_next_job(pool, tmp_path):
    before = (await run_job(pool, tmp_path / "a", "square", {"n": 2})).result["pid"]
    ran = await run_job(pool, tmp_path / "b", "square", {"n": 3, "mode": "raise"})
    assert ran.code == "handler_failed"
    assert ran.outcome.error.message == "handler 'square' raised ValueError: cannot square 3"
    stderr = [line for stream, line in ran.lines if stream == "stderr"]
    assert stderr[1] == "Traceback (most recent call last):" and stderr[-1] == "ValueError: cannot square 3"
    assert "ValueError: cannot square 3" in ran.outcome.output_tail and not (tmp_path / "b" / RESULT_FILE).exists()
    after = await run_job(pool, tmp_path / "c", "square", {"n": 4})
    assert after.code is None and after.result["value"] == 16
    assert after.result["pid"] == before and _alive(before)  # the exception unwound: no new worker


async def test_sys_exit_fails_handler_failed_and_the_next_job_gets_a_fresh_worker(pool, tmp_path):
    # Not a plain Exception: the worker is not trusted to serve on after it.
    before = (await run_job(pool, tmp_path / "a", "square", {"n": 2})).result["pid"]
    ran = await run_job(pool, tmp_path / "b", "square", {"n": 3, "mode": "sys_exit"})
    assert ran.code == "handler_failed" and "SystemExit" in ran.outcome.error.message
    after = await run_job(pool, tmp_path / "c", "square", {"n": 4})
    assert after.code is None and after.result["pid"] != before


async def test_os_exit_fails_handler_crashed_and_the_next_job_gets_a_fresh_worker(pool, tmp_path):
    before = (await run_job(pool, tmp_path / "a", "square", {"n": 2})).result["pid"]
    ran = await run_job(pool, tmp_path / "b", "square", {"n": 3, "mode": "exit"})
    assert ran.code == "handler_crashed"
    assert ran.outcome.error.message == f"the worker running handler 'square' (pid {before}) exited with code 3"
    assert ("stdout", "leaving with os._exit(3)") in ran.lines  # printed right before it died
    after = await run_job(pool, tmp_path / "c", "square", {"n": 4})
    assert after.code is None and after.result["pid"] != before


async def test_a_hang_past_the_run_timeout_fails_timeout_kills_the_worker_and_the_next_job_gets_a_fresh_one(
    pool, tmp_path
):
    before = (await run_job(pool, tmp_path / "a", "square", {"n": 2})).result["pid"]
    ran = await run_job(pool, tmp_path / "b", "square", {"n": 3, "mode": "hang"}, timeout=0.5)
    assert ran.code == "timeout" and ran.outcome.error.message == "ran longer than its run timeout of 0.5s"
    assert ran.seconds < 5  # 0.5 s timeout + 0.5 s kill grace, then killed
    assert not _alive(before)
    after = await run_job(pool, tmp_path / "c", "square", {"n": 4})
    assert after.code is None and after.result["pid"] != before


async def test_a_timeout_kills_what_the_handler_started_too(pool, tmp_path):
    ran = await run_job(pool, tmp_path / "a", "square", {"n": 1, "mode": "child_hang"}, timeout=0.5)
    assert ran.code == "timeout"
    child = int(next(line for _, line in ran.lines if line.startswith("child ")).split()[1])
    await eventually(lambda: _true(not _alive(child)), timeout=5, what="the handler's child to be killed")


async def test_an_abort_tells_the_handler_then_fails_with_the_aborts_reason(pool, tmp_path):
    before = pool.pids()[0]
    abort = AbortSignal()
    ran = Ran(outcome=None)
    job = asyncio.ensure_future(
        run_job(pool, tmp_path / "a", "square", {"n": 1, "mode": "cooperate"}, abort=abort, into=ran)
    )
    await eventually(lambda: _true(ran.progress), what="the handler to report progress")
    abort.set("cancelled", "cancelled by the test")
    await job
    assert ran.code == "cancelled" and ran.outcome.error.message == "cancelled by the test"
    assert ("stdout", "saw the cancel") in ran.lines  # ctx.cancelled turned true in the worker
    assert ran.result is None  # what it returned after the cancel is not the job's result
    after = await run_job(pool, tmp_path / "b", "square", {"n": 4})
    assert after.code is None and after.result["pid"] != before


async def test_an_abort_before_the_job_starts_runs_nothing(pool, tmp_path):
    abort = AbortSignal()
    abort.set("node_drained", "draining")
    ran = await run_job(pool, tmp_path / "a", "square", {"n": 1}, abort=abort)
    assert ran.code == "node_drained" and ran.lines == []


async def test_a_job_waiting_for_a_busy_worker_times_out_counting_the_wait(pool, tmp_path):
    hold = AbortSignal()
    busy = Ran(outcome=None)
    first = asyncio.ensure_future(
        run_job(pool, tmp_path / "a", "square", {"n": 1, "mode": "cooperate"}, abort=hold, into=busy)
    )
    try:
        await eventually(lambda: _true(busy.progress), what="the only worker to be busy")
        queued = await asyncio.wait_for(run_job(pool, tmp_path / "b", "square", {"n": 2}, timeout=0.5), 10)
        assert queued.code == "timeout" and queued.lines == []
        assert queued.outcome.error.message.startswith("waited 0.5s for a free handler worker")
        assert "past its run timeout of 0.5s (the wait counts against the run timeout)" in queued.outcome.error.message
    finally:
        hold.set("cancelled", "the test is done with it")
        await first
    assert busy.code == "cancelled"


async def test_what_is_left_of_the_run_timeout_after_the_wait_bounds_the_run(pool, tmp_path):
    hold = AbortSignal()
    busy = Ran(outcome=None)
    first = asyncio.ensure_future(
        run_job(pool, tmp_path / "a", "square", {"n": 1, "mode": "cooperate"}, abort=hold, into=busy)
    )
    await eventually(lambda: _true(busy.progress), what="the only worker to be busy")
    queued = asyncio.ensure_future(run_job(pool, tmp_path / "b", "square", {"n": 2, "mode": "hang"}, timeout=3.0))
    await eventually(lambda: _true(pool.waiting()), what="the second job to wait for a worker")
    hold.set("cancelled", "make room")
    await first
    ran = await asyncio.wait_for(queued, 15)
    assert ran.code == "timeout" and any(line.startswith("squaring 2 in ") for _, line in ran.lines)
    assert ran.outcome.error.message.startswith("ran longer than its run timeout of 3s (")
    assert ran.outcome.error.message.endswith("s of it waiting for a free handler worker)")


async def test_an_attempt_cancelled_while_it_waits_for_a_worker_takes_none_with_it(pool, tmp_path):
    hold = AbortSignal()
    busy = Ran(outcome=None)
    first = asyncio.ensure_future(
        run_job(pool, tmp_path / "a", "square", {"n": 1, "mode": "cooperate"}, abort=hold, into=busy)
    )
    await eventually(lambda: _true(busy.progress), what="the only worker to be busy")
    waiting = asyncio.ensure_future(run_job(pool, tmp_path / "b", "square", {"n": 2}))
    await eventually(lambda: _true(pool.waiting()), what="the second job to wait for a worker")
    waiting.cancel()  # its task goes (the executor stops it), its Queue.get must not live on
    with pytest.raises(asyncio.CancelledError):
        await waiting
    hold.set("cancelled", "make room")
    await first
    ran = await asyncio.wait_for(run_job(pool, tmp_path / "c", "square", {"n": 3}), 15)
    assert ran.code is None and ran.result["value"] == 9


async def test_an_abort_while_waiting_ends_the_wait_and_keeps_the_worker(pool, tmp_path):
    hold = AbortSignal()
    busy = Ran(outcome=None)
    first = asyncio.ensure_future(
        run_job(pool, tmp_path / "a", "square", {"n": 1, "mode": "cooperate"}, abort=hold, into=busy)
    )
    await eventually(lambda: _true(busy.progress), what="the only worker to be busy")
    abort = AbortSignal()
    waiting = asyncio.ensure_future(run_job(pool, tmp_path / "b", "square", {"n": 2}, abort=abort))
    await eventually(lambda: _true(pool.waiting()), what="the second job to wait for a worker")
    abort.set("cancelled", "cancelled while queued")
    ran = await asyncio.wait_for(waiting, 10)
    assert ran.code == "cancelled" and ran.outcome.error.message == "cancelled while queued" and ran.lines == []
    hold.set("cancelled", "make room")
    await first
    after = await asyncio.wait_for(run_job(pool, tmp_path / "c", "square", {"n": 3}), 15)
    assert after.code is None and after.result["value"] == 9


async def test_bad_input_fails_input_invalid_naming_the_field_and_keeps_the_worker(pool, tmp_path):
    before = pool.pids()
    ran = await run_job(pool, tmp_path / "a", "square", {"n": "seven"})
    assert ran.code == "input_invalid"
    assert ran.outcome.error.message == (
        "the input of handler 'square' does not match Ask: Expected `int`, got `str` - at `$.runtime.input.n`"
    )
    missing = await run_job(pool, tmp_path / "b", "square", {"mode": "ok"})
    assert "Object missing required field `n` - at `$.runtime.input`" in missing.outcome.error.message
    assert pool.pids() == before  # no handler code ran: the worker serves on


async def test_output_that_does_not_match_its_type_fails_handler_failed(pool, tmp_path):
    ran = await run_job(pool, tmp_path / "a", "square", {"n": 1, "mode": "bad_output"})
    assert ran.code == "handler_failed"
    assert ran.outcome.error.message.startswith("handler 'square' returned output that does not match Answer:")
    assert "`$.value`" in ran.outcome.error.message and ran.result is None


async def test_an_unknown_handler_fails_handler_missing_naming_what_the_node_hosts(pool, tmp_path):
    ran = await run_job(pool, tmp_path / "a", "cube", {"n": 1})
    assert ran.code == "handler_missing"
    assert ran.outcome.error.message == "this node's handler pool has no handler 'cube' (it hosts: slow_async, square)"


async def test_an_async_handler_runs_on_the_workers_loop(pool, tmp_path):
    ran = await run_job(pool, tmp_path / "a", "slow_async", {"n": 20})
    assert ran.code is None and ran.result == {
        "value": 20,
        "pid": pool.pids()[0],
        "cwd": "",
        "checkpoint": "",
        "env_secret": "",
    }


async def test_a_worker_killed_between_jobs_is_replaced(pool, tmp_path):
    before = pool.pids()[0]
    os.kill(before, 9)
    await eventually(lambda: _true(pool.pids() and pool.pids()[0] != before), what="a replacement worker")
    ran = await run_job(pool, tmp_path / "a", "square", {"n": 5})
    assert ran.code is None and ran.result["pid"] not in (before,)


async def test_a_job_handed_to_a_worker_that_died_before_accepting_it_runs_on_a_replacement(pool, tmp_path):
    before = pool.pids()[0]
    spawned: list[str] = []

    async def on_spawned() -> None:
        spawned.append("spawned")

    os.kill(before, 9)
    # No await between the kill and the hand-over: the pool has not read the end of the
    # worker's pipe yet, so it still takes the dead worker for an idle one.
    request = RunRequest(
        job_id="job1",
        attempt=1,
        name="job job1 attempt 1",
        runtime=HandlerRuntime(handler="square", input={"n": 6}),
        workdir=tmp_path,
        env={},
        timeout=30,
        abort=AbortSignal(),
        on_line=_no_line,
        on_spawned=on_spawned,
    )
    outcome = await asyncio.wait_for(pool.run(request), 20)
    assert outcome.error is None, outcome.error
    result = msgspec.json.decode((tmp_path / RESULT_FILE).read_bytes())
    assert result["value"] == 36 and result["pid"] != before and result["pid"] == pool.pids()[0]
    assert spawned == ["spawned"]  # one attempt, started once, whichever worker ran it


async def test_an_aborted_attempt_takes_no_idle_worker(pool):
    """A cancel that lands while a job's first worker's death is handled: the job must not
    start on a second worker (its handler would run after the cancel)."""
    abort = AbortSignal()
    abort.set("cancelled", "cancelled by the user")
    idle = pool._idle.qsize()
    assert idle >= 1
    worker, waited = await pool._acquire(abort, 30.0)
    assert worker is None and waited == 0.0
    assert pool._idle.qsize() == idle  # nobody took it
    worker, _ = await pool._acquire(AbortSignal(), 0.0)  # no time left: none taken either
    assert worker is None and pool._idle.qsize() == idle


async def test_workers_run_jobs_side_by_side_and_a_model_stays_loaded(module_path, tmp_path):
    pool = HandlerPool([str(module_path)], workers=2)
    try:
        await pool.start()
        first, second = await asyncio.gather(
            run_job(pool, tmp_path / "a", "slow_async", {"n": 500}),
            run_job(pool, tmp_path / "b", "slow_async", {"n": 500}),
        )
        assert {first.result["pid"], second.result["pid"]} == set(pool.pids())
        # Both ran at once: together they took far less than two in a row.
        assert max(first.seconds, second.seconds) < 0.9
    finally:
        await pool.stop()
    assert pool.pids() == []


async def test_the_spawn_is_injectable_and_gets_a_cleared_environment(module_path, tmp_path, monkeypatch):
    monkeypatch.setenv("EXECUTOR_ONLY_SECRET", "must-not-leak")
    seen: list[tuple[list[str], dict[str, str], Path, tuple[int, ...]]] = []

    async def recording_spawn(argv, env, cwd, pass_fds):
        seen.append((list(argv), dict(env), cwd, tuple(pass_fds)))
        return await spawn_plain(argv, env, cwd, pass_fds)

    home = tmp_path / "home"
    pool = HandlerPool([str(module_path)], workers=1, spawn=recording_spawn, env={"POOL_VAR": "1"}, home=home)
    try:
        await pool.start()
        ran = await run_job(pool, tmp_path / "a", "square", {"n": 3})
    finally:
        await pool.stop()
    assert ran.result is not None and ran.result["value"] == 9
    [(argv, env, cwd, fds)] = seen
    assert argv[:3] == [sys.executable, "-m", "jobmesh.sdk.worker"] and argv[-1] == str(module_path)
    assert argv[argv.index("--commands") + 1] == str(fds[0]) and argv[argv.index("--events") + 1] == str(fds[1])
    assert set(env) <= {"PATH", "LANG", "PYTHONPATH", "HOME", "POOL_VAR"} and env["HOME"] == str(home) == str(cwd)
    assert env["POOL_VAR"] == "1"


async def test_a_module_that_fails_to_import_fails_the_start_naming_it(tmp_path):
    broken = tmp_path / "broken_handlers.py"
    broken.write_text("import no_such_package_here\n")
    pool = HandlerPool([str(broken)], workers=2)
    with pytest.raises(HandlerLoadError) as caught:
        await pool.start()
    assert caught.value.module == str(broken)
    assert str(caught.value).startswith(f"handler module {str(broken)!r} failed to import: ModuleNotFoundError")
    assert pool.pids() == []
    pool = HandlerPool(["no_such_dotted.module"], workers=1)
    with pytest.raises(HandlerLoadError) as caught:
        await pool.start()
    assert str(caught.value).startswith("handler module 'no_such_dotted.module' failed to import")


async def test_on_spawned_is_awaited_once_whether_the_job_runs_or_not(pool, tmp_path):
    calls: list[str] = []

    async def spawned() -> None:
        calls.append("spawned")

    for handler, abort in (("square", None), ("cube", None), ("square", AbortSignal())):
        if abort is not None:
            abort.set("cancelled", "before the start")
        request = RunRequest(
            job_id="j",
            attempt=1,
            name="job j attempt 1",
            runtime=HandlerRuntime(handler=handler, input={"n": 2}),
            workdir=tmp_path,
            env={},
            timeout=10,
            abort=abort or AbortSignal(),
            on_line=_no_line,
            on_spawned=spawned,
        )
        await pool.run(request)
        assert calls == ["spawned"]
        calls.clear()


async def test_two_modules_registering_one_name_fail_the_start_naming_the_second(module_path, tmp_path):
    twin = tmp_path / "twin_handlers.py"
    twin.write_text(HANDLERS.replace("PID_AT_IMPORT", "TWIN_PID"))
    pool = HandlerPool([str(module_path), str(twin)], workers=1)
    with pytest.raises(HandlerLoadError) as caught:
        await pool.start()
    assert caught.value.module == str(twin)
    assert "ValueError: handler name" in str(caught.value) and "is registered twice" in str(caught.value)
    with pytest.raises(ValueError, match="at least one handler module"):
        HandlerPool([], workers=1)


async def test_a_handler_with_a_wrong_signature_fails_the_start_naming_the_function(tmp_path):
    bad = tmp_path / "bad_signature.py"
    bad.write_text(
        textwrap.dedent(
            """
            import msgspec
            from jobmesh.sdk import handler

            class In(msgspec.Struct):
                n: int

            @handler("wrong")
            def wrong(request: In) -> dict:
                return {}
            """
        )
    )
    pool = HandlerPool([str(bad)], workers=1)
    with pytest.raises(HandlerLoadError) as caught:
        await pool.start()
    assert "TypeError: handler 'wrong' (bad_signature.wrong) must be declared as" in str(caught.value)


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs: a zombie (killed, not yet reaped by its new parent) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def _no_line(stream: str, line: str) -> None:
    pass


async def _true(value: object) -> bool:
    return bool(value)
