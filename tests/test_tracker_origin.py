"""The tracker keeps the origin of a triggered job (``JobSubmitted.origin``) and shows it in
the job's view: the fold's gap-filling rule, and the same rule in the store's SQL, on a
real Postgres (including a database whose jobs table predates the origin column)."""

from __future__ import annotations

import itertools
import uuid

import asyncpg
import pytest

from jobmesh.contract.messages.v1 import JobReady, JobSpec, JobStarted, JobSubmitted, NoopRuntime
from jobmesh.contract.messages.v1.triggers import JobOrigin
from jobmesh.runtime.db import connect_pool
from jobmesh.tracker.fold import fold
from jobmesh.tracker.store import DDL, Store

T0 = 1_700_000_000.0
SPEC = JobSpec(runtime=NoopRuntime(), name="thumbnail", queue="media", metadata={"team": "img"})
ORIGIN = JobOrigin(
    kind="event", rule="thumbnails", version=3, event="JM_EVENTS:42", subject="jobmesh.v1.events.upload", at=T0
)


def submitted(job: str, origin: JobOrigin | None = ORIGIN) -> JobSubmitted:
    return JobSubmitted(job_id=job, partition=0, spec=SPEC, idempotency_key=job, submitted_at=T0, origin=origin)


def ready(job: str) -> JobReady:
    # JobReady brings the spec too, but never the origin.
    return JobReady(job_id=job, attempt=1, partition=0, spec=SPEC, candidates=["n1"], submitted_at=T0, ready_at=T0 + 1)


def started(job: str) -> JobStarted:
    return JobStarted(job_id=job, attempt=1, partition=0, node_id="n1", at=T0 + 2)


# --- the fold ------------------------------------------------------------------------


def test_the_origin_of_a_submit_is_kept_in_any_order() -> None:
    for order in itertools.permutations([submitted("j1"), ready("j1"), started("j1")]):
        [job] = fold(order).jobs
        assert job.origin == ORIGIN, order
        assert job.spec == SPEC and job.current.state == "running"


def test_a_plain_submit_has_no_origin_and_a_redelivery_does_not_clear_one() -> None:
    [plain] = fold([submitted("j1", origin=None), ready("j1")]).jobs
    assert plain.origin is None
    # The same job id submitted again without an origin (a replay) keeps the first one's.
    [job] = fold([submitted("j2"), submitted("j2", origin=None)]).jobs
    assert job.origin == ORIGIN


def test_the_submitted_event_names_the_rule_in_the_history() -> None:
    [row] = fold([submitted("j1")]).events
    assert row.kind == "submitted" and row.detail.endswith(", from event thumbnails")
    [plain] = fold([submitted("j2", origin=None)]).events
    assert "from" not in plain.detail


# --- the store -----------------------------------------------------------------------


@pytest.fixture
async def schema(database_url):
    """A fresh tracker schema of its own, dropped afterwards."""
    name = f"tracker_origin_{uuid.uuid4().hex[:8]}"
    yield name
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.mark.integration
async def test_the_view_shows_the_origin_whichever_batch_brings_it(database_url, schema) -> None:
    pool = await connect_pool(database_url, schema, DDL)
    try:
        store = Store(pool)
        job, plain = uuid.uuid4().hex, uuid.uuid4().hex
        # The row exists (spec and all, from JobReady) before the submit with the origin
        # arrives in a later batch; a third batch without it must not clear it.
        await store.write(fold([ready(job), started(job)]))
        view, _ = await store.get(job)
        assert view is not None and view.origin is None
        await store.write(fold([submitted(job)]))
        await store.write(fold([submitted(job, origin=None), started(job)]))
        view, _ = await store.get(job)
        assert view is not None
        assert view.origin == ORIGIN and view.state == "running"
        # A plain submit shows none.
        await store.write(fold([submitted(plain, origin=None)]))
        view, _ = await store.get(plain)
        assert view is not None and view.origin is None
    finally:
        await pool.close()


@pytest.mark.integration
async def test_a_jobs_table_without_the_origin_column_gets_it(database_url, schema) -> None:
    old = uuid.uuid4().hex
    pool = await connect_pool(database_url, schema, DDL)
    try:
        await Store(pool).write(fold([ready(old)]))
        async with pool.acquire() as conn:
            # The table as a tracker from before trigger rules left it, with a row in it.
            await conn.execute("ALTER TABLE jobs DROP COLUMN origin")
    finally:
        await pool.close()
    pool = await connect_pool(database_url, schema, DDL)
    try:
        async with pool.acquire() as conn:
            kind = await conn.fetchval(
                "SELECT data_type FROM information_schema.columns"
                " WHERE table_schema = $1 AND table_name = 'jobs' AND column_name = 'origin'",
                schema,
            )
        assert kind == "json"  # like the spec
        store = Store(pool)
        view, _ = await store.get(old)
        assert view is not None and view.origin is None
        await store.write(fold([submitted(old)]))
        view, _ = await store.get(old)
        assert view is not None and view.origin == ORIGIN
    finally:
        await pool.close()
