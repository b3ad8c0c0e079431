"""The ``jobmesh`` subcommands: each asks the cluster through the client, then renders.

A command takes the parsed arguments and returns an exit code (``exitcodes``); errors are
raised as ``JobmeshError`` and mapped to exit codes in one place (``main`` in
``jobmesh.client.cli``).
What a job's state means comes from ``jobstate``; what is printed, from ``render``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from jobmesh.client import jobstate
from jobmesh.client.cli import render
from jobmesh.client.cli.display import Display, PlainDisplay, UploadDisplay, display_for
from jobmesh.client.cli.exitcodes import EXIT_OK, EXIT_UNAVAILABLE, for_final_view
from jobmesh.client.cli.follow import Follower
from jobmesh.client.cli.runtimeflags import JobInputs, inputs_from
from jobmesh.client.cli.specflags import spec_from
from jobmesh.client.client import Client, ClusterSettings
from jobmesh.client.jobstate import Seen
from jobmesh.client.uploads import put_uploads
from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec
from jobmesh.contract.ids import job_id_for, new_idempotency_key
from jobmesh.contract.messages.v1 import (
    ExplainReply,
    HealthReply,
    JobSpec,
    JobSummary,
    JobUpdate,
    JobView,
    LogLine,
    QueueConfig,
    Submission,
    TenantConfig,
    ZoneMap,
)
from jobmesh.contract.strict import reject_unknown_fields
from jobmesh.errors import JobmeshError, NotFound, UsageError

# How long ``run`` waits for the last output lines after the job ended.
DRAIN_SECONDS = 2.0
# ``list`` asks the scheduler about this many rows at a time, at most this many at once.
EXPLAIN_BATCH = 64
EXPLAIN_CONCURRENCY = 16
# The most rows the tracker returns for one list request.
MAX_LIST = 1000

_update_decoder = msgspec.json.Decoder(JobUpdate)
_log_decoder = msgspec.json.Decoder(LogLine)
_health_decoder = msgspec.json.Decoder(HealthReply)
C = TypeVar("C", QueueConfig, TenantConfig, ZoneMap)


# --- asking the scheduler ----------------------------------------------------------------
async def _partitions(client: Client) -> int | None:
    """The cluster's scheduler partition count, None when no scheduler answers."""
    try:
        replies = await client.queues(wait=0.5)
    except JobmeshError:
        return None
    return replies[0].partitions


async def _explain(client: Client, partitions: int | None, queue: str, job_id: str) -> ExplainReply | None:
    """The scheduler's explanation for one job; None when no scheduler answers."""
    if partitions is None:
        return None
    return await _explain_in(client, subjects.partition_of(queue, partitions), job_id)


async def _explain_in(client: Client, partition: int, job_id: str) -> ExplainReply | None:
    """The explanation of the scheduler of ``partition``; None when it does not answer."""
    try:
        return await client.explain(partition, job_id)
    except JobmeshError:
        return None  # show what the tracker knows


async def _explain_many(client: Client, partitions: int | None, jobs: Sequence[JobSummary]) -> dict[str, ExplainReply]:
    """Explanations for several jobs, asked concurrently (at most ``EXPLAIN_CONCURRENCY``)."""
    gate = asyncio.Semaphore(EXPLAIN_CONCURRENCY)

    async def one(job: JobSummary) -> tuple[str, ExplainReply | None]:
        async with gate:
            return job.job_id, await _explain(client, partitions, job.queue, job.job_id)

    answers = await asyncio.gather(*(one(j) for j in jobs))
    return {job_id: reply for job_id, reply in answers if reply is not None}


async def _seen_in_view(client: Client, view: JobView) -> Seen:
    explained = None
    if jobstate.needs_explaining(view.state) and not view.final:
        if view.partition >= 0:  # the view says where the job is held
            explained = await _explain_in(client, view.partition, view.job_id)
        else:
            explained = await _explain(client, await _partitions(client), view.queue, view.job_id)
    return jobstate.seen_in_view(view, explained)


# --- submit, run and watch ---------------------------------------------------------------
async def _prepared(args: argparse.Namespace) -> tuple[JobSpec, JobInputs]:
    """The job's spec and inputs, read and checked before anything is sent.

    Reading the files and stdin and hashing the uploads is blocking work: done in a thread.
    """
    inputs = await asyncio.to_thread(inputs_from, args)
    return spec_from(args, inputs=inputs), inputs


async def _upload(client: Client, inputs: JobInputs) -> None:
    """Put the job's uploads in ``jm_uploads`` (what the bucket holds already is skipped)."""
    if not inputs.uploads:
        return
    total = sum(u.input.size for u in inputs.uploads)
    display = UploadDisplay(total)
    sent = 0
    try:
        sent = await put_uploads(client.nc.jetstream(timeout=client.timeout), inputs.uploads, display.update)
    finally:
        display.close(len(inputs.uploads), total, sent)


async def cmd_submit(args: argparse.Namespace) -> int:
    """``jobmesh submit``: upload the job's files, submit it and print its id."""
    spec, inputs = await _prepared(args)
    client = await Client.connect()
    try:
        await _upload(client, inputs)
        reply = await client.submit([Submission(spec=spec, idempotency_key=args.key)])
    finally:
        await client.close()
    render.submitted(reply, args.json)
    return EXIT_OK


async def cmd_run(args: argparse.Namespace) -> int:
    """``jobmesh run``: submit one job, show its states, progress and output, exit with its outcome.

    Returns:
        Once the job is final: 0 when it succeeded, 3 otherwise. On Ctrl-C it says that
        the job keeps running and how to follow it, then lets the interruption through
        (exit 130).
    """
    spec, inputs = await _prepared(args)
    key = args.key or new_idempotency_key()
    job_id = job_id_for(key)
    client = await Client.connect()
    try:
        # Before the run's display starts: a terminal shows one live display at a time.
        await _upload(client, inputs)
    except BaseException:
        await client.close()
        raise
    lines = {"seen": 0}
    confirmed = ended = False
    display = display_for()

    async def on_line(msg: Msg) -> None:
        lines["seen"] += 1
        render.log_line(_log_decoder.decode(msg.data))

    try:
        # Subscribe before submitting: the job id is known from the key, so nothing is missed.
        follower = Follower(client, job_id, display, lambda view: _seen_in_view(client, view))
        await follower.subscribe()
        await client.nc.subscribe(subjects.job_log(job_id), cb=on_line)
        await client.nc.flush()
        await client.submit([Submission(spec=spec, idempotency_key=key)])
        confirmed = True
        render.run_submitted(job_id)
        await follower.run()
        ended = True
        view = await client.get(job_id)
        await _drain_logs(client, job_id, lambda: lines["seen"])
    except asyncio.CancelledError:
        # Ctrl-C: asyncio cancels this task, then raises KeyboardInterrupt in main().
        display.close()
        if not ended:
            render.still_running(job_id, confirmed)
        raise
    finally:
        display.close()
        await client.close()
    return for_final_view(view)


async def cmd_watch(args: argparse.Namespace) -> int:
    """``jobmesh watch``: follow a job until it is final (its states and progress, not its output).

    Returns:
        Once the job is final: 0 when it succeeded, 3 otherwise.

    Raises:
        NotFound: when the tracker does not know the job (exit 4).
    """
    client = await Client.connect()
    display: Display | None = None
    try:
        follower = Follower(client, args.job_id, PlainDisplay(), lambda view: _seen_in_view(client, view))
        await follower.subscribe()  # before reading the view, so no change between the two is missed
        view = await client.get(args.job_id)
        if view.final:
            render.job_ended(view)
            return for_final_view(view)
        follower.display = display = display_for()
        await follower.run(first=await _seen_in_view(client, view))
        view = await client.get(args.job_id)
    except asyncio.CancelledError:
        if display is not None:
            display.close()
        render.err(f"stopped watching; job {args.job_id} goes on")
        raise
    finally:
        if display is not None:
            display.close()
        await client.close()
    return for_final_view(view)


async def _drain_logs(client: Client, job_id: str, seen: Callable[[], int]) -> None:
    """Wait (briefly) until every output line has arrived: lines travel apart from the end event."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline:
        if seen() >= await _line_count(client, job_id):
            return
        await asyncio.sleep(0.05)


async def _line_count(client: Client, job_id: str) -> int:
    """How many output lines of the job the log stream holds (0 when the stream does not exist)."""
    subject = subjects.job_log(job_id)
    try:
        info = await client.nc.jetstream().stream_info(subjects.STREAM_LOGS, subjects_filter=subject)
    except nats.js.errors.NotFoundError:
        return 0
    return (info.state.subjects or {}).get(subject, 0)


# --- cancel, results, dead letters -------------------------------------------------------
async def cmd_cancel(args: argparse.Namespace) -> int:
    """``jobmesh cancel``: cancel a job; one that has ended stays as it is (exit 0, says so).

    Raises:
        NotFound: when the tracker does not know the job (exit 4).
    """
    client = await Client.connect()
    try:
        outcome = await client.cancel(args.job_id, args.reason)
    finally:
        await client.close()
    render.cancelled(outcome, args.json)
    return EXIT_OK


async def cmd_result(args: argparse.Namespace) -> int:
    """``jobmesh result``: the result a job wrote, to stdout or to a file (``-o``).

    Raises:
        NotFound: when the job, the attempt or its result does not exist (exit 4).
    """
    client = await Client.connect()
    try:
        result = await client.result(args.job_id, args.attempt)
    finally:
        await client.close()
    if args.output:
        _write_file(args.output, result.data)
        render.err(f"wrote {len(result.data)} bytes (attempt {result.attempt}) to {args.output}")
    else:
        sys.stdout.buffer.write(result.data)
        sys.stdout.buffer.flush()
    return EXIT_OK


def _write_file(path: str, data: bytes) -> None:
    """Write a result to ``path`` (a local file; a result is at most 64 MiB)."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}", field="output") from exc


async def cmd_dead_letters(args: argparse.Namespace) -> int:
    """``jobmesh dead-letters``: the newest messages the services refused, and why."""
    client = await Client.connect()
    try:
        page = await client.dead_letters(args.service, args.limit)
    finally:
        await client.close()
    render.dead_letters(page, args.json)
    return EXIT_OK


async def cmd_replay(args: argparse.Namespace) -> int:
    """``jobmesh dead-letters replay``: publish one dead letter's payload again, to where it came from.

    Raises:
        NotFound: when there is no such dead letter (exit 4).
        UsageError: when it cannot be replayed (no payload, or a refused request).
    """
    client = await Client.connect(admin=True)  # it publishes to a service's own subject
    try:
        done = await client.replay_dead_letter(args.seq)
    finally:
        await client.close()
    render.replayed(done, args.json)
    return EXIT_OK


# --- reading jobs ------------------------------------------------------------------------
async def cmd_status(args: argparse.Namespace) -> int:
    """``jobmesh status``: one job, with the state a person should see."""
    client = await Client.connect()
    try:
        view = await client.get(args.job_id)
        seen = await _seen_in_view(client, view)
        fallback = await _fallback_of(client, view) if not args.json else None
    finally:
        await client.close()
    render.job_status(view, seen, args.json, fallback)
    return EXIT_OK


async def _fallback_of(client: Client, view: JobView) -> JobView | None:
    """The view of the job that runs in place of ``view``'s, None when none (or not recorded yet)."""
    if not view.fallback_job_id:
        return None
    try:
        return await client.get(view.fallback_job_id)
    except NotFound:
        return None


async def cmd_list(args: argparse.Namespace) -> int:
    """``jobmesh list``: recent jobs, each in the state ``status`` would show.

    The tracker records a held job as queued or ready; only the scheduler knows that it
    waits. So pre-running rows are resolved with the scheduler's explanation, and a filter
    on a pre-running state asks the tracker for all three and keeps the rows that resolve
    to the state asked for.
    """
    want: str = args.state
    client = await Client.connect()
    try:
        if want in jobstate.PRE_RUNNING:
            reply = await client.list(limit=MAX_LIST, states=jobstate.PRE_RUNNING, queue=args.queue)
        else:
            reply = await client.list(limit=args.limit, state=want, queue=args.queue)
        rows = await _resolved(client, reply.jobs, want, args.limit)
    finally:
        await client.close()
    render.job_list(rows, args.json)
    return EXIT_OK


async def _resolved(client: Client, jobs: Sequence[JobSummary], want: str, limit: int) -> list[tuple[JobSummary, Seen]]:
    """Up to ``limit`` jobs with their resolved states, those in ``want`` only when given."""
    partitions = await _partitions(client) if any(jobstate.needs_explaining(j.state) for j in jobs) else None
    rows: list[tuple[JobSummary, Seen]] = []
    # In batches, newest first, so a filter stops asking once it has enough rows.
    for start in range(0, len(jobs), EXPLAIN_BATCH):
        batch = jobs[start : start + EXPLAIN_BATCH]
        explained = await _explain_many(client, partitions, [j for j in batch if jobstate.needs_explaining(j.state)])
        for job in batch:
            seen = jobstate.seen_in_summary(job, explained.get(job.job_id))
            if not want or seen.state == want:
                rows.append((job, seen))
                if len(rows) >= limit:
                    return rows
    return rows


async def cmd_logs(args: argparse.Namespace) -> int:
    """``jobmesh logs``: a job's output; with ``-f``, until the job is final (a retry's output too).

    Raises:
        NotFound: when neither the tracker nor the log stream knows the job.
    """
    client = await Client.connect()
    try:
        js = client.nc.jetstream()
        subject = subjects.job_log(args.job_id)
        final = asyncio.Event()
        if args.follow:

            async def on_update(msg: Msg) -> None:
                if _update_decoder.decode(msg.data).final:
                    final.set()

            # Before asking the tracker, so an end between the two is not missed.
            await client.nc.subscribe(subjects.job_watch(args.job_id), cb=on_update)
        try:
            if (await client.get(args.job_id)).final:
                final.set()
        except NotFound:
            # Lines can be there a moment before the tracker has recorded the submission.
            if not await _line_count(client, args.job_id):
                raise
        sub = await js.subscribe(subject, ordered_consumer=True, stream=subjects.STREAM_LOGS)
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                pending = (await sub.consumer_info()).num_pending
                if pending == 0 and (not args.follow or final.is_set()):
                    break
                continue
            render.log_line(_log_decoder.decode(msg.data))
    finally:
        await client.close()
    return EXIT_OK


# --- the cluster -------------------------------------------------------------------------
async def cmd_nodes(args: argparse.Namespace) -> int:
    """``jobmesh nodes``: executor nodes with capacity, allocation, datasets and heartbeat."""
    client = await Client.connect()
    try:
        reply = await client.nodes()
    finally:
        await client.close()
    render.nodes(reply.nodes, time.time(), args.json)
    return EXIT_OK


async def cmd_queues(args: argparse.Namespace) -> int:
    """``jobmesh queues``: depth per queue and tenant, and what held jobs wait for."""
    client = await Client.connect()
    try:
        replies = await client.queues()
    finally:
        await client.close()
    rows = sorted(
        ((p.partition, p.owner, q) for r in replies for p in r.owned for q in p.queues), key=lambda row: row[2].queue
    )
    render.queues(rows, args.json)
    return EXIT_OK


async def cmd_health(args: argparse.Namespace) -> int:
    """``jobmesh health``: ask one service whether it is healthy (exit 2 when not)."""
    client = await Client.connect()
    try:
        reply = await client.nc.request(subjects.health(args.service), b"{}", timeout=3)
        health = _health_decoder.decode(reply.data)
    except (nats.errors.Error, msgspec.DecodeError) as exc:
        render.err(f"{args.service}: no answer ({type(exc).__name__})")
        return EXIT_UNAVAILABLE
    finally:
        await client.close()
    render.health(health, args.json)
    return EXIT_OK if health.ok else EXIT_UNAVAILABLE


# --- configuration -----------------------------------------------------------------------
async def cmd_queue_set(args: argparse.Namespace) -> int:
    """``jobmesh queue set``: a queue's release rate, burst, in-flight cap and preemption
    policy (all of them)."""
    config = _checked(
        QueueConfig,
        {
            "rate": args.rate,
            "burst": args.burst,
            "max_in_flight": args.max_in_flight,
            "preempt_min_priority": args.preempt_min_priority,
            "preemptible_fraction": args.preemptible_fraction,
        },
    )
    await _put(f"queue.{_name(args.name, 'queue')}", config)
    render.queue_set(args.name, config)
    return EXIT_OK


async def cmd_tenant_set(args: argparse.Namespace) -> int:
    """``jobmesh tenant set``: a tenant's fair-share weight."""
    config = _checked(TenantConfig, {"weight": args.weight})
    await _put(f"tenant.{_name(args.name, 'tenant')}", config)
    render.tenant_set(args.name, config)
    return EXIT_OK


async def cmd_zones_set(args: argparse.Namespace) -> int:
    """``jobmesh zones set``: the zone distance map, from a JSON file."""
    config = _zone_map_from(args.file)  # read before connecting: a bad file costs no round trip
    await _put("zones", config)
    render.zones_set(config)
    return EXIT_OK


async def cmd_queue_list(args: argparse.Namespace) -> int:
    """``jobmesh queue list``: every configured queue's regulation."""
    render.queue_configs(await _read_config(), args.json)
    return EXIT_OK


async def cmd_tenant_list(args: argparse.Namespace) -> int:
    """``jobmesh tenant list``: every configured tenant's weight."""
    render.tenant_configs(await _read_config(), args.json)
    return EXIT_OK


async def cmd_zones_show(args: argparse.Namespace) -> int:
    """``jobmesh zones show``: the zone distance map."""
    render.zone_map(await _read_config(), args.json)
    return EXIT_OK


def _zone_map_from(path: str) -> ZoneMap:
    """The zone map in a JSON file, checked strictly; a local file, so read without the loop."""
    try:
        with open(path, "rb") as f:
            raw = msgspec.json.decode(f.read())
    except (OSError, msgspec.DecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}", field="file") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{path} must hold a JSON object", field="file")
    return _checked(ZoneMap, raw)


def _checked(kind: type[C], raw: dict[str, Any]) -> C:
    """``raw`` as a config message, checked as strictly as a submit (a typo must not pass)."""
    payload = msgspec.json.encode({"type": kind.__struct_config__.tag, **raw})
    value: C = Codec(kind).decode(payload)
    reject_unknown_fields(payload, kind)
    return value


def _name(name: str, what: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,128}", name):
        raise UsageError(f"{what} name {name!r} may only hold letters, digits, '_', '.' and '-'", field="name")
    return name


async def _put(key: str, value: QueueConfig | TenantConfig | ZoneMap) -> None:
    client = await Client.connect(admin=True)  # the cluster's configuration is the operators'
    try:
        await client.put_config(key, value)
    finally:
        await client.close()


async def _read_config() -> ClusterSettings:
    client = await Client.connect()
    try:
        return await client.read_config()
    finally:
        await client.close()
