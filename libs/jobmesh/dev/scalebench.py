"""``make bench-scale``: cost as work grows. Figures, not a test, and not run in CI.

Pushes ``--jobs`` no-op jobs (1,000,000 by default) through the five services with history
in Postgres, and prints one line per window of ``--window`` finished jobs (100,000):

- the window's throughput (JobSucceeded events per second, as they reach JetStream);
- the history rows committed by the window's end, which shows whether the tracker keeps up;
- each service's resident memory (and nats-server's) at the window's end.

It ends with the last window's throughput against the first's (the target: within 1.3x)
and each process's memory growth from the end of the first window to the end of the last,
per 100,000 finished jobs: the services must not keep anything per finished job.

Submits go in requests of 250, four in flight, while fewer than ``--in-flight`` jobs are
unfinished and the tracker's consumers hold at most ``--in-flight`` messages not yet
acked (pending or delivered; about a fifth as many jobs, five events each), so the
backlog stays the same size all along and only history grows. A job counts as finished
once its JobSucceeded is seen or its row is in history (read every 5 s). Up to
``--in-flight`` jobs beyond ``--jobs`` are submitted too, so the backlog is still full
when the last window ends; they finish after it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field

import asyncpg
import nats.errors

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobSpec, NoopRuntime, Resources, Submission
from jobmesh.dev.bench import bench_cluster, job_id_of, rss_bytes
from jobmesh.dev.servers import NatsServer

REQUEST = 250  # jobs per submit request, as the bulk figure of make bench
REQUESTS_IN_FLIGHT = 4
STALL_SECONDS = 120
BACKLOG_POLL_SECONDS = 0.5
HISTORY_POLL_SECONDS = 5.0
LAST_TO_FIRST = 1.3  # the target: the last window's throughput within 1.3x of the first's


@dataclass
class _State:
    """What the submitters, the poller and the window loop share."""

    submitted: int = 0
    stop: bool = False  # no more submits: every window is in
    tracker_unacked: int = 0  # messages the tracker's consumers have not acked yet (last reading)
    history: int = 0  # succeeded rows in the tracker's table (last reading)


@dataclass
class Window:
    """One window of finished jobs."""

    jobs: int
    seconds: float
    history: int  # succeeded rows committed in the tracker's table at the window's end
    memory: dict[str, float] = field(default_factory=dict)  # MiB by process

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


async def push(
    url: str, database_url: str, total: int, window: int, in_flight: int, pids: dict[str, int]
) -> list[Window]:
    """Submit jobs, at most ``in_flight`` unfinished, until ``total`` have finished; one
    Window per ``window`` finished. Up to ``in_flight`` more are submitted meanwhile, so the
    backlog stays full until the last window ends (a draining backlog would slow it); they
    finish after it."""
    submit_total = total + in_flight
    client = await Client.connect(url, timeout=30)
    db = await asyncpg.connect(database_url)
    polling_db = await asyncpg.connect(database_url)  # the poller's own: one query at a time per connection
    finished: set[str] = set()  # a JobSucceeded published twice (a retried publish) counts once
    changed = asyncio.Event()

    async def on_succeeded(msg) -> None:
        job_id = job_id_of(msg.data)
        if job_id not in finished:
            finished.add(job_id)
            changed.set()

    for subject in subjects.job_events("*", (subjects.SUCCEEDED,)):
        await client.nc.subscribe(subject, cb=on_succeeded)
    spec = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=1, memory_mb=0), name="scale")
    state = _State()
    room = asyncio.Condition()

    # The JobSucceeded notices are core NATS (at most once): the committed history also
    # counts a job as finished, so a lost notice cannot hold a slot for ever.
    def done_count() -> int:
        return max(len(finished), state.history)

    # The tracker records history after the events: its consumers' backlog (messages not
    # yet acked) also bounds the submits, so the windows measure what the whole system
    # sustains, history included, and not a lag that grows.
    def has_room() -> bool:
        unfinished = state.submitted - done_count()
        return unfinished + REQUEST <= in_flight and state.tracker_unacked <= in_flight

    async def tracker_backlog() -> None:
        js = client.nc.jetstream()
        history_at = 0.0
        while True:
            try:
                pending = 0
                for stream, purpose in ((subjects.STREAM_JOBS, "jobs"), (subjects.STREAM_DISPATCH, "dispatch")):
                    info = await js.consumer_info(stream, subjects.durable("tracker", purpose))
                    pending += (info.num_pending or 0) + (info.num_ack_pending or 0)
                state.tracker_unacked = pending
                if time.monotonic() - history_at >= HISTORY_POLL_SECONDS:
                    state.history = await history(polling_db)
                    history_at = time.monotonic()
            except (TimeoutError, nats.errors.Error) as exc:
                # One slow answer keeps the last reading; it does not end a long run.
                print(f"could not read the tracker's backlog ({type(exc).__name__}); keeping the last", file=sys.stderr)
            async with room:
                room.notify_all()
            await asyncio.sleep(BACKLOG_POLL_SECONDS)

    async def submitter() -> None:
        while True:
            async with room:
                await room.wait_for(lambda: has_room() or state.stop)
                size = min(REQUEST, submit_total - state.submitted)
                if size <= 0 or state.stop:
                    return
                state.submitted += size  # counted before the await: the submitters share the room
            await client.submit([Submission(spec=spec) for _ in range(size)])

    async def history(conn: asyncpg.Connection = db) -> int:
        return await conn.fetchval("SELECT count(*) FROM tracker.jobs WHERE state = 'succeeded'")

    submitters = [asyncio.create_task(submitter()) for _ in range(REQUESTS_IN_FLIGHT)]
    poller = asyncio.create_task(tracker_backlog())
    windows: list[Window] = []
    started = first_submit = time.perf_counter()
    boundary = window
    progress = (0, time.monotonic())
    try:
        while len(windows) * window < total:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0)
            changed.clear()
            count = done_count()
            if count != progress[0]:
                progress = (count, time.monotonic())
            elif time.monotonic() - progress[1] > STALL_SECONDS:
                raise TimeoutError(
                    f"no job finished for {STALL_SECONDS} s: {len(finished)} of {total} JobSucceeded seen,"
                    f" {state.history} in history"
                )
            async with room:
                room.notify_all()
            for task in (*submitters, poller):
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]  # checked just above
            if count >= min(boundary, total):
                now = time.perf_counter()
                memory = {name: rss_bytes(pid) / 2**20 for name, pid in pids.items()}
                done = min(boundary, total) - len(windows) * window
                windows.append(Window(done, now - started, await history(), memory))
                print_window(len(windows), windows[-1], count)
                started = now
                boundary += window
        # No more submits; the tracker's history holds every submitted job in the end.
        async with room:
            state.stop = True
            room.notify_all()
        await asyncio.gather(*submitters)
        submitted = state.submitted
        deadline = time.monotonic() + 600
        while await history() < submitted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"history holds {await history()} of {submitted} succeeded jobs after 600 s")
            await asyncio.sleep(0.5)
        elapsed = time.perf_counter() - first_submit
        print(
            f"all {submitted} jobs ({total} and {submitted - total} that kept the backlog full) in history"
            f" after {elapsed:.0f} s: {submitted / elapsed:.0f} jobs/s overall",
            flush=True,
        )
    finally:
        for task in (*submitters, poller):
            task.cancel()
        await db.close()
        await polling_db.close()
        await client.close()
    return windows


def print_window(i: int, w: Window, finished: int) -> None:
    memory = "  ".join(f"{name} {mb:.0f}" for name, mb in w.memory.items())
    print(
        f"window {i:3d}: {finished:9d} finished  {w.rate:7.0f} jobs/s  history {w.history:9d} rows  RSS MiB: {memory}",
        flush=True,
    )


def summary(windows: list[Window]) -> list[str]:
    """The closing lines: last against first window, and memory growth per 100,000 jobs."""
    first, last = windows[0], windows[-1]
    lines = [
        f"throughput: first window {first.rate:.0f} jobs/s, last {last.rate:.0f} jobs/s:"
        f" last/first {last.rate / first.rate:.2f} (target >= {1 / LAST_TO_FIRST:.2f}, within {LAST_TO_FIRST}x)"
    ]
    # From the first window, and from the middle one: bounded caches (the binder's and the
    # executor's memories of recent attempts, 100,000 each) fill early. Per job actually
    # finished in between (the last window may be shorter).
    for start in sorted({0, len(windows) // 2} - {len(windows) - 1}):
        jobs = sum(w.jobs for w in windows[start + 1 :])
        growth = ", ".join(
            f"{name} {(last.memory[name] - windows[start].memory[name]) / jobs * 100_000:+.1f}" for name in first.memory
        )
        lines.append(
            f"memory growth from window {start + 1} to {len(windows)}, MiB per 100,000 finished jobs: {growth}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jobmesh.dev.scalebench", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000, help="no-op jobs in all (default 1,000,000)")
    parser.add_argument("--window", type=int, default=100_000, help="finished jobs per printed window")
    parser.add_argument("--in-flight", type=int, default=20_000, help="unfinished jobs at most (the backlog)")
    parser.add_argument(
        "--durable", action="store_true", help="NATS with sync_interval: always (as shipped); slower, same shape"
    )
    args = parser.parse_args()
    for name in ("jobs", "window", "in_flight"):
        if getattr(args, name) < REQUEST:
            parser.error(f"--{name.replace('_', '-')} must be at least {REQUEST}")
    import uvloop

    with bench_cluster("jobmesh-scalebench-", "jm_scalebench", sync_always=args.durable) as (server, cluster):
        pids = {sp.name: sp.proc.pid for sp in cluster.procs}
        assert isinstance(server, NatsServer) and server.proc is not None  # one server, started
        pids["nats-server"] = server.proc.pid
        mode = "sync_interval: always" if args.durable else "nats-server's default sync"
        print(
            f"{args.jobs} no-op jobs, windows of {args.window}, at most {args.in_flight} unfinished, NATS {mode}",
            file=sys.stderr,
            flush=True,
        )
        windows = uvloop.run(push(server.url, cluster.database_url, args.jobs, args.window, args.in_flight, pids))
    for line in summary(windows):
        print(line)


if __name__ == "__main__":
    main()
