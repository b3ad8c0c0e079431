"""A workflow's steps laid out for the dashboard's graph: one column per dependency depth.

A step that needs nothing is in column 0; any other step sits one column right of the
deepest step it needs, so every edge points to the right. Within a column the steps keep
their declaration order. Pure: the browser only draws the boxes and edges it is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec


class Placed(msgspec.Struct, frozen=True, kw_only=True):
    """Where one step is drawn.

    Attributes:
        step: the step's name.
        column: its dependency depth (0 for a step that needs nothing).
        row: its place in its column, from the top.
    """

    step: str
    column: int
    row: int


class Edge(msgspec.Struct, frozen=True, kw_only=True):
    """One dependency: ``target`` needs ``source``."""

    source: str
    target: str


class Layout(msgspec.Struct, frozen=True, kw_only=True):
    """The whole graph: every step placed, every need an edge, and the grid's size."""

    steps: list[Placed]
    edges: list[Edge]
    columns: int
    rows: int


def layered(needs: Mapping[str, Sequence[str]]) -> Layout:
    """Lay out steps by dependency depth.

    Args:
        needs: each step's name -> the steps it needs, in declaration order. A need that
            names no step here, or a cycle (neither passes the trigger's checks), is
            drawn as if absent rather than failing the page.

    Returns:
        The layout.
    """
    depth: dict[str, int] = {}

    def depth_of(step: str, path: frozenset[str]) -> int:
        if step in depth:
            return depth[step]
        inside = [n for n in needs.get(step, ()) if n in needs and n not in path]
        found = 1 + max((depth_of(n, path | {step}) for n in inside), default=-1)
        depth[step] = found
        return found

    rows: dict[int, int] = {}
    placed = []
    for step in needs:
        column = depth_of(step, frozenset())
        placed.append(Placed(step=step, column=column, row=rows.get(column, 0)))
        rows[column] = rows.get(column, 0) + 1
    edges = [Edge(source=n, target=step) for step, wanted in needs.items() for n in wanted if n in needs]
    return Layout(steps=placed, edges=edges, columns=len(rows), rows=max(rows.values(), default=0))
