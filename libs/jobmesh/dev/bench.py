"""``make bench``: figures, not tests.

Prints, from one run on this machine, in two modes: the default one, on nats-server's
default sync (every 2 minutes), and the durable one, on ``sync_interval: always`` (an
fsync before every PubAck, as compose and Nomad ship). Each mode has its own raw relay,
NATS server and database, one after the other:
1. the raw JetStream limit: N messages published, pulled and republished through five
   relay stages (five processes, nats-py, batched like the services), in msg/s;
2. end-to-end throughput: N no-op jobs through all five services with history in Postgres,
   in jobs/s, and as a ratio of (1); the durable mode's also as a share of the default
   mode's; and, in the default mode, the same for a plain loop of single submits (up to
   2,000 jobs), one request/reply per job (``Client.submit``) and pipelined by the client
   (``Client.enqueue``), each from the first submit to the last history row;
3. submit-to-succeeded latency p50/p99 at light load (one job at a time, before the burst),
   twice: when JobSucceeded is durable in JetStream, and when the tracker announces the
   committed history row; and the latter under the burst of (2);
4. where the CPU went during the burst, per job and process;
5. what carrying trace context costs per message hop (extract from the incoming headers,
   inject into the outgoing ones): jobmesh's carry-only fast path, used while nothing is
   exported, beside OpenTelemetry's propagator, which parses and rebuilds the context.

Each figure that issue 14 sets a target for is printed with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
from nats.js.api import AckPolicy, StorageType, StreamConfig

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.ids import job_id_for
from jobmesh.contract.messages.v1 import JobSpec, JobUpdate, NoopRuntime, Resources, Submission
from jobmesh.dev.cluster import LocalCluster
from jobmesh.dev.servers import NatsCluster, NatsServer, embedded_postgres
from jobmesh.runtime.db import create_database, drop_database
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.pull import PullConsumer

STAGES = 5
# The targets of issue 14, printed beside each figure.
BULK_RATIO = 0.5  # bulk submits, end to end, against the raw relay
LOOP_RATIO = 0.45  # a plain loop of single enqueues, against the raw relay
LIGHT_P50, LIGHT_P99 = 3.0, 6.0  # ms, submit to history committed, one job at a time
DURABLE_SHARE = 0.4  # the durable mode's bulk throughput against the default mode's
_update = msgspec.json.Decoder(JobUpdate)


class _JobIdOnly(msgspec.Struct):
    job_id: str


_job_id = msgspec.json.Decoder(_JobIdOnly)


def job_id_of(data: bytes) -> str:
    """The job id of a lifecycle event, decoding nothing else."""
    return _job_id.decode(data).job_id


# --- raw relay baseline ----------------------------------------------------------------
class _Raw(msgspec.Struct):
    i: int
    t: float


async def relay_stage(url: str, stage: int) -> None:
    """One relay process: pull from stage ``stage``'s subject, republish to the next."""
    nc = await nats.connect(url.split(","))
    js = nc.jetstream(publish_async_max_pending=20_000)
    publisher = Publisher(js)
    pull = PullConsumer(nc, "BENCH", f"stage{stage}", 256)
    await pull.start()
    print("ready", flush=True)
    while True:
        batch = await pull.next_batch(1.0)
        if not batch:
            continue
        await publisher.publish(
            Outgoing(f"bench.s{stage + 1}", _Raw(0, 0), f"{stage}:{m.metadata.sequence.stream}") for m in batch
        )
        for m in batch:
            await m.ack()


async def raw_baseline(url: str, n: int, replicas: int = 1) -> float:
    nc = await nats.connect(url.split(","))
    js = nc.jetstream(publish_async_max_pending=20_000)
    await js.add_stream(
        StreamConfig(
            name="BENCH", subjects=["bench.>"], storage=StorageType.FILE, duplicate_window=120, num_replicas=replicas
        )
    )
    for stage in range(STAGES):
        await js.add_consumer(
            "BENCH",
            durable_name=f"stage{stage}",
            filter_subject=f"bench.s{stage}",
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=20_000,
        )
    procs = [
        # Started once, before anything is measured: blocking here costs the figures nothing.
        subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "jobmesh.dev.bench", "--relay", str(stage), "--url", url],
            stdout=subprocess.PIPE,
            text=True,
        )
        for stage in range(STAGES)
    ]
    for p in procs:
        assert p.stdout is not None  # stdout=PIPE
        p.stdout.readline()
    done = asyncio.Event()
    count = 0

    async def on_final(msg) -> None:
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    await nc.subscribe(f"bench.s{STAGES}", cb=on_final)
    publisher = Publisher(js)
    started = time.perf_counter()
    for chunk in range(0, n, 500):
        await publisher.publish(Outgoing("bench.s0", _Raw(i, 0), f"src:{i}") for i in range(chunk, min(n, chunk + 500)))
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.perf_counter() - started
    for p in procs:
        p.terminate()
        p.wait()
    await nc.close()
    return n / elapsed


# --- end to end ------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (Linux /proc)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (Linux /proc; this one by default); 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except FileNotFoundError:
        return 0


def postgres_pids() -> list[int]:
    """Local Postgres processes (the embedded one or the machine's), for the CPU table."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if open(f"/proc/{entry}/comm").read().strip() == "postgres":
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


async def end_to_end(
    url: str,
    n: int,
    light: int,
    on_burst_start=None,
    on_burst_end=None,
    loops_of: int = 2000,
    database_url: str | None = None,
) -> tuple[float, list[float], list[float], list[float], dict[str, float], dict[str, list[float]]]:
    client = await Client.connect(url, timeout=30)
    finished: dict[str, float] = {}
    waiters: dict[str, asyncio.Future] = {}
    all_done = asyncio.Event()
    expected = {"n": n}

    async def on_update(msg) -> None:
        update = _update.decode(msg.data)
        if update.state in ("succeeded", "failed") and update.job_id not in finished:
            finished[update.job_id] = time.perf_counter()
            fut = waiters.pop(update.job_id, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            if len(finished) >= expected["n"]:
                all_done.set()

    await client.nc.subscribe(subjects.job_watch("*"), cb=on_update)
    # The outcome is durable once JobSucceeded is in JetStream; the tracker's watch comes
    # after the history row commits. Both moments are reported.
    outcome_at: dict[str, float] = {}

    async def on_outcome(msg) -> None:
        job_id = job_id_of(msg.data)
        outcome_at.setdefault(job_id, time.perf_counter())

    # Both forms: executors publish on the node form, the scheduler (mapped steps) on the other.
    for subject in subjects.job_events("*", (subjects.SUCCEEDED,)):
        await client.nc.subscribe(subject, cb=on_outcome)
    spec = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=1, memory_mb=0), name="bench")

    # Warm-up: a few jobs so every service has its consumers and caches hot.
    warm = await client.submit([Submission(spec=spec) for _ in range(50)])
    expected["n"] = 50
    await asyncio.wait_for(all_done.wait(), 60)
    all_done.clear()
    finished.clear()
    del warm

    # Light load first (one job at a time), while the database is quiet: after a burst
    # Postgres is still vacuuming, which would be measured too.
    latencies = []
    durable = []
    # Wall-clock times too, beside the events' own time stamps (the hops, below).
    walls: dict[str, tuple[float, float]] = {}
    for _ in range(light):
        key = uuid.uuid4().hex
        job_id = job_id_for(key)
        fut = asyncio.get_running_loop().create_future()
        waiters[job_id] = fut
        t = time.perf_counter()
        wall = time.time()
        await client.submit([Submission(spec=spec, idempotency_key=key)])
        await asyncio.wait_for(fut, 30)
        latencies.append((finished[job_id] - t) * 1000)
        durable.append((outcome_at[job_id] - t) * 1000)
        walls[job_id] = (wall, wall + finished[job_id] - t)
    hops = await light_hops(database_url, walls) if database_url else {}

    # Throughput: submit N in batches, several requests in flight.
    if on_burst_start is not None:
        on_burst_start()
    finished.clear()
    all_done.clear()
    expected["n"] = n
    submitted_at: dict[str, float] = {}
    started = time.perf_counter()
    sem = asyncio.Semaphore(4)

    async def submit_chunk(size: int) -> None:
        async with sem:
            t = time.perf_counter()
            reply = await client.submit([Submission(spec=spec) for _ in range(size)])
            for job_id in reply.job_ids:
                submitted_at[job_id] = t

    chunk = 250
    await asyncio.gather(*(submit_chunk(min(chunk, n - i)) for i in range(0, n, chunk)))
    await asyncio.wait_for(all_done.wait(), 600)
    elapsed = time.perf_counter() - started
    throughput = n / elapsed
    loaded = sorted((finished[j] - submitted_at[j]) * 1000 for j in submitted_at if j in finished)
    if on_burst_end is not None:
        on_burst_end()

    # A plain loop of single submits, end to end (submit to history committed): one
    # request/reply per job (Client.submit), then coalesced by the client (Client.enqueue).
    # After the burst, so that the burst's figure is taken as it always was.
    loops: dict[str, float] = {}
    m = min(n, loops_of)
    for mode in ("blocking", "pipelined") if m else ():
        finished.clear()
        ids: list[str] = []
        t = time.perf_counter()
        if mode == "blocking":
            for _ in range(m):
                ids.extend((await client.submit([Submission(spec=spec)])).job_ids)
        else:
            handles = []
            for _ in range(m):
                handles.append(client.enqueue(spec))
                await asyncio.sleep(0)  # a loop that yields, as one doing other work would
            await client.flush()
            refused = [h.error for h in handles if h.error is not None]
            if refused:
                raise RuntimeError(f"{len(refused)} enqueued jobs were refused: {refused[0]}")
            ids = [h.job_id for h in handles]
        deadline = time.monotonic() + 600
        while not all(job_id in finished for job_id in ids):  # its own jobs, not strays
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {mode} loop's jobs did not all finish in 600 s")
            await asyncio.sleep(0.01)
        loops[mode] = m / (max(finished[job_id] for job_id in ids) - t)

    await client.close()
    return throughput, sorted(latencies), sorted(durable), loaded, loops, hops


# The light-load path, hop by hop: each lifecycle event carries the time its service
# stamped it (one machine, one clock), so the gaps between them show where the latency is
# spent: what to profile first. Each label names the moment a hop ends:
# - the trigger stamps JobSubmitted as it builds it (after the request's validation);
# - the scheduler stamps JobReady with the start of the batch that released it (before
#   that batch's Postgres work and its publish);
# - the binder stamps JobBound once the node's compare-and-set is done (before its publish);
# - the executor stamps JobStarted as it takes the JobBound (before its publish; a no-op
#   puts no node record), and JobSucceeded as the no-op ends;
# - the last hop ends when the tracker announces the committed row: it holds the
#   executor's publishes, the tracker's delivery, write and commit.
HOPS = (
    ("submitted", "trigger has it"),
    ("ready", "scheduler batch starts"),
    ("bound", "binder has reserved"),
    ("started", "executor has it"),
    ("succeeded", "no-op done"),
)


async def light_hops(database_url: str, walls: dict[str, tuple[float, float]]) -> dict[str, list[float]]:
    """Per hop, the milliseconds from the previous event (the submit for the first) to
    each light-load job's event, and from its JobSucceeded to the committed row's
    announcement; sorted."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT job_id, kind, at FROM tracker.events WHERE job_id = ANY($1::text[])",
            list(walls),
        )
    finally:
        await conn.close()
    stamped: dict[str, dict[str, float]] = {}
    for r in rows:
        stamped.setdefault(r["job_id"], {})[r["kind"]] = r["at"]
    out: dict[str, list[float]] = {}
    for job_id, (submit, committed) in walls.items():
        events = stamped.get(job_id, {})
        if not all(kind in events for kind, _ in HOPS):
            continue
        previous = submit
        for kind, service in HOPS:
            out.setdefault(service, []).append((events[kind] - previous) * 1000)
            previous = events[kind]
        out.setdefault("history committed", []).append((committed - previous) * 1000)
    return {hop: sorted(values) for hop, values in out.items()}


def trace_carry_costs(n: int = 100_000) -> tuple[float, float]:
    """Microseconds per message hop for the fast path and the propagator path."""
    from opentelemetry.propagate import extract, inject

    from jobmesh.runtime.tracing import Tracing

    headers = {"Nats-Msg-Id": "x:1:ready:1", "traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"}
    fast = Tracing.off()
    started = time.perf_counter()
    for _ in range(n):
        fast.inject({"Nats-Msg-Id": "x"}, fast.extract(headers))
    fast_us = (time.perf_counter() - started) / n * 1e6
    started = time.perf_counter()
    for _ in range(n):
        inject({"Nats-Msg-Id": "x"}, context=extract(headers))
    slow_us = (time.perf_counter() - started) / n * 1e6
    return fast_us, slow_us


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def nats_for_bench(store: Path, cluster: int, sync_always: bool = True) -> NatsServer | NatsCluster:
    """One nats-server, or ``cluster`` of them joined by routes (streams then get as many
    replicas), started; each fsyncs before every PubAck unless ``sync_always`` is False."""
    if cluster > 1:
        return NatsCluster(store, size=cluster, sync_always=sync_always).start()
    return NatsServer(store, sync_always=sync_always).start()


def raw_first(tmp: Path, n: int, into: dict[str, float], cluster: int = 1, sync_always: bool = True) -> None:
    """Measure the raw relay on NATS of its own (a server or a cluster) before the services start."""
    import uvloop

    raw_server = nats_for_bench(tmp / "nats-raw", cluster, sync_always)
    try:
        where = f"a {cluster}-node cluster, R{cluster}" if cluster > 1 else "one server"
        print(f"raw JetStream relay, {STAGES} processes, {n} messages, {where} ...", file=sys.stderr, flush=True)
        into["rate"] = uvloop.run(raw_baseline(raw_server.url, n, replicas=max(1, cluster)))
    finally:
        raw_server.stop()


@contextlib.contextmanager
def bench_cluster(
    prefix: str,
    database: str,
    before: Callable[[Path], None] | None = None,
    nats_cluster: int = 1,
    sync_always: bool = True,
) -> Iterator[tuple[NatsServer | NatsCluster, LocalCluster]]:
    """A NATS server, a fresh database (``JOBMESH_DATABASE_URL``, else an embedded Postgres)
    and the five services on a node that fits any job, for one benchmark; all removed after.

    Args:
        prefix: of the temporary directory.
        database: the database's name.
        before: run with the temporary directory before the cluster starts (the raw relay).
        nats_cluster: NATS servers; above 1 a cluster, and every stream gets that many replicas.
        sync_always: NATS fsyncs before every PubAck (``sync_interval: always``, as compose
            and Nomad ship); False for nats-server's default (a sync every 2 minutes).
    """
    import uvloop

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    base = os.environ.get("JOBMESH_DATABASE_URL") or os.environ.get("JOBMESH_TEST_DATABASE_URL")
    pg = None
    if not base:
        pg = embedded_postgres(tmp / "pg")
        base = pg.get_uri()
    if before is not None:
        before(tmp)
    server = nats_for_bench(tmp / "nats", nats_cluster, sync_always)
    db_url = uvloop.run(create_database(base, database))
    replicas = (
        {"JOBMESH_NATS_URL": server.url, "JOBMESH_STREAM_REPLICAS": str(nats_cluster)} if nats_cluster > 1 else {}
    )
    cluster = LocalCluster(
        # LocalCluster's health probe takes one URL; the services get every one (replicas).
        server.url.split(",")[0],
        db_url,
        tmp,
        env={
            **replicas,
            "JOBMESH_NODE_ID": "bench-node",
            "JOBMESH_NODE_CPU_MILLI": "100000000",
            "JOBMESH_NODE_MEMORY_MB": "100000000",
            "JOBMESH_LOG_LEVEL": "WARNING",
        },
    )
    try:
        if nats_cluster > 1:
            # A one-shot provisioner first, as compose and Nomad run it.
            env = {**os.environ, **cluster.env, "JOBMESH_DATABASE_URL": db_url}
            command = [sys.executable, "-c", "from jobmesh.client.cli import main; main()", "provision", "--services"]
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
        cluster.start()
        uvloop.run(cluster.wait_healthy())
        yield server, cluster
    finally:
        cluster.stop()
        server.stop()
        uvloop.run(drop_database(base, db_url))
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class ModeFigures:
    """What one mode's run measured (see the module's docstring)."""

    raw: float
    throughput: float
    light: list[float]
    durable: list[float]
    loaded: list[float]
    loops: dict[str, float]
    cpu: dict[str, float]  # seconds during the burst, by process
    hops: dict[str, list[float]]  # light load, ms per hop (light_hops)


def run_mode(args: argparse.Namespace, sync_always: bool, loops_of: int) -> ModeFigures:
    """The raw relay, then the services, on NATS that fsyncs every write or not."""
    import uvloop

    raw: dict[str, float] = {}
    with bench_cluster(
        "jobmesh-bench-",
        "jm_bench",
        before=lambda tmp: raw_first(tmp, args.jobs, raw, args.cluster, sync_always),
        nats_cluster=args.cluster,
        sync_always=sync_always,
    ) as (
        server,
        cluster,
    ):
        print(f"end to end, {args.jobs} no-op jobs through five services ...", file=sys.stderr, flush=True)
        watched = {sp.name: sp.proc.pid for sp in cluster.procs}
        for i, member in enumerate(server.servers if isinstance(server, NatsCluster) else [server]):
            assert member.proc is not None  # started above
            watched[f"nats-server {i}" if args.cluster > 1 else "nats-server"] = member.proc.pid
        for pid in postgres_pids():
            watched[f"postgres {pid}"] = pid
        before: dict[str, float] = {}

        def mark() -> None:
            before.update({name: cpu_seconds(pid) for name, pid in watched.items()})

        after: dict[str, float] = {}

        def mark_end() -> None:
            after.update({name: cpu_seconds(pid) for name, pid in watched.items()})

        # The client connects to one server (it takes one URL), as the CLI would.
        first = server.url.split(",")[0]
        throughput, light, durable, loaded, loops, hops = uvloop.run(
            end_to_end(first, args.jobs, args.light, mark, mark_end, loops_of, cluster.database_url)
        )
        used = {name: after[name] - before.get(name, 0.0) for name in watched}
    return ModeFigures(raw["rate"], throughput, light, durable, loaded, loops, used, hops)


def print_mode(f: ModeFigures, jobs: int, durable: bool, default: ModeFigures | None = None) -> None:
    """One mode's lines; the durable mode's throughput also as a share of the default's
    (its target), when the default mode ran too."""
    print(f"raw JetStream relay ({STAGES} stages):  {f.raw:8.0f} msg/s")
    if not durable:
        share = f" (target >= {BULK_RATIO:.2f})"
    elif default is not None:
        share = f"   of the default mode: {f.throughput / default.throughput:.2f} (target >= {DURABLE_SHARE:.1f})"
    else:
        share = "   (--mode both also gives its share of the default mode's)"
    print(
        f"end-to-end no-op jobs:          {f.throughput:8.0f} jobs/s   ratio to raw: {f.throughput / f.raw:.2f}{share}"
    )
    for mode, words in (("blocking", "await client.submit per job"), ("pipelined", "client.enqueue per job")):
        if mode in f.loops:
            rate = f.loops[mode]
            target = f" (target >= {LOOP_RATIO:.2f})" if mode == "pipelined" else ""
            print(
                f"plain loop of single submits ({words}): {rate:8.0f} jobs/s   ratio to raw: {rate / f.raw:.2f}{target}"
            )
    print(
        f"light load (n={len(f.light)}), submit to JobSucceeded in JetStream: p50 {pct(f.durable, 50):6.2f} ms"
        f"   p99 {pct(f.durable, 99):6.2f} ms"
    )
    print(
        f"light load (n={len(f.light)}), submit to history committed:     p50 {pct(f.light, 50):6.2f} ms"
        f"   p99 {pct(f.light, 99):6.2f} ms (target p50 <= {LIGHT_P50:.0f}, p99 <= {LIGHT_P99:.0f})"
    )
    if f.hops:
        print(
            "light load, p50 per hop (from the previous event's time stamp): "
            + ", ".join(f"{hop} {pct(values, 50):.2f}" for hop, values in f.hops.items())
            + " ms"
        )
    print(
        f"latency under the burst (n={len(f.loaded)}): p50 {pct(f.loaded, 50):6.0f} ms   p99 {pct(f.loaded, 99):6.0f} ms"
    )
    # Where the CPU went during the burst: what to profile first (JOBMESH_PROFILE_DIR).
    postgres = sum(v for k, v in f.cpu.items() if k.startswith("postgres"))
    rows = {k: v for k, v in f.cpu.items() if not k.startswith("postgres")} | {"postgres (all)": postgres}
    print(
        "CPU during the burst, per job: "
        + ", ".join(
            f"{name} {seconds / jobs * 1e6:.0f} us" for name, seconds in sorted(rows.items(), key=lambda kv: -kv[1])
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jobmesh.dev.bench")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("BENCH_JOBS", "10000")))
    parser.add_argument("--light", type=int, default=200, help="sequential jobs for the latency figure")
    parser.add_argument(
        "--cluster",
        type=int,
        default=1,
        choices=(1, 3, 5),
        help="NATS servers: 3 or 5 run everything on a cluster with that many replicas per stream",
    )
    parser.add_argument(
        "--mode",
        choices=("both", "default", "durable"),
        default="both",
        help="NATS without an fsync per write (nats-server's default), with one (sync_interval: always), or both",
    )
    parser.add_argument("--relay", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    if args.relay is not None:
        uvloop.run(relay_stage(args.url, args.relay))
        return
    default = run_mode(args, sync_always=False, loops_of=2000) if args.mode != "durable" else None
    # The durable mode's figures are its bulk throughput and latency: no plain loops.
    durable = run_mode(args, sync_always=True, loops_of=0) if args.mode != "default" else None
    if args.cluster > 1:
        print(f"NATS: {args.cluster}-node cluster, every stream, bucket and store R{args.cluster}")
    if default is not None:
        print("default mode: nats-server's default sync (every 2 minutes)")
        print_mode(default, args.jobs, durable=False)
    if durable is not None:
        print("durable mode: sync_interval: always (an fsync before every PubAck, as compose and Nomad ship)")
        print_mode(durable, args.jobs, durable=True, default=default)
    fast_us, slow_us = trace_carry_costs()
    # A job crosses about ten message hops (5 publishes, 10 deliveries), each carrying its trace.
    print(
        f"trace context per message hop: carried unparsed {fast_us:.2f} us, OTel propagator {slow_us:.2f} us"
        f" ({slow_us / fast_us:.1f}x; about {10 * (slow_us - fast_us):.0f} us per job saved while nothing is exported)"
    )


if __name__ == "__main__":
    main()
