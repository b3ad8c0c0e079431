"""The handler worker process: ``python -m jobmesh.sdk.worker --commands FD --events FD MODULE...``.

The executor's pool starts it (inside the node's isolation), and it:

1. imports every MODULE (dotted names or ``.py`` files), which registers their handlers;
   a module that fails to import is reported (``LoadFailed``) and the worker exits 1;
2. reports each handler's :class:`~jobmesh.contract.messages.v1.HandlerInfo` (``Ready``);
3. serves one job at a time until its command pipe closes: converts the input into the
   handler's type (a mismatch fails ``input_invalid`` naming ``$.runtime.input.<field>``),
   calls the handler in the main thread (an async one on the worker's one event loop),
   checks the output against its type and sends it back as JSON.

What a handler prints, and its traceback when it raises, go to the worker's stdout and
stderr, which the pool reads as the job's log. Modules stay imported between jobs, so a
model a handler loads at import or caches is loaded once per worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import sys
import threading
import traceback
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec

from jobmesh.contract.messages.v1.jobs import FailureCode
from jobmesh.errors import JobmeshError
from jobmesh.sdk import protocol
from jobmesh.sdk.context import Context
from jobmesh.sdk.modules import import_handler_module
from jobmesh.sdk.registry import DEFAULT_REGISTRY, Handler, Registry, handler_info

__all__ = ["HANDLER_FAILED", "HANDLER_MISSING", "INPUT_FIELD", "INPUT_INVALID", "Worker", "input_error", "main"]

INPUT_INVALID: FailureCode = "input_invalid"
HANDLER_FAILED: FailureCode = "handler_failed"
HANDLER_MISSING: FailureCode = "handler_missing"
# A raise the worker should not serve on after (SystemExit, KeyboardInterrupt, MemoryError,
# RecursionError): reported to the pool, which fails the job handler_failed and starts a
# fresh worker. A plain Exception unwinds cleanly, and the worker serves the next job.
HANDLER_FAILED_REPLACE = "handler_failed_replace"
# Where the input sits in a job spec; a run-time mismatch names its fields under it.
INPUT_FIELD = "$.runtime.input"


def input_error(entry: Handler, exc: msgspec.MsgspecError) -> str:
    """The ``input_invalid`` message for input that does not match ``entry``'s input type.

    Args:
        entry: the handler.
        exc: msgspec's validation or decode error (``Expected `int`, got `str` - at `$.n```).

    Returns:
        The message, with the path under the job's input: ``... - at `$.runtime.input.n```.
    """
    text = str(exc)
    if " - at `$" in text:
        text = text.replace(" - at `$", f" - at `{INPUT_FIELD}", 1)
    else:
        text = f"{text} - at `{INPUT_FIELD}`"
    return f"the input of handler {entry.name!r} does not match {entry.input_type.__name__}: {text}"


class _Link:
    """A job's Context's way to the pool: events on the worker's pipe."""

    def __init__(self, worker: Worker, seq: int) -> None:
        self._worker = worker
        self._seq = seq

    def progress(self, fraction: float, message: str) -> None:
        self._worker.send(protocol.Progress(self._seq, fraction, message))

    def heartbeat(self, checkpoint: str) -> None:
        self._worker.send(protocol.Heartbeat(self._seq, checkpoint))

    def submit(self, spec_json: bytes, key: str) -> Future[str]:
        return self._worker.submit(self._seq, spec_json, key)


class Worker:
    """One worker: its pipes, its handlers and the job it serves.

    Args:
        commands_fd: the pipe the pool sends commands on.
        events_fd: the pipe the worker sends events on.
        registry: where the imported modules register their handlers.
    """

    def __init__(self, commands_fd: int, events_fd: int, registry: Registry = DEFAULT_REGISTRY) -> None:
        self._commands_fd = commands_fd
        self._events_fd = events_fd
        self._registry = registry
        self._send_lock = threading.Lock()  # handlers may report from threads of their own
        self._calls: queue.Queue[protocol.Call] = queue.Queue()
        self._current: tuple[int, threading.Event] | None = None
        self._pending: dict[int, Future[str]] = {}
        self._requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._home = Path.cwd()
        self._input_decoders: dict[str, msgspec.json.Decoder[Any]] = {}
        self._output_decoders: dict[str, msgspec.json.Decoder[Any]] = {}

    def send(self, message: protocol.Event) -> None:
        """Send one event to the pool."""
        frame = protocol.encode_frame(message)
        with self._send_lock:
            view = memoryview(frame)
            while view:
                view = view[os.write(self._events_fd, view) :]

    def submit(self, seq: int, spec_json: bytes, key: str) -> Future[str]:
        """Ask the pool to submit a follow-up job for job ``seq``; the future gets the answer."""
        future: Future[str] = Future()
        with self._send_lock:
            self._requests += 1
            request = self._requests
            self._pending[request] = future
        self.send(protocol.Submit(seq, request, spec_json, key))
        return future

    def load(self, modules: list[str]) -> bool:
        """Import ``modules`` and report their handlers (``Ready``) or the first failure.

        Returns:
            Whether every module imported.
        """
        origin: dict[str, str] = {}
        for module in modules:
            before = set(self._registry.names())
            try:
                import_handler_module(module)
            except BaseException as exc:  # noqa: BLE001 - whatever a module raises, the pool must hear it
                traceback.print_exc()
                sys.stderr.flush()
                self.send(protocol.LoadFailed(module, f"{type(exc).__name__}: {exc}"))
                return False
            for name in set(self._registry.names()) - before:
                origin[name] = module
        infos = [
            handler_info(entry, origin.get(entry.name, entry.fn.__module__)) for entry in self._registry.handlers()
        ]
        self.send(protocol.Ready(infos))
        return True

    def serve(self) -> None:
        """Serve jobs until the pool closes the command pipe (then the process exits)."""
        threading.Thread(target=self._read_commands, name="jobmesh-worker-commands", daemon=True).start()
        while True:
            call = self._calls.get()
            # Before any of the job's code: a pool that hears nothing more may run it elsewhere.
            self.send(protocol.Accepted(call.seq))
            self.send(self._run(call))

    def _read_commands(self) -> None:
        decoder = msgspec.msgpack.Decoder(protocol.Command)
        try:
            while (body := protocol.read_frame(self._commands_fd)) is not None:
                command = decoder.decode(body)
                if isinstance(command, protocol.Call):
                    self._calls.put(command)
                elif isinstance(command, protocol.Cancel):
                    current = self._current
                    if current is not None and current[0] == command.seq:
                        current[1].set()
                else:
                    self._answer(command)
        except Exception:  # noqa: BLE001 - a broken pipe from the pool: nothing left to serve
            traceback.print_exc()
        # The pool is gone (or broke the protocol): nobody will read a result, and a hung
        # handler must not keep this process alive.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def _answer(self, done: protocol.SubmitDone) -> None:
        with self._send_lock:
            future = self._pending.pop(done.request, None)
        if future is None:
            return
        if done.code:
            future.set_exception(JobmeshError.from_wire(done.code, done.message, done.field))
        else:
            future.set_result(done.job_id)

    def _run(self, call: protocol.Call) -> protocol.Event:
        try:
            return self._run_handler(call)
        finally:
            self._current = None
            try:
                os.chdir(self._home)
            except OSError:
                pass  # gone: the next job changes to its own directory anyway
            sys.stdout.flush()
            sys.stderr.flush()
            mark = protocol.end_mark(call.seq)
            os.write(1, mark)
            os.write(2, mark)

    def _run_handler(self, call: protocol.Call) -> protocol.Event:
        entry = self._registry.get(call.handler)
        if entry is None:
            known = ", ".join(self._registry.names()) or "none"
            return protocol.Failed(call.seq, HANDLER_MISSING, f"no handler {call.handler!r} here (it has: {known})")
        try:
            value = self._decoder(self._input_decoders, entry.name, entry.input_type).decode(call.input)
        except msgspec.MsgspecError as exc:
            return protocol.Failed(call.seq, INPUT_INVALID, input_error(entry, exc))
        cancelled = threading.Event()
        self._current = (call.seq, cancelled)
        workdir = Path(call.workdir)
        ctx = Context(call.job_id, call.attempt, workdir, call.checkpoint, _Link(self, call.seq), cancelled)
        try:
            os.chdir(workdir)
        except OSError:
            pass  # the node's isolation does not show this worker the attempt's directory
        try:
            args = (value, ctx) if entry.takes_context else (value,)
            if entry.is_async:
                if self._loop is None:
                    self._loop = asyncio.new_event_loop()
                result = self._loop.run_until_complete(entry.fn(*args))
            else:
                result = entry.fn(*args)
        except BaseException as exc:  # noqa: BLE001 - SystemExit too: a handler never ends the worker quietly
            traceback.print_exc()
            unsafe = not isinstance(exc, Exception) or isinstance(exc, MemoryError | RecursionError)
            code = HANDLER_FAILED_REPLACE if unsafe else HANDLER_FAILED
            return protocol.Failed(call.seq, code, f"handler {entry.name!r} raised {_describe(exc)}")
        try:
            raw = msgspec.json.encode(result)
            self._decoder(self._output_decoders, entry.name, entry.output_type).decode(raw)
        except (msgspec.MsgspecError, TypeError) as exc:
            message = f"handler {entry.name!r} returned output that does not match {entry.output_type.__name__}: {exc}"
            return protocol.Failed(call.seq, HANDLER_FAILED, message)
        return protocol.Done(call.seq, raw)

    @staticmethod
    def _decoder(cache: dict[str, msgspec.json.Decoder[Any]], name: str, kind: type) -> msgspec.json.Decoder[Any]:
        decoder = cache.get(name)
        if decoder is None:
            decoder = cache[name] = msgspec.json.Decoder(kind)
        return decoder


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run a worker process.

    Args:
        argv: the command line after the program name (``sys.argv[1:]`` when None).

    Returns:
        1 when a module failed to import (the process otherwise ends when the pool goes).
    """
    parser = argparse.ArgumentParser(prog="python -m jobmesh.sdk.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, required=True, help="descriptor of the pipe from the pool")
    parser.add_argument("--events", type=int, required=True, help="descriptor of the pipe to the pool")
    parser.add_argument("modules", nargs="+", help="handler modules: dotted names or .py files")
    args = parser.parse_args(argv)
    # Whatever a handler prints reaches the pipe at once: a crash must not swallow the
    # lines that explain it.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True, write_through=True)
    worker = Worker(args.commands, args.events)
    if not worker.load(args.modules):
        return 1
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
