"""A job's secrets: where the node keeps them, and how the job gets them.

A job names its secrets (``JobSpec.secrets``); their values never travel over NATS. The
executor's operator gives the node its secrets in one of two places, looked up in this order:

- a file ``<JOBMESH_SECRETS_DIR>/<NAME>`` (one trailing newline is dropped, since files
  usually end with one);
- a variable ``<JOBMESH_SECRETS_ENV_PREFIX><NAME>`` of the executor's own environment
  (prefix ``JOBMESH_SECRET_`` by default). :class:`SecretSource` takes these out of the
  executor's environment when it is made, so no process the executor starts afterwards
  (an engine client, ``nvidia-smi``, a tool) inherits them.

:class:`SecretSource` resolves a job's names to values, and raises :class:`SecretMissing`
(failure code ``secret_missing``) naming what it could not find. The job then gets them as
files (:func:`write_secret_files`: a directory of its own, mode 0500, files 0400, owned by
the job's uid; a sandbox binds it at :data:`SANDBOX_SECRETS_DIR`) or as variables
(:func:`secret_env`). No message or log line of this module contains a secret's value.

Values are ``str``; a file that is not valid UTF-8 is read with ``surrogateescape``, so
writing it back for the job (:func:`write_secret_files`) gives the job the exact bytes.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import ClassVar

from jobmesh.contract.messages.v1.jobs import FailureCode
from jobmesh.runtime.secretfiles import SecretFileError, read_secret_file

SANDBOX_SECRETS_DIR = "/run/secrets"  # where a sandboxed job finds its secret files
SECRETS_DIR_VAR = "JOBMESH_SECRETS_DIR"  # the job's variable naming its secrets directory
# The contract's SecretName pattern, checked again here: a name becomes a file name, and
# a name such as "../x" must never reach the file system however it got here.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
_MAX_NAME = 128


class SecretMissing(Exception):
    """Raised when a job's secrets cannot be given to it: the node has no secret of that
    name, a name is not a plain name, or two names would become the same variable.

    The message names the secrets and where they were looked for, never a value.

    Attributes:
        names: the secrets at fault.
        code: the failure code an attempt reports (``secret_missing``).
    """

    code: ClassVar[FailureCode] = "secret_missing"

    def __init__(self, names: Iterable[str], message: str) -> None:
        super().__init__(message)
        self.names: tuple[str, ...] = tuple(names)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Unreadable(Exception):
    """Raised when a secret's file exists but cannot be read; carries why, never content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _check_names(names: Iterable[str]) -> list[str]:
    """The names as a list, refusing any that is not a plain name (letters, digits, _ and -)."""
    names = list(names)
    bad = [name for name in names if len(name) > _MAX_NAME or not _PLAIN_NAME.fullmatch(name)]
    if bad:
        shown = ", ".join(repr(name[:_MAX_NAME]) for name in bad)
        raise SecretMissing(
            bad, f"secret name {shown} refused: a secret name is letters, digits, '_' and '-' (not first)"
        )
    return names


class SecretSource:
    """The node's secrets: a directory of files, else variables with a prefix.

    Args:
        directory: the directory holding one file per secret (``JOBMESH_SECRETS_DIR``);
            None: no directory, variables only.
        env_prefix: the prefix of secret variables (``JOBMESH_SECRETS_ENV_PREFIX``); ""
            turns variables off (an empty prefix would make every variable a secret).
        environ: the executor's environment (``os.environ``). The variables with the
            prefix are copied, and removed from it when it can be changed (``os.environ``
            unsets them in the process's environment too): a child the executor starts
            without an environment of its own inherits the executor's, and must not get
            the node's secrets with it. A read-only mapping is only read.
    """

    def __init__(
        self, directory: Path | None, env_prefix: str, environ: Mapping[str, str] | MutableMapping[str, str]
    ) -> None:
        self.directory = directory
        self.env_prefix = env_prefix
        self._environ: dict[str, str] = (
            {key: value for key, value in environ.items() if key.startswith(env_prefix)} if env_prefix else {}
        )
        if isinstance(environ, MutableMapping):
            for key in self._environ:
                del environ[key]

    def resolve(self, names: Iterable[str]) -> dict[str, str]:
        """The values of the named secrets.

        Args:
            names: the job's secret names (``JobSpec.secrets``).

        Returns:
            Each name with its value, in the order asked.

        Raises:
            SecretMissing: a name is not a plain name, or the node has no such secret (all
                the missing names at once, with where they were looked for).
        """
        wanted = _check_names(names)
        values: dict[str, str] = {}
        missing: list[str] = []
        unreadable: dict[str, str] = {}
        for name in wanted:
            if name in values or name in missing or name in unreadable:
                continue
            try:
                found = self._from_file(name)
            except _Unreadable as exc:
                # A file that is there but cannot be read is the operator's mistake to see:
                # falling back to a variable would hide it.
                unreadable[name] = exc.reason
                continue
            if found is None and self.env_prefix:
                found = self._environ.get(self.env_prefix + name)
            if found is None:
                missing.append(name)
            else:
                values[name] = found
        if missing or unreadable:
            raise SecretMissing([*unreadable, *missing], self._missing_message(missing, unreadable))
        return values

    def _from_file(self, name: str) -> str | None:
        if self.directory is None:
            return None
        try:
            data = read_secret_file(self.directory, name)
        except SecretFileError as exc:
            raise _Unreadable(str(exc)) from None
        return None if data is None else data.decode("utf-8", "surrogateescape")

    def _missing_message(self, missing: list[str], unreadable: Mapping[str, str]) -> str:
        parts: list[str] = []
        if missing:
            where = []
            if self.directory is not None:
                where.append(f"no file in {self.directory} (JOBMESH_SECRETS_DIR)")
            if self.env_prefix:
                where.append(f"no variable {self.env_prefix}<NAME> (JOBMESH_SECRETS_ENV_PREFIX)")
            if not where:
                where.append("the node has no secrets configured (JOBMESH_SECRETS_DIR is not set)")
            noun = "secret" if len(missing) == 1 else "secrets"
            parts.append(f"{noun} {', '.join(missing)} not found on this node: {' and '.join(where)}")
        if unreadable:
            parts.append("unreadable secret " + "; ".join(f"{name} ({why})" for name, why in unreadable.items()))
        return "; ".join(parts)


def write_secret_files(values: Mapping[str, str], directory: Path, uid: int | None, gid: int | None) -> Path:
    """Write a job's secrets as one file each into a new directory of its own.

    The directory is mode 0500 and its files 0400, owned by ``uid``/``gid`` when the
    executor runs as root (else by the executor's user), so only the job (and root) can
    read them. Remove it with :func:`remove_secret_files`.

    Args:
        values: each secret's name and value (from :meth:`SecretSource.resolve`).
        directory: the directory to create; it must not exist yet.
        uid: the job's user id; None: keep the executor's.
        gid: the job's group id; None: keep the executor's.

    Returns:
        ``directory``, holding ``<NAME>`` for each secret.

    Raises:
        SecretMissing: a name is not a plain name.
        OSError: the directory exists already or cannot be written.
    """
    names = _check_names(values)
    chown = os.geteuid() == 0 and (uid is not None or gid is not None)
    owner = -1 if uid is None else uid
    group = -1 if gid is None else gid
    directory.mkdir(mode=0o700)
    try:
        for name in names:
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
            try:
                os.fchmod(fd, 0o400)  # the umask may have taken bits off; set exactly
                if chown:
                    os.fchown(fd, owner, group)
                data = values[name].encode("utf-8", "surrogateescape")
                written = 0
                while written < len(data):
                    written += os.write(fd, data[written:])
            finally:
                os.close(fd)
        if chown:
            os.chown(directory, owner, group)
        os.chmod(directory, 0o500)
    except BaseException:
        remove_secret_files(directory)
        raise
    return directory


def remove_secret_files(directory: Path) -> None:
    """Remove a directory :func:`write_secret_files` made (also when not running as root,
    where its mode 0500 would stop a plain removal). A missing directory is fine.

    Args:
        directory: the secrets directory.
    """
    try:
        # Through a descriptor of the directory itself: the job owns it, and a link put in
        # its place must not make root change the mode of whatever the link names.
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except PermissionError:
        # Unreadable (the job made it mode 0): as root that is no obstacle to open; as its
        # own user the job has no privilege a followed link could lend, so chmod by path.
        if os.geteuid() != 0 and not os.path.islink(directory):
            os.chmod(directory, 0o700)
        fd = -1
    except OSError:  # a link or not a directory: not ours to open up; rmtree refuses links
        fd = -1
    if fd >= 0:
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
    shutil.rmtree(directory, ignore_errors=True)


def secret_env_name(name: str) -> str:
    """The variable a secret becomes with ``secrets_as=env``: upper-cased, ``-`` -> ``_``.

    Args:
        name: the secret's name.

    Returns:
        The variable's name (``db-password`` -> ``DB_PASSWORD``).
    """
    return name.upper().replace("-", "_")


def secret_env(values: Mapping[str, str]) -> dict[str, str]:
    """A job's secrets as variables (``secrets_as=env``).

    Args:
        values: each secret's name and value.

    Returns:
        Each variable (see :func:`secret_env_name`) with its value.

    Raises:
        SecretMissing: two names become the same variable (``db-pass`` and ``DB_PASS``).
    """
    env: dict[str, str] = {}
    owner: dict[str, str] = {}
    for name in _check_names(values):
        variable = secret_env_name(name)
        if variable in owner and owner[variable] != name:
            raise SecretMissing(
                [owner[variable], name],
                f"secrets {owner[variable]} and {name} would both be the variable {variable}; rename one",
            )
        owner[variable] = name
        env[variable] = values[name]
    return env
