"""A SIGTERM for a sandboxed attempt goes to the job's processes and spares the group's
leader (bubblewrap, whose death would SIGKILL the sandbox and take the grace away), with a
cgroup or without one; every other signal, and every signal outside a sandbox, goes to the
whole group as before (services/executor/isolation/launch.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from jobmesh.executor.isolation.launch import Launch, descendants

# The leader stands for bubblewrap: it dies of a SIGTERM (no trap), and waits for the job,
# which saves its work on SIGTERM and exits.
JOB = "trap 'echo saved > {out}; exit 0' TERM; echo ready > {ready}; sleep 30 & wait $!"


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    out, ready = tmp_path / "saved", tmp_path / "ready"
    job = JOB.format(out=out, ready=ready)
    leader = subprocess.Popen(["sh", "-c", f"sh -c {job!r}; echo leader-done"], start_new_session=True)
    deadline = time.monotonic() + 10
    while not ready.exists():
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.01)  # polling with the deadline above (noqa: sleep)
    return leader, out, ready


def _kill_group(leader: subprocess.Popen) -> None:
    # The job shares the leader's process group (its session): take it all down.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait(timeout=10)


class FakeCgroup:
    def __init__(self, pids: list[int]) -> None:
        self._pids = pids

    def pids(self) -> list[int]:
        return list(self._pids)


def _graceful(launch_of, tmp_path: Path) -> None:
    leader, out, _ = _start(tmp_path)
    try:
        launch_of(leader.pid).signal_all(leader.pid, signal.SIGTERM)
        # The job got the SIGTERM and saved; the leader was spared and exits normally
        # once the job has.
        assert leader.wait(timeout=10) == 0
        assert out.read_text().strip() == "saved"
    finally:
        _kill_group(leader)


def test_without_a_cgroup_the_leaders_descendants_get_the_sigterm(tmp_path: Path) -> None:
    _graceful(lambda _pid: Launch(argv=[], sandboxed=True), tmp_path)


def test_with_a_cgroup_its_processes_but_the_leader_get_the_sigterm(tmp_path: Path) -> None:
    def launch(pid: int) -> Launch:
        return Launch(argv=[], cgroup=FakeCgroup([pid, *descendants(pid)]), sandboxed=True)  # type: ignore[arg-type]

    _graceful(launch, tmp_path)


def test_outside_a_sandbox_the_whole_group_gets_it(tmp_path: Path) -> None:
    leader, _, _ = _start(tmp_path)
    try:
        Launch(argv=[]).signal_all(leader.pid, signal.SIGTERM)
        assert leader.wait(timeout=10) == -signal.SIGTERM  # the leader itself was terminated
    finally:
        _kill_group(leader)


def test_a_sigkill_in_a_sandbox_still_reaches_the_leader(tmp_path: Path) -> None:
    leader, _, _ = _start(tmp_path)
    try:
        Launch(argv=[], sandboxed=True).signal_all(leader.pid, signal.SIGKILL)
        assert leader.wait(timeout=10) == -signal.SIGKILL
    finally:
        _kill_group(leader)
