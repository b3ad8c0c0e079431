"""Job ids and idempotency keys.

A job id is derived from the idempotency key, so submitting the same key twice yields the
same job id even after JetStream's duplicate window has passed; a client that generates its
key can know the job id before it submits (the CLI does, to watch without a race).
"""

from __future__ import annotations

import uuid

_NAMESPACE = uuid.UUID("6f1c2d0e-5a7b-4c1e-9d2f-3b8a4e6c7d10")


def new_idempotency_key() -> str:
    """A fresh random key for a caller that did not give one."""
    return uuid.uuid4().hex


def job_id_for(idempotency_key: str) -> str:
    """The job id that ``idempotency_key`` always maps to (32 hex characters)."""
    return uuid.uuid5(_NAMESPACE, idempotency_key).hex


def event_id(job_id: str, attempt: int, kind: str) -> str:
    """Nats-Msg-Id of a lifecycle event: one per job, attempt and kind."""
    return f"{job_id}:{attempt}:{kind}"
