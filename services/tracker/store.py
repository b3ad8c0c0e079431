"""The tracker's SQL: its schema, the batch write and the queries behind the read API.

Everything lives in the ``tracker`` schema (the pool's search_path). Times are epoch seconds
in ``double precision``, exactly as they travel in the messages.

A batch is one statement in one transaction, whatever its size: three set-based upserts
(events, attempts, jobs) over rows sent as JSON arrays, and a fourth (members) only when
the batch holds events of a gang's members. The upserts apply the joins of ``fold.py`` to
the stored rows (the ``ON CONFLICT DO UPDATE`` clauses below mirror ``join_attempt``,
``join_job`` and ``join_member``), so there is nothing to read or lock first: Postgres
locks each conflicting row and merges against its latest committed version, and since
the joins commute, concurrent batches from any number of replicas end in the same rows.
Rows are sent sorted by key, so two batches lock shared rows in the same order.

The schema only grows, by ``ADD COLUMN IF NOT EXISTS`` with a default, so a tracker that
starts on a database an older tracker made brings it up to date and reads its rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import asyncpg
import msgspec

from jobmesh.contract.messages.v1 import (
    AttemptView,
    EventView,
    JobError,
    JobSpec,
    JobSummary,
    JobView,
    MemberView,
)
from jobmesh.contract.messages.v1.triggers import JobOrigin
from jobmesh.tracker.fold import AttemptState, Folded, final_of, is_final, reason_of, shown_reason

# job_id and event_id use the "C" collation: byte order is cheaper to compare and lets the
# events primary key answer "every event of job X" as a range scan over the "X:" prefix,
# so the busiest table carries a single index.
DDL = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id        text COLLATE "C" PRIMARY KEY,
    name          text NOT NULL DEFAULT '',
    queue         text NOT NULL DEFAULT '',
    tenant        text NOT NULL DEFAULT '',
    spec          json,
    submitted_at  double precision,
    attempt       integer NOT NULL,
    state         text NOT NULL,
    state_rank    smallint NOT NULL,
    state_seq     integer NOT NULL DEFAULT 0,
    state_at      double precision NOT NULL,
    reason        text NOT NULL DEFAULT '',
    exit_code     integer,
    error_code    text NOT NULL DEFAULT '',
    error_message text NOT NULL DEFAULT '',
    output_tail   text NOT NULL DEFAULT '',
    finished_at   double precision,
    node_id       text NOT NULL DEFAULT '',
    bound_at      double precision,
    started_at    double precision,
    updated_at    double precision NOT NULL
);
-- Columns added since the first schema: ADD COLUMN IF NOT EXISTS brings a database made by
-- an older tracker up to date (a constant default needs no table rewrite).
ALTER TABLE jobs
    ADD COLUMN IF NOT EXISTS result          text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS result_ref      text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS result_bytes    bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS ends_job        boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS cancelling      text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS partition       integer NOT NULL DEFAULT -1,
    ADD COLUMN IF NOT EXISTS fallback_job_id text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS fallback_of     text NOT NULL DEFAULT '',
    -- JobSubmitted.origin as JSON, like the spec; NULL for a plain submit (and for the
    -- rows of an older tracker, which never saw one).
    ADD COLUMN IF NOT EXISTS origin          json,
    -- Its place in a workflow run (JobSpec.step) and the skip mark of its JobCancelled.
    ADD COLUMN IF NOT EXISTS workflow_id     text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS step            text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS step_index      integer NOT NULL DEFAULT -1,
    ADD COLUMN IF NOT EXISTS skipped         boolean NOT NULL DEFAULT false;
-- A run's jobs in submission order. Partial: most jobs are no workflow's, and they need no
-- entry (a query repeats the predicate, so that its generic plan may use the index).
CREATE INDEX IF NOT EXISTS jobs_by_workflow ON jobs (workflow_id, submitted_at, job_id) WHERE workflow_id <> '';
CREATE INDEX IF NOT EXISTS jobs_by_submitted ON jobs (submitted_at DESC NULLS LAST, job_id DESC);
-- No index on state: a job changes state five times in a second, and an indexed state
-- would make every one of those updates a non-HOT write to every index. Listing by state
-- walks jobs_by_submitted instead (newest first, so recent matches come quickly).
DROP INDEX IF EXISTS jobs_by_state;
ALTER TABLE jobs SET (fillfactor = 80);
CREATE INDEX IF NOT EXISTS jobs_by_queue ON jobs (queue, submitted_at DESC NULLS LAST, job_id DESC);

-- Updates never change the key, so leave room on each page for HOT updates.
CREATE TABLE IF NOT EXISTS attempts (
    job_id        text COLLATE "C" NOT NULL,
    attempt       integer NOT NULL,
    state         text NOT NULL,
    state_rank    smallint NOT NULL,
    state_seq     integer NOT NULL DEFAULT 0,
    state_at      double precision NOT NULL,
    reason        text NOT NULL DEFAULT '',
    exit_code     integer,
    error_code    text NOT NULL DEFAULT '',
    error_message text NOT NULL DEFAULT '',
    output_tail   text NOT NULL DEFAULT '',
    finished_at   double precision,
    node_id       text NOT NULL DEFAULT '',
    bound_at      double precision,
    started_at    double precision,
    PRIMARY KEY (job_id, attempt)
) WITH (fillfactor = 80);
ALTER TABLE attempts
    ADD COLUMN IF NOT EXISTS result       text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS result_ref   text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS result_bytes bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS ends_job     boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS cancelling   text NOT NULL DEFAULT '';

CREATE TABLE IF NOT EXISTS events (
    event_id  text COLLATE "C" PRIMARY KEY,
    job_id    text COLLATE "C" NOT NULL,
    attempt   integer NOT NULL,
    kind      text NOT NULL,
    at        double precision NOT NULL,
    detail    text NOT NULL DEFAULT ''
);

-- A gang's members (JobSpec.replicas > 1), one row per (job, attempt, rank): how far each
-- got (state_rank: bound 1 < running 2 < any ending 3). Written only for the events of a
-- gang, so a plain job has no row here and its batches never touch the table.
CREATE TABLE IF NOT EXISTS members (
    job_id     text COLLATE "C" NOT NULL,
    attempt    integer NOT NULL,
    rank       integer NOT NULL,
    node_id    text NOT NULL DEFAULT '',
    state      text NOT NULL,
    state_rank smallint NOT NULL,
    at         double precision NOT NULL,
    detail     text NOT NULL DEFAULT '',
    PRIMARY KEY (job_id, attempt, rank)
) WITH (fillfactor = 80);

-- fold.advances: does the new state replace the old one within one attempt? A terminal
-- state (5) gives way only to a terminal one of higher precedence (seq: a gang member
-- stopped for another's failure -2, the give-up summary -1, the attempt's own ending 0, a
-- cancel 1); waiting (1) and ready (2) share a class, ordered by release (seq), then time.
CREATE OR REPLACE FUNCTION advances(old_rank smallint, old_seq integer, old_at double precision,
                                    new_rank smallint, new_seq integer, new_at double precision)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN old_rank = 5 THEN new_rank = 5 AND new_seq > old_seq
                ELSE (new_rank - (new_rank >= 2)::int, new_seq, new_at, new_rank)
                   > (old_rank - (old_rank >= 2)::int, old_seq, old_at, old_rank) END
$$;
"""

# Attempt columns and their types, in AttemptState order. The state group moves together
# when a state advances; node, the bind/start times, the scheduler's end mark and the
# cancelling reason are gap-filled instead.
_STATE_COLUMNS = {
    "state": "text",
    "state_rank": "int2",
    "state_seq": "int",
    "state_at": "float8",
    "reason": "text",
    "exit_code": "int",
    "error_code": "text",
    "error_message": "text",
    "output_tail": "text",
    "finished_at": "float8",
    "result": "text",
    "result_ref": "text",
    "result_bytes": "int8",
}
_ATTEMPT_COLUMNS = {
    "attempt": "int",
    **_STATE_COLUMNS,
    "node_id": "text",
    "bound_at": "float8",
    "started_at": "float8",
    "ends_job": "bool",
    "cancelling": "text",
}
_EVENT_COLUMNS = {
    "event_id": "text",
    "job_id": "text",
    "attempt": "int",
    "kind": "text",
    "at": "float8",
    "detail": "text",
}
# MemberRow's fields, in order: the member's key, then what moves when it gets further.
_MEMBER_COLUMNS = {
    "job_id": "text",
    "attempt": "int",
    "rank": "int",
    "node_id": "text",
    "state": "text",
    "state_rank": "int2",
    "at": "float8",
    "detail": "text",
}
_MEMBER_MOVES = ("state", "state_rank", "at", "detail")
# What the spec brings (the workflow step is read from it): taken with the first spec seen.
_JOB_NAMES = {
    "name": "text",
    "queue": "text",
    "tenant": "text",
    "workflow_id": "text",
    "step": "text",
    "step_index": "int",
}
_JOB_IDENTITY = {**_JOB_NAMES, "spec": "json", "submitted_at": "float8"}
# Job facts any of several events may bring: gap-filled (the partition: the highest seen).
# The origin comes only with JobSubmitted, so it fills its own gap (not with the spec); the
# skip mark only with JobCancelled, and stays.
_JOB_LINKS = {"partition": "int", "fallback_job_id": "text", "fallback_of": "text", "origin": "json", "skipped": "bool"}


def _names(columns: dict[str, str]) -> str:
    return ", ".join(columns)


def _typed(columns: dict[str, str]) -> str:
    return ", ".join(f"{name} {kind}" for name, kind in columns.items())


def _pick(columns: Iterable[str], table: str, condition: str, indent: str) -> str:
    return f",\n{indent}".join(f"{c} = CASE WHEN {condition} THEN EXCLUDED.{c} ELSE {table}.{c} END" for c in columns)


# join_attempt, in SQL.
_A_ADVANCES = (
    "advances(a.state_rank, a.state_seq, a.state_at, EXCLUDED.state_rank, EXCLUDED.state_seq, EXCLUDED.state_at)"
)
_A_FILLS = (
    "(a.node_id = '' AND EXCLUDED.node_id <> '')"
    " OR EXCLUDED.bound_at < COALESCE(a.bound_at, 'infinity')"
    " OR EXCLUDED.started_at < COALESCE(a.started_at, 'infinity')"
    " OR (EXCLUDED.ends_job AND NOT a.ends_job)"
    " OR (a.cancelling = '' AND EXCLUDED.cancelling <> '')"
)
# join_job, in SQL: the higher attempt wins outright; the same attempt joins as above.
_J_NEWER = "EXCLUDED.attempt > j.attempt"
_J_SAME = "EXCLUDED.attempt = j.attempt"
_J_MOVES = (
    f"({_J_NEWER} OR ({_J_SAME} AND advances(j.state_rank, j.state_seq, j.state_at,"
    " EXCLUDED.state_rank, EXCLUDED.state_seq, EXCLUDED.state_at)))"
)
_J_LEARNS = "(j.spec IS NULL AND EXCLUDED.spec IS NOT NULL)"
_J_FILLS = (
    f"({_J_SAME} AND ((j.node_id = '' AND EXCLUDED.node_id <> '')"
    " OR EXCLUDED.bound_at < COALESCE(j.bound_at, 'infinity')"
    " OR EXCLUDED.started_at < COALESCE(j.started_at, 'infinity')"
    " OR (EXCLUDED.ends_job AND NOT j.ends_job)"
    " OR (j.cancelling = '' AND EXCLUDED.cancelling <> '')))"
)
_J_LINKS = (
    "(EXCLUDED.partition > j.partition"
    " OR (j.fallback_job_id = '' AND EXCLUDED.fallback_job_id <> '')"
    " OR (j.fallback_of = '' AND EXCLUDED.fallback_of <> '')"
    " OR (j.origin IS NULL AND EXCLUDED.origin IS NOT NULL)"
    " OR (EXCLUDED.skipped AND NOT j.skipped))"
)

# join_member, in SQL: a member only gets further; its node fills a gap.
_M_ADVANCES = "EXCLUDED.state_rank > m.state_rank"
_M_FILLS = "(m.node_id = '' AND EXCLUDED.node_id <> '')"
_MEMBERS_CTE = f"""
, mem AS (
    INSERT INTO members AS m ({_names(_MEMBER_COLUMNS)})
    SELECT * FROM json_to_recordset($4::json) AS r({_typed(_MEMBER_COLUMNS)})
    ON CONFLICT (job_id, attempt, rank) DO UPDATE SET
        {_pick(_MEMBER_MOVES, "m", _M_ADVANCES, " " * 8)},
        node_id = CASE WHEN m.node_id = '' THEN EXCLUDED.node_id ELSE m.node_id END
    WHERE {_M_ADVANCES} OR {_M_FILLS}
)"""

# Rows arrive as three JSON arrays (events, attempts, jobs) whose objects mirror the
# structs in fold.py: msgspec encodes a batch in one call, where binding one array per
# column would cost asyncpg an encoding step per value. A batch with gang members sends a
# fourth (members) to a variant of the statement with one more CTE; any other batch runs
# the statement without it, so plain jobs pay nothing for gangs.
_WRITE_ROWS = f"""
WITH e AS (
    INSERT INTO events ({_names(_EVENT_COLUMNS)})
    SELECT * FROM json_to_recordset($1::json) AS r({_typed(_EVENT_COLUMNS)})
    ON CONFLICT DO NOTHING
), att AS (
    INSERT INTO attempts AS a (job_id, {_names(_ATTEMPT_COLUMNS)})
    SELECT r.job_id, c.*
    FROM json_to_recordset($2::json) AS r(job_id text, record json)
    CROSS JOIN LATERAL json_to_record(r.record) AS c({_typed(_ATTEMPT_COLUMNS)})
    ON CONFLICT (job_id, attempt) DO UPDATE SET
        {_pick(_STATE_COLUMNS, "a", _A_ADVANCES, " " * 8)},
        node_id = CASE WHEN a.node_id = '' THEN EXCLUDED.node_id ELSE a.node_id END,
        bound_at = LEAST(a.bound_at, EXCLUDED.bound_at),
        started_at = LEAST(a.started_at, EXCLUDED.started_at),
        ends_job = a.ends_job OR EXCLUDED.ends_job,
        cancelling = CASE WHEN a.cancelling = '' THEN EXCLUDED.cancelling ELSE a.cancelling END
    WHERE {_A_ADVANCES} OR {_A_FILLS}
)"""
_WRITE_JOBS = f"""
INSERT INTO jobs AS j (job_id, {_names(_JOB_IDENTITY)}, {_names(_JOB_LINKS)}, {_names(_ATTEMPT_COLUMNS)}, updated_at)
SELECT r.job_id, {", ".join("r." + c for c in (*_JOB_IDENTITY, *_JOB_LINKS))}, c.*, r.updated_at
FROM json_to_recordset($3::json)
    AS r(job_id text, {_typed(_JOB_IDENTITY)}, {_typed(_JOB_LINKS)}, updated_at float8, current json)
CROSS JOIN LATERAL json_to_record(r.current) AS c({_typed(_ATTEMPT_COLUMNS)})
ON CONFLICT (job_id) DO UPDATE SET
    {_pick(_JOB_NAMES, "j", _J_LEARNS, " " * 4)},
    spec = COALESCE(j.spec, EXCLUDED.spec),
    submitted_at = COALESCE(j.submitted_at, EXCLUDED.submitted_at),
    attempt = GREATEST(j.attempt, EXCLUDED.attempt),
    {_pick(_STATE_COLUMNS, "j", _J_MOVES, " " * 4)},
    node_id = CASE WHEN {_J_NEWER} OR ({_J_SAME} AND j.node_id = '') THEN EXCLUDED.node_id ELSE j.node_id END,
    bound_at = CASE WHEN {_J_NEWER} THEN EXCLUDED.bound_at
                    WHEN {_J_SAME} THEN LEAST(j.bound_at, EXCLUDED.bound_at) ELSE j.bound_at END,
    started_at = CASE WHEN {_J_NEWER} THEN EXCLUDED.started_at
                      WHEN {_J_SAME} THEN LEAST(j.started_at, EXCLUDED.started_at) ELSE j.started_at END,
    ends_job = CASE WHEN {_J_NEWER} THEN EXCLUDED.ends_job
                    WHEN {_J_SAME} THEN j.ends_job OR EXCLUDED.ends_job ELSE j.ends_job END,
    cancelling = CASE WHEN {_J_NEWER} OR ({_J_SAME} AND j.cancelling = '') THEN EXCLUDED.cancelling
                      ELSE j.cancelling END,
    partition = GREATEST(j.partition, EXCLUDED.partition),
    fallback_job_id = CASE WHEN j.fallback_job_id = '' THEN EXCLUDED.fallback_job_id ELSE j.fallback_job_id END,
    fallback_of = CASE WHEN j.fallback_of = '' THEN EXCLUDED.fallback_of ELSE j.fallback_of END,
    origin = COALESCE(j.origin, EXCLUDED.origin),
    skipped = j.skipped OR EXCLUDED.skipped,
    updated_at = GREATEST(j.updated_at, EXCLUDED.updated_at)
WHERE {_J_MOVES} OR {_J_LEARNS} OR {_J_FILLS} OR {_J_LINKS}
   OR EXCLUDED.updated_at > j.updated_at
   OR (j.submitted_at IS NULL AND EXCLUDED.submitted_at IS NOT NULL)
RETURNING job_id, {_names(_ATTEMPT_COLUMNS)}
"""
_WRITE = _WRITE_ROWS + _WRITE_JOBS
_WRITE_WITH_MEMBERS = _WRITE_ROWS + _MEMBERS_CTE + _WRITE_JOBS

_SUMMARY = (
    "job_id, name, queue, tenant, state, attempt, node_id, exit_code, submitted_at, updated_at, ends_job,"
    " reason, cancelling, state_rank, step, step_index, skipped"
)
_NEWEST = "ORDER BY submitted_at DESC NULLS LAST, job_id DESC LIMIT $1"
# A run's jobs in the order they were submitted (its mapped items after their step).
_SUBMITTED = "ORDER BY submitted_at NULLS LAST, job_id LIMIT $1"


def _list_query(states: bool, queue: bool, workflow: bool) -> str:
    conditions = []
    n = 2
    if workflow:
        # ``<> ''`` repeats jobs_by_workflow's predicate, so a generic plan can use it.
        conditions.append(f"workflow_id = ${n} AND workflow_id <> ''")
        n += 1
    if states:
        conditions.append(f"state = ANY(${n}::text[])")
        n += 1
    if queue:
        conditions.append(f"queue = ${n}")
        n += 1
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    order = f"{_SUBMITTED} OFFSET ${n}" if workflow else _NEWEST
    return f"SELECT {_SUMMARY} FROM jobs{where} {order}"


# One statement per filter combination, so each keeps a plan that uses its own index.
_LIST = {
    (states, queue, workflow): _list_query(states, queue, workflow)
    for states in (False, True)
    for queue in (False, True)
    for workflow in (False, True)
}
_GET_JOB = f"""
SELECT job_id, name, queue, tenant, spec::text AS spec, submitted_at, {_names(_ATTEMPT_COLUMNS)},
       updated_at, partition, fallback_job_id, fallback_of, origin::text AS origin
FROM jobs WHERE job_id = $1
"""
_GET_ATTEMPTS = f"SELECT {_names(_ATTEMPT_COLUMNS)} FROM attempts WHERE job_id = $1 ORDER BY attempt"
# Read only for a gang (its spec says replicas > 1): a plain job's get runs no such query.
_GET_MEMBERS = "SELECT attempt, rank, node_id, state, at, detail FROM members WHERE job_id = $1 ORDER BY attempt, rank"
# In byte order ':' is followed by ';', and job ids contain neither. The event id breaks
# the last ties (the members of a gang, each with its own row of a kind).
_GET_EVENTS = """
SELECT kind, attempt, at, detail FROM events
WHERE event_id >= $1 || ':' AND event_id < $1 || ';'
ORDER BY at, attempt,
    array_position(ARRAY['submitted', 'waiting', 'ready', 'unplaceable', 'bound', 'started', 'member_succeeded',
                         'cancelling', 'succeeded', 'failed', 'expired', 'lost', 'retrying', 'gave_up',
                         'cancelled'], kind),
    event_id
"""

# History retention (retention.py): one batch of old rows, deleted in one short statement.
# Only final jobs go (a succeeded attempt, or one the scheduler ended the job with), and
# spec-less rows (events of a job whose submission never came, such as a late redelivery
# after the job was pruned). The oldest are found by walking jobs_by_submitted from its old
# end (NULLS FIRST is that index read backwards; NULLS LAST would make Postgres sort the
# whole table per batch): no index of its own, so the write path keeps its HOT updates. SKIP LOCKED passes over
# a row a write batch holds right now instead of waiting for it (it goes next round).
# $1: the cutoff (epoch seconds), $2: the batch size.
_PRUNE_DOOMED = {
    "submitted": """
    SELECT job_id FROM jobs
    WHERE submitted_at < $1 AND updated_at < $1 AND (ends_job OR state = 'succeeded' OR spec IS NULL)
    ORDER BY submitted_at NULLS FIRST, job_id LIMIT $2 FOR UPDATE SKIP LOCKED""",
    # Rows with no submission time sort apart (NULLS LAST); they are orphans by definition.
    "orphans": """
    SELECT job_id FROM jobs
    WHERE submitted_at IS NULL AND updated_at < $1
    LIMIT $2 FOR UPDATE SKIP LOCKED""",
}


def _prune_query(doomed: str) -> str:
    # The events of a job are the "<job_id>:" range of their primary key (see _GET_EVENTS).
    return f"""
WITH doomed AS ({doomed}
), j AS (
    DELETE FROM jobs USING doomed WHERE jobs.job_id = doomed.job_id RETURNING jobs.job_id
), a AS (
    DELETE FROM attempts USING j WHERE attempts.job_id = j.job_id
), e AS (
    DELETE FROM events USING j WHERE events.event_id >= j.job_id || ':' AND events.event_id < j.job_id || ';'
), m AS (
    DELETE FROM members USING j WHERE members.job_id = j.job_id
)
SELECT job_id FROM j
"""


_PRUNE = {kind: _prune_query(doomed) for kind, doomed in _PRUNE_DOOMED.items()}

_encoder = msgspec.json.Encoder()
_spec_decoder = msgspec.json.Decoder(JobSpec)
_origin_decoder = msgspec.json.Decoder(JobOrigin)


def write_args(folded: Folded) -> tuple[str, ...]:
    """The batch write's arguments: events, attempts and jobs as JSON arrays, and the gang
    members as a fourth when the batch has any (the statement of :func:`write_query`)."""
    rows = (
        _encoder.encode(folded.events).decode(),
        _encoder.encode(folded.attempts).decode(),
        _encoder.encode(folded.jobs).decode(),
    )
    return (*rows, _encoder.encode(folded.members).decode()) if folded.members else rows


def write_query(folded: Folded) -> str:
    """The batch write's one statement: with the members' upsert only when there are members."""
    return _WRITE_WITH_MEMBERS if folded.members else _WRITE


def _attempt_of(record: asyncpg.Record) -> AttemptState:
    return AttemptState(
        attempt=record["attempt"],
        state=record["state"],
        rank=record["state_rank"],
        seq=record["state_seq"],
        state_at=record["state_at"],
        reason=record["reason"],
        exit_code=record["exit_code"],
        error_code=record["error_code"],
        error_message=record["error_message"],
        output_tail=record["output_tail"],
        finished_at=record["finished_at"],
        result=record["result"],
        result_ref=record["result_ref"],
        result_bytes=record["result_bytes"],
        node_id=record["node_id"],
        bound_at=record["bound_at"],
        started_at=record["started_at"],
        ends_job=record["ends_job"],
        cancelling=record["cancelling"],
    )


def _member_views(records: Iterable[asyncpg.Record]) -> dict[int, list[MemberView]]:
    out: dict[int, list[MemberView]] = {}
    for r in records:  # ordered by attempt, then rank
        view = MemberView(rank=r["rank"], node_id=r["node_id"], state=r["state"], at=r["at"], detail=r["detail"])
        out.setdefault(r["attempt"], []).append(view)
    return out


def _attempt_view(a: AttemptState, members: list[MemberView] | None = None) -> AttemptView:
    return AttemptView(
        attempt=a.attempt,
        state=a.state,
        node_id=a.node_id,
        exit_code=a.exit_code,
        error=JobError(code=a.error_code, message=a.error_message) if a.error_code else None,
        output_tail=a.output_tail,
        started_at=a.started_at,
        finished_at=a.finished_at,
        reason=shown_reason(a),
        result=a.result,
        result_ref=a.result_ref,
        result_bytes=a.result_bytes,
        members=members or [],
    )


class Store:
    """The tracker's tables behind one asyncpg pool.

    Args:
        pool: a pool whose search_path is the ``tracker`` schema (``jobmesh.runtime.db.connect_pool``).
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def write(self, folded: Folded) -> dict[str, AttemptState]:
        """Record a folded batch in one transaction.

        Returns:
            For every job row the batch changed, the attempt the job shows now.
        """
        if not folded.events:
            return {}
        # One statement is one transaction of its own (its CTEs commit together or not at
        # all): no BEGIN and COMMIT round trips around it.
        records = await self._pool.fetch(write_query(folded), *write_args(folded))
        return {r["job_id"]: _attempt_of(r) for r in records}

    async def get(self, job_id: str) -> tuple[JobView | None, bool]:
        """One job with its attempts (by number) and events (by time).

        Returns:
            ``(view, True)`` for a known job; ``(None, False)`` for an unknown one;
            ``(None, True)`` for a job whose events arrived before any that carries its spec.
        """
        async with self._pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
            job = await conn.fetchrow(_GET_JOB, job_id)
            if job is None:
                return None, False
            if job["spec"] is None:
                return None, True
            spec = _spec_decoder.decode(job["spec"])
            attempts = await conn.fetch(_GET_ATTEMPTS, job_id)
            events = await conn.fetch(_GET_EVENTS, job_id)
            members = _member_views(await conn.fetch(_GET_MEMBERS, job_id)) if spec.replicas > 1 else {}
        current = _attempt_of(job)
        view = JobView(
            job_id=job["job_id"],
            name=job["name"],
            queue=job["queue"],
            tenant=job["tenant"],
            state=current.state,
            reason=shown_reason(current),
            attempt=current.attempt,
            node_id=current.node_id,
            submitted_at=job["submitted_at"] or 0.0,
            updated_at=job["updated_at"],
            spec=spec,
            attempts=[_attempt_view(_attempt_of(a), members.get(a["attempt"])) for a in attempts],
            events=[EventView(kind=e["kind"], attempt=e["attempt"], at=e["at"], detail=e["detail"]) for e in events],
            final=is_final(current),
            partition=job["partition"],
            fallback_job_id=job["fallback_job_id"],
            fallback_of=job["fallback_of"],
            origin=_origin_decoder.decode(job["origin"]) if job["origin"] is not None else None,
        )
        return view, True

    async def list(
        self, limit: int, states: Sequence[str] = (), queue: str = "", workflow: str = "", offset: int = 0
    ) -> list[JobSummary]:
        """Recent jobs, latest submission first, optionally in some states and/or a queue; or
        the jobs of one workflow run, in submission order.

        Args:
            limit: at most this many.
            states: only jobs in one of these ("" for every state).
            queue: only jobs of this queue.
            workflow: only the jobs of this run (then in submission order).
            offset: with ``workflow``, skip this many (pages of a large run).

        Returns:
            One summary per job, with its shown reason and its workflow step.
        """
        args: list = [limit] + [v for v in (workflow, list(states), queue) if v] + ([offset] if workflow else [])
        records = await self._pool.fetch(_LIST[(bool(states), bool(queue), bool(workflow))], *args)
        return [
            JobSummary(
                job_id=r["job_id"],
                name=r["name"],
                queue=r["queue"],
                tenant=r["tenant"],
                state=r["state"],
                attempt=r["attempt"],
                node_id=r["node_id"],
                exit_code=r["exit_code"],
                submitted_at=r["submitted_at"] or 0.0,
                updated_at=r["updated_at"],
                final=final_of(r["state"], r["ends_job"]),
                reason=reason_of(r["reason"], r["cancelling"], r["state_rank"]),
                step=r["step"],
                index=r["step_index"],
                skipped=r["skipped"],
            )
            for r in records
        ]


async def prune(pool: asyncpg.Pool, cutoff: float, limit: int) -> list[str]:
    """Delete one batch of jobs (with their attempts, events and gang members) that ended
    before ``cutoff``.

    Args:
        pool: the pool to use (the pruner's own, so the write path never waits for one).
        cutoff: epoch seconds; a job last changed before it may go.
        limit: at most this many jobs of each kind (final, orphan).

    Returns:
        The ids of the jobs deleted.
    """
    async with pool.acquire() as conn:
        gone: list[str] = []
        for query in _PRUNE.values():
            # One statement, one transaction each: locks held for one batch only.
            gone.extend(r["job_id"] for r in await conn.fetch(query, cutoff, limit))
        return gone
