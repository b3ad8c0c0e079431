"""Fences against forged executor events: pure checks, O(1) per message.

An executor publishes its events on the node form of the job subjects
(``jobmesh.v1.job.<partition>.<kind>.<node_id>``), and NATS lets each node's identity
publish only under its own node id. What NATS cannot see is the body, nor which node an
attempt is bound to; two checks cover that:

* :func:`subject_fence`, run by the runtime on every message of stream JM_JOBS before any
  handler: an event on the node form must be of a kind executors publish, carry the body
  of that kind, and name in ``node_id`` the node its subject names. A node cannot speak
  for another node by writing that node's id into the body.
* :func:`binding_fence`, run by the consumers that know an attempt's binding (the
  scheduler from its node records, the binder from its reservations): an event of node B
  about an attempt bound to node A is refused. A view that may lag (a KV watch) gets a few
  deliveries' patience first, so a legitimate event that overtook the record of its
  binding is not lost.

Both return an outcome (``Reject`` with code ``forged``) or None for a message that passes.
"""

from __future__ import annotations

from typing import Any

from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobFailed, JobLost, JobStarted, JobSucceeded, MemberSucceeded
from jobmesh.runtime.outcomes import Reject, Retry

FORGED = "forged"  # the dead letter's code (DeadLetter.code)

# The body each kind an executor publishes must carry on the node form.
_BODY_OF_KIND: dict[str, type] = {
    subjects.STARTED: JobStarted,
    subjects.SUCCEEDED: JobSucceeded,
    subjects.FAILED: JobFailed,
    subjects.LOST: JobLost,
    subjects.MEMBER_SUCCEEDED: MemberSucceeded,
}
# Deliveries an event waits (for a lagging view of bindings to catch up) before a
# mismatch with the binding is taken for a forgery, and the delay between them.
BINDING_PATIENCE = 3
BINDING_RETRY_DELAY = 1.0


def subject_fence(subject: str, message: Any) -> Reject | None:
    """Whether a decoded JM_JOBS message may reach its handler, judged by its subject.

    Args:
        subject: the subject it came on.
        message: its decoded body.

    Returns:
        None for an event on the partition form (the services', trusted by NATS
        permissions) and for a node-form event that names its subject's node; a
        ``Reject`` (code ``forged``) saying what is wrong otherwise.
    """
    parsed = subjects.node_of_event(subject)
    if parsed is None:
        return None
    kind, node = parsed
    body = _BODY_OF_KIND.get(kind)
    if body is None:
        return Reject(
            FORGED,
            f"{subject}: {kind!r} is not an event kind executors publish "
            f"(the node form carries only {', '.join(subjects.EXECUTOR_KINDS)})",
        )
    if type(message) is not body:
        return Reject(FORGED, f"{subject}: a {type(message).__name__} on a {kind} subject (expected {body.__name__})")
    claimed = getattr(message, "node_id", None)  # every body of _BODY_OF_KIND has one
    if claimed != node:
        return Reject(
            FORGED,
            f"{subject}: node_id {claimed!r} is not the subject's node {node!r}; "
            "an executor reports only for its own node",
        )
    return None


def binding_fence(subject: str, reporter: str, bound: str, deliveries: int, what: str) -> Reject | Retry | None:
    """Whether an executor's event agrees with the binding its consumer knows.

    Args:
        subject: the subject it came on (for the reason).
        reporter: the node the event came from (its subject's node, which
            :func:`subject_fence` made sure its body names).
        bound: the node the consumer knows the attempt is bound to; "" when it knows none.
        deliveries: how often the event was delivered, this time included.
        what: the attempt and where the binding is known from, for the reason
            (``"job j attempt 1 is held by"``).

    Returns:
        None when no binding is known or it is the reporter's; ``Retry`` on a mismatch
        for the first :data:`BINDING_PATIENCE` deliveries (the view may lag); then a
        ``Reject`` (code ``forged``).
    """
    if not bound or bound == reporter:
        return None
    reason = f"{subject}: {what} node {bound!r}, not {reporter!r}; a node reports only for attempts bound to it"
    if deliveries < BINDING_PATIENCE:
        return Retry(BINDING_RETRY_DELAY, reason)
    return Reject(FORGED, reason)
