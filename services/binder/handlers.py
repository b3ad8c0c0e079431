"""Binder handlers: reserve on JobReady, release on terminal events.

Bind: plan the batch against the cached allocations, write each node's new reservations
with one compare-and-set, retry jobs that lost a race on their next candidate, then
publish JobBound on each node's dispatch subject (and JobUnplaceable for jobs that fit
nowhere) and ack. Release: remove the attempt's reservation however the attempt ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from jobmesh.binder.allocation import Binding, confirm_gone, plan, reserve, without
from jobmesh.binder.allocations import Allocations
from jobmesh.contract import subjects
from jobmesh.contract.ids import attempt_key, event_id, parse_attempt_key, rebound_id, release_id
from jobmesh.contract.messages.v1 import (
    Allocation,
    JobBound,
    JobLost,
    JobReady,
    JobUnplaceable,
    NodeInfo,
    NodesReply,
    NodeView,
    Resources,
)
from jobmesh.errors import Conflict, JobmeshError
from jobmesh.runtime.nodes import NodeWatcher
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.service import Envelope

log = logging.getLogger("jobmesh.binder")

MAX_ROUNDS = 4  # candidates tried per job per batch after lost races


class Binder:
    """Reserves capacity for ready jobs and releases it when they end.

    Args:
        allocations: the allocation records (CAS writes).
        nodes: the live node view.
        publisher: JetStream publisher.
        clock: returns the current unix time.
    """

    def __init__(
        self,
        allocations: Allocations,
        nodes: NodeWatcher,
        publisher: Publisher,
        clock: Callable[[], float] = time.time,
        strategy: str = "spread",
    ) -> None:
        self._strategy = strategy
        self._allocs = allocations
        self._nodes = nodes
        self._publisher = publisher
        self._clock = clock

    async def bind(self, batch: list[Envelope]) -> None:
        """Handle a batch of JobReady."""
        by_key: dict[str, Envelope] = {}
        for env in batch:
            job: JobReady = env.message
            key = attempt_key(job.job_id, job.attempt)
            if key not in by_key or by_key[key].message.release < job.release:
                by_key[key] = env
        nodes = {n.node_id: n for n in self._nodes.alive()}
        skip: dict[str, set[str]] = {}
        bound: list[Binding] = []
        refused: list[tuple[JobReady, str]] = []
        remaining = []
        stale: list[tuple[str, str]] = []
        for key, env in by_key.items():
            # A redelivered JobReady whose attempt already holds a reservation (the JobBound
            # publish failed, or we crashed before acking) goes back to that node: planning
            # it afresh could reserve a second node and leak the first reservation. If that
            # node has gone (or drains) since, the reservation is dropped and the job placed anew.
            holder = self._allocs.holder(key)
            if holder is not None and holder in nodes and not nodes[holder].draining:
                alloc = self._allocs.records[holder][0]
                bound.append(Binding(env.message, holder, alloc.reservations[key].scratch_dir, False))
            else:
                if holder is not None:
                    stale.append((holder, key))
                remaining.append(env.message)
        if stale:
            await self._remove(stale)
        rebound = {key for _, key in stale}
        for _ in range(MAX_ROUNDS):
            if not remaining:
                break
            p = plan(remaining, nodes, self._allocs.snapshot(), skip, self._strategy)
            refused.extend(p.refused)
            results = await asyncio.gather(*(self._reserve(node_id, jobs, nodes) for node_id, jobs in p.assign.items()))
            remaining = []
            for node_id, (won, lost) in zip(p.assign, results, strict=True):
                bound.extend(won)
                for job in lost:
                    skip.setdefault(job.job_id, set()).add(node_id)
                    remaining.append(job)
        refused.extend((job, "lost every reservation race this round") for job in remaining)
        await self._announce(by_key, bound, refused, rebound)

    async def _reserve(
        self, node_id: str, jobs: list[JobReady], nodes: dict[str, NodeInfo]
    ) -> tuple[list[Binding], list[JobReady]]:
        node = nodes[node_id]
        now = self._clock()

        def edit(alloc: Allocation) -> tuple[Allocation | None, tuple[list[Binding], list[JobReady]]]:
            new_alloc, won, lost = reserve(node, alloc, jobs, now)
            return new_alloc, (won, lost)

        try:
            return await self._allocs.change(node_id, edit)
        except Conflict:
            log.warning("node %s: gave up reserving after repeated races", node_id)
            return [], list(jobs)

    async def _announce(
        self,
        by_key: dict[str, Envelope],
        bound: list[Binding],
        refused: list[tuple[JobReady, str]],
        rebound: set[str],
    ) -> None:
        now = self._clock()
        outgoing = []
        for binding in bound:
            job, node_id, scratch = binding.job, binding.node_id, binding.scratch_dir
            key = attempt_key(job.job_id, job.attempt)
            message = JobBound(
                job_id=job.job_id,
                attempt=job.attempt,
                partition=job.partition,
                node_id=node_id,
                spec=job.spec,
                scratch_dir=scratch,
                submitted_at=job.submitted_at,
                bound_at=now,
            )
            context = by_key[key].context
            if key in rebound:
                # Its first node is gone: this binding must not be dropped as a duplicate.
                msg_id = rebound_id(job.job_id, job.attempt, subjects.BOUND, node_id)
            else:
                msg_id = event_id(job.job_id, job.attempt, subjects.BOUND)
            outgoing.append(Outgoing(subjects.node_dispatch(node_id), message, msg_id, context))
        for job, reason in refused:
            refusal = JobUnplaceable(
                job_id=job.job_id,
                attempt=job.attempt,
                partition=job.partition,
                reason=reason,
                at=now,
                release=job.release,
            )
            context = by_key[attempt_key(job.job_id, job.attempt)].context
            outgoing.append(
                Outgoing(
                    subjects.job_event(job.partition, subjects.UNPLACEABLE),
                    refusal,
                    release_id(job.job_id, job.attempt, subjects.UNPLACEABLE, job.release),
                    context,
                )
            )
        acks = await self._publisher.publish(outgoing)
        # A duplicate JobBound for a reservation we just made means an earlier delivery
        # was bound elsewhere (by a binder that died before acking): give ours back.
        doubles = [
            (b.node_id, attempt_key(b.job.job_id, b.job.attempt))
            for b, ack in zip(bound, acks[: len(bound)], strict=True)
            if b.new and ack.duplicate and attempt_key(b.job.job_id, b.job.attempt) not in rebound
        ]
        if doubles:
            await self._remove(doubles)

    async def release(self, batch: list[Envelope]) -> None:
        """Handle a batch of terminal events: free each attempt's reservation."""
        pairs = []
        for env in batch:
            node_id = getattr(env.message, "node_id", "")
            if node_id:
                pairs.append((node_id, attempt_key(env.message.job_id, env.message.attempt)))
        await self._remove(pairs)

    async def _remove(self, pairs: list[tuple[str, str]]) -> None:
        by_node: dict[str, set[str]] = {}
        for node_id, key in pairs:
            by_node.setdefault(node_id, set()).add(key)

        def editor(keys: set[str]) -> Callable[[Allocation], tuple[Allocation | None, None]]:
            return lambda alloc: (without(alloc, keys), None)

        await asyncio.gather(*(self._allocs.change(node, editor(keys)) for node, keys in by_node.items()))

    async def nodes(self, env: Envelope) -> NodesReply:
        """Every node with its capacity, allocation and last heartbeat."""
        views = []
        allocs = self._allocs.snapshot()
        for node, alive in self._nodes.all():
            alloc = allocs.get(node.node_id)
            used = Resources(cpu_milli=0, memory_mb=0)
            count = 0
            if alloc is not None:
                count = len(alloc.reservations)
                used = Resources(
                    cpu_milli=sum(r.resources.cpu_milli for r in alloc.reservations.values()),
                    memory_mb=sum(r.resources.memory_mb for r in alloc.reservations.values()),
                    gpu=sum(r.resources.gpu for r in alloc.reservations.values()),
                    disk_mb=sum(r.resources.disk_mb for r in alloc.reservations.values()),
                )
            views.append(NodeView(node=node, alive=alive, allocated=used, reservations=count))
        return NodesReply(nodes=views)

    async def reap_lost_nodes(self, ttl: float) -> None:
        """Declare lost the attempts held on nodes that stopped heartbeating (a background task).

        A node whose heartbeat is older than the node TTL at two checks in a row (half a
        TTL apart) is gone: each attempt it holds ends as JobLost. The scheduler then frees
        the job's queue slot, key and group turn, the tracker records "lost", and this
        binder's release consumer frees the reservation, so an attempt ends however it
        ends. Every binder replica may publish the same JobLost; its id makes that one.
        """
        suspects: set[str] = set()
        while True:
            await asyncio.sleep(ttl / 2)
            alive = {n.node_id for n in self._nodes.alive()}
            held = {node for node, (alloc, _) in self._allocs.records.items() if alloc.reservations}
            confirmed, suspects = confirm_gone(held, alive, suspects)
            for node_id in confirmed:
                try:
                    await self._declare_lost(node_id)
                except JobmeshError as exc:
                    # NATS away: the node stays gone, so the next round declares it again.
                    log.warning("could not declare the attempts of node %s lost: %s", node_id, exc)
                    suspects.add(node_id)

    async def _declare_lost(self, node_id: str) -> None:
        alloc = self._allocs.records.get(node_id, (None, 0))[0]
        if alloc is None or not alloc.reservations:
            return
        now = self._clock()
        outgoing = []
        for key, reservation in alloc.reservations.items():
            job_id, attempt = parse_attempt_key(key)
            lost = JobLost(job_id=job_id, attempt=attempt, partition=reservation.partition, node_id=node_id, at=now)
            outgoing.append(
                Outgoing(
                    subjects.job_event(reservation.partition, subjects.LOST),
                    lost,
                    event_id(job_id, attempt, subjects.LOST),
                )
            )
        log.warning("node %s stopped heartbeating; %d attempts on it are lost", node_id, len(outgoing))
        await self._publisher.publish(outgoing)
