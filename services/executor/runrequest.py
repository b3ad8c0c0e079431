"""What every runtime's runner gets for one attempt, and what it must give back.

An :class:`~jobmesh.executor.attempts.Attempt` prepares the attempt (working directory,
files, secrets, stdin, environment) and then hands a :class:`RunRequest` to the runner of the
job's runtime: :class:`~jobmesh.executor.runner.ProcessRunner` for processes, the handler
pool for handlers, the container runner for containers. Each returns an
:class:`~jobmesh.executor.outcomes.Outcome`. Output lines the runner hands to ``on_line``
are masked (secrets) and published by the attempt; a runner never publishes itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from jobmesh.contract.messages.v1 import JobRuntime, ParentRef, Resources
from jobmesh.executor.outcomes import Outcome
from jobmesh.executor.runner import AbortSignal, LineSink


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One attempt, ready to run.

    Attributes:
        job_id: the job.
        attempt: the attempt number.
        name: how log lines name it (``job <id> attempt <n>``).
        runtime: the job's runtime (the runner's own kind).
        workdir: its fresh working directory, already holding the job's input files.
        env: the complete environment of a process or container (cleared, allow-listed,
            the job's own variables, secrets as variables when asked, jobmesh's variables).
        timeout: the run timeout in seconds.
        abort: set when the attempt must stop now (cancel, drain, quota, total timeout).
        on_line: awaited with (``"stdout"``/``"stderr"``, line) for each output line.
        resources: what the attempt reserved (cgroup limits are set from it).
        network: whether the job may reach the network.
        stdin: a file holding what the job reads on stdin; None: /dev/null.
        secrets_dir: a directory of the job's secret files (mode 0400, owned by the job's
            uid) when it asked for them as files; a sandbox binds it at /run/secrets.
        gpu_devices: the node's GPU indices reserved for the attempt.
        uid: the uid of the attempt's own it runs as (the working directory, stdin and
            secrets are already its own); None: the node's sandbox uid (or the executor's).
        gid: likewise its gid.
        checkpoint: the checkpoint an earlier attempt reported ("" for none).
        on_progress: called with (fraction 0..1, message) when the job reports progress.
        on_checkpoint: called with a checkpoint the job reports.
        pass_fds: descriptors a process inherits under the same numbers (the progress pipe).
        on_spawned: awaited once the process started, or failed to start.
        parent: the attempt's job as the parent of the jobs its handler submits, when it is
            a workflow step (their dependents wait for them too); None otherwise.
    """

    job_id: str
    attempt: int
    name: str
    runtime: JobRuntime
    workdir: Path
    env: Mapping[str, str]
    timeout: float
    abort: AbortSignal
    on_line: LineSink
    resources: Resources = field(default_factory=Resources)
    network: bool = False
    stdin: Path | None = None
    secrets_dir: Path | None = None
    gpu_devices: tuple[int, ...] = ()
    uid: int | None = None
    gid: int | None = None
    checkpoint: str = ""
    on_progress: Callable[[float, str], None] | None = None
    on_checkpoint: Callable[[str], None] | None = None
    pass_fds: tuple[int, ...] = ()
    on_spawned: Callable[[], Awaitable[None]] | None = None
    parent: ParentRef | None = None


class Runner(Protocol):
    """Runs one kind of runtime."""

    async def run(self, request: RunRequest) -> Outcome:
        """Run the attempt to its end and say how it ended; never raises for the job's own failure."""
        ...
