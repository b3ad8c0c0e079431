"""The ``jobmesh`` command.

Exit codes: 0 success, 1 bad usage or a rejected request, 2 cluster unreachable or
busy (retryable), 3 the job failed (``run``), 4 not found. With ``--json`` only JSON goes to stdout;
diagnostics always go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime
from typing import Any

import msgspec

from jobmesh.contract import subjects
from jobmesh.client.client import Client
from jobmesh.errors import JobmeshError, NotFound, Unavailable, UsageError
from jobmesh.contract.ids import job_id_for, new_idempotency_key
from jobmesh.contract.messages.v1 import (
    TERMINAL_STATES, Constraints, JobSpec, JobUpdate, JobView, Locality, LogLine, NoopRuntime, ProcessRuntime,
    Resources, Submission, Timeouts,
)

EXIT_OK, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_FAILED, EXIT_NOT_FOUND = 0, 1, 2, 3, 4
_update_decoder = msgspec.json.Decoder(JobUpdate)
_log_decoder = msgspec.json.Decoder(LogLine)


def err(message: str) -> None:
    print(f"jobmesh: {message}", file=sys.stderr)


def _json(value: Any) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3] if ts else "-"


# --- spec from flags -------------------------------------------------------------------
def _add_spec_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="")
    p.add_argument("--queue", default="default")
    p.add_argument("--tenant", default="default")
    p.add_argument("--priority", type=int, default=5, help="0-9, higher runs first (default 5)")
    p.add_argument("--cpu", type=int, default=100, help="millicores (default 100)")
    p.add_argument("--memory", type=int, default=64, help="MiB (default 64)")
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--gpu-kind", default="")
    p.add_argument("--disk", type=int, default=0, help="scratch disk MiB")
    p.add_argument("--arch", default="")
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="required node label")
    p.add_argument("--zone", default="", help="preferred zone (data locality)")
    p.add_argument("--dataset", default="", help="dataset the job reads (nodes holding it score higher)")
    p.add_argument("--isolation", default="", choices=["", "process", "sandbox", "container", "vm"])
    p.add_argument("--handler", default="", help="required handler hosted by the node")
    p.add_argument("--timeout", type=float, default=3600.0, help="run timeout, seconds")
    p.add_argument("--queue-timeout", type=float, default=0.0, help="expire if not started within this many seconds")
    p.add_argument("--delay", type=float, default=0.0, help="do not start before this many seconds from now")
    p.add_argument("--group", default="", help="sequential group: one at a time, in submission order")
    p.add_argument("--concurrency-key", default="", help="at most --concurrency-limit running per key")
    p.add_argument("--concurrency-limit", type=int, default=0)
    p.add_argument("--key", default="", help="idempotency key (same key, same job)")
    p.add_argument("--noop", action="store_true", help="use the built-in no-op runtime")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")


def _spec_from(args: argparse.Namespace) -> JobSpec:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.noop:
        runtime: Any = NoopRuntime()
    elif not command:
        raise UsageError("give a command after --, e.g. jobmesh submit -- echo hello", field="command")
    else:
        runtime = ProcessRuntime(argv=command)
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--label {item!r} must look like key=value", field="constraints.labels")
        labels[key] = value
    raw = dict(
        runtime=runtime,
        name=args.name or (" ".join(command)[:200] if command else "noop"),
        queue=args.queue,
        tenant=args.tenant,
        priority=args.priority,
        resources=Resources(cpu_milli=args.cpu, memory_mb=args.memory, gpu=args.gpu, gpu_kind=args.gpu_kind, disk_mb=args.disk),
        constraints=Constraints(arch=args.arch, labels=labels, isolation=args.isolation, handler=args.handler),
        locality=Locality(zone=args.zone, dataset=args.dataset),
        timeouts=Timeouts(run=args.timeout, queue=args.queue_timeout),
        group=args.group,
        concurrency_key=args.concurrency_key,
        concurrency_limit=args.concurrency_limit,
        not_before=time.time() + args.delay if args.delay > 0 else 0.0,
    )
    # Round-trip through the wire type so flags get the same checks as API input.
    from jobmesh.contract.codec import Codec, encode

    return Codec(JobSpec).decode(encode(msgspec.structs.replace(JobSpec(runtime=runtime), **raw)))


# --- commands --------------------------------------------------------------------------
async def cmd_submit(args: argparse.Namespace) -> int:
    spec = _spec_from(args)
    client = await Client.connect()
    try:
        reply = await client.submit([Submission(spec=spec, idempotency_key=args.key)])
    finally:
        await client.close()
    if args.json:
        _json({"job_id": reply.job_ids[0], "duplicate": reply.duplicates[0]})
    else:
        print(reply.job_ids[0])
    return EXIT_OK


async def cmd_run(args: argparse.Namespace) -> int:
    spec = _spec_from(args)
    key = args.key or new_idempotency_key()
    job_id = job_id_for(key)
    client = await Client.connect()
    updates: asyncio.Queue[JobUpdate] = asyncio.Queue()
    lines_seen = 0

    async def on_update(msg) -> None:
        updates.put_nowait(_update_decoder.decode(msg.data))

    async def on_line(msg) -> None:
        nonlocal lines_seen
        line = _log_decoder.decode(msg.data)
        lines_seen += 1
        stream = sys.stdout if line.stream == "stdout" else sys.stderr
        print(line.line, file=stream, flush=True)

    try:
        # Subscribe before submitting: the job id is known from the key, so nothing is missed.
        await client.nc.subscribe(subjects.job_watch(job_id), cb=on_update)
        await client.nc.subscribe(subjects.job_log(job_id), cb=on_line)
        await client.nc.flush()
        await client.submit([Submission(spec=spec, idempotency_key=key)])
        err(f"job {job_id} submitted")
        started = time.monotonic()
        last_state: tuple[str, str] = ("", "")
        while True:
            try:
                update = await asyncio.wait_for(updates.get(), 2.0)
                state, detail = update.state, _detail(update.node_id, update.reason, update.exit_code)
            except asyncio.TimeoutError:
                # A watch message can be missed (core NATS is at-most-once): ask the tracker,
                # and for a job still waiting, ask the scheduler why.
                try:
                    view = await client.get(job_id)
                except NotFound:
                    continue
                state, detail = view.state, _detail(view.node_id, view.reason, _exit_code(view))
                held = await _why_waiting(client, view)
                if held:
                    state, detail = held[0], _detail("", held[1], None)
            if (state, detail) != last_state:
                err(f"[{time.monotonic() - started:6.2f}s] {state}{detail}")
                last_state = (state, detail)
            if state in TERMINAL_STATES:
                break
        view = await client.get(job_id)
        await _drain_logs(client, job_id, lines_seen)
    finally:
        await client.close()
    return EXIT_OK if view.state == "succeeded" else EXIT_FAILED


async def _drain_logs(client: Client, job_id: str, seen: int) -> None:
    # Lines travel apart from the terminal event; wait (briefly) until all have arrived.
    js = client.nc.jetstream()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        info = await js.stream_info(subjects.STREAM_LOGS, subjects_filter=subjects.job_log(job_id))
        total = (info.state.subjects or {}).get(subjects.job_log(job_id), 0)
        if seen >= total:
            return
        await asyncio.sleep(0.05)


def _detail(node_id: str, reason: str, exit_code: int | None) -> str:
    parts = []
    if node_id:
        parts.append(f"node {node_id}")
    if exit_code is not None:
        parts.append(f"exit code {exit_code}")
    if reason:
        parts.append(reason)
    return f" ({', '.join(parts)})" if parts else ""


def _exit_code(view: JobView) -> int | None:
    return view.attempts[-1].exit_code if view.attempts else None


# Where the scheduler holds a job -> the state a person should see.
_HELD = {"timer": "waiting", "group": "waiting", "key": "waiting", "parked": "waiting", "room": "waiting"}


async def _why_waiting(client: Client, view: JobView) -> tuple[str, str] | None:
    """(state, reason) from the scheduler that holds a not-yet-running job, if any."""
    if view.state not in ("queued", "waiting", "ready"):
        return None
    try:
        replies = await client.queues(wait=0.5)
        explained = await client.explain(subjects.partition_of(view.queue, replies[0].partitions), view.job_id)
    except JobmeshError:
        return None  # no scheduler answered: show what the tracker knows
    if not explained.where:
        return None
    if explained.where == "ready":
        return ("waiting", explained.reason) if not explained.reason.startswith("queued") else ("queued", "")
    if explained.where == "released":
        return view.state, explained.reason
    return _HELD.get(explained.where, view.state), explained.reason


async def cmd_status(args: argparse.Namespace) -> int:
    client = await Client.connect()
    try:
        view = await client.get(args.job_id)
        held = await _why_waiting(client, view)
    finally:
        await client.close()
    state, reason = held if held else (view.state, view.reason)
    if args.json:
        out = msgspec.to_builtins(view)
        out["state"], out["reason"] = state, reason
        _json(out)
        return EXIT_OK
    print(f"job      {view.job_id}  {view.name}")
    print(f"state    {state}" + (f" ({reason})" if reason else ""))
    print(f"queue    {view.queue}  tenant {view.tenant}  priority {view.spec.priority}")
    print(f"node     {view.node_id or '-'}   attempt {view.attempt}")
    print(f"submitted {_when(view.submitted_at)}  updated {_when(view.updated_at)}")
    for a in view.attempts:
        error = f" {a.error.code}: {a.error.message}" if a.error else ""
        code = "" if a.exit_code is None else f" exit {a.exit_code}"
        print(f"attempt {a.attempt}: {a.state} on {a.node_id or '-'}{code}{error}")
        if a.output_tail:
            for line in a.output_tail.rstrip("\n").splitlines()[-10:]:
                print(f"    | {line}")
    if view.events:
        print("events:")
        for e in view.events:
            print(f"  {_when(e.at)}  #{e.attempt} {e.kind}" + (f"  {e.detail}" if e.detail else ""))
    return EXIT_OK


async def cmd_list(args: argparse.Namespace) -> int:
    client = await Client.connect()
    try:
        reply = await client.list(limit=args.limit, state=args.state, queue=args.queue)
    finally:
        await client.close()
    if args.json:
        _json(reply.jobs)
        return EXIT_OK
    print(f"{'JOB':32}  {'STATE':10} {'QUEUE':10} {'NODE':12} {'EXIT':>4}  {'SUBMITTED':12}  NAME")
    for j in reply.jobs:
        code = "" if j.exit_code is None else str(j.exit_code)
        print(f"{j.job_id:32}  {j.state:10} {j.queue:10} {j.node_id or '-':12} {code:>4}  {_when(j.submitted_at):12}  {j.name}")
    return EXIT_OK


async def cmd_logs(args: argparse.Namespace) -> int:
    client = await Client.connect()
    try:
        js = client.nc.jetstream()
        subject = subjects.job_log(args.job_id)
        sub = await js.subscribe(subject, ordered_consumer=True, stream=subjects.STREAM_LOGS)
        terminal = asyncio.Event()
        if args.follow:
            async def on_update(msg) -> None:
                if _update_decoder.decode(msg.data).state in TERMINAL_STATES:
                    terminal.set()

            await client.nc.subscribe(subjects.job_watch(args.job_id), cb=on_update)
            try:
                if (await client.get(args.job_id)).state in TERMINAL_STATES:
                    terminal.set()
            except NotFound:
                pass
        while True:
            try:
                msg = await sub.next_msg(timeout=0.5)
            except Exception:  # noqa: BLE001 - nats-py raises its own TimeoutError here
                pending = (await sub.consumer_info()).num_pending
                if pending == 0 and (not args.follow or terminal.is_set()):
                    break
                continue
            line = _log_decoder.decode(msg.data)
            print(line.line, file=sys.stdout if line.stream == "stdout" else sys.stderr, flush=True)
    finally:
        await client.close()
    return EXIT_OK


async def cmd_nodes(args: argparse.Namespace) -> int:
    client = await Client.connect()
    try:
        reply = await client.nodes()
    finally:
        await client.close()
    if args.json:
        _json(reply.nodes)
        return EXIT_OK
    now = time.time()
    print(f"{'NODE':16} {'STATE':9} {'CPU (m) used/cap':>18} {'MEM (MiB) used/cap':>20} {'GPU':>7} {'JOBS':>5} {'ZONE':8} {'HEARTBEAT':>9}  LABELS")
    for v in reply.nodes:
        n, a = v.node, v.allocated
        state = "draining" if n.draining else ("alive" if v.alive else "gone")
        gpu = f"{a.gpu}/{n.gpu}" + (f" {n.gpu_kind}" if n.gpu_kind else "")
        labels = ",".join(f"{k}={val}" for k, val in sorted(n.labels.items()))
        print(
            f"{n.node_id:16} {state:9} {f'{a.cpu_milli}/{n.cpu_milli}':>18} {f'{a.memory_mb}/{n.memory_mb}':>20} {gpu:>7}"
            f" {v.reservations:>5} {n.zone or '-':8} {now - n.heartbeat_at:8.1f}s  {labels}"
        )
    if not reply.nodes:
        err("no executor node has registered")
    return EXIT_OK


async def cmd_queues(args: argparse.Namespace) -> int:
    client = await Client.connect()
    try:
        replies = await client.queues()
    finally:
        await client.close()
    rows = sorted(
        ((p.partition, p.owner, q) for r in replies for p in r.owned for q in p.queues), key=lambda row: row[2].queue
    )
    if args.json:
        _json([{"partition": part, "owner": owner, **msgspec.structs.asdict(q)} for part, owner, q in rows])
        return EXIT_OK
    print(f"{'QUEUE':16} {'PENDING':>8} {'IN FLIGHT':>9} {'RATE':>7} {'CAP':>5}  {'TENANTS (pending)':30} WAITING")
    for part, owner, q in rows:
        tenants = ", ".join(f"{t}={n}" for t, n in sorted(q.tenants.items())) or "-"
        waiting = ", ".join(f"{w}={n}" for w, n in sorted(q.waiting.items())) or "-"
        rate = f"{q.rate:g}/s" if q.rate else "-"
        cap = str(q.max_in_flight) if q.max_in_flight else "-"
        print(f"{q.queue:16} {q.pending:>8} {q.in_flight:>9} {rate:>7} {cap:>5}  {tenants:30} {waiting}")
    if not rows:
        err("no queue has seen a job yet")
    return EXIT_OK


async def cmd_queue_set(args: argparse.Namespace) -> int:
    from jobmesh.runtime.clusterconfig import put_config
    from jobmesh.contract.messages.v1 import QueueConfig

    config = _checked(QueueConfig, {"rate": args.rate, "burst": args.burst, "max_in_flight": args.max_in_flight})
    await _put(put_config, f"queue.{_name(args.name, 'queue')}", config)
    err(f"queue {args.name}: rate {config.rate:g}/s, burst {config.burst}, max in flight {config.max_in_flight} (0 = unlimited)")
    return EXIT_OK


async def cmd_tenant_set(args: argparse.Namespace) -> int:
    from jobmesh.runtime.clusterconfig import put_config
    from jobmesh.contract.messages.v1 import TenantConfig

    config = _checked(TenantConfig, {"weight": args.weight})
    await _put(put_config, f"tenant.{_name(args.name, 'tenant')}", config)
    err(f"tenant {args.name}: weight {config.weight:g}")
    return EXIT_OK


async def cmd_zones_set(args: argparse.Namespace) -> int:
    from jobmesh.runtime.clusterconfig import put_config
    from jobmesh.contract.messages.v1 import ZoneMap

    try:
        raw = msgspec.json.decode(open(args.file, "rb").read())
    except (OSError, msgspec.DecodeError) as exc:
        raise UsageError(f"cannot read {args.file}: {exc}", field="file") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{args.file} must hold a JSON object", field="file")
    config = _checked(ZoneMap, raw)
    await _put(put_config, "zones", config)
    err(f"zone map set: {len(config.distances)} zones, default distance {config.default}")
    return EXIT_OK


def _checked(kind, raw: dict):
    from jobmesh.contract.codec import Codec
    from jobmesh.contract.strict import reject_unknown_fields

    payload = msgspec.json.encode({"type": kind.__struct_config__.tag, **raw})
    value = Codec(kind).decode(payload)
    reject_unknown_fields(payload, kind)  # a typo in a config file must not pass silently
    return value


def _name(name: str, what: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,128}", name):
        raise UsageError(f"{what} name {name!r} may only hold letters, digits, '_', '.' and '-'", field="name")
    return name


async def _put(put, key: str, value) -> None:
    client = await Client.connect()
    try:
        await put(client.nc.jetstream(), key, value)
    finally:
        await client.close()


async def cmd_health(args: argparse.Namespace) -> int:
    from jobmesh.contract.messages.v1 import HealthReply

    client = await Client.connect()
    try:
        reply = await client.nc.request(subjects.health(args.service), b"{}", timeout=3)
        health = msgspec.json.decode(reply.data, type=HealthReply)
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
        err(f"{args.service}: no answer ({type(exc).__name__})")
        return EXIT_UNAVAILABLE
    finally:
        await client.close()
    if args.json:
        _json(health)
    else:
        print(f"{health.service} {health.instance}: {'ok' if health.ok else 'NOT OK'} ({health.detail})")
    return EXIT_OK if health.ok else EXIT_UNAVAILABLE


async def cmd_provision(args: argparse.Namespace) -> int:
    from jobmesh.runtime.provisioning import provision
    from jobmesh.runtime.settings import Settings

    # The same JOBMESH_* variables the services read: bucket TTLs are fixed at creation.
    settings = Settings.from_env("provision")
    client = await Client.connect()
    try:
        await provision(
            client.nc.jetstream(),
            node_ttl=settings.node_ttl_seconds,
            lease_ttl=settings.lease_ttl_seconds,
            update=True,
            replicas=settings.stream_replicas,
        )
    finally:
        await client.close()
    err("streams and buckets are provisioned (existing streams updated to the current limits)")
    return EXIT_OK


def cmd_dev(args: argparse.Namespace) -> int:
    from jobmesh.dev import devcluster

    if args.stop:
        return devcluster.stop()
    if args.detach:
        code = devcluster.detach()
        if code == 0 and args.demo:
            import uvloop

            from jobmesh.client.client import resolve_nats_url
            from jobmesh.dev.demo import run_demo

            uvloop.run(run_demo(resolve_nats_url()))
        return code
    return devcluster.foreground(demo=args.demo)


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a bad command line; here 2 means "cluster unreachable"."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jobmesh", description="Distributed job management over NATS JetStream.")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("submit", help="submit a job; prints its id")
    p.add_argument("--json", action="store_true")
    _add_spec_flags(p)
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("run", help="submit a job, follow it, exit with its outcome (0 ok, 3 failed)")
    _add_spec_flags(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("status", help="show one job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("logs", help="print a job's output")
    p.add_argument("job_id")
    p.add_argument("-f", "--follow", action="store_true", help="keep following until the job ends")
    p.set_defaults(fn=cmd_logs)

    p = sub.add_parser("list", help="recent jobs, newest first")
    p.add_argument("--json", action="store_true")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--state", default="")
    p.add_argument("--queue", default="")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("nodes", help="executor nodes with capacity, allocation and last heartbeat")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_nodes)

    p = sub.add_parser("queues", help="depth per queue and tenant")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_queues)

    p = sub.add_parser("queue", help="configure a queue")
    qsub = p.add_subparsers(dest="action", required=True)
    q = qsub.add_parser(
        "set", help="set a queue's release rate and in-flight cap; sets all three (omitted = 0 = unlimited)"
    )
    q.add_argument("name")
    q.add_argument("--rate", type=float, default=0.0, help="jobs released per second")
    q.add_argument("--burst", type=int, default=0, help="token bucket size (default: max(1, rate))")
    q.add_argument("--max-in-flight", type=int, default=0, help="released and not yet ended")
    q.set_defaults(fn=cmd_queue_set)

    p = sub.add_parser("tenant", help="configure a tenant")
    tsub = p.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("set", help="set a tenant's fair-share weight (default 1)")
    t.add_argument("name")
    t.add_argument("--weight", type=float, required=True)
    t.set_defaults(fn=cmd_tenant_set)

    p = sub.add_parser("zones", help="configure zone distances for data locality")
    zsub = p.add_subparsers(dest="action", required=True)
    z = zsub.add_parser("set", help='load {"distances": {"a": {"b": 1}}, "default": 100} from a JSON file')
    z.add_argument("file")
    z.set_defaults(fn=cmd_zones_set)

    p = sub.add_parser("health", help="ask a service whether it is healthy")
    p.add_argument("service", choices=["trigger", "scheduler", "binder", "executor", "tracker"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_health)

    p = sub.add_parser(
        "provision", help="create missing streams and buckets, and bring existing streams to today's limits"
    )
    p.set_defaults(fn=cmd_provision)

    p = sub.add_parser("dev", help="run a local cluster: nats-server, Postgres, the five services")
    p.add_argument("--detach", action="store_true", help="start in the background; return once healthy")
    p.add_argument("--stop", action="store_true", help="stop a detached cluster")
    p.add_argument("--demo", action="store_true", help="run a few demo jobs once healthy")
    p.set_defaults(fn=cmd_dev)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.fn is cmd_dev:
            code = cmd_dev(args)
        else:
            import uvloop

            code = uvloop.run(args.fn(args))
    except KeyboardInterrupt:
        return 130
    except NotFound as exc:
        err(str(exc))
        code = EXIT_NOT_FOUND
    except Unavailable as exc:
        err(str(exc))
        code = EXIT_UNAVAILABLE
    except JobmeshError as exc:
        if exc.retryable:  # overloaded, a lost race: the same command may work in a moment
            err(f"{exc.code}: {exc} (retryable)")
            sys.exit(EXIT_UNAVAILABLE)
        err(f"{exc.code}: {exc}" + (f" (field {exc.field})" if exc.field else ""))
        code = EXIT_USAGE
    sys.exit(code)
