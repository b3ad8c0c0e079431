"""The README's examples, run as a user would paste them, against a real ``jobmesh dev`` cluster.

The same goes for the worked examples of docs/scheduling.md, docs/operations.md,
docs/triggers.md and docs/workflows.md. In each document, every fenced ``sh`` block runs line by line in one bash session (so variables set
by one line reach the next), in a fresh temporary directory that holds a link to this venv
as ``.venv``; every ``python`` block runs with the venv's python in the same directory. The
document starts the cluster itself (``jobmesh dev --detach``); the test gives it a fresh database through
``JOBMESH_DATABASE_URL`` and stops it at the end, whatever happened.

A block is skipped only when the line before its fence is a comment
``<!-- not run by tests/test_readme.py: why -->``. A line's trailing comment says what to
expect, in words a reader understands: ``exits N`` (otherwise 0 is expected) and
``prints "TEXT"`` (TEXT appears in its output, stdout or stderr). In a python block each
``prints "TEXT"`` is checked against the whole run's output.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jobmesh.runtime.db import create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent
# The documents whose examples are run, each against a cluster of its own.
DOCUMENTS = (
    "README.md",
    "docs/scheduling.md",
    "docs/operations.md",
    "docs/triggers.md",
    "docs/workflows.md",
)
SKIP_MARK = "<!-- not run by tests/test_readme.py"
SHELL_LANGS = {"sh", "bash", "shell"}
COMMAND_TIMEOUT = 90.0  # seconds for one pasted line; `jobmesh dev --detach` waits up to 120 s itself
SENTINEL = "__readme_exit_code__"

_EXITS = re.compile(r"\bexits (\d+)\b")
_PRINTS = re.compile(r'\bprints "([^"]+)"')
_FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass(frozen=True)
class Expectation:
    """What a document's comment says about one command."""

    exit_code: int = 0
    texts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Command:
    """One logical shell command of a document (continuation lines joined)."""

    line: int
    text: str
    expect: Expectation


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, where it starts, its text, whether it runs."""

    lang: str
    line: int
    text: str
    runs: bool


@dataclass
class Outcome:
    """What one command or script did."""

    exit_code: int
    output: str
    shell_noise: list[str] = field(default_factory=list)


# --- reading a document --------------------------------------------------------------------
def blocks_of(markdown: str) -> list[Block]:
    """The fenced code blocks of ``markdown``, in order.

    Args:
        markdown: the document.

    Returns:
        Every block, with ``runs`` False for one marked as not run.
    """
    lines = markdown.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start = i
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        blocks.append(Block(opening.group(1), start + 1, "\n".join(body) + "\n", not previous.startswith(SKIP_MARK)))
        i += 1
    return blocks


def trailing_comment(line: str) -> str:
    """The comment at the end of a shell line, as bash reads it ("" when there is none).

    A ``#`` starts a comment only outside quotes and at the start of a word.

    Args:
        line: one shell line.

    Returns:
        The comment's text without the ``#``.
    """
    quote = ""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
            continue
        if char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[i + 1 :].strip()
    return ""


def expectation(comment: str) -> Expectation:
    """What a comment claims: ``exits N`` and any ``prints "TEXT"``.

    Args:
        comment: a trailing comment.

    Returns:
        The expected exit code (0 unless stated) and texts.
    """
    exits = _EXITS.search(comment)
    return Expectation(int(exits.group(1)) if exits else 0, tuple(_PRINTS.findall(comment)))


def commands_of(script: str, first_line: int) -> list[Command]:
    """The logical commands of a shell block: blank and comment-only lines skipped.

    Args:
        script: the block's text.
        first_line: the document's line number of the block's fence.

    Returns:
        One command per logical line, with what its comment expects.
    """
    commands: list[Command] = []
    pending: list[str] = []
    start = 0
    for offset, raw in enumerate(script.splitlines(), start=first_line + 1):
        if not pending and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if not pending:
            start = offset
        pending.append(raw)
        if raw.endswith("\\"):
            continue
        text = "\n".join(pending)
        commands.append(Command(start, text, expectation(trailing_comment(pending[-1]))))
        pending = []
    assert not pending, f"line {start}: a command ends with a line continuation"
    return commands


# --- running it ------------------------------------------------------------------------------
class Shell:
    """One bash session that runs pasted commands one at a time and reports each exit code.

    Each command's output goes to a file of its own and its stdin is /dev/null, so nothing a
    command does can read the next command or mix into the exit-code report.
    """

    def __init__(self, cwd: Path, env: dict[str, str], out_dir: Path) -> None:
        # A session of its own, so close() can end what the examples left in the background
        # (``jobmesh dev --detach`` puts the cluster in another session; the test stops it).
        self._out_dir = out_dir
        self._count = 0
        self._proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> Outcome:
        """Run ``command`` as if pasted at the prompt; wait for it to finish.

        Args:
            command: one logical command (may span lines joined by ``\\``).
            timeout: seconds before the command counts as hung.

        Returns:
            Its exit code and everything it printed.
        """
        self._count += 1
        out = self._out_dir / f"command-{self._count}.out"
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{{ {command}\n}} >{out} 2>&1 </dev/null\nprintf '{SENTINEL}%s\\n' \"$?\"\n")
        self._proc.stdin.flush()
        noise: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"still running after {timeout}s: {command}\n{_read(out)}") from None
            if line is None:
                raise AssertionError(f"bash exited while running: {command}\n{noise}\n{_read(out)}")
            if line.startswith(SENTINEL):
                return Outcome(int(line.removeprefix(SENTINEL)), _read(out), noise)
            noise.append(line)  # bash's own complaints, such as a syntax error

    def close(self) -> None:
        """End the session and whatever its commands still run in the background."""
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _cluster_logs(workdir: Path) -> str:
    """The end of every log the dev cluster wrote, for a failure message."""
    state = workdir / ".jobmesh"
    logs = [state / "dev.log", *sorted((state / "logs").glob("*.log"))]
    return "\n".join(f"--- {p.relative_to(workdir)}\n{_read(p)[-1500:]}" for p in logs if p.exists())


def _check(where: str, what: str, outcome: Outcome, expect: Expectation, workdir: Path) -> None:
    problems = []
    if outcome.exit_code != expect.exit_code:
        problems.append(f"exited {outcome.exit_code}, the document says {expect.exit_code}")
    problems += [f"did not print {text!r}" for text in expect.texts if text not in outcome.output]
    if outcome.shell_noise:
        problems.append("bash said: " + " / ".join(outcome.shell_noise))
    if problems:
        pytest.fail(
            f"{where}: {what}\n  " + "\n  ".join(problems) + f"\noutput:\n{outcome.output}\n{_cluster_logs(workdir)}",
            pytrace=False,
        )


def _user_environment(venv: Path, database_url: str) -> dict[str, str]:
    """A user's shell: no jobmesh settings of the test run, the venv first on PATH, a fresh database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBMESH_") and k != "VIRTUAL_ENV"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["JOBMESH_DATABASE_URL"] = database_url
    return env


# --- the tests -------------------------------------------------------------------------------
def test_comments_say_what_to_expect() -> None:
    line = 'jobmesh run -- sh -c \'echo "#1"; exit 7\'  # exits 3: the job failed; prints "#1" and prints "x"'
    assert trailing_comment(line) == 'exits 3: the job failed; prints "#1" and prints "x"'
    assert expectation(trailing_comment(line)) == Expectation(3, ("#1", "x"))
    assert expectation(trailing_comment("echo a#b")) == Expectation()
    script = "# a note\nA=$(echo 1)\njobmesh submit \\\n  --noop  # exits 1\n\n"
    assert commands_of(script, 10) == [
        Command(12, "A=$(echo 1)", Expectation()),
        Command(13, "jobmesh submit \\\n  --noop  # exits 1", Expectation(1)),
    ]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_example_block_is_run_or_says_why_not(document: str) -> None:
    blocks = [b for b in blocks_of((ROOT / document).read_text()) if b.lang in SHELL_LANGS | {"python"}]
    assert [b for b in blocks if b.runs], f"{document} has no example the test runs"
    starts = [c for b in blocks if b.runs for c in commands_of(b.text, b.line) if c.text.startswith("jobmesh dev ")]
    assert starts and starts[0].text.startswith("jobmesh dev --detach"), f"{document} must start its cluster first"
    untagged = [b.line for b in blocks_of((ROOT / document).read_text()) if not b.lang]
    assert not untagged, f"{document}: fenced blocks without a language at lines {untagged}"


@pytest.fixture
async def readme_database_url(postgres_server_url: str):
    """A fresh database for the document's cluster, dropped afterwards."""
    url = await create_database(postgres_server_url, "jm_readme")
    yield url
    await drop_database(postgres_server_url, url)


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.parametrize("document", DOCUMENTS)
def test_examples_work_as_pasted(document: str, readme_database_url: str, tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    assert (venv / "bin" / "jobmesh").exists(), f"no jobmesh in {venv}/bin: run the tests from the venv"
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(venv)  # the examples run from a checkout that holds .venv
    out_dir = tmp_path / "outputs"
    out_dir.mkdir()
    env = _user_environment(venv, readme_database_url)
    shell = Shell(workdir, env, out_dir)
    try:
        for number, block in enumerate(b for b in blocks_of((ROOT / document).read_text()) if b.runs):
            if block.lang in SHELL_LANGS:
                for command in commands_of(block.text, block.line):
                    outcome = shell.run(command.text)
                    _check(f"{document}:{command.line}", command.text, outcome, command.expect, workdir)
            elif block.lang == "python":
                script = out_dir / f"example-{number}.py"
                script.write_text(block.text)
                done = subprocess.run(
                    [str(venv / "bin" / "python"), str(script)],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=COMMAND_TIMEOUT,
                )
                texts = tuple(_PRINTS.findall(block.text))
                outcome = Outcome(done.returncode, done.stdout + done.stderr)
                _check(f"{document}:{block.line}", "the python example", outcome, Expectation(0, texts), workdir)
    finally:
        shell.close()
        # Stop the cluster even when an example failed (a second stop just says none runs).
        subprocess.run(
            [str(venv / "bin" / "jobmesh"), "dev", "--stop"], cwd=workdir, env=env, timeout=90, capture_output=True
        )
