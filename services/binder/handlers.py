"""Binder handlers: reserve on JobReady, release on terminal events, forward cancels.

Bind: plan the batch against the cached allocations, write each node's new reservations
with one compare-and-set, retry jobs that lost a race on their next candidate, then
publish JobBound on each node's dispatch subject (and JobUnplaceable for jobs that fit
nowhere) and ack. Nothing is bound on a view that has not caught up since a reconnect.
A JobBound names the GPU indices its reservation holds (``Reservation.gpu_devices``), the
same ones on every redelivery. Release: remove the attempt's reservation (and with it its
GPUs) however the attempt ended, and return only once the server's record is known not to
hold it. Cancel: send AttemptCancel to the node that holds the attempt's reservation.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence

import msgspec

from jobmesh.binder.allocation import NO_ROOM, Binding, allocated, plan, reserve
from jobmesh.binder.allocations import Allocations
from jobmesh.binder.backfill import (
    BACKFILL_AFTER_RELEASES,
    BACKFILL_EARLY,
    BACKFILL_RETRY_MIN,
    EXPIRY,
    choose_node,
    future_hold,
    is_large,
    promised_text,
)
from jobmesh.binder.cancels import Forward, GiveUp, RecentAttempts, Wait, cancel_step
from jobmesh.binder.gangs import RACE_LOST, RACE_RETRY_SECONDS, choose_gang, peers, reserve_member
from jobmesh.binder.metrics import BinderMetrics, NodeUsage
from jobmesh.binder.preempting import (
    HOLD_RETRY_SECONDS,
    PREEMPTED_REASON,
    bound_hold,
    describe,
    hold,
    plan_preemption,
    waiting_on,
    waiting_text,
)
from jobmesh.contract import subjects
from jobmesh.contract.ids import attempt_key, event_id, member_event_id, rebound_id, release_id, split_attempt_key
from jobmesh.contract.messages.v1 import (
    Allocation,
    AttemptCancel,
    JobBound,
    JobCancelling,
    JobFailed,
    JobLost,
    JobReady,
    JobSucceeded,
    JobUnplaceable,
    NodeInfo,
    NodesReply,
    NodeView,
    QueueConfig,
    Reservation,
)
from jobmesh.contract.validation import gang_need
from jobmesh.errors import Conflict, Unavailable
from jobmesh.runtime.fencing import binding_fence
from jobmesh.runtime.nodes import NodeWatcher
from jobmesh.runtime.outcomes import ACK, Outcome, Retry
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.reconnects import Reconnects
from jobmesh.runtime.service import Envelope
from jobmesh.runtime.tracing import Context

log = logging.getLogger("jobmesh.binder")

MAX_ROUNDS = 4  # candidates tried per job per batch after lost races
# How long a batch of JobReady waits for the views to catch up before it is handed back.
FRESH_WAIT = 5.0
CANCEL = "cancel"  # the event kind in an AttemptCancel's message id
CANCELLED_REASON = "cancelled"  # JobUnplaceable.reason for an attempt cancelled before its binding
PREEMPT = "preempt"  # the event kind in a preemption's AttemptCancel message id
GANG_STOP = "gang_stop"  # the event kind of the cancel that stops a failed gang's other members


class Binder:
    """Reserves capacity for ready jobs, releases it when they end, and forwards cancels.

    Args:
        allocations: the allocation records (CAS writes).
        nodes: the live node view.
        publisher: JetStream publisher.
        clock: returns the current unix time.
        strategy: ``spread`` or ``pack``, within the best tier.
        bind_timeout: seconds after a cancel was issued that an attempt with no reservation
            is taken as never to be bound (``settings.bind_timeout_seconds``).
        node_ttl: seconds without a heartbeat after which a node counts as gone.
        monotonic: returns monotonic seconds (compared with the node view's ``fresh_since``).
        reconnects: cuts short the waits on NATS that a reconnect made hopeless (the
            service wires it to the runtime's reconnect hook).
        metrics: the binder's instruments (the global meter's when omitted).
        queues: a queue's configuration (the live jm_config view): whether a job of it may
            preempt, and its cap as a victim. None: nothing is ever preempted.
        weight: a tenant's fair-share weight (whose tenants are over their share).
    """

    def __init__(
        self,
        allocations: Allocations,
        nodes: NodeWatcher,
        publisher: Publisher,
        clock: Callable[[], float] = time.time,
        strategy: str = "spread",
        *,
        bind_timeout: float = 30.0,
        node_ttl: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
        reconnects: Reconnects | None = None,
        metrics: BinderMetrics | None = None,
        queues: Callable[[str], QueueConfig] | None = None,
        weight: Callable[[str], float] = lambda _tenant: 1.0,
    ) -> None:
        self._metrics = metrics or BinderMetrics()
        self._queues = queues
        self._weight = weight
        self._strategy = strategy
        self._allocs = allocations
        self._nodes = nodes
        self._publisher = publisher
        self._clock = clock
        self._bind_timeout = bind_timeout
        self._node_ttl = node_ttl
        self._monotonic = monotonic
        self._guard = (reconnects or Reconnects()).guard
        self.cancelled = RecentAttempts()
        # Attempts whose end this replica has released: a cancel that raced the end needs
        # no node to stop anything, and is settled at once instead of waiting for a holder.
        self.ended = RecentAttempts()

    async def bind(self, batch: list[Envelope]) -> None:
        """Handle a batch of JobReady.

        Args:
            batch: the JobReady envelopes; the runtime acks them all when this returns.

        Raises:
            Unavailable: the views have not caught up since a reconnect (the batch comes
                back later), or NATS does not answer.
        """
        await self._wait_for_views(len(batch))
        by_key: dict[str, Envelope] = {}
        for env in batch:
            job: JobReady = env.message
            key = attempt_key(job.job_id, job.attempt)
            if key not in by_key or by_key[key].message.release < job.release:
                by_key[key] = env
        if any(env.deliveries > 1 and self._allocs.holder(key) is None for key, env in by_key.items()):
            # A redelivery may hold a reservation this cache has not seen yet (the replica
            # that made it died before acking): look on the server before planning anew.
            await self._guard(self._allocs.reload(), "reading the allocations")
        nodes = {n.node_id: n for n in self._nodes.alive()}
        # Only a node view that has been caught up for a whole TTL can tell a gone node
        # from one whose heartbeats it has not seen yet.
        settled = self._monotonic() - self._nodes.fresh_since >= self._node_ttl
        skip: dict[str, set[str]] = {}
        bound: list[Binding] = []
        refused: list[tuple[JobReady, str]] = []
        hints: dict[str, float] = {}  # how soon a refused job should come back (JobUnplaceable.retry_after)
        resend: list[Outgoing] = []  # cancels of the victims of holds that still wait
        clear: list[tuple[str, str]] = []  # holds bound now: their victims have gone
        remaining = []
        stale: list[tuple[str, str]] = []
        gangs: list[Envelope] = []
        for key, env in by_key.items():
            job = env.message
            if job.spec.replicas > 1:
                gangs.append(env)  # all members or none: bound apart (_bind_gangs)
                continue
            # A redelivered JobReady whose attempt already holds a reservation (the JobBound
            # publish failed, or we crashed before acking) goes back to that node: planning
            # it afresh could reserve a second node and leak the first reservation. If that
            # node has gone (or drains) since, the reservation is dropped and the job placed anew.
            holder = self._allocs.holder(key)
            if holder is not None and self._expired_hold(holder, key):
                stale.append((holder, key))  # a promise past its expiry: planned afresh
                remaining.append(job)
            elif holder is not None and self._usable(nodes.get(holder), settled):
                record = self._allocs.records[holder][0]
                held = record.reservations[key]
                waiting = waiting_on(record, held) if held.waiting_for else []
                if held.starts_at:
                    # A future hold (backfill): bound there once it fits, nowhere else.
                    remaining.append(msgspec.structs.replace(job, candidates=[holder], tiers=[0]))
                elif waiting:
                    # A hold: the room is this job's once its victims have stopped. Their
                    # cancels go again (a no-op when they got through: same message ids),
                    # in case the delivery that wrote the hold died before sending them.
                    refused.append((job, waiting_text(holder, waiting)))
                    hints[key] = HOLD_RETRY_SECONDS
                    resend.extend(self._victim_cancels(job, record, waiting, env.context))
                else:
                    if held.waiting_for:
                        clear.append((holder, key))  # bound from here on: it runs, a plain reservation
                    bound.append(Binding(job, holder, held.scratch_dir, False, held.gpu_devices))
            elif holder is None and key in self.cancelled:
                log.info("job %s attempt %d: cancelled before its binding; not bound", job.job_id, job.attempt)
                refused.append((job, CANCELLED_REASON))
            else:
                if holder is not None:
                    log.info(
                        "job %s attempt %d: its node %s is gone or draining; binding it elsewhere",
                        job.job_id,
                        job.attempt,
                        holder,
                    )
                    stale.append((holder, key))
                remaining.append(job)
        if stale:
            await self._guard(self._remove(stale), "removing reservations on gone nodes")
        if clear:
            await self._guard(self._clear_holds(clear), "binding held room")
        rebound = {key for _, key in stale}
        for _ in range(MAX_ROUNDS):
            if not remaining:
                break
            p = plan(remaining, nodes, self._allocs.snapshot(), skip, self._strategy, self._clock())
            refused.extend(p.refused)
            reserving = asyncio.gather(*(self._reserve(node_id, jobs, nodes) for node_id, jobs in p.assign.items()))
            results = await self._guard(reserving, "reserving")
            remaining = []
            for node_id, (won, lost) in zip(p.assign, results, strict=True):
                bound.extend(won)
                for job in lost:
                    skip.setdefault(job.job_id, set()).add(node_id)
                    remaining.append(job)
        refused.extend((job, "lost every reservation race this round") for job in remaining)
        cancels: list[Outgoing] = resend
        if self._queues is not None and any(job.spec.preempt and reason == NO_ROOM for job, reason in refused):
            refused, started = await self._preempt(refused, nodes, by_key, hints)
            cancels = cancels + started
        if any(reason.startswith(NO_ROOM) for _, reason in refused):
            refused = await self._backfill(refused, nodes, hints)
        if gangs:
            # The members' JobBound go after the plain bindings (whose acks come first).
            cancels = await self._bind_gangs(gangs, nodes, settled, refused, hints) + cancels
        await self._announce(by_key, bound, refused, rebound, cancels, hints)

    async def _bind_gangs(
        self,
        envs: list[Envelope],
        nodes: dict[str, NodeInfo],
        settled: bool,
        refused: list[tuple[JobReady, str]],
        hints: dict[str, float],
    ) -> list[Outgoing]:
        """Reserve every member of each gang or none (``gangs.py``), one gang after the
        other; returns the members' JobBound. A gang that fits nowhere, or lost a race
        and gave back what it had reserved, joins ``refused``."""
        out: list[Outgoing] = []
        for env in envs:
            job: JobReady = env.message
            key = attempt_key(job.job_id, job.attempt)
            replicas = job.spec.replicas
            held = self._members(key)
            usable = all(self._usable(nodes.get(node_id), settled) for node_id in held)
            later = any(job.release > r.release for r in held.values())
            if held and usable and not later:
                if {r.rank for r in held.values()} == set(range(replicas)):
                    # A redelivery of a gang bound before: the same members, the same ids.
                    by_rank = {r.rank: node_id for node_id, r in held.items()}
                    order = [by_rank[rank] for rank in range(replicas)]
                    out.extend(self._member_bounds(job, order, held, nodes, env))
                else:
                    # Some members are missing: they ended already (the gang was bound and
                    # runs), or the delivery that reserved them died half way. Nothing here
                    # tells which, so nothing is touched: a gang that never ran goes
                    # unlisted, and the scheduler's next release (a later one) starts afresh.
                    log.info(
                        "job %s attempt %d: redelivered with %d of %d members held; left to its lease",
                        job.job_id, job.attempt, len(held), replicas,
                    )  # fmt: skip
                continue
            if held:
                # Released again (no member ever ran), or a member's node is gone or drains.
                await self._guard(self._remove([(node_id, key) for node_id in held]), "giving back a gang's room")
            if key in self.cancelled:
                refused.append((job, CANCELLED_REASON))
                continue
            now = self._clock()
            plan = choose_gang(job, nodes, self._allocs.snapshot(), now)
            if isinstance(plan, str):
                refused.append((job, plan))
                continue
            reserved: dict[str, Reservation] = {}
            lost = ""
            # In node-id order: two binders racing never each hold what the other waits for.
            for rank in sorted(range(replicas), key=lambda r: plan.nodes[r]):
                node_id = plan.nodes[rank]
                edit = functools.partial(reserve_member, node=nodes[node_id], job=job, rank=rank, now=now)
                try:
                    reservation = await self._guard(self._allocs.change(node_id, edit), "reserving a gang member")
                except Conflict:
                    reservation = None
                if reservation is None:
                    lost = node_id
                    break
                reserved[node_id] = reservation
            if lost:
                await self._guard(self._remove([(node_id, key) for node_id in reserved]), "giving back a gang's room")
                log.info(
                    "job %s attempt %d: gang of %d lost node %s to another binder; gave back %d members",
                    job.job_id, job.attempt, replicas, lost, len(reserved),
                )  # fmt: skip
                need = gang_need(replicas, job.spec.resources, job.spec.same)
                refused.append((job, f"{need}; {RACE_LOST} for node {lost}, and gave back its other members"))
                hints[key] = RACE_RETRY_SECONDS
                continue
            log.info(
                "job %s attempt %d: gang of %d bound on %s", job.job_id, job.attempt, replicas, ", ".join(plan.nodes)
            )
            self._metrics.placed(job.spec.queue, "bound", self._clock() - job.ready_at)
            out.extend(self._member_bounds(job, list(plan.nodes), reserved, nodes, env))
        return out

    def _members(self, key: str) -> dict[str, Reservation]:
        """The reservations of ``key`` that are a gang's members, by node."""
        out = {}
        for node_id in self._allocs.holders(key):
            record = self._allocs.records.get(node_id)
            held = record[0].reservations.get(key) if record is not None else None
            if held is not None and held.world_size > 1 and not held.starts_at:
                out[node_id] = held
        return out

    def _member_bounds(
        self,
        job: JobReady,
        by_rank: list[str],
        reservations: dict[str, Reservation],
        nodes: dict[str, NodeInfo],
        env: Envelope,
    ) -> list[Outgoing]:
        """One JobBound per member, each on its node's dispatch subject, with its rank and
        every member's address."""
        key = attempt_key(job.job_id, job.attempt)
        addresses = peers(key, [nodes.get(node_id) for node_id in by_rank], by_rank)
        now = self._clock()
        out = []
        for rank, node_id in enumerate(by_rank):
            held = reservations[node_id]
            message = _bound(
                job,
                node_id,
                held.scratch_dir,
                held.gpu_devices,
                now,
                rank=rank,
                world_size=len(by_rank),
                peers=addresses,
            )
            # The node in the id: a gang bound afresh elsewhere is not dropped as a duplicate.
            msg_id = rebound_id(job.job_id, job.attempt, f"{subjects.BOUND}:{rank}", node_id)
            out.append(Outgoing(subjects.node_dispatch(node_id), message, msg_id, env.context))
        return out

    async def _backfill(
        self, refused: list[tuple[JobReady, str]], nodes: dict[str, NodeInfo], hints: dict[str, float]
    ) -> list[tuple[JobReady, str]]:
        """For each job still refused for want of room: say when its future hold promises
        the room, or write one for a starving job (``backfill.py``). ``hints`` gets how
        soon each such job should be released again (its promised start)."""
        now = self._clock()
        out: list[tuple[JobReady, str]] = []
        snapshot: dict[str, Allocation] | None = None  # taken once, and again after a write
        for job, reason in refused:
            if not reason.startswith(NO_ROOM):
                out.append((job, reason))
                continue
            key = attempt_key(job.job_id, job.attempt)
            holder = self._allocs.holder(key)
            start: float | None = None
            if holder is not None:
                held = self._allocs.records[holder][0].reservations.get(key)
                start = held.starts_at if held is not None and held.starts_at else None
            elif job.release >= BACKFILL_AFTER_RELEASES and any(
                c in nodes and is_large(nodes[c], job.spec.resources) for c in job.candidates
            ):
                snapshot = snapshot if snapshot is not None else self._allocs.snapshot()
                choice = choose_node(job.candidates, nodes, snapshot, job.spec.resources, now)
                if choice is not None:
                    holder = choice[0]
                    edit = functools.partial(
                        future_hold,
                        nodes[holder],
                        key=key,
                        res=job.spec.resources,
                        partition=job.partition,
                        priority=job.spec.priority,
                        now=now,
                    )
                    try:
                        start = await self._guard(self._allocs.change(holder, edit), "reserving future room")
                    except Conflict:
                        start = None
                    if start is not None:
                        snapshot = None
                        log.info(
                            "job %s attempt %d: room on %s reserved from %.0fs from now (backfill)",
                            job.job_id,
                            job.attempt,
                            holder,
                            start - now,
                        )
            if start is None or holder is None:
                out.append((job, reason))
                continue
            if start > now + BACKFILL_RETRY_MIN:
                # Back a little before the promise (it fits as soon as the node has drained);
                # past it, the scheduler's own backoff: no refusal storm if it overstays.
                hints[key] = max(BACKFILL_RETRY_MIN, start - now - BACKFILL_EARLY)
            out.append((job, promised_text(holder, start)))
        return out

    def _victim_cancels(
        self, job: JobReady, record: Allocation, victims: list[str], context: Context | None
    ) -> list[Outgoing]:
        """An ``AttemptCancel`` for each victim of ``job``'s hold on ``record``'s node."""
        out = []
        for victim_key in victims:
            victim = record.reservations.get(victim_key)
            if victim is None:
                continue  # gone already
            job_id, attempt = split_attempt_key(victim_key)
            reason = f"{PREEMPTED_REASON}: job {job.job_id} of priority {job.spec.priority} needs the room"
            # Its own message id: a user's cancel of the same attempt must still get through.
            msg_id = event_id(job_id, attempt, PREEMPT)
            out.append(
                _cancel(job_id, attempt, victim.partition, record.node_id, reason, self._clock(), msg_id, context)
            )
        return out

    async def _clear_holds(self, pairs: list[tuple[str, str]]) -> None:
        for node_id, key in pairs:
            try:
                await self._allocs.change(node_id, functools.partial(bound_hold, key=key, now=self._clock()))
            except Conflict:
                # It stays marked as a hold: never chosen as a victim, which costs nothing
                # but a missed choice; the binding itself goes ahead.
                log.warning("node %s: could not mark the held room of %s as bound", node_id, key)

    async def _preempt(
        self,
        refused: list[tuple[JobReady, str]],
        nodes: dict[str, NodeInfo],
        by_key: dict[str, Envelope],
        hints: dict[str, float],
    ) -> tuple[list[tuple[JobReady, str]], list[Outgoing]]:
        """For each refused job that asks to preempt: choose victims, hold the room for it
        on their node, and cancel them (``preempting.py``). Returns the refusals with their
        reasons, and the cancels to send with them; ``hints`` gets each holding job's quick
        return (its victims stop within the node's grace)."""
        assert self._queues is not None
        now = self._clock()
        out: list[tuple[JobReady, str]] = []
        cancels: list[Outgoing] = []
        for job, reason in refused:
            if not job.spec.preempt or reason != NO_ROOM or self._allocs.holder(attempt_key(job.job_id, job.attempt)):
                # A job holding a future hold waits for its promise (backfill) there.
                out.append((job, reason))
                continue
            # Each job sees the holds the ones before it wrote (the cache has our writes).
            snapshot = self._allocs.snapshot()
            choice = plan_preemption(job, self._queues, self._weight, snapshot, nodes, now)
            if choice is None:
                out.append((job, f"{reason}; no preemptible attempt of low enough priority frees enough"))
                continue
            victims = [attempt_key(v.job_id, v.attempt) for v in choice.victims]

            edit = functools.partial(hold, nodes[choice.node_id], job=job, victims=victims, now=now)
            try:
                held: list[str] | None = await self._guard(self._allocs.change(choice.node_id, edit), "holding room")
            except Conflict:
                held = None
            if held is None:
                out.append((job, f"{reason}; its preemption on {choice.node_id} is planned again"))
                continue
            # The victims the stored hold waits for: ours, or those an earlier delivery chose.
            victims = held
            record = self._allocs.records[choice.node_id][0]
            cancels.extend(
                self._victim_cancels(job, record, victims, by_key[attempt_key(job.job_id, job.attempt)].context)
            )
            log.info(
                "job %s attempt %d (priority %d): preempting %s on node %s; the room is held for it",
                job.job_id,
                job.attempt,
                job.spec.priority,
                ", ".join(victims),
                choice.node_id,
            )
            self._metrics.preempted(job.spec.queue, len(victims))
            hints[attempt_key(job.job_id, job.attempt)] = HOLD_RETRY_SECONDS
            out.append((job, describe(choice)))
        return out, cancels

    def _expired_hold(self, node_id: str, key: str) -> bool:
        held = self._allocs.records[node_id][0].reservations.get(key)
        return held is not None and bool(held.starts_at) and self._clock() > held.starts_at + EXPIRY

    @staticmethod
    def _usable(node: NodeInfo | None, settled: bool) -> bool:
        """Whether an attempt's reservation on ``node`` stands: the node lives and takes
        work, or the view is too young to call it gone."""
        return (node is None and not settled) or (node is not None and not node.draining)

    async def _wait_for_views(self, count: int) -> None:
        """Return once both views have caught up since their last (re)start, or raise."""
        deadline = self._monotonic() + FRESH_WAIT
        if await self._allocs.wait_fresh(FRESH_WAIT) and await self._nodes.wait_fresh(
            max(0.0, deadline - self._monotonic())
        ):
            return
        raise Unavailable(f"the binder's views are catching up after a reconnect; {count} JobReady wait")

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
        cancels: list[Outgoing] | None = None,
        hints: dict[str, float] | None = None,
    ) -> None:
        now = self._clock()
        outgoing: list[Outgoing] = []
        for binding in bound:
            job, node_id, scratch = binding.job, binding.node_id, binding.scratch_dir
            key = attempt_key(job.job_id, job.attempt)
            message = _bound(job, node_id, scratch, binding.gpu_devices, now)
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
                retry_after=(hints or {}).get(attempt_key(job.job_id, job.attempt), 0.0),
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
        # The preemption cancels go last: the acks of the bindings come first, in order.
        acks = await self._guard(self._publisher.publish(outgoing + (cancels or [])), "publishing bindings")
        # Once published: from the scheduler's release to this answer. A binding an
        # earlier delivery made (not new) is not counted again.
        placed = self._metrics.placed
        for binding in bound:
            if binding.new:
                placed(binding.job.spec.queue, "bound", now - binding.job.ready_at)
        for job, _reason in refused:
            placed(job.spec.queue, "unplaceable", now - job.ready_at)
        # Not guarded from here: a double must go even when NATS reconnects meanwhile.
        # A duplicate JobBound for a reservation we just made means an earlier delivery
        # was bound elsewhere (by a binder that died before acking): give ours back.
        doubles = [
            b
            for b, ack in zip(bound, acks[: len(bound)], strict=True)
            if b.new and ack.duplicate and attempt_key(b.job.job_id, b.job.attempt) not in rebound
        ]
        for b in doubles:
            log.info(
                "job %s attempt %d: bound already by an earlier delivery; giving back the reservation on %s",
                b.job.job_id,
                b.job.attempt,
                b.node_id,
            )
        if doubles:
            await self._remove([(b.node_id, attempt_key(b.job.job_id, b.job.attempt)) for b in doubles])

    async def release(self, batch: list[Envelope]) -> list[Outcome] | None:
        """Handle a batch of terminal events: free each attempt's reservation.

        Returns only once the server's record of every node named holds none of the
        attempts (so the batch is acked only then). An event that names no node (expired,
        or cancelled before any binding) has nothing to free. An executor's event (the
        node form of the subject) frees only a reservation on its own node; one for an
        attempt another node holds is fenced off (:func:`binding_fence`): it frees
        nothing and does not count as the attempt's end.

        Args:
            batch: the terminal events (``TerminalEvent``).

        Returns:
            None (ack them all), or one outcome per event when one was fenced off.

        Raises:
            Unavailable: NATS does not answer (the batch comes back later).
            Conflict: a record kept changing under every compare-and-set.
        """
        pairs: list[tuple[str, str]] = []
        unseen: list[str] = []  # attempts never bound, looked up on the server
        stops: list[Outgoing] = []  # a failed gang's other members
        outcomes: list[Outcome] | None = None
        if not self._allocs.fresh and any(getattr(env.message, "world_size", 1) > 1 for env in batch):
            # A gang's end acts on every member's record: a cache catching up could miss some.
            await self._guard(self._allocs.reload(), "reading the allocations")
        for n, env in enumerate(batch):
            node_id = getattr(env.message, "node_id", "")
            key = attempt_key(env.message.job_id, env.message.attempt)
            members = self._members(key)
            if members:
                self._release_member(env, key, node_id, members, pairs, stops)
                continue
            if subjects.node_of_event(env.subject) is not None:
                holder = self._allocs.holder(key) or ""
                what = f"attempt {key} is held by"
                fenced = binding_fence(env.subject, node_id, holder, env.deliveries, what)
                if fenced is not None:
                    outcomes = outcomes or [ACK] * len(batch)
                    outcomes[n] = fenced
                    continue
            # An attempt never bound (cancelled or expired while it waited) may hold room
            # all the same: a preemption's hold, found by its key. So may a bound one on
            # another node than its event names (a duplicate delivery held room there).
            elsewhere = self._allocs.holder(key)
            if node_id:
                pairs.append((node_id, key))
            if elsewhere is not None and elsewhere != node_id:
                pairs.append((elsewhere, key))
            elif not node_id and not self._allocs.fresh:
                unseen.append(key)
        if unseen:
            # The cache is catching up after a reconnect: it cannot show that no hold exists.
            await self._guard(self._allocs.reload(), "reading the allocations")
            pairs.extend((found, key) for key in unseen if (found := self._allocs.holder(key)) is not None)
        if stops:
            # Before the member's room goes: a redelivery finds it still held, and stops
            # the others again (the same message ids) if this delivery died in between.
            await self._guard(self._publisher.publish(stops), "stopping a failed gang")
        await self._guard(self._remove(pairs), "releasing")
        for n, env in enumerate(batch):
            if outcomes is None or outcomes[n] is ACK:
                self.ended.add(attempt_key(env.message.job_id, env.message.attempt))
        return outcomes

    def _release_member(
        self,
        env: Envelope,
        key: str,
        node_id: str,
        members: dict[str, Reservation],
        pairs: list[tuple[str, str]],
        stops: list[Outgoing],
    ) -> None:
        """The end of one member of a gang (or of the whole gang's attempt): free what it
        names; a member's failure or loss also stops every other member.

        A member's own end frees its node only: the others may still run (a cancelled or
        lost gang's members free their nodes as each stops). An end that names no node
        (the attempt expired or was cancelled before it ran), or the scheduler's success of
        the whole gang, frees them all."""
        event = env.message
        own_form = subjects.node_of_event(env.subject) is not None
        if own_form and node_id not in members:
            # A member whose room went already (a redelivery: the stops went before the room
            # did), or a node that holds none of the gang: nothing here to free or to stop.
            log.info("attempt %s: %s from node %s, which holds no member now", key, type(event).__name__, node_id)
            return None
        if not node_id or (not own_form and isinstance(event, JobSucceeded)):
            pairs.extend((holder, key) for holder in members)
            return None
        if node_id in members:
            pairs.append((node_id, key))
        if isinstance(event, JobFailed | JobLost):
            rank = members[node_id].rank if node_id in members else event.rank
            how = f"failed ({event.error.code})" if isinstance(event, JobFailed) else "was lost"
            # A member whose node has gone will never report its stop: its room goes now.
            settled = self._monotonic() - self._nodes.fresh_since >= self._node_ttl
            alive = {n.node_id for n in self._nodes.alive()} if settled else None
            for other, held in members.items():
                if other == node_id:
                    continue
                if alive is not None and other not in alive:
                    pairs.append((other, key))
                    continue
                reason = f"gang: member {rank} on node {node_id} {how}"
                msg_id = member_event_id(event.job_id, event.attempt, GANG_STOP, held.rank)
                stops.append(
                    _cancel(
                        event.job_id, event.attempt, event.partition, other, reason, self._clock(), msg_id, env.context
                    )
                )
        return None

    async def _remove(self, pairs: list[tuple[str, str]]) -> None:
        by_node: dict[str, set[str]] = {}
        for node_id, key in pairs:
            by_node.setdefault(node_id, set()).add(key)
        await asyncio.gather(*(self._allocs.remove(node, keys) for node, keys in by_node.items()))

    async def cancel(self, batch: list[Envelope]) -> list[Outcome]:
        """Handle a batch of JobCancelling: forward each to the node holding its attempt.

        The holder comes from the cache when it is caught up and shows one, else from the
        server. An attempt no node holds yet is remembered as cancelled (a JobReady for it
        is refused here) and looked at again shortly, until the bind timeout since the
        cancel has passed.

        Args:
            batch: the JobCancelling envelopes.

        Returns:
            Per message: ack once forwarded (or given up), else retry after a short delay.

        Raises:
            Unavailable: NATS does not answer.
        """
        keys = [attempt_key(env.message.job_id, env.message.attempt) for env in batch]
        if not self._allocs.fresh or any(self._allocs.holder(key) is None for key in keys):
            await self._guard(self._allocs.reload(), "reading the allocations")
        now = self._clock()
        outgoing: list[Outgoing] = []
        outcomes: list[Outcome] = []
        for env, key in zip(batch, keys, strict=True):
            cancelling: JobCancelling = env.message
            if key in self.ended and self._allocs.holder(key) is None:
                outcomes.append(ACK)  # the attempt ended before its cancel came: nothing to stop
                continue
            step = cancel_step(self._allocs.holder(key), cancelling.at, now, self._bind_timeout, env.deliveries, key)
            if isinstance(step, Forward):
                # A gang's attempt runs on every member's node: each gets the cancel.
                members = self._members(key)
                targets = {node_id: r.rank for node_id, r in members.items()} if members else {step.node_id: 0}
                for node_id, rank in targets.items():
                    msg_id = member_event_id(cancelling.job_id, cancelling.attempt, CANCEL, rank)
                    outgoing.append(
                        _cancel(
                            cancelling.job_id,
                            cancelling.attempt,
                            cancelling.partition,
                            node_id,
                            cancelling.reason,
                            now,
                            msg_id,
                            env.context,
                        )
                    )
                outcomes.append(ACK)
                log.info(
                    "job %s attempt %d: cancel sent to node %s (%s)",
                    cancelling.job_id,
                    cancelling.attempt,
                    step.node_id,
                    cancelling.reason,
                )
            elif isinstance(step, Wait):
                self.cancelled.add(key)
                outcomes.append(Retry(step.delay, "no node holds the attempt yet"))
                if env.deliveries == 1:
                    log.info("job %s attempt %d: cancel waits for its binding", cancelling.job_id, cancelling.attempt)
            else:
                assert isinstance(step, GiveUp)
                self.cancelled.add(key)
                outcomes.append(ACK)
                log.info(
                    "job %s attempt %d: not bound within %.0fs of its cancel; it will not be bound",
                    cancelling.job_id,
                    cancelling.attempt,
                    self._bind_timeout,
                )
        await self._guard(self._publisher.publish(outgoing), "publishing cancels")
        return outcomes

    async def nodes(self, env: Envelope) -> NodesReply:
        """Every node with its capacity, allocation and last heartbeat."""
        views = []
        for usage in self.usage():
            views.append(
                NodeView(node=usage.node, alive=usage.alive, allocated=usage.used, reservations=usage.reservations)
            )
        return NodesReply(nodes=views)

    def usage(self) -> list[NodeUsage]:
        """Every node in the view with what is reserved on it (``api.nodes`` and the node
        gauges). Reads only this replica's caches, so it never waits; each is copied in
        one step first, as a metric reader may call this from its own thread."""
        allocs = dict(list(self._allocs.records.items()))
        out = []
        for node, alive in self._nodes.all():
            record = allocs.get(node.node_id)
            alloc = record[0] if record is not None else None
            # Future holds (backfill) are promises, not reservations in force.
            count = sum(1 for r in alloc.reservations.values() if not r.starts_at) if alloc is not None else 0
            out.append(NodeUsage(node, alive, allocated(alloc), count))
        return out


def _bound(
    job: JobReady,
    node_id: str,
    scratch_dir: str,
    gpu_devices: Sequence[int],
    now: float,
    *,
    rank: int = 0,
    world_size: int = 1,
    peers: list[str] | None = None,
) -> JobBound:
    """The ``JobBound`` of ``job`` on ``node_id`` (a gang's member: with its place in it)."""
    return JobBound(
        job_id=job.job_id,
        attempt=job.attempt,
        partition=job.partition,
        node_id=node_id,
        spec=job.spec,
        scratch_dir=scratch_dir,
        submitted_at=job.submitted_at,
        bound_at=now,
        checkpoint=job.checkpoint,
        gpu_devices=list(gpu_devices),
        rank=rank,
        world_size=world_size,
        peers=peers or [],
    )


def _cancel(
    job_id: str,
    attempt: int,
    partition: int,
    node_id: str,
    reason: str,
    now: float,
    msg_id: str,
    context: Context | None,
) -> Outgoing:
    """An ``AttemptCancel`` on ``node_id``'s cancel subject: a user's, a preemption's, or
    the stop of a failed gang's member (each kind under its own message id)."""
    message = AttemptCancel(job_id=job_id, attempt=attempt, partition=partition, node_id=node_id, reason=reason, at=now)
    return Outgoing(subjects.node_cancel(node_id), message, msg_id, context)
