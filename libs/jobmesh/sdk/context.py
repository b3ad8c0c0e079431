"""What a running handler sees of its job: :class:`Context`.

The worker process builds one per job and passes it to handlers that ask for it. Progress,
heartbeats and follow-up submits go to the executor's pool through a :class:`ContextLink`;
``cancelled`` turns true when the pool is told the attempt must stop (cancel, drain, run
timeout). A Context built without a link (``Context(job_id="test")``) is for calling a
handler directly in a unit test: progress and heartbeats go nowhere, submits are refused.
"""

from __future__ import annotations

import asyncio
import math
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

import msgspec

from jobmesh.contract.messages.v1 import JobSpec

__all__ = ["Context", "ContextLink"]


class ContextLink(Protocol):
    """Where a Context's reports go (the worker's pipe to the pool)."""

    def progress(self, fraction: float, message: str) -> None:
        """Report the fraction done."""
        ...

    def heartbeat(self, checkpoint: str) -> None:
        """Report that the handler is alive, with a checkpoint when not empty."""
        ...

    def submit(self, spec_json: bytes, key: str) -> Future[str]:
        """Ask the pool to submit a job; the future holds its id or the refusal."""
        ...


class Context:
    """One job as its handler sees it.

    Args:
        job_id: the job.
        attempt: the attempt number (1 for the first).
        workdir: the attempt's working directory (also the handler's cwd while it runs,
            where the node's isolation lets the worker see it).
        checkpoint: the last checkpoint an earlier attempt of the job reported ("" for none).
        link: where reports go; None for a handler called outside a worker.
        cancelled: set when the attempt must stop; the context's own when omitted.
    """

    def __init__(
        self,
        job_id: str,
        attempt: int = 1,
        workdir: Path | None = None,
        checkpoint: str = "",
        link: ContextLink | None = None,
        cancelled: threading.Event | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.workdir = workdir if workdir is not None else Path.cwd()
        self.checkpoint = checkpoint
        self._link = link
        self._cancelled = cancelled if cancelled is not None else threading.Event()
        self._submits = 0

    @property
    def cancelled(self) -> bool:
        """Whether the attempt must stop (cancel, drain, run timeout): return soon.

        The pool kills the worker if the handler has not returned within its kill grace.
        """
        return self._cancelled.is_set()

    def progress(self, fraction: float, message: str = "") -> None:
        """Report how far the job is; ``jobmesh watch`` and ``status`` show the last report.

        Args:
            fraction: the fraction done, from 0 to 1.
            message: what it is doing.

        Raises:
            ValueError: ``fraction`` is not a number from 0 to 1.
        """
        if not isinstance(fraction, int | float) or math.isnan(fraction) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress fraction must be a number from 0 to 1, not {fraction!r}")
        if self._link is not None:
            self._link.progress(float(fraction), str(message))

    def heartbeat(self, checkpoint: str = "") -> None:
        """Say the handler is alive and, with ``checkpoint``, where a retry may start from.

        Args:
            checkpoint: text a later attempt finds in ``ctx.checkpoint`` ("" for none).
        """
        if self._link is not None:
            self._link.heartbeat(str(checkpoint))

    def submit(self, spec: JobSpec, *, key: str = "") -> str:
        """Submit a follow-up job and return its id once the cluster accepted it.

        The n-th submit of a job has the idempotency key ``<job id>.followup.<n>`` unless
        ``key`` is given, so a retried attempt that submits the same follow-ups in the same
        order does not submit them twice.

        Args:
            spec: the job to submit.
            key: its idempotency key; derived from the job and the submit's number when "".

        Returns:
            The follow-up's job id.

        Raises:
            jobmesh.errors.JobmeshError: the cluster refused it (the error names the field),
                or no trigger answered.
            RuntimeError: the context is not linked to an executor.
        """
        return self._submit(spec, key).result()

    async def submit_async(self, spec: JobSpec, *, key: str = "") -> str:
        """:meth:`submit` for async handlers: waits without blocking the event loop."""
        return await asyncio.wrap_future(self._submit(spec, key))

    def _submit(self, spec: JobSpec, key: str) -> Future[str]:
        if self._link is None:
            raise RuntimeError("this Context is not linked to an executor: it cannot submit jobs")
        if not isinstance(spec, JobSpec):
            raise TypeError(f"submit takes a JobSpec, not {type(spec).__name__}")
        self._submits += 1
        return self._link.submit(msgspec.json.encode(spec), key or f"{self.job_id}.followup.{self._submits}")
