"""The scheduler's lease self-fencing decision, with the clock injected (no I/O)."""

from __future__ import annotations

from jobmesh.scheduler.leases import SAFE_FRACTION, still_ours


def test_a_failed_renewal_keeps_the_lease_only_while_it_surely_holds():
    ttl = 6.0
    assert still_ours(now=100.0, renewed_at=100.0, ttl=ttl)
    assert still_ours(now=100.0 + ttl * SAFE_FRACTION - 0.01, renewed_at=100.0, ttl=ttl)
    # Past the margin a standby may own it already: let go, even though the TTL has not run out.
    assert not still_ours(now=ttl * SAFE_FRACTION, renewed_at=0.0, ttl=ttl)
    assert not still_ours(now=100.0 + ttl, renewed_at=100.0, ttl=ttl)


def test_partitions_are_shared_out_over_the_live_schedulers():
    from jobmesh.scheduler.leases import fair_share

    assert fair_share(4, 1) == 4
    assert fair_share(4, 2) == 2
    assert fair_share(4, 3) == 2  # 2 + 1 + 1: nobody holds more than two
    assert fair_share(4, 8) == 1
    assert fair_share(4, 0) == 4  # not even itself heard yet: it counts as one
