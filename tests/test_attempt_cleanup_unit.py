"""What an attempt leaves, and who owns it meanwhile (real processes, as root): a cancel
before its outcome is durable (a drain whose settle ran out) still removes its secrets and
returns its uid; its private directory stays root's, so the job cannot put a link there
that root's clean-up would follow."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import pytest
from opentelemetry import trace

from jobmesh.contract.messages.v1 import JobBound, JobSpec, ProcessRuntime
from jobmesh.executor.attempts import Attempt, AttemptSetup
from jobmesh.executor.isolation.probe import NodeIsolation
from jobmesh.executor.isolation.uids import UidPool
from jobmesh.executor.leases import LeaseState
from jobmesh.executor.runner import ProcessRunner
from jobmesh.executor.secrets import SecretSource, remove_secret_files
from tests.helpers import eventually

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="only root runs attempts as uids of their own"
)
FIRST_UID = 3_600_000_000


class StuckReporter:
    """NATS is gone: nothing the attempt emits becomes durable."""

    def __init__(self) -> None:
        self.emitted: list[object] = []

    def emit(self, items):
        self.emitted.extend(items)
        return asyncio.get_running_loop().create_future()

    async def emit_log(self, item) -> None:
        return None


async def test_a_cancel_before_the_outcome_is_durable_removes_the_secrets_and_returns_the_uid(tmp_path: Path):
    work_root = tmp_path / "node"
    work_root.mkdir(mode=0o711)
    secrets_dir = tmp_path / "node-secrets"
    secrets_dir.mkdir()
    (secrets_dir / "TOKEN").write_text("s3cr3tvalue\n")
    isolation = NodeIsolation(level="process", uid=65534, gid=65534, attempt_uids=(FIRST_UID, 8))
    pool = UidPool(FIRST_UID, 8)
    env = {"PATH": "/usr/bin:/bin"}
    setup = AttemptSetup(
        {"process": ProcessRunner(env, isolation=isolation)},
        env,
        isolation,
        SecretSource(secrets_dir, "", {}),
        uids=pool,
    )
    spec = JobSpec(runtime=ProcessRuntime(argv=["true"]), secrets=["TOKEN"], stdin="in\n")
    now = time.time()
    bound = JobBound(
        job_id="abc", attempt=1, partition=0, node_id="n1", spec=spec, scratch_dir="", submitted_at=now, bound_at=now
    )
    ready = asyncio.get_running_loop().create_future()
    ready.set_result(None)
    reporter = StuckReporter()
    attempt = Attempt(
        bound,
        None,
        now,
        lease=LeaseState("abc", 1, 0, now),
        ready=ready,
        node_id="n1",
        work_root=work_root,
        reporter=reporter,
        setup=setup,
        results=None,
        tracer=trace.get_tracer("test"),
        on_ended=lambda _key: None,
    )
    task = asyncio.ensure_future(attempt.run())

    async def outcome_emitted() -> bool:
        return bool(reporter.emitted)

    await eventually(outcome_emitted, what="the attempt's outcome to be emitted")
    private, workdir = work_root / ".abc-1", work_root / "abc-1"
    info = os.stat(private)
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, FIRST_UID, 0o710)
    assert os.stat(workdir).st_uid == FIRST_UID and os.stat(private / "secrets" / "TOKEN").st_uid == FIRST_UID
    assert pool.in_use == 1
    task.cancel()  # Attempts.drain: the settle ran out
    await asyncio.gather(task, return_exceptions=True)
    assert not private.exists() and not workdir.exists()
    assert pool.in_use == 0


def test_removing_secrets_never_follows_a_link_put_in_their_place(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    os.chmod(victim, 0o1777)
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "secrets").symlink_to(victim)
    remove_secret_files(tmp_path / "private" / "secrets")
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o1777 and victim.is_dir()


async def test_a_drain_returns_only_once_the_attempts_it_cancelled_have_cleaned_up(tmp_path: Path):
    """Their outcomes never became durable (NATS gone), so the drain cancels them; the
    executor stops right after, and a clean-up it did not wait for would be cut off."""
    from jobmesh.executor.attempts import Attempts

    work_root = tmp_path / "node"
    work_root.mkdir(mode=0o711)
    secrets_dir = tmp_path / "node-secrets"
    secrets_dir.mkdir()
    (secrets_dir / "TOKEN").write_text("s3cr3tvalue\n")
    isolation = NodeIsolation(level="process", uid=65534, gid=65534, attempt_uids=(FIRST_UID + 100, 8))
    env = {"PATH": "/usr/bin:/bin"}
    runners = {"process": ProcessRunner(env, isolation=isolation)}
    setup = AttemptSetup(runners, env, isolation, SecretSource(secrets_dir, "", {}))
    reporter = StuckReporter()
    attempts = Attempts("n1", work_root, reporter, runners, trace.get_tracer("test"), setup=setup)
    now = time.time()
    spec = JobSpec(runtime=ProcessRuntime(argv=["true"]), secrets=["TOKEN"])
    bound = JobBound(
        job_id="abc", attempt=1, partition=0, node_id="n1", spec=spec, scratch_dir="", submitted_at=now, bound_at=now
    )
    ready = asyncio.get_running_loop().create_future()
    ready.set_result(None)
    attempts.launch(bound, None, now, asyncio.get_running_loop().create_future(), ready)

    async def outcome_emitted() -> bool:
        return bool(reporter.emitted)

    await eventually(outcome_emitted, what="the attempt's outcome to be emitted")
    assert (work_root / ".abc-1" / "secrets" / "TOKEN").exists()
    assert await attempts.drain(grace=0.0, settle=1.0) == 1
    assert not (work_root / ".abc-1").exists() and not (work_root / "abc-1").exists()
    assert attempts.setup.uids is not None and attempts.setup.uids.in_use == 0
