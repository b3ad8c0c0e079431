"""Postgres access: one asyncpg pool per service and its private schema.

Each service owns one schema (``scheduler``, ``tracker``) and applies its own DDL at start;
no service reads another's tables.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from jobmesh.errors import Conflict, Unavailable, Unstorable

# What a query runs on: a connection of its own, or one lent by a pool (the stubs make
# both generic; at run time they are plain classes, hence the guard).
if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

# Failures that say nothing about the message being handled: the database is away, busy or
# resolved a conflict by aborting us. The same work will succeed later.
_AWAY = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.QueryCanceledError,  # statement_timeout, or command_timeout below
    asyncpg.ReadOnlySQLTransactionError,  # a fail-over in progress
    asyncpg.DiskFullError,
    asyncpg.InsufficientResourcesError,
)
# A Postgres that stops answering without closing the connection must not hold a batch
# (and the partition lock with it) forever: statements give up after this many seconds.
COMMAND_TIMEOUT = 30.0


# Failures that come from the data: the same write would fail the same way.
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


@contextlib.asynccontextmanager
async def translated(what: str) -> AsyncIterator[None]:
    """Turn asyncpg's failures into jobmesh's errors, once, at the boundary.

    Anything else (a syntax error, a missing table: a bug) passes through unchanged, so
    the runtime treats it as a bug: retried a bounded number of times, then dead-lettered.

    Raises:
        Unstorable: Postgres, or asyncpg before sending, refused a value (out of range,
            a constraint). Not retryable.
        Conflict: Postgres aborted the transaction (deadlock, serialization failure).
        Unavailable: Postgres cannot be reached, is shutting down or is overloaded.
    """
    try:
        yield
    except _REFUSED as exc:
        raise Unstorable(f"{what}: {type(exc).__name__}: {exc}") from exc
    except asyncpg.TransactionRollbackError as exc:
        raise Conflict(f"{what}: transaction aborted, will retry: {exc}") from exc
    except _AWAY as exc:
        if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
            # asyncpg's own DataError (a value it cannot encode, such as an int beyond
            # int4) is an InterfaceError and a ValueError; it has no public name.
            raise Unstorable(f"{what}: {type(exc).__name__}: {exc}") from exc
        raise Unavailable(f"{what}: Postgres unavailable: {type(exc).__name__}: {exc}") from exc


def trace_queries(tracer_provider: Any) -> None:
    """Trace every asyncpg query (a CLIENT span below whatever span is current).

    Called by ``Tracing.from_env`` only when spans are exported: the instrumentation wraps
    asyncpg's methods, which would cost a check per query for nothing otherwise.
    """
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=tracer_provider)


async def connect_pool(url: str | None, schema: str, ddl: str, *, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    """Open a pool whose connections use ``schema`` first, after applying ``ddl``.

    Args:
        url: the Postgres URL (``JOBMESH_DATABASE_URL``).
        schema: the service's schema; created if missing.
        ddl: idempotent statements (``CREATE TABLE IF NOT EXISTS ...``) run once.

    Raises:
        Unavailable: when no URL is set or the server does not answer.
    """
    if not url:
        raise Unavailable("JOBMESH_DATABASE_URL is not set")
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise Unavailable(f"cannot reach Postgres: {exc}") from exc
    try:
        # Two replicas starting together must not race on CREATE: serialise on a lock.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"jobmesh-ddl-{schema}")
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(f'SET LOCAL search_path TO "{schema}"')
            await conn.execute(ddl)
    finally:
        await conn.close()
    return await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        command_timeout=COMMAND_TIMEOUT,
        server_settings={"search_path": schema, "application_name": f"jobmesh-{schema}"},
    )


async def create_database(server_url: str, prefix: str) -> str:
    """Create a fresh, uniquely named database on ``server_url``; return its URL.

    For tests and benchmarks, which each want an empty database on a shared server.
    """
    import uuid
    from urllib.parse import urlsplit, urlunsplit

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(server_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


async def drop_database(server_url: str, database_url: str) -> None:
    """Drop the database ``database_url`` names (made by :func:`create_database`)."""
    from urllib.parse import urlsplit

    name = urlsplit(database_url).path.lstrip("/")
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
