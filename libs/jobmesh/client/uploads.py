"""Files uploaded with a submit: which local files go where, their digests, and the upload.

A job's working directory can start from files the client uploads to the object store
bucket ``jm_uploads``. Each object is named for its content (``sha256/<hex>``,
:func:`jobmesh.contract.subjects.upload_key`), so a file uploaded twice is stored once and
the executor checks what it fetches against the name. Planning is local and happens before
anything is sent (:func:`plan_uploads`: paths expanded, destinations checked, sizes added up
against ``MAX_UPLOAD_BYTES``, contents hashed), so a bad path or a file too large costs no
round trip; :func:`put_uploads` then stores what the bucket does not hold yet.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, cast

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import MAX_UPLOAD_BYTES, InputFile
from jobmesh.contract.validation import input_path_problem
from jobmesh.errors import Unavailable, UsageError

__all__ = [
    "LocalUpload",
    "UploadProgress",
    "bytes_upload",
    "parse_node_path",
    "parse_upload",
    "plan_uploads",
    "put_uploads",
    "upload_items",
]

# Read this much at a time while hashing (and what the progress display moves by).
_CHUNK = 1024 * 1024
# A progress callback: (destination path, bytes sent of this file, its size).
UploadProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LocalUpload:
    """One file to upload: where its bytes are, and the ``InputFile`` the spec carries.

    Attributes:
        source: the local file, or the bytes themselves (a stdin read to its end).
        input: the spec's entry (``object`` = its upload key, ``size``, ``mode``, ``path``).
    """

    source: Path | bytes
    input: InputFile

    @property
    def digest(self) -> str:
        """The content's sha256 (hex), as the object name holds it."""
        return self.input.object.rpartition("/")[2]


def parse_upload(text: str) -> tuple[Path, str]:
    """What ``--upload LOCAL[:DEST]`` names: a local path and its place in the working directory.

    Args:
        text: the flag's value; without ``:DEST`` a file keeps its own name (a directory,
            its own name as the folder its files go under).

    Returns:
        The local path and the destination (relative).

    Raises:
        UsageError: an empty local path or a destination that is not relative and inside.
    """
    local, sep, dest = text.rpartition(":")
    if not sep or not local or (not Path(local).exists() and Path(text).exists()):
        local, dest = text, ""  # no DEST (or a local name that holds a ':' itself)
    if not local:
        raise UsageError("--upload needs a local path: --upload LOCAL[:DEST]", field="files")
    path = Path(local)
    dest = dest or path.resolve().name
    problem = input_path_problem(dest)
    if problem:
        raise UsageError(f"--upload {text}: {problem}", field="files")
    return path, dest


def parse_node_path(text: str) -> InputFile:
    """What ``--node-path NODE_PATH[:DEST]`` names: a file or directory on the node, copied in.

    Args:
        text: the flag's value; without ``:DEST`` it keeps its own name.

    Returns:
        The spec's entry.

    Raises:
        UsageError: a node path that is not absolute, or a bad destination.
    """
    node_path, sep, dest = text.rpartition(":")
    if not sep:
        node_path, dest = text, ""
    if not node_path.startswith("/"):
        raise UsageError(f"--node-path {text}: {node_path!r} is not an absolute path on the node", field="files")
    dest = dest or PurePosixPath(node_path).name
    problem = input_path_problem(dest)
    if problem:
        raise UsageError(f"--node-path {text}: {problem}", field="files")
    return InputFile(path=dest, node_path=node_path)


def upload_items(paths: Iterable[str | Path | tuple[str | Path, str]]) -> list[tuple[Path, str]]:
    """(local path, destination) pairs for :func:`plan_uploads` from what ``Client.upload`` takes.

    Args:
        paths: local paths (each keeps its own name in the working directory), or
            (local path, destination) pairs.

    Returns:
        The pairs.

    Raises:
        UsageError: a destination that is not relative and inside the working directory.
    """
    items: list[tuple[Path, str]] = []
    for entry in paths:
        if isinstance(entry, tuple):
            local, dest = Path(entry[0]), entry[1]
        else:
            local = Path(entry)
            dest = local.resolve().name
        problem = input_path_problem(dest)
        if problem:
            raise UsageError(f"cannot upload {local} as {dest!r}: {problem}", field="files")
        items.append((local, dest))
    return items


def plan_uploads(items: Iterable[tuple[Path, str]], already: int = 0) -> list[LocalUpload]:
    """The files to upload for ``items``, hashed, with the total checked against the limit.

    Args:
        items: (local path, destination) pairs; a directory expands to every file below
            it, recursively, each under the destination at its path relative to the
            directory. Symlinks to files are followed; symlinked directories are not
            entered (as ``os.walk`` does), so a loop cannot make the upload endless.
        already: bytes counted toward the limit besides (a stdin uploaded with them).

    Returns:
        One ``LocalUpload`` per file, in the order given (a directory's files sorted).

    Raises:
        UsageError: a path that does not exist or cannot be read, a special file, two
            files for one destination, or a total over ``MAX_UPLOAD_BYTES`` (naming the
            file that crosses it).
    """
    found: list[tuple[Path, str, os.stat_result]] = []
    for local, dest in items:
        found.extend(_expand(local, dest))
    total = already
    for path, _dest, st in found:
        total += st.st_size
        if total > MAX_UPLOAD_BYTES:
            raise UsageError(
                f"{path} ({st.st_size} bytes) takes the upload to {total} bytes, over the limit of"
                f" {MAX_UPLOAD_BYTES} bytes ({MAX_UPLOAD_BYTES // (1024 * 1024)} MiB) per submit;"
                " put large inputs on the node (--node-path) instead",
                field="files",
            )
    planned: list[LocalUpload] = []
    places: dict[str, Path] = {}
    for path, dest, st in found:
        if dest in places:
            raise UsageError(
                f"{path} and {places[dest]} would both be {dest!r} in the working directory", field="files"
            )
        places[dest] = path
        digest = _file_digest(path)
        # Like git: executable or not; the executor applies it to the job's copy.
        mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
        planned.append(
            LocalUpload(
                source=path,
                input=InputFile(path=dest, object=subjects.upload_key(digest), size=st.st_size, mode=mode),
            )
        )
    return planned


def bytes_upload(data: bytes, dest: str = "stdin") -> LocalUpload:
    """An upload of bytes in memory (a stdin too large to travel inline).

    Args:
        data: the bytes.
        dest: the name it is known by in messages (a stdin is not put in the work dir).

    Returns:
        The upload; its ``input.object`` is what ``stdin_object`` names.
    """
    digest = hashlib.sha256(data).hexdigest()
    return LocalUpload(source=data, input=InputFile(path=dest, object=subjects.upload_key(digest), size=len(data)))


async def put_uploads(
    js: JetStreamContext, uploads: Sequence[LocalUpload], progress: UploadProgress | None = None
) -> int:
    """Store each upload in ``jm_uploads`` unless an object of that name already holds it.

    Args:
        js: a JetStream context of the client's connection.
        uploads: what :func:`plan_uploads` (or :func:`bytes_upload`) planned.
        progress: called in the event loop as bytes go out; an upload skipped because the
            bucket holds it already is reported done at once.

    Returns:
        How many bytes were sent (stored objects skipped).

    Raises:
        Unavailable: the bucket does not exist or NATS failed.
        UsageError: a file changed between planning and upload (its digest no longer
            matches its name); the half-stored object is deleted.
    """
    try:
        store = await js.object_store(subjects.OBJ_UPLOADS)
    except nats.js.errors.BucketNotFoundError as exc:
        raise Unavailable(f"the {subjects.OBJ_UPLOADS} object store does not exist: run `jobmesh provision`") from exc
    except nats.errors.Error as exc:
        raise Unavailable(f"cannot open {subjects.OBJ_UPLOADS}: {type(exc).__name__} {exc}".rstrip()) from exc
    sent = 0
    done: set[str] = set()
    for upload in uploads:
        name, size, dest = upload.input.object, upload.input.size, upload.input.path
        if name in done or await _stored(store, name, size):
            done.add(name)
            if progress is not None:
                progress(dest, size, size)
            continue
        await _put(store, upload, progress)
        done.add(name)
        sent += size
    return sent


async def _stored(store: ObjectStore, name: str, size: int) -> bool:
    try:
        info = await store.get_info(name)
    except nats.js.errors.ObjectNotFoundError:
        return False
    except nats.errors.Error as exc:
        raise Unavailable(f"cannot read {subjects.OBJ_UPLOADS}/{name}: {type(exc).__name__} {exc}".rstrip()) from exc
    return info.size == size


async def _put(store: ObjectStore, upload: LocalUpload, progress: UploadProgress | None) -> None:
    name, dest, size = upload.input.object, upload.input.path, upload.input.size
    label = str(upload.source) if isinstance(upload.source, Path) else dest
    loop = asyncio.get_running_loop()

    def report(sent: int) -> None:
        # nats-py reads a file in a worker thread; the display belongs to the loop.
        if progress is not None:
            loop.call_soon_threadsafe(progress, dest, sent, size)

    try:
        if isinstance(upload.source, bytes):
            info = await store.put(name, upload.source)
            report(size)
        else:
            f = await asyncio.to_thread(upload.source.open, "rb")
            try:
                # nats-py reads any object with readinto (its annotation is narrower).
                info = await store.put(name, cast(io.BufferedIOBase, _CountingReader(f, report)))
            finally:
                f.close()
    except OSError as exc:
        raise UsageError(f"cannot read {label}: {exc.strerror or exc}", field="files") from exc
    except nats.errors.Error as exc:
        raise Unavailable(f"cannot upload {dest} to {subjects.OBJ_UPLOADS}: {type(exc).__name__} {exc}") from exc
    if _hex_of(info.digest or "") != upload.digest or info.size != size:
        # Changed since it was hashed: the object no longer holds what its name says.
        try:
            await store.delete(name)
        except nats.errors.Error:
            pass  # the executor checks the digest of what it fetches; it will refuse it
        raise UsageError(f"{label} changed while it was uploaded; submit again", field="files")


class _CountingReader:
    """A binary file that says how much of it has been read (for the progress display)."""

    def __init__(self, f: BinaryIO, report: Callable[[int], None]) -> None:
        self._f = f
        self._report = report
        self._read = 0

    def readinto(self, buffer: bytearray) -> int:
        n = self._f.readinto(buffer)  # type: ignore[attr-defined]  # a binary file has it
        self._read += n or 0
        self._report(self._read)
        return int(n or 0)


def _hex_of(digest: str) -> str:
    # nats-py names an object's digest "SHA-256=<urlsafe base64>".
    _, _, encoded = digest.partition("=")
    try:
        return base64.urlsafe_b64decode(encoded).hex()
    except ValueError:
        return ""


def _expand(local: Path, dest: str) -> list[tuple[Path, str, os.stat_result]]:
    try:
        st = local.stat()
    except OSError as exc:
        raise UsageError(f"cannot upload {local}: {exc.strerror or exc}", field="files") from exc
    if stat.S_ISREG(st.st_mode):
        return [(local, dest, st)]
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"cannot upload {local}: not a regular file or a directory", field="files")
    out: list[tuple[Path, str, os.stat_result]] = []
    for folder, dirs, files in os.walk(local, onerror=_walk_error):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            relative = path.relative_to(local).as_posix()
            try:
                file_st = path.stat()
            except OSError as exc:
                raise UsageError(f"cannot upload {path}: {exc.strerror or exc}", field="files") from exc
            if not stat.S_ISREG(file_st.st_mode):
                raise UsageError(f"cannot upload {path}: not a regular file", field="files")
            out.append((path, f"{dest.rstrip('/')}/{relative}", file_st))
    return out


def _walk_error(exc: OSError) -> None:
    raise UsageError(f"cannot upload {exc.filename}: {exc.strerror or exc}", field="files") from exc


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}", field="files") from exc
    return h.hexdigest()
