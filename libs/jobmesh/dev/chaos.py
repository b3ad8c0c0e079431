"""``make chaos``: the system under faults, measured from its durable records.

Runs two replicas of each service and three executor nodes, each supervised (restarted
about a second after it dies), on a nats-server and a Postgres of its own (both killed
once). It submits a mix of jobs (``jobmesh.dev.chaosjobs``) spread over the chaos window
and meanwhile:

- every 2 s kills -9 a random service process, executors included (the first kill is an
  executor's, so even a short run kills one);
- kills -9 NATS once and starts it again on the same port and store;
- kills -9 Postgres (the postmaster and its backends) once and starts it again;
- SIGSTOPs an executor for longer than the jobs' heartbeat timeout, then SIGCONTs it.

Then it waits (at most ``--settle`` seconds) for every acknowledged job to be final and
every reservation to be released, reads ``tracker.jobs``, ``tracker.attempts``,
``tracker.events``, the shared runs file, KV ``jm_alloc`` and ``JM_DEADLETTER``, and prints
the figures (``jobmesh.dev.chaosreport``): a table, or ``--json``. It exits 1 when a count
of loss, duplication or leaks is not 0, or a fault kind did not happen. docs/chaos.md says
how to read it.

    python -m jobmesh.dev.chaos [--jobs N] [--seconds S] [--settle S] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS

from jobmesh.client.client import Client
from jobmesh.contract import permissions, subjects
from jobmesh.contract.ids import job_id_for
from jobmesh.contract.messages.v1 import Allocation, DeadLetter, JobUpdate
from jobmesh.dev.chaosjobs import HANDLER_MODULE, HEARTBEAT_TIMEOUT, RUNS_FILE_LABEL, PlannedJob, plan, submission_of
from jobmesh.dev.chaosreport import AttemptRow, Fault, JobRow, Report, analyse, render
from jobmesh.dev.cluster import LocalCluster
from jobmesh.dev.devcluster import provision_as_provisioner
from jobmesh.dev.servers import NatsServer, embedded_postgres
from jobmesh.dev.supervisor import Slot, Supervisor
from jobmesh.errors import JobmeshError, Unavailable
from jobmesh.runtime.commands import AUTH_FILE, issue
from jobmesh.runtime.db import create_database, drop_database
from jobmesh.runtime.settings import Settings

REPLICATED = ("trigger", "scheduler", "binder", "tracker")
NODES = ("n1", "n2", "n3")
KILL_EVERY = 2.0
SUBMIT_BATCH = 100
NODE_ENV = {
    # Room for 40 attempts of 100 millicores at once per node: enough to overlap, few
    # enough for two cores.
    "JOBMESH_NODE_CPU_MILLI": "4000",
    "JOBMESH_NODE_MEMORY_MB": "100000",
    "JOBMESH_NODE_ISOLATION": "process",
    "JOBMESH_CONTAINER_ENGINE": "",
    "JOBMESH_HANDLER_WORKERS": "2",
}


# The executors' attempt lines and the schedulers' partition moves are the evidence when
# an attempt runs twice or hangs.
EXECUTOR_LOGS = {"JOBMESH_LOG_LEVEL": "INFO"}


@dataclass
class ChaosConfig:
    """One run's sizes and when its one-off faults fall (fractions of the chaos window).

    Attributes:
        jobs: how many jobs are submitted, spread over the first 85% of the window.
        seconds: the chaos window: faults are injected from its start to its end.
        settle: the longest wait, after the window, for every job to be final.
        seed: the job mix's and the killer's seed.
    """

    jobs: int = 10_000
    seconds: float = 240.0
    settle: float = 240.0
    seed: int = 12
    nats_at: float = 0.30
    postgres_at: float = 0.55
    sigstop_at: float = 0.72
    stop_for: float = HEARTBEAT_TIMEOUT + 6.0
    kill_every: float = KILL_EVERY


@dataclass
class Run:
    """What the run collects while it goes: acknowledgements, faults, job ends."""

    t0: float = field(default_factory=time.time)
    acked: set[str] = field(default_factory=set)
    faults: list[Fault] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)
    kill_slots: list[tuple[Fault, Slot]] = field(default_factory=list)
    spared: str = ""  # the replica the killer leaves alone: the SIGSTOP's target, from shortly before
    submit_errors: Counter[str] = field(default_factory=Counter)


class KillablePostgres:
    """The embedded Postgres (``pgserver``) in a directory of ours, which this suite may kill.

    Never the machine's shared server: a kill here hits only this run's database.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server = embedded_postgres(data_dir)

    def uri(self) -> str:
        return str(self.server.get_uri())

    def postmaster_pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            return int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> int | None:
        """SIGKILL the postmaster and every backend (a crashed host: nothing shuts down cleanly)."""
        import psutil  # type: ignore[import-untyped]  # pgserver's dependency; no stubs installed

        pid = self.postmaster_pid()
        if pid is None:
            return None
        try:
            root = psutil.Process(pid)
            victims = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        for proc in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(victims, timeout=10)
        return pid

    def start(self) -> None:
        """Start it again on the same data directory (crash recovery replays the WAL)."""
        with self.server._lock:
            self.server.ensure_postgres_running()

    def cleanup(self) -> None:
        self.server.cleanup()


def _slots(handler_module: Path) -> list[Slot]:
    slots = [
        Slot(name, f"-{r}", dict(EXECUTOR_LOGS) if name == "scheduler" else {})
        for name in REPLICATED
        for r in ("a", "b")
    ]
    label = "=".join(RUNS_FILE_LABEL)
    for node in NODES[:-1]:
        env = {**NODE_ENV, "JOBMESH_NODE_ID": f"chaos-{node}", "JOBMESH_NODE_LABELS": label, **EXECUTOR_LOGS}
        slots.append(Slot("executor", f"-{node}", env))
    # The last node hosts the handlers, in sandboxed workers (see chaosjobs.RUNS_FILE_LABEL).
    env = {
        **NODE_ENV,
        "JOBMESH_NODE_ID": f"chaos-{NODES[-1]}",
        "JOBMESH_NODE_ISOLATION": "sandbox",
        "JOBMESH_HANDLER_MODULES": str(handler_module),
        **EXECUTOR_LOGS,
    }
    slots.append(Slot("executor", f"-{NODES[-1]}", env))
    return slots


async def _connect(url: str, credentials: Path, identity: str) -> NATS:
    """A connection as ``identity`` that rides out the NATS restart (the CLI's gives up at once)."""

    async def quiet(exc: Exception) -> None:
        return None

    return await nats.connect(
        url,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=3,
        error_cb=quiet,
        nkeys_seed=str(credentials / f"{identity}.nk"),
        inbox_prefix=permissions.inbox_of(identity),
    )


async def _submit_batch(client: Client, batch: list[PlannedJob], runs: str, run: Run, give_up_at: float) -> None:
    """Submit one batch until it is answered (the same keys each time, so a resent batch
    is the same jobs), or until ``give_up_at``: those jobs then count as never acknowledged."""
    submissions = [submission_of(job, runs) for job in batch]
    while time.time() < give_up_at:
        try:
            reply = await client.submit(submissions)
        except Unavailable as exc:
            run.submit_errors[type(exc).__name__] += 1
        except JobmeshError as exc:
            if not exc.retryable:
                raise
            run.submit_errors[exc.code] += 1
        except nats.errors.Error as exc:
            run.submit_errors[type(exc).__name__] += 1
        else:
            run.acked.update(reply.job_ids)
            return
        await asyncio.sleep(1.0)  # a client's pause before resending (a deliberate sleep: noqa)


async def _submit_all(client: Client, jobs: list[PlannedJob], runs: str, window: float, run: Run) -> None:
    batches = [jobs[i : i + SUBMIT_BATCH] for i in range(0, len(jobs), SUBMIT_BATCH)]
    spread = window * 0.85 / max(1, len(batches))
    sem = asyncio.Semaphore(4)
    tasks = []

    async def one(batch: list[PlannedJob]) -> None:
        async with sem:
            await _submit_batch(client, batch, runs, run, time.time() + 180.0)

    for i, batch in enumerate(batches):
        due = run.t0 + i * spread
        if due > time.time():
            await asyncio.sleep(due - time.time())  # pacing the submits over the window (noqa)
        tasks.append(asyncio.get_running_loop().create_task(one(batch)))
    await asyncio.gather(*tasks)


async def _restart_nats(server: NatsServer, run: Run, outage: float = 2.0) -> NatsServer:
    fault = Fault("nats_restart", "nats-server", time.time(), detail=f"down {outage:.0f} s")
    run.faults.append(fault)
    server.stop(kill=True)
    await asyncio.sleep(outage)  # the outage itself (a deliberate sleep: noqa)
    restarted = NatsServer(server.store_dir, port=server.port, log_file=server.log_file, auth_file=server.auth_file)
    await asyncio.to_thread(restarted.start)
    fault.back_at = time.time()
    return restarted


async def _restart_postgres(pg: KillablePostgres, run: Run, outage: float = 3.0) -> None:
    fault = Fault("postgres_restart", "postgres", time.time(), detail=f"down {outage:.0f} s")
    run.faults.append(fault)
    pid = await asyncio.to_thread(pg.kill)
    fault.detail += f", postmaster {pid}"
    await asyncio.sleep(outage)  # the outage itself (a deliberate sleep: noqa)
    await asyncio.to_thread(pg.start)
    fault.back_at = time.time()


async def _ops_healthy(port: int, timeout: float) -> float | None:
    import aiohttp

    deadline = time.time() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as http:
        while time.time() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        return time.time()
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.1)  # polling the replica's health (noqa)
    return None


async def _sigstop(sup: Supervisor, cfg: ChaosConfig, run: Run) -> None:
    executors = [s for s in sup.slots if s.name == "executor"]
    # A process node: its attempts keep running while it is stopped, so their leases lapse.
    # It is spared by the killer from a while before, so it is healthy and busy when stopped.
    slot = executors[-2]
    while not (slot.alive() and slot.starts[-1].healthy_at):  # noqa: ASYNC110 - the supervisor sets it
        await asyncio.sleep(0.1)  # its replacement is starting (noqa)
    fault = Fault("sigstop", slot.label, time.time())
    run.faults.append(fault)
    sup.pause(slot)
    await asyncio.sleep(cfg.stop_for)  # stopped past the lease: the point of this fault (noqa)
    sup.resume(slot)
    stopped = time.time() - fault.at
    fault.detail = f"stopped {stopped:.1f} s, lease {HEARTBEAT_TIMEOUT:.0f} s"
    fault.back_at = await _ops_healthy(slot.ops_port, 60.0)
    run.spared = ""


async def _inject(
    sup: Supervisor, server_box: list[NatsServer], pg: KillablePostgres, cfg: ChaosConfig, run: Run
) -> None:
    rng = random.Random(cfg.seed)
    end = run.t0 + cfg.seconds
    one_offs = {
        "nats": run.t0 + cfg.seconds * cfg.nats_at,
        "postgres": run.t0 + cfg.seconds * cfg.postgres_at,
        "sigstop": run.t0 + cfg.seconds * cfg.sigstop_at,
    }
    pending: list[asyncio.Task[None]] = []
    next_kill = run.t0 + cfg.kill_every
    first = True
    while time.time() < end:
        now = time.time()
        if "nats" in one_offs and now >= one_offs["nats"]:
            del one_offs["nats"]
            server_box[0] = await _restart_nats(server_box[0], run)
        if "postgres" in one_offs and now >= one_offs["postgres"]:
            del one_offs["postgres"]
            await _restart_postgres(pg, run)
        if "sigstop" in one_offs and now >= one_offs["sigstop"] - 10.0:
            run.spared = [s for s in sup.slots if s.name == "executor"][-2].label
        if "sigstop" in one_offs and now >= one_offs["sigstop"]:
            del one_offs["sigstop"]
            pending.append(asyncio.get_running_loop().create_task(_sigstop(sup, cfg, run)))
        if now >= next_kill:
            next_kill += cfg.kill_every
            live = [
                s
                for s in sup.slots
                if s.alive() and not s.stopped and s.label != run.spared and (not first or s.name == "executor")
            ]
            if live:
                first = False
                slot = rng.choice(live)
                at = time.time()
                pid = sup.kill(slot)
                fault = Fault("kill", slot.label, at, detail=f"pid {pid}")
                run.faults.append(fault)
                run.kill_slots.append((fault, slot))
        await asyncio.sleep(0.05)  # the injector's tick (noqa)
    for task in pending:
        await task


async def _watch(nc, run: Run) -> None:
    decoder = msgspec.json.Decoder(JobUpdate)

    async def on_update(msg) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            if decoder.decode(msg.data).final:
                run.completions.append(time.time())

    await nc.subscribe(subjects.job_watch("*"), cb=on_update)


async def read_dead_letters(js) -> list[DeadLetter]:
    """Every message of ``JM_DEADLETTER``, read with one ordered consumer (thousands in
    seconds; ``get_msg`` per sequence takes a round trip each)."""
    try:
        last = (await js.stream_info(subjects.STREAM_DEADLETTER)).state.last_seq
    except Exception:  # noqa: BLE001 - no stream yet means no dead letters
        return []
    letters: list[DeadLetter] = []
    if last == 0:
        return letters
    sub = await js.subscribe(subjects.DEADLETTER_ALL, ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=5)
            except nats.errors.TimeoutError:
                break
            letters.append(msgspec.json.decode(msg.data, type=DeadLetter))
            if msg.metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()
    return letters


async def reservations_left(js) -> dict[str, list[str]]:
    """Node -> the reservation keys its ``jm_alloc`` record still holds."""
    kv = await js.key_value(subjects.KV_ALLOC)
    try:
        keys = await kv.keys()
    except Exception:  # noqa: BLE001 - nats-py raises NoKeysError for an empty bucket
        return {}
    left: dict[str, list[str]] = {}
    for key in keys:
        entry = await kv.get(key)
        if entry.value:
            alloc = msgspec.json.decode(entry.value, type=Allocation)
            if alloc.reservations:
                left[key] = sorted(alloc.reservations)
    return left


async def _final_count(db_url: str, ids: list[str]) -> int | None:
    try:
        conn = await asyncpg.connect(db_url, timeout=5)
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return None
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM tracker.jobs WHERE job_id = ANY($1::text[]) AND (state = 'succeeded' OR ends_job)",
            ids,
        )
    finally:
        await conn.close()


async def _settle(db_url: str, js, run: Run, limit: float) -> None:
    """Wait until every acknowledged job is final and no reservation is left, or ``limit``."""
    ids = sorted(run.acked)
    deadline = time.time() + limit
    while time.time() < deadline:
        done = await _final_count(db_url, ids)
        if done == len(ids):
            with contextlib.suppress(Exception):
                if not await reservations_left(js):
                    return
        await asyncio.sleep(1.0)  # polling the records while the cluster finishes (noqa)


async def _history_caught_up(js, limit: float) -> bool:
    """Wait (at most ``limit`` seconds) until the tracker has recorded every lifecycle event:
    its JM_JOBS durable has nothing left to deliver and nothing unacked. A job can be final
    before its own Started is recorded: a killed tracker's batch comes back only after the
    ack wait, behind newer events."""
    deadline = time.time() + limit
    durable = subjects.durable("tracker", "jobs")
    while time.time() < deadline:
        with contextlib.suppress(Exception):
            info = await js.consumer_info(subjects.STREAM_JOBS, durable)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return True
        await asyncio.sleep(0.5)  # polling the tracker's consumer (noqa)
    return False


async def _read_records(db_url: str, ids: list[str]):
    conn = await asyncpg.connect(db_url)
    try:
        jobs = {
            r["job_id"]: JobRow(r["state"], r["attempt"], r["ends_job"], r["error_code"])
            for r in await conn.fetch(
                "SELECT job_id, state, attempt, ends_job, error_code FROM tracker.jobs WHERE job_id = ANY($1::text[])",
                ids,
            )
        }
        attempts = [
            AttemptRow(r["job_id"], r["attempt"], r["state"], r["ends_job"], r["node_id"])
            for r in await conn.fetch(
                "SELECT job_id, attempt, state, ends_job, node_id FROM tracker.attempts WHERE job_id = ANY($1::text[])",
                ids,
            )
        ]
        started = {
            (r["job_id"], r["attempt"])
            for r in await conn.fetch(
                "SELECT job_id, attempt FROM tracker.events WHERE kind = 'started' AND job_id = ANY($1::text[])", ids
            )
        }
        return jobs, attempts, started
    finally:
        await conn.close()


async def _write_evidence(db_url: str, report: Report, path: Path, js=None) -> None:
    """The tracker's attempts and events of every sampled job, for digging once the
    database is gone (the run drops it)."""
    ids = sorted({case.split()[0] for cases in report.samples.values() for case in cases if len(case.split()[0]) == 32})
    conn = await asyncpg.connect(db_url)
    try:
        evidence = {}
        for job_id in ids:
            attempts = await conn.fetch("SELECT * FROM tracker.attempts WHERE job_id = $1 ORDER BY attempt", job_id)
            events = await conn.fetch("SELECT * FROM tracker.events WHERE job_id = $1 ORDER BY at", job_id)
            backlog = await conn.fetch(
                "SELECT partition, state, attempt, releases, reason, outcome, updated_at, retry"
                " FROM scheduler.backlog WHERE job_id = $1",
                job_id,
            )
            evidence[job_id] = {
                "attempts": [dict(r) for r in attempts],
                "events": [dict(r) for r in events],
                "scheduler": [dict(r) for r in backlog],
                "messages": [],
            }
    finally:
        await conn.close()
    if js is not None and evidence:
        # Every message of these jobs in JM_JOBS and JM_DISPATCH, with its sequence, time
        # and message id: which release went out, which was refused, which was bound.
        for stream, subject in (
            (subjects.STREAM_JOBS, subjects.JOBS_ALL),
            (subjects.STREAM_DISPATCH, subjects.DISPATCH_ALL),
        ):
            with contextlib.suppress(Exception):
                for seq, when, subj, msg_id, body in await _stream_messages(js, stream, subject, set(evidence)):
                    evidence[body["job_id"]]["messages"].append(
                        {"stream": stream, "seq": seq, "at": when, "subject": subj, "msg_id": msg_id, "body": body}
                    )
    await asyncio.to_thread(path.write_text, json.dumps(evidence, indent=1, default=str))


class _Keyed(msgspec.Struct):
    job_id: str = ""


async def _stream_messages(js, stream: str, subject: str, ids: set[str], limit: float = 300.0) -> list:
    """The messages of ``stream`` about the jobs ``ids`` (read once, front to back, in
    batches by an ephemeral pull consumer that acks nothing; at most ``limit`` seconds)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    info = await js.stream_info(stream)
    last = info.state.last_seq
    found: list[tuple[int, object, str, str, dict]] = []
    if last == 0:
        return found
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=60.0),
    )
    deadline = time.time() + limit
    try:
        while time.time() < deadline:
            try:
                msgs = await sub.fetch(2000, timeout=5.0)
            except nats.errors.TimeoutError:
                break
            for msg in msgs:
                with contextlib.suppress(msgspec.DecodeError):
                    keyed = msgspec.json.decode(msg.data, type=_Keyed)
                    if keyed.job_id in ids:
                        body = msgspec.json.decode(msg.data)
                        body.pop("spec", None)
                        meta = msg.metadata
                        msg_id = (msg.headers or {}).get("Nats-Msg-Id", "")
                        found.append((meta.sequence.stream, meta.timestamp, msg.subject, msg_id, body))
            if msgs and msgs[-1].metadata.sequence.stream >= last:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return found


def read_runs(path: Path) -> Counter[tuple[str, int]]:
    """(job, attempt) -> how many times it ran, from the runs file's lines."""
    runs: Counter[tuple[str, int]] = Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                runs[(parts[0], int(parts[1]))] += 1
    return runs


def required_faults(cfg: ChaosConfig) -> dict[str, int]:
    """How many of each fault a run of this window must have seen (half the kills it
    schedules: a kill is skipped when every candidate is down)."""
    return {
        "kill": max(1, int(cfg.seconds / cfg.kill_every) // 2),
        "kill_executor": 1,
        "nats_restart": 1,
        "postgres_restart": 1,
        "sigstop": 1,
    }


def prepare_work_dir(tmp: Path) -> tuple[Path, Path]:
    """The shared runs file (writable by every attempt's uid) and the handler module in ``tmp``."""
    tmp.chmod(0o755)  # attempts run as uids of their own: they must reach the runs file
    runs_dir = tmp / "runs"
    runs_dir.mkdir(mode=0o777)
    runs_dir.chmod(0o777)
    runs_file = runs_dir / "runs.txt"
    runs_file.touch()
    runs_file.chmod(0o666)
    handler_module = tmp / "chaos_handlers.py"
    handler_module.write_text(HANDLER_MODULE)
    handler_module.chmod(0o644)

    return runs_file, handler_module


async def run_chaos(cfg: ChaosConfig, tmp: Path, pg: KillablePostgres, log=print) -> Report:
    """One chaos run in ``tmp`` against ``pg``; returns its report (nothing printed but progress)."""
    runs_file, handler_module = prepare_work_dir(tmp)

    # Authentication on, as in production: every replica connects as its own identity, and
    # what the identities may not do (streams, durables, tables) the provisioner does first.
    credentials = tmp / "credentials"
    nodes = [f"chaos-{node}" for node in NODES]
    issue(credentials, nodes, Settings.from_env("provision").partitions)
    server = NatsServer(tmp / "nats", log_file=tmp / "nats.log", auth_file=credentials / AUTH_FILE).start()
    server_box = [server]
    db_url = await create_database(pg.uri(), "jm_chaos")
    cluster = LocalCluster(server.url, db_url, tmp, env={"JOBMESH_LOG_LEVEL": "WARNING"}, credentials=credentials)
    sup = Supervisor(cluster, _slots(handler_module))
    run = Run()
    nc = admin = None
    try:
        await asyncio.to_thread(provision_as_provisioner, server.url, db_url, credentials, nodes)
        sup.start_all()
        # Not cluster.wait_healthy: a replica that dies at start (a port taken meanwhile)
        # is the supervisor's to restart, as it would be in production.
        sup.start_watching()
        deadline = time.time() + 120
        while not all(s.starts[-1].healthy_at for s in sup.slots):
            if time.time() > deadline:
                raise Unavailable("not every replica's /healthz said ok within 120 s; see " + str(tmp / "logs"))
            await asyncio.sleep(0.2)  # waiting for every replica (noqa)
        # Jobs go in and are watched as a client would; the records are read as the operator.
        nc = await _connect(server.url, credentials, "client")
        admin = await _connect(server.url, credentials, "provisioner")
        js = admin.jetstream()
        await _watch(nc, run)
        client = Client(nc, timeout=10.0)
        tag = os.urandom(4).hex()
        jobs = plan(cfg.jobs, cfg.seed, f"chaos-{tag}")
        planned = {job_id_for(job.key): job.kind for job in jobs}
        log(f"chaos: {cfg.jobs} jobs over {cfg.seconds:.0f} s, faults every {cfg.kill_every:.0f} s; work dir {tmp}")
        run.t0 = time.time()
        submitting = asyncio.get_running_loop().create_task(_submit_all(client, jobs, str(runs_file), cfg.seconds, run))
        await _inject(sup, server_box, pg, cfg, run)
        await submitting
        log(f"chaos: window over after {time.time() - run.t0:.0f} s; {len(run.acked)} acknowledged; settling")
        await _settle(db_url, js, run, cfg.settle)
        settled_at = time.time()
        history_current = await _history_caught_up(js, 30.0)
        for fault, slot in run.kill_slots:
            start = sup.start_after(slot, fault.at)
            if start is not None:
                fault.back_at = start.healthy_at
        ids = sorted(planned)
        jobs_rows, attempts, started = await _read_records(db_url, ids)
        letters = await read_dead_letters(js)
        left = await reservations_left(js)
        report = analyse(
            planned=planned,
            acknowledged=run.acked,
            jobs=jobs_rows,
            attempts=attempts,
            started=started,
            runs=read_runs(runs_file),
            reservations=left,
            dead_letters=[(d.service, d.code) for d in letters],
            faults=run.faults,
            completions=sorted(run.completions),
            t0=run.t0,
            seconds=settled_at - run.t0,
            required_faults=required_faults(cfg),
        )
        if not history_current:
            report.problems.append("the tracker had not recorded every lifecycle event 30 s after the jobs settled")
        sigstops = [f for f in run.faults if f.kind == "sigstop"]
        for fault in sigstops:
            if fault.back_at is None or (fault.back_at - fault.at) <= HEARTBEAT_TIMEOUT:
                report.problems.append(f"sigstop of {fault.target}: not stopped past the lease ({fault.detail})")
        if run.submit_errors:
            report.samples["submit_retries"] = [f"{k} {v}" for k, v in run.submit_errors.most_common()]
        if report.problems:
            await _write_evidence(db_url, report, tmp / "evidence.json", js)
        return report
    finally:
        await sup.stop_watching()
        for slot in sup.slots:
            if slot.stopped:
                sup.resume(slot)
        for conn in (nc, admin):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        cluster.stop()
        server_box[0].stop()
        with contextlib.suppress(Exception):
            await drop_database(pg.uri(), db_url)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jobmesh.dev.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("CHAOS_JOBS", "10000")))
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("CHAOS_SECONDS", "240")))
    parser.add_argument("--settle", type=float, default=240.0, help="longest wait for every job to be final")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, runs file) even when OK")
    args = parser.parse_args()
    import uvloop

    cfg = ChaosConfig(jobs=args.jobs, seconds=args.seconds, settle=args.settle, seed=args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="jobmesh-chaos-"))
    pg = KillablePostgres(tmp / "pg")
    report = None
    try:
        report = uvloop.run(run_chaos(cfg, tmp, pg, log=lambda line: print(line, file=sys.stderr, flush=True)))
    finally:
        pg.cleanup()
        if report is not None and report.ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"chaos: work directory kept: {tmp} (logs/, runs/runs.txt, nats.log)", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        render(report)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
