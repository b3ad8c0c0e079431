"""How an attempt ended, and the terminal event that reports it.

An :class:`Outcome` is what the runner (or the attempt around it) decided; the failure codes
here are the stable ``JobFailed.error.code`` values the scheduler's retry policy matches on,
each typed against the contract's :data:`~jobmesh.contract.messages.v1.jobs.FailureCode`, so
a code the contract does not declare is a type error.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from jobmesh.contract import subjects
from jobmesh.contract.ids import member_event_id
from jobmesh.contract.messages.v1 import JobBound, JobError, JobFailed, JobSucceeded, MemberSucceeded, NoopRuntime
from jobmesh.contract.messages.v1.jobs import FailureCode
from jobmesh.runtime.publisher import Outgoing
from jobmesh.runtime.tracing import Context

EXIT_CODE: FailureCode = "exit_code"
TIMEOUT: FailureCode = "timeout"
SPAWN_FAILED: FailureCode = "spawn_failed"
WORKDIR_FAILED: FailureCode = "workdir_failed"
NODE_DRAINED: FailureCode = "node_drained"
EXECUTOR_ERROR: FailureCode = "executor_error"
DISK_QUOTA: FailureCode = "disk_quota_exceeded"
RESULT_TOO_LARGE: FailureCode = "result_too_large"
CANCELLED: FailureCode = "cancelled"
SUPERSEDED: FailureCode = "superseded"
PREEMPTED: FailureCode = "preempted"
OOM: FailureCode = "oom"
PIDS_EXCEEDED: FailureCode = "pids_exceeded"
ISOLATION_REFUSED: FailureCode = "isolation_refused"
HANDLER_MISSING: FailureCode = "handler_missing"
INPUT_INVALID: FailureCode = "input_invalid"  # a workflow step's templates cannot be filled
# What a process that ran into a cgroup limit ends with: the cgroup's verdict replaces these.
_LIMIT_MAY_EXPLAIN = frozenset({EXIT_CODE, PIDS_EXCEEDED})
# What an executor reports at an attempt's end on this node.
AttemptEnd = JobSucceeded | MemberSucceeded | JobFailed


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended: ``error`` is None exactly when it succeeded.

    Attributes:
        result: the result file's text, when it travels inline.
        result_ref: else its key in the object store ``jm_results``.
        result_bytes: the result file's size (0 without one).
    """

    exit_code: int | None
    error: JobError | None
    output_tail: str = ""
    result: str = ""
    result_ref: str = ""
    result_bytes: int = 0


def failed_outcome(code: FailureCode, message: str, exit_code: int | None = None, output_tail: str = "") -> Outcome:
    """A failed outcome with one of the contract's failure codes.

    Args:
        code: why it failed.
        message: the human explanation that goes with the code.
        exit_code: the process's exit code if it exited on its own, else None.
        output_tail: the last output of the attempt.

    Returns:
        The outcome.
    """
    return Outcome(exit_code, JobError(code=code, message=message), output_tail)


def exit_outcome(returncode: int, output_tail: str = "") -> Outcome:
    """The outcome of a process that ended on its own.

    Args:
        returncode: its exit code; negative when a signal killed it.
        output_tail: the last output of the attempt.

    Returns:
        Success for 0, else an ``exit_code`` failure naming the code or the signal.
    """
    if returncode == 0:
        return Outcome(0, None, output_tail)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        message = f"killed by {name} (exit code {returncode})"
    else:
        message = f"exited with code {returncode}"
    return failed_outcome(EXIT_CODE, message, returncode, output_tail)


def limit_outcome(outcome: Outcome, oom_kills: int, pids_refused: int, memory_mb: int, pids_max: int) -> Outcome:
    """The outcome of a process once its cgroup said whether it ran into a limit.

    A failed process (its own exit code or a kill) that the OOM killer struck ended
    ``oom``; one that a fork was refused to ended ``pids_exceeded``. A success stays a
    success (the job handled the refusal), and so do stops for another reason (timeout,
    cancel, drain).

    Args:
        outcome: what the process itself did.
        oom_kills: processes of the attempt the OOM killer killed.
        pids_refused: forks refused at the pids limit.
        memory_mb: its memory limit, for the message.
        pids_max: its pids limit, for the message.

    Returns:
        The outcome to report.
    """
    if outcome.error is None or outcome.error.code not in _LIMIT_MAY_EXPLAIN:
        return outcome
    if oom_kills:
        message = f"ran out of memory: the OOM killer ended it at its limit of {memory_mb} MiB"
        return failed_outcome(OOM, message, outcome.exit_code, outcome.output_tail)
    if pids_refused and outcome.error.code != PIDS_EXCEEDED:
        message = f"started more processes than its limit of {pids_max} (JOBMESH_ATTEMPT_PIDS_MAX)"
        return failed_outcome(PIDS_EXCEEDED, message, outcome.exit_code, outcome.output_tail)
    return outcome


# How a process that ran into RLIMIT_CPU ends: SIGXCPU at the soft limit, SIGKILL at the
# hard one (when it caught or ignored SIGXCPU). A shell or bubblewrap between the executor
# and the process reports a signalled child as its own exit code 128 + the signal.
_SIGNAL_EXIT_BASE = 128


def cpu_limit_outcome(outcome: Outcome, soft: int, hard: int, elapsed: float, cpus: int) -> Outcome:
    """The outcome of a process once it is known whether it ran into its CPU-time limit.

    A failed process (``exit_code``) that died of SIGXCPU (-24, or 152 through a shell or
    the sandbox) reached RLIMIT_CPU's soft limit, and one that died of SIGKILL (-9 or 137)
    the hard one, if it could have: CPU time grows at most ``cpus`` times as fast
    as wall time, so one that ended sooner was killed by something else (the OOM killer,
    an operator). Either is a ``timeout``: the job ran out of time, counted in CPU
    seconds. Anything else stays as it is.

    Args:
        outcome: what the process itself did (after its cgroup's verdict, which wins).
        soft: the attempt's RLIMIT_CPU soft limit, in seconds.
        hard: its hard limit.
        elapsed: wall-clock seconds the process ran.
        cpus: the node's cores.

    Returns:
        The outcome to report.
    """
    code = outcome.exit_code
    if outcome.error is None or outcome.error.code != EXIT_CODE or code is None:
        return outcome
    signalled = -code if code < 0 else code - _SIGNAL_EXIT_BASE if code > _SIGNAL_EXIT_BASE else 0
    if signalled == signal.SIGXCPU and elapsed * max(cpus, 1) >= soft:
        # Anyone may send SIGXCPU (or exit 152); only a process that could have used its
        # soft limit by now is taken to have reached it.
        message = f"reached its CPU-time limit (RLIMIT_CPU, {soft}s of CPU time across its threads)"
    elif signalled == signal.SIGKILL and elapsed * max(cpus, 1) >= hard:
        message = f"reached its hard CPU-time limit (RLIMIT_CPU, {hard}s of CPU time across its threads)"
    else:
        return outcome
    how = "killed by SIGXCPU" if signalled == signal.SIGXCPU else "killed by SIGKILL"
    return failed_outcome(TIMEOUT, f"{message}: {how} (exit code {code})", code, outcome.output_tail)


def noop_outcome(runtime: NoopRuntime) -> Outcome:
    """The outcome of a no-op attempt.

    Args:
        runtime: the no-op runtime, with the exit code it asked for.

    Returns:
        The outcome of a process that exited with that code.
    """
    return exit_outcome(runtime.exit_code)


def end_kind(outcome: Outcome, world_size: int) -> str:
    """The subject kind of the event that reports ``outcome``.

    Args:
        outcome: how the attempt ended.
        world_size: its gang's size (``JobBound.world_size``; 1 for a plain job).

    Returns:
        ``failed`` for a failure; for a success ``member_succeeded`` when the attempt is a
        gang member (the scheduler ends the job once every member has succeeded), else
        ``succeeded``.
    """
    if outcome.error is not None:
        return subjects.FAILED
    return subjects.MEMBER_SUCCEEDED if world_size > 1 else subjects.SUCCEEDED


def terminal_message(
    bound: JobBound,
    node_id: str,
    outcome: Outcome,
    started_at: float,
    at: float,
    context: Context | None,
    checkpoint: str = "",
) -> Outgoing:
    """The terminal event of an attempt, addressed and with its deterministic message id.

    Args:
        bound: the dispatch message of the attempt.
        node_id: this node.
        outcome: how the attempt ended.
        started_at: when the executor started it (0 when it never started).
        at: when it ended.
        context: the trace context the event carries.
        checkpoint: the attempt's last checkpoint (a failure carries it to the next attempt).

    Returns:
        The Succeeded, MemberSucceeded or Failed event, ready for the reporter; its id is
        the member's own (the members of a gang share job and attempt).
    """
    kind = end_kind(outcome, bound.world_size)
    return Outgoing(
        subjects.node_event(bound.partition, kind, node_id),
        terminal_event(bound, node_id, outcome, started_at, at, checkpoint),
        member_event_id(bound.job_id, bound.attempt, kind, bound.rank),
        context,
    )


def terminal_event(
    bound: JobBound, node_id: str, outcome: Outcome, started_at: float, at: float, checkpoint: str = ""
) -> AttemptEnd:
    """The event reporting ``outcome`` (:func:`end_kind` says which).

    Args:
        bound: the dispatch message of the attempt.
        node_id: this node.
        outcome: how the attempt ended.
        started_at: when the executor started it.
        at: when it ended.
        checkpoint: the attempt's last checkpoint, carried by a failure.

    Returns:
        JobSucceeded when ``outcome`` has no error (with the job's queue, name and
        metadata, which completion rules filter on), MemberSucceeded instead for a gang
        member, else JobFailed (with the member's rank).
    """
    if outcome.error is not None:
        return JobFailed(
            job_id=bound.job_id,
            attempt=bound.attempt,
            partition=bound.partition,
            node_id=node_id,
            exit_code=outcome.exit_code,
            error=outcome.error,
            output_tail=outcome.output_tail,
            submitted_at=bound.submitted_at,
            started_at=started_at,
            at=at,
            checkpoint=checkpoint,
            rank=bound.rank,
            world_size=bound.world_size,
        )
    if end_kind(outcome, bound.world_size) == subjects.MEMBER_SUCCEEDED:
        return MemberSucceeded(
            job_id=bound.job_id,
            attempt=bound.attempt,
            partition=bound.partition,
            node_id=node_id,
            rank=bound.rank,
            world_size=bound.world_size,
            exit_code=outcome.exit_code or 0,
            output_tail=outcome.output_tail,
            started_at=started_at,
            at=at,
            result=outcome.result,
            result_ref=outcome.result_ref,
            result_bytes=outcome.result_bytes,
        )
    return JobSucceeded(
        job_id=bound.job_id,
        attempt=bound.attempt,
        partition=bound.partition,
        node_id=node_id,
        exit_code=outcome.exit_code or 0,
        output_tail=outcome.output_tail,
        submitted_at=bound.submitted_at,
        started_at=started_at,
        at=at,
        result=outcome.result,
        result_ref=outcome.result_ref,
        result_bytes=outcome.result_bytes,
        # The spec's own str and dict, not copies: the event is frozen and encoded once.
        queue=bound.spec.queue,
        name=bound.spec.name,
        metadata=bound.spec.metadata,
    )


def end_kind_of(event: AttemptEnd) -> str:
    """The subject kind of an attempt's end event (a kept one, published again)."""
    if isinstance(event, JobFailed):
        return subjects.FAILED
    return subjects.MEMBER_SUCCEEDED if isinstance(event, MemberSucceeded) else subjects.SUCCEEDED
