"""Gang placement: all N members of a gang on nodes at once, or none. A pure function of a
node snapshot and the free capacity the binder reports.

A gang's members talk to each other while they run, so a partial placement is worse than
none: the placed members would hold their resources waiting for peers that never come.
``place_gang`` therefore returns either a node for every member rank or a reason.

The steps, each chosen to keep the decision O(n log n) in the number of nodes:

1. Filter nodes with the job's own hard constraints (``placement.misfit``), and count how
   many members each node holds, empty (its *static* slots) and now (its *free* slots).
2. Group the fitting nodes once by the ``same`` attribute (``zone`` or ``label:<key>``);
   without ``same`` all fitting nodes form one group. A node that lacks the attribute
   belongs to no group: sharing "no zone" is not sharing a zone.
3. If no group could hold the gang even with every node empty, it can *never* fit on
   these nodes (``never``, with the request field that cannot be met): the caller parks
   it until the node set changes, as it parks a job ``misfit`` refuses. If some group
   could, but none can now, the gang *waits*, with the reason.
4. Among the groups that can hold it now, take the tightest (fewest free slots, then the
   attribute value): large groups stay whole for larger gangs. For ``spread``, groups
   with at least ``replicas`` nodes with room (one member each) come first, and the
   tightest of those is taken: a tight group of few roomy nodes would otherwise win and
   stack every member on one node though another group could spread them.
5. Within the group pick greedily. ``spread``: one member per node, on the nodes with the
   most free slots, and only when there are fewer such nodes than members a second one
   per node, round by round. ``pack``: the fewest nodes, filling the roomiest first, with
   the last node swapped for the smallest one that holds the remainder.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from jobmesh.contract.messages.v1 import JobSpec, NodeInfo, Resources
from jobmesh.errors import InvalidSpec
from jobmesh.scheduler.placement import gpus_of_kind, misfit

SPREAD = "spread"
PACK = "pack"
ZONE = "zone"
LABEL = "label:"  # the prefix of a label constraint: label:<key>

# (cpu_milli, memory_mb, gpu, disk_mb) free on a node now, as the binder computes it from
# jm_alloc (services/binder/allocation.py ``Free``). ``gpu`` is the number of free GPUs of
# the kind the member asks for (any kind when it names none): the caller counts the node's
# devices of that kind that no reservation's ``gpu_devices`` holds, as the binder's
# ``pick_gpus`` does. A plain free count would let held GPUs of one kind pass for free
# ones of another. A node missing from the mapping has everything free (see place_gang).
FreeCapacity = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class GangDecision:
    """A gang's placement, or why there is none.

    ``nodes[rank]`` is the node of member ``rank`` and holds all N members, or is empty.
    When empty, ``reason`` says why; ``never`` is True when the gang cannot fit on these
    nodes even when they are empty, and ``field`` then names the request field at fault
    (``spec``: no node takes one member; ``same``: no fitting node has the attribute;
    ``replicas``: too many members for any group). ``never`` False: wait and try again.
    """

    nodes: tuple[str, ...] = ()
    reason: str = ""
    never: bool = False
    field: str = ""

    @property
    def placed(self) -> bool:
        return bool(self.nodes)

    def assignment(self) -> dict[int, str]:
        """Member rank -> node id (empty when not placed)."""
        return dict(enumerate(self.nodes))


def check_request(replicas: int, same: str, spread: str) -> None:
    """Raise ``InvalidSpec`` naming the field when the request itself is malformed, whatever
    the cluster looks like."""
    if replicas < 1:
        raise InvalidSpec(f"replicas must be at least 1, not {replicas}", field="replicas")
    if same and same != ZONE and not (same.startswith(LABEL) and len(same) > len(LABEL)):
        raise InvalidSpec(
            f"same must be {ZONE!r} or 'label:<key>', not {same!r} (no other node attribute exists)", field="same"
        )
    if spread not in (SPREAD, PACK):
        raise InvalidSpec(f"spread must be {SPREAD!r} or {PACK!r}, not {spread!r}", field="spread")


def place_gang(
    nodes: Iterable[NodeInfo],
    member: JobSpec,
    replicas: int,
    free: Mapping[str, FreeCapacity],
    *,
    same: str = "",
    spread: str = SPREAD,
) -> GangDecision:
    """Place all ``replicas`` members of a gang, each asking for ``member`` (its resources
    and constraints), on ``nodes``.

    Args:
        nodes: the live node snapshot.
        member: one member's spec; every member asks for the same.
        replicas: how many members (N >= 1).
        free: node id -> free (cpu_milli, memory_mb, gpu, disk_mb) now, ``gpu`` counting
            only GPUs of ``member``'s kind (see ``FreeCapacity``). A node missing from it
            has nothing reserved (all its capacity is free), as the binder reads a node
            with no allocation record.
        same: "" (anywhere), ``zone``, or ``label:<key>``: every member on nodes sharing
            that attribute's value.
        spread: ``spread`` (one member per node when there are enough nodes) or ``pack``.

    Raises:
        InvalidSpec: ``replicas``, ``same`` or ``spread`` is malformed (names the field).
    """
    check_request(replicas, same, spread)
    res = member.resources
    label = same[len(LABEL) :] if same.startswith(LABEL) else ""
    spreading = spread == SPREAD
    # group value -> [(node id, static slots, free slots)]
    groups: dict[str, list[tuple[str, int, int]]] = {}
    reasons: Counter[str] = Counter()
    fitting = 0
    most_per_node = 0
    for node in nodes:
        why = misfit(member, node)
        if why is not None:
            reasons[why] += 1
            continue
        fitting += 1
        if not same:
            key: str | None = ""
        elif label:
            key = node.labels.get(label)
        else:
            key = node.zone or None
        if key is None:
            continue
        kind_gpus = gpus_of_kind(node, res.gpu_kind)
        static = _slots(node.cpu_milli, node.memory_mb, kind_gpus, node.disk_mb, res, replicas)
        cpu, memory, gpu, disk = free.get(node.node_id, (node.cpu_milli, node.memory_mb, kind_gpus, node.disk_mb))
        # ``gpu`` is already of our kind; the min only guards a caller's count above the node's.
        now = min(static, _slots(cpu, memory, min(gpu, kind_gpus), disk, res, replicas))
        most_per_node = max(most_per_node, static)
        groups.setdefault(key, []).append((node.node_id, static, now))

    if not fitting:
        reason = reasons.most_common(1)[0][0] if reasons else "no executor node registered"
        return GangDecision(reason=reason, never=True, field="spec")
    if not groups:
        attribute = f"label {label}" if label else "zone"
        return GangDecision(reason=f"no fitting node has a {attribute}", never=True, field="same")

    unit = "nodes" if most_per_node == 1 else "member slots"
    wanted = f"needs {replicas} {unit} {_describe(res)}{_scope(same, label)}"
    totals = {key: (sum(s for _, s, _ in entries), sum(f for _, _, f in entries)) for key, entries in groups.items()}
    if max(static for static, _ in totals.values()) < replicas:
        most = max(static for static, _ in totals.values())
        return GangDecision(reason=f"{wanted}; at most {most} even when empty", never=True, field="replicas")
    roomy = [(now, key) for key, (_, now) in totals.items() if now >= replicas]
    if not roomy:
        return GangDecision(reason=f"{wanted}; {max(now for _, now in totals.values())} free")
    if spreading:
        # Groups where every member gets a node of its own first; the tightest of them.
        spread_out = [(0 if _nodes_with_room(groups[key]) >= replicas else 1, now, key) for now, key in roomy]
        _, _, chosen = min(spread_out)
    else:
        _, chosen = min(roomy)
    entries = [(node_id, now) for node_id, _, now in groups[chosen] if now > 0]
    entries.sort(key=lambda e: (-e[1], e[0]))
    picked = _spread(entries, replicas) if spreading else _pack(entries, replicas)
    return GangDecision(nodes=tuple(picked))


def _nodes_with_room(entries: list[tuple[str, int, int]]) -> int:
    """How many of a group's nodes take at least one member now."""
    return sum(1 for _, _, now in entries if now > 0)


def _slots(cpu: int, memory: int, gpu: int, disk: int, res: Resources, cap: int) -> int:
    """How many members fit in this much room (at most ``cap``: more never matters)."""
    n = cap
    if res.cpu_milli:
        n = min(n, cpu // res.cpu_milli)
    if res.memory_mb:
        n = min(n, memory // res.memory_mb)
    if res.gpu:
        n = min(n, gpu // res.gpu)
    if res.disk_mb:
        n = min(n, disk // res.disk_mb)
    return max(n, 0)


def _spread(entries: list[tuple[str, int]], replicas: int) -> list[str]:
    """One member per node while nodes last, then round by round over the nodes with room.

    ``entries`` are (node id, free slots), roomiest first, and hold at least ``replicas``."""
    if len(entries) >= replicas:
        return [node_id for node_id, _ in entries[:replicas]]
    picked: list[str] = []
    left = dict(entries)
    active = [node_id for node_id, _ in entries]
    while len(picked) < replicas:
        for node_id in active:
            if len(picked) == replicas:
                break
            picked.append(node_id)
            left[node_id] -= 1
        active = [node_id for node_id in active if left[node_id] > 0]
    return picked


def _pack(entries: list[tuple[str, int]], replicas: int) -> list[str]:
    """The fewest nodes, roomiest first; neighbouring ranks share a node.

    The last node need hold only the remainder, so it is the smallest that does: the
    roomy ones stay free for the next job."""
    taken = 0
    count = 0
    for _, slots in entries:
        count += 1
        taken += slots
        if taken >= replicas:
            break
    head = entries[: count - 1]
    remainder = replicas - sum(slots for _, slots in head)
    tail = min(
        (e for e in entries[count - 1 :] if e[1] >= remainder),
        key=lambda e: (e[1], e[0]),
    )
    picked: list[str] = []
    for node_id, slots in [*head, (tail[0], remainder)]:
        picked.extend([node_id] * min(slots, replicas - len(picked)))
    return picked


def _describe(res: Resources) -> str:
    """The part of a member's request a person recognises the gang by."""
    if res.gpu_kind:
        return f"with gpu kind {res.gpu_kind}" if res.gpu == 1 else f"with {res.gpu} gpus of kind {res.gpu_kind}"
    if res.gpu:
        return f"with {res.gpu} gpu"
    return f"with {res.cpu_milli}m cpu and {res.memory_mb} MiB"


def _scope(same: str, label: str) -> str:
    if not same:
        return ""
    return f" sharing one value of label {label}" if label else " in one zone"
