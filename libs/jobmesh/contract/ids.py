"""Job ids, attempt keys and every ``Nats-Msg-Id``: built here and nowhere else.

A job id is derived from the idempotency key, so submitting the same key twice yields the
same job id even after JetStream's duplicate window has passed; a client that generates its
key can know the job id before it submits (the CLI does, to watch without a race).

Message ids are deterministic (job, attempt, kind and, where one attempt can produce several
of a kind, a counter), so a re-publish within the duplicate window is a no-op.
"""

from __future__ import annotations

import hashlib
import os

# The header a replayed event carries with its original identity, so that the rules that
# fired for it the first time make the same jobs again (duplicates), not new ones.
EVENT_ID_HEADER = "Jobmesh-Event-Id"

# A personalisation string, so job ids differ from any other BLAKE2b hash of the same keys.
_PERSON = b"jobmesh.job.v1"


def new_idempotency_key() -> str:
    """A fresh random key for a caller that did not give one (128 bits)."""
    return os.urandom(16).hex()


def job_id_for(idempotency_key: str) -> str:
    """The job id that ``idempotency_key`` always maps to (32 hex characters).

    BLAKE2b is in the standard library and several times cheaper than uuid5's SHA-1 plus
    UUID object, which showed in profiles of the submit path.
    """
    return hashlib.blake2b(idempotency_key.encode(), digest_size=16, person=_PERSON).hexdigest()


def attempt_key(job_id: str, attempt: int) -> str:
    """``<job_id>:<attempt>``: one attempt's identity (reservation keys, executor dedupe,
    and the prefix of every message id the attempt produces)."""
    return f"{job_id}:{attempt}"


def split_attempt_key(key: str) -> tuple[str, int]:
    """The job id and attempt number of an :func:`attempt_key`."""
    job_id, _, attempt = key.rpartition(":")
    return job_id, int(attempt)


def event_id(job_id: str, attempt: int, kind: str) -> str:
    """Nats-Msg-Id of a lifecycle event that an attempt has at most once of
    (started, succeeded, failed, expired, lost, bound)."""
    return f"{job_id}:{attempt}:{kind}"


def member_event_id(job_id: str, attempt: int, kind: str, rank: int) -> str:
    """Nats-Msg-Id of an event each member of a gang has once (bound, started, failed, lost,
    member_succeeded): rank 0's is :func:`event_id`'s, so a plain job's ids are unchanged."""
    return event_id(job_id, attempt, kind) if rank == 0 else f"{job_id}:{attempt}:{kind}:{rank}"


# The longest event id a trigger key holds in full; a longer one is hashed.
MAX_EVENT_ID = 200


def trigger_key(rule: str, version: int, event_id: str) -> str:
    """The idempotency key of the job trigger rule ``rule`` at ``version`` fires for
    ``event_id``: a redelivery or a second replica submits the same job, and a new version
    of the rule fires afresh. A publisher that knows the event id knows the job id
    (``job_id_for(trigger_key(...))``)."""
    if len(event_id) > MAX_EVENT_ID:
        event_id = "h:" + hashlib.blake2b(event_id.encode(), digest_size=16).hexdigest()
    return f"trigger:{rule}:{version}:{event_id}"


def workflow_run_id(idempotency_key: str) -> str:
    """The run id a workflow submit's idempotency key always maps to (32 hex characters)."""
    return hashlib.blake2b(idempotency_key.encode(), digest_size=16, person=b"jobmesh.wf.v1").hexdigest()


def step_key(run_id: str, step: str, generation: int) -> str:
    """The idempotency key of a workflow step's job: a redelivered run makes the same jobs,
    and a retry (the next generation) makes new ones for the steps it runs again."""
    return f"workflow:{run_id}:{step}:{generation}"


def map_item_key(map_job_id: str, index: int) -> str:
    """The idempotency key of item ``index`` of a mapped step's job ``map_job_id``."""
    return f"map:{map_job_id}:{index}"


def watch_id(job_id: str, watcher: int) -> str:
    """Nats-Msg-Id of a DependencyWatch: one per watched job and watching partition."""
    return f"watch:{job_id}:{watcher}"


def dep_ended_id(job_id: str, watcher: int) -> str:
    """Nats-Msg-Id of a DependencyEnded sent to partition ``watcher``."""
    return f"dep-ended:{job_id}:{watcher}"


def child_step(step: str, parent: str) -> str:
    """``StepRef.step`` of a job that workflow step ``step`` (its job ``parent``) submitted
    from its handler: the run lists it under this name, apart from the step's own jobs.
    A child's child is listed under the same root step (names do not grow per level)."""
    return f"{step.split('.children.', 1)[0]}.children.{parent}"


def child_id(parent: str, child: str) -> str:
    """Nats-Msg-Id of a ChildAdded: one per parent and child."""
    return f"child:{parent}:{child}"


def submit_id(idempotency_key: str) -> str:
    """Nats-Msg-Id of a JobSubmitted: the caller's idempotency key."""
    return f"submit:{idempotency_key}"


def release_id(job_id: str, attempt: int, kind: str, release: int) -> str:
    """Nats-Msg-Id of a JobReady or JobUnplaceable: an attempt can be released (and
    refused) several times, so the release number tells them apart."""
    return f"{job_id}:{attempt}:{kind}:{release}"


def rebound_id(job_id: str, attempt: int, kind: str, node_id: str) -> str:
    """Nats-Msg-Id of a JobBound that binds an attempt again, to another node, because the
    first node is gone: it must not be dropped as a duplicate of the first binding."""
    return f"{job_id}:{attempt}:{kind}:{node_id}"


def log_id(job_id: str, attempt: int, line: int, rank: int = 0) -> str:
    """Nats-Msg-Id of an attempt's ``line``-th output line (counted from 1). A gang's
    members count their lines apart on the job's one log subject, so a rank above 0 is
    appended (rank 0's, and a plain job's, are the same as ever)."""
    key = f"{job_id}:{attempt}:log:{line}"
    return key if rank == 0 else f"{key}:{rank}"


def replay_id(deadletter_seq: int) -> str:
    """Nats-Msg-Id of the replay of dead letter ``deadletter_seq``: a second replay within
    the duplicate window is a no-op."""
    return f"replay:{deadletter_seq}"


def deadletter_id(service: str, subject: str, stream_seq: int, at_ns: int) -> str:
    """Nats-Msg-Id of a dead letter: one per refused stream message; a refused request
    (no stream sequence) gets the time it was refused."""
    if stream_seq:
        return f"dl:{service}:{subject}:{stream_seq}"
    return f"dl:{service}:{at_ns}"
