"""Masking a job's secret values out of everything it says: output lines, the tail, the result.

A :class:`Masker` is built once per attempt from the values of the job's secrets and runs on
every output line, so it is one compiled regular expression: an alternation of the escaped
values, longest first. A line without any secret costs one ``search``; a job without secrets
costs nothing (:meth:`Masker.mask` returns its argument).

Where secrets overlap (``abcd`` and ``cdef`` in ``abcdef``), the union of every occurrence is
masked, so no part of either leaks. A secret that spans lines (a PEM key) is also masked line
by line, since output reaches the masker one line at a time.

Limits (docs/secrets-and-files.md): a value shorter than :data:`MIN_SECRET_LENGTH` characters
is not masked (masking ``a`` would mask every line; :attr:`Masker.unmasked` names them, for
the executor's warning); a secret that the executor splits between two 16 KiB pieces of one
very long line is not recognised in either piece; a job that prints its secret transformed
(reversed, base64) is not masked.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

MASK = "***"
MIN_SECRET_LENGTH = 4

S = TypeVar("S", str, bytes)


def _pieces(values: Iterable[str], min_length: int) -> list[str]:
    """What to look for: each value, and each line of a value that spans lines."""
    found: set[str] = set()
    for value in values:
        if len(value) < min_length:
            continue
        found.add(value)
        if "\n" in value:
            for line in value.split("\n"):
                line = line.rstrip("\r")  # output lines arrive without their \r
                if len(line) >= min_length:
                    found.add(line)
    # Longest first: where one value contains another, the whole of it is masked.
    return sorted(found, key=lambda piece: (-len(piece), piece))


class Masker:
    """Replaces each secret value in a text with ``***``.

    Args:
        values: the job's secret values; a mapping (name -> value, as
            :meth:`jobmesh.executor.secrets.SecretSource.resolve` returns) is read for its
            values, so passing one by mistake never masks the names instead.
        min_length: values shorter than this are not masked.

    Attributes:
        active: whether there is anything to mask.
        unmasked: the names (or, for plain values, "#<position>") of values too short to mask.
    """

    def __init__(self, values: Mapping[str, str] | Iterable[str], min_length: int = MIN_SECRET_LENGTH) -> None:
        named = list(values.items()) if isinstance(values, Mapping) else [(f"#{i}", v) for i, v in enumerate(values)]
        self.unmasked: tuple[str, ...] = tuple(name for name, value in named if 0 < len(value) < min_length)
        pieces = _pieces((value for _, value in named), min_length)
        self.active = bool(pieces)
        self._pieces: tuple[str, ...] = tuple(pieces)
        self._min_length = min_length
        if not pieces:
            self._text: re.Pattern[str] | None = None
            self._bytes: re.Pattern[bytes] | None = None
            return
        self._text = re.compile("|".join(re.escape(piece) for piece in pieces))
        encoded = sorted(
            {piece.encode("utf-8", "surrogateescape") for piece in pieces}, key=lambda piece: (-len(piece), piece)
        )
        self._bytes = re.compile(b"|".join(re.escape(piece) for piece in encoded))

    def mask(self, text: str) -> str:
        """``text`` with every secret value in it replaced by ``***``.

        Args:
            text: an output line, a tail or a result.

        Returns:
            The masked text: ``text`` itself when it holds no secret.
        """
        pattern = self._text
        if pattern is None or pattern.search(text) is None:
            return text
        return _masked(pattern, text, MASK)

    def mask_bytes(self, data: bytes) -> bytes:
        """``data`` with every secret value (as UTF-8) in it replaced by ``***``.

        Args:
            data: a result file's content, text or not.

        Returns:
            The masked bytes: ``data`` itself when it holds no secret.
        """
        pattern = self._bytes
        if pattern is None or pattern.search(data) is None:
            return data
        return _masked(pattern, data, MASK.encode())

    def mask_tail(self, tail: str) -> str:
        """The output tail masked: as :meth:`mask`, and also the end of a secret at its very
        start, where the tail was cut out of the output in the middle of one.

        Args:
            tail: the last characters of the attempt's output.

        Returns:
            The masked tail.
        """
        masked = self.mask(tail)
        cut = _cut_secret(self._pieces, masked, self._min_length)
        return MASK + masked[cut:] if cut else masked

    def mask_file(self, path: Path) -> bool:
        """Mask a file in place (a result the job wrote), without following a symbolic link.

        The whole file is read into memory: a result file is at most the result size limit.

        Args:
            path: the file.

        Returns:
            True when the file held a secret and was rewritten; False when it did not, or it
            is missing or not a regular file (the result's reader ignores those).
        """
        if not self.active:
            return False
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            chunks: list[bytes] = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            data = b"".join(chunks)
            masked = self.mask_bytes(data)
            if masked is data:
                return False
            os.lseek(fd, 0, os.SEEK_SET)
            view = memoryview(masked)
            while view:
                view = view[os.write(fd, view) :]
            os.ftruncate(fd, len(masked))
            return True
        finally:
            os.close(fd)

    def sink(self, on_line: Callable[[str, str], Awaitable[None]]) -> Callable[[str, str], Awaitable[None]]:
        """A line sink that masks each line before handing it on.

        Args:
            on_line: the sink to wrap, awaited with (stream, line).

        Returns:
            ``on_line`` itself when there is nothing to mask, else the masking sink.
        """
        if not self.active:
            return on_line
        mask = self.mask

        async def masked(stream: str, line: str) -> None:
            await on_line(stream, mask(line))

        return masked


def _cut_secret(pieces: Iterable[str], text: str, min_length: int) -> int:
    """How many characters at the start of ``text`` are the end of a secret (0: none)."""
    head = text[:min_length]
    if len(head) < min_length:
        return 0
    longest = 0
    for piece in pieces:
        # Each place the first characters of the text occur in the secret starts a suffix
        # the text may begin with (the whole secret is no suffix: mask() had it).
        at = piece.find(head, 1)
        while at != -1:
            size = len(piece) - at
            if size > longest and text.startswith(piece[at:]):
                longest = size
            at = piece.find(head, at + 1)
    return longest


def _masked(pattern: re.Pattern[S], text: S, mask: S) -> S:
    """``text`` with the union of every occurrence of ``pattern`` replaced by ``mask``.

    A plain ``sub`` would leave the rest of a secret that overlaps the one matched before it
    (``abcd|cdef`` on ``abcdef`` gives ``***ef``), so every start position is tried.
    """
    spans: list[list[int]] = []
    start = 0
    end = len(text)
    while (found := pattern.search(text, start)) is not None:
        begin, stop = found.span()
        # Other secrets may start inside this occurrence and reach past it: extend over them.
        probe = begin + 1
        while probe < stop:
            inner = pattern.match(text, probe)
            if inner is not None and inner.end() > stop:
                stop = inner.end()
            probe += 1
        if spans and begin <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], stop)
        else:
            spans.append([begin, stop])
        start = stop
        if start >= end:
            break
    out: list[S] = []
    previous = 0
    for begin, stop in spans:
        out.append(text[previous:begin])
        out.append(mask)
        previous = stop
    out.append(text[previous:])
    return mask[:0].join(out)
