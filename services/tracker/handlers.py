"""The tracker's handlers: lifecycle batches in, rows and watch updates out; queries answered.

``EventsHandler`` serves both durable consumers (job lifecycle and dispatch). A batch is
folded (``fold.py``, pure) and written in one transaction of one statement
(``store.py``). Only after the commit does the runtime ack the batch and are the watch
updates announced, so a watcher never sees a state the database does not hold.
"""

from __future__ import annotations

import logging
from typing import Sequence

import asyncpg
import nats.errors
from nats.aio.client import Client as NATS

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.errors import Conflict, NotFound, Unavailable
from jobmesh.contract.messages.v1 import JobGetRequest, JobListReply, JobListRequest, JobUpdate, JobView, LifecycleEvent
from jobmesh.runtime.outcomes import ACK, Outcome, Reject
from jobmesh.runtime.service import Envelope
from jobmesh.runtime.tracing import Context, inject
from jobmesh.tracker.fold import fold, updates
from jobmesh.tracker.store import Store

log = logging.getLogger("jobmesh.tracker")

# Errors that come from the data, not from the database being away: retrying the same
# batch would fail the same way. asyncpg reports a value it cannot encode (an int beyond
# int4, say) with a client-side DataError that it does not export under a public name.
_UNSTORABLE = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.exceptions._base.DataError,
)
# Everything else Postgres or the link to it can raise: worth a retry later.
_UNAVAILABLE = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def _unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(f"Postgres: {type(exc).__name__}: {exc}")


class EventsHandler:
    """Records lifecycle events; the batch handler behind both tracker consumers.

    Args:
        store: the tracker's tables.
        nc: the NATS connection watch updates are published on (core NATS, no ack).
    """

    def __init__(self, store: Store, nc: NATS) -> None:
        self._store = store
        self._nc = nc

    async def __call__(self, envelopes: list[Envelope]) -> Sequence[Outcome] | None:
        """Record a batch; ``None`` (ack all) once committed.

        Returns:
            None when the whole batch is recorded; one outcome per envelope when the batch
            was refused for its content and had to be recorded event by event.

        Raises:
            Unavailable: Postgres did not answer; the runtime redelivers with backoff.
            Conflict: Postgres aborted the transaction (deadlock, serialization); retried.
        """
        try:
            changes = await self._record([env.message for env in envelopes])
        except _UNSTORABLE as exc:
            if len(envelopes) == 1:
                log.error("cannot record %s", envelopes[0].subject, exc_info=True)
                return [Reject("unstorable", f"{type(exc).__name__}: {exc}")]
            # One bad event must not hold back the others: find it by recording them one
            # at a time (slow, but only after a batch was refused for its content).
            log.warning("a batch of %d was refused (%s); recording its events one by one", len(envelopes), exc)
            outcomes: list[Outcome] = []
            for env in envelopes:
                outcomes.extend(await self([env]) or [ACK])
            return outcomes
        await self._announce(changes, envelopes)
        return None

    async def _record(self, events: list[LifecycleEvent]) -> list[JobUpdate]:
        folded = fold(events)
        try:
            stored = await self._store.write(folded)
        except _UNSTORABLE:
            raise
        except asyncpg.TransactionRollbackError as exc:
            raise Conflict(f"transaction aborted, will retry: {exc}") from exc
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        return updates(folded, stored)

    async def _announce(self, changes: list[JobUpdate], envelopes: list[Envelope]) -> None:
        if not changes:
            return
        # Each update continues the trace of the last message that touched its job.
        contexts: dict[str, Context] = {env.message.job_id: env.context for env in envelopes}
        for update in changes:
            headers = inject({}, contexts.get(update.job_id))
            try:
                # Core NATS: buffered, no ack, so watchers never hold up the batch. A lost
                # update is acceptable by design: ``get`` is the truth and watchers re-read it.
                await self._nc.publish(subjects.job_watch(update.job_id), encode(update), headers=headers)
            except nats.errors.Error:
                log.warning("could not announce %s for job %s", update.state, update.job_id, exc_info=True)


class QueryHandler:
    """Answers ``jobs.get`` and ``jobs.list`` from the tracker's tables.

    Args:
        store: the tracker's tables.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    async def get(self, env: Envelope) -> JobView:
        """One job with its attempts and events.

        Raises:
            NotFound: the tracker has recorded nothing that describes the job.
            Unavailable: Postgres did not answer.
        """
        request: JobGetRequest = env.message
        try:
            view, known = await self._store.get(request.job_id)
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        if view is None:
            if known:
                raise NotFound(
                    f"job {request.job_id} has events but its submission is not recorded yet", field="job_id"
                )
            raise NotFound(f"job {request.job_id} is not known", field="job_id")
        return view

    async def list(self, env: Envelope) -> JobListReply:
        """Recent jobs, newest first, optionally filtered by state and queue.

        Raises:
            Unavailable: Postgres did not answer.
        """
        request: JobListRequest = env.message
        try:
            jobs = await self._store.list(request.limit, request.state, request.queue)
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc
        return JobListReply(jobs=jobs)
