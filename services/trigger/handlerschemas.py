"""The input types of the Python handlers executors host, to check a handler job at submit.

Executors write a ``HandlerInfo`` per handler into the KV bucket ``jm_handlers`` (key = the
handler's name) with the JSON Schema of its input type. The trigger keeps a live view of
the bucket (a KV watch, started afresh after a reconnect) with one compiled ``jsonschema``
validator per handler, so that an input that does not match is refused at submit with the
field named (``jobs[0].spec.runtime.input.n``) and nothing is created.

The check agrees with what the worker's msgspec decode accepts, which is stricter than JSON
Schema in one place: msgspec takes ``1.0`` for no ``int`` (JSON Schema's ``integer`` allows
any number with a zero fraction), so here ``integer`` is an int only. An int for a ``float``
field is accepted by both.

A handler without a record is accepted: no executor has advertised it yet (or the view has
not caught up), and the executor checks the input against the type when the attempt runs.
Before accepting, the trigger reads the key once (handler jobs only, and only on a miss), so
a record written a moment ago is not missed while the watch catches up. A miss is remembered
for :data:`MISS_TTL` seconds (at most :data:`MAX_MISSES` names, and submits that miss at the
same moment share one read), so a flood of submits for a handler nobody hosts costs one KV
read, not one each; a record written meanwhile comes with the watch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

# jsonschema ships no type stubs (types-jsonschema is not a dependency).
import jsonschema  # type: ignore[import-untyped]
import jsonschema.exceptions  # type: ignore[import-untyped]
import jsonschema.validators  # type: ignore[import-untyped]
import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import HandlerInfo, HandlerRuntime
from jobmesh.errors import InvalidSpec
from jobmesh.runtime.kvwatch import watch_forever

log = logging.getLogger("jobmesh.trigger.handlers")

_decoder = msgspec.json.Decoder(HandlerInfo)
# A miss reads the key itself; past this it is taken as absent (the executor checks later).
LOOKUP_TIMEOUT = 2.0
# How long a read that found no record stands for the handler's record (the watch brings a
# record written meanwhile), and for how many handler names at most.
MISS_TTL = 2.0
MAX_MISSES = 1024


def _msgspec_integer(checker: Any, instance: Any) -> bool:
    """JSON Schema's ``integer`` as msgspec decodes an ``int``: an int, never a float (1.0) or bool."""
    return isinstance(instance, int) and not isinstance(instance, bool)


class HandlerSchema:
    """One handler's input type, compiled.

    Args:
        info: the handler's record.

    Raises:
        jsonschema.exceptions.SchemaError: ``info.input_schema`` is not a JSON Schema.
    """

    def __init__(self, info: HandlerInfo) -> None:
        self.info = info
        kind = jsonschema.validators.validator_for(info.input_schema, default=jsonschema.Draft202012Validator)
        kind.check_schema(info.input_schema)
        # The worker decodes with msgspec: what it refuses must be refused here too.
        strict = jsonschema.validators.extend(
            kind, type_checker=kind.TYPE_CHECKER.redefine("integer", _msgspec_integer)
        )
        self.validator: Any = strict(info.input_schema)

    def problem(self, value: Any) -> tuple[str, str] | None:
        """Where and why ``value`` does not match the input type; None when it does.

        Args:
            value: the handler input, as builtin data.

        Returns:
            (path below the input, in the spec's notation: ``.n``, ``.items[2]``, "" for the
            input itself; the reason), or None.
        """
        error = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
        if error is None:
            return None
        return _path_of(error.absolute_path, error), error.message


def _path_of(parts: Iterable[Any], error: jsonschema.exceptions.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
    if error.validator == "required" and isinstance(error.instance, dict):
        # The error sits on the object; the field a person must add is the missing one.
        missing = next((p for p in error.validator_value if p not in error.instance), None)
        if missing is not None:
            path += f".{missing}"
    return path


class HandlerSchemas:
    """A live view of ``jm_handlers``: each handler's compiled input type.

    Args:
        js: the JetStream context.
        clock: monotonic seconds (how old a remembered miss is).
        miss_ttl: seconds a read that found no record is remembered.
        max_misses: how many handler names' misses are remembered at most (oldest go first).
    """

    def __init__(
        self,
        js: JetStreamContext,
        *,
        clock: Callable[[], float] = time.monotonic,
        miss_ttl: float = MISS_TTL,
        max_misses: int = MAX_MISSES,
    ) -> None:
        self._js = js
        self._clock = clock
        self._miss_ttl = miss_ttl
        self._max_misses = max_misses
        self._schemas: dict[str, HandlerSchema | None] = {}  # None: a record with a bad schema
        self._misses: OrderedDict[str, float] = OrderedDict()  # name -> when a read found none
        self._lookups: dict[str, asyncio.Future[HandlerSchema | None]] = {}  # reads under way
        self._restart = asyncio.Event()
        self.ready = asyncio.Event()  # the watch delivered every record the bucket held

    def restart(self) -> None:
        """Watch afresh (after a reconnect: a watch can lag far behind the bucket then)."""
        self._restart.set()

    def apply(self, key: str, value: bytes | None) -> None:
        """Apply one record (None: deleted). A record that does not decode, or whose schema is
        not a JSON Schema, is logged and leaves that handler unchecked at submit.

        Args:
            key: the handler's name.
            value: its ``HandlerInfo`` as JSON, or None.
        """
        if value is None:
            self._schemas.pop(key, None)
            return
        self._schemas[key] = _compiled(key, value)
        self._misses.pop(key, None)

    async def run(self) -> None:
        """Watch the bucket forever (a background task), afresh after each :meth:`restart`."""
        js = self._js

        async def open_watch() -> Any:
            return await (await js.key_value(subjects.KV_HANDLERS)).watchall()

        await watch_forever(
            open_watch, self._follow, self._restart, name="handler view", bucket=subjects.KV_HANDLERS, log=log
        )

    async def _follow(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is None:  # the initial values are in
                self.ready.set()
                continue
            self.apply(entry.key, None if entry.operation in ("DEL", "PURGE") else entry.value)

    async def check(self, runtime: HandlerRuntime, where: str) -> None:
        """Refuse a handler input that does not match the handler's input type.

        Args:
            runtime: the job's handler runtime.
            where: the runtime's path in the request (``jobs[0].spec.runtime``).

        Raises:
            InvalidSpec: naming the field (``jobs[0].spec.runtime.input.n``).
        """
        if runtime.handler in self._schemas:
            schema = self._schemas[runtime.handler]
        elif self._missed_lately(runtime.handler):
            schema = None
        else:
            schema = await self._shared_lookup(runtime.handler)
        if schema is None:
            return
        found = schema.problem(runtime.input)
        if found is None:
            return
        path, reason = found
        field = f"{where}.input{path}"
        raise InvalidSpec(
            f"the input does not match handler {runtime.handler!r} (input type {schema.info.input_type}): {reason}"
            f" - at `$.{field}`",
            field=field,
        )

    def _missed_lately(self, name: str) -> bool:
        """Whether a read found no record for ``name`` less than ``miss_ttl`` seconds ago."""
        at = self._misses.get(name)
        if at is None:
            return False
        if self._clock() - at < self._miss_ttl:
            return True
        del self._misses[name]
        return False

    def _remember_miss(self, name: str) -> None:
        self._misses[name] = self._clock()
        self._misses.move_to_end(name)
        while len(self._misses) > self._max_misses:
            self._misses.popitem(last=False)

    async def _shared_lookup(self, name: str) -> HandlerSchema | None:
        """:meth:`_lookup`, once for every submit that misses ``name`` while it runs."""
        pending = self._lookups.get(name)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(name))
            self._lookups[name] = pending
            pending.add_done_callback(lambda _: self._lookups.pop(name, None))
        # Shielded: one submit that goes away (its request cancelled) does not fail the others'.
        return await asyncio.shield(pending)

    async def _lookup(self, name: str) -> HandlerSchema | None:
        schema = await self._read(name)
        if schema is None and name not in self._schemas:
            self._remember_miss(name)
        return schema

    async def _read(self, name: str) -> HandlerSchema | None:
        try:
            kv = await self._js.key_value(subjects.KV_HANDLERS)
            entry = await asyncio.wait_for(kv.get(name), LOOKUP_TIMEOUT)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except (TimeoutError, nats.errors.Error) as exc:
            # Checking is a courtesy at submit; the executor checks when the attempt runs.
            log.warning(
                "handler view: cannot read %s from %s (%s); accepting it unchecked", name, subjects.KV_HANDLERS, exc
            )
            return None
        if not entry.value:
            return None
        schema = _compiled(name, entry.value)
        self._schemas.setdefault(name, schema)  # the watch may have brought a newer one meanwhile
        return schema


def _compiled(key: str, value: bytes) -> HandlerSchema | None:
    try:
        return HandlerSchema(_decoder.decode(value))
    except msgspec.DecodeError as exc:
        log.warning("ignoring a malformed handler record under %s: %s", key, exc)
    except jsonschema.exceptions.SchemaError as exc:
        log.warning(
            "handler %s: its input schema is not a JSON Schema (%s); its inputs are checked at run time",
            key,
            exc.message,
        )
    return None
