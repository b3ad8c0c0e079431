"""The flags of ``submit`` and ``run`` that say what runs and what it starts from.

What runs: a command after ``--`` (a process), ``--handler NAME`` without a command (a
Python handler the node hosts, called with ``--input``), ``--image IMAGE`` (a container,
with the command after ``--`` as its argv) or ``--noop``. ``--handler NAME`` together with a
command keeps its older meaning: a process job placed only on nodes that host NAME.

What it starts from: ``--env K=V`` and ``--env-file PATH`` (docker's format), files uploaded
with the submit (``--upload LOCAL[:DEST]``) or copied from the node (``--node-path``), the
client's stdin (``-i``: read to its end before the submit, so it is a file or a pipe, not a
terminal session; up to 64 KiB travels in the spec, more is uploaded), the network
(``--network``) and secrets by name (``--secret``, ``--secrets-as``).

Everything local (reading files and stdin, hashing uploads) happens here, before the
cluster is asked anything; the upload itself is the command's (``uploads.put_uploads``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import msgspec

from jobmesh.client.uploads import LocalUpload, bytes_upload, parse_node_path, parse_upload, plan_uploads
from jobmesh.contract.messages.v1 import (
    MAX_STDIN_BYTES,
    ContainerRuntime,
    HandlerRuntime,
    InputFile,
    JobRuntime,
    NoopRuntime,
    ProcessRuntime,
    SecretName,
)
from jobmesh.contract.validation import env_name_problem
from jobmesh.errors import InvalidSpec, UsageError

__all__ = [
    "JobInputs",
    "add_runtime_flags",
    "check_secret_names",
    "env_file_values",
    "env_from",
    "handler_input",
    "inputs_from",
    "runtime_from",
]

# The contract's own rule for a secret's name, so the command line refuses what the
# trigger would, in words.
_SECRET_NAME = re.compile(next(m.pattern for m in typing.get_args(SecretName)[1:] if getattr(m, "pattern", None)))


@dataclass(frozen=True)
class JobInputs:
    """What a job starts from besides its command: files and stdin.

    Attributes:
        uploads: what must be in ``jm_uploads`` before the submit (files, a large stdin).
        files: the spec's ``files`` (uploads first, then node paths, in flag order).
        stdin: the stdin that travels inline ("" when none, or when uploaded).
        stdin_object: the upload that holds a larger stdin ("" when none).
    """

    uploads: list[LocalUpload] = field(default_factory=list)
    files: list[InputFile] = field(default_factory=list)
    stdin: str = ""
    stdin_object: str = ""


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """Add the flags that say what runs and what it starts from.

    Args:
        p: the parser of ``submit`` or ``run``.
    """
    what = p.add_argument_group("what runs (default: the command after --)")
    what.add_argument(
        "--handler",
        default="",
        metavar="NAME",
        help="call the Python handler NAME hosted by a node (with --input); with a command after --,"
        " run that command on a node that hosts NAME",
    )
    what.add_argument(
        "--input", default=None, metavar="JSON|@FILE", help="the handler's input, as JSON or @file (default {})"
    )
    what.add_argument("--image", default="", metavar="IMAGE", help="run the command after -- in a container of IMAGE")
    what.add_argument("--noop", action="store_true", help="use the built-in no-op runtime")
    start = p.add_argument_group("what it starts from")
    start.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="forward this command's stdin to the job (read to its end before the submit)",
    )
    start.add_argument("--env", action="append", default=[], metavar="K=V", help="set a variable (repeatable)")
    start.add_argument(
        "--env-file", action="append", default=[], metavar="PATH", help="variables from a file (docker's format)"
    )
    start.add_argument(
        "--upload",
        action="append",
        default=[],
        metavar="LOCAL[:DEST]",
        help="upload a file or directory into the working directory (repeatable; 64 MiB in all)",
    )
    start.add_argument(
        "--node-path",
        action="append",
        default=[],
        metavar="NODE_PATH[:DEST]",
        help="copy a file or directory the node's operator allows into the working directory",
    )
    start.add_argument("--network", action="store_true", help="allow outbound network (default: none)")
    start.add_argument(
        "--secret", action="append", default=[], metavar="NAME", help="a secret the node resolves (repeatable)"
    )
    start.add_argument(
        "--secrets-as", default="file", choices=["file", "env"], help="secrets as files in /run/secrets or variables"
    )


def runtime_from(args: argparse.Namespace, command: list[str], env: dict[str, str]) -> JobRuntime:
    """The runtime the flags ask for.

    Args:
        args: the parsed command line.
        command: what follows ``--``.
        env: the job's variables (from ``--env`` and ``--env-file``).

    Returns:
        A process, handler, container or no-op runtime.

    Raises:
        UsageError: flags that do not go together (the message says which and why).
    """
    kinds = [flag for flag, given in (("--noop", args.noop), ("--image", args.image)) if given]
    handler_call = bool(args.handler) and not command
    if handler_call:
        kinds.append("--handler")
    if len(kinds) > 1:
        raise UsageError(f"{' and '.join(kinds)} each choose what runs; give one", field="runtime")
    if args.input is not None and not handler_call:
        why = "a command after -- is given" if command else "--handler is not given"
        raise UsageError(f"--input is a handler's input, but {why}", field="runtime.input")
    if env and (args.noop or handler_call):
        raise UsageError(
            "--env/--env-file set a process's or container's variables; a "
            + ("no-op job" if args.noop else "handler job")
            + " has none",
            field="runtime.env",
        )
    if args.noop:
        if command:
            raise UsageError("--noop runs nothing: drop the command after --", field="command")
        return NoopRuntime()
    if handler_call:
        return HandlerRuntime(handler=args.handler, input=handler_input(args.input))
    if args.image:
        return ContainerRuntime(image=args.image, argv=command, env=env)
    if not command:
        raise UsageError(
            "give a command after --, e.g. jobmesh submit -- echo hello (or --handler, --image, --noop)",
            field="command",
        )
    return ProcessRuntime(argv=command, env=env)


def handler_input(text: str | None) -> Any:
    """The handler input ``--input`` gives: JSON text, or ``@path`` of a file that holds it.

    Args:
        text: the flag's value; None when it was not given (the input is ``{}``, which
            suits an input type whose fields all have defaults).

    Returns:
        The input as builtin data.

    Raises:
        UsageError: the file cannot be read, or the text is not JSON.
    """
    if text is None:
        return {}
    payload: bytes
    if text.startswith("@"):
        try:
            with open(text[1:], "rb") as f:
                payload = f.read()
        except OSError as exc:
            raise UsageError(f"--input: cannot read {text[1:]}: {exc.strerror or exc}", field="runtime.input") from exc
    else:
        payload = text.encode()
    try:
        return msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        raise UsageError(f"--input is not JSON: {exc}", field="runtime.input") from exc


def env_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The job's variables: every ``--env-file`` in order, then every ``--env`` (later wins).

    Args:
        args: the parsed command line.
        environ: where a bare ``KEY`` takes its value; this process's environment when omitted.

    Returns:
        Variable -> value.

    Raises:
        UsageError: a malformed entry (naming the flag, or the file and line).
    """
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    for path in args.env_file:
        env.update(env_file_values(path, environ))
    for item in args.env:
        _set(env, item, environ, f"--env {item!r}")
    return env


def env_file_values(path: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables in an env file, in docker's format.

    One ``KEY=VALUE`` per line, the value taken as written (no quotes removed); a leading
    UTF-8 byte order mark is dropped; a line that starts with ``#`` and an empty line are skipped; a bare ``KEY`` takes its value from
    ``environ`` and is left out when ``environ`` does not have it.

    Args:
        path: the file.
        environ: where a bare ``KEY`` takes its value.

    Returns:
        Variable -> value.

    Raises:
        UsageError: the file cannot be read, or a line has an empty or bad key.
    """
    try:
        # utf-8-sig: an editor on Windows starts the file with a BOM, which would otherwise
        # be part of the first name ("\ufeffKEY").
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UsageError(f"--env-file: cannot read {path}: {why}", field="runtime.env") from exc
    env: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        _set(env, line, environ, f"--env-file {path} line {number}")
    return env


def _set(env: dict[str, str], item: str, environ: Mapping[str, str], where: str) -> None:
    key, sep, value = item.partition("=")
    # The trigger's own rule (env_name_problem), checked here so that the file and line are named.
    if env_name_problem(key):
        raise UsageError(
            f"{where}: {key!r} is not a variable name (KEY=VALUE, or a bare KEY; letters, digits and '_',"
            " not a digit first)",
            field="runtime.env",
        )
    if sep:
        env[key] = value
    elif key in environ:
        env[key] = environ[key]


def check_secret_names(names: Sequence[str]) -> None:
    """Refuse a secret name the node could not look up, in words rather than a regex.

    Args:
        names: the ``--secret`` values.

    Raises:
        InvalidSpec: naming ``secrets[i]``.
    """
    for i, name in enumerate(names):
        if not _SECRET_NAME.match(name) or len(name) > 128:
            raise InvalidSpec(
                f"secret name {name!r} may hold only letters, digits, '_' and '-' (not first), at most 128:"
                " it is looked up as a file name and a variable name on the node, so no '/' or '.'",
                field=f"secrets[{i}]",
            )


def inputs_from(args: argparse.Namespace, stdin: BinaryIO | None = None) -> JobInputs:
    """Read, check and hash what the job starts from: uploads, node paths, stdin.

    Args:
        args: the parsed command line.
        stdin: where ``-i`` reads from; this process's stdin when omitted.

    Returns:
        The inputs; nothing has been sent yet.

    Raises:
        UsageError: a path that cannot be read, a bad destination, or too much to upload.
    """
    stdin_upload: LocalUpload | None = None
    inline = ""
    if args.interactive:
        stream = stdin if stdin is not None else sys.stdin.buffer
        if stream.isatty():
            print("jobmesh: reading stdin to its end (Ctrl-D) before the submit", file=sys.stderr, flush=True)
        data = stream.read()
        text = _inline_text(data)
        if text is None:
            stdin_upload = bytes_upload(data)
        else:
            inline = text
    planned = plan_uploads(
        [parse_upload(item) for item in args.upload], already=stdin_upload.input.size if stdin_upload else 0
    )
    node_files = [parse_node_path(item) for item in args.node_path]
    return JobInputs(
        uploads=planned + ([stdin_upload] if stdin_upload else []),
        files=[p.input for p in planned] + node_files,
        stdin=inline,
        stdin_object=stdin_upload.input.object if stdin_upload else "",
    )


def _inline_text(data: bytes) -> str | None:
    # Inline only what the spec can hold as text: small, UTF-8, no NUL (Postgres refuses it).
    # The limit is of bytes, as read (the trigger counts the UTF-8 bytes too), not characters.
    if len(data) > MAX_STDIN_BYTES or b"\x00" in data:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None
