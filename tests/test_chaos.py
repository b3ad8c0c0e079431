"""The chaos suite's checks on made-up records: each count of loss, duplication and leaks
is shown to fail when it should.

The real runs are ``make chaos`` (10,000 jobs over 240 s) and ``make chaos-short`` (1,200
jobs over 80 s); the short one runs in CI as ``tests/test_chaos_short.py`` (docs/chaos.md).
"""

from __future__ import annotations

from collections import Counter

from jobmesh.dev.chaosreport import ZERO_COUNTS, AttemptRow, Fault, JobRow, analyse, outcome_problem, recoveries

REQUIRED = {"kill": 1, "kill_executor": 1, "nats_restart": 1, "postgres_restart": 1, "sigstop": 1}


def _faults(t0: float) -> list[Fault]:
    return [
        Fault("kill", "executor-n1", t0 + 2, back_at=t0 + 4),
        Fault("nats_restart", "nats-server", t0 + 5, back_at=t0 + 7),
        Fault("postgres_restart", "postgres", t0 + 8, back_at=t0 + 11),
        Fault("sigstop", "executor-n2", t0 + 12, back_at=t0 + 25),
    ]


def _analyse(**over):
    base = dict(
        planned={"a" * 32: "ok", "b" * 32: "fail", "c" * 32: "retry"},
        acknowledged=["a" * 32, "b" * 32, "c" * 32],
        jobs={
            "a" * 32: JobRow("succeeded", 1, False, ""),
            "b" * 32: JobRow("failed", 1, True, "exit_code"),
            "c" * 32: JobRow("succeeded", 2, False, ""),
        },
        attempts=[
            AttemptRow("a" * 32, 1, "succeeded", False, "n1"),
            AttemptRow("b" * 32, 1, "failed", True, "n1"),
            AttemptRow("c" * 32, 1, "failed", False, "n1"),
            AttemptRow("c" * 32, 2, "succeeded", False, "n2"),
        ],
        started={("a" * 32, 1), ("b" * 32, 1), ("c" * 32, 1), ("c" * 32, 2)},
        runs=Counter({("a" * 32, 1): 1, ("b" * 32, 1): 1, ("c" * 32, 1): 1, ("c" * 32, 2): 1}),
        reservations={},
        dead_letters=[],
        faults=_faults(100.0),
        completions=[103.0, 108.0, 112.0, 26 + 100.0],
        t0=100.0,
        seconds=30.0,
        required_faults=REQUIRED,
    )
    base.update(over)
    return analyse(**base)


def test_a_clean_run_reports_no_problem():
    report = _analyse()
    assert report.ok, report.problems
    assert all(getattr(report, name) == 0 for name in ZERO_COUNTS)


def test_each_kind_of_loss_duplication_and_leak_is_counted():
    ids = ["a" * 32, "b" * 32, "c" * 32, "d" * 32]
    report = _analyse(
        planned={**dict.fromkeys(ids[:3], "ok"), ids[3]: "ok"},
        acknowledged=ids,
        jobs={
            ids[0]: JobRow("succeeded", 1, False, ""),
            ids[1]: JobRow("running", 1, False, ""),  # stuck
            ids[2]: JobRow("lost", 3, True, "lost"),  # wrong outcome: designed to succeed
        },  # ids[3] missing
        attempts=[
            AttemptRow(ids[0], 1, "succeeded", False, "n1"),
            AttemptRow(ids[0], 2, "succeeded", False, "n2"),  # a second final attempt
            AttemptRow(ids[1], 1, "running", False, "n1"),
        ],
        started={(ids[0], 1)},
        runs=Counter({(ids[0], 1): 2, (ids[0], 2): 1, (ids[1], 7): 1}),
        reservations={"chaos-n1": [f"{ids[1]}:1", f"{ids[0]}:1"]},  # ids[1] still runs: held, not leaked
    )
    assert (report.missing, report.stuck, report.wrong_outcome) == (1, 1, 1)
    assert report.duplicate_terminal == 1
    assert report.duplicate_runs == 1  # ids[0] attempt 1 ran twice
    assert report.runs_unrecorded == 1  # ids[1] attempt 7 is unknown to the tracker
    assert report.history_gaps == 1  # ids[0] attempt 2 ran and succeeded without a started event
    assert (report.leaked_reservations, report.reservations_held) == (1, 1)
    assert len(report.problems) == 8 and not report.ok


def test_a_fault_that_did_not_happen_is_a_problem():
    report = _analyse(faults=_faults(100.0)[:2])
    assert any("postgres_restart" in p for p in report.problems)
    assert any("sigstop" in p for p in report.problems)


def test_designed_outcomes():
    assert outcome_problem("fail", JobRow("failed", 1, True, "exit_code")) is None
    assert outcome_problem("fail", JobRow("failed", 2, True, "lost")) is not None  # failed, but not by design
    assert outcome_problem("handler_fail", JobRow("succeeded", 1, False, "")) is not None
    assert outcome_problem("retry", JobRow("succeeded", 1, False, "")) is not None  # attempt 1 must fail
    assert outcome_problem("noop", JobRow("succeeded", 2, False, "")) is None


def test_recovery_is_the_first_job_end_after_the_target_is_back():
    rows = recoveries([Fault("kill", "binder-a", 10.0, back_at=12.0)], [11.0, 12.5, 13.0], t0=0.0)
    assert (rows[0].back_s, rows[0].recovered_s) == (2.0, 2.5)
    never = recoveries([Fault("kill", "binder-a", 10.0, back_at=None)], [11.0], t0=0.0)
    assert never[0].recovered_s is None
