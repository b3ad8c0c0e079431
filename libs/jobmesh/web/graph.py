"""A workflow's steps laid out for the dashboard's graph: one column per dependency depth.

A step that needs nothing is in column 0; any other step sits one column right of the
deepest step it needs, so every edge points to the right. Within a column the steps keep
their declaration order. Pure: the browser only draws the boxes and edges it is given.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

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
    depth = _depths(needs)
    rows: dict[int, int] = {}
    placed = []
    for step in needs:
        column = depth[step]
        placed.append(Placed(step=step, column=column, row=rows.get(column, 0)))
        rows[column] = rows.get(column, 0) + 1
    edges = [Edge(source=n, target=step) for step, wanted in needs.items() for n in wanted if n in needs]
    return Layout(steps=placed, edges=edges, columns=len(rows), rows=max(rows.values(), default=0))


def _depths(needs: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Each step's dependency depth, in a depth-first post-order (a topological order).

    With an explicit stack rather than recursion: a chain of MAX_STEPS steps is deeper than
    Python's recursion limit allows. A need already on the walk's path (a cycle) is left out.
    """
    depth: dict[str, int] = {}
    for root in needs:
        if root in depth:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(needs[root]))]
        on_path = {root}
        while stack:
            step, pending = stack[-1]
            for need in pending:
                if need in needs and need not in on_path and need not in depth:
                    stack.append((need, iter(needs[need])))
                    on_path.add(need)
                    break
            else:
                stack.pop()
                on_path.discard(step)
                # Every need that is not on the path has its depth by now.
                depth[step] = 1 + max((depth[n] for n in needs[step] if n in depth), default=-1)
    return depth
