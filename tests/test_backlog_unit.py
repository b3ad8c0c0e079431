"""The scheduler's ordering decisions, driven without I/O and without a real clock."""

from __future__ import annotations

from collections import Counter

from jobmesh.contract.messages.v1 import JobSpec, JobSubmitted, NoopRuntime, QueueConfig, Timeouts
from jobmesh.scheduler.backlog import RELEASED, Backlog, Expire, Job, Release
from jobmesh.scheduler.fairshare import Shares
from jobmesh.scheduler.ratelimit import TokenBucket

_seq = iter(range(1, 10**9))


def job(job_id: str, **spec_fields) -> Job:
    submitted_at = spec_fields.pop("submitted_at", 0.0)
    spec = JobSpec(runtime=NoopRuntime(), **spec_fields)
    return Job.of(
        JobSubmitted(job_id=job_id, partition=0, spec=spec, idempotency_key=job_id, submitted_at=submitted_at),
        next(_seq),
    )


def anywhere(job):
    return ["n1"], [0], ""


def nowhere(job):
    return [], [], "no node with gpu kind h100"


def ids(decisions) -> list[str]:
    return [d.job.job_id for d in decisions if isinstance(d, Release)]


def test_priority_first_then_fifo_within_a_queue():
    b = Backlog()
    for name, prio in [("a", 5), ("b", 9), ("c", 5), ("d", 0), ("e", 9)]:
        b.add(job(name, priority=prio), now=0)
    assert ids(b.plan(0, anywhere)) == ["b", "e", "a", "c", "d"]
    assert b.plan(0, anywhere) == []


def test_weighted_fair_share_with_a_flooding_tenant():
    weights = {"big": 1.0, "small": 1.0}
    b = Backlog(weight_of=weights.get, queue_config=lambda q: QueueConfig(max_in_flight=10))
    for i in range(1000):  # "big" submits ten times more, and first
        b.add(job(f"big{i}", tenant="big"), now=0)
    for i in range(100):
        b.add(job(f"small{i}", tenant="small"), now=0)
    starts: Counter[str] = Counter()
    for _ in range(20):  # 20 rounds of 10 starts, finishing them in between
        released = b.plan(0, anywhere)
        for d in released:
            starts[d.job.tenant] += 1
            b.finish(d.job.job_id, 1, 0)
    assert starts == {"big": 100, "small": 100}  # equal weights: equal starts while both wait


def test_weights_give_proportional_shares():
    weights = {"a": 3.0, "b": 1.0}
    b = Backlog(weight_of=weights.get)
    for i in range(400):
        b.add(job(f"a{i}", tenant="a"), now=0)
        b.add(job(f"b{i}", tenant="b"), now=0)
    first = b.plan(0, anywhere, limit=200)
    counts = Counter(d.job.tenant for d in first)
    assert counts == {"a": 150, "b": 50}


def test_idle_tenant_banks_no_credit():
    shares = Shares(lambda t: 1.0)
    for _ in range(100):
        shares.charge("busy")
    assert shares.entering("late") == shares.vtime > 90


def test_rate_limit_buffers_a_burst():
    b = Backlog(queue_config=lambda q: QueueConfig(rate=10, burst=5))
    for i in range(50):
        b.add(job(f"j{i}"), now=100.0)
    assert len(ids(b.plan(100.0, anywhere))) == 5  # the burst
    assert ids(b.plan(100.0, anywhere)) == []
    assert b.explain("j5", 100.0) == "queue default rate limit of 10/s"
    assert b.next_token(100.0) == 100.1
    assert len(ids(b.plan(101.0, anywhere))) == 5  # one second refills 10, capped at the burst of 5


def test_token_bucket_refills_continuously():
    bucket = TokenBucket(rate=2, burst=2, now=0)
    assert bucket.take(0) and bucket.take(0) and not bucket.take(0)
    assert bucket.next_token_at(0) == 0.5
    assert bucket.take(0.5) and not bucket.take(0.5)


def test_in_flight_cap_per_queue():
    b = Backlog(queue_config=lambda q: QueueConfig(max_in_flight=3) if q == "capped" else QueueConfig())
    for i in range(10):
        b.add(job(f"c{i}", queue="capped"), now=0)
        b.add(job(f"f{i}", queue="free"), now=0)
    released = ids(b.plan(0, anywhere))
    assert len([r for r in released if r.startswith("c")]) == 3
    assert len([r for r in released if r.startswith("f")]) == 10
    assert "in-flight cap of 3" in b.explain("c5", 0)
    b.finish("c0", 1, 0)
    assert ids(b.plan(0, anywhere)) == ["c3"]


def test_concurrency_key_limit():
    b = Backlog()
    for i in range(5):
        b.add(job(f"k{i}", concurrency_key="db", concurrency_limit=2), now=0)
    b.add(job("other"), now=0)
    assert ids(b.plan(0, anywhere)) == ["k0", "k1", "other"]
    assert b.explain("k2", 0) == "concurrency key db at its limit of 2"
    b.finish("k0", 1, 0)
    assert ids(b.plan(0, anywhere)) == ["k2"]


def test_sequential_group_runs_one_at_a_time_in_submission_order():
    b = Backlog()
    for i in range(3):
        b.add(job(f"g{i}", group="nightly", priority=9 - i), now=0)
    b.add(job("free1"), now=0)
    b.add(job("free2"), now=0)
    assert ids(b.plan(0, anywhere)) == ["g0", "free1", "free2"]
    assert "sequential group nightly" in b.explain("g1", 0)
    assert ids(b.plan(0, anywhere)) == []
    b.finish("g0", 1, 0)
    assert ids(b.plan(0, anywhere)) == ["g1"]
    b.finish("g1", 1, 0)
    assert ids(b.plan(0, anywhere)) == ["g2"]


def test_not_before_delays_the_start():
    b = Backlog()
    b.add(job("later", not_before=50.0), now=10.0)
    assert b.plan(10.0, anywhere) == []
    assert b.explain("later", 10.0).startswith("not before")
    assert b.next_wake() == 50.0
    assert ids(b.plan(50.0, anywhere)) == ["later"]


def test_queue_timeout_expires_with_the_reason():
    b = Backlog()
    b.add(job("stuck", timeouts=Timeouts(queue=5.0), submitted_at=0.0), now=0.0)
    assert b.plan(1.0, nowhere) == []  # parked: no fitting node
    [expired] = b.plan(6.0, nowhere)
    assert isinstance(expired, Expire)
    assert "queue timeout of 5s" in expired.reason and "no node with gpu kind h100" in expired.reason
    assert len(b) == 0


def test_unplaceable_job_waits_and_is_placed_when_a_node_joins():
    b = Backlog()
    b.add(job("gpu"), now=0)
    assert b.plan(0, nowhere) == []
    assert b.explain("gpu", 0) == "no node with gpu kind h100"
    assert b.plan(0, anywhere) == []  # parked: not looked at until the nodes change
    b.unpark(0)
    assert ids(b.plan(0, anywhere)) == ["gpu"]


def test_binder_refusal_is_retried_after_a_delay_or_when_room_frees():
    b = Backlog()
    b.add(job("a"), now=0)
    b.add(job("x"), now=0)
    [first, _second] = b.plan(0, anywhere)
    assert b.room_wanted("a", 1, first.job.releases, "no free capacity on candidate nodes", now=0)
    assert not b.room_wanted("a", 1, 0, "stale release", now=0)
    assert b.plan(0.5, anywhere) == []
    b.finish("x", 1, 0.6)
    b.retry_rooms_now(0.6, finished=1)
    [again] = b.plan(0.6, anywhere)
    assert again.job.job_id == "a" and again.job.releases == 2


def test_a_refusal_of_an_older_release_is_stale_and_one_of_a_newer_release_is_taken():
    b = Backlog()
    b.add(job("a"), now=0)
    [out] = b.plan(0, anywhere)
    assert out.job.releases == 1
    out.job.releases = 3  # released twice more since (bind timeouts)
    assert not b.room_wanted("a", 1, 2, "refusal of release 2", now=0)
    assert b.jobs["a"].where == RELEASED
    # A new owner of the partition loaded release 3, but the old one published release 4
    # before it died: the binder's refusal of release 4 is the only answer that will come.
    assert b.room_wanted("a", 1, 4, "no free capacity on candidate nodes", now=0)
    assert b.jobs["a"].releases == 4
    [again] = b.plan(60, anywhere)
    assert again.job.job_id == "a" and again.job.releases == 5


def test_a_refusal_for_a_job_still_waiting_here_moves_its_next_release_past_the_refused_one():
    # The previous owner released "a" (release 1) and died before committing; this owner
    # loaded it as never released. The refusal comes before this owner releases it again.
    b = Backlog()
    b.add(job("a"), now=0)
    assert b.jobs["a"].releases == 0
    assert not b.room_wanted("a", 1, 1, "no free capacity on candidate nodes", now=0)
    [out] = b.plan(0, anywhere)
    assert out.job.releases == 2  # a new message id: JetStream would drop release 1's again


def test_stale_attempts_and_unknown_jobs_are_ignored():
    b = Backlog()
    b.add(job("a"), now=0)
    b.plan(0, anywhere)
    assert not b.finish("a", 2, 0)
    assert not b.finish("nope", 1, 0)
    assert b.finish("a", 1, 0)


def test_released_jobs_reloaded_after_a_restart_count_as_in_flight():
    b = Backlog(queue_config=lambda q: QueueConfig(max_in_flight=1))
    running = job("running", group="g")
    b.add_released(running, now=0)
    b.add(job("next", group="g"), now=0)
    b.add(job("other"), now=0)
    assert b.plan(0, anywhere) == []  # cap of 1 is taken by the reloaded job
    b.finish("running", 1, 0)
    assert ids(b.plan(0, anywhere)) == ["next"]


def test_stats_count_per_queue_and_tenant():
    b = Backlog()
    b.add(job("a", tenant="t1"), now=0)
    b.add(job("b", tenant="t2", not_before=99.0), now=0)
    stats = b.stats()["default"]
    assert stats["pending"] == 2 and stats["tenants"] == {"t1": 1, "t2": 1}
    assert stats["waiting"] == {"ready": 1, "timer": 1}


def test_an_unrelated_config_change_grants_no_fresh_burst():
    configs = {"q": QueueConfig(rate=1, burst=2)}
    b = Backlog(queue_config=lambda name: configs.get(name, QueueConfig()))
    for i in range(5):
        b.add(job(f"j{i}", queue="q"), now=0.0)
    assert len(ids(b.plan(0.0, anywhere))) == 2
    b.reconfigure(0.0)  # e.g. a tenant weight changed
    assert ids(b.plan(0.0, anywhere)) == []
    configs["q"] = QueueConfig(rate=1, burst=3)
    b.reconfigure(0.0)  # this queue's own limits changed: a new bucket
    assert len(ids(b.plan(0.0, anywhere))) == 3


def test_a_job_changed_twice_in_one_batch_keeps_its_last_state():
    from jobmesh.scheduler.store import StateChanges

    changes = StateChanges()
    changes.add("x", "pending", "no free capacity")
    changes.add("y", "done")
    changes.add("x", "released", releases=2)
    ids, states, _reasons, releases, _outcomes = changes.columns()
    assert dict(zip(ids, zip(states, releases, strict=False), strict=False)) == {
        "x": ("released", 2),
        "y": ("done", None),
    }


def test_a_free_key_slot_is_not_lost_when_the_woken_waiter_cannot_run():
    b = Backlog()
    b.add(job("a", concurrency_key="db", concurrency_limit=1), now=0)
    b.add(job("gpu-b", concurrency_key="db", concurrency_limit=1), now=0)
    b.add(job("c", concurrency_key="db", concurrency_limit=1), now=0)
    assert ids(b.plan(0, anywhere)) == ["a"]
    b.finish("a", 1, 0)

    def gpu_nowhere(j):
        return ([], [], "no node with gpu kind h100") if j.job_id == "gpu-b" else (["n1"], [0], "")

    assert ids(b.plan(0, gpu_nowhere)) == ["c"]  # b is parked; c takes the slot


def test_a_refused_job_past_its_queue_timeout_expires():
    b = Backlog()
    b.add(job("d", timeouts=Timeouts(queue=5.0), submitted_at=0.0), now=0.0)
    [release] = b.plan(1.0, anywhere)
    assert b.plan(6.0, anywhere) == []  # out at the binder when the deadline passed
    assert b.room_wanted("d", 1, release.job.releases, "no free capacity", now=7.0)
    [expired] = b.plan(7.0, anywhere)
    assert isinstance(expired, Expire) and "queue timeout of 5s" in expired.reason


def test_refusals_back_off_and_a_finish_wakes_only_a_few():
    b = Backlog()
    for i in range(10):
        b.add(job(f"r{i}"), now=0)
    first = b.plan(0, anywhere)
    for d in first:
        assert b.room_wanted(d.job.job_id, 1, d.job.releases, "full", now=0)
    b.retry_rooms_now(0.1, finished=1)
    assert len(ids(b.plan(0.1, anywhere))) == 2  # one job ended: two may try
    again = [d for d in b.plan(1.0, anywhere)]
    assert len(again) == 8  # the rest after the first back-off of 1 s
    for d in again:
        assert b.room_wanted(d.job.job_id, 1, d.job.releases, "full", now=1.0)
    assert b.plan(2.5, anywhere) == []  # second refusal: 2 s
    assert len(ids(b.plan(3.0, anywhere))) == 8


def test_a_delay_is_explained_with_its_time_and_queues_count_reasons():
    b = Backlog()
    b.add(job("later", not_before=1_800_000_042.0), now=1_800_000_000.0)
    b.add(job("k1", concurrency_key="db", concurrency_limit=1), now=1_800_000_000.0)
    b.add(job("k2", concurrency_key="db", concurrency_limit=1), now=1_800_000_000.0)
    b.plan(1_800_000_000.0, anywhere)
    assert b.explain("later", 1_800_000_000.0) == "not before 2027-01-15 08:00:42 UTC (in 42s)"
    reasons = b.stats()["default"]["reasons"]
    assert reasons == {"delayed until its start time (not_before)": 1, "concurrency key db at its limit of 1": 1}


def test_queue_stats_count_jobs_a_queue_gate_holds_back():
    b = Backlog(queue_config=lambda q: QueueConfig(max_in_flight=1))
    for name in ("a", "b", "c"):
        b.add(job(name), now=0)
    b.plan(0, anywhere)  # a is out; b and c wait behind the cap
    assert b.stats(0)["default"]["reasons"] == {"queue default at its in-flight cap of 1": 2}
    assert b.stats()["default"]["reasons"] == {}  # without a time, gates are not judged


def test_a_queue_refused_for_want_of_room_releases_only_as_its_attempts_end():
    # Room for 4: all 10 go out once, 6 come back refused. From then on the queue has at
    # most 4 out; one that ends lets exactly one more go (no storm of refusals).
    b = Backlog()
    for i in range(10):
        b.add(job(f"w{i}"), now=0)
    out = b.plan(0, anywhere)
    assert len(out) == 10
    for d in out[4:]:
        assert b.room_wanted(d.job.job_id, 1, d.job.releases, "no free capacity on candidate nodes", now=0)
    waiting = [d.job.job_id for d in out[4:]]
    b.retry_rooms_now(0.5, finished=3)  # as if three had ended: all six refused wake up
    assert ids(b.plan(0.5, anywhere)) == []  # ...but the queue still has 4 out
    assert "no free capacity" in b.explain(waiting[0], 0.5)
    assert b.finish(out[0].job.job_id, 1, 0.6)
    assert len(ids(b.plan(0.6, anywhere))) == 1  # one ended: one more


def test_the_room_window_probes_for_room_others_freed_and_opens_after_a_quiet_while():
    b = Backlog()
    for i in range(12):
        b.add(job(f"p{i}"), now=0)
    out = b.plan(0, anywhere)
    for d in out[8:]:
        assert b.room_wanted(d.job.job_id, 1, d.job.releases, "no free capacity on candidate nodes", now=0)
    b.retry_rooms_now(0.0, finished=2)  # all four back to ready
    assert ids(b.plan(0.5, anywhere)) == []
    assert b.next_token(0.5) == 1.0  # the window grows by 8 // 4 = 2 after a second
    assert len(ids(b.plan(1.0, anywhere))) == 2
    # A refusal of one of those probes sets the window back to what is out.
    [probe, _other] = [d for d in out if b.jobs[d.job.job_id].where == RELEASED][-2:]
    assert b.room_wanted(probe.job.job_id, 1, probe.job.releases, "no free capacity on candidate nodes", now=1.2)
    b.retry_rooms_now(1.2, finished=1)
    assert ids(b.plan(1.5, anywhere)) == []
    assert len(ids(b.plan(31.2, anywhere))) == 3  # 30 s without a refusal: unbounded


def test_a_refusal_for_another_reason_leaves_the_window_open():
    b = Backlog()
    for i in range(3):
        b.add(job(f"o{i}"), now=0)
    out = b.plan(0, anywhere)
    assert b.room_wanted(out[0].job.job_id, 1, out[0].job.releases, "lost every reservation race this round", now=0)
    b.retry_rooms_now(0.0, finished=1)
    assert ids(b.plan(0.0, anywhere)) == [out[0].job.job_id]


def test_a_queue_refused_with_nothing_out_gets_the_room_another_queues_end_frees():
    # Queue b had nothing out when it was refused (its window: 0); an attempt of queue a
    # ends and wakes b's job, which may then try that room at once.
    b = Backlog()
    b.add(job("a1", queue="a"), now=0)
    [a1] = b.plan(0, anywhere)
    b.add(job("b1", queue="b"), now=0)
    [b1] = b.plan(0, anywhere)
    assert b.room_wanted("b1", 1, b1.job.releases, "no free capacity on candidate nodes", now=0)
    assert b.finish(a1.job.job_id, 1, 0.2)
    b.retry_rooms_now(0.2, finished=1, ended_in={"a": 1})
    assert ids(b.plan(0.2, anywhere)) == ["b1"]


def test_a_clock_that_steps_back_opens_the_room_window():
    b = Backlog()
    for i in range(2):
        b.add(job(f"c{i}"), now=100)
    [_c0, c1] = b.plan(100, anywhere)
    assert b.room_wanted("c1", 1, c1.job.releases, "no free capacity on candidate nodes", now=100)
    b.retry_rooms_now(100, finished=1)
    assert ids(b.plan(100.5, anywhere)) == []
    assert ids(b.plan(90, anywhere)) == ["c1"]  # never held shut by a clock behind its refusal
