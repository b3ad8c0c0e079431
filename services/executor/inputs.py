"""The files an attempt's working directory starts with, and a stdin too big to travel inline.

A job lists its files (``JobSpec.files``, each an :class:`~jobmesh.contract.messages.v1.InputFile`):

- an upload: the client put the file into the object store ``jm_uploads`` under its content's
  sha256 (``sha256/<hex>``, :func:`jobmesh.contract.subjects.upload_key`); the executor fetches
  it and checks its size and digest against the spec and the name;
- a node path: a file or directory on the node itself, copied only from under the roots the
  operator allows (``JOBMESH_ALLOWED_INPUT_PATHS``), after resolving symbolic links.

Every file lands inside the working directory: a path with ``..``, an absolute path, or a
path through a symbolic link is refused, and a node directory is copied as plain files and
directories (a link in it is followed only to a target under an allowed root, and never
recreated as a link). :func:`materialize` does all of it, :func:`fetch_stdin` fetches a
``stdin_object``; both raise :class:`InputFileError` (failure code ``input_file_failed``)
with a message naming the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Protocol

import nats.errors
from nats.js.errors import DigestMismatchError, NotFoundError

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import InputFile
from jobmesh.contract.messages.v1.jobs import FailureCode

ALLOWED_PATHS_SETTING = "JOBMESH_ALLOWED_INPUT_PATHS"
_UPLOAD_NAME = re.compile(re.escape(subjects.upload_key("")) + r"([0-9a-f]{64})")
_COPY_CHUNK = 1 << 20
_DIR_MODE = 0o755


class InputFileError(Exception):
    """Raised when a file of an attempt's working directory (or its stdin object) cannot be
    fetched or copied: missing, wrong size or digest, outside the allowed roots or the
    working directory, or the object store did not answer.

    Attributes:
        path: the file's ``InputFile.path`` ("" for a stdin object).
        transient: True when the object store failed to answer (the same fetch may work
            later); False when the file itself is at fault.
        code: the failure code an attempt reports (``input_file_failed``).
    """

    code: ClassVar[FailureCode] = "input_file_failed"

    def __init__(self, path: str, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.transient = transient

    def __str__(self) -> str:
        return self.message


class UploadStore(Protocol):
    """The object store ``jm_uploads`` as far as this module uses it (nats-py's ObjectStore)."""

    async def get(self, name: str, writeinto: Any = None) -> Any:
        """Fetch object ``name``, writing its content into ``writeinto``."""
        ...


def parse_allowed_roots(value: str) -> tuple[Path, ...]:
    """The node directories jobs may copy files from, from ``JOBMESH_ALLOWED_INPUT_PATHS``.

    Args:
        value: comma-separated absolute paths ("" for none).

    Returns:
        The paths, in order.

    Raises:
        ValueError: one is not absolute (the message names the setting and the path).
    """
    roots: list[Path] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.startswith("/"):
            raise ValueError(f"{ALLOWED_PATHS_SETTING}: {item!r} is not an absolute path")
        roots.append(Path(item))
    return tuple(roots)


async def materialize(
    files: Iterable[InputFile],
    workdir: Path,
    store: UploadStore | None,
    allowed_roots: Sequence[Path],
    uid: int | None,
    gid: int | None,
) -> None:
    """Put a job's input files into its working directory.

    Args:
        files: the job's ``JobSpec.files``.
        workdir: the attempt's (fresh, existing) working directory.
        store: the object store ``jm_uploads``; None when there is none (an upload then fails).
        allowed_roots: node directories copies may come from (:func:`parse_allowed_roots`).
        uid: the owner of what is written (the job's uid when the executor runs as root);
            None: keep the executor's.
        gid: likewise the group.

    Raises:
        InputFileError: a file cannot be fetched, checked, copied or placed; the message
            names it. Files placed before it stay (the working directory is removed with
            the attempt).
    """
    owner = _Owner(uid, gid)
    root = Path(await asyncio.to_thread(os.path.realpath, workdir))
    for file in files:
        if bool(file.object) == bool(file.node_path):
            raise InputFileError(file.path, f"input file {file.path!r}: exactly one of object and node_path is needed")
        target = await asyncio.to_thread(_target, root, file.path)
        if file.object:
            await _fetch_upload(file, target, store)
        else:
            await asyncio.to_thread(_copy_node_path, file, target, allowed_roots)
    await asyncio.to_thread(_hand_over, root, owner)


async def fetch_stdin(object_name: str, store: UploadStore | None, dest: Path) -> Path:
    """Fetch a job's ``stdin_object`` into a new file, checking its digest against its name.

    Args:
        object_name: its name in ``jm_uploads`` (``sha256/<hex>``).
        store: the object store ``jm_uploads``; None when there is none.
        dest: the file to create (mode 0600, it must not exist); the executor opens it as
            the process's stdin.

    Returns:
        ``dest``.

    Raises:
        InputFileError: it cannot be fetched or does not match its name (``path`` is "").
    """
    what = f"stdin object {object_name!r}"
    digest = _digest_of(object_name, what, "")
    fd = await asyncio.to_thread(_create, dest, what, "")
    try:
        await _download(store, object_name, digest, None, fd, what, "")
    except BaseException:
        os.close(fd)
        await asyncio.to_thread(dest.unlink, missing_ok=True)
        raise
    os.close(fd)
    return dest


def _create(target: Path, what: str, path: str) -> int:
    """A new file at ``target`` (mode 0600 until filled), never through a symbolic link."""
    try:
        return os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise InputFileError(path, f"{what}: cannot create {target}: {exc.strerror}") from None


class _Owner:
    """Who owns what is written: chown only as root, and only when asked."""

    def __init__(self, uid: int | None, gid: int | None) -> None:
        self.wanted = os.geteuid() == 0 and (uid is not None or gid is not None)
        self.uid = -1 if uid is None else uid
        self.gid = -1 if gid is None else gid


def _hand_over(root: Path, owner: _Owner) -> None:
    """Give everything under ``root`` (not ``root`` itself) to the job, deepest first.

    Every file is written as root and handed over only once all are in place, and a
    directory only after everything in it: until then it is root's, so no process of the
    job's uid can swap an entry of it for a symbolic link that root would then write or
    chown through. ``os.walk`` does not follow links, and ``lchown`` changes a link itself.
    """
    if not owner.wanted:
        return
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in (*filenames, *dirnames):
            os.chown(os.path.join(dirpath, name), owner.uid, owner.gid, follow_symlinks=False)


def _target(root: Path, relative: str) -> Path:
    """Where ``relative`` lands in ``root``, its parent directories made (root's, until :func:`_hand_over`).

    Refuses an empty, absolute or ``..`` path, and a path through anything that is not a
    plain directory (a symbolic link above all): the file must end up inside ``root``.
    """
    pure = PurePosixPath(relative)
    if not relative or pure.is_absolute() or "\x00" in relative:
        raise InputFileError(relative, f"input file {relative!r}: the path must be relative to the working directory")
    parts = [part for part in pure.parts if part != "."]
    if not parts or ".." in parts:
        raise InputFileError(relative, f"input file {relative!r}: the path must stay inside the working directory")
    current = root
    for part in parts[:-1]:
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            try:
                os.mkdir(current, _DIR_MODE)
            except OSError as exc:
                message = f"input file {relative!r}: cannot create {current}: {exc.strerror}"
                raise InputFileError(relative, message) from None
            continue
        if stat.S_ISLNK(info.st_mode):
            raise InputFileError(
                relative, f"input file {relative!r}: {current} is a symbolic link; files never go through one"
            )
        if not stat.S_ISDIR(info.st_mode):
            raise InputFileError(relative, f"input file {relative!r}: {current} is not a directory")
    target = current / parts[-1]
    if os.path.lexists(target):
        raise InputFileError(relative, f"input file {relative!r}: {target} exists already (two files at one path?)")
    return target


def _digest_of(object_name: str, what: str, path: str) -> str:
    found = _UPLOAD_NAME.fullmatch(object_name)
    if found is None:
        raise InputFileError(path, f"{what}: not an upload name (expected {subjects.upload_key('<sha256 hex>')})")
    return found.group(1)


async def _fetch_upload(file: InputFile, target: Path, store: UploadStore | None) -> None:
    what = f"input file {file.path!r} (upload {file.object})"
    digest = _digest_of(file.object, what, file.path)
    fd = await asyncio.to_thread(_create, target, what, file.path)
    try:
        await _download(store, file.object, digest, file.size, fd, what, file.path)
        os.fchmod(fd, file.mode)
    except BaseException as exc:
        # No half-fetched file is left for the job to mistake for its input.
        os.close(fd)
        await asyncio.to_thread(target.unlink, missing_ok=True)
        if isinstance(exc, OSError):
            raise InputFileError(file.path, f"{what}: cannot write {target}: {exc.strerror}") from None
        raise
    os.close(fd)


class _CheckedWriter:
    """Where nats-py writes an object's chunks: hashes and counts them, and writes at most
    ``limit`` bytes (a bigger object is refused after the fetch, without filling the disk)."""

    def __init__(self, fd: int, limit: int | None) -> None:
        self._fd = fd
        self._limit = limit
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        self.hash.update(data)
        if self._limit is None or self.size <= self._limit:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        return len(data)


async def _download(
    store: UploadStore | None, name: str, digest: str, size: int | None, fd: int, what: str, path: str
) -> None:
    if store is None:
        raise InputFileError(path, f"{what}: this executor has no upload store ({subjects.OBJ_UPLOADS})")
    writer = _CheckedWriter(fd, size)
    try:
        await store.get(name, writeinto=writer)
    except NotFoundError:
        raise InputFileError(
            path, f"{what}: not in {subjects.OBJ_UPLOADS} (never uploaded, or expired since the submit)"
        ) from None
    except (nats.errors.Error, TimeoutError) as exc:
        # nats-py's own digest check, and a server that does not answer in time, land here.
        transient = not isinstance(exc, DigestMismatchError)
        detail = type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
        message = f"{what}: fetch from {subjects.OBJ_UPLOADS} failed: {detail}"
        raise InputFileError(path, message, transient=transient) from exc
    if size is not None and writer.size != size:
        raise InputFileError(path, f"{what}: {writer.size} bytes in the store, the spec says {size}")
    if writer.hash.hexdigest() != digest:
        raise InputFileError(path, f"{what}: content does not match its sha256 name (digest {writer.hash.hexdigest()})")


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _copy_node_path(file: InputFile, target: Path, allowed_roots: Sequence[Path]) -> None:
    what = f"input file {file.path!r} (node path {file.node_path})"
    if not allowed_roots:
        raise InputFileError(file.path, f"{what}: this node allows no node paths ({ALLOWED_PATHS_SETTING} is empty)")
    if not file.node_path.startswith("/"):
        raise InputFileError(file.path, f"{what}: a node path must be absolute")
    roots = [os.path.realpath(root) for root in allowed_roots]
    try:
        source = os.path.realpath(file.node_path, strict=True)
    except OSError as exc:
        raise InputFileError(file.path, f"{what}: {exc.strerror or 'cannot be resolved'}") from None
    if not _under(source, roots):
        shown = ",".join(str(root) for root in allowed_roots)
        resolved = "" if source == file.node_path else f" (resolves to {source})"
        raise InputFileError(
            file.path, f"{what}: {file.node_path}{resolved} is not under {ALLOWED_PATHS_SETTING}={shown}"
        )
    try:
        info = os.stat(source)
        if stat.S_ISDIR(info.st_mode):
            _copy_tree(source, target, roots, file, what, (source,))
        elif stat.S_ISREG(info.st_mode):
            _copy_file(source, target, file.mode)
        else:
            raise InputFileError(file.path, f"{what}: not a regular file or directory")
    except OSError as exc:
        raise InputFileError(file.path, f"{what}: copy failed: {exc.filename or ''} {exc.strerror}".rstrip()) from None


def _copy_file(source: str, target: Path, mode: int) -> None:
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            raise OSError(0, "not a regular file", source)
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while chunk := os.read(src, _COPY_CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view) :]
            os.fchmod(dst, mode)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_tree(
    source: str,
    target: Path,
    roots: Sequence[str],
    file: InputFile,
    what: str,
    ancestors: tuple[str, ...],
) -> None:
    """Copy a directory as plain files and directories; each file keeps its own mode bits."""
    os.mkdir(target, 0o700)  # opened up once filled, so nothing half-copied is the job's
    with os.scandir(source) as entries:
        for entry in sorted(entries, key=lambda entry: entry.name):
            origin = entry.path
            if entry.is_symlink():
                origin = os.path.realpath(entry.path)
                if not _under(origin, roots):
                    raise InputFileError(
                        file.path,
                        f"{what}: {entry.path} links to {origin}, which is not under {ALLOWED_PATHS_SETTING}",
                    )
            info = os.stat(origin)
            if stat.S_ISDIR(info.st_mode):
                if origin in ancestors:
                    raise InputFileError(file.path, f"{what}: {entry.path} links back to {origin} (a loop)")
                _copy_tree(origin, target / entry.name, roots, file, what, (*ancestors, origin))
            elif stat.S_ISREG(info.st_mode):
                _copy_file(origin, target / entry.name, stat.S_IMODE(info.st_mode))
            else:
                raise InputFileError(file.path, f"{what}: {entry.path} is not a regular file or directory")
    os.chmod(target, _DIR_MODE)
