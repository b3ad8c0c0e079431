"""The executor's part of the job lifecycle, against a real nats-server and real executor processes.

Leases in the node record (with progress and checkpoint), results (inline, object store,
over the limit), cancel (running, and before the dispatch came), superseded attempts, a
restart under the same node id after kill -9, and drain. The binder is faked by publishing
``JobBound`` and ``AttemptCancel`` on the node's subjects, as in ``tests/test_executor.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import msgspec
import nats
import nats.js.errors
import pytest

from jobmesh.contract import subjects
from jobmesh.contract.ids import attempt_key
from jobmesh.contract.messages.v1 import (
    JobFailed,
    JobLost,
    JobStarted,
    JobSucceeded,
    LifecycleEvent,
    LogLine,
    NodeInfo,
    ProcessRuntime,
)
from jobmesh.executor.outcomes import Outcome, terminal_message
from jobmesh.executor.restart import write_outcome
from jobmesh.runtime.provisioning import provision
from tests.helpers import eventually
from tests.test_executor import TTL, Collector, Harness, start_executor, stop_process

pytestmark = pytest.mark.integration

NODE = "exec-life-1"
INLINE = 1024
MAX = 100_000


@pytest.fixture(scope="module")
async def harness(nats_server, work_dir):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await provision(js, node_ttl=TTL)
    jobs, logs = Collector(LifecycleEvent), Collector(LogLine)
    sub_jobs = await js.subscribe(subjects.JOBS_ALL, cb=jobs.on_message, ordered_consumer=True)
    sub_logs = await js.subscribe(subjects.LOGS_ALL, cb=logs.on_message, ordered_consumer=True)
    yield Harness(nc, js, jobs, logs, work_dir)
    await sub_jobs.unsubscribe()
    await sub_logs.unsubscribe()
    await nc.close()


@pytest.fixture(scope="module")
async def executor(harness, nats_server, work_dir):
    proc = start_executor(
        nats_server.url,
        NODE,
        work_dir,
        JOBMESH_HEARTBEAT_SECONDS="0.3",
        JOBMESH_RESULT_INLINE_BYTES=str(INLINE),
        JOBMESH_RESULT_MAX_BYTES=str(MAX),
        JOBMESH_KILL_GRACE_SECONDS="3",
    )
    await eventually(lambda: harness.node_record(NODE), what="the node record in KV")
    yield proc
    assert stop_process(proc) == 0


def sh(script: str) -> ProcessRuntime:
    return ProcessRuntime(argv=["sh", "-c", script])


async def wait_for(harness: Harness, job_id: str, kind: type, what: str, timeout: float = 20.0):
    async def probe():
        return harness.jobs.of(job_id, kind)

    return (await eventually(probe, timeout=timeout, what=what))[0]


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is gone for our purpose
    except FileNotFoundError:
        return False


# --- leases, progress and checkpoints ------------------------------------------------------
async def test_the_record_lists_a_running_attempt_with_its_progress_and_checkpoint(harness, executor):
    script = (
        'echo "seen=$JOBMESH_CHECKPOINT"; '
        'echo "checkpoint step-7" > /dev/fd/$JOBMESH_PROGRESS_FD; '
        'echo "progress 0.5 half" > /dev/fd/$JOBMESH_PROGRESS_FD; '
        "exec sleep 30"
    )
    bound = await harness.dispatch(sh(script), node_id=NODE, checkpoint="step-3")

    async def leased():
        record = await harness.node_record(NODE)
        found = [a for a in record.attempts if a.job_id == bound.job_id] if record else []
        return found[0] if found and found[0].progress is not None and found[0].checkpoint == "step-7" else None

    lease = await eventually(leased, what="the attempt's lease with its progress and checkpoint")
    assert lease.attempt == 1 and lease.partition == 0
    assert lease.progress == 0.5 and lease.message == "half"
    started = harness.jobs.of(bound.job_id, JobStarted)[0]
    assert lease.started_at == started.at
    record = await harness.node_record(NODE)
    assert started.incarnation == record.incarnation

    async def said_checkpoint():
        return [line for line in harness.logs.of(bound.job_id) if line.line == "seen=step-3"]

    await eventually(said_checkpoint, what="JOBMESH_CHECKPOINT in the job's output")
    await harness.cancel(bound.job_id, node_id=NODE)
    done = await harness.terminal(bound.job_id)
    assert isinstance(done, JobFailed) and done.error.code == "cancelled"

    async def ended():
        record = await harness.node_record(NODE)
        key = f"{bound.job_id}:1"
        return record and key in record.ended and not [a for a in record.attempts if a.job_id == bound.job_id]

    await eventually(ended, what="the attempt listed as ended, no longer as running")


async def test_the_lease_keeps_the_checkpoint_it_started_from(harness, executor):
    bound = await harness.dispatch(sh("exec sleep 30"), node_id=NODE, checkpoint="resume-here")

    async def leased():
        record = await harness.node_record(NODE)
        return [a for a in record.attempts if a.job_id == bound.job_id] if record else None

    (lease,) = await eventually(leased, what="the attempt's lease")
    assert lease.checkpoint == "resume-here" and lease.progress is None
    await harness.cancel(bound.job_id, node_id=NODE)
    await harness.terminal(bound.job_id)


# --- results -------------------------------------------------------------------------------
async def test_a_small_text_result_travels_inline(harness, executor):
    bound = await harness.dispatch(sh('printf \'{"answer": 42}\' > "$JOBMESH_RESULT_PATH"'), node_id=NODE)
    done = await harness.terminal(bound.job_id)
    assert isinstance(done, JobSucceeded), done
    assert done.result == '{"answer": 42}' and done.result_bytes == 14 and done.result_ref == ""


async def test_a_larger_result_goes_to_the_object_store(harness, executor):
    size = INLINE * 5
    bound = await harness.dispatch(sh(f'head -c {size} /dev/urandom > "$JOBMESH_RESULT_PATH"'), node_id=NODE)
    done = await harness.terminal(bound.job_id)
    assert isinstance(done, JobSucceeded), done
    assert done.result == "" and done.result_bytes == size
    assert done.result_ref == subjects.result_key(bound.job_id, 1)
    store = await harness.js.object_store(subjects.OBJ_RESULTS)
    stored = await store.get(done.result_ref)
    assert len(stored.data) == size


async def test_a_result_over_the_limit_fails_the_attempt(harness, executor):
    bound = await harness.dispatch(sh(f'head -c {MAX + 1} /dev/zero > "$JOBMESH_RESULT_PATH"'), node_id=NODE)
    done = await harness.terminal(bound.job_id)
    assert isinstance(done, JobFailed), done
    assert done.error.code == "result_too_large" and done.exit_code == 0
    assert f"{MAX + 1} bytes" in done.error.message and "JOBMESH_RESULT_MAX_BYTES" in done.error.message


# --- cancel and superseded -----------------------------------------------------------------
async def test_cancel_stops_a_running_attempt_within_a_second(harness, executor):
    bound = await harness.dispatch(sh("sleep 30 & echo $!; wait"), node_id=NODE)

    async def child_pid():
        lines = harness.logs.of(bound.job_id)
        return int(lines[0].line) if lines else None

    pid = await eventually(child_pid, what="the child's pid")
    cancelled_at = time.monotonic()
    await harness.cancel(bound.job_id, node_id=NODE, reason="no longer wanted")

    async def gone():
        return not pid_alive(pid)

    await eventually(gone, timeout=1.0, what=f"the job's process group (child {pid}) to be gone within 1s")
    took = time.monotonic() - cancelled_at
    done = await harness.terminal(bound.job_id)
    assert isinstance(done, JobFailed) and done.error.code == "cancelled"
    assert done.error.message == "no longer wanted" and done.exit_code is None
    assert took < 1.0
    await eventually(lambda: harness.all_acked(NODE), what="the dispatch and the cancel to be acked")


async def test_cancel_before_the_dispatch_keeps_the_attempt_from_running(harness, executor, tmp_path):
    marker = tmp_path / "ran"
    job_id = f"early-{os.urandom(4).hex()}"
    await harness.cancel(job_id, node_id=NODE, reason="changed my mind")
    await harness.dispatch(sh(f"echo ran > {marker}"), node_id=NODE, job_id=job_id)
    done = await harness.terminal(job_id)
    assert isinstance(done, JobFailed) and done.error.code == "cancelled"
    assert done.error.message == "changed my mind" and done.started_at == 0.0
    assert not harness.jobs.of(job_id, JobStarted)
    assert not marker.exists()
    await eventually(lambda: harness.all_acked(NODE), what="the cancel to be acked once the refusal is durable")


async def test_a_dispatch_of_the_next_attempt_supersedes_the_running_one(harness, executor):
    first = await harness.dispatch(sh("exec sleep 30"), node_id=NODE)
    await wait_for(harness, first.job_id, JobStarted, "attempt 1 to start")
    await harness.dispatch(sh("echo second"), node_id=NODE, job_id=first.job_id, attempt=2)

    async def both_ended():
        ends = harness.jobs.of(first.job_id, JobSucceeded) + harness.jobs.of(first.job_id, JobFailed)
        return sorted(ends, key=lambda e: e.attempt) if len(ends) == 2 else None

    old, new = await eventually(both_ended, what="both attempts to end")
    assert isinstance(old, JobFailed) and old.attempt == 1 and old.error.code == "superseded"
    assert isinstance(new, JobSucceeded) and new.attempt == 2


async def _run_one(harness, node: str, marker):
    """Run one sleeping attempt on ``node``'s executor; return its first record, the
    dispatch and the pid of the attempt's command once it runs."""
    old = await eventually(lambda: harness.node_record(node), what="the first executor's record")
    bound = await harness.dispatch(sh(f"echo $$ >> {marker}; exec sleep 30"), node_id=node)
    await wait_for(harness, bound.job_id, JobStarted, "the attempt to start")

    async def ran():
        return marker.exists() and marker.read_text().strip()

    pid = int(await eventually(ran, what="the command to run"))
    return old, bound, pid


async def _new_incarnation_record(harness: Harness, node: str, old: NodeInfo) -> NodeInfo:
    """The node's record once a process other than ``old``'s has put it."""

    async def new_record():
        record = await harness.node_record(node)
        return record if record is not None and record.incarnation != old.incarnation else None

    return await eventually(new_record, what="the new incarnation's record")


# --- restart under the same node id --------------------------------------------------------
async def test_a_restarted_executor_reports_the_old_attempt_lost_and_never_runs_it_again(
    harness, nats_server, work_dir, shared_dir
):
    node = "exec-life-restart"
    marker = shared_dir / "runs"
    settings = {"JOBMESH_HEARTBEAT_SECONDS": "0.3"}
    first = start_executor(nats_server.url, node, work_dir, **settings)
    second = None
    try:
        old, bound, pid = await _run_one(harness, node, marker)
        # The fault: kill -9 shortly after the start (a deliberate sleep, not a wait before an assert).
        await asyncio.sleep(0.1)  # the fault's moment (a deliberate sleep: noqa)
        first.kill()
        await asyncio.to_thread(first.wait, 10)
        restarted_at = time.monotonic()
        second = start_executor(nats_server.url, node, work_dir, **settings)
        lost = await wait_for(harness, bound.job_id, JobLost, "JobLost from the restarted executor")
        assert time.monotonic() - restarted_at < 10  # python start-up included; no lease had to expire
        assert lost.node_id == node and lost.attempt == 1
        assert lost.reason == "executor restarted; the attempt was not running any more"

        async def old_process_gone():
            return not pid_alive(pid)

        await eventually(old_process_gone, timeout=5, what="the old attempt's process to be killed")

        record = await _new_incarnation_record(harness, node, old)
        assert not [a for a in record.attempts if a.job_id == bound.job_id]
        # The JobLost was durable before that first record, which lists the attempt as ended:
        # an executor replacing this one neither reports it again nor runs it.
        assert attempt_key(bound.job_id, 1) in record.ended
        # The dispatch comes again, as a redelivery would bring it: acked without running.
        await harness.redispatch(bound, f"{bound.job_id}:1:again")
        await eventually(lambda: harness.all_acked(node), what="the redelivered dispatch to be acked")
        assert marker.read_text().splitlines() == [str(pid)]
        assert not harness.jobs.of(bound.job_id, JobSucceeded) and not harness.jobs.of(bound.job_id, JobFailed)
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_process(proc)


async def test_an_executor_back_after_its_record_expired_reports_lost_what_its_lease_files_name(
    harness, nats_server, work_dir, shared_dir
):
    node = "exec-life-expired"
    marker = shared_dir / "runs-expired"
    settings = {"JOBMESH_HEARTBEAT_SECONDS": "0.3"}
    first = start_executor(nats_server.url, node, work_dir, **settings)
    second = None
    try:
        _old, bound, pid = await _run_one(harness, node, marker)
        first.kill()
        await asyncio.to_thread(first.wait, 10)
        # Its record goes as the node TTL would take it: the new process finds none to read.
        kv = await harness.js.key_value(subjects.KV_NODES)
        await kv.purge(node)
        assert await harness.node_record(node) is None
        second = start_executor(nats_server.url, node, work_dir, **settings)
        lost = await wait_for(harness, bound.job_id, JobLost, "JobLost from the restarted executor")
        assert lost.node_id == node and lost.attempt == 1 and lost.partition == bound.partition
        assert lost.reason == "executor restarted; the attempt was not running any more"

        async def old_process_gone():
            return not pid_alive(pid)

        await eventually(old_process_gone, timeout=5, what="the old attempt's process to be killed")
        root = work_dir / node

        async def cleared():
            return not (root / f"{bound.job_id}-1").exists() and not (root / f".{bound.job_id}-1").exists()

        # Removed once the new process is registered with its report durable: until then the
        # directories are the evidence a next start would need.
        await eventually(cleared, timeout=10, what="the old attempt's directories to be removed")
        # The dispatch comes again: acked without running, as for an orphan its record named.
        await harness.redispatch(bound, f"{bound.job_id}:1:again")
        await eventually(lambda: harness.all_acked(node), what="the redelivered dispatch to be acked")
        assert marker.read_text().splitlines() == [str(pid)]
        assert not harness.jobs.of(bound.job_id, JobSucceeded) and not harness.jobs.of(bound.job_id, JobFailed)
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_process(proc)


async def test_a_restarted_executor_publishes_the_end_an_attempt_kept_instead_of_a_loss(
    harness, nats_server, work_dir, shared_dir
):
    """The state a kill leaves between an attempt's end and the record put that lists it as
    ended: the old record still lists it running, its private directory holds the terminal
    event (written there before it is published). The next executor publishes that event
    (the same message id), not a JobLost that would race it and end the job twice."""
    node = "exec-life-kept"
    marker = shared_dir / "runs-kept"
    settings = {"JOBMESH_HEARTBEAT_SECONDS": "0.3"}
    first = start_executor(nats_server.url, node, work_dir, **settings)
    second = None
    try:
        old, bound, pid = await _run_one(harness, node, marker)
        first.kill()
        await asyncio.to_thread(first.wait, 10)
        record = await harness.node_record(node)
        assert record is not None and [a.job_id for a in record.attempts] == [bound.job_id]
        outcome = Outcome(0, None, result="kept")
        terminal = terminal_message(bound, node, outcome, bound.bound_at, time.time(), None)
        write_outcome(work_dir / node / f".{bound.job_id}-1", terminal)

        second = start_executor(nats_server.url, node, work_dir, **settings)
        ended = await wait_for(harness, bound.job_id, JobSucceeded, "the kept JobSucceeded, published again")
        assert ended.attempt == 1 and ended.node_id == node and ended.result == "kept"

        record = await _new_incarnation_record(harness, node, old)
        # The report was durable before the first record, which lists the attempt as ended.
        assert attempt_key(bound.job_id, 1) in record.ended
        assert not [a for a in record.attempts if a.job_id == bound.job_id]

        async def old_process_gone():
            return not pid_alive(pid)

        await eventually(old_process_gone, timeout=5, what="the old attempt's process to be killed")
        await harness.redispatch(bound, f"{bound.job_id}:1:again")
        await eventually(lambda: harness.all_acked(node), what="the redelivered dispatch to be acked")
        assert marker.read_text().splitlines() == [str(pid)]
        assert not harness.jobs.of(bound.job_id, JobLost)
        assert len(harness.jobs.of(bound.job_id, JobSucceeded)) == 1
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_process(proc)


async def test_a_kill_right_after_an_attempt_succeeded_is_not_reported_as_a_loss(
    harness, nats_server, work_dir, shared_dir
):
    """kill -9 as soon as an attempt's JobSucceeded is out, before a heartbeat would list it
    as ended (they come every 1.5 s here): the next executor must not report it lost, which
    would race the end to the scheduler and end the job twice."""
    node = "exec-life-ended"
    marker = shared_dir / "runs-ended"
    settings = {"JOBMESH_HEARTBEAT_SECONDS": "1.5"}
    first = start_executor(nats_server.url, node, work_dir, **settings)
    second = None
    try:
        old = await eventually(lambda: harness.node_record(node), what="the first executor's record")
        bound = await harness.dispatch(sh(f"echo $$ >> {marker}"), node_id=node)
        await wait_for(harness, bound.job_id, JobSucceeded, "the attempt to succeed")
        first.kill()
        await asyncio.to_thread(first.wait, 10)
        second = start_executor(nats_server.url, node, work_dir, **settings)

        record = await _new_incarnation_record(harness, node, old)
        assert attempt_key(bound.job_id, 1) in record.ended
        assert not [a for a in record.attempts if a.job_id == bound.job_id]
        # Whatever the new process reported was durable before that record: a JobLost would
        # be the last message on its subject now.
        lost_subject = subjects.node_event(bound.partition, subjects.LOST, node)
        with pytest.raises(nats.js.errors.NotFoundError):
            await harness.js.get_last_msg(subjects.STREAM_JOBS, lost_subject)
        root = work_dir / node

        async def cleared():
            return not (root / f".{bound.job_id}-1").exists() and not (root / f"{bound.job_id}-1").exists()

        await eventually(cleared, what="the attempt's directories to be removed")
        assert len(marker.read_text().splitlines()) == 1
    finally:
        for proc in (first, second):
            if proc is not None:
                stop_process(proc)


# --- drain ---------------------------------------------------------------------------------
async def test_drain_keeps_the_leases_alive_while_an_attempt_finishes_then_hands_back_the_rest(
    harness, nats_server, work_dir, shared_dir
):
    node = "exec-life-drain"
    go = shared_dir / "go"
    proc = start_executor(nats_server.url, node, work_dir, JOBMESH_DRAIN_SECONDS="6", JOBMESH_HEARTBEAT_SECONDS="0.3")
    try:
        await eventually(lambda: harness.node_record(node), what="the node's record")
        kv = await harness.js.key_value(subjects.KV_NODES)
        seen: list[NodeInfo | None] = []
        watcher = await kv.watch(node)

        async def watch() -> None:
            async for entry in watcher:
                if entry is not None:
                    seen.append(msgspec.json.decode(entry.value, type=NodeInfo) if entry.value else None)

        watching = asyncio.ensure_future(watch())
        finishing = await harness.dispatch(sh(f"while [ ! -e {go} ]; do sleep 0.05; done"), node_id=node)
        stuck = await harness.dispatch(sh("exec sleep 30"), node_id=node)

        async def both_leased():
            record = await harness.node_record(node)
            return record and {a.job_id for a in record.attempts} == {finishing.job_id, stuck.job_id}

        await eventually(both_leased, what="both attempts in the record")
        proc.send_signal(signal.SIGTERM)

        async def beating_while_draining():
            draining = [r for r in seen if r is not None and r.draining and len(r.attempts) == 2]
            return len({r.heartbeat_at for r in draining}) >= 3

        await eventually(beating_while_draining, timeout=5, what="heartbeats of the draining node listing both")
        go.touch()
        done = await harness.terminal(finishing.job_id)
        assert isinstance(done, JobSucceeded), done

        async def renewed_after():
            later = [r for r in seen if r is not None and r.draining and r.heartbeat_at > done.at]
            return later and [a.job_id for a in later[-1].attempts] == [stuck.job_id]

        await eventually(renewed_after, timeout=5, what="the remaining attempt's lease renewed after the first ended")
        handed_back = await harness.terminal(stuck.job_id)
        assert isinstance(handed_back, JobFailed) and handed_back.error.code == "node_drained"
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert await harness.node_record(node) is None
        watching.cancel()
        await watcher.stop()
    finally:
        stop_process(proc)
