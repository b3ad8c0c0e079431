"""The client's side of runtimes and inputs: flags, uploads, stdin, env, handler calls.

Unit tests cover the flags and the checks (no cluster). The integration tests run the real
``jobmesh`` command against the module's cluster and assert what the client side does:
uploads land in ``jm_uploads`` named by their content with the right size, and the spec
carries them; stdin travels inline or as an upload; ``--env``/``--env-file`` make the
runtime's variables; bad input is refused with the field named and nothing is created.
What the executor does with these is tested on its side (and in test_cli_runtimes_e2e.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys

import msgspec
import pytest
from rich.console import Console

from jobmesh.client.cli.display import UploadDisplay
from jobmesh.client.cli.parser import build_parser
from jobmesh.client.cli.render import node_details, nodes, timeouts_text
from jobmesh.client.cli.runtimeflags import env_file_values, inputs_from
from jobmesh.client.cli.specflags import spec_from
from jobmesh.client.client import Client
from jobmesh.client.handlercalls import JobFailed, decode_result
from jobmesh.client.uploads import plan_uploads
from jobmesh.contract import subjects
from jobmesh.contract.ids import job_id_for
from jobmesh.contract.messages.v1 import (
    MAX_STDIN_BYTES,
    MAX_UPLOAD_BYTES,
    ContainerRuntime,
    GpuDevice,
    HandlerRuntime,
    InputFile,
    JobSpec,
    NodeInfo,
    NodeView,
    ProcessRuntime,
    Resources,
    Timeouts,
)
from jobmesh.contract.validation import input_path_problem, validate_spec
from jobmesh.errors import InvalidMessage, InvalidSpec, UsageError
from tests.cluster_fixtures import NODE_ID, jobmesh_cli

integration = pytest.mark.integration


def sparse(path, size: int) -> None:
    """A file of ``size`` bytes that costs no disk (a hole)."""
    path.touch()
    os.truncate(path, size)


def parsed(*argv: str):
    return build_parser().parse_args(["submit", *argv])


# --- what runs ------------------------------------------------------------------------------
def test_handler_with_input_makes_a_handler_runtime_and_placement_follows_it():
    spec = spec_from(parsed("--handler", "digits", "--input", '{"n": 3}'))
    assert spec.runtime == HandlerRuntime(handler="digits", input={"n": 3})
    assert spec.constraints.handler == ""  # the scheduler places on the runtime's handler
    assert spec.name == "handler digits"
    # No --input: {} (an input type whose fields all have defaults).
    assert spec_from(parsed("--handler", "digits")).runtime == HandlerRuntime(handler="digits", input={})


def test_handler_input_from_a_file(tmp_path):
    (tmp_path / "in.json").write_text('{"rows": [1, 2]}')
    spec = spec_from(parsed("--handler", "h", "--input", f"@{tmp_path / 'in.json'}"))
    assert spec.runtime == HandlerRuntime(handler="h", input={"rows": [1, 2]})


def test_handler_with_a_command_stays_the_bare_placement_constraint():
    spec = spec_from(parsed("--handler", "embed", "--", "echo", "hi"))
    assert spec.runtime == ProcessRuntime(argv=["echo", "hi"])
    assert spec.constraints.handler == "embed"


def test_image_makes_a_container_runtime_with_the_argv_and_env():
    spec = spec_from(parsed("--image", "alpine:3", "--env", "A=1", "--", "echo", "hi"))
    assert spec.runtime == ContainerRuntime(image="alpine:3", argv=["echo", "hi"], env={"A": "1"})
    assert spec_from(parsed("--image", "alpine:3")).runtime == ContainerRuntime(image="alpine:3")


@pytest.mark.parametrize(
    ("argv", "field", "says"),
    [
        (["--input", "{}", "--", "true"], "runtime.input", "a command after -- is given"),
        (["--input", "{}"], "runtime.input", "--handler is not given"),
        (["--handler", "h", "--input", "{nope"], "runtime.input", "--input is not JSON"),
        (["--handler", "h", "--input", "@/no/such/file"], "runtime.input", "cannot read /no/such/file"),
        (["--handler", "h", "--image", "alpine"], "runtime", "--image and --handler"),
        (["--noop", "--image", "alpine"], "runtime", "--noop and --image"),
        (["--handler", "h", "--env", "A=1"], "runtime.env", "handler job has none"),
        (["--noop", "--", "true"], "command", "drop the command"),
        ([], "command", "give a command after --"),
        (["--env", "=x", "--", "true"], "runtime.env", "is not a variable name"),
        # The trigger's rule: a plain name (a dot or a leading digit is refused at submit).
        (["--env", "A.B=1", "--", "true"], "runtime.env", "is not a variable name"),
        (["--env", "1X=1", "--", "true"], "runtime.env", "not a digit first"),
    ],
)
def test_flags_that_do_not_go_together_are_refused_saying_why(argv, field, says):
    with pytest.raises(UsageError) as caught:
        spec_from(parsed(*argv))
    assert caught.value.field == field and says in caught.value.message, caught.value


# --- environment ----------------------------------------------------------------------------
def test_env_file_reads_dockers_format(tmp_path):
    path = tmp_path / "job.env"
    path.write_text('# a comment\n\nA=1\n  B=two words \nQ="kept"\nFROM_CLIENT\nUNSET_HERE\nEQ=a=b\n')
    values = env_file_values(str(path), {"FROM_CLIENT": "client's"})
    # Values as written (no quotes removed, trailing space kept); a bare KEY the client
    # does not have is left out.
    assert values == {"A": "1", "B": "two words ", "Q": '"kept"', "FROM_CLIENT": "client's", "EQ": "a=b"}


def test_an_env_file_that_starts_with_a_byte_order_mark_names_its_first_variable(tmp_path):
    path = tmp_path / "windows.env"
    path.write_bytes(b"\xef\xbb\xbfFIRST=1\r\nSECOND=2\r\n")
    assert env_file_values(str(path), {}) == {"FIRST": "1", "SECOND": "2"}
    spec = spec_from(parsed("--env-file", str(path), "--", "env"))
    assert spec.runtime == ProcessRuntime(argv=["env"], env={"FIRST": "1", "SECOND": "2"})


def test_env_flags_override_env_files_in_order(tmp_path, monkeypatch):
    (tmp_path / "one.env").write_text("A=file1\nB=file1\n")
    (tmp_path / "two.env").write_text("B=file2\nC=file2\n")
    monkeypatch.setenv("JM_TEST_BARE", "bare value")
    args = parsed(
        "--env-file", str(tmp_path / "one.env"), "--env-file", str(tmp_path / "two.env"),
        "--env", "C=flag", "--env", "JM_TEST_BARE", "--", "env",
    )  # fmt: skip
    assert spec_from(args).runtime == ProcessRuntime(
        argv=["env"], env={"A": "file1", "B": "file2", "C": "flag", "JM_TEST_BARE": "bare value"}
    )


def test_an_env_file_with_a_bad_line_names_the_file_and_line(tmp_path):
    (tmp_path / "bad.env").write_text("A=1\nnot a key=1\n")
    with pytest.raises(UsageError) as caught:
        spec_from(parsed("--env-file", str(tmp_path / "bad.env"), "--", "true"))
    assert f"{tmp_path / 'bad.env'} line 2" in caught.value.message


# --- files, stdin, network, secrets ---------------------------------------------------------
def test_uploads_expand_directories_keep_relative_paths_modes_and_digests(tmp_path):
    (tmp_path / "proj" / "data" / "deep").mkdir(parents=True)
    (tmp_path / "proj" / "train.py").write_text("print('train')\n")
    os.chmod(tmp_path / "proj" / "train.py", 0o700)
    (tmp_path / "proj" / "data" / "a.csv").write_text("1,2\n")
    (tmp_path / "proj" / "data" / "deep" / "b.csv").write_text("3,4\n")
    planned = plan_uploads([(tmp_path / "proj" / "train.py", "train.py"), (tmp_path / "proj" / "data", "in")])

    def key(content: bytes) -> str:
        return subjects.upload_key(hashlib.sha256(content).hexdigest())

    assert [p.input for p in planned] == [
        InputFile(path="train.py", object=key(b"print('train')\n"), size=15, mode=0o755),
        InputFile(path="in/a.csv", object=key(b"1,2\n"), size=4, mode=0o644),
        InputFile(path="in/deep/b.csv", object=key(b"3,4\n"), size=4, mode=0o644),
    ]


def test_an_upload_over_the_limit_names_the_file_before_reading_it(tmp_path):
    (tmp_path / "small").write_bytes(b"x" * 10)
    sparse(tmp_path / "huge.bin", MAX_UPLOAD_BYTES)
    with pytest.raises(UsageError) as caught:
        plan_uploads([(tmp_path / "small", "small"), (tmp_path / "huge.bin", "huge.bin")])
    assert f"{tmp_path / 'huge.bin'} ({MAX_UPLOAD_BYTES} bytes)" in caught.value.message
    assert "--node-path" in caught.value.message


def test_upload_and_node_path_flags_make_the_specs_files(tmp_path):
    (tmp_path / "model.txt").write_text("weights")
    spec = spec_from(
        parsed("--upload", f"{tmp_path / 'model.txt'}:m/model.txt", "--node-path", "/srv/data:data", "--", "ls")
    )
    assert [(f.path, bool(f.object), f.node_path, f.size) for f in spec.files] == [
        ("m/model.txt", True, "", 7),
        ("data", False, "/srv/data", 0),
    ]
    # Without :DEST a file keeps its own name.
    assert spec_from(parsed("--node-path", "/srv/ds/imagenet", "--", "ls")).files[0].path == "imagenet"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--upload", "/no/such/file"], "cannot upload /no/such/file"),
        (["--upload", "/etc/hostname:../x"], "'..' component"),
        (["--upload", "/etc/hostname:/abs"], "is absolute"),
        (["--node-path", "relative/path:x"], "is not an absolute path on the node"),
        (["--node-path", "/srv/a:."], "the path is empty"),
    ],
)
def test_a_bad_file_flag_is_refused_saying_why(argv, says):
    with pytest.raises(UsageError) as caught:
        spec_from(parsed(*argv, "--", "ls"))
    assert caught.value.field == "files" and says in caught.value.message, caught.value


def test_stdin_small_text_travels_inline_and_the_rest_is_uploaded():
    small = inputs_from(parsed("-i", "--", "cat"), io.BytesIO(b"hello\n"))
    assert small.stdin == "hello\n" and not small.stdin_object and not small.uploads
    big = b"y" * (MAX_STDIN_BYTES + 1)
    large = inputs_from(parsed("-i", "--", "cat"), io.BytesIO(big))
    assert not large.stdin and large.stdin_object == subjects.upload_key(hashlib.sha256(big).hexdigest())
    assert [u.source for u in large.uploads] == [big]
    # Bytes the spec cannot hold as text (NUL, not UTF-8) are uploaded however small.
    assert inputs_from(parsed("-i", "--", "cat"), io.BytesIO(b"a\x00b")).stdin_object
    assert inputs_from(parsed("-i", "--", "cat"), io.BytesIO(b"\xff\xfe")).stdin_object
    # The limit is of bytes: 40000 two-byte characters (80000 bytes) are uploaded.
    wide = "é".encode() * 40_000
    assert len(wide.decode()) < MAX_STDIN_BYTES < len(wide)
    wide_in = inputs_from(parsed("-i", "--", "cat"), io.BytesIO(wide))
    assert not wide_in.stdin and wide_in.stdin_object == subjects.upload_key(hashlib.sha256(wide).hexdigest())
    exact = "é".encode() * (MAX_STDIN_BYTES // 2)  # 64 KiB exactly
    assert inputs_from(parsed("-i", "--", "cat"), io.BytesIO(exact)).stdin == exact.decode()
    # Without -i stdin is not read at all.
    assert inputs_from(parsed("--", "cat"), io.BytesIO(b"unread")).stdin == ""


def test_network_and_secrets_flags():
    spec = spec_from(
        parsed("--network", "--secret", "API_TOKEN", "--secret", "db-pass", "--secrets-as", "env", "--", "x")
    )
    assert spec.network and spec.secrets == ["API_TOKEN", "db-pass"] and spec.secrets_as == "env"
    default = spec_from(parsed("--", "x"))
    assert not default.network and default.secrets == [] and default.secrets_as == "file"


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b", ".hidden", "-dash", "with space"])
def test_a_secret_name_with_path_characters_is_refused_naming_the_field_and_flag(name):
    with pytest.raises(InvalidMessage) as caught:
        spec_from(parsed("--secret", "OK", f"--secret={name}", "--", "x"))
    assert caught.value.field == "secrets[1]"
    assert "(flag --secret)" in caught.value.message and "no '/' or '.'" in caught.value.message


# --- contract validation --------------------------------------------------------------------
def _spec(**fields) -> JobSpec:
    return JobSpec(runtime=ProcessRuntime(argv=["x"]), **fields)


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"files": [InputFile(path="../x", object="sha256/a")]}, "spec.files[0].path", "'..' component"),
        ({"files": [InputFile(path="a/../../x", object="sha256/a")]}, "spec.files[0].path", "'..' component"),
        ({"files": [InputFile(path=".", object="sha256/a")]}, "spec.files[0].path", "the path is empty"),
        ({"files": [InputFile(path="./", object="sha256/a")]}, "spec.files[0].path", "working directory itself"),
        ({"files": [InputFile(path="a")]}, "spec.files[0]", "exactly one source"),
        ({"files": [InputFile(path="a", object="sha256/a", node_path="/x")]}, "spec.files[0]", "exactly one source"),
        ({"files": [InputFile(path="a", node_path="rel")]}, "spec.files[0].node_path", "not an absolute path"),
        (
            {"files": [InputFile(path="a/b", object="sha256/a"), InputFile(path="a//./b", node_path="/x")]},
            "spec.files[1].path",
            "given twice (files[0] too)",
        ),
        (
            {"files": [InputFile(path=f"f{i}", object="sha256/a", size=MAX_UPLOAD_BYTES // 2) for i in range(3)]},
            "spec.files[2].size",
            "over the limit",
        ),
        ({"secrets": ["A", "B", "A"]}, "spec.secrets[2]", "named twice (secrets[0] too)"),
        ({"stdin": "x", "stdin_object": "sha256/a"}, "spec.stdin_object", "both set"),
    ],
)
def test_the_contract_refuses_bad_files_secrets_and_stdin_naming_the_field(fields, field, says):
    with pytest.raises(InvalidSpec) as caught:
        validate_spec(_spec(**fields))
    assert caught.value.field == field and says in caught.value.message, caught.value


def test_good_input_paths_pass():
    for path in ("a", "a/b.txt", "dir/./x", ".config/x", "..hidden"):
        assert input_path_problem(path) == "", path
    validate_spec(_spec(files=[InputFile(path="a", object="sha256/a", size=3), InputFile(path="b", node_path="/x")]))


# --- what is printed ------------------------------------------------------------------------
def test_nodes_shows_isolation_network_gpus_and_probe_findings(capsys):
    node = NodeInfo(
        node_id="gpu-1",
        cpu_milli=4000,
        memory_mb=8192,
        gpu=2,
        gpu_kind="A100",
        gpu_devices=[GpuDevice(index=0, kind="A100", memory_mb=40960, uuid="GPU-abc"), GpuDevice(index=1, kind="A100")],
        isolation="sandbox",
        network=False,
        probe={"sandbox": "bubblewrap 0.8.0", "cgroup": "v1 memory,cpu,pids"},
        runtimes=["process", "noop", "handler"],
        handlers=["digits"],
        heartbeat_at=100.0,
    )
    nodes(
        [NodeView(node=node, alive=True, allocated=Resources(cpu_milli=0, memory_mb=0), reservations=0)], 101.0, False
    )
    out = capsys.readouterr().out.splitlines()
    header = out[0].split()
    row = out[1].split()
    assert row[header.index("ISOLATION")] == "sandbox" and row[header.index("NET")] == "no"
    assert out[2:] == ["details:", *node_details(node)]
    assert node_details(node) == [
        "  gpu-1  runtimes process,noop,handler  handlers digits",
        "    gpu 0  A100  40960 MiB  GPU-abc",
        "    gpu 1  A100",
        "    probe cgroup: v1 memory,cpu,pids",
        "    probe sandbox: bubblewrap 0.8.0",
    ]


def test_the_timeouts_in_effect_say_which_are_defaults():
    assert timeouts_text(Timeouts()) == "run 3600s (default), heartbeat 10s (default)"
    assert timeouts_text(Timeouts(run=90, queue=5)) == "run 90s, heartbeat 10s (default), queue 5s"


def test_an_upload_off_a_terminal_says_what_it_sent_in_one_line(capsys):
    display = UploadDisplay(10 * 1024 * 1024)  # large, but stderr is not a terminal here
    display.update("a", 5, 10)
    display.close(2, 3 * 1024 * 1024, 1024 * 1024)
    assert capsys.readouterr().err == "jobmesh: uploaded 2 files (3.0 MiB; 2.0 MiB already stored)\n"


def test_a_large_upload_on_a_terminal_draws_a_bar_per_file():
    out = io.StringIO()
    display = UploadDisplay(8 * 1024 * 1024, console=Console(file=out, force_terminal=True, width=100))
    display.update("model.bin", 4 * 1024 * 1024, 8 * 1024 * 1024)
    display.update("model.bin", 8 * 1024 * 1024, 8 * 1024 * 1024)
    display.close(1, 8 * 1024 * 1024, 8 * 1024 * 1024)
    assert "upload model.bin" in out.getvalue() and "8.4/8.4 MB" in out.getvalue()


def test_a_result_decodes_into_the_callers_type_or_names_the_field():
    class Out(msgspec.Struct):
        accuracy: float

    assert decode_result(b'{"accuracy": 0.9}', Out) == Out(accuracy=0.9)
    assert decode_result(b"[1, 2]") == [1, 2]
    with pytest.raises(InvalidMessage) as caught:
        decode_result(b'{"accuracy": "high"}', Out)
    assert "`$.accuracy`" in caught.value.message and "Out" in caught.value.message


# --- against the cluster --------------------------------------------------------------------
def cli_with_stdin(args: list[str], nats_url: str, data: bytes, env: dict[str, str] | None = None, cwd=None):
    full_env = dict(os.environ, JOBMESH_NATS_URL=nats_url, **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", "from jobmesh.client.cli import main; main()", *args],
        env=full_env,
        input=data,
        capture_output=True,
        timeout=60,
        cwd=cwd,
    )


def status_json(job_id: str, nats_url: str) -> dict:
    result = jobmesh_cli(["status", job_id, "--json"], nats_url)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def stored(nc, name: str) -> tuple[bytes, str]:
    store = await nc.jetstream().object_store(subjects.OBJ_UPLOADS)
    got = await store.get(name)
    return got.data or b"", got.info.nuid or ""


async def upload_objects(nc) -> int:
    return (await nc.jetstream().stream_info(f"OBJ_{subjects.OBJ_UPLOADS}")).state.messages


@integration
async def test_uploads_land_in_jm_uploads_by_content_and_the_spec_carries_them(cluster, nats_server, nc, tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    train = b"print('training')\n"
    (tmp_path / "train.py").write_bytes(train)
    (tmp_path / "data" / "a.csv").write_bytes(b"1,2\n" * 1000)
    (tmp_path / "data" / "sub" / "b.csv").write_bytes(b"3,4\n")
    argv = ["submit", "--json", "--upload", "train.py", "--upload", "data:inputs", "--", "python", "train.py"]
    result = jobmesh_cli(argv, nats_server.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "uploaded 3 files" in result.stderr and "already stored" not in result.stderr
    job_id = json.loads(result.stdout)["job_id"]
    files = status_json(job_id, nats_server.url)["spec"]["files"]
    expected = {"train.py": train, "inputs/a.csv": b"1,2\n" * 1000, "inputs/sub/b.csv": b"3,4\n"}
    assert [f["path"] for f in files] == list(expected)
    nuids = {}
    for f in files:
        content = expected[f["path"]]
        assert f["object"] == f"sha256/{hashlib.sha256(content).hexdigest()}"
        assert f["size"] == len(content) and f["mode"] == 0o644
        data, nuids[f["object"]] = await stored(nc, f["object"])
        assert data == content

    # The same files again: nothing is sent (the objects are the ones stored before).
    again = jobmesh_cli(argv, nats_server.url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already stored" in again.stderr
    for name, nuid in nuids.items():
        assert (await stored(nc, name))[1] == nuid


@integration
async def test_stdin_is_carried_inline_or_as_an_upload(cluster, nats_server, nc):
    small = cli_with_stdin(["submit", "--json", "-i", "--", "cat"], nats_server.url, b"hello\n")
    assert small.returncode == 0, small.stderr
    spec = status_json(json.loads(small.stdout)["job_id"], nats_server.url)["spec"]
    assert spec["stdin"] == "hello\n" and "stdin_object" not in spec

    big = os.urandom(MAX_STDIN_BYTES * 2)
    large = cli_with_stdin(["submit", "--json", "-i", "--", "wc", "-c"], nats_server.url, big)
    assert large.returncode == 0, large.stderr
    spec = status_json(json.loads(large.stdout)["job_id"], nats_server.url)["spec"]
    assert spec["stdin_object"] == f"sha256/{hashlib.sha256(big).hexdigest()}" and "stdin" not in spec
    assert (await stored(nc, spec["stdin_object"]))[0] == big


@integration
async def test_env_and_env_file_make_the_runtime_env(cluster, nats_server, tmp_path):
    (tmp_path / "job.env").write_text("# settings\nMODE=train\nBARE\nOVERRIDE=file\n")
    argv = ["submit", "--json", "--env-file", "job.env", "--env", "OVERRIDE=flag", "--env", "X=a=b", "--", "env"]
    result = cli_with_stdin(argv, nats_server.url, b"", env={"BARE": "from the client"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    spec = status_json(json.loads(result.stdout)["job_id"], nats_server.url)["spec"]
    assert spec["runtime"]["env"] == {"MODE": "train", "BARE": "from the client", "OVERRIDE": "flag", "X": "a=b"}


@integration
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--upload", "missing.txt", "--", "true"], "cannot upload missing.txt"),
        (["--upload", "ok.txt:../escape", "--", "true"], "'..' component"),
        (["--upload", "ok.txt", "--upload", "huge.bin", "--", "true"], "huge.bin (67108864 bytes)"),
        (["--node-path", "not/absolute:x", "--", "true"], "is not an absolute path on the node"),
        (["--secret", "../etc/passwd", "--", "true"], "(field secrets[0])"),
        (["--secret", "A", "--secret", "A", "--", "true"], "(field spec.secrets[1])"),
        (["--isolation", "bogus", "--", "true"], "argument --isolation: invalid choice: 'bogus'"),
        (["--handler", "h", "--input", "{nope"], "(field runtime.input)"),
    ],
)
async def test_bad_input_is_refused_naming_the_field_and_nothing_is_created(
    cluster, nats_server, nc, tmp_path, argv, says
):
    (tmp_path / "ok.txt").write_text("ok")
    sparse(tmp_path / "huge.bin", MAX_UPLOAD_BYTES)
    key = f"refused-{hashlib.sha256(' '.join(argv).encode()).hexdigest()[:16]}"
    objects = await upload_objects(nc)
    result = jobmesh_cli(["submit", "--key", key, *argv], nats_server.url, cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert says in result.stderr, result.stderr
    assert jobmesh_cli(["status", job_id_for(key)], nats_server.url).returncode == 4  # no such job
    assert await upload_objects(nc) == objects  # and nothing uploaded


@integration
async def test_nodes_show_isolation_network_gpu_devices_and_probe(cluster, nats_server):
    result = jobmesh_cli(["nodes", "--json"], nats_server.url)
    assert result.returncode == 0, result.stderr
    [view] = [v for v in json.loads(result.stdout) if v["node"]["node_id"] == NODE_ID]
    for key in ("isolation", "network", "gpu_devices", "probe"):
        assert key in view["node"], view["node"]
    table = jobmesh_cli(["nodes"], nats_server.url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header, row = lines[0].split(), next(line for line in lines if line.startswith(f"{NODE_ID} ")).split()
    assert row[header.index("ISOLATION")] == view["node"]["isolation"]
    assert row[header.index("NET")] == ("yes" if view["node"]["network"] else "no")
    details = lines[lines.index("details:") + 1 :]
    assert any(line.startswith(f"  {NODE_ID}  runtimes ") for line in details), details


@integration
async def test_status_shows_the_run_timeout_in_effect(cluster, nats_server):
    default = jobmesh_cli(["submit", "--noop"], nats_server.url)
    assert default.returncode == 0, default.stderr
    job_id = default.stdout.strip()
    shown = jobmesh_cli(["status", job_id], nats_server.url)
    assert "timeouts run 3600s (default), heartbeat 10s (default)" in shown.stdout.splitlines()
    assert status_json(job_id, nats_server.url)["run_timeout"] == 3600.0
    short = jobmesh_cli(["submit", "--noop", "--timeout", "90"], nats_server.url).stdout.strip()
    assert "timeouts run 90s, heartbeat 10s (default)" in jobmesh_cli(["status", short], nats_server.url).stdout


@integration
async def test_the_client_uploads_once_per_content_and_refuses_too_much(cluster, nats_server, tmp_path):
    (tmp_path / "a.txt").write_text("same content")
    (tmp_path / "b.txt").write_text("same content")
    client = await Client.connect(nats_server.url)
    try:
        seen: list[tuple[str, int, int]] = []
        files = await client.upload(
            [tmp_path / "a.txt", (tmp_path / "b.txt", "copies/b.txt")], progress=lambda *a: seen.append(a)
        )
        digest = hashlib.sha256(b"same content").hexdigest()
        assert files == [
            InputFile(path="a.txt", object=f"sha256/{digest}", size=12, mode=0o644),
            InputFile(path="copies/b.txt", object=f"sha256/{digest}", size=12, mode=0o644),
        ]
        assert ("a.txt", 12, 12) in seen and ("copies/b.txt", 12, 12) in seen
        sparse(tmp_path / "huge.bin", MAX_UPLOAD_BYTES)
        with pytest.raises(UsageError) as caught:
            await client.upload([tmp_path / "a.txt", tmp_path / "huge.bin"])
        assert str(tmp_path / "huge.bin") in caught.value.message
    finally:
        await client.close()


@integration
async def test_call_raises_the_jobs_own_failure_when_it_does_not_succeed(cluster, nats_server):
    client = await Client.connect(nats_server.url)
    try:
        # No node hosts this handler: the job waits, then expires after its queue timeout.
        with pytest.raises(JobFailed) as caught:
            await client.call("nobody-hosts-this", {"n": 1}, timeouts=Timeouts(queue=1.0), wait_timeout=30)
        assert caught.value.code == "expired" and caught.value.state == "expired"
        assert caught.value.job_id in str(caught.value)
    finally:
        await client.close()
