"""A process that runs into its CPU-time limit (RLIMIT_CPU) ends as a ``timeout`` that says so,
on a real process under the runner's rlimits: SIGXCPU itself, or the 128 + SIGXCPU a shell
reports for a child it ended."""

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
    ("wrapped", "code"),
    [(False, -24), (True, 152)],  # the process itself, or a shell that ran it and went on
)
async def test_a_process_that_runs_out_of_cpu_time_times_out_saying_so(tmp_path: Path, wrapped: bool, code: int):
    argv = [sys.executable, "-c", SPIN]
    if wrapped:
        argv = ["sh", "-c", '"$@"; status=$?; echo "child ended"; exit $status', "sh", *argv]
    runner = ProcessRunner({"PATH": "/usr/bin:/bin"}, isolation=NodeIsolation())  # rlimits, no cgroup
    outcome = await runner.run(request(tmp_path, argv))
    assert outcome.error is not None and outcome.error.code == "timeout", outcome
    assert outcome.exit_code == code
    assert outcome.error.message.startswith("reached its CPU-time limit (RLIMIT_CPU, ")
    assert outcome.error.message.endswith(f"killed by SIGXCPU (exit code {code})")
    assert "spinning" in outcome.output_tail
