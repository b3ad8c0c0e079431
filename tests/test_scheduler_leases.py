"""Partition leases: a standby scheduler takes over a killed owner's partitions within the
lease TTL, and jobs in every partition run under the new owner."""

from __future__ import annotations

import time

import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobSpec, NoopRuntime, Submission
from jobmesh.errors import NotFound
from tests.cluster_fixtures import Service
from tests.helpers import eventually

pytestmark = pytest.mark.integration

LEASE_TTL = 3.0
NODE_ENV = {"JOBMESH_NODE_CPU_MILLI": "100000", "JOBMESH_NODE_MEMORY_MB": "100000"}


async def _owners(kv, partitions: int) -> dict[int, str]:
    owners = {}
    for p in range(partitions):
        try:
            owners[p] = (await kv.get(subjects.lease_key(p))).value.decode()
        except Exception:  # noqa: BLE001 - missing or deleted: nobody owns it
            pass
    return owners


async def test_standby_takes_over_partitions_within_the_lease_ttl(nats_server, make_cluster):
    env = {**NODE_ENV, "JOBMESH_NODE_ID": "lease-node", "JOBMESH_LEASE_TTL_SECONDS": str(LEASE_TTL)}
    services = ("trigger", "binder", "executor", "tracker", Service("scheduler", {"JOBMESH_INSTANCE": "sched-a"}, "-a"))
    cluster = await make_cluster(services, env=env, name="leases")
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value(subjects.KV_LEASES)
        partitions = 4

        async def a_owns_all():
            owners = await _owners(kv, partitions)
            return len(owners) == partitions and set(owners.values()) == {"sched-a"}

        await eventually(a_owns_all, timeout=20, what="sched-a to own every partition")
        standby = cluster.start_service("scheduler", {"JOBMESH_INSTANCE": "sched-b"}, tag="-b")
        await cluster.wait_healthy(("scheduler",))
        assert set((await _owners(kv, partitions)).values()) == {"sched-a"}  # b only waits

        owner = next(sp for sp in cluster.procs if sp.name == "scheduler" and sp is not standby)
        owner.proc.kill()
        owner.proc.wait(10)
        cluster.procs.remove(owner)
        killed_at = time.monotonic()

        async def b_owns_all():
            owners = await _owners(kv, partitions)
            return len(owners) == partitions and set(owners.values()) == {"sched-b"}

        await eventually(b_owns_all, timeout=LEASE_TTL * 4, what="sched-b to take every partition", interval=0.05)
        took = time.monotonic() - killed_at
        print(f"take-over took {took:.2f}s (lease TTL {LEASE_TTL}s)")
        # The lease expires at most one TTL after the last renewal; b notices at its next beat.
        assert took <= LEASE_TTL + LEASE_TTL / 6 + 0.5, f"take-over took {took:.2f}s"

        client = await Client.connect(nats_server.url)
        try:
            reply = await client.submit(
                [Submission(spec=JobSpec(runtime=NoopRuntime(), queue=f"q{i}")) for i in range(8)]
            )

            async def all_done():
                try:
                    views = [await client.get(j) for j in reply.job_ids]
                except NotFound:
                    return False
                return all(v.state == "succeeded" for v in views)

            await eventually(all_done, timeout=20, what="jobs in every partition to run under sched-b")
        finally:
            await client.close()
    finally:
        await nc.close()
