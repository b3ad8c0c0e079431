"""``make bench``, trigger part: what a rule's event-to-job path costs beside a plain submit.

On one cluster (five services as processes, history in Postgres), it measures:

1. at light load (one at a time): plain submit to JobStarted, and an event published to
   ``jobmesh.v1.events.bench.*`` (as an integrator would, awaiting its PubAck) to the
   JobStarted of the job one rule made of it; p50 and p99 of each, and their ratio;
2. throughput: N no-op jobs submitted in batches, then N events published at once for the
   rule, each until every job has finished; jobs/s and events/s, and their ratio.

The target of issue 9: the event path within 1.5x the cost of a plain submit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

import msgspec
from nats.aio.msg import Msg

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.ids import job_id_for, trigger_key
from jobmesh.contract.messages.v1 import (
    ErrorReply,
    JobSpec,
    JobUpdate,
    NoopRuntime,
    Resources,
    Submission,
    TriggerPutRequest,
    TriggerReply,
    TriggerRule,
)
from jobmesh.dev.bench import bench_cluster, pct

_update = msgspec.json.Decoder(JobUpdate)
RULE = {
    "name": "bench",
    "source": {"kind": "event", "subjects": ["jobmesh.v1.events.bench.*"]},
    "filter": "event.n >= 0",
    "job": {
        "name": "bench {{ subject.tokens[4] }}",
        "resources": {"cpu_milli": 1, "memory_mb": 0},
        "metadata": {"n": "{{ string(event.n) }}"},
        "runtime": {"kind": "noop"},
    },
    "sample": {"subject": "jobmesh.v1.events.bench.x", "data": {"n": 1}},
}


class _Ids(msgspec.Struct):
    job_id: str


async def measure(url: str, n: int, light: int) -> dict[str, float]:
    """Run both paths on the cluster at ``url``; returns the figures by name."""
    client = await Client.connect(url, timeout=30)
    nc = client.nc
    js = nc.jetstream()
    started_at: dict[str, float] = {}
    finished: set[str] = set()
    waiters: dict[str, asyncio.Future[None]] = {}
    done = asyncio.Event()
    want = {"n": 0}

    async def on_started(msg: Msg) -> None:
        job_id = msgspec.json.decode(msg.data, type=_Ids).job_id
        started_at.setdefault(job_id, time.perf_counter())
        fut = waiters.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def on_update(msg: Msg) -> None:
        update = _update.decode(msg.data)
        if update.final and update.job_id not in finished:
            finished.add(update.job_id)
            if len(finished) >= want["n"]:
                done.set()

    for subject in subjects.job_events("*", (subjects.STARTED,)):  # both forms (partition and node)
        await nc.subscribe(subject, cb=on_started)
    await nc.subscribe(subjects.job_watch("*"), cb=on_update)
    reply = await nc.request(
        subjects.API_TRIGGERS_PUT, encode(TriggerPutRequest(rule=msgspec.convert(RULE, TriggerRule))), timeout=10
    )
    put = msgspec.json.decode(reply.data, type=TriggerReply | ErrorReply)
    if isinstance(put, ErrorReply):
        raise put.error()
    version = put.record.version
    spec = JobSpec(runtime=NoopRuntime(), resources=Resources(cpu_milli=1, memory_mb=0), name="bench")

    def event_job(seq: int) -> str:
        return job_id_for(trigger_key("bench", version, f"{subjects.STREAM_EVENTS}:{seq}"))

    # Warm-up of both paths.
    want["n"], done = 100, asyncio.Event()
    finished.clear()
    await client.submit([Submission(spec=spec) for _ in range(50)])
    for i in range(50):
        await js.publish(f"jobmesh.v1.events.bench.w{i}", b'{"n": %d}' % i)
    await asyncio.wait_for(done.wait(), 60)

    loop = asyncio.get_running_loop()
    submit_ms: list[float] = []
    event_ms: list[float] = []
    for i in range(light):
        key = uuid.uuid4().hex
        job_id = job_id_for(key)
        waiters[job_id] = loop.create_future()
        t = time.perf_counter()
        await client.submit([Submission(spec=spec, idempotency_key=key)])
        await asyncio.wait_for(waiters[job_id], 30)
        submit_ms.append((started_at[job_id] - t) * 1000)

        t = time.perf_counter()
        ack = await js.publish(f"jobmesh.v1.events.bench.l{i}", b'{"n": %d}' % i)
        job_id = event_job(ack.seq)
        if job_id not in started_at:
            waiters[job_id] = loop.create_future()
            await asyncio.wait_for(waiters[job_id], 30)
        event_ms.append((started_at[job_id] - t) * 1000)

    # Throughput: plain submits first, then events, each until every job is final.
    finished.clear()
    want["n"], done = n, asyncio.Event()
    t = time.perf_counter()
    sem = asyncio.Semaphore(4)

    async def chunk(size: int) -> None:
        async with sem:
            await client.submit([Submission(spec=spec) for _ in range(size)])

    await asyncio.gather(*(chunk(min(250, n - i)) for i in range(0, n, 250)))
    await asyncio.wait_for(done.wait(), 600)
    submit_rate = n / (time.perf_counter() - t)

    finished.clear()
    want["n"], done = n, asyncio.Event()
    t = time.perf_counter()
    pending = []
    for i in range(n):
        pending.append(await js.publish_async(f"jobmesh.v1.events.bench.t{i % 100}", b'{"n": %d}' % i))
        if len(pending) >= 1000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await asyncio.wait_for(done.wait(), 600)
    event_rate = n / (time.perf_counter() - t)
    await client.close()
    submit_ms.sort()
    event_ms.sort()
    return {
        "submit_p50": pct(submit_ms, 50),
        "submit_p99": pct(submit_ms, 99),
        "event_p50": pct(event_ms, 50),
        "event_p99": pct(event_ms, 99),
        "submit_rate": submit_rate,
        "event_rate": event_rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jobmesh.dev.triggerbench")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("BENCH_JOBS", "10000")))
    parser.add_argument("--light", type=int, default=200, help="sequential jobs for the latency figures")
    args = parser.parse_args()
    import uvloop

    with bench_cluster("jobmesh-triggerbench-", "jm_triggerbench") as (server, _cluster):
        print(
            f"trigger path: {args.light} one at a time, then {args.jobs} submits and {args.jobs} events ...",
            file=sys.stderr,
            flush=True,
        )
        figures = uvloop.run(measure(server.url, args.jobs, args.light))
    f = figures
    print(
        f"light load, to JobStarted: submit p50 {f['submit_p50']:6.2f} ms p99 {f['submit_p99']:6.2f} ms;"
        f" event via one rule p50 {f['event_p50']:6.2f} ms p99 {f['event_p99']:6.2f} ms"
        f"   ratio (p50) {f['event_p50'] / f['submit_p50']:.2f}"
    )
    print(
        f"throughput, until every job ended: submits {f['submit_rate']:8.0f} jobs/s;"
        f" events via one rule {f['event_rate']:8.0f} events/s   ratio {f['submit_rate'] / f['event_rate']:.2f} (cost, target <= 1.5)"
    )
    if os.environ.get("BENCH_JSON"):
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
