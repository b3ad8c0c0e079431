"""The job-spec flags of ``jobmesh submit`` and ``jobmesh run``, and the ``JobSpec`` they make.

Flags get the same checks as API input: the spec is round-tripped through the wire type and
the contract's own validation, so the command line refuses what the trigger would refuse,
before anything is sent. An error names the spec field and the flag that sets it.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import msgspec

from jobmesh.contract.codec import Codec, encode
from jobmesh.contract.messages.v1 import (
    Constraints,
    JobRuntime,
    JobSpec,
    Locality,
    NoopRuntime,
    ProcessRuntime,
    Resources,
    Timeouts,
)
from jobmesh.contract.validation import validate_spec
from jobmesh.errors import InvalidMessage, UsageError

# Spec field (as errors name it, relative to the spec) -> the flag that sets it.
FLAG_OF_FIELD = {
    "name": "--name",
    "queue": "--queue",
    "tenant": "--tenant",
    "priority": "--priority",
    "resources.cpu_milli": "--cpu",
    "resources.memory_mb": "--memory",
    "resources.gpu": "--gpu",
    "resources.gpu_kind": "--gpu-kind",
    "resources.disk_mb": "--disk",
    "constraints.arch": "--arch",
    "constraints.labels": "--label",
    "constraints.isolation": "--isolation",
    "constraints.handler": "--handler",
    "locality.zone": "--zone",
    "locality.dataset": "--dataset",
    "timeouts.run": "--timeout",
    "timeouts.queue": "--queue-timeout",
    "group": "--group",
    "concurrency_key": "--concurrency-key",
    "concurrency_limit": "--concurrency-limit",
    "not_before": "--delay",
}
_spec_codec: Codec[JobSpec] = Codec(JobSpec)


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, not negative.

    Args:
        text: the flag's value.

    Returns:
        The number of seconds.

    Raises:
        argparse.ArgumentTypeError: otherwise (argparse names the flag in its message).
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds >= 0")
    return value


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    """Add the flags that describe a job, and its command after ``--``.

    Args:
        p: the parser of ``submit`` or ``run``.
    """
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
    p.add_argument("--queue-timeout", type=seconds, default=0.0, help="expire if not started within this many seconds")
    p.add_argument("--delay", type=seconds, default=0.0, help="do not start before this many seconds from now")
    p.add_argument("--group", default="", help="sequential group: one at a time, in submission order")
    p.add_argument("--concurrency-key", default="", help="at most --concurrency-limit running per key")
    p.add_argument("--concurrency-limit", type=int, default=0)
    p.add_argument("--key", default="", help="idempotency key (same key, same job)")
    p.add_argument("--noop", action="store_true", help="use the built-in no-op runtime")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")


def command_of(args: argparse.Namespace) -> list[str]:
    """The job's command: what follows ``--`` (or the first word that is not a flag).

    Args:
        args: the parsed command line.

    Returns:
        The argv, possibly empty.
    """
    command: list[str] = args.command
    return command[1:] if command[:1] == ["--"] else command


def spec_from(args: argparse.Namespace, now: float | None = None) -> JobSpec:
    """The job spec the flags describe, checked as the trigger would check it.

    Args:
        args: the parsed command line of ``submit`` or ``run``.
        now: the submission time (``--delay`` counts from it); the clock when omitted.

    Returns:
        A valid ``JobSpec``.

    Raises:
        UsageError: no command and no ``--noop``, or a ``--label`` that is not ``key=value``.
        InvalidMessage: a value the spec refuses; the message names the field and the flag.
    """
    now = time.time() if now is None else now
    command = command_of(args)
    if args.noop:
        runtime: JobRuntime = NoopRuntime()
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
    raw: dict[str, Any] = dict(
        runtime=runtime,
        name=args.name or (" ".join(command)[:200] if command else "noop"),
        queue=args.queue,
        tenant=args.tenant,
        priority=args.priority,
        resources=Resources(
            cpu_milli=args.cpu, memory_mb=args.memory, gpu=args.gpu, gpu_kind=args.gpu_kind, disk_mb=args.disk
        ),
        constraints=Constraints(arch=args.arch, labels=labels, isolation=args.isolation, handler=args.handler),
        locality=Locality(zone=args.zone, dataset=args.dataset),
        timeouts=Timeouts(run=args.timeout, queue=args.queue_timeout),
        group=args.group,
        concurrency_key=args.concurrency_key,
        concurrency_limit=args.concurrency_limit,
        not_before=now + args.delay if args.delay > 0 else 0.0,
    )
    try:
        # Round-trip through the wire type so flags get the same checks as API input.
        spec = _spec_codec.decode(encode(msgspec.structs.replace(JobSpec(runtime=runtime), **raw)))
        validate_spec(spec, now=now)
    except InvalidMessage as exc:
        raise _with_flag(exc) from exc
    return spec


def _with_flag(exc: InvalidMessage) -> InvalidMessage:
    # Errors name the spec field ("spec.timeouts.queue"); a person typed a flag.
    field = (exc.field or "").removeprefix("spec.")
    flag = next((f for name, f in FLAG_OF_FIELD.items() if field == name or field.startswith(name + ".")), "")
    if not flag:
        return exc
    return type(exc)(f"{exc.message} (flag {flag})", field=exc.field)
