"""The attempt leases this node renews: what its record lists as running and as ended.

Every put of the node record (KV ``jm_nodes``) is the lease renewal of every attempt the
node runs, so the record carries, besides the node's facts:

- ``attempts``: one :class:`~jobmesh.contract.messages.v1.AttemptLease` per process attempt
  that is in the record and whose terminal event is not durable yet, with the last progress,
  message and checkpoint the job reported;
- ``ended``: the attempts whose terminal event became durable within the last
  :data:`ENDED_KEEP_SECONDS`, so that a lease holder whose view of terminal events lags
  never takes one of them for lost.

:class:`LeaseBook` holds both; it does no I/O and takes the clock as an argument, so what a
record says at a given moment is a function of what happened before it.
:func:`fit_record` keeps a record under the size a KV value may have.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from jobmesh.contract.codec import encode
from jobmesh.contract.ids import attempt_key
from jobmesh.contract.messages.v1 import AttemptLease, NodeInfo

log = logging.getLogger("jobmesh.executor.leases")

ENDED_KEEP_SECONDS = 60.0
# The newest this many ended attempts are listed at most: a node that ends hundreds of short
# attempts a second must not put a record of megabytes with every heartbeat.
ENDED_MAX = 5_000
# A KV value must fit in one NATS message (1 MiB by default); stay well below it.
RECORD_BUDGET_BYTES = 512 * 1024


@dataclass(slots=True)
class LeaseState:
    """One running attempt's lease, updated in place as the job reports progress."""

    job_id: str
    attempt: int
    partition: int
    started_at: float
    progress: float | None = None
    message: str = ""
    checkpoint: str = ""
    rank: int = 0
    world_size: int = 1

    @property
    def key(self) -> str:
        return attempt_key(self.job_id, self.attempt)

    def as_lease(self) -> AttemptLease:
        """The wire form of this lease."""
        return AttemptLease(
            job_id=self.job_id,
            attempt=self.attempt,
            partition=self.partition,
            started_at=self.started_at,
            progress=self.progress,
            message=self.message,
            checkpoint=self.checkpoint,
            rank=self.rank,
            world_size=self.world_size,
        )


class LeaseBook:
    """The leases a node record lists: running attempts, and those ended a short while ago.

    Args:
        keep_ended: seconds an ended attempt stays listed.
        max_ended: most ended attempts listed (the newest are kept).
    """

    def __init__(self, keep_ended: float = ENDED_KEEP_SECONDS, max_ended: int = ENDED_MAX) -> None:
        self._keep_ended = keep_ended
        self._max_ended = max_ended
        self._running: dict[str, LeaseState] = {}
        self._ended: OrderedDict[str, float] = OrderedDict()  # key -> when its end was durable

    def add(
        self,
        job_id: str,
        attempt: int,
        partition: int,
        started_at: float,
        checkpoint: str = "",
        rank: int = 0,
        world_size: int = 1,
    ) -> LeaseState:
        """List a new running attempt; the next record put carries it.

        Args:
            job_id: the job.
            attempt: the attempt number.
            partition: the job's scheduler partition.
            started_at: when this node started it (its JobStarted ``at``).
            checkpoint: what it starts from (``JobBound.checkpoint``): until the job reports
                a newer one, a retry starts from the same place.
            rank: its gang member (``JobBound.rank``): a restarted executor reports that
                member lost, not rank 0.
            world_size: how many members its gang has (``JobBound.world_size``).

        Returns:
            The lease, which the attempt updates with the job's progress.
        """
        lease = LeaseState(
            job_id, attempt, partition, started_at, checkpoint=checkpoint, rank=rank, world_size=world_size
        )
        self._running[lease.key] = lease
        return lease

    def end(self, key: str, at: float) -> None:
        """The attempt's terminal event is durable: list it as ended from now on.

        Args:
            key: the attempt (``job_id:attempt``).
            at: when its terminal event became durable (epoch seconds).
        """
        self._running.pop(key, None)
        self._ended[key] = at
        self._ended.move_to_end(key)
        while len(self._ended) > self._max_ended:
            self._ended.popitem(last=False)

    def drop(self, key: str) -> None:
        """Stop listing a running attempt without calling it ended (the next record omits it)."""
        self._running.pop(key, None)

    def running(self, key: str) -> LeaseState | None:
        """The lease of a running attempt, or None."""
        return self._running.get(key)

    def __len__(self) -> int:
        return len(self._running)

    def snapshot(self, now: float) -> tuple[list[AttemptLease], list[str]]:
        """What a record put at ``now`` lists; forgets ended attempts older than the keep time.

        Args:
            now: epoch seconds.

        Returns:
            The running leases and the keys of the attempts ended within the keep time.
        """
        horizon = now - self._keep_ended
        ended = self._ended
        while ended:
            at = next(iter(ended.values()))
            if at >= horizon:
                break
            ended.popitem(last=False)
        return [lease.as_lease() for lease in self._running.values()], list(ended)


def fit_record(info: NodeInfo, budget: int = RECORD_BUDGET_BYTES) -> bytes:
    """Encode a node record, shrinking it to ``budget`` bytes if it is bigger.

    A record that is too big to put would stop the heartbeat, and with it every lease of
    the node. So first the oldest ended attempts are left out, then the longest checkpoints
    and messages (a retry of such an attempt starts from the checkpoint it was given); the
    running attempts themselves are always listed.

    Args:
        info: the complete record.
        budget: most bytes the encoded record may have.

    Returns:
        The encoded record.
    """
    data = encode(info)
    if len(data) <= budget:
        return data
    original = len(data)
    ended = info.ended
    over = len(data) - budget
    dropped = 0
    while ended and over > 0:
        # Each key costs its length plus quotes and a comma.
        cut = min(len(ended), max(1, over // 40))
        over -= sum(len(k) + 3 for k in ended[:cut])
        ended = ended[cut:]
        dropped += cut
    info = msgspec.structs.replace(info, ended=ended)
    data = encode(info)
    blanked = 0
    if len(data) > budget:
        leases = list(info.attempts)
        order = sorted(range(len(leases)), key=lambda i: -(len(leases[i].checkpoint) + len(leases[i].message)))
        over = len(data) - budget
        for i in order:
            if over <= 0:
                break
            lease = leases[i]
            over -= len(lease.checkpoint.encode()) + len(lease.message.encode())
            leases[i] = msgspec.structs.replace(lease, checkpoint="", message="")
            blanked += 1
        data = encode(msgspec.structs.replace(info, attempts=leases))
    log.warning(
        "the record of node %s was %d bytes, over its budget of %d: left out %d ended attempts and "
        "the checkpoints and messages of %d running ones",
        info.node_id,
        original,
        budget,
        dropped,
        blanked,
    )
    return data
