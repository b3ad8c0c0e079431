"""The jobmesh error tree.

Every error carries a stable ``code`` (safe to match on in scripts and replies) and a
``retryable`` flag. The service runtime maps an error to a JetStream action in one place
(:func:`jobmesh.runtime.outcomes.fate_for`): a retryable error becomes ``nak(delay)`` for as long as
the condition lasts, a permanent one becomes ``term`` plus a dead letter. Foreign errors
(asyncpg, nats-py) are translated into these at the boundary (``jobmesh.runtime.db``,
``jobmesh.runtime.publisher``).
"""

from __future__ import annotations


class JobmeshError(Exception):
    """Base of every error jobmesh raises on purpose."""

    code = "internal"
    retryable = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidMessage(JobmeshError):
    """Raised when a message cannot be decoded or fails validation; names the field."""

    code = "invalid_message"


class OversizedMessage(InvalidMessage):
    """Raised when a message is larger than the consumer's limit."""

    code = "oversized_message"


class InvalidSpec(InvalidMessage):
    """Raised when a job spec is well-formed but asks for something impossible."""

    code = "invalid_spec"


class UsageError(JobmeshError):
    """Raised when a command line asks for something that cannot work (names the flag)."""

    code = "usage"


class NotFound(JobmeshError):
    """Raised when a job, node or queue asked for does not exist."""

    code = "not_found"


class Conflict(JobmeshError):
    """Raised when a compare-and-set lost a race; the caller may try again."""

    code = "conflict"
    retryable = True


class Unavailable(JobmeshError):
    """Raised when NATS, Postgres or a service does not answer in time."""

    code = "unavailable"
    retryable = True


class Overloaded(JobmeshError):
    """Raised when a stream refuses a publish because it is full (discard=new)."""

    code = "overloaded"
    retryable = True
