"""Per-attempt uids: the pool's order, and killing what is left of a uid (real processes, as root)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from jobmesh.executor.isolation.uids import UidPool, kill_uid
from tests.helpers import eventually


def test_the_pool_hands_out_every_uid_once_and_least_recently_used_first() -> None:
    pool = UidPool(5000, 3)
    taken = [pool.acquire(), pool.acquire(), pool.acquire()]
    assert taken == [5000, 5001, 5002] and pool.acquire() is None and pool.in_use == 3
    pool.release(5001)
    pool.release(5001)  # a second release of one uid changes nothing
    pool.release(4000)  # nor does one of a uid it never gave
    pool.release(5000)
    assert pool.in_use == 1
    assert pool.acquire() == 5001 and pool.acquire() == 5000 and pool.acquire() is None


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="only root runs processes as another uid")
async def test_kill_uid_kills_every_process_of_that_uid_and_no_other() -> None:
    uid = 2_000_099_001
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    # A detached process in a session of its own, as one that escaped its job would be.
    leftover = await asyncio.create_subprocess_exec(*drop, "sleep", "300", start_new_session=True)
    bystander = await asyncio.create_subprocess_exec("sleep", "300")
    try:

        async def running_as_uid() -> bool:
            return os.stat(f"/proc/{leftover.pid}").st_uid == uid

        await eventually(running_as_uid, what="the leftover to run as its uid")
        started = time.monotonic()
        await asyncio.to_thread(kill_uid, uid, uid)
        assert await asyncio.wait_for(leftover.wait(), 10) == -9
        assert bystander.returncode is None
        print(f"kill_uid took {time.monotonic() - started:.4f}s")
    finally:
        for proc in (leftover, bystander):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="only root hands a directory to another uid")
def test_rlimit_nproc_is_set_only_for_a_uid_of_the_attempts_own(tmp_path) -> None:
    """RLIMIT_NPROC counts every process of a uid: shared, it would count the others'."""
    import resource

    from jobmesh.executor.isolation.launch import LaunchSpec, prepare_launch
    from jobmesh.executor.isolation.probe import NodeIsolation

    spec = LaunchSpec(argv=["true"], workdir=tmp_path, cgroup_name="j-1", memory_mb=64, cpu_milli=100, timeout=60)
    own = NodeIsolation(uid=2_000_000_005, gid=2_000_000_005, attempt_uids=(2_000_000_000, 10))
    shared = NodeIsolation(uid=65534, gid=65534, attempt_uids=(2_000_000_000, 10))
    limits = {
        name: {limit.resource for limit in prepare_launch(isolation, spec).rlimits}
        for name, isolation in (("own", own), ("shared", shared))
    }
    assert resource.RLIMIT_NPROC in limits["own"] and resource.RLIMIT_NPROC not in limits["shared"]
    assert os.stat(tmp_path).st_uid == 65534  # the last launch handed the directory over


def test_executors_on_one_machine_claim_blocks_of_their_own_and_a_dead_ones_block_is_free(tmp_path) -> None:
    from jobmesh.executor.isolation.uids import claim_block

    base = 3_000_000_000
    first = claim_block(base, 3 * 4096, tmp_path)
    second = claim_block(base, 3 * 4096, tmp_path)
    third = claim_block(base, 3 * 4096, tmp_path)
    assert first is not None and second is not None and third is not None
    assert [(b.first, b.count) for b in (first, second, third)] == [(base + i * 4096, 4096) for i in range(3)]
    assert claim_block(base, 3 * 4096, tmp_path) is None  # every block held
    # Another base or count overlapping held uids anywhere meets their lock.
    assert claim_block(base + 2000, 4096, tmp_path) is None
    assert claim_block(base + 10, 10, tmp_path) is None
    # A range of its own, even right beside a held one, is free.
    beside = claim_block(base + 3 * 4096, 1000, tmp_path)
    assert beside is not None and (beside.first, beside.count) == (base + 3 * 4096, 1000)
    os.close(second.lock_fd)  # its executor died: the kernel dropped the lock
    again = claim_block(base + 4096, 4096, tmp_path)
    assert again is not None and (again.first, again.count) == (base + 4096, 4096)


def test_a_lock_directory_others_may_write_is_refused(tmp_path) -> None:
    from jobmesh.executor.isolation.uids import claim_block

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(PermissionError, match="nobody else may write"):
        claim_block(3_300_000_000, 10, shared)


def test_a_range_holding_the_sandbox_uid_or_a_user_is_refused() -> None:
    from jobmesh.executor.isolation.uids import range_problem

    assert range_problem(60_000, 10_000, (65534, 65534), [0, 1000]) == (
        "the attempt range 60000..69999 holds the sandbox uid 65534"
    )
    assert "holds uid 1000, a user of this machine" in range_problem(500, 1000, (65534, 65534), [0, 1000, 1001])
    assert range_problem(2_000_000_000, 65536, (65534, 65534), [0, 1000, 65534]) == ""


def test_kill_uid_refuses_root() -> None:
    with pytest.raises(ValueError, match="unprivileged uid"):
        kill_uid(0, 0)


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="only root runs processes as another uid")
async def test_claiming_a_block_kills_what_a_dead_executor_left_running_in_it(tmp_path) -> None:
    from jobmesh.executor.isolation.uids import claim_block

    uid = 3_200_000_007
    leftover = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sleep", "300", start_new_session=True
    )
    try:

        async def running_as_uid() -> bool:
            return os.stat(f"/proc/{leftover.pid}").st_uid == uid

        await eventually(running_as_uid, what="the leftover to run as its uid")
        block = claim_block(3_200_000_000, 4096, tmp_path)
        assert block is not None and block.first == 3_200_000_000
        assert await asyncio.wait_for(leftover.wait(), 10) == -9
    finally:
        if leftover.returncode is None:
            leftover.kill()
            await leftover.wait()
