"""``make bench``, workflow part: what a workflow step costs beside a plain job, and a fan-out.

On one cluster (five services as processes, history in Postgres), every job a no-op, it
measures:

1. at light load (one at a time): a plain job from submit to its JobSucceeded, and a run of
   a chain of five steps (a→b→c→d→e) from its request to the last step's JobSucceeded,
   divided by five: the cost of one step. Also each step's hop, from the JobSucceeded of
   the step it needs (or the request, for the first) to its own. p50 and p99, and the
   ratio of the p50s;
2. throughput: N plain jobs submitted in batches, then N steps as N/10 runs of ten
   independent steps, each until every job has ended; jobs/s and steps/s, and their ratio;
3. a fan-out: a run of a list step (a process writing a result of 1,000 items), a step
   mapped over them and a step that collects them; from the list step's JobSucceeded to
   the first and the last item's JobStarted, to the mapped step's end and to the run's end.

Times are when this process sees the events on core NATS (``jobmesh.v1.job.*.started.*``,
``jobmesh.v1.job.*.succeeded.*``, their partition forms and the other ends), as the
trigger bench does. The target
of issue 10: a step costs under 1.5x a plain job.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
import uuid

import msgspec
from nats.aio.msg import Msg

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.ids import job_id_for, map_item_key
from jobmesh.contract.messages.v1 import (
    JobSpec,
    MapSpec,
    NoopRuntime,
    ProcessRuntime,
    Resources,
    Submission,
    WorkflowSpec,
    WorkflowStep,
)
from jobmesh.dev.bench import bench_cluster, pct

TINY = Resources(cpu_milli=1, memory_mb=0)  # so every job fits the bench node at once
CHAIN = ("a", "b", "c", "d", "e")
WIDE = 10  # independent steps per run in the throughput figure
RUNS_IN_FLIGHT = 16  # run requests awaiting the trigger at once


class _Ids(msgspec.Struct):
    job_id: str


def chain_spec() -> WorkflowSpec:
    """Five no-op steps, each needing the one before."""
    steps = {
        name: WorkflowStep(runtime=NoopRuntime(), resources=TINY, needs=[CHAIN[i - 1]] if i else [])
        for i, name in enumerate(CHAIN)
    }
    return WorkflowSpec(name="bench-chain", steps=steps)


def wide_spec() -> WorkflowSpec:
    """``WIDE`` no-op steps that need nothing: a run's steps at their cheapest."""
    return WorkflowSpec(
        name="bench-wide", steps={f"s{i}": WorkflowStep(runtime=NoopRuntime(), resources=TINY) for i in range(WIDE)}
    )


def fanout_spec(items: int) -> WorkflowSpec:
    """A list step writing ``{"items": [1..items]}``, a no-op mapped over it, a no-op after."""
    # A no-op's result is null: the list has to come from a process's result file.
    script = f'{{ printf \'{{"items": [\'; seq -s, 1 {items}; printf "]}}"; }} > "$JOBMESH_RESULT_PATH"'
    return WorkflowSpec(
        name="bench-fanout",
        steps={
            "list": WorkflowStep(runtime=ProcessRuntime(argv=["sh", "-c", script]), resources=TINY),
            "each": WorkflowStep(
                runtime=NoopRuntime(),
                resources=TINY,
                needs=["list"],
                map=MapSpec(over="${steps.list.result.items}"),
            ),
            "collect": WorkflowStep(runtime=NoopRuntime(), resources=TINY, needs=["each"]),
        },
    )


class Moments:
    """When this process saw each job start and end (perf_counter seconds), and waits for ends."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.failed: dict[str, str] = {}  # job id -> how it ended, when not succeeded
        self._waiters: dict[str, asyncio.Future[None]] = {}

    async def subscribe(self, client: Client) -> None:
        """Listen to every partition's started and end events."""
        # job_events gives an executor's kinds in both forms (partition and node).
        for subject in subjects.job_events("*", (subjects.STARTED,)):
            await client.nc.subscribe(subject, cb=self._on_started)
        for subject in subjects.job_events("*", subjects.JOB_END_KINDS):
            await client.nc.subscribe(subject, cb=self._on_ended)

    async def _on_started(self, msg: Msg) -> None:
        self.started.setdefault(msgspec.json.decode(msg.data, type=_Ids).job_id, time.perf_counter())

    async def _on_ended(self, msg: Msg) -> None:
        job_id = msgspec.json.decode(msg.data, type=_Ids).job_id
        if job_id in self.ended:
            return
        self.ended[job_id] = time.perf_counter()
        kind = msg.subject.split(".")[4]  # jobmesh.v1.job.<partition>.<kind>[.<node>]
        if kind != subjects.SUCCEEDED:
            self.failed[job_id] = kind
        fut = self._waiters.pop(job_id, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def end_of(self, job_ids: list[str], timeout: float) -> None:
        """Wait until every one of ``job_ids`` has ended.

        Raises:
            TimeoutError: some had not after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        futures = []
        for job_id in job_ids:
            if job_id not in self.ended:
                futures.append(self._waiters.setdefault(job_id, loop.create_future()))
        if futures:
            await asyncio.wait_for(asyncio.gather(*futures), timeout)


async def measure(url: str, n: int, light: int, items: int) -> dict[str, float]:
    """Run the three figures on the cluster at ``url``.

    Args:
        url: its NATS.
        n: plain jobs, and workflow steps, in the throughput figure.
        light: plain jobs, and chain runs, one at a time.
        items: the fan-out's width.

    Returns:
        The figures by name (milliseconds, or per second for the rates).
    """
    client = await Client.connect(url, timeout=30)
    seen = Moments()
    await seen.subscribe(client)
    spec = JobSpec(runtime=NoopRuntime(), resources=TINY, name="bench")
    chain, wide = chain_spec(), wide_spec()

    async def run(workflow: WorkflowSpec) -> tuple[float, dict[str, str]]:
        t = time.perf_counter()
        reply = await client.run_workflow(workflow, idempotency_key=uuid.uuid4().hex)
        return t, reply.run.jobs

    # Warm-up of both paths: every consumer made, every cache hot.
    warm = (await client.submit([Submission(spec=spec) for _ in range(50)])).job_ids
    for _ in range(5):
        warm.extend((await run(chain))[1].values())
    warm.extend((await run(wide))[1].values())
    await seen.end_of(warm, 60)

    # Light load first, while Postgres is quiet (after a burst it is still vacuuming).
    plain_ms: list[float] = []
    step_ms: list[float] = []
    hop_ms: list[float] = []
    for _ in range(light):
        key = uuid.uuid4().hex
        job_id = job_id_for(key)
        t = time.perf_counter()
        await client.submit([Submission(spec=spec, idempotency_key=key)])
        await seen.end_of([job_id], 30)
        plain_ms.append((seen.ended[job_id] - t) * 1000)

        t, jobs = await run(chain)
        await seen.end_of([jobs[CHAIN[-1]]], 30)
        ends = [t] + [seen.ended[jobs[name]] for name in CHAIN]
        step_ms.append((ends[-1] - t) / len(CHAIN) * 1000)
        hop_ms.extend((b - a) * 1000 for a, b in itertools.pairwise(ends))

    # Throughput: plain jobs first, then as many steps, each until every job has ended.
    t = time.perf_counter()
    gate = asyncio.Semaphore(4)

    async def chunk(size: int) -> list[str]:
        async with gate:
            return (await client.submit([Submission(spec=spec) for _ in range(size)])).job_ids

    ids = [j for part in await asyncio.gather(*(chunk(min(250, n - i)) for i in range(0, n, 250))) for j in part]
    jobs_accepted = time.perf_counter() - t
    await seen.end_of(ids, 600)
    job_rate = n / (time.perf_counter() - t)

    t = time.perf_counter()
    runs = asyncio.Semaphore(RUNS_IN_FLIGHT)

    async def one_run() -> list[str]:
        async with runs:
            return list((await run(wide))[1].values())

    ids = [j for part in await asyncio.gather(*(one_run() for _ in range(max(1, n // WIDE)))) for j in part]
    steps_accepted = time.perf_counter() - t
    await seen.end_of(ids, 600)
    step_rate = len(ids) / (time.perf_counter() - t)

    # The fan-out, on a quiet cluster again.
    await asyncio.sleep(2)
    t, jobs = await run(fanout_spec(items))
    await seen.end_of([jobs["collect"]], 300)
    listed = seen.ended[jobs["list"]]
    item_ids = [job_id_for(map_item_key(jobs["each"], i)) for i in range(items)]
    starts = [seen.started[i] for i in item_ids if i in seen.started]
    await client.close()
    if seen.failed:
        raise RuntimeError(f"{len(seen.failed)} bench jobs did not succeed, e.g. {next(iter(seen.failed.items()))}")
    plain_ms.sort()
    step_ms.sort()
    hop_ms.sort()
    return {
        "plain_p50": pct(plain_ms, 50),
        "plain_p99": pct(plain_ms, 99),
        "step_p50": pct(step_ms, 50),
        "step_p99": pct(step_ms, 99),
        "hop_p50": pct(hop_ms, 50),
        "hop_p99": pct(hop_ms, 99),
        "job_rate": job_rate,
        "step_rate": step_rate,
        "jobs_accepted_s": jobs_accepted,
        "steps_accepted_s": steps_accepted,
        "fanout_items": items,
        "fanout_list_ms": (listed - t) * 1000,
        "fanout_first_started_ms": (min(starts) - listed) * 1000 if starts else float("nan"),
        "fanout_all_started_ms": (max(starts) - listed) * 1000 if len(starts) == items else float("nan"),
        "fanout_map_ended_ms": (seen.ended[jobs["each"]] - listed) * 1000,
        "fanout_run_ended_ms": (seen.ended[jobs["collect"]] - listed) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jobmesh.dev.workflowbench")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("BENCH_JOBS", "5000")))
    parser.add_argument("--light", type=int, default=100, help="plain jobs, and chain runs, one at a time")
    parser.add_argument("--items", type=int, default=1000, help="the fan-out's width")
    args = parser.parse_args()
    import uvloop

    with bench_cluster("jobmesh-workflowbench-", "jm_workflowbench") as (server, _cluster):
        print(
            f"workflow steps: {args.light} jobs and {args.light} chains of {len(CHAIN)} one at a time,"
            f" then {args.jobs} jobs and {args.jobs} steps, then a fan-out of {args.items} ...",
            file=sys.stderr,
            flush=True,
        )
        figures = uvloop.run(measure(server.url, args.jobs, args.light, args.items))
    f = figures
    print(
        f"light load, to JobSucceeded: plain job p50 {f['plain_p50']:6.2f} ms p99 {f['plain_p99']:6.2f} ms;"
        f" workflow step (chain of {len(CHAIN)}, run time / {len(CHAIN)}) p50 {f['step_p50']:6.2f} ms"
        f" p99 {f['step_p99']:6.2f} ms (each hop p50 {f['hop_p50']:6.2f} ms p99 {f['hop_p99']:6.2f} ms)"
        f"   ratio (p50) {f['step_p50'] / f['plain_p50']:.2f} (target < 1.5)"
    )
    print(
        f"throughput, until every job ended: plain {f['job_rate']:8.0f} jobs/s;"
        f" workflow steps (runs of {WIDE}) {f['step_rate']:8.0f} steps/s"
        f"   ratio {f['job_rate'] / f['step_rate']:.2f} (cost, target < 1.5)"
        f"   (all accepted after {f['jobs_accepted_s']:.2f}s and {f['steps_accepted_s']:.2f}s)"
    )
    print(
        f"fan-out of {f['fanout_items']:.0f} items, from the list step's JobSucceeded:"
        f" first item started {f['fanout_first_started_ms']:7.1f} ms, all started {f['fanout_all_started_ms']:7.1f} ms,"
        f" mapped step ended {f['fanout_map_ended_ms']:7.1f} ms, run ended {f['fanout_run_ended_ms']:7.1f} ms"
    )
    if os.environ.get("BENCH_JSON"):
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
