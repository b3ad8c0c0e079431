"""The CPU-time limit (RLIMIT_CPU) on real processes under the runner's rlimits: the node's
limit is what the cores can use in the run timeout, so the run timeout always comes first,
and a SIGXCPU (or the 128 + SIGXCPU a shell reports) that comes sooner is the job's own
doing, reported as its exit code, not as a timeout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from jobmesh.contract.messages.v1 import ProcessRuntime, Resources
from jobmesh.executor.isolation.probe import NodeIsolation
from jobmesh.executor.runner import AbortSignal, ProcessRunner
from jobmesh.executor.runrequest import RunRequest

# The job lowers its own soft limit to 1s of CPU time (the node's is far above what it can
# use within its run timeout) and spins: the kernel sends SIGXCPU after a second of CPU.
SPIN = (
    "import resource; _, hard = resource.getrlimit(resource.RLIMIT_CPU); "
    "resource.setrlimit(resource.RLIMIT_CPU, (1, hard)); print('spinning', flush=True)\n"
    "while True: pass"
)


async def _ignore(stream: str, line: str) -> None:
    pass


def request(tmp_path: Path, argv: list[str]) -> RunRequest:
    workdir = tmp_path / "work"
    workdir.mkdir()
    return RunRequest(
        job_id="j1",
        attempt=1,
        name="job j1 attempt 1",
        runtime=ProcessRuntime(argv=argv),
        workdir=workdir,
        env={"PATH": "/usr/bin:/bin", "HOME": str(workdir)},
        timeout=60.0,
        abort=AbortSignal(),
        on_line=_ignore,
        resources=Resources(memory_mb=256),
    )


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        ([sys.executable, "-c", SPIN], -24),  # a limit the job lowered itself
        (["sh", "-c", '"$@"; status=$?; echo "child ended"; exit $status', "sh", sys.executable, "-c", SPIN], 152),
        (["sh", "-c", "echo spinning; exit 152"], 152),  # a plain exit status
        (["sh", "-c", "echo spinning; kill -XCPU $$"], -24),  # a signal anyone may send
    ],
)
async def test_a_sigxcpu_well_before_the_nodes_cpu_limit_is_the_jobs_own_exit(tmp_path: Path, argv, code):
    runner = ProcessRunner({"PATH": "/usr/bin:/bin"}, isolation=NodeIsolation())  # rlimits, no cgroup
    outcome = await runner.run(request(tmp_path, argv))
    assert outcome.error is not None and outcome.error.code == "exit_code", outcome
    assert outcome.exit_code == code
    assert "spinning" in outcome.output_tail
