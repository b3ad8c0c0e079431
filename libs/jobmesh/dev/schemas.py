"""Write, or check, the wire-contract artefacts under ``schemas/``.

``python -m jobmesh.dev.schemas`` (behind ``make schemas``) writes what
:func:`jobmesh.dev.asyncapi.render` produces: ``schemas/v1/<Message>.json``, the JSON Schema
of every v1 wire message, and ``schemas/asyncapi.json``, the AsyncAPI 3 document of every
channel in :mod:`jobmesh.contract.channels`. It deletes generated files that no longer have a
message, and never a file without the generated marker.

``python -m jobmesh.dev.schemas --check`` renders in memory and exits 1, naming each stale
file, when ``schemas/`` differs, or naming each message and field that changed incompatibly
since the released schemas (``schemas/released/v1``, :mod:`jobmesh.dev.schemacompat`);
``tests/test_schemas.py`` and ``tests/test_schema_compat.py`` run the same checks. Both exit 2
when the channel table is inconsistent (:mod:`jobmesh.contract.channelcheck`), and warn about
a wire message that travels on no channel.

Releasing: copy ``schemas/v1/*.json`` over ``schemas/released/v1/`` (only ever additive
changes get past the check, so the copy is the new baseline).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from jobmesh.contract.channelcheck import ChannelTableError, unmapped_messages
from jobmesh.contract.channels import request_messages
from jobmesh.dev.asyncapi import ASYNCAPI_PATH, MARKER, MESSAGE_DIR, render
from jobmesh.dev.schemacompat import Break, check_dir

RELEASED_DIR = "released/v1"


@dataclass(frozen=True)
class Staleness:
    """How ``schemas/`` differs from what the generator would write."""

    missing: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.missing or self.changed or self.unexpected)

    def report(self, out_dir: Path) -> str:
        """A message naming every stale file under ``out_dir`` and how to fix it."""
        lines = [f"{out_dir} is stale; run `make schemas` (python -m jobmesh.dev.schemas) and commit the result:"]
        for label, paths in (("missing", self.missing), ("changed", self.changed), ("unexpected", self.unexpected)):
            lines += [f"  {label}: {out_dir / p}" for p in paths]
        return "\n".join(lines)


def default_out_dir() -> Path:
    """``schemas/`` of the source checkout this module lives in, else of the working directory.

    Returns:
        The directory (it need not exist yet).
    """
    root = Path(__file__).resolve().parents[3]  # libs/jobmesh/dev/schemas.py -> the checkout
    return (root if (root / "pyproject.toml").exists() else Path.cwd()) / "schemas"


def _existing(out_dir: Path) -> set[str]:
    # Only files we own: the message directory's *.json and the AsyncAPI document.
    found = {f"{MESSAGE_DIR}/{p.name}" for p in (out_dir / MESSAGE_DIR).glob("*.json")}
    if (out_dir / ASYNCAPI_PATH).exists():
        found.add(ASYNCAPI_PATH)
    return found


def check(out_dir: Path | None = None, files: Mapping[str, str] | None = None) -> Staleness:
    """Compare ``out_dir`` with freshly rendered output.

    Args:
        out_dir: the ``schemas/`` directory; :func:`default_out_dir` when omitted.
        files: pre-rendered output; :func:`render` when omitted.

    Returns:
        A :class:`Staleness`, false when everything is current.
    """
    out_dir = out_dir or default_out_dir()
    files = render() if files is None else files
    existing = _existing(out_dir)
    missing = sorted(p for p in files if p not in existing)
    changed = sorted(p for p in files if p in existing and (out_dir / p).read_text(encoding="utf-8") != files[p])
    unexpected = sorted(p for p in existing if p not in files)
    return Staleness(tuple(missing), tuple(changed), tuple(unexpected))


def write(out_dir: Path | None = None) -> Staleness:
    """Bring ``out_dir`` up to date: write new and changed files, delete stale generated ones.

    Args:
        out_dir: the ``schemas/`` directory; :func:`default_out_dir` when omitted.

    Returns:
        What was out of date before writing.
    """
    out_dir = out_dir or default_out_dir()
    files = render()
    stale = check(out_dir, files)
    for path in (*stale.missing, *stale.changed):
        target = out_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(files[path], encoding="utf-8")
    for path in stale.unexpected:
        # Only a file carrying our marker is ours to delete; anything else is left alone.
        target = out_dir / path
        if MARKER in target.read_text(encoding="utf-8"):
            target.unlink()
    return stale


def incompatible(out_dir: Path | None = None) -> list[Break]:
    """Every incompatible change of ``out_dir``'s v1 schemas since the released ones.

    Args:
        out_dir: the ``schemas/`` directory; :func:`default_out_dir` when omitted.

    Returns:
        The breaks (:class:`jobmesh.dev.schemacompat.Break`); empty when compatible.
    """
    out_dir = out_dir or default_out_dir()
    requests = frozenset(m.__name__ for m in request_messages())
    return check_dir(out_dir / RELEASED_DIR, out_dir / MESSAGE_DIR, requests)


def main(argv: Iterable[str] | None = None) -> int:
    """Command line: write ``schemas/`` (default) or ``--check`` it.

    Args:
        argv: the arguments (``--check``, ``--out DIR``); ``sys.argv[1:]`` when omitted.

    Returns:
        The exit status: 0 done or current, 1 stale (with ``--check``), 2 inconsistent table.
    """
    parser = argparse.ArgumentParser(prog="python -m jobmesh.dev.schemas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if schemas/ is stale, writing nothing")
    parser.add_argument("--out", type=Path, default=None, help="the schemas/ directory (default: the checkout's)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    out_dir = args.out or default_out_dir()
    try:
        if args.check:
            stale = check(out_dir)
            if stale:
                print(stale.report(out_dir), file=sys.stderr)
                return 1
            breaks = incompatible(out_dir)
            if breaks:
                print(
                    f"{out_dir / MESSAGE_DIR} breaks v1 compatibility with {out_dir / RELEASED_DIR}:", file=sys.stderr
                )
                for found in breaks:
                    print(f"  {found}", file=sys.stderr)
                return 1
            print(f"{out_dir} is up to date and compatible with {out_dir / RELEASED_DIR}")
        else:
            stale = write(out_dir)
            touched = len(stale.missing) + len(stale.changed)
            print(f"{out_dir}: {touched} file(s) written, {len(stale.unexpected)} removed")
        for name in unmapped_messages():
            print(
                f"warning: message {name} travels on no channel; add it to jobmesh.contract.channels.CHANNELS",
                file=sys.stderr,
            )
    except ChannelTableError as exc:
        print(f"schemas: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
