"""The chaos suite's figures, from the durable records: pure functions and the printed table.

``analyse`` takes what the suite read after the run (the tracker's rows, the runs file's
lines, ``jm_alloc``, ``JM_DEADLETTER``, the faults it injected and the moments jobs ended)
and returns a ``Report``; nothing here does I/O, so the checks can be tested on made-up
records. ``render`` prints the report with rich; ``Report.to_json`` is ``--json``.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from jobmesh.dev.chaosjobs import DESIGNED_TO_FAIL, records_runs

TERMINAL_STATES = frozenset({"succeeded", "failed", "lost", "expired", "cancelled"})
SAMPLE = 10  # job ids shown per finding, so a report names real cases to dig into


@dataclass(frozen=True)
class JobRow:
    """What ``tracker.jobs`` holds of one job (the attempt it shows)."""

    state: str
    attempt: int
    ends_job: bool
    error_code: str


@dataclass(frozen=True)
class AttemptRow:
    """What ``tracker.attempts`` holds of one attempt."""

    job_id: str
    attempt: int
    state: str
    ends_job: bool
    node_id: str


@dataclass
class Fault:
    """One injected fault and the moments that say how the system came back.

    Attributes:
        kind: ``kill``, ``nats_restart``, ``postgres_restart`` or ``sigstop``.
        target: the replica (``executor-n2``) or server.
        at: Unix time of the fault.
        back_at: when the target was serving again (the replacement's /healthz ok, the
            server listening again, the paused process continued and healthy); None if never.
        detail: what else is worth saying (a pid, how long it was stopped).
    """

    kind: str
    target: str
    at: float
    back_at: float | None = None
    detail: str = ""


@dataclass
class Recovery:
    """One fault's row in the report: seconds from the fault until the target is back and
    until the first job ends after that (throughput resumed)."""

    kind: str
    target: str
    at_s: float
    back_s: float | None
    recovered_s: float | None
    detail: str


@dataclass
class Report:
    """Every figure of one chaos run. ``problems`` lists what must be 0 and is not."""

    jobs_planned: int
    jobs_acknowledged: int
    jobs_unacknowledged: int
    by_kind: dict[str, int]
    missing: int
    stuck: int
    wrong_outcome: int
    duplicate_terminal: int
    duplicate_runs: int
    runs_unrecorded: int
    history_gaps: int
    leaked_reservations: int
    runs_total: int
    reservations_held: int
    attempts_total: int
    retried_jobs: int
    stale_runs: int
    dead_letters: dict[str, int]
    faults: dict[str, int]
    recoveries: list[Recovery]
    states: dict[str, int]
    seconds: float
    samples: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return not self.problems


# Counts that must be 0 on every run, with what each means in the table.
ZERO_COUNTS = {
    "missing": "acknowledged jobs the tracker has no record of",
    "stuck": "acknowledged jobs not final after the settle time",
    "wrong_outcome": "final jobs that did not end as designed",
    "duplicate_terminal": "jobs ended twice (more than one attempt final)",
    "duplicate_runs": "attempts that ran more than once (runs file)",
    "runs_unrecorded": "runs of an attempt the tracker has no record of",
    "history_gaps": "finished attempts that ran but have no started event",
    "leaked_reservations": "reservations in jm_alloc of attempts that are over",
}


def is_final(row: JobRow) -> bool:
    """The tracker's own rule (``tracker.fold.final_of``): succeeded, or ended by the scheduler."""
    return row.ends_job or row.state == "succeeded"


def outcome_problem(kind: str, row: JobRow) -> str | None:
    """Why a final job of ``kind`` did not end as designed; None when it did.

    A job designed to fail must end failed with its designed code (not lost, not
    succeeded); every other kind must succeed, and a ``retry`` job on attempt 2 or later.
    """
    expected_code = DESIGNED_TO_FAIL.get(kind)
    if expected_code is not None:
        if row.state != "failed" or row.error_code != expected_code:
            return f"{kind}: ended {row.state} ({row.error_code or 'no code'}), designed to fail with {expected_code}"
        return None
    if row.state != "succeeded":
        return f"{kind}: ended {row.state} ({row.error_code or 'no code'}), designed to succeed"
    if kind == "retry" and row.attempt < 2:
        return f"retry: succeeded on attempt {row.attempt}, designed to fail attempt 1"
    return None


def recoveries(faults: Iterable[Fault], completions: list[float], t0: float) -> list[Recovery]:
    """Each fault's recovery: the first job end at or after the target was back.

    Args:
        faults: the injected faults.
        completions: sorted Unix times at which the tracker announced a job final.
        t0: the run's start, for the relative ``at_s``.
    """
    rows = []
    for fault in faults:
        back = fault.back_at
        recovered = None
        if back is not None:
            i = bisect.bisect_left(completions, back)
            if i < len(completions):
                recovered = completions[i] - fault.at
        rows.append(
            Recovery(
                kind=fault.kind,
                target=fault.target,
                at_s=round(fault.at - t0, 2),
                back_s=None if back is None else round(back - fault.at, 2),
                recovered_s=None if recovered is None else round(recovered, 2),
                detail=fault.detail,
            )
        )
    return rows


def analyse(
    *,
    planned: Mapping[str, str],
    acknowledged: Iterable[str],
    jobs: Mapping[str, JobRow],
    attempts: Iterable[AttemptRow],
    started: set[tuple[str, int]],
    runs: Counter[tuple[str, int]],
    reservations: Mapping[str, list[str]],
    dead_letters: Iterable[tuple[str, str]],
    faults: list[Fault],
    completions: list[float],
    t0: float,
    seconds: float,
    required_faults: Mapping[str, int],
) -> Report:
    """Every figure of the run, and the list of problems (a count that is not 0, a fault
    kind that did not happen).

    Args:
        planned: job id -> kind, for every job the suite meant to submit.
        acknowledged: the ids whose submit was answered.
        jobs: ``tracker.jobs`` of the planned ids.
        attempts: ``tracker.attempts`` of the planned ids.
        started: (job, attempt) of every ``started`` event in ``tracker.events``.
        runs: (job, attempt) -> lines in the runs file.
        reservations: node -> reservation keys left in ``jm_alloc``.
        dead_letters: (service, code) of every message in ``JM_DEADLETTER``.
        faults: what was injected, with the moments it came back.
        completions: sorted Unix times of every final job announcement.
        t0: the run's start.
        seconds: the run's length, submit to settled.
        required_faults: fault kind -> how many at least must have happened.

    Returns:
        The report; ``report.ok`` when every count is 0 and every fault kind happened.
    """
    acked = [j for j in acknowledged if j in planned]
    samples: dict[str, list[str]] = {name: [] for name in ZERO_COUNTS}

    def note(name: str, what: str) -> None:
        if len(samples[name]) < SAMPLE:
            samples[name].append(what)

    missing = stuck = wrong = 0
    for job_id in acked:
        row = jobs.get(job_id)
        if row is None:
            missing += 1
            note("missing", job_id)
        elif not is_final(row):
            stuck += 1
            note("stuck", f"{job_id} {row.state} attempt {row.attempt}")
        else:
            problem = outcome_problem(planned[job_id], row)
            if problem is not None:
                wrong += 1
                note("wrong_outcome", f"{job_id} {problem}")

    attempt_list = list(attempts)
    known_attempts = {(a.job_id, a.attempt) for a in attempt_list}
    finals: Counter[str] = Counter(a.job_id for a in attempt_list if a.state == "succeeded" or a.ends_job)
    duplicate_terminal = 0
    for job_id, n in finals.items():
        if n > 1:
            duplicate_terminal += 1
            note("duplicate_terminal", f"{job_id} final on {n} attempts")

    duplicate_runs = runs_unrecorded = 0
    for (job_id, attempt), n in runs.items():
        if n > 1:
            duplicate_runs += 1
            note("duplicate_runs", f"{job_id} attempt {attempt} ran {n} times")
        if (job_id, attempt) not in known_attempts:
            runs_unrecorded += 1
            note("runs_unrecorded", f"{job_id} attempt {attempt}")

    # An attempt that ran (its line is in the runs file) and reached a terminal state must
    # have its Started recorded: the executor makes Started durable before it starts anything.
    history_gaps = 0
    for a in attempt_list:
        kind = planned.get(a.job_id, "")
        if records_runs(kind) and (a.job_id, a.attempt) in runs and (a.job_id, a.attempt) not in started:
            history_gaps += 1
            note("history_gaps", f"{a.job_id} attempt {a.attempt} ({a.state}) on {a.node_id or 'no node'}")

    # A reservation is leaked once its attempt is over (ended, replaced, or its job final);
    # one of an attempt still in flight is held, and counted apart (it is not a leak yet,
    # but while jobs are stuck it says what holds the nodes' capacity).
    attempt_state = {(a.job_id, a.attempt): a.state for a in attempt_list}
    leaked = held = 0
    for node, keys in reservations.items():
        for key in keys:
            job_id, _, number = key.rpartition(":")
            row = jobs.get(job_id)
            state = attempt_state.get((job_id, int(number))) if number.isdigit() else None
            over = (
                state in TERMINAL_STATES
                or row is None
                or is_final(row)
                or (number.isdigit() and int(number) < row.attempt)
            )
            if over:
                leaked += 1
                note("leaked_reservations", f"{node}: {key} ({state or 'no attempt row'})")
            else:
                held += 1

    # A run of an attempt that is not the one the job ended with: a lease declared lost while
    # the attempt ran on (the SIGSTOPped node), which at-least-once allows across attempts.
    shown = {job_id: row.attempt for job_id, row in jobs.items()}
    stale = sum(1 for (job_id, attempt) in runs if attempt < shown.get(job_id, attempt) and planned.get(job_id) == "ok")

    letters: Counter[str] = Counter(f"{service}: {code}" for service, code in dead_letters)
    fault_counts: Counter[str] = Counter(f.kind for f in faults)
    fault_counts["kill_executor"] = sum(1 for f in faults if f.kind == "kill" and f.target.startswith("executor"))
    counts = {
        "missing": missing,
        "stuck": stuck,
        "wrong_outcome": wrong,
        "duplicate_terminal": duplicate_terminal,
        "duplicate_runs": duplicate_runs,
        "runs_unrecorded": runs_unrecorded,
        "history_gaps": history_gaps,
        "leaked_reservations": leaked,
    }
    problems = [f"{name} = {value}: {ZERO_COUNTS[name]}" for name, value in counts.items() if value]
    for kind, least in required_faults.items():
        if fault_counts.get(kind, 0) < least:
            problems.append(f"fault {kind} happened {fault_counts.get(kind, 0)} times, at least {least} required")
    recovery_rows = recoveries(faults, completions, t0)
    for recovery in recovery_rows:
        if recovery.kind != "kill" and recovery.recovered_s is None:
            problems.append(f"no recovery after {recovery.kind} of {recovery.target}: no job ended after it was back")
    states: Counter[str] = Counter(row.state for job_id, row in jobs.items() if job_id in planned)
    return Report(
        jobs_planned=len(planned),
        jobs_acknowledged=len(acked),
        jobs_unacknowledged=len(planned) - len(acked),
        by_kind=dict(Counter(planned.values())),
        attempts_total=len(attempt_list),
        retried_jobs=sum(1 for row in jobs.values() if row.attempt > 1),
        runs_total=sum(runs.values()),
        reservations_held=held,
        stale_runs=stale,
        dead_letters=dict(letters.most_common()),
        faults=dict(fault_counts),
        recoveries=recovery_rows,
        states=dict(states.most_common()),
        seconds=round(seconds, 1),
        samples={k: v for k, v in samples.items() if v},
        problems=problems,
        **counts,
    )


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def render(report: Report) -> None:
    """Print the report as rich tables: loss, duplication and leaks first, then the rest."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(title="chaos run", show_header=False)
    head.add_row(
        "jobs planned / acknowledged / never acknowledged",
        f"{report.jobs_planned} / {report.jobs_acknowledged} / {report.jobs_unacknowledged}",
    )
    head.add_row("kinds", ", ".join(f"{k} {v}" for k, v in sorted(report.by_kind.items())))
    head.add_row("final states", ", ".join(f"{k} {v}" for k, v in report.states.items()))
    head.add_row(
        "attempts / jobs retried / runs in the runs file",
        f"{report.attempts_total} / {report.retried_jobs} / {report.runs_total}",
    )
    head.add_row("reservations held by attempts in flight at the end", str(report.reservations_held))
    head.add_row("runs of replaced attempts (ok jobs; lease lost, ran on)", str(report.stale_runs))
    head.add_row("faults", ", ".join(f"{k} {v}" for k, v in sorted(report.faults.items())))
    head.add_row("seconds, first submit to settled", f"{report.seconds}")
    console.print(head)

    zeros = Table(title="must be 0")
    zeros.add_column("count")
    zeros.add_column("value", justify="right")
    zeros.add_column("meaning")
    for name, meaning in ZERO_COUNTS.items():
        value = getattr(report, name)
        zeros.add_row(name, f"[bold red]{value}[/]" if value else "0", meaning)
    console.print(zeros)

    letters = Table(title="dead letters by service and reason")
    letters.add_column("service: code")
    letters.add_column("count", justify="right")
    for reason, n in report.dead_letters.items():
        letters.add_row(reason, str(n))
    if not report.dead_letters:
        letters.add_row("(none)", "0")
    console.print(letters)

    faults = Table(title="recovery after each fault (seconds from the fault)")
    for column in ("at s", "fault", "target", "back", "next job ended", "detail"):
        faults.add_column(column, justify="right" if column in ("at s", "back", "next job ended") else "left")
    for row in report.recoveries:
        faults.add_row(
            f"{row.at_s:.1f}", row.kind, row.target, _seconds(row.back_s), _seconds(row.recovered_s), row.detail
        )
    console.print(faults)
    kills = [r.recovered_s for r in report.recoveries if r.kind == "kill" and r.recovered_s is not None]
    if kills:
        kills.sort()
        console.print(
            f"kill -9 recovery (replacement healthy and a job ended): median {kills[len(kills) // 2]:.2f} s, "
            f"max {kills[-1]:.2f} s over {len(kills)} kills"
        )
    for name, cases in report.samples.items():
        console.print(f"[bold]{name}[/] e.g.: " + "; ".join(cases))
    if report.problems:
        console.print("[bold red]FAILED[/]: " + " | ".join(report.problems))
    else:
        console.print("[bold green]OK[/]: no loss, no duplication, no leak; every fault kind happened")
