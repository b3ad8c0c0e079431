"""The isolation decisions as pure functions: limits, rlimits, the bubblewrap argv, the level a
node advertises, refusals, the outcome of a process that hit a limit, and the cgroup layouts
(on a fake cgroup tree; the real ones are exercised in tests/test_isolation.py)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from jobmesh.contract.messages.v1 import Constraints, JobError, JobSpec, ProcessRuntime
from jobmesh.executor.isolation.cgroups import (
    MIN_MEMORY_MB,
    attempt_limits,
    find_cgroup_root,
    own_cgroup_paths,
    parse_counter,
)
from jobmesh.executor.isolation.environment import allowed_environment, job_environment
from jobmesh.executor.isolation.launch import command_problem
from jobmesh.executor.isolation.probe import (
    decide_level,
    level_problem,
    probe_report,
    probe_sandbox,
    refusal,
    unreachable_parent,
)
from jobmesh.executor.isolation.rlimits import ADDRESS_HEADROOM_MB, Rlimit, attempt_rlimits, cpu_limit, cpu_seconds
from jobmesh.executor.isolation.sandbox import SandboxRequest, SandboxTools, sandbox_argv, sandbox_path
from jobmesh.executor.outcomes import Outcome, cpu_limit_outcome, exit_outcome, failed_outcome, limit_outcome

MERGED = {"/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib64", "/sbin": "usr/sbin"}


# --- limits --------------------------------------------------------------------------------
def test_cgroup_limits_come_from_the_reservation_with_floors():
    limits = attempt_limits(memory_mb=256, cpu_milli=1500, pids_max=512)
    assert limits.memory_bytes == 256 * 1024 * 1024
    assert (limits.cpu_quota_us, limits.cpu_period_us) == (150_000, 100_000)
    assert limits.pids_max == 512
    tiny = attempt_limits(memory_mb=0, cpu_milli=1, pids_max=8)
    assert tiny.memory_bytes == MIN_MEMORY_MB * 1024 * 1024 and tiny.cpu_quota_us == 10_000


def test_rlimits_are_a_backstop_under_a_cgroup_and_the_limit_without_one():
    def by_resource(limits):
        return {limit.resource: (limit.soft, limit.hard) for limit in limits}

    caged = by_resource(
        attempt_rlimits(64, 10.0, 4096, 512, cgroup_memory=True, cgroup_pids=True, cpus=1, own_uid=True)
    )
    assert caged[resource.RLIMIT_AS][0] == (64 + ADDRESS_HEADROOM_MB) * 1024 * 1024
    assert caged[resource.RLIMIT_CPU] == (15, 20)
    assert caged[resource.RLIMIT_NOFILE] == (4096, 4096)
    assert caged[resource.RLIMIT_NPROC][0] > 512  # the cgroup's pids.max is the real limit
    assert caged[resource.RLIMIT_CORE] == (0, 0)
    bare = by_resource(attempt_rlimits(64, 0.5, 128, 64, cgroup_memory=False, cgroup_pids=False, cpus=1, own_uid=True))
    assert bare[resource.RLIMIT_AS][0] == (2 * 64 + 256) * 1024 * 1024
    assert bare[resource.RLIMIT_NPROC] == (64, 64)
    assert bare[resource.RLIMIT_CPU][0] == 6  # ceil(0.5) + grace


def test_the_cpu_time_limit_is_what_every_core_can_use_in_the_run_timeout():
    # CPU time counts all threads: 4 busy threads use 40s of it in a 10s timeout, and must
    # not be stopped by SIGXCPU after 2.5s.
    four = {limit.resource: (limit.soft, limit.hard) for limit in attempt_rlimits(
        64, 10.0, 4096, 512, cgroup_memory=True, cgroup_pids=True, cpus=4
    )}  # fmt: skip
    assert four[resource.RLIMIT_CPU] == (45, 50)  # 10s x 4 cores + grace
    assert cpu_seconds(0.5, 3) == 2 + 5 and cpu_seconds(10.0, 0) == 15  # at least one core
    assert cpu_limit(attempt_rlimits(64, 10.0, 1, 1, cgroup_memory=False, cgroup_pids=False, cpus=2)) == Rlimit(
        resource.RLIMIT_CPU, 25, 30
    )
    assert cpu_limit(()) is None


def test_the_process_limit_is_set_only_for_a_uid_of_the_attempts_own():
    # RLIMIT_NPROC counts every process of the uid: as the executor's own (not root) it
    # would count the executor, its workers and the other attempts.
    for cgroup_pids in (True, False):
        shared = attempt_rlimits(64, 10.0, 4096, 512, cgroup_memory=cgroup_pids, cgroup_pids=cgroup_pids)
        assert resource.RLIMIT_NPROC not in {limit.resource for limit in shared}
        assert {limit.resource for limit in shared} == {
            resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_NOFILE, resource.RLIMIT_CORE
        }  # fmt: skip
        own = attempt_rlimits(64, 10.0, 4096, 512, cgroup_memory=cgroup_pids, cgroup_pids=cgroup_pids, own_uid=True)
        assert resource.RLIMIT_NPROC in {limit.resource for limit in own}


# --- the sandbox's command line --------------------------------------------------------------
def pairs(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


def test_as_root_bwrap_builds_the_sandbox_and_setpriv_then_unshare_drop_root():
    tools = SandboxTools(
        bwrap="/usr/bin/bwrap", setpriv="/usr/bin/setpriv", unshare="/usr/bin/unshare", symlinks=MERGED
    )
    argv = sandbox_argv(tools, SandboxRequest(argv=["sh", "-c", "x"], workdir="/srv/w/j-1", uid=65534, gid=65534))
    assert argv[0] == "/usr/bin/bwrap"
    for flag in (
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-net",
        "--die-with-parent",
        "--new-session",
    ):
        assert flag in argv
    assert "--unshare-user" not in argv  # as root it would map the sandbox uid onto root
    assert pairs(argv, "--cap-drop") == ["ALL"]
    assert pairs(argv, "--cap-add") == ["CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP"]
    assert pairs(argv, "--ro-bind-try") == ["/usr", "/etc", "/opt"]
    assert ["--symlink", "usr/bin", "/bin"] == argv[argv.index("/bin") - 2 : argv.index("/bin") + 1]
    assert pairs(argv, "--bind") == ["/srv/w/j-1"] and pairs(argv, "--chdir") == ["/srv/w/j-1"]
    assert ["--perms", "01777", "--tmpfs", "/tmp"] == argv[argv.index("--tmpfs") - 2 : argv.index("--tmpfs") + 2]
    tail = argv[argv.index("--") + 1 :]
    assert tail[:2] == ["/usr/bin/setpriv", "--reuid"] and "--no-new-privs" in tail and "--bounding-set=-all" in tail
    unshare = tail.index("/usr/bin/unshare")
    assert tail[unshare : unshare + 4] == ["/usr/bin/unshare", "--user", "--map-user=65534", "--map-group=65534"]
    assert tail[-4:] == ["--", "sh", "-c", "x"]


def test_network_keeps_the_net_namespace_and_a_non_root_bwrap_maps_the_user_itself():
    tools = SandboxTools(as_root=False, symlinks=MERGED)
    argv = sandbox_argv(tools, SandboxRequest(argv=["true"], workdir="/w/j", uid=1000, gid=1000, network=True))
    assert "--unshare-net" not in argv
    assert argv[argv.index("--unshare-user") : argv.index("--unshare-user") + 5] == [
        "--unshare-user",
        "--uid",
        "1000",
        "--gid",
        "1000",
    ]
    assert "--disable-userns" in argv and "setpriv" not in argv
    assert argv[-2:] == ["--", "true"]


def test_parents_of_binds_are_made_searchable_and_paths_under_a_bind_are_not_bound_again():
    tools = SandboxTools(symlinks=MERGED, extra_ro=("/usr/local/python", "/root/.pyenv/versions/3.11"))
    request = SandboxRequest(
        argv=["true"],
        workdir="/tmp/pytest-of-root/t0/nodes/n/j-1",
        uid=65534,
        gid=65534,
        secrets_dir="/var/lib/jm/secrets/j-1",
        devices=["/dev/nvidia0"],
    )
    argv = sandbox_argv(tools, request)
    made = pairs(argv, "--dir")
    assert made[:2] == ["/root", "/root/.pyenv"]  # a 0700 /root on the host is 0755 inside
    assert "/tmp/pytest-of-root" in made and "/tmp/pytest-of-root/t0/nodes/n" in made
    assert "/tmp" not in made and "/usr/local" not in made
    assert pairs(argv, "--ro-bind") == ["/root/.pyenv/versions/3.11", "/var/lib/jm/secrets/j-1"]
    assert argv[argv.index("/var/lib/jm/secrets/j-1") + 1] == "/run/secrets"
    assert pairs(argv, "--dev-bind") == ["/dev/nvidia0"]
    # The tmpfs comes before the work directory, which lies under it.
    assert argv.index("--tmpfs") < argv.index("--bind")


# --- the node's level, its report and refusals ----------------------------------------------
@pytest.mark.parametrize(
    "setting, sandbox, container, level",
    [
        ("auto", True, False, "sandbox"),
        ("auto", False, False, "process"),
        ("auto", True, True, "sandbox"),  # container isolation is asked for, never assumed
        ("process", True, False, "process"),
        ("sandbox", True, False, "sandbox"),
        ("sandbox", False, False, None),
        ("container", True, False, None),
        ("container", True, True, "container"),
    ],
)
def test_the_level_is_the_probes_capped_by_the_setting(setting, sandbox, container, level):
    assert decide_level(setting, sandbox, container) == level


def test_a_refused_level_names_the_setting_and_what_the_probe_found():
    report = probe_report(
        "unavailable: bwrap (bubblewrap) is not installed", "v1 memory,cpu,pids", 65534, 65534, 0, True
    )
    message = level_problem("sandbox", report)
    assert message.startswith("JOBMESH_NODE_ISOLATION=sandbox cannot be enforced")
    assert "sandbox: unavailable: bwrap (bubblewrap) is not installed" in message
    assert report["uid"] == "65534:65534 (the executor runs as root)"
    assert probe_report("x", "none: y", None, None, 1000, False)["uid"].startswith(
        "unchanged: the executor runs as uid 1000"
    )


def spec(isolation: str = "", network: bool = False) -> JobSpec:
    return JobSpec(runtime=ProcessRuntime(argv=["true"]), constraints=Constraints(isolation=isolation), network=network)


def test_refusals_name_what_the_node_cannot_do():
    assert refusal(spec(), "process", "process", True) is None
    assert refusal(spec("sandbox"), "process", "sandbox", True) is None
    assert "asks for isolation sandbox; this node enforces process" in refusal(
        spec("sandbox"), "process", "process", True
    )
    assert "a process runtime runs at most in the sandbox" in refusal(spec("container"), "process", "container", True)
    assert refusal(spec("container"), "container", "container", True) is None
    assert "JOBMESH_NODE_NETWORK=false" in refusal(spec(network=True), "process", "sandbox", False)
    assert refusal(spec(network=True), "process", "sandbox", True) is None


def test_an_unsearchable_parent_of_the_work_directory_is_found():
    # Not under tmp_path: pytest's own tree is 0700 (which is the very case found here).
    base = Path(tempfile.mkdtemp(prefix="jobmesh-reach-"))
    try:
        os.chmod(base, 0o755)
        closed = base / "closed"
        (closed / "work").mkdir(parents=True)
        os.chmod(closed, 0o700)
        assert unreachable_parent(closed / "work" / "node", 65534, 65534) == closed
        os.chmod(closed, 0o711)
        assert unreachable_parent(closed / "work" / "node", 65534, 65534) is None
    finally:
        shutil.rmtree(base)


def test_the_sandbox_probe_says_why_it_is_unavailable():
    missing = probe_sandbox(65534, 65534, True, which=lambda _name: None)
    assert missing.tools is None and missing.detail == "unavailable: bwrap (bubblewrap) is not installed"
    no_setpriv = probe_sandbox(65534, 65534, True, which=lambda name: None if name == "setpriv" else f"/usr/bin/{name}")
    assert "setpriv and unshare" in no_setpriv.detail

    def failing(argv, **_kw):
        if argv[-1] == "--version":
            return subprocess.CompletedProcess(argv, 0, "bubblewrap 0.8.0\n", "")
        return subprocess.CompletedProcess(argv, 1, "", "bwrap: No permissions to creating new namespace\n")

    broken = probe_sandbox(os.geteuid() or 65534, os.getegid() or 65534, False, which=lambda n: n, run=failing)
    assert broken.tools is None
    assert (
        broken.detail
        == "unavailable: bubblewrap 0.8.0 did not run a sandbox: bwrap: No permissions to creating new namespace"
    )


# --- the outcome of a process that met a limit -------------------------------------------------
def test_a_failure_under_an_oom_kill_or_a_refused_fork_is_reported_as_such():
    killed = failed_outcome("exit_code", "killed by SIGKILL (exit code -9)", -9, "tail")
    assert limit_outcome(killed, 1, 0, 64, 512).error.code == "oom"
    assert "64 MiB" in limit_outcome(killed, 1, 0, 64, 512).error.message
    assert limit_outcome(killed, 0, 3, 64, 512).error.code == "pids_exceeded"
    assert limit_outcome(killed, 0, 0, 64, 512) is killed
    fine = Outcome(0, None)
    assert limit_outcome(fine, 1, 1, 64, 512) is fine  # it coped; it succeeded
    timed_out = Outcome(None, JobError(code="timeout", message="ran too long"))
    assert limit_outcome(timed_out, 1, 0, 64, 512) is timed_out


@pytest.mark.parametrize("code", [-24, 152])  # SIGXCPU itself, or through a shell or bubblewrap
def test_a_process_ended_by_sigxcpu_ran_out_of_cpu_time_and_timed_out(code):
    # 45s of CPU time on 4 cores takes at least 11.25s of wall time.
    assert cpu_limit_outcome(exit_outcome(code, "tail"), 45, 50, elapsed=11.0, cpus=4).error.code == "exit_code"
    outcome = cpu_limit_outcome(exit_outcome(code, "tail"), 45, 50, elapsed=11.25, cpus=4)
    assert outcome.error is not None and outcome.error.code == "timeout"
    assert outcome.error.message == (
        f"reached its CPU-time limit (RLIMIT_CPU, 45s of CPU time across its threads): "
        f"killed by SIGXCPU (exit code {code})"
    )
    assert outcome.exit_code == code and outcome.output_tail == "tail"


@pytest.mark.parametrize("code", [-9, 137])
def test_a_sigkill_is_the_hard_cpu_limit_only_when_the_process_could_have_used_that_much(code):
    # 50s of CPU time on 4 cores takes at least 12.5s of wall time.
    reached = cpu_limit_outcome(exit_outcome(code), 45, 50, elapsed=12.5, cpus=4)
    assert reached.error is not None and reached.error.code == "timeout"
    assert reached.error.message.startswith("reached its hard CPU-time limit (RLIMIT_CPU, 50s")
    sooner = exit_outcome(code)
    assert cpu_limit_outcome(sooner, 45, 50, elapsed=12.4, cpus=4) is sooner  # the OOM killer, an operator


def test_other_ends_are_not_the_cpu_limit():
    for outcome in (
        exit_outcome(0),
        exit_outcome(1),
        exit_outcome(-15),
        exit_outcome(24),  # the job's own exit code 24 is no signal
        failed_outcome("oom", "ran out of memory", -9),  # the cgroup's verdict stays
        Outcome(None, JobError(code="timeout", message="ran longer than its run timeout of 1s")),
    ):
        assert cpu_limit_outcome(outcome, 1, 2, elapsed=1000.0, cpus=1) is outcome


# --- the environment ---------------------------------------------------------------------------
def test_the_environment_is_the_allow_list_then_the_jobs_then_jobmeshs(tmp_path):
    environ = {"PATH": "/bin", "TZ": "UTC", "AWS_SECRET_ACCESS_KEY": "no", "JOBMESH_NATS_URL": "nats://x"}
    base = allowed_environment(environ, "PATH, LANG,TZ")
    assert base == {"PATH": "/bin", "TZ": "UTC", "LANG": "C.UTF-8"}
    env = job_environment(base, tmp_path, {"MINE": "1", "JOBMESH_JOB_ID": "spoof"}, {"JOBMESH_JOB_ID": "j"})
    assert env == {**base, "HOME": str(tmp_path), "MINE": "1", "JOBMESH_JOB_ID": "j"}
    assert allowed_environment({}, "")["PATH"] == "/usr/local/bin:/usr/bin:/bin"


# --- cgroup layouts on a fake tree --------------------------------------------------------------
def test_cgroup_files_parse():
    assert parse_counter("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill") == 2
    assert parse_counter("max 0\n", "max") == 0 and parse_counter("", "max") == 0
    paths = own_cgroup_paths("9:name=systemd:/\n8:pids:/\n4:memory:/api/x\n1:cpu,cpuacct:/\n0::/\n")
    assert paths["memory"] == "/api/x" and paths["cpu"] == "/" and paths["cpuacct"] == "/" and paths[""] == "/"


def fake_v1(root: Path, controllers=("memory", "cpu", "pids")) -> Path:
    for controller in controllers:
        (root / controller / "api").mkdir(parents=True)
        (root / controller / "cgroup.procs").write_text("")
    lines = [f"{i}:{c}:/api" for i, c in enumerate(controllers, 1)] + ["0::/"]
    (root / "self-cgroup").write_text("\n".join(lines) + "\n")
    return root / "self-cgroup"


def test_v1_attempt_cgroups_go_under_the_executors_own_in_each_hierarchy(tmp_path):
    root, detail = find_cgroup_root("n1", mount=tmp_path, proc_self_cgroup=fake_v1(tmp_path))
    assert root is not None and root.version == 1 and detail == "v1 memory,cpu,pids"
    assert root.parents["memory"] == tmp_path / "memory" / "api" / "jobmesh-n1"
    group = root.create("j-1", attempt_limits(128, 500, 64))
    assert (tmp_path / "memory/api/jobmesh-n1/j-1/memory.limit_in_bytes").read_text() == str(128 * 1024 * 1024)
    assert (tmp_path / "pids/api/jobmesh-n1/j-1/pids.max").read_text() == "64"
    assert (tmp_path / "cpu/api/jobmesh-n1/j-1/cpu.cfs_quota_us").read_text() == "50000"
    assert group.procs_files() == [
        os.fsencode(tmp_path / f"{c}/api/jobmesh-n1/j-1/cgroup.procs") for c in ("memory", "cpu", "pids")
    ]
    (tmp_path / "memory/api/jobmesh-n1/j-1/memory.oom_control").write_text("oom_kill 1\n")
    (tmp_path / "pids/api/jobmesh-n1/j-1/pids.events").write_text("max 4\n")
    assert (group.events().oom_kills, group.events().pids_refused) == (1, 4)


def test_without_writable_memory_and_pids_there_are_no_cgroups(tmp_path):
    root, detail = find_cgroup_root("n1", mount=tmp_path, proc_self_cgroup=fake_v1(tmp_path, ("cpu",)))
    assert root is None
    assert detail.startswith("none: ") and "no cgroup v1 memory hierarchy" in detail
    assert not (tmp_path / "cpu/api/jobmesh-n1").exists()  # nothing half-made


def test_a_delegated_v2_subtree_is_preferred_and_the_executor_moves_into_a_leaf(tmp_path):
    own = tmp_path / "user.slice" / "jm"
    own.mkdir(parents=True)
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids io\n")
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    (tmp_path / "self-cgroup").write_text("0::/user.slice/jm\n")
    root, detail = find_cgroup_root("n2", mount=tmp_path, proc_self_cgroup=tmp_path / "self-cgroup")
    assert root is not None and root.version == 2
    assert detail == f"v2 memory,pids,cpu at {own / 'jobmesh-n2'}"
    assert (own / "executor" / "cgroup.procs").read_text() == str(os.getpid())
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    group = root.create("j-1", attempt_limits(100, 1000, 32))
    assert (own / "jobmesh-n2/j-1/memory.max").read_text() == str(100 * 1024 * 1024)
    assert (own / "jobmesh-n2/j-1/cpu.max").read_text() == "100000 100000"
    assert (own / "jobmesh-n2/j-1/pids.max").read_text() == "32"
    (own / "jobmesh-n2/j-1/memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert group.events().oom_kills == 1


def test_v2_without_the_controllers_falls_back_to_v1(tmp_path):
    self_cgroup = fake_v1(tmp_path)
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("")  # the hybrid layout of these machines
    root, detail = find_cgroup_root("n3", mount=tmp_path, proc_self_cgroup=self_cgroup)
    assert root is not None and root.version == 1 and detail == "v1 memory,cpu,pids"


def test_a_sandboxed_path_keeps_what_the_sandbox_holds_behind_the_executors_python():
    tools = SandboxTools(symlinks=MERGED, extra_ro=("/opt/venv",), python_bin="/opt/venv/bin")
    path = "/root/.pyenv/shims:/usr/local/bin:/usr/bin:/bin:relative:/opt/venv/bin/../x"
    assert sandbox_path(path, tools) == "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin:/opt/venv/bin/../x"
    assert sandbox_path("/usr/bin", SandboxTools()) == "/usr/bin"


def test_a_command_the_sandbox_cannot_start_is_named_before_the_spawn(tmp_path):
    (tmp_path / "tool").write_text("#!/bin/sh\n")
    assert command_problem("sh", "/usr/bin:/bin", tmp_path) is None
    assert command_problem("no-such-command-jobmesh", "/usr/bin:/bin", tmp_path) == "No such file or directory"
    assert command_problem("./tool", "", tmp_path) == "Permission denied"
    os.chmod(tmp_path / "tool", 0o755)
    assert command_problem("./tool", "", tmp_path) is None
