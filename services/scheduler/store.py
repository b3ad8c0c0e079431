"""The scheduler's durable backlog: schema ``scheduler`` in Postgres.

Set-based statements only (``unnest`` arrays), one round trip per batch and operation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg
import msgspec

from jobmesh.contract.messages.v1 import AttemptError, MemberSucceeded

if TYPE_CHECKING:
    from jobmesh.contract.messages.v1 import JobSubmitted
    from jobmesh.runtime.db import Connection

DDL = """
CREATE TABLE IF NOT EXISTS backlog (
    job_id       text PRIMARY KEY,
    partition    int NOT NULL,
    queue        text NOT NULL,
    tenant       text NOT NULL,
    priority     int NOT NULL,
    seq          bigserial,
    state        text NOT NULL,           -- pending | released | done
    attempt      int NOT NULL DEFAULT 1,
    reason       text NOT NULL DEFAULT '',
    releases     int NOT NULL DEFAULT 0,
    trace        text NOT NULL DEFAULT '',    -- traceparent of the submit, to continue it
    submitted    bytea NOT NULL,          -- the JobSubmitted message, as received
    submitted_at double precision NOT NULL,
    updated_at   double precision NOT NULL
);
-- What earlier attempts left (RetryState, JSON): set once an attempt failed or a cancel
-- arrived while the attempt was out; NULL for most jobs.
ALTER TABLE backlog ADD COLUMN IF NOT EXISTS retry json;
CREATE INDEX IF NOT EXISTS backlog_active ON backlog (partition, seq) WHERE state <> 'done';
CREATE INDEX IF NOT EXISTS backlog_done ON backlog (partition, updated_at) WHERE state = 'done';
-- How a done job ended (succeeded, failed, cancelled, expired): what a job submitted after
-- it, and depending on it, is decided by.
ALTER TABLE backlog ADD COLUMN IF NOT EXISTS outcome text;
-- Ends of other partitions' jobs that this partition's jobs depend on (DependencyEnded).
CREATE TABLE IF NOT EXISTS dep_ends (
    job_id    text NOT NULL,
    partition int NOT NULL,               -- the partition told
    outcome   text NOT NULL,
    at        double precision NOT NULL,
    PRIMARY KEY (job_id, partition)
);
-- Jobs of this partition that other partitions wait for (DependencyWatch), until they end.
CREATE TABLE IF NOT EXISTS dep_watches (
    job_id    text NOT NULL,
    partition int NOT NULL,               -- the watched job's partition
    watcher   int NOT NULL,
    PRIMARY KEY (job_id, watcher)
);
CREATE INDEX IF NOT EXISTS dep_watches_partition ON dep_watches (partition);
-- Jobs a workflow step's handler submitted (ChildAdded): the step's dependents wait for them.
CREATE TABLE IF NOT EXISTS dep_children (
    parent          text NOT NULL,
    partition       int NOT NULL,         -- the parent's partition
    child           text NOT NULL,
    child_partition int NOT NULL,
    PRIMARY KEY (parent, child)
);
CREATE INDEX IF NOT EXISTS dep_children_partition ON dep_children (partition);
CREATE INDEX IF NOT EXISTS dep_ends_age ON dep_ends (partition, at);
-- A held job waits for these jobs (or a mapped step for its items): their done rows and
-- told ends are not pruned while it does, so a new owner still finds how they ended.
CREATE TABLE IF NOT EXISTS dep_edges (
    dep       text NOT NULL,
    waiter    text NOT NULL,
    partition int NOT NULL,               -- the waiter's partition
    PRIMARY KEY (dep, waiter)
);
CREATE INDEX IF NOT EXISTS dep_edges_waiter ON dep_edges (waiter);
"""


async def insert_new(
    conn: Connection, submitted: list[JobSubmitted], traces: list[str], raws: list[bytes]
) -> dict[str, int]:
    """Insert JobSubmitted events not seen before; return {job_id: seq} of the new ones.

    ``raws`` are the messages as received; they are stored as they came.
    """
    if not submitted:
        return {}
    now = time.time()
    rows = await conn.fetch(
        """
        INSERT INTO backlog (job_id, partition, queue, tenant, priority, state, submitted, submitted_at, updated_at, trace)
        SELECT j, p, q, t, pr, 'pending', s, sa, $8, tr
          FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::int[], $6::bytea[], $7::float8[], $9::text[])
               AS u(j, p, q, t, pr, s, sa, tr)
        ON CONFLICT (job_id) DO NOTHING
        RETURNING job_id, seq
        """,
        [m.job_id for m in submitted],
        [m.partition for m in submitted],
        [m.spec.queue for m in submitted],
        [m.spec.tenant for m in submitted],
        [m.spec.priority for m in submitted],
        raws,
        [m.submitted_at for m in submitted],
        now,
        traces,
    )
    return {row["job_id"]: row["seq"] for row in rows}


class RetryState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a job's earlier attempts left behind, kept durably so a take-over goes on
    where the last owner stopped (column ``retry``)."""

    not_before: float = 0.0
    avoid: list[str] = []
    avoid_zones: list[str] = []
    errors: list[AttemptError] = []
    checkpoint: str = ""
    cancelling: str = ""
    deps_met_at: float = 0.0  # when its dependencies were all met (0: none, or not yet)
    items: int = -1  # a mapped step's item count once expanded (-1: not yet)
    gang_done: list[int] = []  # a gang's members of the current attempt that succeeded
    gang_lead: MemberSucceeded | None = None  # its rank 0's success (the gang's result)


_retry_encoder = msgspec.json.Encoder()
retry_decoder = msgspec.json.Decoder(RetryState)


def encode_retry(state: RetryState) -> str:
    """The JSON text stored in ``backlog.retry``."""
    return _retry_encoder.encode(state).decode()


class StateChanges:
    """State changes of one batch, written with a single statement by :func:`apply`.

    A job may change twice in one batch (refused by the binder, then released again in the
    same round): the last change is the job's state, so it replaces the earlier one. One
    row per job also matters to Postgres: ``UPDATE ... FROM`` applies only one joined row
    to each target row.
    """

    __slots__ = ("_by_job", "_extra")

    def __init__(self) -> None:
        self._by_job: dict[str, tuple[str, str, int | None, str | None]] = {}
        self._extra: dict[str, tuple[int, str]] = {}  # job -> (attempt, retry state JSON)

    def add(
        self,
        job_id: str,
        state: str,
        reason: str = "",
        releases: int | None = None,
        attempt: int | None = None,
        retry: RetryState | None = None,
        outcome: str | None = None,
    ) -> None:
        self._by_job[job_id] = (state, reason, releases, outcome)
        if attempt is not None and retry is not None:
            # Rare (a retry or a cancel): written by a statement of its own in apply().
            self._extra[job_id] = (attempt, encode_retry(retry))

    def keep(self, job_id: str, attempt: int, retry: RetryState) -> None:
        """Write a job's retry state alone (its dependencies met, its expansion), leaving
        its state as the round sets it."""
        self._extra[job_id] = (attempt, encode_retry(retry))

    def __bool__(self) -> bool:
        return bool(self._by_job) or bool(self._extra)

    def columns(self) -> tuple[list[str], list[str], list[str], list[int | None], list[str | None]]:
        ids = list(self._by_job)
        rows = list(self._by_job.values())
        return ids, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]

    def retries(self) -> tuple[list[str], list[int], list[str]]:
        ids = list(self._extra)
        return ids, [self._extra[j][0] for j in ids], [self._extra[j][1] for j in ids]


async def apply(conn: Connection, changes: StateChanges) -> None:
    """Write every state change of a batch (pending with reason, released, done) at once."""
    if not changes:
        return
    ids, states, reasons, releases, outcomes = changes.columns()
    await conn.execute(  # a no-op for an empty batch of states (only retry states)
        """
        UPDATE backlog AS b
           SET state = u.s, reason = u.r, releases = COALESCE(u.n, b.releases), updated_at = $5,
               outcome = COALESCE(u.o, b.outcome)
          FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $6::text[]) AS u(j, s, r, n, o)
         WHERE b.job_id = u.j
        """,
        ids,
        states,
        reasons,
        releases,
        time.time(),
        outcomes,
    )
    retried, attempts, states_json = changes.retries()
    if retried:
        await conn.execute(
            """
            UPDATE backlog AS b SET attempt = u.a, retry = u.r::json
              FROM unnest($1::text[], $2::int[], $3::text[]) AS u(j, a, r)
             WHERE b.job_id = u.j
            """,
            retried,
            attempts,
            states_json,
        )


async def ended_outcomes(conn: Connection, job_ids: list[str], partition: int) -> dict[str, str]:
    """How those of ``job_ids`` that have ended ended: from the backlog (any partition's
    done rows) and from the ends other partitions told ``partition`` of."""
    if not job_ids:
        return {}
    rows = await conn.fetch(
        """
        SELECT job_id, outcome FROM backlog WHERE job_id = ANY($1::text[]) AND state = 'done' AND outcome IS NOT NULL
        UNION ALL
        SELECT job_id, outcome FROM dep_ends WHERE job_id = ANY($1::text[]) AND partition = $2
        """,
        job_ids,
        partition,
    )
    return {row["job_id"]: row["outcome"] for row in rows}


async def _insert_rows(
    conn: Connection,
    table: str,
    columns: tuple[str, ...],
    types: tuple[str, ...],
    partition: int,
    rows: Sequence[tuple],
) -> None:
    """Insert ``rows`` (one value per column) with ``partition`` into one of the
    dependency tables, in one statement; a row already there stays as it is.

    ``table``, ``columns`` and ``types`` are this module's constants, never input.
    """
    if not rows:
        return
    arrays = ", ".join(f"${i + 2}::{kind}[]" for i, kind in enumerate(types))
    names = ", ".join(f"c{i}" for i in range(len(columns)))
    await conn.execute(
        f"INSERT INTO {table} (partition, {', '.join(columns)})"
        f" SELECT $1, {names} FROM unnest({arrays}) AS u({names}) ON CONFLICT DO NOTHING",
        partition,
        *([row[i] for row in rows] for i in range(len(columns))),
    )


async def record_dep_ends(conn: Connection, partition: int, ends: list[tuple[str, str, float]]) -> None:
    """Keep the ends (job id, outcome, at) other partitions told ``partition`` of."""
    await _insert_rows(conn, "dep_ends", ("job_id", "outcome", "at"), ("text", "text", "float8"), partition, ends)


async def add_watches(conn: Connection, partition: int, watches: list[tuple[str, int]]) -> None:
    """Remember that partitions wait for jobs of ``partition`` (job id, watcher)."""
    await _insert_rows(conn, "dep_watches", ("job_id", "watcher"), ("text", "int"), partition, watches)


async def drop_watches(conn: Connection, job_ids: list[str]) -> None:
    """Forget the watches of jobs that ended (their watchers have been told)."""
    if job_ids:
        await conn.execute("DELETE FROM dep_watches WHERE job_id = ANY($1::text[])", job_ids)


async def load_watches(pool: asyncpg.Pool, partition: int) -> dict[str, set[int]]:
    """The partitions waiting for each job of ``partition``."""
    rows = await pool.fetch("SELECT job_id, watcher FROM dep_watches WHERE partition = $1", partition)
    watches: dict[str, set[int]] = {}
    for row in rows:
        watches.setdefault(row["job_id"], set()).add(row["watcher"])
    return watches


async def add_children(conn: Connection, partition: int, children: list[tuple[str, str, int]]) -> None:
    """Remember jobs' children (parent, child, child's partition)."""
    columns = ("parent", "child", "child_partition")
    await _insert_rows(conn, "dep_children", columns, ("text", "text", "int"), partition, children)


async def drop_children(conn: Connection, parents: list[str]) -> None:
    """Forget the children of parents whose end has been decided."""
    if parents:
        await conn.execute("DELETE FROM dep_children WHERE parent = ANY($1::text[])", parents)


async def add_edges(conn: Connection, partition: int, edges: list[tuple[str, str]]) -> None:
    """Keep the done rows of these jobs (dep, waiter) while their waiters wait."""
    await _insert_rows(conn, "dep_edges", ("dep", "waiter"), ("text", "text"), partition, edges)


async def drop_edges(conn: Connection, waiters: list[str]) -> None:
    """The waiters ended: what they waited for may be pruned in time."""
    if waiters:
        await conn.execute("DELETE FROM dep_edges WHERE waiter = ANY($1::text[])", waiters)


async def load_edge_waiters(pool: asyncpg.Pool, partition: int) -> set[str]:
    """The jobs of ``partition`` that hold edges."""
    rows = await pool.fetch("SELECT DISTINCT waiter FROM dep_edges WHERE partition = $1", partition)
    return {row["waiter"] for row in rows}


async def load_children(pool: asyncpg.Pool, partition: int) -> dict[str, dict[str, int]]:
    """The children of each parent of ``partition``, with the children's partitions."""
    rows = await pool.fetch("SELECT parent, child, child_partition FROM dep_children WHERE partition = $1", partition)
    children: dict[str, dict[str, int]] = {}
    for row in rows:
        children.setdefault(row["parent"], {})[row["child"]] = row["child_partition"]
    return children


async def load_active(pool: asyncpg.Pool, partition: int) -> list[asyncpg.Record]:
    """Every job of ``partition`` that is not done, in submission order."""
    return await pool.fetch(
        "SELECT job_id, seq, state, attempt, reason, releases, trace, submitted, retry::text AS retry FROM backlog"
        " WHERE partition = $1 AND state <> 'done' ORDER BY seq",
        partition,
    )


async def prune_done(pool: asyncpg.Pool, partition: int, older_than: float, limit: int = 10_000) -> int:
    """Delete up to ``limit`` finished jobs of ``partition`` last touched before ``older_than``.

    Finished rows are kept for a while so that a JobSubmitted redelivered after its job
    ended (beyond JetStream's duplicate window) is still recognised and not run again.
    """
    await pool.execute(
        """
        DELETE FROM dep_ends WHERE ctid IN (
            SELECT ctid FROM dep_ends d WHERE partition = $1 AND at < $2
               AND NOT EXISTS (SELECT 1 FROM dep_edges e WHERE e.dep = d.job_id)
             LIMIT $3)
        """,
        partition,
        older_than,
        limit,
    )
    result = await pool.execute(
        """
        DELETE FROM backlog WHERE job_id IN (
            SELECT job_id FROM backlog b
             WHERE partition = $1 AND state = 'done' AND updated_at < $2
               AND NOT EXISTS (SELECT 1 FROM dep_edges e WHERE e.dep = b.job_id)
             LIMIT $3)
        """,
        partition,
        older_than,
        limit,
    )
    return int(result.split()[-1])
