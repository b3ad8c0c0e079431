"""The job-spec flags of ``jobmesh submit`` and ``jobmesh run``, and the ``JobSpec`` they make.

Flags get the same checks as API input: the spec is round-tripped through the wire type and
the contract's own validation, so the command line refuses what the trigger would refuse,
before anything is sent. An error names the spec field and the flag that sets it.

The retry flags make the job's ``RetryPolicy`` (:func:`retry_policy_from`): ``--retries N``
is ``max_attempts`` N+1; a flag left out keeps the policy's default. ``--fallback-json``
takes a ``FallbackSpec`` as JSON text or as the path of a file that holds it.

``--after ID[:ok|notok|any]`` (repeatable) makes the job wait for another one to end, as
Slurm's afterok, afternotok and afterany: ``JobSpec.after`` with ``when`` succeeded
(the default), failed or ended (:func:`dependency`).

What runs and what it starts from (runtime, variables, files, stdin, network, secrets) are
the flags of ``runtimeflags``.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import msgspec

from jobmesh.client.cli.runtimeflags import (
    JobInputs,
    add_runtime_flags,
    check_secret_names,
    env_from,
    inputs_from,
    runtime_from,
)
from jobmesh.contract.codec import Codec, encode
from jobmesh.contract.messages.v1 import (
    FAILURE_CODES,
    RETRY_ON_BY_DEFAULT,
    Constraints,
    ContainerRuntime,
    Dependency,
    FallbackSpec,
    HandlerRuntime,
    JobSpec,
    Locality,
    NoopRuntime,
    Resources,
    RetryPolicy,
    Timeouts,
)
from jobmesh.contract.messages.v1.jobs import DependencyCondition
from jobmesh.contract.strict import reject_unknown_fields
from jobmesh.contract.validation import validate_spec
from jobmesh.errors import InvalidMessage, UsageError

# Spec field (as errors name it, relative to the spec) -> the flag that sets it.
FLAG_OF_FIELD = {
    "name": "--name",
    "queue": "--queue",
    "tenant": "--tenant",
    "priority": "--priority",
    "preempt": "--preempt",
    "preemptible": "--not-preemptible",
    "replicas": "--replicas",
    "same": "--same",
    "spread": "--spread",
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
    "timeouts.heartbeat": "--heartbeat-timeout",
    "timeouts.total": "--total-timeout",
    "retry.max_attempts": "--retries",
    "retry.backoff": "--backoff",
    "retry.backoff_max": "--backoff-max",
    "retry.retry_on": "--retry-on",
    "retry.migrate_after": "--migrate-after",
    "retry.migrate_zone": "--migrate-zone",
    "retry.fallback": "--fallback-json",
    "group": "--group",
    "concurrency_key": "--concurrency-key",
    "concurrency_limit": "--concurrency-limit",
    "not_before": "--delay",
    "runtime.input": "--input",
    "runtime.handler": "--handler",
    "runtime.image": "--image",
    "runtime.env": "--env",
    "files": "--upload/--node-path",
    "network": "--network",
    "secrets": "--secret",
    "secrets_as": "--secrets-as",
    "stdin": "-i",
    "stdin_object": "-i",
    "after": "--after",
}
# ``--after ID:COND``: Slurm's words for what a dependency waits for (afterok, afternotok,
# afterany), and the contract's.
AFTER_CONDITIONS: dict[str, DependencyCondition] = {"ok": "succeeded", "notok": "failed", "any": "ended"}
# A retry policy allows at most this many attempts (RetryPolicy.max_attempts).
MAX_RETRIES = 99
_spec_codec: Codec[JobSpec] = Codec(JobSpec)
_fallback_codec: Codec[FallbackSpec] = Codec(FallbackSpec)


MAX_LIMIT = 1000  # the largest --limit of a list command (one page of the tracker or trigger)


def page_size(text: str) -> int:
    """A ``--limit`` flag's value: a whole number from 1 to :data:`MAX_LIMIT`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and {MAX_LIMIT}")
    return value


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


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, more than 0.

    Args:
        text: the flag's value.

    Returns:
        The number of seconds.

    Raises:
        argparse.ArgumentTypeError: otherwise.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds > 0")
    return value


def count(text: str) -> int:
    """An argparse type: a whole number, not negative.

    Args:
        text: the flag's value.

    Returns:
        The number.

    Raises:
        argparse.ArgumentTypeError: otherwise.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def retries(text: str) -> int:
    """An argparse type: how many times to retry (0 to ``MAX_RETRIES``).

    Args:
        text: the flag's value.

    Returns:
        The number of retries.

    Raises:
        argparse.ArgumentTypeError: otherwise.
    """
    value = count(text)
    if value > MAX_RETRIES:
        raise argparse.ArgumentTypeError(f"{value} is more than {MAX_RETRIES} (a job has at most 100 attempts)")
    return value


def failure_code(text: str) -> str:
    """An argparse type: one of the contract's failure codes.

    Args:
        text: the flag's value.

    Returns:
        The code.

    Raises:
        argparse.ArgumentTypeError: for a code the contract does not define.
    """
    if text not in FAILURE_CODES:
        raise argparse.ArgumentTypeError(
            f"unknown failure code {text!r}; the codes are: {', '.join(sorted(FAILURE_CODES))}"
        )
    return text


def dependency(text: str) -> Dependency:
    """An argparse type: ``ID``, ``ID:ok``, ``ID:notok`` or ``ID:any`` as a dependency.

    Args:
        text: the flag's value: a job id, and what its end must be for this job to run
            (``ok``: it succeeded, the default; ``notok``: it failed or expired; ``any``:
            whatever it did, a cancel included).

    Returns:
        The ``Dependency`` (its id is checked with the rest of the spec).

    Raises:
        argparse.ArgumentTypeError: an empty id or a condition other than ok, notok, any.
    """
    job_id, sep, condition = text.partition(":")
    if not job_id:
        raise argparse.ArgumentTypeError(f"{text!r} names no job: give ID[:ok|notok|any]")
    if sep and condition not in AFTER_CONDITIONS:
        raise argparse.ArgumentTypeError(
            f"{condition!r} is not ok, notok or any (ID:ok waits for success, ID:notok for a failure, ID:any for any end)"
        )
    return Dependency(job_id=job_id, when=AFTER_CONDITIONS[condition or "ok"])


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    """Add the flags that describe a job, and its command after ``--``.

    Args:
        p: the parser of ``submit`` or ``run``.
    """
    p.add_argument("--name", default="")
    p.add_argument("--queue", default="default")
    p.add_argument("--tenant", default="default")
    p.add_argument("--priority", type=int, default=5, help="0-9, higher runs first (default 5)")
    p.add_argument(
        "--preempt",
        action="store_true",
        help="when it fits nowhere, stop lower-priority jobs to make room (its queue must allow it)",
    )
    p.add_argument(
        "--not-preemptible",
        dest="preemptible",
        action="store_false",
        help="a higher-priority job may never stop this one (default: it may)",
    )
    gang = p.add_argument_group("gang (members on nodes of their own, all started together, or none)")
    gang.add_argument(
        "--replicas", type=int, default=1, metavar="N", help="run N members at once, one per node (default 1)"
    )
    gang.add_argument(
        "--same", default="", metavar="zone|label:KEY", help="every member on nodes sharing this attribute's value"
    )
    gang.add_argument(
        "--spread",
        default="spread",
        choices=["spread", "pack"],
        help="spread: the roomiest nodes (default); pack: the fullest that fit",
    )
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
    p.add_argument("--timeout", type=float, default=3600.0, help="run timeout, seconds (default 3600)")
    p.add_argument("--queue-timeout", type=seconds, default=0.0, help="expire if not started within this many seconds")
    p.add_argument("--delay", type=seconds, default=0.0, help="do not start before this many seconds from now")
    p.add_argument("--group", default="", help="sequential group: one at a time, in submission order")
    p.add_argument("--concurrency-key", default="", help="at most --concurrency-limit running per key")
    p.add_argument("--concurrency-limit", type=int, default=0)
    p.add_argument(
        "--heartbeat-timeout", type=seconds, default=None, help="lost if its lease is not renewed (default 10)"
    )
    p.add_argument(
        "--total-timeout", type=seconds, default=None, help="give up this long after the submit, all attempts"
    )
    retry = p.add_argument_group("retry policy (the scheduler retries a failed or lost attempt)")
    retry.add_argument("--retries", type=retries, default=None, metavar="N", help="retry up to N times (N+1 attempts)")
    retry.add_argument("--backoff", type=positive_seconds, default=None, metavar="S", help="wait before the 1st retry")
    retry.add_argument("--backoff-max", type=positive_seconds, default=None, metavar="S", help="longest wait")
    retry.add_argument(
        "--retry-on",
        type=failure_code,
        action="append",
        default=None,
        metavar="CODE",
        help="retry only failures with this code (repeatable; default: " + ", ".join(RETRY_ON_BY_DEFAULT) + ")",
    )
    retry.add_argument("--migrate-after", type=count, default=None, metavar="N", help="avoid a node after N failures")
    retry.add_argument("--migrate-zone", action="store_true", help="when migrating, avoid the node's zone too")
    retry.add_argument(
        "--fallback-json",
        default=None,
        metavar="FILE|JSON",
        help="job to run in its place once every attempt failed, as JSON or a file that holds it, e.g. "
        + """'{"runtime": {"kind": "process", "argv": ["echo", "plan b"]}}'""",
    )
    p.add_argument(
        "--after",
        type=dependency,
        action="append",
        default=[],
        metavar="ID[:ok|notok|any]",
        help="start only once job ID has ended: ok succeeded (default), notok failed, any either (repeatable)",
    )
    p.add_argument("--key", default="", help="idempotency key (same key, same job)")
    add_runtime_flags(p)
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


def spec_from(args: argparse.Namespace, now: float | None = None, inputs: JobInputs | None = None) -> JobSpec:
    """The job spec the flags describe, checked as the trigger would check it.

    Args:
        args: the parsed command line of ``submit`` or ``run``.
        now: the submission time (``--delay`` counts from it); the clock when omitted.
        inputs: the files and stdin, as :func:`runtimeflags.inputs_from` read them; read
            here when omitted (the commands read them first, to upload them after).

    Returns:
        A valid ``JobSpec``.

    Raises:
        UsageError: no command and no other runtime, flags that do not go together, or a
            ``--label`` that is not ``key=value``.
        InvalidMessage: a value the spec refuses; the message names the field and the flag.
    """
    now = time.time() if now is None else now
    command = command_of(args)
    runtime = runtime_from(args, command, env_from(args))
    inputs = inputs_from(args) if inputs is None else inputs
    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--label {item!r} must look like key=value", field="constraints.labels")
        labels[key] = value
    raw: dict[str, Any] = dict(
        runtime=runtime,
        name=args.name or _default_name(runtime, command),
        queue=args.queue,
        tenant=args.tenant,
        priority=args.priority,
        preempt=args.preempt,
        preemptible=args.preemptible,
        resources=Resources(
            cpu_milli=args.cpu, memory_mb=args.memory, gpu=args.gpu, gpu_kind=args.gpu_kind, disk_mb=args.disk
        ),
        # A handler job's placement follows its runtime; with a command, --handler is the
        # bare constraint: a process job on a node that hosts that handler.
        constraints=Constraints(
            arch=args.arch,
            labels=labels,
            isolation=args.isolation,
            handler="" if isinstance(runtime, HandlerRuntime) else args.handler,
        ),
        locality=Locality(zone=args.zone, dataset=args.dataset),
        timeouts=timeouts_from(args),
        retry=retry_policy_from(args),
        group=args.group,
        concurrency_key=args.concurrency_key,
        concurrency_limit=args.concurrency_limit,
        not_before=now + args.delay if args.delay > 0 else 0.0,
        network=args.network,
        secrets=list(args.secret),
        secrets_as=args.secrets_as,
        stdin=inputs.stdin,
        stdin_object=inputs.stdin_object,
        files=inputs.files,
        after=list({d.job_id: d for d in args.after}.values()),  # the same job twice: the last flag
        replicas=args.replicas,
        same=args.same,
        spread=args.spread,
    )
    try:
        check_secret_names(args.secret)
        # Round-trip through the wire type so flags get the same checks as API input.
        spec = _spec_codec.decode(encode(msgspec.structs.replace(JobSpec(runtime=runtime), **raw)))
        validate_spec(spec, now=now)
    except InvalidMessage as exc:
        raise _with_flag(exc) from exc
    return spec


def _default_name(runtime: object, command: list[str]) -> str:
    if isinstance(runtime, NoopRuntime):
        return "noop"
    if isinstance(runtime, HandlerRuntime):
        return f"handler {runtime.handler}"
    if isinstance(runtime, ContainerRuntime):
        return " ".join([runtime.image, *command])[:200]
    return " ".join(command)[:200]


def timeouts_from(args: argparse.Namespace) -> Timeouts:
    """The job's timeouts from ``--timeout``, ``--queue-timeout``, ``--heartbeat-timeout``, ``--total-timeout``.

    Args:
        args: the parsed command line; a timeout flag left out keeps its default.

    Returns:
        The timeouts (checked with the rest of the spec).
    """
    given: dict[str, float] = {"run": args.timeout, "queue": args.queue_timeout}
    if args.heartbeat_timeout is not None:
        given["heartbeat"] = args.heartbeat_timeout
    if args.total_timeout is not None:
        given["total"] = args.total_timeout
    return Timeouts(**given)


def retry_policy_from(args: argparse.Namespace) -> RetryPolicy:
    """The job's retry policy from the retry flags.

    Args:
        args: the parsed command line; a flag left out keeps the policy's default.

    Returns:
        The policy (checked with the rest of the spec).

    Raises:
        UsageError: ``--fallback-json`` names a file that cannot be read.
        InvalidMessage: ``--fallback-json`` is not a valid fallback job.
    """
    given: dict[str, Any] = {}
    if args.retries is not None:
        given["max_attempts"] = args.retries + 1
    if args.backoff is not None:
        given["backoff"] = args.backoff
    if args.backoff_max is not None:
        given["backoff_max"] = args.backoff_max
    if args.retry_on:
        given["retry_on"] = list(dict.fromkeys(args.retry_on))  # a code given twice counts once
    if args.migrate_after is not None:
        given["migrate_after"] = args.migrate_after
    if args.migrate_zone:
        given["migrate_zone"] = True
    if args.fallback_json is not None:
        given["fallback"] = fallback_from(args.fallback_json)
    return RetryPolicy(**given)


def fallback_from(text: str) -> FallbackSpec:
    """The fallback job ``--fallback-json`` gives: JSON text, or the path of a JSON file.

    Args:
        text: the flag's value; text that starts with ``{`` is JSON, anything else a path.

    Returns:
        The fallback job, checked strictly (an unknown field is refused, not ignored).

    Raises:
        UsageError: the file cannot be read.
        InvalidMessage: it is not a valid ``FallbackSpec``; the field is named under
            ``retry.fallback``.
    """
    if text.lstrip().startswith("{"):
        payload = text.encode()
    else:
        try:
            with open(text, "rb") as f:
                payload = f.read()
        except OSError as exc:
            raise UsageError(
                f"--fallback-json: cannot read {text}: {exc.strerror or exc}", field="retry.fallback"
            ) from exc
    try:
        fallback = _fallback_codec.decode(payload)
        reject_unknown_fields(payload, FallbackSpec)
    except InvalidMessage as exc:
        field = "retry.fallback" + (f".{exc.field}" if exc.field else "")
        raise type(exc)(f"fallback job: {exc.message} (flag --fallback-json)", field=field) from exc
    return fallback


def _with_flag(exc: InvalidMessage) -> InvalidMessage:
    # Errors name the spec field ("spec.timeouts.queue"); a person typed a flag.
    field = (exc.field or "").removeprefix("spec.")
    flag = next((f for name, f in FLAG_OF_FIELD.items() if _names(field, name)), "")
    if not flag:
        return exc
    if f"(flag {flag})" in exc.message:
        return exc
    return type(exc)(f"{exc.message} (flag {flag})", field=exc.field)


def _names(field: str, name: str) -> bool:
    # "retry.retry_on[1]" and "retry.fallback.runtime" are set by the flags of their parents.
    return field == name or field.startswith((name + ".", name + "["))
