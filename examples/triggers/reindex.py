"""The ``reindex`` handler that the dataset-reindex rule calls (``dataset-reindex.yaml``).

It stands in for rebuilding a search index over a dataset: it builds an inverted index of
``rows`` synthetic records of the named dataset and reports how many terms it holds. Real
work, no dependencies, a few milliseconds per thousand rows.

``jobmesh dev`` hosts it. Elsewhere, load it on an executor with
``JOBMESH_HANDLER_MODULES=examples/triggers/reindex.py``; call it by hand with
``jobmesh run --handler reindex --input '{"dataset": "books", "rows": 100}'``.
"""

from __future__ import annotations

import hashlib
import time
from typing import Annotated

import msgspec
from msgspec import Meta

from jobmesh.sdk import Context, handler

WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu")


class Reindex(msgspec.Struct, frozen=True, kw_only=True):
    """Which dataset to reindex, and how many rows it has now."""

    dataset: Annotated[str, Meta(min_length=1, max_length=128)]
    rows: Annotated[int, Meta(ge=1, le=1_000_000)]


class Reindexed(msgspec.Struct, frozen=True, kw_only=True):
    """What the new index holds."""

    dataset: str
    rows: int
    terms: int
    digest: str  # of the index, so two runs over the same rows can be compared
    seconds: float


@handler("reindex")
def reindex(request: Reindex, ctx: Context) -> Reindexed:
    """Build an inverted index (term -> row numbers) over the dataset's rows."""
    started = time.perf_counter()
    index: dict[str, list[int]] = {}
    for row in range(request.rows):
        # A record's words come from its dataset and number, so the index is reproducible.
        seed = hashlib.blake2b(f"{request.dataset}:{row}".encode(), digest_size=4).digest()
        for byte in seed:
            index.setdefault(f"{WORDS[byte % len(WORDS)]}{byte // len(WORDS)}", []).append(row)
        if row and row % 10_000 == 0:
            ctx.progress(row / request.rows, f"{row} of {request.rows} rows indexed")
    digest = hashlib.blake2b(repr(sorted(index.items())).encode(), digest_size=8).hexdigest()
    print(f"reindexed {request.dataset}: {request.rows} rows, {len(index)} terms")
    return Reindexed(
        dataset=request.dataset,
        rows=request.rows,
        terms=len(index),
        digest=digest,
        seconds=round(time.perf_counter() - started, 4),
    )
