"""An attempt's result file: where it travels (inline, object store) and its size limits.

A process job finds a path in ``JOBMESH_RESULT_PATH`` (a file in its working directory) and
may write its result there. After a successful exit the executor reads it:

- up to ``result_inline_bytes`` (``JOBMESH_RESULT_INLINE_BYTES``, 16 KiB) of valid UTF-8
  travels inline in ``JobSucceeded.result``;
- anything else up to ``result_max_bytes`` (``JOBMESH_RESULT_MAX_BYTES``, 64 MiB) goes to
  the object store ``jm_results`` under ``<job_id>/<attempt>`` (``<job_id>/<attempt>/<rank>``
  for a gang member other than rank 0, ``subjects.result_key`` with its rank), and ``result_ref`` is that key;
- a bigger file fails the attempt with ``result_too_large``.

``result_bytes`` is the file's size. A result path that is not a regular file (a directory,
a symbolic link) is ignored with a warning: the executor never follows a link a job made.

A job that keeps its result (``JobSpec.keep_result``, every workflow step) has it stored
besides under ``step/<job_id>`` (:func:`~jobmesh.contract.subjects.step_result_key`),
whatever its size, and ``null`` when it left none; the attempt stores it before it reports
the success, so a step that starts after it always finds it there. One key per job, not per
attempt: a later step knows only the job (of a gang, rank 0 alone keeps it).

:func:`plan_result` is the decision; :class:`ResultStore` is the upload.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import nats.errors
from nats.js.errors import APIError

from jobmesh.contract import subjects
from jobmesh.errors import Overloaded, Unavailable
from jobmesh.runtime.backoff import backoff

log = logging.getLogger("jobmesh.executor.results")

RESULT_PATH_VAR = "JOBMESH_RESULT_PATH"
RESULT_FILE = ".jobmesh-result"


@dataclass(frozen=True, slots=True)
class ResultLimits:
    """The size limits of a result file.

    Attributes:
        inline_bytes: at most this many bytes of UTF-8 text travel inline.
        max_bytes: a bigger file fails the attempt.
    """

    inline_bytes: int = 16 * 1024
    max_bytes: int = 64 * 1024 * 1024


ResultRoute = Literal["inline", "store", "too_large"]


def plan_result(size: int, limits: ResultLimits) -> ResultRoute:
    """Where a result file of ``size`` bytes goes, before its content is looked at.

    Args:
        size: the file's size in bytes.
        limits: the limits.

    Returns:
        ``inline`` when it is small enough to travel inline (if it turns out to be valid
        UTF-8; otherwise it goes to the store), ``store`` when it goes to the object store,
        ``too_large`` when it is over the limit.
    """
    if size > limits.max_bytes:
        return "too_large"
    if size <= limits.inline_bytes:
        return "inline"
    return "store"


def too_large_message(size: int, limits: ResultLimits) -> str:
    """The ``result_too_large`` explanation for a file of ``size`` bytes."""
    return (
        f"the result file ({RESULT_PATH_VAR}) is {size} bytes, over the limit of {limits.max_bytes} "
        "bytes (JOBMESH_RESULT_MAX_BYTES)"
    )


@dataclass(frozen=True, slots=True)
class Result:
    """A result file as the terminal event carries it.

    Attributes:
        size: the file's size in bytes.
        text: its content, when it travels inline.
        ref: else its key in ``jm_results``; both empty when it is too large.
        too_large: it is over ``max_bytes``: the attempt fails.
    """

    size: int
    text: str = ""
    ref: str = ""
    too_large: bool = False


class ResultObjects(Protocol):
    """The object store ``jm_results`` as the executor uses it (nats-py's ``ObjectStore``):
    results are put, kept results of earlier steps read (:mod:`jobmesh.executor.stepinputs`)."""

    async def put(self, name: str, data: bytes | io.BufferedIOBase) -> object: ...

    async def get(self, name: str) -> Any: ...


ObjectPut = ResultObjects  # its name before kept results were read back

EMPTY_KEPT = b"null"  # what a job that keeps its result but left none keeps


class ResultStore:
    """Reads result files and uploads the large ones to ``jm_results``, retrying outages.

    Args:
        store: the ``jm_results`` object store.
        limits: the size limits.
        retry_base: first delay after a failed upload, doubling up to ``retry_max``.
        retry_max: longest delay between two tries.
    """

    def __init__(
        self, store: ResultObjects, limits: ResultLimits, retry_base: float = 0.2, retry_max: float = 5.0
    ) -> None:
        self.store = store
        self.limits = limits
        self._retry_base = retry_base
        self._retry_max = retry_max

    async def collect(self, job_id: str, attempt: int, path: Path, keep: bool = False, rank: int = 0) -> Result | None:
        """The result an attempt left at ``path``, uploaded when it does not travel inline.

        Args:
            job_id: the job.
            attempt: the attempt.
            path: the result path the job was given.
            keep: store it besides as the job's kept result (``JobSpec.keep_result``);
                ``null`` when there is none. Not for a result over the limit (the attempt
                fails).
            rank: the gang member whose result it is (``subjects.result_key``).

        Returns:
            The result, or None when the job left no regular file there.

        Raises:
            Overloaded: the result store is full (that does not pass with a retry).
        """
        opened = await asyncio.to_thread(_open_regular, path)
        if isinstance(opened, str):
            log.warning("job %s attempt %d: its result file %s is ignored: %s", job_id, attempt, path, opened)
            opened = None
        if opened is None:
            if keep:
                await self.keep(job_id, attempt, io.BytesIO(EMPTY_KEPT))
            return None
        stream, size = opened
        with stream:
            route = plan_result(size, self.limits)
            if route == "too_large":
                return Result(size, too_large=True)
            if route == "inline":
                data = await asyncio.to_thread(stream.read)
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    stream.seek(0)  # binary: it goes to the store like a large one
                else:
                    if keep:
                        await self.keep(job_id, attempt, io.BytesIO(data or EMPTY_KEPT))
                    return Result(len(data), text=text)
            key = subjects.result_key(job_id, attempt, rank)
            await self._upload(key, job_id, attempt, stream)
            if keep:
                stream.seek(0)
                await self.keep(job_id, attempt, stream)
            return Result(size, ref=key)

    async def keep(self, job_id: str, attempt: int, stream: io.BufferedIOBase) -> None:
        """Store ``stream`` as the job's kept result (``step/<job_id>``), replacing what an
        earlier attempt kept.

        Args:
            job_id: the job.
            attempt: the attempt that keeps it (for the log).
            stream: the result's bytes, from their start.

        Raises:
            Overloaded: the result store is full.
        """
        await self._upload(subjects.step_result_key(job_id), job_id, attempt, stream)

    async def _upload(self, key: str, job_id: str, attempt: int, stream: io.BufferedIOBase) -> None:
        tries = 0
        while True:
            try:
                await self.store.put(key, stream)
                return
            except APIError as exc:
                if (exc.description or "").startswith("maximum") or exc.err_code == 10047:
                    raise Overloaded(f"the result store {subjects.OBJ_RESULTS} is full: {exc.description}") from exc
                reason = f"{exc.description or exc}"
            except (nats.errors.Error, Unavailable, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            tries += 1
            delay = backoff(tries, base=self._retry_base, cap=self._retry_max, key=key)
            log.warning(
                "job %s attempt %d: could not store its result as %s (%s); retrying in %.1fs",
                job_id,
                attempt,
                key,
                reason,
                delay,
            )
            await asyncio.sleep(delay)
            stream.seek(0)


def _open_regular(path: Path) -> tuple[io.BufferedReader, int] | str | None:
    """Open ``path`` for reading if it is a regular file, without following a link.

    Returns:
        The open file and its size; None when there is no file; else why it is not used.
    """
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the open.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "it is a symbolic link, which is not followed"
        return f"it cannot be read: {exc}"
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return "it is not a regular file"
    return os.fdopen(fd, "rb"), info.st_size
