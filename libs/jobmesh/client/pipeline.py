"""Pipelined submits: ``enqueue`` returns at once, and submits queued meanwhile travel
together, one ``api.submit`` request per batch (as Kafka's producer batches its sends).

A plain loop of ``await client.submit([...])`` waits a full request/reply and PubAck per
job. Here a submit is queued locally and answered by a :class:`JobHandle`; a background
task sends what has queued up, after a short linger for the first job of a batch, in one
request of at most ``max_batch`` jobs and ``max_bytes`` of JSON. While a request is out the
next batch fills, so a busy loop gets large batches and an idle one gets its job sent
after the linger.

- **The job id is known at once.** Each submission gets an idempotency key (the caller's,
  or a fresh random one) and its id derives from the key (``ids.job_id_for``), so a
  handle's ``job_id`` needs no answer. Awaiting the handle returns the id once the job is
  durably accepted, or raises: the durable-before-answered promise holds for whoever
  awaits it.
- **One request at a time, in order.** A job may wait for an earlier one (``after``); the
  trigger checks that the earlier job exists, so batches are sent one after the other and
  a later batch never overtakes an earlier one. (A job whose ``after`` names a job of an
  earlier batch relies on the tracker having recorded it, as with separate submits.)
- **A refusal reaches the job it is about.** The trigger refuses a request whole, naming
  ``jobs[i]...`` of the job at fault (nothing of the request is created). That job's
  handle gets the error, its field (and the path in its message) renamed to ``jobs[0]...``
  as if it had been submitted alone; queued jobs that wait for it (``after``) are refused
  with it, as they could never run; the rest is sent again (the same keys). A request
  too large for the trigger is split and sent again.
- **An error of the whole request** (no answer, NATS gone, JetStream overloaded while
  publishing) reaches every handle of that request. Some of its jobs may be durable all
  the same; a retryable error means "unknown": submit again with the handle's
  ``idempotency_key`` (never a new one), which names the same job.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any

from jobmesh.contract.codec import encode
from jobmesh.contract.ids import job_id_for, new_idempotency_key
from jobmesh.contract.messages.v1 import JobSpec, Submission, SubmitReply, SubmitRequest
from jobmesh.errors import InvalidMessage, JobmeshError, NotFound, Overloaded, OversizedMessage, Unavailable

MAX_BATCH = 250  # jobs per request: what the bulk benchmark found best (the contract allows 1000)
# JSON per request: under the trigger's default JOBMESH_MAX_MESSAGE_BYTES (256 KiB).
MAX_BYTES = 200_000
LINGER = 0.002  # seconds the first job of a batch waits for company
MAX_PENDING = 100_000  # submits queued and unanswered before enqueue refuses more
_JOB_FIELD = re.compile(r"^jobs\[(\d+)\]")

SubmitCall = Callable[[SubmitRequest], Awaitable[SubmitReply]]


@dataclass(slots=True)
class _Queued:
    submission: Submission
    future: asyncio.Future[str]
    size: int  # its JSON's length, for the request's byte budget


class JobHandle:
    """One queued submit: its job id at once, and its fate once the trigger answered.

    ``await handle`` returns the job id once the job is durable, or raises the error
    (naming ``jobs[0]...``) that kept it out, or that left its fate unknown (retryable).
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
        # Shielded: a caller that gives up waiting does not cancel the job's answer.
        return asyncio.shield(self._future).__await__()


class SubmitPipeline:
    """Coalesces submits into batched requests, one request in flight at a time.

    Args:
        send: sends one ``SubmitRequest`` and returns its reply (the client's request).
        max_batch: the most jobs in one request (1 to 1000).
        linger: seconds the first job of a batch waits for more before it is sent.
        max_bytes: the most JSON in one request (a job larger than this goes alone).
        max_pending: submits queued and unanswered before :meth:`submit` refuses more.
    """

    def __init__(
        self,
        send: SubmitCall,
        max_batch: int = MAX_BATCH,
        linger: float = LINGER,
        max_bytes: int = MAX_BYTES,
        max_pending: int = MAX_PENDING,
    ) -> None:
        if not 1 <= max_batch <= 1000:
            raise ValueError(f"max_batch must be 1 to 1000, not {max_batch}")
        self._send = send
        self._max_batch = max_batch
        self._linger = linger
        self._max_bytes = max_bytes
        self._max_pending = max_pending
        self._queue: deque[_Queued] = deque()
        self._unanswered: set[asyncio.Future[str]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def submit(self, job: JobSpec | Submission) -> JobHandle:
        """Queue ``job`` and return its handle at once (call it from the event loop).

        Raises:
            RuntimeError: the pipeline is closed.
            Overloaded: ``max_pending`` submits wait for an answer already (await some
                handles, or :meth:`flush`, first).
        """
        if self._closed:
            raise RuntimeError("the submit pipeline is closed")
        if len(self._unanswered) >= self._max_pending:
            raise Overloaded(f"{len(self._unanswered)} submits wait for an answer already; flush before adding more")
        submission = job if isinstance(job, Submission) else Submission(spec=job)
        if not submission.idempotency_key:
            submission = Submission(
                spec=submission.spec, idempotency_key=new_idempotency_key(), parent=submission.parent
            )
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(submission, future, len(encode(submission))))
        self._unanswered.add(future)
        future.add_done_callback(self._unanswered.discard)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return JobHandle(submission.idempotency_key, future)

    async def flush(self) -> None:
        """Return once every submit queued before this call has been answered (each handle
        says how); later submits are not waited for."""
        waiting = list(self._unanswered)
        if waiting:
            await asyncio.wait(waiting)

    async def close(self) -> None:
        """Refuse new submits, send what is queued, then stop the background task."""
        self._closed = True
        await self.flush()
        self._wake.set()
        if self._task is not None:
            await asyncio.wait([self._task])

    async def _run(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._closed:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if len(self._queue) < self._max_batch and self._linger > 0 and not self._closed:
                    await asyncio.sleep(self._linger)  # the linger: company for the first job (a deliberate sleep)
                await self._deliver(self._take())
        finally:
            # Only a cancel (the loop shutting down) gets here with work left: say so.
            stopped = Unavailable("the submit pipeline stopped before the trigger answered")
            while self._queue:
                _settle(self._queue.popleft().future, error=stopped)

    def _take(self) -> list[_Queued]:
        """The next batch: at most ``max_batch`` jobs and ``max_bytes``, at least one."""
        batch = [self._queue.popleft()]
        budget = self._max_bytes - batch[0].size
        while self._queue and len(batch) < self._max_batch and self._queue[0].size <= budget:
            budget -= self._queue[0].size
            batch.append(self._queue.popleft())
        return batch

    async def _deliver(self, batch: list[_Queued]) -> None:
        """Send ``batch`` until every job in it is answered."""
        try:
            await self._send_until_answered(batch)
        finally:
            # Whatever stopped this (a cancel, a bug), no handle of the batch is left hanging.
            stopped = Unavailable("the submit pipeline stopped before the trigger answered")
            for queued in batch:
                _settle(queued.future, error=stopped)

    async def _send_until_answered(self, batch: list[_Queued]) -> None:
        while batch:
            try:
                reply = await self._send(SubmitRequest(jobs=[q.submission for q in batch]))
            except OversizedMessage as exc:
                if len(batch) == 1:
                    _settle(batch[0].future, error=_as_alone(exc, 0))
                    return
                half = len(batch) // 2  # nothing of a refused request was created: halves go again
                await self._send_until_answered(batch[:half])
                batch = batch[half:]
                continue
            except JobmeshError as exc:
                at = _job_index(exc.field, len(batch))
                if at is None:
                    for queued in batch:
                        _settle(queued.future, error=exc)
                    return
                refused = batch.pop(at)
                _settle(refused.future, error=_as_alone(exc, at))
                batch = self._refuse_dependents(refused, exc, batch)
                continue
            except Exception as exc:  # noqa: BLE001 - whatever broke the request is every caller's answer
                for queued in batch:
                    _settle(queued.future, error=exc)
                return
            if len(reply.job_ids) != len(batch):
                wrong = InvalidMessage(f"the trigger answered {len(reply.job_ids)} job ids for {len(batch)} jobs")
                for queued in batch:
                    _settle(queued.future, error=wrong)
                return
            for queued, job_id in zip(batch, reply.job_ids, strict=True):
                _settle(queued.future, job_id=job_id)
            return

    def _refuse_dependents(self, refused: _Queued, exc: JobmeshError, batch: list[_Queued]) -> list[_Queued]:
        """Refuse the jobs of ``batch`` and of the queue that wait for a refused job (or
        for one refused so), as the trigger would once it found no such job; returns the
        rest of ``batch``."""
        gone = {job_id_for(refused.submission.idempotency_key)}
        why = f"it was refused ({exc.code}: {exc})"

        def waits(queued: _Queued) -> bool:
            for k, dep in enumerate(queued.submission.spec.after):
                if dep.job_id in gone:
                    field = f"jobs[0].spec.after[{k}].job_id"
                    message = f"the job it waits for, {dep.job_id}, will not run: {why} - at `$.{field}`"
                    _settle(queued.future, error=NotFound(message, field=field))
                    gone.add(job_id_for(queued.submission.idempotency_key))
                    return True
            return False

        kept = [q for q in batch if not waits(q)]
        if any(q.submission.spec.after for q in self._queue):
            self._queue = deque(q for q in self._queue if not waits(q))
        return kept


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
    """``exc`` as the job's own submit would have raised it: the field and the path in the
    message say ``jobs[0]``, not its place in the batch (other words of the message, such
    as a dependency cycle's partner, still name positions in the batch)."""
    own = f"jobs[{at}]"
    field = "jobs[0]" + (exc.field or "")[len(own) :] if exc.field else None
    message = str(exc).replace(f"`$.{own}", "`$.jobs[0]")
    return JobmeshError.from_wire(exc.code, message, field or "", exc.retryable)
