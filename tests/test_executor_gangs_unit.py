"""The executor's part of a gang without NATS: what a member's job sees, what it reports and
under which ids, where its result goes, and what its node record and restart say of it.

The publisher and the object store are fakes that record what they were given; the runner
records the request it got.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from opentelemetry import trace

from jobmesh.contract import subjects
from jobmesh.contract.ids import event_id, log_id
from jobmesh.contract.messages.v1 import (
    AttemptLease,
    JobBound,
    JobFailed,
    JobLost,
    JobSpec,
    JobStarted,
    JobSucceeded,
    LogLine,
    MemberSucceeded,
    NoopRuntime,
    ProcessRuntime,
)
from jobmesh.executor.attempts import Attempts, AttemptSetup
from jobmesh.executor.gangs import gang_env, keeps_result
from jobmesh.executor.handlers import DispatchHandler
from jobmesh.executor.isolation.probe import NodeIsolation
from jobmesh.executor.leases import LeaseBook
from jobmesh.executor.metrics import ExecutorMetrics
from jobmesh.executor.node import build_node_info
from jobmesh.executor.outcomes import Outcome, end_kind, exit_outcome, failed_outcome, terminal_message
from jobmesh.executor.reporter import Reporter
from jobmesh.executor.restart import lost_messages, read_outcome, reports_of, write_lease, write_outcome
from jobmesh.executor.results import RESULT_PATH_VAR, ResultLimits, ResultStore
from jobmesh.executor.runrequest import RunRequest
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.settings import Settings
from tests.helpers import eventually
from tests.test_executor_lifecycle_unit import FakeStore
from tests.test_executor_unit import FACTS, NODE, FakePublisher, FakeRecord, bound, envelope

PEERS = ["node-a:29500", "10.0.0.7:29500", "[fd00::3]:29500"]


def member(job_id: str, rank: int, runtime=None, peers: list[str] | None = None, **spec) -> JobBound:
    """Rank ``rank`` of a gang of three (``bound`` from the executor's units, made a member)."""
    plain = bound(job_id, runtime)
    if spec:
        plain = msgspec.structs.replace(plain, spec=JobSpec(runtime=runtime or NoopRuntime(), **spec))
    return msgspec.structs.replace(plain, rank=rank, world_size=3, peers=PEERS if peers is None else peers)


# --- gangs.py: the job's environment -------------------------------------------------------
def test_a_plain_job_is_told_it_is_rank_0_of_1_without_peers():
    assert gang_env(bound("p")) == {"JOBMESH_RANK": "0", "JOBMESH_WORLD_SIZE": "1", "JOBMESH_PEERS": ""}


@pytest.mark.parametrize(("rank", "port"), [(0, "29500"), (1, "29500"), (2, "29500")])
def test_a_member_is_told_its_rank_its_peers_its_own_port_and_the_leader(rank, port):
    env = gang_env(member("g", rank))
    assert env == {
        "JOBMESH_RANK": str(rank),
        "JOBMESH_WORLD_SIZE": "3",
        "JOBMESH_PEERS": "node-a:29500,10.0.0.7:29500,[fd00::3]:29500",
        "JOBMESH_PEER_PORT": port,
        "JOBMESH_LEADER": "node-a:29500",
    }


def test_the_peer_port_is_the_members_own_entry_even_for_an_ipv6_host():
    env = gang_env(member("g", 2, peers=["a:1000", "b:1001", "[fd00::3]:1002"]))
    assert env["JOBMESH_PEER_PORT"] == "1002" and env["JOBMESH_LEADER"] == "a:1000"


def test_only_rank_0_keeps_a_gangs_result():
    assert keeps_result(member("g", 0, keep_result=True))
    assert not keeps_result(member("g", 1, keep_result=True))
    assert not keeps_result(member("g", 0))
    assert keeps_result(msgspec.structs.replace(bound("p"), spec=JobSpec(runtime=NoopRuntime(), keep_result=True)))


def test_each_members_output_lines_have_ids_of_their_own():
    assert log_id("g", 1, 7, 0) == log_id("g", 1, 7) == "g:1:log:7"
    assert log_id("g", 1, 7, 2) == "g:1:log:7:2"
    assert len({log_id("g", 1, 1, rank) for rank in range(3)}) == 3


# --- outcomes.py: which event, and its id ---------------------------------------------------
def test_a_members_success_is_a_member_succeeded_and_a_failure_stays_a_failure():
    ok, failed = exit_outcome(0), exit_outcome(3)
    assert end_kind(ok, 1) == subjects.SUCCEEDED
    assert end_kind(ok, 2) == subjects.MEMBER_SUCCEEDED
    assert end_kind(failed, 1) == end_kind(failed, 4) == subjects.FAILED


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_a_members_success_reports_member_succeeded_with_its_own_id_and_never_job_succeeded(rank):
    outcome = Outcome(0, None, "tail\n", result_ref=subjects.result_key("g", 1, rank), result_bytes=20_000)
    out = terminal_message(member("g", rank), NODE, outcome, 5.0, 6.0, None)
    event = out.message
    assert isinstance(event, MemberSucceeded) and not isinstance(event, JobSucceeded)
    assert (event.rank, event.world_size, event.node_id) == (rank, 3, NODE)
    assert (event.exit_code, event.output_tail, event.started_at, event.at) == (0, "tail\n", 5.0, 6.0)
    assert (event.result_ref, event.result_bytes) == (subjects.result_key("g", 1, rank), 20_000)
    assert out.subject == subjects.node_event(2, subjects.MEMBER_SUCCEEDED, NODE)
    assert out.msg_id == ("g:1:member_succeeded" if rank == 0 else f"g:1:member_succeeded:{rank}")


def test_a_members_failure_carries_its_rank_under_its_own_id():
    out = terminal_message(member("g", 2), NODE, failed_outcome("cancelled", "gang: member 1 failed"), 5.0, 6.0, None)
    assert isinstance(out.message, JobFailed)
    assert (out.message.rank, out.message.world_size, out.message.error.code) == (2, 3, "cancelled")
    assert out.subject == subjects.node_event(2, subjects.FAILED, NODE) and out.msg_id == "g:1:failed:2"


def test_a_plain_jobs_end_is_unchanged():
    out = terminal_message(bound("p"), NODE, exit_outcome(0), 5.0, 6.0, None)
    assert isinstance(out.message, JobSucceeded) and out.msg_id == event_id("p", 1, subjects.SUCCEEDED)
    failed = terminal_message(bound("p"), NODE, exit_outcome(1), 5.0, 6.0, None)
    assert isinstance(failed.message, JobFailed) and (failed.message.rank, failed.message.world_size) == (0, 1)
    assert failed.msg_id == "p:1:failed"


def test_a_members_success_counts_in_the_run_time_metric():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    metrics = ExecutorMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))
    metrics.started("g:1", "default")
    metrics.reported([terminal_message(member("g", 1), NODE, exit_outcome(0), 5.0, 7.5, None)])
    (resource,) = reader.get_metrics_data().resource_metrics
    (point,) = [p for s in resource.scope_metrics for m in s.metrics for p in m.data.data_points]
    assert point.sum == 2.5 and dict(point.attributes) == {"queue": "default", "outcome": "succeeded"}


# --- results.py: a member's object name ----------------------------------------------------
def test_rank_0_keeps_the_attempts_object_name_and_the_others_get_their_own():
    assert subjects.result_key("g", 1) == subjects.result_key("g", 1, 0) == "g/1"
    assert subjects.result_key("g", 1, 2) == "g/1/2"
    assert len({subjects.result_key("g", 1, rank) for rank in range(3)}) == 3


async def test_members_results_do_not_overwrite_each_other(tmp_path):
    store = FakeStore()
    results = ResultStore(store, ResultLimits(inline_bytes=4))
    path = tmp_path / "result"
    for rank in range(3):
        path.write_bytes(f"rank {rank}".encode())
        assert (await results.collect("g", 1, path, rank=rank)).ref == subjects.result_key("g", 1, rank)
    assert store.objects == {"g/1": b"rank 0", "g/1/1": b"rank 1", "g/1/2": b"rank 2"}


# --- handlers.py and attempts.py: a member from its dispatch to its end -----------------------
class ResultRunner:
    """Notes the request it got and writes ``result`` where the job is told to."""

    def __init__(self, result: bytes) -> None:
        self.requests: list[RunRequest] = []
        self.result = result

    async def run(self, request: RunRequest) -> Outcome:
        self.requests.append(request)
        if request.on_spawned is not None:
            await request.on_spawned()
        await request.on_line("stdout", "hello")
        await asyncio.to_thread(Path(request.env[RESULT_PATH_VAR]).write_bytes, self.result)
        return Outcome(0, None, "")


@pytest.fixture
async def gang_node(tmp_path):
    publisher = FakePublisher()
    reporter = Reporter(publisher)
    reporter.start()
    runner = ResultRunner(b"x" * 100)
    store = FakeStore()
    setup = AttemptSetup({"process": runner}, {"PATH": "/usr/bin"}, NodeIsolation(level="process"))
    leases = LeaseBook()
    attempts = Attempts(
        NODE,
        tmp_path / "work",
        reporter,
        setup.runners,
        trace.get_tracer("test"),
        leases=leases,
        results=ResultStore(store, ResultLimits(inline_bytes=10)),
        setup=setup,
    )
    record = FakeRecord(leases)
    handler = DispatchHandler(NODE, attempts, reporter, record, incarnation="inc-1")
    yield publisher, reporter, attempts, handler, runner, store, record
    await reporter.close(1)


def sent(publisher: FakePublisher) -> list[Outgoing]:
    return [item for call in publisher.calls for item in call]


async def test_a_noop_member_starts_and_succeeds_as_a_member(gang_node):
    publisher, reporter, _, handler, *_ = gang_node
    assert await handler([envelope(member("g", 1))]) is None
    await reporter.flush()
    started, done = sent(publisher)
    assert isinstance(started.message, JobStarted) and started.msg_id == "g:1:started:1"
    assert (started.message.rank, started.message.world_size) == (1, 3)
    assert isinstance(done.message, MemberSucceeded) and done.msg_id == "g:1:member_succeeded:1"


async def test_a_process_member_runs_with_its_gang_variables_and_stores_its_result_under_its_rank(gang_node):
    publisher, reporter, attempts, handler, runner, store, record = gang_node
    # The job's own variables cannot claim another rank, or another gang.
    spoof = {"JOBMESH_RANK": "0", "JOBMESH_PEERS": "evil:1", "JOBMESH_LEADER": "evil:1", "MINE": "1"}
    job = member("g", 2, ProcessRuntime(argv=["x"], env=spoof), keep_result=True)
    record.hold = True  # the member runs only once the record listing its lease is durable
    handling = asyncio.ensure_future(handler([envelope(job)]))
    await eventually(lambda: asyncio.sleep(0, record.puts), what="the record put listing the member")
    (lease,) = attempts.leases.snapshot(0.0)[0]
    assert (lease.job_id, lease.rank, lease.world_size) == ("g", 2, 3)
    record.release()
    assert await handling is None
    await eventually(lambda: asyncio.sleep(0, attempts.running == 0), what="the member to end")
    await reporter.flush()
    (request,) = runner.requests
    assert request.env["MINE"] == "1"
    assert {key: request.env[key] for key in gang_env(job)} == gang_env(job)
    assert request.env["JOBMESH_PEER_PORT"] == "29500"
    (line,) = [item for item in sent(publisher) if isinstance(item.message, LogLine)]
    assert line.msg_id == "g:1:log:1:2"
    (done,) = [item for item in sent(publisher) if not isinstance(item.message, JobStarted | LogLine)]
    assert isinstance(done.message, MemberSucceeded) and done.msg_id == "g:1:member_succeeded:2"
    assert done.message.result_ref == "g/1/2" and done.message.result_bytes == 100
    # Rank 0's result is the job's: the others store theirs but never keep it as the step's.
    assert store.objects == {"g/1/2": b"x" * 100}


async def test_rank_0_keeps_the_steps_result(gang_node):
    _, reporter, attempts, handler, _, store, _ = gang_node
    await handler([envelope(member("g", 0, ProcessRuntime(argv=["x"]), keep_result=True))])
    await eventually(lambda: asyncio.sleep(0, attempts.running == 0), what="the member to end")
    await reporter.flush()
    assert set(store.objects) == {"g/1", subjects.step_result_key("g")}


async def test_a_cancelled_member_fails_with_its_rank(gang_node):
    publisher, reporter, attempts, handler, *_ = gang_node
    attempts.cancel("g", 1, "gang: member 0 on node x failed")
    await handler([envelope(member("g", 1, ProcessRuntime(argv=["x"])))])
    await reporter.flush()
    (failed,) = sent(publisher)
    assert isinstance(failed.message, JobFailed) and failed.msg_id == "g:1:failed:1"
    assert (failed.message.rank, failed.message.world_size, failed.message.error.code) == (1, 3, "cancelled")


# --- restart.py: a member an earlier executor left ------------------------------------------
def member_lease(rank: int) -> AttemptLease:
    return AttemptLease(job_id="g", attempt=1, partition=2, started_at=1.0, rank=rank, world_size=3)


def test_a_lost_member_is_reported_with_its_rank_under_its_own_id():
    (lost,) = lost_messages([member_lease(2)], NODE, 9.0)
    assert isinstance(lost.message, JobLost) and (lost.message.rank, lost.message.world_size) == (2, 3)
    assert lost.subject == subjects.node_event(2, subjects.LOST, NODE) and lost.msg_id == "g:1:lost:2"
    (plain,) = lost_messages([AttemptLease(job_id="p", attempt=1, partition=2, started_at=1.0)], NODE, 9.0)
    assert plain.msg_id == "p:1:lost" and (plain.message.rank, plain.message.world_size) == (0, 1)


def test_a_members_kept_success_is_published_again_as_a_member_succeeded(tmp_path):
    private = tmp_path / ".g-1"
    write_lease(private, member_lease(1))
    write_outcome(private, terminal_message(member("g", 1), NODE, exit_outcome(0), 5.0, 6.0, None))
    again = read_outcome(private, member_lease(1), NODE)
    assert again is not None and isinstance(again.message, MemberSucceeded)
    assert again.subject == subjects.node_event(2, subjects.MEMBER_SUCCEEDED, NODE)
    assert again.msg_id == "g:1:member_succeeded:1"
    # Another member's outcome is not this member's end: it is reported lost instead.
    assert read_outcome(private, member_lease(2), NODE) is None
    (report,), kept = reports_of(tmp_path, [member_lease(2)], NODE, 9.0)
    assert kept == 0 and isinstance(report.message, JobLost) and report.msg_id == "g:1:lost:2"


def test_a_members_kept_failure_is_published_again_under_its_own_id(tmp_path):
    private = tmp_path / ".g-1"
    write_outcome(private, terminal_message(member("g", 2), NODE, exit_outcome(1), 5.0, 6.0, None))
    again = read_outcome(private, member_lease(2), NODE)
    assert again is not None and isinstance(again.message, JobFailed) and again.msg_id == "g:1:failed:2"


async def test_a_member_left_behind_is_reported_lost_with_its_rank(gang_node):
    publisher, reporter, attempts, handler, *_ = gang_node
    job = member("g", 1, ProcessRuntime(argv=["x"]))
    attempts.workdir_of(job).mkdir(parents=True)
    await handler([envelope(job)])
    await reporter.flush()
    (lost,) = sent(publisher)
    assert isinstance(lost.message, JobLost) and lost.msg_id == "g:1:lost:1" and lost.message.rank == 1


# --- node.py: the address peers reach the node at -------------------------------------------
def test_the_node_advertises_its_address_or_its_host_name():
    assert build_node_info(Settings(), FACTS, 1.0).address == FACTS.hostname
    assert build_node_info(Settings(node_address="10.1.2.3"), FACTS, 1.0).address == "10.1.2.3"
    settings = Settings.from_env("executor", {"JOBMESH_NODE_ADDRESS": "gpu-7.cluster.local"})
    assert build_node_info(settings, FACTS, 1.0).address == "gpu-7.cluster.local"
