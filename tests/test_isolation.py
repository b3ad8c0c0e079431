"""Isolation on real processes: a whole cluster with two executors on this machine, one at the
level its probe finds (sandbox: bubblewrap 0.8.0, cgroup v1) and one capped at
JOBMESH_NODE_ISOLATION=process, and jobs that try to break out.

Jobs that must run in the sandbox ask for ``isolation: sandbox``; jobs meant for the process
node ask for its label. What a job found is read from its output tail and final state, as a
user would (``jobmesh status``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import (
    Constraints,
    ErrorReply,
    JobSpec,
    JobView,
    ProcessRuntime,
    Resources,
    RetryPolicy,
    Submission,
)
from jobmesh.errors import InvalidMessage, NotFound
from tests.cluster_fixtures import Service, node_record
from tests.helpers import eventually

pytestmark = pytest.mark.integration

SANDBOX_NODE = "iso-sandbox"
PROCESS_NODE = "iso-process"
CONTROL = ("trigger", "scheduler", "binder", "tracker")
ONCE = RetryPolicy(max_attempts=1)
NODE_ENV = {"JOBMESH_NODE_CPU_MILLI": "4000", "JOBMESH_NODE_MEMORY_MB": "4096", "JOBMESH_CONTAINER_ENGINE": ""}


@pytest.fixture(scope="module")
def open_dir() -> Iterator[Path]:
    """A directory tree the sandbox uid may walk (pytest's own is 0700): the process node's
    work directory, and files a job must not be able to write."""
    root = Path(tempfile.mkdtemp(prefix="jobmesh-iso-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
async def iso_cluster(make_module_cluster, open_dir):
    sandbox = Service("executor", {**NODE_ENV, "JOBMESH_NODE_ID": SANDBOX_NODE}, tag="-sandbox")
    process = Service(
        "executor",
        {
            **NODE_ENV,
            "JOBMESH_NODE_ID": PROCESS_NODE,
            "JOBMESH_NODE_ISOLATION": "process",
            "JOBMESH_NODE_LABELS": "kind=plain",
            "JOBMESH_WORK_DIR": str(open_dir / "work"),
        },
        tag="-process",
    )
    return await make_module_cluster([*CONTROL, sandbox, process], name="iso")


@pytest.fixture
async def client(nats_server, iso_cluster):
    c = await Client.connect(nats_server.url)
    yield c
    await c.close()


def sandboxed(script: str, **kw) -> JobSpec:
    return JobSpec(
        runtime=ProcessRuntime(argv=["sh", "-c", script]),
        constraints=Constraints(isolation="sandbox"),
        retry=ONCE,
        **kw,
    )


def on_process_node(script: str, **kw) -> JobSpec:
    return JobSpec(
        runtime=ProcessRuntime(argv=["sh", "-c", script]), constraints=Constraints(labels={"kind": "plain"}), **kw
    )


async def submit(client: Client, spec: JobSpec) -> str:
    [job_id] = (await client.submit([Submission(spec=spec)])).job_ids
    return job_id


async def view(client: Client, job_id: str) -> JobView | None:
    try:
        return await client.get(job_id)
    except NotFound:
        return None


async def final(client: Client, job_id: str, timeout: float = 60.0) -> JobView:
    async def ended() -> JobView | None:
        v = await view(client, job_id)
        return v if v is not None and v.final else None

    return await eventually(ended, timeout=timeout, what=f"job {job_id} to end")


async def running(client: Client, job_id: str) -> JobView:
    async def is_running() -> JobView | None:
        v = await view(client, job_id)
        return v if v is not None and v.state == "running" else None

    return await eventually(is_running, what=f"job {job_id} to run")


async def test_each_node_advertises_its_level_and_what_its_probe_found(iso_cluster, nats_server):
    sandbox = await eventually(lambda: node_record(nats_server.url, SANDBOX_NODE), what="the sandbox node")
    assert sandbox.isolation == "sandbox"
    assert sandbox.probe["sandbox"] == "bubblewrap 0.8.0"
    assert sandbox.probe["cgroup"] == "v1 memory,cpu,pids"
    # Each executor of this machine claimed a block (at most 4096 uids) of its own.
    own = re.fullmatch(
        r"each attempt its own of (\d+)\.\.(\d+), handler workers 65534:65534 \(the executor runs as root\)",
        sandbox.probe["uid"],
    )
    assert own is not None and 0 < int(own[2]) - int(own[1]) < 4096 and 2_000_000_000 <= int(own[1]) < 2_000_065_536
    assert sandbox.network and "process" in sandbox.runtimes and "container" not in sandbox.runtimes
    plain = await eventually(lambda: node_record(nats_server.url, PROCESS_NODE), what="the process node")
    assert plain.isolation == "process"
    assert plain.probe["sandbox"] == "not probed: JOBMESH_NODE_ISOLATION=process"
    assert plain.probe["uid"] != sandbox.probe["uid"], "two executors of one machine share attempt uids"


async def test_a_job_runs_as_a_uid_of_its_own_in_a_fresh_directory_with_a_cleared_environment(client):
    script = 'id -u; pwd; ls -A | wc -l; echo "nats=${JOBMESH_NATS_URL:-unset} home=$HOME"; read line; echo "in:$line"'
    done = await final(client, await submit(client, sandboxed(script, stdin="from the spec\n")))
    assert done.state == "succeeded", done.attempts[-1]
    uid, cwd, entries, env, stdin = done.attempts[-1].output_tail.splitlines()
    assert (
        2_000_000_000 <= int(uid) < 2_000_065_536
        and cwd.endswith(f"/{SANDBOX_NODE}/{done.job_id}-1")
        and entries.strip() == "0"
    )
    assert env == f"nats=unset home={cwd}"
    assert stdin == "in:from the spec"
    assert done.node_id == SANDBOX_NODE


async def test_a_fork_bomb_fails_pids_exceeded_while_another_job_on_the_node_succeeds(client):
    bomb = await submit(client, sandboxed("b() { b | b & }; b; sleep 60"))
    await running(client, bomb)
    started = time.monotonic()
    other = await submit(client, sandboxed("echo still here"))
    done = await final(client, other)
    took = time.monotonic() - started
    assert done.state == "succeeded" and done.node_id == SANDBOX_NODE
    assert done.attempts[-1].output_tail == "still here\n"
    bombed = await final(client, bomb)
    print(f"fork bomb: the other job took {took:.2f}s; the bomb ended {bombed.attempts[-1].error}")
    assert bombed.node_id == SANDBOX_NODE and bombed.state == "failed"
    assert bombed.attempts[-1].error.code == "pids_exceeded"
    assert "JOBMESH_ATTEMPT_PIDS_MAX" in bombed.attempts[-1].error.message


async def test_allocating_past_the_memory_limit_ends_oom(client):
    spec = JobSpec(
        runtime=ProcessRuntime(argv=[sys.executable, "-c", "b = bytearray(400 * 1024 * 1024); print(len(b))"]),
        constraints=Constraints(isolation="sandbox"),
        resources=Resources(memory_mb=64),
        retry=ONCE,
    )
    done = await final(client, await submit(client, spec))
    assert done.state == "failed"
    assert done.attempts[-1].error.code == "oom", done.attempts[-1]
    assert "64 MiB" in done.attempts[-1].error.message


def tries(*targets: str) -> str:
    """A script that tries to write each target and says for each whether it could."""
    return "; ".join(f'(echo x > {t}) 2>/dev/null && echo "wrote {t}" || echo "refused {t}"' for t in targets)


async def test_a_write_outside_the_work_directory_fails_at_both_levels(client, open_dir, iso_cluster):
    target = open_dir / "outside"
    work_root = iso_cluster.work_dir / "nodes" / SANDBOX_NODE
    script = tries(str(target), "/etc/jobmesh-x", "/usr/jobmesh-x", str(work_root / "x"), "$HOME/inside")
    done = await final(client, await submit(client, sandboxed(script)))
    assert done.state == "succeeded"
    assert done.attempts[-1].output_tail.splitlines() == [
        f"refused {target}",
        "refused /etc/jobmesh-x",
        "refused /usr/jobmesh-x",
        f"refused {work_root / 'x'}",
        "wrote $HOME/inside".replace("$HOME", f"{work_root}/{done.job_id}-1"),
    ]
    plain = await final(client, await submit(client, on_process_node(tries(str(target), "/etc/jobmesh-x"))))
    assert plain.node_id == PROCESS_NODE and plain.state == "succeeded"
    assert plain.attempts[-1].output_tail.splitlines() == [f"refused {target}", "refused /etc/jobmesh-x"]
    assert not target.exists() and not Path("/etc/jobmesh-x").exists() and not (work_root / "x").exists()


async def test_a_job_cannot_read_another_running_jobs_work_directory(client, iso_cluster):
    holder = await submit(client, sandboxed("echo private > mine; sleep 60"))
    first = await running(client, holder)
    theirs = iso_cluster.work_dir / "nodes" / SANDBOX_NODE / f"{holder}-1"
    await eventually(lambda: asyncio.to_thread((theirs / "mine").exists), what="the first job's file")
    try:
        reader = await final(client, await submit(client, sandboxed(f"cat {theirs}/mine; ls {theirs}")))
        assert reader.state == "failed" and reader.node_id == first.node_id
        assert "private" not in reader.attempts[-1].output_tail
        assert "No such file or directory" in reader.attempts[-1].output_tail
    finally:
        await client.cancel(holder)


async def test_a_job_can_reopen_its_stdin_by_name_at_both_levels(client, nats_server):
    """``cat /dev/stdin`` opens the stdin file anew, which checks its owner and mode: a stdin
    object is fetched into a file of mode 0600, which must be the job's, not root's."""
    data = b"by name\n"
    name = subjects.upload_key(hashlib.sha256(data).hexdigest())
    conn = await nats.connect(nats_server.url)
    try:
        await (await conn.jetstream().object_store(subjects.OBJ_UPLOADS)).put(name, data)
    finally:
        await conn.close()
    for make in (sandboxed, on_process_node):
        for spec in (make("cat /dev/stdin", stdin="by name\n"), make("cat /dev/stdin", stdin_object=name)):
            done = await final(client, await submit(client, spec))
            assert done.state == "succeeded", done.attempts[-1]
            assert done.attempts[-1].output_tail == "by name\n"


async def test_process_level_jobs_run_as_different_uids_and_cannot_read_or_signal_each_other(client, open_dir):
    """The process level shares the host's file system and pids: only the uid separates jobs."""
    holder = await submit(
        client, on_process_node("id -u > mine; echo private >> mine; chmod 644 mine; exec sleep 61.5")
    )
    first = await running(client, holder)
    theirs = open_dir / "work" / PROCESS_NODE / f"{holder}-1"
    await eventually(lambda: asyncio.to_thread(lambda: (theirs / "mine").exists()), what="the first job's file")
    holder_uid = int((theirs / "mine").read_text().split()[0])
    try:
        script = (
            f"id -u; cat {theirs}/mine || echo unreadable; ls {theirs} || echo unlisted; "
            f"ls {theirs.parent} || echo no-listing; "
            'pid=$(pgrep -f "slee[p] 61.5"); kill -0 $pid && echo signalled || echo refused'
        )
        reader = await final(client, await submit(client, on_process_node(script)))
        assert reader.node_id == first.node_id == PROCESS_NODE
        lines = reader.attempts[-1].output_tail.splitlines()
        assert "private" not in reader.attempts[-1].output_tail, lines
        assert int(lines[0]) != holder_uid and 2_000_000_000 <= holder_uid < 2_000_065_536
        assert "unreadable" in lines and "unlisted" in lines and "no-listing" in lines and "refused" in lines, lines
        assert "Permission denied" in reader.attempts[-1].output_tail
    finally:
        await client.cancel(holder)


@pytest.fixture
async def listener() -> Iterator[tuple[int, list[str]]]:
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append((await reader.readline()).decode().strip())
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield port, seen
    server.close()
    await server.wait_closed()


async def test_outbound_tcp_fails_without_network_and_succeeds_with_it(client, listener):
    port, seen = listener
    connect = (
        f"import socket, sys; s = socket.create_connection(('127.0.0.1', {port}), timeout=5); "
        "s.sendall(sys.argv[1].encode() + b'\\n'); print('connected')"
    )

    def spec(network: bool) -> JobSpec:
        argv = [sys.executable, "-c", connect, "with" if network else "without"]
        return JobSpec(
            runtime=ProcessRuntime(argv=argv), constraints=Constraints(isolation="sandbox"), network=network, retry=ONCE
        )

    without = await final(client, await submit(client, spec(False)))
    assert without.state == "failed" and "ConnectionRefusedError" in without.attempts[-1].output_tail
    with_network = await final(client, await submit(client, spec(True)))
    assert with_network.state == "succeeded" and with_network.attempts[-1].output_tail == "connected\n"
    assert seen == ["with"]


async def test_a_job_asking_for_sandbox_is_never_placed_on_the_process_node(client):
    ids = [await submit(client, sandboxed("echo placed")) for _ in range(6)]
    views = [await final(client, job_id) for job_id in ids]
    assert {v.node_id for v in views} == {SANDBOX_NODE} and {v.state for v in views} == {"succeeded"}
    # Only the process node has the label: a sandbox job that needs it waits, unplaced.
    stuck = await submit(
        client,
        JobSpec(
            runtime=ProcessRuntime(argv=["true"]),
            constraints=Constraints(isolation="sandbox", labels={"kind": "plain"}),
        ),
    )
    try:

        async def waiting() -> JobView | None:
            v = await view(client, stuck)
            return v if v is not None and "isolation sandbox" in v.reason else None

        held = await eventually(waiting, what="the job to wait for a sandbox node with the label")
        assert held.state == "waiting" and all(not a.node_id and a.state == "waiting" for a in held.attempts)
    finally:
        await client.cancel(stuck)


async def test_an_unknown_isolation_level_is_refused_naming_the_field(client):
    spec = {"runtime": {"kind": "process", "argv": ["true"]}, "constraints": {"isolation": "chroot"}}
    with pytest.raises(InvalidMessage) as caught:
        await client.request(
            subjects.API_SUBMIT, {"type": "api.submit", "jobs": [{"spec": spec}]}, ErrorReply, "trigger"
        )
    assert caught.value.field == "jobs[0].spec.constraints.isolation"
    assert "'chroot'" in str(caught.value)


def test_an_executor_refuses_a_level_its_probe_cannot_enforce(nats_server, tmp_path):
    env = {
        **os.environ,
        "JOBMESH_NATS_URL": nats_server.url,
        "JOBMESH_NODE_ID": "iso-refused",
        "JOBMESH_WORK_DIR": str(tmp_path),
        "JOBMESH_NODE_ISOLATION": "container",
        "JOBMESH_CONTAINER_ENGINE": "",
    }
    done = subprocess.run(
        [sys.executable, "-m", "jobmesh.executor"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "JOBMESH_NODE_ISOLATION=container cannot be enforced on this node" in done.stderr
    assert "sandbox: bubblewrap 0.8.0" in done.stderr
    assert "container: off (JOBMESH_CONTAINER_ENGINE is empty)" in done.stderr
