"""Reading one secret from a secrets directory, the same way wherever a service needs one.

The executor reads a job's secrets and the trigger reads its webhook secrets and submit
token from ``JOBMESH_SECRETS_DIR``: a file per secret, named by the secret. Both read it
here, so both refuse the same mistakes: a link out of the directory, something that is
not a regular file (a FIFO would hang the event loop), a file that cannot be read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class SecretFileError(Exception):
    """Raised when a secret's file is there but must not or cannot be read; says why."""


def read_secret_file(directory: Path, name: str) -> bytes | None:
    """The content of ``directory/name`` without one trailing line break, or None when
    there is no such file.

    Args:
        directory: the secrets directory.
        name: the secret's name (a plain name: the caller checks it).

    Raises:
        SecretFileError: the file links out of the directory, is a dangling link, is not
            a regular file, or cannot be read.
    """
    path = directory / name
    if not os.path.lexists(path):
        return None
    # A link is followed only to a file inside the directory: Kubernetes mounts each
    # secret as NAME -> ..data/NAME, but a link out of the directory is a mistake.
    real = os.path.realpath(path)
    inside = os.path.realpath(directory).rstrip("/") + "/"
    if not real.startswith(inside):
        raise SecretFileError(f"{path} links out of {directory}")
    try:
        # O_NONBLOCK: a FIFO there must not hang the reader.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SecretFileError(f"{path} is a dangling link") from None
    except OSError as exc:
        raise SecretFileError(f"{path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SecretFileError(f"{path} is not a regular file")
        chunks: list[bytes] = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError as exc:
        raise SecretFileError(f"{path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if data.endswith(b"\r\n"):
        return data[:-2]
    return data[:-1] if data.endswith(b"\n") else data
