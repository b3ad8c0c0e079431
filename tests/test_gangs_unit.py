"""Gang placement (services/scheduler/gangs.py): all members or none, pure, deterministic."""

from __future__ import annotations

import pytest

from jobmesh.contract.messages.v1 import Constraints, GpuDevice, JobSpec, NodeInfo, NoopRuntime, Resources
from jobmesh.errors import InvalidSpec
from jobmesh.scheduler.gangs import place_gang

H100 = Resources(cpu_milli=1000, memory_mb=1024, gpu=1, gpu_kind="h100")


def node(node_id: str, **kw) -> NodeInfo:
    base = dict(node_id=node_id, cpu_milli=4000, memory_mb=8192, heartbeat_at=0.0)
    base.update(kw)
    return NodeInfo(**base)


def member(res: Resources = H100, **kw) -> JobSpec:
    return JobSpec(runtime=NoopRuntime(), resources=res, **kw)


def gpu_node(node_id: str, zone: str, gpus: int = 1, **kw) -> NodeInfo:
    return node(node_id, zone=zone, gpu=gpus, gpu_kind="h100", **kw)


def test_places_every_member_once_per_node_when_spreading():
    nodes = [gpu_node(f"n{i}", "a") for i in range(5)]
    d = place_gang(nodes, member(), 4, {})
    assert d.placed and len(d.nodes) == 4 and len(set(d.nodes)) == 4
    assert d.assignment() == dict(enumerate(d.nodes))


def test_a_gang_that_fits_in_no_single_zone_is_refused_though_enough_nodes_exist():
    nodes = [gpu_node(f"a{i}", "a") for i in range(3)] + [gpu_node(f"b{i}", "b") for i in range(3)]
    d = place_gang(nodes, member(), 4, {}, same="zone")
    assert not d.placed and d.never and d.field == "replicas"
    assert d.reason == "needs 4 nodes with gpu kind h100 in one zone; at most 3 even when empty"
    assert place_gang(nodes, member(), 4, {}).placed  # without the constraint it fits


def test_does_not_fit_now_waits_with_the_reason_and_never_returns_a_partial_fit():
    nodes = [gpu_node(f"a{i}", "a") for i in range(4)] + [gpu_node("b0", "b")]
    busy = {"a3": (4000, 8192, 0, 0)}  # its one gpu is reserved
    d = place_gang(nodes, member(), 4, busy, same="zone")
    assert d.nodes == () and not d.never and d.field == ""
    assert d.reason == "needs 4 nodes with gpu kind h100 in one zone; 3 free"
    assert place_gang(nodes, member(), 4, {}, same="zone").nodes != ()


def test_members_stay_on_nodes_sharing_the_label_value():
    nodes = [node(f"r1-{i}", labels={"rack": "r1"}) for i in range(2)]
    nodes += [node(f"r2-{i}", labels={"rack": "r2"}) for i in range(3)]
    nodes += [node("bare")]  # no rack label: in no group
    d = place_gang(nodes, member(Resources(cpu_milli=4000, memory_mb=1024)), 3, {}, same="label:rack")
    assert sorted(d.nodes) == ["r2-0", "r2-1", "r2-2"]
    d = place_gang([node("bare")], member(Resources()), 1, {}, same="label:rack")
    assert d.never and d.field == "same" and d.reason == "no fitting node has a label rack"


def test_the_tightest_group_that_fits_is_taken():
    nodes = [gpu_node(f"big{i}", "big") for i in range(8)] + [gpu_node(f"small{i}", "small") for i in range(4)]
    d = place_gang(nodes, member(), 4, {}, same="zone")
    assert sorted(d.nodes) == ["small0", "small1", "small2", "small3"]


def test_spread_doubles_up_only_when_nodes_run_out():
    nodes = [node(f"n{i}") for i in range(3)]
    d = place_gang(nodes, member(Resources(cpu_milli=1000, memory_mb=64)), 5, {})
    assert sorted(d.nodes) == ["n0", "n0", "n1", "n1", "n2"]
    assert len(set(d.nodes[:3])) == 3  # one round over every node before any second member


def test_pack_fills_the_fewest_nodes_and_best_fits_the_last():
    nodes = [node("big", cpu_milli=8000), node("mid", cpu_milli=3000), node("small", cpu_milli=2000)]
    d = place_gang(nodes, member(Resources(cpu_milli=1000, memory_mb=64)), 10, {}, spread="pack")
    # 8 on big, the remaining 2 on the smallest node that holds 2 (not mid).
    assert d.nodes == ("big",) * 8 + ("small",) * 2
    d = place_gang(nodes, member(Resources(cpu_milli=1000, memory_mb=64)), 4, {}, spread="pack")
    assert d.nodes == ("big",) * 4


def test_live_free_capacity_counts():
    nodes = [node("a"), node("b")]
    d = place_gang(nodes, member(Resources(cpu_milli=2000, memory_mb=64)), 2, {"a": (1000, 8192, 0, 0)})
    assert d.nodes == ("b", "b")


def test_no_node_takes_one_member_is_never_with_the_misfit_reason():
    d = place_gang([node("a")], member(), 2, {})
    assert d.never and d.field == "spec" and d.reason == "no node with gpu kind h100"
    d = place_gang([node("a")], member(Resources(), constraints=Constraints(arch="aarch64")), 1, {})
    assert d.never and d.reason == "no node with arch aarch64"
    d = place_gang([gpu_node("g", "a", draining=True)], member(), 1, {})
    assert d.never and d.reason == "every fitting node is draining"


def test_a_gang_bigger_than_the_whole_empty_cluster_names_replicas():
    nodes = [node(f"n{i}") for i in range(2)]  # 4 members of 1000m each per node
    d = place_gang(nodes, member(Resources(cpu_milli=1000, memory_mb=64)), 9, {})
    assert d.never and d.field == "replicas"
    assert d.reason == "needs 9 member slots with 1000m cpu and 64 MiB; at most 8 even when empty"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"replicas": 0}, "replicas"),
        ({"replicas": -3}, "replicas"),
        ({"same": "rack"}, "same"),
        ({"same": "label:"}, "same"),
        ({"spread": "scatter"}, "spread"),
    ],
)
def test_malformed_requests_raise_naming_the_field(kwargs, field):
    args = {"replicas": 2, "same": "", "spread": "spread", **kwargs}
    with pytest.raises(InvalidSpec) as caught:
        place_gang([node("a")], member(Resources()), args["replicas"], {}, same=args["same"], spread=args["spread"])
    assert caught.value.field == field


def test_deterministic_whatever_the_node_order():
    nodes = [gpu_node(f"n{i:02}", "abc"[i % 3], gpus=1 + i % 2) for i in range(30)]
    first = place_gang(nodes, member(), 6, {}, same="zone")
    again = place_gang(list(reversed(nodes)), member(), 6, {}, same="zone")
    assert first.placed and first == again


def test_reserved_disk_counts_now():
    # Two members' disk each when empty; the binder holds 3000 of a's 4000 MiB.
    nodes = [node("a", disk_mb=4000), node("b", disk_mb=4000)]
    res = Resources(cpu_milli=1000, memory_mb=64, disk_mb=2000)
    d = place_gang(nodes, member(res), 3, {"a": (4000, 8192, 0, 1000)}, spread="pack")
    assert not d.placed and d.reason.endswith("; 2 free")
    d = place_gang(nodes, member(res), 2, {"a": (4000, 8192, 0, 1000)}, spread="pack")
    assert d.nodes == ("b", "b")


def test_free_gpus_of_another_kind_do_not_take_members():
    devices = [GpuDevice(index=i, kind=kind) for i, kind in enumerate(("h100", "h100", "t4", "t4"))]
    mixed = node("m", gpu=4, gpu_devices=devices)
    # Both h100 are held, both t4 free: the caller counts free GPUs of the member's kind.
    assert not place_gang([mixed], member(), 1, {"m": (4000, 8192, 0, 0)}).placed
    t4 = Resources(cpu_milli=1000, memory_mb=1024, gpu=1, gpu_kind="t4")
    assert place_gang([mixed], member(t4), 2, {"m": (4000, 8192, 2, 0)}).nodes == ("m", "m")


def test_spread_prefers_a_group_with_a_node_per_member_over_a_tighter_one():
    slots4 = Resources(cpu_milli=1000, memory_mb=64)  # four per 4000m node
    nodes = [node("a0", zone="a")] + [node(f"b{i}", zone="b") for i in range(4)]
    d = place_gang(nodes, member(slots4), 4, {}, same="zone")
    assert sorted(d.nodes) == ["b0", "b1", "b2", "b3"]
    # pack still takes the tightest group, and spread does when no group has enough nodes.
    assert place_gang(nodes, member(slots4), 4, {}, same="zone", spread="pack").nodes == ("a0",) * 4
    d = place_gang(
        [node("a0", zone="a"), node("b0", zone="b"), node("b1", zone="b")], member(slots4), 4, {}, same="zone"
    )
    assert d.nodes == ("a0",) * 4
