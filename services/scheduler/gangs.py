"""Which nodes a gang may use at all: a pure function of the fitting nodes, before any
room is counted.

A gang (``JobSpec.replicas`` > 1) puts each member on a node of its own, all of them
sharing the value of ``same`` (a zone or a label) when it is set. The scheduler hands the
binder every fitting node of every group large enough to hold the gang, and the binder
chooses among them by the room it sees (``services/binder/gangs.py``). A gang that no
group could hold even with every node empty waits, parked like a job no node fits, until
the node set changes: a node may join.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jobmesh.contract.messages.v1 import NodeInfo, Resources
from jobmesh.contract.validation import GANG_SAME_LABEL, GANG_SAME_ZONE, gang_group, gang_need


def gang_candidates(
    fitting: Sequence[str], nodes: Mapping[str, NodeInfo], replicas: int, same: str, res: Resources
) -> tuple[list[str], str]:
    """The fitting nodes (best first) that belong to a group with room for ``replicas``
    members, in their order; or none and why ("needs 4 nodes with ... in one zone; 3 fit").
    O(n) in the fitting nodes."""
    groups: dict[str, list[str]] = {}
    for node_id in fitting:
        node = nodes.get(node_id)
        if node is None:
            continue
        key = gang_group(node, same)
        if key is not None:
            groups.setdefault(key, []).append(node_id)
    if not groups:
        attribute = "a zone" if same == GANG_SAME_ZONE else f"label {same[len(GANG_SAME_LABEL) :]}"
        return [], f"{gang_need(replicas, res, same)}; no node that fits has {attribute}"
    large = {key for key, members in groups.items() if len(members) >= replicas}
    if not large:
        most = max(len(members) for members in groups.values())
        return [], f"{gang_need(replicas, res, same)}; {most} fit"
    keep = {node_id for key in large for node_id in groups[key]}
    return [node_id for node_id in fitting if node_id in keep], ""
