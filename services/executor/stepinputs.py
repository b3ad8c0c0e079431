"""A workflow step's ``${steps...}`` and ``${item...}`` placeholders, filled in as its job starts.

The trigger filled ``${input...}`` and ``${workflow.id}`` at submit. What is left reads the
results of upstream steps by reference from the object store ``jm_results``, each kept
under ``step/<job_id>`` (:func:`~jobmesh.contract.subjects.step_result_key`) by the
executor that ran it:

- ``${steps.<name>.result[.path]}``: the result of ``spec.step.upstream[name]``; for a
  mapped upstream, the list of its items' results in item order, read through the map's
  manifest (``map/<job_id>``, written by the scheduler: ``{"jobs": [...]}``);
- ``${item[.path]}``: element ``index`` of the list at ``item.path`` in the result of
  ``item.job_id`` (:class:`~jobmesh.contract.messages.v1.ItemRef`).

A stored result that is not JSON is its text. The placeholders are filled in the process's
or container's argv and env values, the handler's input and the stdin
(:func:`~jobmesh.contract.steptemplates.fill`); argv and env stay strings, so a value that
is not one becomes its JSON text there. A reference to a step that is not an upstream, a
result that is not stored, or a path that is not in it fails the attempt ``input_invalid``
with the placeholder named: the spec cannot run as it stands.

The pure part (:func:`wanted`, :func:`fill_inputs`) is apart from the reading
(:class:`ResultReader`, :func:`read_values`); :func:`resolve` does them in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import nats.errors
from nats.js.errors import ObjectDeletedError, ObjectNotFoundError

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import ContainerRuntime, HandlerRuntime, JobRuntime, JobSpec, ProcessRuntime, StepRef
from jobmesh.contract.steptemplates import MISSING, Ref, as_text, fill, refs_in, walk
from jobmesh.errors import InvalidSpec, Unavailable
from jobmesh.runtime.backoff import backoff

log = logging.getLogger("jobmesh.executor.stepinputs")

# What the executor fills in; the trigger filled ``input`` and ``workflow`` at submit.
KINDS = frozenset({"steps", "item"})
FETCH_CONCURRENCY = 32  # object-store reads of one attempt at once (a mapped upstream's items)
FETCH_TIMEOUT = 30.0  # one read, before it counts as failed
FETCH_TRIES = 5  # reads of one object before the attempt fails for the outage


@dataclass(frozen=True, slots=True)
class Absent:
    """A value that could not be read, and why (quoted in the placeholder's error)."""

    why: str


@dataclass(frozen=True, slots=True)
class Wanted:
    """What a spec's placeholders read.

    Attributes:
        steps: the upstream steps named in ``${steps...}``.
        item: whether ``${item...}`` appears.
    """

    steps: frozenset[str] = frozenset()
    item: bool = False

    def __bool__(self) -> bool:
        return bool(self.steps) or self.item


@dataclass(frozen=True, slots=True)
class StepValues:
    """The values the placeholders are filled from.

    Attributes:
        results: each wanted upstream's result by step name (a mapped step's: the list of
            its items' results), or why it is absent.
        item_source: the result the item is taken from (``item.job_id``'s), or why absent.
    """

    results: Mapping[str, Any] = field(default_factory=dict)
    item_source: Any = None


@dataclass(frozen=True, slots=True)
class StepInputs:
    """The parts of a spec that hold placeholders, filled in.

    Attributes:
        runtime: the runtime, its argv, env or input filled.
        stdin: the inline stdin, filled.
    """

    runtime: JobRuntime
    stdin: str


# --- the pure part -------------------------------------------------------------------


def _templated(spec: JobSpec) -> Iterator[tuple[str, Any]]:
    """Each field of ``spec`` placeholders are filled in, by its name in an error."""
    runtime = spec.runtime
    if isinstance(runtime, ProcessRuntime | ContainerRuntime):
        for i, arg in enumerate(runtime.argv):
            yield f"runtime.argv[{i}]", arg
        for name, value in runtime.env.items():
            yield f"runtime.env.{name}", value
    elif isinstance(runtime, HandlerRuntime):
        yield "runtime.input", runtime.input
    if spec.stdin:
        yield "stdin", spec.stdin


def wanted(spec: JobSpec) -> Wanted:
    """Which results the placeholders of a workflow step's spec read.

    Args:
        spec: the job's spec.

    Returns:
        The upstream steps and whether the item is read; empty for a job that is no
        workflow step, or whose spec holds no ``${steps...}`` or ``${item...}``.

    Raises:
        InvalidSpec: a placeholder is malformed (``field`` names where).
    """
    if spec.step is None or not (spec.step.upstream or spec.step.item):
        # Not a workflow step, or one whose templates read nothing (the trigger fills in
        # the rest at submit): a job a step's handler submitted keeps its ${...} as written.
        return Wanted()
    steps: set[str] = set()
    item = False
    for where, value in _templated(spec):
        for _, ref in refs_in(value, where):
            if ref.kind == "steps":
                steps.add(ref.step)
            elif ref.kind == "item":
                item = True
    return Wanted(frozenset(steps), item)


# The kernel refuses one argument or variable longer than this (MAX_ARG_STRLEN, 32 pages).
MAX_ARG_BYTES = 128 * 1024


def _check_arg(where: str, text: str) -> None:
    """A filled argv element or env value the process could not be started with is the
    input's fault (``input_invalid``), not the executor's: refuse it here, by name."""
    if "\x00" in text:
        raise InvalidSpec(f"{where}: the filled-in value holds a NUL character, which no argument can", field=where)
    size = len(text.encode())
    if size > MAX_ARG_BYTES:
        raise InvalidSpec(
            f"{where}: the filled-in value is {size} bytes, over the {MAX_ARG_BYTES}-byte limit of one argument;"
            " read a large result through stdin or a handler's input instead",
            field=where,
        )


def fill_inputs(spec: JobSpec, values: StepValues) -> StepInputs:
    """The spec's argv, env, input and stdin with ``${steps...}`` and ``${item...}`` filled.

    Args:
        spec: a workflow step's spec (``spec.step`` is set).
        values: the results it reads (:func:`read_values`).

    Returns:
        The filled runtime and stdin.

    Raises:
        InvalidSpec: a placeholder names no upstream of the step, a result it reads is
            absent, or a path is not in it; the message names the placeholder and
            ``field`` the spec's field.
    """
    step = spec.step
    if step is None:
        return StepInputs(spec.runtime, spec.stdin)

    def lookup(ref: Ref) -> Any:
        return _value_of(ref, step, values)

    def filled(where: str, value: Any, text: bool) -> Any:
        try:
            out = fill(value, lookup, KINDS)
        except InvalidSpec as exc:
            raise InvalidSpec(f"{where}: {exc}", field=where) from None
        # An argv element, an env value and the stdin stay strings.
        out = as_text(out) if text else out
        if text and where != "stdin" and out != value:
            _check_arg(where, out)
        return out

    runtime = spec.runtime
    if isinstance(runtime, ProcessRuntime | ContainerRuntime):
        argv = [filled(f"runtime.argv[{i}]", arg, True) for i, arg in enumerate(runtime.argv)]
        env = {name: filled(f"runtime.env.{name}", value, True) for name, value in runtime.env.items()}
        runtime = msgspec.structs.replace(runtime, argv=argv, env=env)
    elif isinstance(runtime, HandlerRuntime):
        runtime = msgspec.structs.replace(runtime, input=filled("runtime.input", runtime.input, False))
    stdin = filled("stdin", spec.stdin, True) if spec.stdin else spec.stdin
    return StepInputs(runtime, stdin)


def _value_of(ref: Ref, step: StepRef, values: StepValues) -> Any:
    placeholder = f"${{{ref.text}}}"
    if ref.kind == "steps":
        if ref.step not in step.upstream:
            named = ", ".join(sorted(step.upstream)) or "none"
            raise InvalidSpec(f"{placeholder}: step {ref.step!r} is not an upstream of this step (upstream: {named})")
        base = values.results.get(ref.step, Absent(f"the result of step {ref.step!r} was not read"))
        if isinstance(base, Absent):
            raise InvalidSpec(f"{placeholder}: {base.why}")
        found = walk(base, ref.path)
        if found is MISSING:
            raise InvalidSpec(f"{placeholder}: the result of step {ref.step!r} has no {_shown(ref.path)}")
        return found
    item = step.item
    if item is None:
        raise InvalidSpec(f"{placeholder}: this job is no mapped item, so it has no ${{item}}")
    source = values.item_source
    if isinstance(source, Absent):
        raise InvalidSpec(f"{placeholder}: {source.why}")
    items = walk(source, item.path)
    if not isinstance(items, list):
        what = "no" if items is MISSING else "no list at"
        raise InvalidSpec(f"{placeholder}: the result of job {item.job_id} has {what} {_shown(item.path)}")
    if item.index >= len(items):
        raise InvalidSpec(
            f"{placeholder}: the list at {_shown(item.path)} in the result of job {item.job_id} has"
            f" {len(items)} items, none at index {item.index}"
        )
    found = walk(items[item.index], ref.path)
    if found is MISSING:
        raise InvalidSpec(f"{placeholder}: item {item.index} has no {_shown(ref.path)}")
    return found


def _shown(path: list[str | int]) -> str:
    return ".".join(str(p) for p in path) if path else "value"


def decode_result(data: bytes) -> Any:
    """A kept result as a template reads it: its JSON, or its text when it is not JSON.

    Args:
        data: the stored bytes.

    Returns:
        The decoded value.
    """
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", "replace")


# --- the reading ---------------------------------------------------------------------


class ResultObjects(Protocol):
    """The object store ``jm_results`` as far as reading kept results goes (nats-py's)."""

    async def get(self, name: str) -> Any:
        """Object ``name`` (its ``data``); raises ObjectNotFoundError when there is none."""
        ...


class ResultReader:
    """Reads objects of ``jm_results`` for one attempt: each once (cached), at most
    ``concurrency`` at a time, an outage retried a few times.

    Args:
        store: the ``jm_results`` object store.
        concurrency: reads at once.
        timeout: seconds one read may take.
        tries: reads of one object before its outage fails the attempt.
        retry_base: the first delay between tries, doubling.
    """

    def __init__(
        self,
        store: ResultObjects,
        concurrency: int = FETCH_CONCURRENCY,
        timeout: float = FETCH_TIMEOUT,
        tries: int = FETCH_TRIES,
        retry_base: float = 0.2,
    ) -> None:
        self._store = store
        self._limit = asyncio.Semaphore(concurrency)
        self._timeout = timeout
        self._tries = tries
        self._retry_base = retry_base
        self._cache: dict[str, asyncio.Future[bytes | None]] = {}

    async def read(self, key: str) -> bytes | None:
        """The bytes of object ``key``, or None when it is not stored.

        Raises:
            Unavailable: the store did not answer after every try.
        """
        known = self._cache.get(key)
        if known is None:
            known = self._cache[key] = asyncio.ensure_future(self._fetch(key))
        return await known

    async def _fetch(self, key: str) -> bytes | None:
        tries = 0
        while True:
            try:
                async with self._limit:
                    found = await asyncio.wait_for(self._store.get(key), self._timeout)
                return found.data or b""
            except (ObjectNotFoundError, ObjectDeletedError):
                return None
            except (nats.errors.Error, TimeoutError) as exc:
                tries += 1
                reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
                if tries >= self._tries:
                    raise Unavailable(f"cannot read {subjects.OBJ_RESULTS}/{key}: {reason}") from exc
                delay = backoff(tries, base=self._retry_base, cap=5.0, key=key)
                log.warning("cannot read %s/%s (%s); retrying in %.1fs", subjects.OBJ_RESULTS, key, reason, delay)
                await asyncio.sleep(delay)


async def read_values(step: StepRef, want: Wanted, reader: ResultReader) -> StepValues:
    """Read what the placeholders want: each named upstream's result and the item's source.

    Args:
        step: the job's place in its run (its upstream steps and item).
        want: what the placeholders read (:func:`wanted`).
        reader: the attempt's reader.

    Returns:
        The values; one that is not stored is an :class:`Absent` saying which.

    Raises:
        Unavailable: the store did not answer.
    """
    names = sorted(name for name in want.steps if name in step.upstream)  # the rest fail in the fill
    item = step.item if want.item else None
    reads = [_upstream(name, step, reader) for name in names]
    if item is not None:
        reads.append(_kept(reader, item.job_id, f"the result of job {item.job_id} (the list the item comes from)"))
    got = await asyncio.gather(*reads)
    results = dict(zip(names, got[: len(names)], strict=True))
    return StepValues(results, got[-1] if item is not None else None)


async def _kept(reader: ResultReader, job_id: str, what: str) -> Any:
    data = await reader.read(subjects.step_result_key(job_id))
    if data is None:
        return Absent(f"{what} is not stored in {subjects.OBJ_RESULTS} (it kept none, or it expired)")
    return decode_result(data)


async def _upstream(name: str, step: StepRef, reader: ResultReader) -> Any:
    ref = step.upstream[name]
    if not ref.mapped:
        return await _kept(reader, ref.job_id, f"the result of step {name!r} (job {ref.job_id})")
    manifest_key = subjects.map_manifest_key(ref.job_id)
    data = await reader.read(manifest_key)
    if data is None:
        return Absent(
            f"the item list of mapped step {name!r} (job {ref.job_id}) is not stored in {subjects.OBJ_RESULTS}"
        )
    try:
        manifest = msgspec.json.decode(data)
    except msgspec.DecodeError:
        manifest = None
    jobs = manifest.get("jobs") if isinstance(manifest, dict) else None
    if not isinstance(jobs, list) or not all(isinstance(job, str) for job in jobs):
        return Absent(f"the item list of mapped step {name!r} ({subjects.OBJ_RESULTS}/{manifest_key}) is malformed")
    items = await asyncio.gather(
        *(_kept(reader, job, f"the result of item {i} of step {name!r} (job {job})") for i, job in enumerate(jobs))
    )
    return next((item for item in items if isinstance(item, Absent)), items)


async def resolve(spec: JobSpec, reader: ResultReader | None) -> StepInputs | None:
    """A workflow step's argv, env, input and stdin, filled from the results they read.

    Args:
        spec: the job's spec.
        reader: the attempt's reader of ``jm_results`` (None: this node has no result store).

    Returns:
        The filled parts; None when the spec holds nothing to fill (no workflow step, or
        no ``${steps...}`` / ``${item...}``).

    Raises:
        InvalidSpec: the placeholders cannot be filled (``input_invalid``).
        Unavailable: the store did not answer.
    """
    want = wanted(spec)
    if not want or spec.step is None:
        return None
    if reader is None:
        raise InvalidSpec(f"this executor has no result store ({subjects.OBJ_RESULTS}) to read step results from")
    return fill_inputs(spec, await read_values(spec.step, want, reader))
