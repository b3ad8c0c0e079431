"""What starting one attempt costs at each isolation level (part of ``make bench``).

Each figure is one attempt through the executor's own runner, from the RunRequest to its
outcome, for a job that does nothing (``true``, or a handler that returns at once):

- plain: a process without isolation (what executors did before isolation);
- process: the ``process`` level (unprivileged uid, rlimits, its own cgroup);
- sandbox: the ``sandbox`` level (bubblewrap namespaces, read-only binds, cgroup);
- handler cold: a worker started inside the node's level, plus its first job;
- handler warm: a job on a worker that is already running;
- python: ``python -c pass`` at the strongest level, what a handler job stands in for.

The levels the machine cannot enforce (no bubblewrap, not root) are reported as such.
Printed as medians and p90 over ``--runs`` attempts, and as ratios to the plain process.

Each attempt reserves ``--cpu`` millicores (default: a job's default, 100), which its
cgroup enforces as a hard CPU quota: a start-up that needs more CPU time than that share
of 100 ms waits for the next period, so the figures at 100 and at 1000 millicores differ
(``make bench`` prints both).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from jobmesh.contract.messages.v1 import HandlerRuntime, ProcessRuntime, Resources
from jobmesh.errors import InvalidSpec
from jobmesh.executor.handlerpool import HandlerPool
from jobmesh.executor.isolation.probe import NodeIsolation, probe_node
from jobmesh.executor.isolation.workers import isolated_spawn
from jobmesh.executor.runner import AbortSignal, OutputStream, ProcessRunner
from jobmesh.executor.runrequest import RunRequest
from jobmesh.runtime.settings import Settings

HANDLER_MODULE = """
import msgspec
from jobmesh.sdk import handler


class Nothing(msgspec.Struct):
    pass


@handler("bench.nothing")
def nothing(request: Nothing) -> Nothing:
    return request
"""


CPU_MILLI = Resources().cpu_milli  # what each measured attempt reserves (--cpu)


async def _no_line(stream: OutputStream, line: str) -> None:
    return None


def _request(
    root: Path,
    n: int,
    runtime: ProcessRuntime | HandlerRuntime,
    env: dict[str, str],
    uid: int | None,
    cpu_milli: int = CPU_MILLI,
) -> RunRequest:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{n}-", dir=root))
    workdir.chmod(0o700)
    if uid is not None:
        os.chown(workdir, uid, uid)
    return RunRequest(
        job_id=f"bench{n}",
        attempt=1,
        name=f"job bench{n} attempt 1",
        runtime=runtime,
        workdir=workdir,
        env=env,
        timeout=60.0,
        abort=AbortSignal(),
        on_line=_no_line,
        resources=Resources(cpu_milli=cpu_milli),
    )


async def _timed(runs: int, once: Callable[[int], Awaitable[None]]) -> list[float]:
    await once(-1)  # warm the page cache and the interpreter's code paths
    seconds = []
    for n in range(runs):
        started = time.perf_counter()
        await once(n)
        seconds.append(time.perf_counter() - started)
    return seconds


async def process_starts(
    isolation: NodeIsolation | None,
    root: Path,
    runs: int,
    argv: tuple[str, ...] = ("true",),
    cpu_milli: int = CPU_MILLI,
) -> list[float]:
    """Seconds per attempt of ``argv`` through ProcessRunner at ``isolation`` (None: plain)."""
    runner = ProcessRunner({"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, isolation=isolation)
    runtime = ProcessRuntime(argv=list(argv))
    uid = isolation.uid if isolation is not None else None

    async def once(n: int) -> None:
        request = _request(root, n, runtime, {}, uid, cpu_milli)
        request = replace(request, env=runner.environment(runtime, request.workdir, {}))
        outcome = await runner.run(request)
        if outcome.error is not None:
            raise RuntimeError(f"a benchmark attempt failed: {outcome.error.code}: {outcome.error.message}")

    return await _timed(runs, once)


async def handler_starts(
    isolation: NodeIsolation, root: Path, runs: int, cold_runs: int
) -> tuple[list[float], list[float]]:
    """Seconds for a cold worker start plus its first job, and for warm jobs, at ``isolation``."""
    module = root / "bench_handlers.py"
    module.write_text(HANDLER_MODULE)
    module.chmod(0o644)
    runtime = HandlerRuntime(handler="bench.nothing", input={})
    cold: list[float] = []
    for n in range(cold_runs):
        started = time.perf_counter()
        pool = HandlerPool([str(module)], 1, spawn=isolated_spawn(isolation, 512, [str(module)]))
        try:
            await pool.start()
            outcome = await pool.run(_request(root, n, runtime, {}, isolation.uid))
            cold.append(time.perf_counter() - started)
        finally:
            await pool.stop()
        if outcome.error is not None:
            raise RuntimeError(f"a benchmark handler job failed: {outcome.error.code}: {outcome.error.message}")
    pool = HandlerPool([str(module)], 1, spawn=isolated_spawn(isolation, 512, [str(module)]))
    await pool.start()
    try:

        async def once(n: int) -> None:
            outcome = await pool.run(_request(root, n, runtime, {}, isolation.uid))
            if outcome.error is not None:
                raise RuntimeError(f"a benchmark handler job failed: {outcome.error.code}: {outcome.error.message}")

        warm = await _timed(runs, once)
    finally:
        await pool.stop()
    return cold, warm


def _isolation(level: str) -> NodeIsolation | str:
    try:
        return probe_node(Settings(node_isolation=level), f"bench-{level}-{os.getpid()}")  # type: ignore[arg-type]
    except InvalidSpec as exc:
        return str(exc)


def _row(label: str, seconds: list[float], plain: float) -> str:
    ordered = sorted(seconds)
    p50 = statistics.median(ordered) * 1000
    p90 = ordered[max(0, int(len(ordered) * 0.9) - 1)] * 1000
    return f"  {label:<26} p50 {p50:8.2f} ms   p90 {p90:8.2f} ms   x{p50 / plain:6.2f} of a plain process"


def _scratch_root() -> Path:
    # Searchable by the sandbox uid, which the process level runs attempts as.
    root = Path(tempfile.mkdtemp(prefix="jobmesh-startbench-"))
    root.chmod(0o755)
    return root


async def run(runs: int, cold_runs: int, cpu_milli: int = CPU_MILLI) -> None:
    """Measure and print every level this machine can enforce."""
    root = _scratch_root()
    levels: list[NodeIsolation] = []
    try:
        plain = await process_starts(None, root, runs, cpu_milli=cpu_milli)
        base = statistics.median(plain) * 1000
        print(
            f"attempt start-up, {runs} attempts each (the runner alone, a job that does nothing, "
            f"reserving {cpu_milli} millicores: its cgroup's CPU quota):"
        )
        print(_row("plain process", plain, base))
        for level in ("process", "sandbox"):
            isolation = _isolation(level)
            if isinstance(isolation, str):
                print(f"  {level:<26} not measured: {isolation}")
                continue
            levels.append(isolation)
            print(_row(f"{level} level", await process_starts(isolation, root, runs, cpu_milli=cpu_milli), base))
        strongest = levels[-1] if levels else None
        if strongest is None:
            print("  handler                    not measured: no isolation level could be set up")
            return
        # What a handler job stands in for: a Python process started for the job.
        python = await process_starts(strongest, root, runs, (sys.executable, "-c", "pass"), cpu_milli)
        print(_row(f"python -c pass ({strongest.level})", python, base))
        cold, warm = await handler_starts(strongest, root, runs, cold_runs)
        print(_row(f"handler cold ({strongest.level})", cold, base))
        print(_row(f"handler warm ({strongest.level})", warm, base))
    finally:
        for isolation in levels:
            if isolation.cgroups is not None:
                isolation.cgroups.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    """``python -m jobmesh.dev.startbench``: print the start-up cost of one attempt per level."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="attempts per level")
    parser.add_argument("--cold-runs", type=int, default=5, help="cold handler worker starts")
    parser.add_argument("--cpu", type=int, default=CPU_MILLI, help="millicores each attempt reserves")
    args = parser.parse_args()
    print("measuring attempt start-up per isolation level ...", file=sys.stderr, flush=True)
    asyncio.run(run(args.runs, args.cold_runs, args.cpu))


if __name__ == "__main__":
    main()
