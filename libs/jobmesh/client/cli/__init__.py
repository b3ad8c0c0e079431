"""The ``jobmesh`` command line: parse, run the command, map its outcome to an exit code.

Exit codes (``exitcodes``): 0 success, 1 bad usage or a request the cluster refused, 2 the
cluster unreachable or busy (retryable), 3 the job or workflow run failed (``run``,
``workflow run``), 4 not found, 5 the workflow run was cancelled, 130 interrupted. With ``--json`` only JSON goes to stdout; diagnostics always go to stderr.

Modules: ``parser`` (subcommands and flags, plugin commands), ``specflags`` (job-spec flags
to a ``JobSpec``), ``commands`` (what each subcommand asks the cluster), ``render`` (what is
printed); what a job's state means lives in ``jobmesh.client.jobstate``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from typing import NoReturn

import nats.errors

from jobmesh.client.cli import render
from jobmesh.client.cli.exitcodes import EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from jobmesh.client.cli.parser import build_parser
from jobmesh.errors import JobmeshError, NotFound, Unavailable

__all__ = ["main", "run_command"]


def run_command(args: argparse.Namespace) -> int:
    """Run the command ``args`` selected (sync or async) and map its outcome to an exit code.

    Args:
        args: the parsed command line; ``args.fn`` is the command.

    Returns:
        The exit code.
    """
    try:
        outcome = args.fn(args)
        if inspect.iscoroutine(outcome):
            import uvloop  # only commands that talk to the cluster need an event loop

            outcome = uvloop.run(outcome)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except NotFound as exc:
        render.err(str(exc))
        return EXIT_NOT_FOUND
    except Unavailable as exc:
        render.err(str(exc))
        return EXIT_UNAVAILABLE
    except nats.errors.Error as exc:
        # A command that reads a stream itself met a NATS failure the client did not translate.
        render.err(f"NATS failed: {type(exc).__name__} {exc}".rstrip())
        return EXIT_UNAVAILABLE
    except JobmeshError as exc:
        if exc.retryable:  # overloaded, a lost race: the same command may work in a moment
            render.err(f"{exc.code}: {exc} (retryable)")
            return EXIT_UNAVAILABLE
        render.err(f"{exc.code}: {exc}" + (f" (field {exc.field})" if exc.field else ""))
        return EXIT_USAGE
    return EXIT_OK if outcome is None else int(outcome)


def main(argv: list[str] | None = None) -> NoReturn:
    """The ``jobmesh`` console script.

    Args:
        argv: the arguments; ``sys.argv[1:]`` when omitted.
    """
    args = build_parser().parse_args(argv)
    try:
        code = run_command(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`jobmesh status ID | head -3`): not an error of ours. Point
        # stdout at /dev/null so the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    sys.exit(code)
