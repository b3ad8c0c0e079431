"""Unit tests of the tracker's pure fold: order independence, fencing, idempotence."""

from __future__ import annotations

import itertools
import random
from typing import Literal

from jobmesh.contract.messages.v1 import (
    AttemptError,
    JobBound,
    JobCancelled,
    JobCancelling,
    JobError,
    JobExpired,
    JobFailed,
    JobGaveUp,
    JobLost,
    JobReady,
    JobRetrying,
    JobSpec,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    JobUnplaceable,
    MemberSucceeded,
    NoopRuntime,
)
from jobmesh.tracker.fold import (
    AttemptState,
    Folded,
    JobRow,
    MemberRow,
    fold,
    is_final,
    join_attempt,
    join_job,
    join_member,
    shown_reason,
    updates,
)

T0 = 1_700_000_000.0
SPEC = JobSpec(runtime=NoopRuntime(), name="build", queue="ci", tenant="acme")


def submitted(job: str = "j1", fallback_of: str = "", partition: int = 0) -> JobSubmitted:
    return JobSubmitted(
        job_id=job, partition=partition, spec=SPEC, idempotency_key=job, submitted_at=T0, fallback_of=fallback_of
    )


def ready(job: str = "j1", attempt: int = 1, at: float = 1.0, release: int = 1, partition: int = 0) -> JobReady:
    return JobReady(
        job_id=job,
        attempt=attempt,
        partition=partition,
        spec=SPEC,
        candidates=["n1"],
        submitted_at=T0,
        ready_at=T0 + at,
        release=release,
    )


def unplaceable(job: str = "j1", attempt: int = 1, at: float = 1.5, release: int = 1) -> JobUnplaceable:
    return JobUnplaceable(
        job_id=job, attempt=attempt, partition=0, reason="no node has a gpu", at=T0 + at, release=release
    )


def bound(job: str = "j1", attempt: int = 1, node: str = "n1", at: float = 2.0) -> JobBound:
    return JobBound(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=node,
        spec=SPEC,
        scratch_dir="/s",
        submitted_at=T0,
        bound_at=T0 + at,
    )


def started(job: str = "j1", attempt: int = 1, node: str = "n1", at: float = 3.0) -> JobStarted:
    return JobStarted(job_id=job, attempt=attempt, partition=0, node_id=node, at=T0 + at)


EXIT_ERROR = JobError(code="exit", message="exited with 7")


def succeeded(
    job: str = "j1", attempt: int = 1, node: str = "n1", at: float = 4.0, result: str = "", result_ref: str = ""
) -> JobSucceeded:
    return JobSucceeded(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=node,
        exit_code=0,
        output_tail="done",
        submitted_at=T0,
        started_at=T0 + 3.0,
        at=T0 + at,
        result=result,
        result_ref=result_ref,
        result_bytes=len(result.encode()) if result else (3_000_000 if result_ref else 0),
    )


def failed(
    job: str = "j1",
    attempt: int = 1,
    exit_code: int | None = 7,
    at: float = 4.0,
    node: str = "n1",
    error: JobError = EXIT_ERROR,
    started_at: float = 3.0,
) -> JobFailed:
    return JobFailed(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=node,
        exit_code=exit_code,
        error=error,
        output_tail="boom",
        submitted_at=T0,
        started_at=T0 + started_at,
        at=T0 + at,
    )


def lost(job: str = "j1", attempt: int = 1, at: float = 5.0, reason: str = "") -> JobLost:
    return JobLost(job_id=job, attempt=attempt, partition=0, node_id="n1", at=T0 + at, reason=reason)


def retrying(
    job: str = "j1", attempt: int = 1, at: float = 4.5, delay: float = 1.8, avoid: tuple[str, ...] = ()
) -> JobRetrying:
    return JobRetrying(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id="n1",
        error=EXIT_ERROR,
        next_attempt=attempt + 1,
        delay=delay,
        not_before=T0 + at + delay,
        avoid=list(avoid),
        at=T0 + at,
    )


def gave_up(
    job: str = "j1",
    attempt: int = 2,
    at: float = 9.5,
    state: Literal["failed", "lost"] = "failed",
    node: str = "n2",
    error: JobError = EXIT_ERROR,
    ended: float = 9.0,
    fallback: str = "",
) -> JobGaveUp:
    errors = [
        AttemptError(attempt=n, node_id="n1" if n == 1 else node, error=error, at=T0 + 4) for n in range(1, attempt)
    ]
    errors.append(AttemptError(attempt=attempt, node_id=node, error=error, at=T0 + ended))
    return JobGaveUp(
        job_id=job,
        attempt=attempt,
        partition=0,
        state=state,
        node_id=node,
        error=error,
        reason=f"{attempt} attempts failed",
        errors=errors,
        fallback_job_id=fallback,
        at=T0 + at,
    )


def cancelling(job: str = "j1", attempt: int = 1, at: float = 3.5, reason: str = "not needed") -> JobCancelling:
    return JobCancelling(job_id=job, attempt=attempt, partition=0, reason=reason, at=T0 + at)


def cancelled(
    job: str = "j1", attempt: int = 1, at: float = 4.5, reason: str = "not needed", node: str = "n1"
) -> JobCancelled:
    return JobCancelled(job_id=job, attempt=attempt, partition=0, reason=reason, node_id=node, at=T0 + at)


CANCELLED_ERROR = JobError(code="cancelled", message="not needed")


def fails_retries_gives_up(job: str = "j1", fallback: str = "fb1") -> list:
    """Attempt 1 fails on n1, attempt 2 on n2, then the scheduler gives up with a fallback."""
    return [
        submitted(job),
        ready(job),
        bound(job),
        started(job),
        failed(job),
        retrying(job, at=4.5),
        ready(job, 2, at=6.3),
        bound(job, 2, node="n2", at=7),
        started(job, 2, node="n2", at=8),
        failed(job, 2, at=9, node="n2", started_at=8),
        gave_up(job, 2, fallback=fallback),
        submitted(fallback, fallback_of=job, partition=3),
        ready(fallback, at=10, partition=3),
    ]


def cancelled_while_running(job: str = "j1") -> list:
    """Cancel while attempt 1 runs: the executor stops it, then the scheduler ends the job."""
    return [
        submitted(job),
        ready(job),
        bound(job),
        started(job),
        cancelling(job),
        failed(job, exit_code=-15, error=CANCELLED_ERROR),
        cancelled(job),
    ]


def lifecycle(job: str = "j1") -> list:
    return [submitted(job), ready(job), bound(job), started(job), succeeded(job)]


class FakeStore:
    """The store's upserts, in memory: rows combine with the same joins the SQL mirrors."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobRow] = {}
        self.attempts: dict[tuple[str, int], AttemptState] = {}
        self.events: dict[str, object] = {}
        self.members: dict[tuple[str, int, int], MemberRow] = {}

    def write(self, folded: Folded) -> dict[str, AttemptState]:
        for row in folded.events:
            self.events.setdefault(row.event_id, row)
        for member in folded.members:
            mkey = (member.job_id, member.attempt, member.rank)
            was = self.members.get(mkey)
            self.members[mkey] = member if was is None else join_member(was, member)
        for row in folded.attempts:
            key = (row.job_id, row.record.attempt)
            had = self.attempts.get(key)
            self.attempts[key] = row.record if had is None else join_attempt(had, row.record)
        changed = {}
        for job in folded.jobs:
            had = self.jobs.get(job.job_id)
            now = job if had is None else join_job(had, job)
            if now != had:
                changed[job.job_id] = now.current
            self.jobs[job.job_id] = now
        return changed


def only_job(folded: Folded) -> JobRow:
    assert len(folded.jobs) == 1
    return folded.jobs[0]


def test_a_lifecycle_folds_into_one_job_row_and_one_attempt_row() -> None:
    folded = fold(lifecycle())
    job = only_job(folded)
    assert (job.current.state, job.current.attempt, job.current.node_id) == ("succeeded", 1, "n1")
    assert (job.name, job.queue, job.tenant, job.spec, job.submitted_at) == ("build", "ci", "acme", SPEC, T0)
    assert job.current.bound_at == T0 + 2 and job.current.started_at == T0 + 3 and job.current.finished_at == T0 + 4
    assert job.updated_at == T0 + 4
    assert [(a.job_id, a.record.attempt, a.record.state) for a in folded.attempts] == [("j1", 1, "succeeded")]
    assert [e.event_id for e in folded.events] == sorted(
        ["j1:0:submitted", "j1:1:ready", "j1:1:bound", "j1:1:started", "j1:1:succeeded"]
    )


def test_every_delivery_order_ends_in_the_same_records() -> None:
    expected = fold(lifecycle())
    for order in itertools.permutations(lifecycle()):
        assert fold(order) == expected, [type(e).__name__ for e in order]


def test_splitting_into_batches_ends_in_the_same_records_as_one_batch() -> None:
    # Jobs with a lost attempt, a retry that waits, a job that fails, retries and gives up
    # with a fallback, one cancelled while it runs: everything except two different
    # endings of one level for one attempt (where the first recorded wins by design).
    events = [*lifecycle("a")[:4], lost("a", at=9), *lifecycle("b")]
    events += [ready("b", 2, at=6), unplaceable("b", 2, at=7), ready("b", 2, at=8, release=2)]
    events += fails_retries_gives_up("c", fallback="c-fb") + cancelled_while_running("d")
    expected = FakeStore()
    expected.write(fold(events))
    rng = random.Random(7)
    for _ in range(300):
        shuffled = events[:]
        rng.shuffle(shuffled)
        store = FakeStore()
        i = 0
        while i < len(shuffled):
            n = rng.randint(1, 4)
            store.write(fold(shuffled[i : i + n]))
            i += n
        assert store.jobs == expected.jobs
        assert store.attempts == expected.attempts
        assert store.events.keys() == expected.events.keys()


def test_redelivery_changes_nothing() -> None:
    once = fold(lifecycle())
    assert fold(lifecycle() + lifecycle()) == once
    store = FakeStore()
    assert store.write(once)  # the first write changes the job
    assert store.write(fold([succeeded()])) == {}  # a redelivered event changes nothing
    assert store.write(fold(lifecycle())) == {}
    job = store.jobs["j1"]
    assert join_job(job, job) == job


def test_a_stale_attempt_is_recorded_but_fenced_off() -> None:
    store = FakeStore()
    store.write(fold([*lifecycle()[:4], lost(at=5)]))
    store.write(fold([ready(attempt=2, at=6), bound(attempt=2, node="n2", at=7), started(attempt=2, node="n2", at=8)]))
    changed = store.write(fold([succeeded(attempt=1, at=9)]))  # the lost attempt reports late
    job = store.jobs["j1"]
    assert (job.current.attempt, job.current.state, job.current.node_id) == (2, "running", "n2")
    assert store.attempts[("j1", 1)].state == "lost"  # its first terminal state stays
    assert "j1:1:succeeded" in store.events  # but the event is history
    assert changed == {"j1": job.current}  # only updated_at moved ...
    assert updates(fold([succeeded(attempt=1, at=9)]), changed) == []  # ... so nothing is announced


def test_the_first_terminal_state_of_an_attempt_is_final() -> None:
    store = FakeStore()
    store.write(fold([ready(), started(), lost(at=5)]))
    store.write(fold([succeeded(at=4), failed(at=6)]))
    assert store.jobs["j1"].current.state == "lost"
    assert store.attempts[("j1", 1)].state == "lost"
    # Within a batch the first one delivered wins.
    assert only_job(fold([failed(), succeeded()])).current.state == "failed"


def test_nothing_moves_a_terminal_attempt_backwards_but_gaps_are_filled() -> None:
    job = only_job(fold([succeeded(), started(), bound(), ready()]))
    assert job.current.state == "succeeded"
    assert (job.current.bound_at, job.current.started_at, job.current.node_id) == (T0 + 2, T0 + 3, "n1")


def test_waiting_and_ready_alternate_in_release_order() -> None:
    events = [ready(at=1), unplaceable(at=2), ready(at=3, release=2)]
    for order in itertools.permutations(events):
        folded = fold(order)
        assert only_job(folded).current.state == "ready"
        # Each release is its own piece of history.
        assert {e.event_id for e in folded.events} == {"j1:1:ready", "j1:1:unplaceable", "j1:1:ready:2"}
    # The binder's clock may lag the scheduler's: the release number still orders them.
    for order in itertools.permutations([ready(at=5), unplaceable(at=2)]):
        job = only_job(fold(order))
        assert (job.current.state, job.current.reason) == ("waiting", "no node has a gpu")
    for order in itertools.permutations([unplaceable(at=9), ready(at=3, release=2)]):
        assert only_job(fold(order)).current.state == "ready"
    assert only_job(fold([unplaceable(at=2), bound(at=3)])).current.state == "bound"


def test_a_failure_keeps_exit_code_and_error() -> None:
    folded = fold([submitted(), ready(), bound(), started(), failed(exit_code=7)])
    current = only_job(folded).current
    assert (current.state, current.exit_code, current.error_code, current.output_tail) == ("failed", 7, "exit", "boom")
    assert folded.attempts[0].record == current


def test_a_new_attempt_supersedes_and_resets_what_the_job_shows() -> None:
    job = only_job(fold([*lifecycle()[:4], failed(), ready(attempt=2, at=6)]))
    current = job.current
    assert (current.attempt, current.state, current.node_id, current.exit_code) == (2, "ready", "", None)


def test_expiry_before_any_attempt_lives_on_the_job_only() -> None:
    expired = JobExpired(job_id="j1", attempt=0, partition=0, reason="queue timeout of 5s passed", at=T0 + 5)
    folded = fold([expired, submitted()])
    job = only_job(folded)
    assert (job.current.state, job.current.attempt, job.current.reason) == ("expired", 0, "queue timeout of 5s passed")
    assert job.spec == SPEC
    assert folded.attempts == []


def test_the_spec_arrives_with_whichever_event_carries_it() -> None:
    job = only_job(fold([succeeded(), started()]))
    assert job.spec is None and job.submitted_at == T0  # Succeeded carries the submission time
    store = FakeStore()
    store.write(fold([succeeded()]))
    store.write(fold([bound()]))
    assert store.jobs["j1"].spec == SPEC and store.jobs["j1"].name == "build"


def test_updates_announce_only_jobs_the_batch_moved() -> None:
    store = FakeStore()
    first = fold(lifecycle("a")[:3] + lifecycle("b")[:2])
    announced = updates(first, store.write(first))
    assert {(u.job_id, u.state) for u in announced} == {("a", "bound"), ("b", "ready")}
    late = fold([ready("a", at=1.0), started("b")])  # a: nothing new; b: moves
    assert [(u.job_id, u.state) for u in updates(late, store.write(late))] == [("b", "running")]


def test_text_postgres_cannot_store_is_cleaned() -> None:
    event = JobUnplaceable(job_id="j1", attempt=1, partition=0, reason="bad\x00byte", at=T0)
    folded = fold([event])
    assert "\x00" not in only_job(folded).current.reason
    assert "\x00" not in folded.events[0].detail


# --- retries, give-ups, fallbacks, cancels (issue 7) ----------------------------------


def test_every_order_of_a_retry_and_a_give_up_ends_in_the_same_records() -> None:
    events = fails_retries_gives_up()
    expected = fold(events)
    # Every order of the events that decide the outcome, the rest delivered first ...
    decisive = events[4:11]
    for order in itertools.permutations(decisive):
        assert fold([*events[:4], *order, *events[11:]]) == expected, [type(e).__name__ for e in order]
    # ... and random orders of all of them, also split into batches.
    rng = random.Random(3)
    for _ in range(500):
        shuffled = events[:]
        rng.shuffle(shuffled)
        assert fold(shuffled) == expected
        store = FakeStore()
        i = 0
        while i < len(shuffled):
            n = rng.randint(1, 3)
            store.write(fold(shuffled[i : i + n]))
            i += n
        assert store.jobs == {j.job_id: j for j in expected.jobs}
        assert store.attempts == {(a.job_id, a.record.attempt): a.record for a in expected.attempts}


def test_a_job_that_fails_retries_and_gives_up() -> None:
    folded = fold(fails_retries_gives_up())
    fallback, job = folded.jobs
    assert (job.job_id, fallback.job_id) == ("j1", "fb1")
    current = job.current
    assert (current.attempt, current.state, current.node_id, current.exit_code) == (2, "failed", "n2", 7)
    assert is_final(current) and current.reason == "exit: exited with 7"
    assert (job.fallback_job_id, job.fallback_of, job.partition) == ("fb1", "", 0)
    assert (fallback.fallback_of, fallback.fallback_job_id, fallback.partition) == ("j1", "", 3)
    assert fallback.current.state == "ready" and not is_final(fallback.current)
    by_attempt = {a.record.attempt: a.record for a in folded.attempts if a.job_id == "j1"}
    assert [(r.state, r.error_code, r.node_id) for r in by_attempt.values()] == [
        ("failed", "exit", "n1"),
        ("failed", "exit", "n2"),
    ]
    details = {(e.kind, e.attempt): e.detail for e in folded.events if e.job_id == "j1"}
    assert details[("retrying", 1)] == "attempt 2 in 1.8s"
    assert details[("gave_up", 2)] == "2 attempts failed; fallback job fb1"
    announced = updates(folded, {j.job_id: j.current for j in folded.jobs})
    assert [(u.job_id, u.state, u.final) for u in announced] == [("fb1", "ready", False), ("j1", "failed", True)]


def test_a_retry_is_the_first_state_of_the_next_attempt_whatever_comes_first() -> None:
    events = [failed(), retrying(avoid=("n1",))]
    for order in itertools.permutations(events):
        folded = fold([*lifecycle()[:4], *order])
        current = only_job(folded).current
        assert (current.attempt, current.state, current.rank) == (2, "retrying", 0)
        assert current.reason == "after attempt 1: exit: exited with 7"
        assert not is_final(current)
        assert [(a.record.attempt, a.record.state) for a in folded.attempts] == [(1, "failed"), (2, "retrying")]
        [detail] = [e.detail for e in folded.events if e.kind == "retrying"]
        assert detail == "attempt 2 in 1.8s, avoiding n1"
    # Attempt 2's own events move it on, whichever arrives first.
    for order in itertools.permutations([retrying(), ready(attempt=2, at=6), unplaceable(attempt=2, at=6.5)]):
        current = only_job(fold(order)).current
        assert (current.attempt, current.state, current.reason) == (2, "waiting", "no node has a gpu")


def test_a_give_up_counts_as_the_attempts_own_ending_whichever_comes_first() -> None:
    own = [failed(attempt=2, at=9, node="n2", started_at=8)]
    alone = fold([gave_up(fallback="fb1")])
    record = only_job(alone).current
    # Alone, the give-up is the attempt's ending: its state, error and end time, and final.
    assert (record.state, record.error_code, record.error_message, record.finished_at) == (
        "failed",
        "exit",
        "exited with 7",
        T0 + 9,
    )
    assert is_final(record) and only_job(alone).fallback_job_id == "fb1"
    # With the attempt's own JobFailed, in either order or batch, the record is the same.
    expected = fold([*own, gave_up(fallback="fb1")])
    assert fold([gave_up(fallback="fb1"), *own]) == expected
    for batches in ([own, [gave_up(fallback="fb1")]], [[gave_up(fallback="fb1")], own]):
        store = FakeStore()
        for batch in batches:
            store.write(fold(batch))
        assert store.jobs["j1"] == only_job(expected)
        assert store.attempts[("j1", 2)] == expected.attempts[0].record
    record = only_job(expected).current
    assert (record.state, record.exit_code, record.output_tail, record.started_at) == ("failed", 7, "boom", T0 + 8)
    assert is_final(record)


def test_a_lost_attempt_given_up_keeps_the_lost_reason_as_its_error() -> None:
    reason = "no lease renewal for 10s"
    error = JobError(code="lost", message=reason)
    for order in itertools.permutations([lost(attempt=2, at=9, reason=reason), gave_up(state="lost", error=error)]):
        folded = fold(order)
        record = only_job(folded).current
        assert (record.state, record.reason, record.error_code, record.error_message) == (
            "lost",
            reason,
            "lost",
            reason,
        )
        assert is_final(record)
        details = {e.kind: e.detail for e in folded.events}
        assert details["lost"] == f"{reason} (node n1)"


def test_a_lost_attempt_without_a_reason_says_so() -> None:
    record = only_job(fold([lost()])).current
    assert (record.reason, record.error_code) == ("the attempt was lost", "lost")


def test_a_cancel_while_running_ends_cancelled_in_every_order() -> None:
    events = cancelled_while_running()
    expected = fold(events)
    for order in itertools.permutations(events):
        assert fold(order) == expected, [type(e).__name__ for e in order]
    current = only_job(expected).current
    assert (current.attempt, current.state, current.reason, current.node_id) == (1, "cancelled", "not needed", "n1")
    assert is_final(current)
    assert current.started_at == T0 + 3 and current.bound_at == T0 + 2
    assert [(a.record.attempt, a.record.state) for a in expected.attempts] == [(1, "cancelled")]
    details = {e.kind: e.detail for e in expected.events}
    assert (details["cancelling"], details["cancelled"]) == ("not needed", "not needed")


def test_cancelling_changes_no_state_but_gives_the_reason() -> None:
    folded = fold([*lifecycle()[:4], cancelling()])
    current = only_job(folded).current
    assert (current.state, current.rank) == ("running", 4)
    assert shown_reason(current) == "cancelling: not needed" and not is_final(current)
    assert shown_reason(folded.attempts[0].record) == "cancelling: not needed"
    # Arriving first, it still yields to the attempt's own events.
    assert only_job(fold([cancelling(), ready(at=1)])).current.state == "ready"
    # The attempt's ending replaces the reason; without a reason, "cancelling" alone.
    ended = only_job(fold([*lifecycle()[:4], cancelling(), failed(error=CANCELLED_ERROR)])).current
    assert (ended.state, shown_reason(ended)) == ("failed", "cancelled: not needed")
    assert shown_reason(only_job(fold([started(), cancelling(reason="")])).current) == "cancelling"


def test_a_job_cancelled_before_any_release_lives_on_the_job_only() -> None:
    for order in itertools.permutations([submitted(), cancelled(attempt=0, at=1, node="")]):
        folded = fold(order)
        job = only_job(folded)
        assert (job.current.attempt, job.current.state, job.current.reason) == (0, "cancelled", "not needed")
        assert is_final(job.current) and job.spec == SPEC
        assert folded.attempts == []
        assert {e.event_id for e in folded.events} == {"j1:0:submitted", "j1:0:cancelled"}


def test_a_held_retry_that_is_cancelled_ends_cancelled() -> None:
    folded = fold([*lifecycle()[:4], failed(), retrying(), cancelled(attempt=2, at=5, node="")])
    current = only_job(folded).current
    assert (current.attempt, current.state) == (2, "cancelled") and is_final(current)


def test_final_is_set_by_the_job_ends_only() -> None:
    expired = JobExpired(job_id="j1", attempt=1, partition=0, reason="queue timeout of 5s passed", at=T0 + 5)
    assert is_final(only_job(fold(lifecycle())).current)  # succeeded
    assert is_final(only_job(fold([ready(), expired])).current)
    assert not is_final(only_job(fold([*lifecycle()[:4], failed()])).current)  # the scheduler decides next
    assert not is_final(only_job(fold([*lifecycle()[:4], lost()])).current)
    # An ending the scheduler marked stays final whichever ending of the attempt shows.
    assert is_final(only_job(fold([ready(), expired, failed()])).current)


def test_a_late_success_of_a_replaced_attempt_does_not_end_the_job() -> None:
    events = [*lifecycle()[:4], lost(), retrying(at=5.5), ready(attempt=2, at=6), started(attempt=2, node="n2", at=7)]
    late = succeeded(attempt=1, at=8, result="stale")
    for order in itertools.permutations([*events[4:], late]):
        current = only_job(fold([*events[:4], *order])).current
        assert (current.attempt, current.state) == (2, "running") and not is_final(current)
    # Recorded after the loss, the success is history: the attempt stays lost, without the result.
    first = fold([*events, late]).attempts[0].record
    assert (first.state, first.result) == ("lost", "")


def test_the_partition_comes_from_any_event() -> None:
    for event in [*lifecycle()[1:], cancelling(), retrying(), lost()]:
        event = type(event)(**{**{f: getattr(event, f) for f in event.__struct_fields__}, "partition": 5})
        assert only_job(fold([event])).partition == 5
    assert only_job(fold([submitted(partition=2), started()])).partition == 2


def test_a_result_is_kept_on_its_attempt() -> None:
    folded = fold([*lifecycle()[:4], succeeded(result="42\n")])
    record = folded.attempts[0].record
    assert (record.result, record.result_ref, record.result_bytes) == ("42\n", "", 3)
    assert folded.events[-1].kind == "succeeded" and folded.events[-1].detail == "exit 0, result of 3 bytes inline"
    record = only_job(fold([succeeded(result_ref="j1/1")])).current
    assert (record.result, record.result_ref, record.result_bytes) == ("", "j1/1", 3_000_000)


def test_updates_announce_a_give_up_and_a_cancel_under_way() -> None:
    store = FakeStore()
    store.write(fold([*lifecycle()[:4], failed()]))
    batch = fold([gave_up(attempt=1, node="n1", ended=4)])
    [update] = updates(batch, store.write(batch))
    assert (update.state, update.attempt, update.final) == ("failed", 1, True)
    assert updates(batch, store.write(batch)) == []  # a redelivery changes nothing

    store = FakeStore()
    store.write(fold(lifecycle()[:4]))
    batch = fold([cancelling()])
    [update] = updates(batch, store.write(batch))
    assert (update.state, update.reason, update.final) == ("running", "cancelling: not needed", False)
    batch = fold([cancelled()])
    [update] = updates(batch, store.write(batch))
    assert (update.state, update.reason, update.final) == ("cancelled", "not needed", True)


def test_a_wait_the_scheduler_reports_shows_until_the_release_in_any_order() -> None:
    from jobmesh.contract.messages.v1 import JobWaiting

    waiting = JobWaiting(job_id="j1", attempt=1, partition=0, reason="concurrency key db at its limit of 1", at=0.5)
    held = only_job(fold([submitted(), waiting]))
    assert (held.current.state, held.current.reason) == ("waiting", "concurrency key db at its limit of 1")
    for events in ([submitted(), waiting, ready()], [ready(), waiting, submitted()]):
        job = only_job(fold(events))
        assert job.current.state == "ready"
    folded = fold([submitted(), waiting, ready()])
    assert [e.kind for e in folded.events if e.kind == "waiting"] == ["waiting"]


# --- gangs: several members in one attempt ---------------------------------------------

GANG = JobSpec(runtime=NoopRuntime(), name="train", queue="ci", tenant="acme", replicas=3)
NODES = ("n1", "n2", "n3")


def gang_submitted(job: str = "g1") -> JobSubmitted:
    return JobSubmitted(job_id=job, partition=0, spec=GANG, idempotency_key=job, submitted_at=T0)


def gang_ready(job: str = "g1", attempt: int = 1, at: float = 1.0) -> JobReady:
    return JobReady(
        job_id=job,
        attempt=attempt,
        partition=0,
        spec=GANG,
        candidates=list(NODES),
        submitted_at=T0,
        ready_at=T0 + at,
    )


def member_bound(rank: int, job: str = "g1", attempt: int = 1, at: float = 2.0) -> JobBound:
    return JobBound(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=NODES[rank],
        spec=GANG,
        scratch_dir="/s",
        submitted_at=T0,
        bound_at=T0 + at + rank / 10,
        rank=rank,
        world_size=3,
        peers=[f"{n}:7000" for n in NODES],
    )


def member_started(rank: int, job: str = "g1", attempt: int = 1, at: float = 3.0) -> JobStarted:
    return JobStarted(
        job_id=job, attempt=attempt, partition=0, node_id=NODES[rank], at=T0 + at + rank / 10, rank=rank, world_size=3
    )


def member_succeeded(rank: int, job: str = "g1", attempt: int = 1, at: float = 5.0) -> MemberSucceeded:
    return MemberSucceeded(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=NODES[rank],
        rank=rank,
        world_size=3,
        exit_code=0,
        output_tail=f"rank {rank} done",
        started_at=T0 + 3 + rank / 10,
        at=T0 + at + rank / 10,
    )


def member_failed(
    rank: int, job: str = "g1", attempt: int = 1, at: float = 6.0, error: JobError = EXIT_ERROR, exit_code: int = 7
) -> JobFailed:
    return JobFailed(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id=NODES[rank],
        exit_code=exit_code,
        error=error,
        output_tail="boom",
        submitted_at=T0,
        started_at=T0 + 3,
        at=T0 + at,
        rank=rank,
        world_size=3,
    )


STOPPED = JobError(code="cancelled", message="another member of the gang failed")


def gang_that_fails(job: str = "g1") -> list:
    """Rank 0 succeeds, rank 2 fails, rank 1 is stopped for it; the scheduler retries."""
    return [
        gang_submitted(job),
        gang_ready(job),
        *(member_bound(r, job) for r in range(3)),
        *(member_started(r, job) for r in range(3)),
        member_succeeded(0, job),
        member_failed(2, job),
        member_failed(1, job, at=6.5, error=STOPPED, exit_code=-15),
        retrying(job, at=7),
    ]


def members_of(folded: Folded, attempt: int = 1) -> list[tuple[int, str, str, str]]:
    return [(m.rank, m.node_id, m.state, m.detail) for m in folded.members if m.attempt == attempt]


def test_a_plain_job_has_no_member_rows() -> None:
    assert fold(lifecycle()).members == []
    assert fold(fails_retries_gives_up()).members == []
    assert fold(cancelled_while_running()).members == []


def test_each_members_events_are_kept_apart_and_name_the_member() -> None:
    events = [gang_submitted(), gang_ready()]
    events += [member_bound(r) for r in range(3)] + [member_started(r) for r in range(3)]
    events += [member_succeeded(0), member_succeeded(1), member_failed(2)]
    folded = fold(events)
    ids = {e.event_id for e in folded.events}
    for kind in ("bound", "started"):
        assert {f"g1:1:{kind}", f"g1:1:{kind}:1", f"g1:1:{kind}:2"} <= ids
    assert {"g1:1:member_succeeded", "g1:1:member_succeeded:1", "g1:1:failed:2"} <= ids
    assert len(folded.events) == len(events)  # nothing collapsed
    details = {e.event_id: e.detail for e in folded.events}
    assert details["g1:1:bound:1"] == "member 1 on node n2"
    assert details["g1:1:started"] == "member 0 on node n1"
    assert details["g1:1:member_succeeded:1"] == "member 1 on node n2 succeeded"
    assert details["g1:1:failed:2"] == "member 2 on node n3: exit: exited with 7 (exit 7)"
    assert members_of(folded) == [
        (0, "n1", "succeeded", ""),
        (1, "n2", "succeeded", ""),
        (2, "n3", "failed", "exit: exited with 7 (exit 7)"),
    ]
    # One member's failure fails the attempt; its node is rank 0's, whoever spoke first.
    current = only_job(folded).current
    assert (current.state, current.node_id, current.error_code, current.exit_code) == ("failed", "n1", "exit", 7)
    assert current.bound_at == T0 + 2 and current.started_at == T0 + 3
    assert not is_final(current)


def test_a_member_success_does_not_end_the_attempt() -> None:
    running = [
        gang_submitted(),
        gang_ready(),
        *(member_bound(r) for r in range(3)),
        *(member_started(r) for r in range(3)),
    ]
    store = FakeStore()
    store.write(fold(running))
    before = store.jobs["g1"]
    batch = fold([member_succeeded(r) for r in range(3)])
    changed = store.write(batch)
    job = store.jobs["g1"]
    assert (job.current.state, job.current.attempt) == ("running", 1) and not is_final(job.current)
    assert job.current == before.current and store.attempts[("g1", 1)] == before.current
    assert updates(batch, changed) == []  # nothing to announce
    assert [m.state for m in store.members.values()] == ["succeeded"] * 3
    assert {k for k in store.events if "member_succeeded" in k} == {
        "g1:1:member_succeeded",
        "g1:1:member_succeeded:1",
        "g1:1:member_succeeded:2",
    }
    # The scheduler's one JobSucceeded (rank 0's node) ends it.
    store.write(fold([succeeded("g1", node="n1", at=6)]))
    assert store.jobs["g1"].current.state == "succeeded" and is_final(store.jobs["g1"].current)
    # Arriving before anything else of its job, a member's success moves no state either.
    alone = only_job(fold([member_succeeded(1, job="g2")]))
    assert (alone.current.state, alone.current.rank, alone.spec) == ("queued", 0, None)
    assert only_job(fold([member_succeeded(1, job="g2"), member_started(1, job="g2")])).current.state == "running"


def test_a_members_state_only_moves_forward() -> None:
    for order in itertools.permutations([member_bound(1), member_started(1), member_succeeded(1)]):
        assert members_of(fold(order)) == [(1, "n2", "succeeded", "")]
    late = FakeStore()
    late.write(fold([member_started(1)]))
    late.write(fold([member_bound(1)]))  # an earlier state, late
    assert late.members[("g1", 1, 1)].state == "running"
    assert late.members[("g1", 1, 1)].at == T0 + 3.1
    # The first ending recorded stays.
    assert members_of(fold([member_succeeded(1), member_failed(1)]))[0][2] == "succeeded"


def test_a_member_stopped_for_anothers_failure_yields_to_it_in_every_order() -> None:
    stopped = member_failed(1, at=6.5, error=STOPPED, exit_code=-15)
    for order in itertools.permutations([stopped, member_failed(2), gave_up("g1", attempt=1, node="n3", ended=6)]):
        current = only_job(fold(order)).current
        assert (current.state, current.error_code, current.exit_code, current.finished_at) == (
            "failed",
            "exit",
            7,
            T0 + 6,
        )
    # Alone, a stopped member fails the attempt, and a cancel still ends the job cancelled.
    assert only_job(fold([stopped])).current.error_code == "cancelled"
    assert only_job(fold([cancelled("g1"), stopped])).current.state == "cancelled"
    # A plain job's cancelled failure keeps its level: a later own ending does not replace it.
    assert only_job(fold([failed(error=CANCELLED_ERROR), failed(at=5)])).current.error_code == "cancelled"


def test_a_failing_gang_ends_in_the_same_records_whatever_the_order_and_batching() -> None:
    events = gang_that_fails() + lifecycle("plain")
    expected = FakeStore()
    expected.write(fold(events))
    job = expected.jobs["g1"]
    assert (job.current.attempt, job.current.state) == (2, "retrying")
    first = expected.attempts[("g1", 1)]
    assert (first.state, first.node_id, first.error_code) == ("failed", "n1", "exit")
    assert [(k[2], m.state, m.detail) for k, m in expected.members.items()] == [
        (0, "succeeded", ""),
        (1, "failed", "cancelled: another member of the gang failed (exit -15)"),
        (2, "failed", "exit: exited with 7 (exit 7)"),
    ]
    rng = random.Random(5)
    for _ in range(300):
        shuffled = events[:]
        rng.shuffle(shuffled)
        store = FakeStore()
        i = 0
        while i < len(shuffled):
            n = rng.randint(1, 4)
            store.write(fold(shuffled[i : i + n]))
            i += n
        assert store.jobs == expected.jobs
        assert store.attempts == expected.attempts
        assert store.members == expected.members
        assert store.events.keys() == expected.events.keys()
