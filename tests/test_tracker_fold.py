"""Unit tests of the tracker's pure fold: order independence, fencing, idempotence."""

from __future__ import annotations

import itertools
import random

from jobmesh.contract.messages.v1 import (
    JobBound,
    JobError,
    JobExpired,
    JobFailed,
    JobLost,
    JobReady,
    JobSpec,
    JobStarted,
    JobSubmitted,
    JobSucceeded,
    JobUnplaceable,
    NoopRuntime,
)
from jobmesh.tracker.fold import AttemptState, Folded, JobRow, fold, join_attempt, join_job, updates

T0 = 1_700_000_000.0
SPEC = JobSpec(runtime=NoopRuntime(), name="build", queue="ci", tenant="acme")


def submitted(job: str = "j1") -> JobSubmitted:
    return JobSubmitted(job_id=job, partition=0, spec=SPEC, idempotency_key=job, submitted_at=T0)


def ready(job: str = "j1", attempt: int = 1, at: float = 1.0, release: int = 1) -> JobReady:
    return JobReady(
        job_id=job,
        attempt=attempt,
        partition=0,
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


def succeeded(job: str = "j1", attempt: int = 1, node: str = "n1", at: float = 4.0) -> JobSucceeded:
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
    )


def failed(job: str = "j1", attempt: int = 1, exit_code: int = 7, at: float = 4.0) -> JobFailed:
    return JobFailed(
        job_id=job,
        attempt=attempt,
        partition=0,
        node_id="n1",
        exit_code=exit_code,
        error=JobError(code="exit", message="exited with 7"),
        output_tail="boom",
        submitted_at=T0,
        started_at=T0 + 3.0,
        at=T0 + at,
    )


def lost(job: str = "j1", attempt: int = 1, at: float = 5.0) -> JobLost:
    return JobLost(job_id=job, attempt=attempt, partition=0, node_id="n1", at=T0 + at)


def lifecycle(job: str = "j1") -> list:
    return [submitted(job), ready(job), bound(job), started(job), succeeded(job)]


class FakeStore:
    """The store's upserts, in memory: rows combine with the same joins the SQL mirrors."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobRow] = {}
        self.attempts: dict[tuple[str, int], AttemptState] = {}
        self.events: dict[str, object] = {}

    def write(self, folded: Folded) -> dict[str, AttemptState]:
        for row in folded.events:
            self.events.setdefault(row.event_id, row)
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
    # Two jobs, a lost attempt, a retry that waits: everything except two different
    # terminal events for one attempt (where the first recorded wins by design).
    events = [*lifecycle("a")[:4], lost("a", at=9), *lifecycle("b")]
    events += [ready("b", 2, at=6), unplaceable("b", 2, at=7), ready("b", 2, at=8, release=2)]
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
