"""The tracker's handlers: lifecycle batches in, rows and watch updates out; queries answered.

``EventsHandler`` serves both durable consumers (job lifecycle and dispatch). A batch is
folded (``fold.py``, pure) and written in one transaction of one statement
(``store.py``). Only after the commit does the runtime ack the batch and are the watch
updates announced, so a watcher never sees a state the database does not hold.
"""

from __future__ import annotations

import logging

import nats.errors
from nats.aio.client import Client as NATS

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import JobGetRequest, JobListReply, JobListRequest, JobUpdate, JobView
from jobmesh.errors import NotFound
from jobmesh.runtime.db import translated
from jobmesh.runtime.service import Envelope
from jobmesh.runtime.tracing import Context, Tracing
from jobmesh.tracker.fold import fold, updates
from jobmesh.tracker.metrics import TrackerMetrics
from jobmesh.tracker.store import Store

log = logging.getLogger("jobmesh.tracker")


class EventsHandler:
    """Records lifecycle events; the batch handler behind both tracker consumers.

    Args:
        store: the tracker's tables.
        nc: the NATS connection watch updates are published on (core NATS, no ack).
        tracing: writes each update's trace context into its headers (carry-only when
            omitted).
        metrics: the tracker's instruments (the global meter's when omitted).
    """

    def __init__(
        self, store: Store, nc: NATS, tracing: Tracing | None = None, metrics: TrackerMetrics | None = None
    ) -> None:
        self._metrics = metrics or TrackerMetrics()
        self._store = store
        self._nc = nc
        self._inject = (tracing or Tracing.off()).inject

    async def __call__(self, envelopes: list[Envelope]) -> None:
        """Record a batch; return (ack all) once committed.

        Raises:
            Unstorable: Postgres refused a value; the runtime then records the batch one
                event at a time, so only the event that holds it is dead-lettered.
            Unavailable: Postgres did not answer; the runtime redelivers with backoff.
            Conflict: Postgres aborted the transaction (deadlock, serialization); retried.
        """
        folded = fold([env.message for env in envelopes])
        async with translated("recording a batch"):
            stored = await self._store.write(folded)
        changes = updates(folded, stored)
        self._metrics.announced(changes)
        await self._announce(changes, envelopes)

    async def _announce(self, changes: list[JobUpdate], envelopes: list[Envelope]) -> None:
        if not changes:
            return
        # Each update continues the trace of the last message that touched its job.
        contexts: dict[str, Context] = {env.message.job_id: env.context for env in envelopes}
        for update in changes:
            headers = self._inject({}, contexts.get(update.job_id))
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
        async with translated("reading a job"):
            view, known = await self._store.get(request.job_id)
        if view is None:
            if known:
                raise NotFound(
                    f"job {request.job_id} has events but its submission is not recorded yet", field="job_id"
                )
            raise NotFound(f"job {request.job_id} is not known", field="job_id")
        return view

    async def list(self, env: Envelope) -> JobListReply:
        """Recent jobs, newest first, optionally filtered by state and queue; or one workflow
        run's jobs, in submission order.

        Raises:
            Unavailable: Postgres did not answer.
        """
        request: JobListRequest = env.message
        async with translated("listing jobs"):
            states = request.states or ([request.state] if request.state else [])
            jobs = await self._store.list(request.limit, states, request.queue, request.workflow, request.offset)
        return JobListReply(jobs=jobs)
