"""Pipelined submits: ``enqueue`` returns at once, and submits queued meanwhile travel
together, one ``api.submit`` request per batch (as Kafka's producer batches its sends).

A plain loop of ``await client.submit([...])`` waits a full request/reply and PubAck per
job. Here a submit is queued locally and answered by a :class:`JobHandle`; a background
task sends what has queued up, after a short linger for the first job of a batch, in one
request of at most ``max_batch`` jobs. While a request is out the next batch fills, so a
busy loop gets large batches and an idle one gets its job sent after the linger.

- **The job id is known at once.** Each submission gets an idempotency key (the caller's,
  or a fresh random one) and its id derives from the key (``ids.job_id_for``), so a
  handle's ``job_id`` needs no answer. Awaiting the handle returns the id once the job is
  durably accepted, or raises why it was not: the durable-before-answered promise holds
  for whoever awaits it.
- **One request at a time, in order.** A job may wait for an earlier one (``after``); the
  trigger checks that the earlier job exists, so batches are sent one after the other and
  a later batch never overtakes an earlier one.
- **Errors reach the submit that made them.** The trigger refuses a request whole,
  naming ``jobs[i]...`` of the job at fault. That job's handle gets the error, its field
  renamed to ``jobs[0]...`` as if it had been submitted alone, and the rest of the batch
  is sent again without it (the same keys: nothing is accepted twice). An error of the
  whole request (no answer, a refused key) goes to every handle of that request.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from jobmesh.contract.ids import job_id_for, new_idempotency_key
from jobmesh.contract.messages.v1 import JobSpec, Submission, SubmitReply, SubmitRequest
from jobmesh.errors import JobmeshError

MAX_BATCH = 250  # jobs per request: what the bulk benchmark found best (the contract allows 1000)
LINGER = 0.002  # seconds the first job of a batch waits for company
_JOB_FIELD = re.compile(r"^jobs\[(\d+)\]")

SubmitCall = Callable[[SubmitRequest], Awaitable[SubmitReply]]


class JobHandle:
    """One queued submit: its job id at once, and its fate once the trigger answered.

    ``await handle`` returns the job id once the job is durable, or raises the error
    (naming ``jobs[0]...``) that kept it out.
    """

    __slots__ = ("_future", "idempotency_key", "job_id")

    def __init__(self, idempotency_key: str, future: asyncio.Future[str]) -> None:
        self.idempotency_key = idempotency_key
        self.job_id = job_id_for(idempotency_key)
        self._future = future

    def done(self) -> bool:
        """True once the trigger answered for this job (accepted or refused)."""
        return self._future.done()

    @property
    def error(self) -> BaseException | None:
        """Why the job was refused; None while pending or when it was accepted."""
        if not self._future.done() or self._future.cancelled():
            return None
        return self._future.exception()

    def __await__(self) -> Generator[Any, None, str]:
        return asyncio.shield(self._future).__await__()


class SubmitPipeline:
    """Coalesces submits into batched requests, one request in flight at a time.

    Args:
        send: sends one ``SubmitRequest`` and returns its reply (``Client.submit_request``).
        max_batch: the most jobs in one request (1 to 1000).
        linger: seconds the first job of a batch waits for more before it is sent.
    """

    def __init__(self, send: SubmitCall, max_batch: int = MAX_BATCH, linger: float = LINGER) -> None:
        if not 1 <= max_batch <= 1000:
            raise ValueError(f"max_batch must be 1 to 1000, not {max_batch}")
        self._send = send
        self._max_batch = max_batch
        self._linger = linger
        self._queue: list[tuple[Submission, asyncio.Future[str]]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def submit(self, job: JobSpec | Submission) -> JobHandle:
        """Queue ``job`` and return its handle at once (call it from the event loop)."""
        if self._closed:
            raise RuntimeError("the submit pipeline is closed")
        submission = job if isinstance(job, Submission) else Submission(spec=job)
        if not submission.idempotency_key:
            submission = Submission(
                spec=submission.spec, idempotency_key=new_idempotency_key(), parent=submission.parent
            )
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append((submission, future))
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return JobHandle(submission.idempotency_key, future)

    async def flush(self) -> None:
        """Return once every submit queued so far has been answered (each handle says how)."""
        await self._idle.wait()

    async def close(self) -> None:
        """Flush, then stop the background task; later submits are refused."""
        await self.flush()
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._queue) < self._max_batch and self._linger > 0:
                await asyncio.sleep(self._linger)  # the linger: company for the first job (a deliberate sleep)
            batch = self._queue[: self._max_batch]
            del self._queue[: len(batch)]
            await self._deliver(batch)

    async def _deliver(self, batch: list[tuple[Submission, asyncio.Future[str]]]) -> None:
        """Send ``batch``; on a refusal of one job, answer it and send the others again."""
        while batch:
            try:
                reply = await self._send(SubmitRequest(jobs=[s for s, _ in batch]))
            except JobmeshError as exc:
                at = _job_index(exc.field, len(batch))
                if at is None:
                    for _, future in batch:
                        _settle(future, error=exc)
                    return
                _settle(batch[at][1], error=_as_alone(exc, at))
                del batch[at]
                continue
            except Exception as exc:  # noqa: BLE001 - whatever broke the request is every caller's answer
                for _, future in batch:
                    _settle(future, error=exc)
                return
            for (_, future), job_id in zip(batch, reply.job_ids, strict=True):
                _settle(future, job_id=job_id)
            return


def _settle(future: asyncio.Future[str], *, job_id: str = "", error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
        # A handle nobody awaits must not make asyncio log "exception was never retrieved".
        future.exception()
    else:
        future.set_result(job_id)


def _job_index(field: str | None, size: int) -> int | None:
    """The batch index an error's field names (``jobs[3].spec.x`` -> 3), if any."""
    m = _JOB_FIELD.match(field or "")
    if m is None:
        return None
    at = int(m.group(1))
    return at if at < size else None


def _as_alone(exc: JobmeshError, at: int) -> JobmeshError:
    """``exc`` as the job's own submit would have raised it: ``jobs[0]...``, not its place
    in somebody's batch."""
    own = f"jobs[{at}]"
    field = "jobs[0]" + (exc.field or "")[len(own) :]
    message = str(exc).replace(own, "jobs[0]")
    return JobmeshError.from_wire(exc.code, message, field, exc.retryable)
