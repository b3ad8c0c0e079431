"""The jobmesh error tree, and its mapping to and from the wire.

Every error carries a stable ``code`` (safe to match on in scripts and replies) and a
``retryable`` flag. The service runtime maps an error to a JetStream action in one place
(:func:`jobmesh.runtime.outcomes.fate_for`): a retryable error becomes ``nak(delay)`` for as
long as the condition lasts, a permanent one becomes ``term`` plus a dead letter. Foreign
errors (asyncpg, nats-py) are translated into these at the boundary
(``jobmesh.runtime.db``, ``jobmesh.runtime.publisher``).

An API error travels as ``ErrorReply(code, message, field, retryable)``;
:meth:`JobmeshError.from_wire` turns one back into the class that owns the code, so a
client raises exactly what the service raised.
"""

from __future__ import annotations

from typing import ClassVar


class JobmeshError(Exception):
    """Base of every error jobmesh raises on purpose; also what an unknown code becomes."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        # Each class that declares a code of its own is what that code decodes to.
        if "code" in cls.__dict__:
            _BY_CODE[cls.code] = cls

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message

    @staticmethod
    def from_wire(code: str, message: str, field: str = "", retryable: bool = False) -> JobmeshError:
        """The error an ``ErrorReply`` describes, as the class that owns ``code``.

        Args:
            code: the stable error code.
            message: the human message.
            field: the offending field, "" when none.
            retryable: the sender's flag; consulted only for a code this version does not
                know (a newer server), which becomes an :class:`UnknownError`.

        Returns:
            An instance whose ``code``, ``field`` and ``retryable`` match the reply.
        """
        kind = _BY_CODE.get(code)
        if kind is not None:
            return kind(message, field=field or None)
        return UnknownError(message, field=field or None, code=code, retryable=retryable)


_BY_CODE: dict[str, type[JobmeshError]] = {JobmeshError.code: JobmeshError}


class UnknownError(JobmeshError):
    """Raised by a client for an error code this version does not know (a newer server):
    it keeps the code and the retryable flag the server sent."""

    def __init__(self, message: str, *, field: str | None = None, code: str, retryable: bool) -> None:
        super().__init__(message, field=field)
        self.code = code  # type: ignore[misc]  # per instance: the code is not this class's own
        self.retryable = retryable  # type: ignore[misc]


class InvalidMessage(JobmeshError):
    """Raised when a message cannot be decoded or fails validation; names the field."""

    code = "invalid_message"


class OversizedMessage(InvalidMessage):
    """Raised when a message is larger than the consumer's limit."""

    code = "oversized_message"


class InvalidSpec(InvalidMessage):
    """Raised when a job spec is well-formed but asks for something impossible."""

    code = "invalid_spec"


class InvalidRule(InvalidMessage):
    """Raised when a trigger rule is refused (a pattern, a source, a missing sample, a
    template that yields no valid job); names the rule's field."""

    code = "invalid_rule"


class InvalidExpression(InvalidMessage):
    """Raised when a rule's CEL expression does not compile, is too costly, or fails on an
    event (a missing field, a type mismatch); names the rule field that holds it."""

    code = "invalid_expression"


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


class Unstorable(JobmeshError):
    """Raised when a database refuses a value for what it is (out of range, a constraint);
    the same write would fail the same way, so it is not retried."""

    code = "unstorable"


class Overloaded(JobmeshError):
    """Raised when a stream refuses a publish because it is full (discard=new)."""

    code = "overloaded"
    retryable = True
