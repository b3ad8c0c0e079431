"""The container runtime: the engine probe, the ``run`` command an attempt gets, and the runner,
against recording stand-in ``podman`` and ``docker`` programs on PATH (real processes that
record their argv and env file, print canned output and exit as told).

No engine can run a container on this machine (no podman; a docker client without a daemon),
so the real probe's report is asserted as it is, and the one test that runs a real container
runs only where the probe succeeds (here the test asserts the probe's reasons instead).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from jobmesh.contract.messages.v1 import ContainerRuntime, ProcessRuntime, Resources
from jobmesh.executor.containers import (
    ContainerRunner,
    EngineProbe,
    container_argv,
    container_env,
    container_name,
    engine_environment,
    probe_engine,
    write_env_file,
)
from jobmesh.executor.outcomes import CANCELLED, EXIT_CODE, TIMEOUT
from jobmesh.executor.runner import AbortSignal
from jobmesh.executor.runrequest import RunRequest
from jobmesh.runtime.settings import Settings
from tests.helpers import eventually

IMAGE = "registry.example/job:1"
STAND_IN = f"""#!{sys.executable}
import json, os, pathlib, signal, subprocess, sys, time
here = pathlib.Path(__file__).resolve().parent
name = pathlib.Path(sys.argv[0]).name
args = sys.argv[1:]
entry = {{"argv": args}}
if "--env-file" in args:
    env_file = pathlib.Path(args[args.index("--env-file") + 1])
    entry["env_file"] = env_file.read_text()
    entry["env_file_mode"] = oct(env_file.stat().st_mode & 0o777)
if args[:1] == ["run"] and "-i" in args:
    entry["stdin"] = sys.stdin.read()
with open(here / (name + ".calls"), "a") as out:
    out.write(json.dumps(entry) + "\\n")
(here / (name + ".environ")).write_text(json.dumps(dict(os.environ)))
mode_file = here / (name + ".mode")
mode = json.loads(mode_file.read_text()) if mode_file.exists() else {{}}
if args[:1] == ["kill"]:
    (here / "killed").touch()
    sys.exit(0)
if args[:1] == ["rm"]:
    sys.exit(0)
if args[-1:] == ["true"] and "--network" in args and "--name" not in args:  # the probe
    print(mode.get("probe_stderr", ""), file=sys.stderr)
    if mode.get("probe_hang"):
        time.sleep(30)
    sys.exit(mode.get("probe_exit", 0))
for line in mode.get("stdout", []):
    print(line, flush=True)
for line in mode.get("stderr", []):
    print(line, file=sys.stderr, flush=True)
if mode.get("hang"):
    if mode.get("ignore_kill"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen(["sleep", "300"])
        (here / "grandchild").write_text(str(child.pid))
    while True:
        if (here / "killed").exists() and not mode.get("ignore_kill"):
            sys.exit(137)
        time.sleep(0.02)
sys.exit(mode.get("exit", 0))
"""


class Engine:
    """A stand-in engine program in its own directory on PATH."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.name = name
        self.path = directory / name
        self.path.write_text(STAND_IN)
        self.path.chmod(0o755)

    def behave(self, **mode: Any) -> None:
        (self.dir / f"{self.name}.mode").write_text(json.dumps(mode))

    def environ(self) -> dict[str, str]:
        """The environment the engine was last started with."""
        return json.loads((self.dir / f"{self.name}.environ").read_text())

    def calls(self) -> list[dict[str, Any]]:
        record = self.dir / f"{self.name}.calls"
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}:/bin:/usr/bin")
    return directory


@pytest.fixture
def podman(bin_dir: Path) -> Engine:
    return Engine(bin_dir, "podman")


class Lines:
    """Collects the lines a runner hands over."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.first = asyncio.Event()

    async def __call__(self, stream: str, line: str) -> None:
        self.lines.append((stream, line))
        self.first.set()


def make_request(tmp_path: Path, **overrides: Any) -> RunRequest:
    workdir = tmp_path / "work" / "j1-2"
    workdir.mkdir(parents=True, exist_ok=True)
    fields: dict[str, Any] = {
        "job_id": "j1",
        "attempt": 2,
        "name": "job j1 attempt 2",
        "runtime": ContainerRuntime(image=IMAGE, argv=["python", "-c", "print(1)"]),
        "workdir": workdir,
        "env": {"LANG": "C.UTF-8", "HOME": str(workdir), "JOBMESH_JOB_ID": "j1"},
        "timeout": 30.0,
        "abort": AbortSignal(),
        "on_line": Lines(),
        "resources": Resources(cpu_milli=1500, memory_mb=256),
    }
    fields.update(overrides)
    return RunRequest(**fields)


# --- the command -----------------------------------------------------------------------


def test_the_run_command_carries_every_limit_mount_variable_and_gpu(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia1", "nvidiactl", "nvidia-uvm"):
        (dev / name).touch()
    workdir = tmp_path / "work" / "j1-2"
    secrets = tmp_path / "secrets" / "j1-2"
    env = {
        "PATH": "/usr/bin:/bin",  # the node's: the image has its own
        "HOME": str(workdir),
        "JOBMESH_RESULT_PATH": str(workdir / "result"),
        "JOBMESH_PROGRESS_FD": "7",  # a descriptor does not reach into a container
        "JOBMESH_SECRETS": str(secrets),
        "GREETING": "hello world",
        "CERT": "line one\nline two",
    }
    request = make_request(
        tmp_path, env=env, secrets_dir=secrets, stdin=tmp_path / "stdin", gpu_devices=(1,), network=False
    )
    argv = container_argv("/usr/bin/podman", request, uid=65534, gid=65534, pids_max=512, name="jm-j1-2", dev=dev)
    assert argv == [
        "/usr/bin/podman", "run", "--rm", "--name", "jm-j1-2", "--network", "none",
        "--memory", "256m", "--cpus", "1.5", "--pids-limit", "512", "--user", "65534:65534",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "-v", f"{workdir}:/work", "-w", "/work", "-v", f"{secrets}:/run/secrets:ro", "-i",
        "--env", "HOME=/work", "--env", "JOBMESH_RESULT_PATH=/work/result", "--env", "JOBMESH_SECRETS=/run/secrets",
        "--env", "GREETING=hello world", "--env", "CERT=line one\nline two",
        "--device", str(dev / "nvidia1"), "--device", str(dev / "nvidiactl"), "--device", str(dev / "nvidia-uvm"),
        IMAGE, "python", "-c", "print(1)",
    ]  # fmt: skip


def test_with_an_env_file_only_values_with_line_breaks_stay_on_the_command_line(tmp_path: Path) -> None:
    env = {"GREETING": "hello", "TOKEN": "s3cr3t-value", "CERT": "a\nb"}
    request = make_request(tmp_path, env=env)
    argv = container_argv("podman", request, uid=None, gid=None, pids_max=64, name="jm-j1-2", env_file=tmp_path / "env")
    assert "--user" not in argv  # the image's own user
    at = argv.index("--env-file")
    assert argv[at + 1] == str(tmp_path / "env")
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--env"] == ["CERT=a\nb"]
    assert not any("s3cr3t-value" in a for a in argv)


def test_network_and_a_path_the_job_set_itself_and_an_image_command(tmp_path: Path) -> None:
    runtime = ContainerRuntime(image=IMAGE, env={"PATH": "/opt/tool/bin:/usr/bin"})
    request = make_request(
        tmp_path,
        runtime=runtime,
        network=True,
        env={"PATH": "/opt/tool/bin:/usr/bin"},
        resources=Resources(cpu_milli=0),
    )
    argv = container_argv("docker", request, uid=1000, gid=None, pids_max=10, name="n", dev=tmp_path)
    assert argv[argv.index("--network") + 1] == "bridge"
    assert "--cpus" not in argv and argv[argv.index("--memory") + 1] == "64m"
    assert argv[argv.index("--user") + 1] == "1000:1000"
    assert "PATH=/opt/tool/bin:/usr/bin" in argv
    assert argv[-1] == IMAGE  # no argv: the image's own command
    assert container_env(request, runtime) == {"PATH": "/opt/tool/bin:/usr/bin"}


def test_in_a_container_the_reserved_gpus_are_the_only_ones_and_cuda_numbers_them_itself(tmp_path: Path) -> None:
    env = {"CUDA_VISIBLE_DEVICES": "2", "NVIDIA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    runtime = ContainerRuntime(image=IMAGE)
    with_gpu = make_request(tmp_path, env=env, gpu_devices=(2,))
    assert container_env(with_gpu, runtime) == {"NVIDIA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    none = {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"}
    assert container_env(make_request(tmp_path, env=none), runtime) == none  # no GPU: none visible


def test_only_a_container_runtime_makes_a_container_command(tmp_path: Path) -> None:
    request = make_request(tmp_path, runtime=ProcessRuntime(argv=["true"]))
    with pytest.raises(TypeError, match="needs a ContainerRuntime, got ProcessRuntime"):
        container_argv("podman", request, uid=None, gid=None, pids_max=1, name="n")
    assert container_name("abc_D-9", 3) == "jm-abc_D-9-3"


def test_a_name_that_would_add_lines_to_the_env_file_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "env"
    for bad in ("A\nJOBMESH_SECRET_DB", "A\rB", "A=B", "", "#A", "A B", "A\x00B"):
        with pytest.raises(ValueError, match="cannot be a variable's name in a container"):
            write_env_file(path, {"GOOD": "1", bad: "x"})
        assert not path.exists()
    write_env_file(path, {"GOOD": "1", "ALSO_GOOD": "a=b c"})
    assert path.read_text() == "GOOD=1\nALSO_GOOD=a=b c\n"
    # A name going on the command line (its value has a line break) is checked the same.
    request = make_request(tmp_path, env={"A\nB": "x\ny"})
    with pytest.raises(ValueError, match="cannot be a variable's name"):
        container_argv("podman", request, uid=None, gid=None, pids_max=1, name="n", env_file=path)


def test_the_engine_client_gets_only_what_an_engine_reads_of_the_executors_environment() -> None:
    environ = {
        "PATH": "/usr/bin",
        "HOME": "/home/jm",
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "CONTAINER_HOST": "unix:///run/podman.sock",
        "CONTAINERS_CONF": "/etc/jm/containers.conf",
        "DOCKER_HOST": "tcp://engine:2376",
        "HTTPS_PROXY": "http://proxy:3128",
        "JOBMESH_SECRET_DB": "s3cr3t-value",
        "JOBMESH_NATS_URL": "nats://x",
        "AWS_SECRET_ACCESS_KEY": "other-secret",
        "LD_PRELOAD": "/tmp/evil.so",
    }
    assert engine_environment(environ) == {
        "PATH": "/usr/bin",
        "HOME": "/home/jm",
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "CONTAINER_HOST": "unix:///run/podman.sock",
        "CONTAINERS_CONF": "/etc/jm/containers.conf",
        "DOCKER_HOST": "tcp://engine:2376",
        "HTTPS_PROXY": "http://proxy:3128",
    }


# --- the runner ------------------------------------------------------------------------


async def test_a_container_runs_through_the_engine_with_its_output_and_variables(
    tmp_path: Path, podman: Engine
) -> None:
    podman.behave(stdout=["first line", "second line"], stderr=["a warning"], exit=0)
    spawned = asyncio.Event()

    async def on_spawned() -> None:
        spawned.set()

    lines = Lines()
    request = make_request(tmp_path, on_line=lines, on_spawned=on_spawned, env={"TOKEN": "s3cr3t-value", "HOME": "/x"})
    runner = ContainerRunner(str(podman.path), uid=65534, gid=65534, pids_max=512)
    outcome = await runner.run(request)
    assert outcome.error is None and outcome.exit_code == 0 and spawned.is_set()
    assert sorted(lines.lines) == [("stderr", "a warning"), ("stdout", "first line"), ("stdout", "second line")]
    assert "first line\n" in outcome.output_tail
    [call] = podman.calls()
    env_file = Path(call["argv"][call["argv"].index("--env-file") + 1])
    assert call["argv"] == runner.argv(request, env_file)[1:]
    assert call["env_file"] == "TOKEN=s3cr3t-value\nHOME=/x\n" and call["env_file_mode"] == "0o600"
    assert not any("s3cr3t-value" in a for a in call["argv"])  # never in the process list
    assert not env_file.exists() and not env_file.parent.exists()  # gone with the attempt


async def test_a_job_variable_name_with_a_line_break_runs_no_container(tmp_path: Path, podman: Engine) -> None:
    # A line break in a name would add a line "JOBMESH_SECRET_DB" to the env file, which
    # the engine fills from its own environment: the executor's secret in the job's.
    request = make_request(tmp_path, env={"X\nJOBMESH_SECRET_DB": "1"})
    outcome = await ContainerRunner(str(podman.path), uid=None, gid=None, pids_max=8).run(request)
    assert outcome.error is not None and outcome.error.code == "container_failed"
    assert outcome.error.message.startswith("the container's variables are refused: ")
    assert podman.calls() == []


async def test_the_engine_client_never_sees_the_executors_secrets(
    tmp_path: Path, podman: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOBMESH_SECRET_DB", "s3cr3t-value")
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/engine.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    probe_engine("podman", "img")
    for_probe = podman.environ()
    outcome = await ContainerRunner(str(podman.path), uid=None, gid=None, pids_max=8).run(make_request(tmp_path))
    assert outcome.error is None
    for seen in (for_probe, podman.environ()):
        assert "JOBMESH_SECRET_DB" not in seen and "s3cr3t-value" not in seen.values()
        assert seen["DOCKER_HOST"] == "unix:///run/engine.sock" and seen["XDG_RUNTIME_DIR"] == str(tmp_path)
        assert seen["PATH"] == os.environ["PATH"]


async def test_stdin_reaches_the_container(tmp_path: Path, podman: Engine) -> None:
    stdin = tmp_path / "stdin"
    stdin.write_text("to the job\n")
    outcome = await ContainerRunner(str(podman.path), uid=None, gid=None, pids_max=8).run(
        make_request(tmp_path, stdin=stdin)
    )
    assert outcome.error is None
    [call] = podman.calls()
    assert "-i" in call["argv"] and call["stdin"] == "to the job\n"


async def test_the_commands_own_exit_code_fails_as_exit_code(tmp_path: Path, podman: Engine) -> None:
    podman.behave(exit=3)
    outcome = await ContainerRunner(str(podman.path), uid=None, gid=None, pids_max=8).run(make_request(tmp_path))
    assert outcome.error is not None and outcome.error.code == EXIT_CODE and outcome.exit_code == 3


@pytest.mark.parametrize(
    ("status", "said"),
    [
        (125, "the container engine failed"),
        (126, "the container's command cannot be invoked"),
        (127, "the container's command was not found"),
    ],
)
async def test_the_engines_own_exit_statuses_fail_as_container_failed(
    tmp_path: Path, podman: Engine, status: int, said: str
) -> None:
    podman.behave(stderr=[f"Error: {IMAGE}: image not known"], exit=status)
    outcome = await ContainerRunner(str(podman.path), uid=None, gid=None, pids_max=8).run(make_request(tmp_path))
    assert outcome.error is not None and outcome.error.code == "container_failed"
    assert outcome.error.message == f"{said} (exit code {status}): Error: {IMAGE}: image not known"
    assert outcome.exit_code == status


async def test_past_its_run_timeout_the_container_is_killed_by_name_and_removed(tmp_path: Path, podman: Engine) -> None:
    podman.behave(stdout=["working"], hang=True)
    runner = ContainerRunner(str(podman.path), uid=None, gid=None, pids_max=8)
    outcome = await runner.run(make_request(tmp_path, timeout=0.5))
    assert outcome.error is not None and outcome.error.code == TIMEOUT
    assert outcome.error.message == "ran longer than its run timeout of 0.5s"
    assert "working\n" in outcome.output_tail
    assert [c["argv"][:2] for c in podman.calls()[1:]] == [["kill", "jm-j1-2"], ["rm", "-f"]]
    assert podman.calls()[2]["argv"] == ["rm", "-f", "jm-j1-2"]


async def test_an_abort_stops_the_container_with_the_aborts_reason(tmp_path: Path, podman: Engine) -> None:
    podman.behave(stdout=["started"], hang=True)
    lines = Lines()
    abort = AbortSignal()
    request = make_request(tmp_path, on_line=lines, abort=abort)
    running = asyncio.ensure_future(ContainerRunner(str(podman.path), uid=None, gid=None, pids_max=8).run(request))
    await asyncio.wait_for(lines.first.wait(), 10)
    abort.set(CANCELLED, "cancelled by the user")
    outcome = await asyncio.wait_for(running, 20)
    assert outcome.error is not None and outcome.error.code == CANCELLED
    assert outcome.error.message == "cancelled by the user"
    assert ["kill", "jm-j1-2"] in [c["argv"] for c in podman.calls()]


async def test_a_client_that_survives_the_engine_kill_is_killed_with_its_whole_group(
    tmp_path: Path, podman: Engine
) -> None:
    podman.behave(hang=True, ignore_kill=True)
    runner = ContainerRunner(str(podman.path), uid=None, gid=None, pids_max=8, kill_grace=0.3)
    outcome = await asyncio.wait_for(runner.run(make_request(tmp_path, timeout=0.5)), 20)
    assert outcome.error is not None and outcome.error.code == TIMEOUT
    grandchild = int((podman.dir / "grandchild").read_text())

    async def gone() -> bool:
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True
        return state == "Z"  # killed, not yet reaped by init

    await eventually(gone, timeout=10, what="the client's child killed with its group")


async def test_an_attempt_aborted_before_it_started_runs_nothing(tmp_path: Path, podman: Engine) -> None:
    abort = AbortSignal()
    abort.set("node_drained", "the node drains")
    outcome = await ContainerRunner(str(podman.path), uid=None, gid=None, pids_max=8).run(
        make_request(tmp_path, abort=abort)
    )
    assert outcome.error is not None and outcome.error.code == "node_drained"
    assert podman.calls() == []


async def test_an_engine_that_cannot_be_started_fails_as_container_failed(tmp_path: Path) -> None:
    runner = ContainerRunner(str(tmp_path / "no-such-engine"), uid=None, gid=None, pids_max=8)
    outcome = await runner.run(make_request(tmp_path))
    assert outcome.error is not None and outcome.error.code == "container_failed"
    assert outcome.error.message.startswith(f"cannot start '{tmp_path / 'no-such-engine'}': ")


# --- the probe -------------------------------------------------------------------------


def test_the_probe_runs_a_container_of_the_probe_image(podman: Engine) -> None:
    probe = probe_engine("auto", "busybox:stable")
    assert probe == EngineProbe(str(podman.path), f"podman ({podman.path}): ran busybox:stable")
    assert podman.calls() == [{"argv": ["run", "--rm", "--network", "none", "busybox:stable", "true"]}]


def test_auto_tries_docker_when_podman_fails_and_names_every_reason_when_both_do(bin_dir: Path) -> None:
    podman = Engine(bin_dir, "podman")
    podman.behave(probe_exit=125, probe_stderr="Error: short-name resolution failed")
    assert probe_engine("auto", "img").detail == (
        "unavailable: podman: `podman run --rm img true` exited with code 125: Error: short-name resolution failed; "
        "docker: not found on PATH"
    )
    docker = Engine(bin_dir, "docker")
    probe = probe_engine("auto", "img")
    assert probe.engine == str(docker.path) and probe.detail == f"docker ({docker.path}): ran img"


def test_a_named_engine_is_the_only_one_tried_and_an_empty_setting_turns_containers_off(bin_dir: Path) -> None:
    podman = Engine(bin_dir, "podman")
    assert probe_engine("docker", "img") == EngineProbe(None, "unavailable: docker: not found on PATH")
    assert probe_engine(str(podman.path), "img").engine == str(podman.path)
    assert probe_engine("", "img") == EngineProbe(None, "off (JOBMESH_CONTAINER_ENGINE is empty)")
    assert len(podman.calls()) == 1


def test_a_probe_that_does_not_finish_in_time_says_so(podman: Engine) -> None:
    podman.behave(probe_hang=True)
    probe = probe_engine("podman", "img", timeout=0.5)
    assert probe == EngineProbe(None, "unavailable: podman: `podman run --rm img true` did not finish within 0.5s")


def real_probe() -> EngineProbe:
    return probe_engine("auto", Settings().container_probe_image, timeout=120)


def test_the_real_probe_reports_why_this_machine_cannot_run_containers() -> None:
    # Not skipped: on this machine (no podman, a docker client without a daemon) the probe
    # must fail and say why for each engine; where an engine works it must say which.
    probe = real_probe()
    if probe.engine is not None:
        assert probe.detail.startswith(("podman (", "docker (")) and " ran " in probe.detail
        return
    assert probe.detail.startswith("unavailable: podman: ") and "; docker: " in probe.detail
    for engine in ("podman", "docker"):
        if shutil.which(engine) is None:
            assert f"{engine}: not found on PATH" in probe.detail
        else:
            assert f"{engine}: `{engine} run --rm " in probe.detail


async def test_the_real_engine_runs_a_container_or_the_probe_says_why_not(tmp_path: Path) -> None:
    # Never skipped: where no engine can run a container (this machine), the probe must say
    # so and name each engine's reason; where one can, a real container runs.
    probe = real_probe()
    if probe.engine is None:
        assert probe.detail.startswith("unavailable: ") and "podman" in probe.detail and "docker" in probe.detail
        return
    workdir = tmp_path / "work"
    workdir.mkdir()
    os.chmod(workdir, 0o777)
    lines = Lines()
    runtime = ContainerRuntime(
        image=Settings().container_probe_image, argv=["sh", "-c", "echo hello; echo 42 > result"]
    )
    request = make_request(tmp_path, runtime=runtime, workdir=workdir, on_line=lines, env={"HOME": str(workdir)})
    outcome = await ContainerRunner(probe.engine, uid=65534, gid=65534, pids_max=64).run(request)
    assert outcome.error is None, outcome
    assert ("stdout", "hello") in lines.lines and (workdir / "result").read_text() == "42\n"


def test_a_container_runs_as_the_attempts_own_uid_where_it_has_one(tmp_path: Path) -> None:
    """Its working directory belongs to that uid (the attempt handed it over), not the node's."""
    runner = ContainerRunner("podman", uid=65534, gid=65534, pids_max=64)
    own = runner.argv(make_request(tmp_path, uid=2_000_000_007, gid=2_000_000_007))
    shared = runner.argv(make_request(tmp_path))
    assert own[own.index("--user") + 1] == "2000000007:2000000007"
    assert shared[shared.index("--user") + 1] == "65534:65534"


async def test_a_variable_with_a_line_break_runs_no_container(tmp_path: Path, podman: Engine) -> None:
    """An env file cannot carry it, and on the engine's command line every user of the node
    could read it (a secret as a variable, say): the attempt fails naming the variable only."""
    request = make_request(tmp_path, env={"GREETING": "hi", "TLS_KEY": "-----BEGIN KEY-----\nc2VjcmV0\n"})
    outcome = await ContainerRunner(str(podman.path), uid=None, gid=None, pids_max=8).run(request)
    assert outcome.error is not None and outcome.error.code == "container_failed"
    assert "variable TLS_KEY holds a line break" in outcome.error.message and "c2VjcmV0" not in outcome.error.message
    assert podman.calls() == []
