"""The jobs of the chaos suite: their kinds, specs and designed outcomes.

Every kind that runs something real leaves one line ``<job id> <attempt>`` in a shared runs
file per run, so the suite counts real runs per attempt from the file, not from what the
services say. The kinds:

- ``noop``: succeeds at once (no process).
- ``ok``: a process that records its run, sleeps a little and exits 0.
- ``fail``: a process that records its run and exits 3; its policy does not retry an exit
  code, so it must end failed with ``exit_code``.
- ``retry``: a process that records its run and fails on attempt 1
  (``JOBMESH_ATTEMPT``), succeeding from attempt 2; it must succeed on attempt 2 or later.
- ``handler``: the Python handler ``chaos.echo``, which returns its input.
- ``handler_fail``: ``chaos.fail``, which raises; it must end failed with ``handler_failed``.

Handlers run in a sandboxed worker (no host files, no network), so they cannot write the
runs file: their duplicates are seen only in the tracker's records (two final attempts).

Every kind may be retried after a disruption (a lost lease, an executor error), since the
suite kills executors under running attempts: only the designed failure is not retried.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from jobmesh.contract.messages.v1 import (
    Constraints,
    HandlerRuntime,
    JobSpec,
    NoopRuntime,
    ProcessRuntime,
    Resources,
    RetryPolicy,
    Submission,
    Timeouts,
)

KINDS = ("noop", "ok", "fail", "retry", "handler", "handler_fail")
# Shares of the mix, in KINDS order (sum 100).
MIX = (30, 25, 10, 15, 12, 8)
DESIGNED_TO_FAIL = {"fail": "exit_code", "handler_fail": "handler_failed"}
# Disruptions the suite causes: retried for every kind (a designed failure's code is not among them).
DISRUPTIONS = ["lost", "executor_error", "handler_crashed", "timeout"]
HEARTBEAT_TIMEOUT = 6.0  # each job's lease: the SIGSTOPped executor stays stopped longer than this
MAX_ATTEMPTS = 8
# The label of the nodes whose attempts can write the shared runs file (process isolation:
# a sandbox sees none of the host's files). Handlers need a sandbox node here: at the process
# level a worker runs as an unprivileged uid that cannot reach this interpreter under /root.
RUNS_FILE_LABEL = ("chaos_runs", "file")

HANDLER_MODULE = '''"""Handlers of the chaos suite (written by jobmesh.dev.chaos; hosted by every executor)."""
import msgspec

from jobmesh.sdk import Context, handler


class Echo(msgspec.Struct):
    n: int


class Echoed(msgspec.Struct):
    n: int


@handler("chaos.echo")
def echo(ask: Echo, ctx: Context) -> Echoed:
    return Echoed(n=ask.n)


@handler("chaos.fail")
def fail(ask: Echo, ctx: Context) -> Echoed:
    raise ValueError(f"chaos.fail {ask.n} fails by design")
'''


@dataclass(frozen=True)
class PlannedJob:
    """One job of the run: its idempotency key (so its id is known before the submit), kind and index."""

    key: str
    kind: str
    index: int


def plan(n: int, seed: int, run_tag: str) -> list[PlannedJob]:
    """``n`` jobs whose kinds follow ``MIX``, shuffled by ``seed``.

    Args:
        n: how many jobs.
        seed: the shuffle's seed (the same seed gives the same run).
        run_tag: prefix of every idempotency key (a fresh one per run).

    Returns:
        The jobs, in submission order.
    """
    kinds: list[str] = []
    for kind, share in zip(KINDS, MIX, strict=True):
        kinds.extend([kind] * (n * share // 100))
    kinds.extend(["noop"] * (n - len(kinds)))
    random.Random(seed).shuffle(kinds)
    return [PlannedJob(key=f"{run_tag}-{i}", kind=kind, index=i) for i, kind in enumerate(kinds)]


def _record(runs: str) -> str:
    return f'echo "$JOBMESH_JOB_ID $JOBMESH_ATTEMPT" >> {runs}'


def spec_of(job: PlannedJob, runs: str) -> JobSpec:
    """The job's spec: its runtime, a small reservation, a short lease and the retry policy.

    Args:
        job: the planned job.
        runs: the shared runs file (absolute path, writable by every attempt's uid).
    """
    if job.kind == "noop":
        runtime: NoopRuntime | ProcessRuntime | HandlerRuntime = NoopRuntime()
    elif job.kind == "ok":
        runtime = ProcessRuntime(argv=["sh", "-c", f"{_record(runs)}; sleep 0.2"])
    elif job.kind == "fail":
        runtime = ProcessRuntime(argv=["sh", "-c", f"{_record(runs)}; echo failing by design >&2; exit 3"])
    elif job.kind == "retry":
        runtime = ProcessRuntime(argv=["sh", "-c", f'{_record(runs)}; [ "$JOBMESH_ATTEMPT" -ge 2 ]'])
    elif job.kind in ("handler", "handler_fail"):
        name = "chaos.echo" if job.kind == "handler" else "chaos.fail"
        runtime = HandlerRuntime(handler=name, input={"n": job.index})
    else:
        raise ValueError(f"kind: unknown chaos job kind {job.kind!r}")
    retry_on = DISRUPTIONS + (["exit_code"] if job.kind == "retry" else [])
    # A process must reach the runs file: only process-level nodes (no sandbox) can.
    constraints = Constraints(labels=dict([RUNS_FILE_LABEL])) if isinstance(runtime, ProcessRuntime) else Constraints()
    return JobSpec(
        runtime=runtime,
        constraints=constraints,
        name=f"chaos-{job.kind}",
        resources=Resources(cpu_milli=100, memory_mb=0),
        timeouts=Timeouts(heartbeat=HEARTBEAT_TIMEOUT, run=120.0),
        retry=RetryPolicy(max_attempts=MAX_ATTEMPTS, backoff=0.5, backoff_max=2.0, retry_on=retry_on),
        metadata={"chaos_kind": job.kind},
    )


def submission_of(job: PlannedJob, runs: str) -> Submission:
    return Submission(spec=spec_of(job, runs), idempotency_key=job.key)


def records_runs(kind: str) -> bool:
    """Whether a job of ``kind`` writes a line to the runs file each time it runs."""
    return kind in ("ok", "fail", "retry")
