"""End to end through the executor: what the client sends is what the job sees.

Needs the executor's side of issue 8 wired in (stdin, input files fetched from jm_uploads,
node paths, secrets and masking, the handler pool): ``echo hello | jobmesh run -i -- sh -c
'read x; echo $x'`` prints hello, ``jobmesh run --upload ./train.py -- python train.py``
runs the uploaded file, and ``Client.call`` returns a handler's typed result.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import msgspec
import nats.js.errors
import pytest

from jobmesh.client.client import Client
from jobmesh.client.handlercalls import JobFailed
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import Timeouts
from jobmesh.errors import InvalidSpec
from tests.cluster_fixtures import jobmesh_cli
from tests.helpers import eventually

pytestmark = pytest.mark.integration

SECRET_VALUE = "s3cr3t-e2e-value"
QUEUE_30 = Timeouts(queue=30)  # a handler no node hosts ends expired, not waiting forever

HANDLERS = """
import msgspec
from jobmesh.sdk import Context, handler


class AddIn(msgspec.Struct):
    a: int
    b: int


class AddOut(msgspec.Struct):
    total: int


@handler("e2e.add")
def add(request: AddIn, ctx: Context) -> AddOut:
    ctx.progress(1.0, "added")
    return AddOut(total=request.a + request.b)


@handler("e2e.fail")
def fail(request: AddIn) -> AddOut:
    raise ValueError("this handler always fails")
"""


class AddIn(msgspec.Struct):
    a: int
    b: int


class AddOut(msgspec.Struct):
    total: int


@pytest.fixture(scope="module")
def node_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("node-files")
    (root / "allowed").mkdir()
    (root / "allowed" / "dataset.txt").write_text("node-side data\n")
    (root / "handlers_e2e.py").write_text(HANDLERS)
    return root


@pytest.fixture(scope="module")
async def cluster(make_module_cluster, node_files):
    env = {
        "JOBMESH_NODE_ID": "node-runtimes",
        "JOBMESH_NODE_CPU_MILLI": "8000",
        "JOBMESH_NODE_MEMORY_MB": "8192",
        "JOBMESH_ALLOWED_INPUT_PATHS": str(node_files / "allowed"),
        "JOBMESH_HANDLER_MODULES": str(node_files / "handlers_e2e.py"),
        "JOBMESH_HANDLER_WORKERS": "1",
        "JOBMESH_SECRET_API_TOKEN": SECRET_VALUE,
    }
    return await make_module_cluster(env=env, name="runtimes-e2e")


def run_with_stdin(args: list[str], nats_url: str, data: bytes, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from jobmesh.client.cli import main; main()", *args],
        env=dict(os.environ, JOBMESH_NATS_URL=nats_url),
        input=data,
        capture_output=True,
        timeout=120,
        cwd=cwd,
    )


async def test_stdin_is_forwarded_with_dash_i(cluster, nats_server):
    result = run_with_stdin(["run", "-i", "--", "sh", "-c", "read x; echo $x"], nats_server.url, b"hello\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == ["hello"]


async def test_a_large_stdin_travels_as_an_upload_and_arrives_whole(cluster, nats_server):
    data = os.urandom(300_000)
    result = run_with_stdin(["run", "-i", "--", "sha256sum"], nats_server.url, data)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().split()[0] == hashlib.sha256(data).hexdigest()


async def test_an_uploaded_script_and_directory_are_in_the_working_directory(cluster, nats_server, tmp_path):
    (tmp_path / "train.py").write_text("print(open('inputs/sub/b.csv').read().strip(), 'trained')\n")
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "sub" / "b.csv").write_text("3,4\n")
    argv = ["run", "--upload", "./train.py", "--upload", "data:inputs", "--", "python", "train.py"]
    result = jobmesh_cli(argv, nats_server.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3,4 trained" in result.stdout.splitlines()


async def test_a_node_path_under_an_allowed_root_is_copied_in(cluster, nats_server, node_files):
    source = node_files / "allowed" / "dataset.txt"
    result = jobmesh_cli(["run", "--node-path", f"{source}:d/data.txt", "--", "cat", "d/data.txt"], nats_server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["node-side data"]


async def test_env_and_env_file_reach_the_job(cluster, nats_server, tmp_path):
    (tmp_path / "job.env").write_text("# settings\nMODE=train\nOVERRIDE=file\n")
    argv = ["run", "--env-file", "job.env", "--env", "OVERRIDE=flag", "--", "sh", "-c", "echo $MODE $OVERRIDE"]
    result = jobmesh_cli(argv, nats_server.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["train flag"]


async def test_a_secret_as_a_variable_is_echoed_masked(cluster, nats_server):
    argv = ["run", "--secret", "API_TOKEN", "--secrets-as", "env", "--", "sh", "-c", "echo token=$API_TOKEN"]
    result = jobmesh_cli(argv, nats_server.url)
    assert result.returncode == 0, result.stderr
    assert "token=***" in result.stdout and SECRET_VALUE not in result.stdout


async def test_a_missing_secret_fails_with_its_code(cluster, nats_server):
    result = jobmesh_cli(["run", "--secret", "NOT_ON_THIS_NODE", "--", "true"], nats_server.url)
    assert result.returncode == 3, result.stderr
    assert "secret_missing" in result.stderr


async def test_a_handler_is_called_from_the_cli_and_its_result_read(cluster, nats_server):
    result = jobmesh_cli(
        ["run", "--queue-timeout", "30", "--handler", "e2e.add", "--input", '{"a": 2, "b": 3}'], nats_server.url
    )
    assert result.returncode == 0, result.stderr
    job_id = result.stderr.split("job ", 1)[1].split()[0]
    shown = jobmesh_cli(["result", job_id], nats_server.url)
    assert msgspec.json.decode(shown.stdout) == {"total": 5}


async def test_the_client_calls_a_handler_with_typed_input_and_output(cluster, nats_server):
    client = await Client.connect(nats_server.url)
    try:
        assert await client.call("e2e.add", AddIn(a=20, b=22), AddOut, timeouts=QUEUE_30, wait_timeout=60) == AddOut(
            total=42
        )
        with pytest.raises(JobFailed) as caught:
            await client.call("e2e.fail", AddIn(a=1, b=1), AddOut, timeouts=QUEUE_30, wait_timeout=60)
        assert caught.value.code == "handler_failed"
        assert "this handler always fails" in caught.value.output_tail

        # The executor advertised the handler's type: the trigger refuses a bad input at submit.
        kv = await client.nc.jetstream().key_value(subjects.KV_HANDLERS)

        async def advertised() -> bool:
            try:
                return bool((await kv.get("e2e.add")).value)
            except nats.js.errors.KeyNotFoundError:
                return False

        await eventually(advertised, what="the executor to advertise e2e.add")
        with pytest.raises(InvalidSpec) as refused:
            await client.call("e2e.add", {"a": "two", "b": 3}, AddOut)
        assert refused.value.field == "jobs[0].spec.runtime.input.a"
    finally:
        await client.close()


async def test_a_handler_input_missing_a_field_is_refused_naming_it(cluster, nats_server):
    # Refused by the trigger once the record is read (exit 1), else by the executor (exit 3,
    # input_invalid): either way the field is named.
    result = jobmesh_cli(
        ["run", "--queue-timeout", "30", "--handler", "e2e.add", "--input", '{"a": 1}'], nats_server.url
    )
    assert result.returncode in (1, 3), result.stderr
    assert "input" in result.stderr and ".b" in result.stderr, result.stderr


async def test_a_secret_in_progress_and_checkpoints_is_masked_before_it_leaves_the_node(cluster, nats_server):
    """Progress messages and checkpoints travel in the node record (KV jm_nodes) and the
    checkpoint on to the next attempt: neither may carry a secret's value."""
    script = (
        'if [ "$JOBMESH_ATTEMPT" = 1 ]; then '
        'echo "progress 0.5 using $API_TOKEN" > /dev/fd/$JOBMESH_PROGRESS_FD; '
        'echo "checkpoint cp-$API_TOKEN" > /dev/fd/$JOBMESH_PROGRESS_FD; '
        "while [ ! -e go ]; do sleep 0.05; done; exit 1; fi; "
        'echo "resumed from $JOBMESH_CHECKPOINT"'
    )
    argv = ["submit", "--retries", "1", "--backoff", "0.1", "--secret", "API_TOKEN", "--secrets-as", "env"]
    submitted = jobmesh_cli([*argv, "--", "sh", "-c", script], nats_server.url)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    conn = await nats.connect(nats_server.url)
    try:
        kv = await conn.jetstream().key_value(subjects.KV_NODES)

        async def lease_with_checkpoint():
            entry = await kv.get("node-runtimes")
            info = msgspec.json.decode(entry.value)
            return next((a for a in info.get("attempts", []) if a.get("checkpoint")), None)

        lease = await eventually(lease_with_checkpoint, timeout=30, what="the attempt's checkpoint in its lease")
        assert lease["message"] == "using ***" and lease["checkpoint"] == "cp-***", lease
        workdir = cluster.work_dir / "nodes" / "node-runtimes" / f"{job_id}-1"
        (workdir / "go").touch()
    finally:
        await conn.close()
    watched = jobmesh_cli(["watch", job_id], nats_server.url)
    assert watched.returncode == 0, watched.stderr
    logs = jobmesh_cli(["logs", job_id], nats_server.url)
    assert "resumed from cp-***" in logs.stdout and SECRET_VALUE not in logs.stdout, logs.stdout
