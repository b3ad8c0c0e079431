"""The scheduler's lifecycle decisions, pure: retry or give up, and attempt leases."""

from __future__ import annotations

import msgspec

from jobmesh.contract.messages.v1 import (
    AttemptError,
    AttemptLease,
    JobError,
    NodeInfo,
    RetryPolicy,
    Timeouts,
)
from jobmesh.scheduler.attemptleases import AttemptLeases
from jobmesh.scheduler.retries import GiveUp, Retry, decide


def ended(attempt: int, code: str = "exit_code", node: str = "a", at: float = 0.0) -> AttemptError:
    return AttemptError(attempt=attempt, node_id=node, error=JobError(code=code, message=code), at=at)


NO_TIMEOUTS = Timeouts()


def run(policy: RetryPolicy, last: AttemptError, earlier=(), timeouts=NO_TIMEOUTS, now=100.0, zones=None):
    return decide(
        job_id="j",
        policy=policy,
        timeouts=timeouts,
        ended=last,
        earlier=list(earlier),
        zone_of=zones or {},
        submitted_at=0.0,
        now=now,
    )


def test_no_policy_means_no_retry() -> None:
    assert isinstance(run(RetryPolicy(), ended(1)), GiveUp)


def test_retries_back_off_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(max_attempts=5, backoff=2.0, backoff_max=5.0, jitter=0.25)
    first = run(policy, ended(1))
    second = run(policy, ended(2), [ended(1)])
    third = run(policy, ended(3), [ended(1), ended(2)])
    assert isinstance(first, Retry) and isinstance(second, Retry) and isinstance(third, Retry)
    assert (first.next_attempt, second.next_attempt, third.next_attempt) == (2, 3, 4)
    assert 1.5 < first.delay <= 2.0 and 3.0 < second.delay <= 4.0 and 3.75 < third.delay <= 5.0
    assert first.not_before == 100.0 + first.delay
    exhausted = run(policy, ended(5), [ended(i) for i in range(1, 5)])
    assert isinstance(exhausted, GiveUp) and "5 attempts" in exhausted.reason


def test_only_the_policy_codes_retry() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert isinstance(run(policy, ended(1, "lost")), Retry)  # a default code
    assert isinstance(run(policy, ended(1, "spawn_failed")), GiveUp)  # the spec cannot run
    only_timeouts = RetryPolicy(max_attempts=3, retry_on=["timeout"])
    assert isinstance(run(only_timeouts, ended(1, "exit_code")), GiveUp)
    assert isinstance(run(only_timeouts, ended(1, "timeout")), Retry)


def test_a_drain_is_handed_back_without_using_an_attempt() -> None:
    retry = run(RetryPolicy(), ended(1, "node_drained"))
    assert isinstance(retry, Retry) and retry.delay == 0.0 and retry.next_attempt == 2


def test_drains_are_capped_and_preemptions_are_not() -> None:
    drains = [ended(i, "node_drained") for i in range(1, 11)]
    assert isinstance(run(RetryPolicy(), ended(11, "node_drained"), drains), GiveUp)
    # Fifteen preemptions, and a drain among them: still retried at once, uncounted.
    preempted = [ended(i, "preempted") for i in range(1, 16)]
    again = run(RetryPolicy(), ended(16, "preempted"), preempted)
    assert isinstance(again, Retry) and again.delay == 0.0 and again.next_attempt == 17
    assert isinstance(run(RetryPolicy(), ended(17, "node_drained"), [*preempted, ended(16, "preempted")]), Retry)
    # Preemptions count toward neither the drains' cap nor max_attempts; ``total`` still ends it.
    late = run(RetryPolicy(), ended(16, "preempted"), preempted, timeouts=Timeouts(total=50), now=60.0)
    assert isinstance(late, GiveUp) and "total timeout" in late.reason


def test_migrate_after_avoids_the_failing_node_and_optionally_its_zone() -> None:
    policy = RetryPolicy(max_attempts=4, migrate_after=2)
    once = run(policy, ended(1, node="a"))
    assert isinstance(once, Retry) and once.avoid == frozenset()
    twice = run(policy, ended(2, node="a"), [ended(1, node="a")])
    assert isinstance(twice, Retry) and twice.avoid == {"a"} and twice.avoid_zones == frozenset()
    zoned = RetryPolicy(max_attempts=4, migrate_after=2, migrate_zone=True)
    by_zone = run(zoned, ended(2, node="a"), [ended(1, node="a")], zones={"a": "eu-1"})
    assert isinstance(by_zone, Retry) and by_zone.avoid_zones == {"eu-1"}


def test_the_total_timeout_stops_retries() -> None:
    policy = RetryPolicy(max_attempts=9, backoff=10.0)
    late = run(policy, ended(1), timeouts=Timeouts(total=105.0), now=100.0)
    assert isinstance(late, GiveUp) and "total timeout" in late.reason


# --- attempt leases ----------------------------------------------------------------------
def record(node: str, incarnation: str, *attempts: tuple[str, int], ended: list[str] | None = None) -> NodeInfo:
    return NodeInfo(
        node_id=node,
        cpu_milli=1000,
        memory_mb=1000,
        incarnation=incarnation,
        attempts=[AttemptLease(job_id=j, attempt=a, partition=0, started_at=0.0, progress=0.5) for j, a in attempts],
        ended=ended or [],
    )


def test_an_attempt_never_seen_running_is_rebound_after_the_bind_timeout() -> None:
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 1, heartbeat=10.0, now=0.0)
    assert leases.expired(29.0) == []
    [expiry] = leases.expired(30.0)
    assert (expiry.job_id, expiry.attempt, expiry.kind) == ("j", 1, "rebind")


def test_records_renew_leases_and_a_silence_loses_them() -> None:
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 1, heartbeat=10.0, now=0.0)
    leases.observe(record("a", "i1", ("j", 1)), at=5.0)
    assert leases.leases["j"].progress == 0.5 and leases.leases["j"].node_id == "a"
    leases.observe(record("a", "i1", ("j", 1)), at=12.0)
    assert leases.expired(21.0) == []  # renewed at 12: good until 22
    [expiry] = leases.expired(22.0)
    assert (expiry.kind, expiry.node_id) == ("lost", "a") and "no lease renewal" in expiry.reason
    assert len(leases) == 0


def test_a_new_incarnation_without_the_attempt_loses_it_at_once() -> None:
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 1, heartbeat=10.0, now=0.0)
    leases.observe(record("a", "i1", ("j", 1)), at=1.0)
    leases.observe(record("a", "i2"), at=2.0)
    [expiry] = leases.expired(2.0)
    assert expiry.kind == "lost" and "restarted" in expiry.reason


def test_a_loss_a_record_showed_waits_until_the_events_before_it_are_processed() -> None:
    # The scheduler passes how far its partition's events are processed as ``now``: a
    # restart seen at 2.0 is not acted on while the events are processed only to 1.5 (the
    # attempt's JobSucceeded may be among the rest), and is once they reach 2.0.
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 1, heartbeat=10.0, now=0.0)
    leases.observe(record("a", "i1", ("j", 1)), at=1.0)
    leases.observe(record("a", "i2"), at=2.0)
    assert leases.next_deadline() == 2.0
    assert leases.expired(1.5) == []
    [expiry] = leases.expired(2.0)
    assert expiry.kind == "lost" and "restarted" in expiry.reason
    assert leases.expired(100.0) == [] and leases.next_deadline() is None


def test_ended_attempts_other_partitions_and_stale_attempts_are_left_alone() -> None:
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 2, heartbeat=10.0, now=0.0)
    leases.observe(record("a", "i1", ("j", 1)), at=1.0)  # attempt 1 is stale: no renewal
    assert leases.leases["j"].node_id == ""
    leases.observe(record("a", "i1", ("j", 2)), at=2.0)
    leases.observe(record("a", "i1", ended=["j:2"]), at=3.0)  # ended: its terminal event comes
    # However long this scheduler takes to consume that event, the attempt is not lost.
    assert leases.expired(3.0) == [] and leases.expired(1000.0) == [] and len(leases) == 0
    other = AttemptLeases(partition=1, bind_timeout=30.0)
    other.track("k", 1, heartbeat=10.0, now=0.0)
    other.observe(record("a", "i1", ("k", 1)), at=1.0)  # it says partition 0: not renewed here
    assert other.leases["k"].node_id == ""


def test_a_restarted_executor_s_ended_attempts_are_not_lost() -> None:
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 1, heartbeat=10.0, now=0.0)
    leases.observe(record("a", "i1", ("j", 1)), at=1.0)
    leases.observe(record("a", "i2", ended=["j:1"]), at=2.0)  # new process, old attempt ended
    assert leases.expired(100.0) == []


def test_an_expired_lease_brings_its_checkpoint_and_the_heap_stays_small() -> None:
    leases = AttemptLeases(partition=0, bind_timeout=30.0)
    leases.track("j", 1, heartbeat=10.0, now=0.0)
    node = record("a", "i1")
    with_checkpoint = msgspec.structs.replace(
        node, attempts=[AttemptLease(job_id="j", attempt=1, partition=0, started_at=0.0, checkpoint="step 7")]
    )
    leases.observe(with_checkpoint, at=1.0)
    [expiry] = leases.expired(11.0)
    assert expiry.kind == "lost" and expiry.lease.checkpoint == "step 7"
    # Many short-lived attempts (the no-op path): tracked at release, forgotten at the end.
    for i in range(50_000):
        leases.track(f"n{i}", 1, heartbeat=10.0, now=20.0)
        leases.forget(f"n{i}")
    assert len(leases._heap) <= 2 * len(leases) + 1024 + 1
    assert leases.next_deadline() is None  # nothing live: stale entries are not deadlines
