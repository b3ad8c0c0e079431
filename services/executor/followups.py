"""Follow-up jobs a handler submits (``ctx.submit``): through the trigger's submit API.

The handler pool hands each follow-up to a :class:`Followups`, which sends a
``SubmitRequest`` on ``jobmesh.v1.api.submit`` and returns the job id once the trigger has
durably accepted it; a refusal (an invalid spec, the field named) comes back as the
trigger's error. The idempotency key comes from the handler's context
(``<job id>.followup.<n>`` unless the handler gave one), so a retried attempt does not
submit the same follow-up twice.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec
import nats.errors

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import ErrorReply, JobSpec, ParentRef, Submission, SubmitReply, SubmitRequest
from jobmesh.errors import InvalidMessage, Unavailable


class Requester(Protocol):
    """What Followups needs of a NATS connection (nats-py's ``Client`` is one)."""

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5) -> Any:
        """Send ``payload`` on ``subject`` and return the reply message (``.data``)."""
        ...


class Followups:
    """Submits handlers' follow-up jobs; the handler pool's ``submit``.

    Args:
        nc: the executor's NATS connection.
        timeout: seconds to wait for the trigger's answer.
    """

    def __init__(self, nc: Requester, timeout: float = 10.0) -> None:
        self._nc = nc
        self._timeout = timeout
        self._decoder = msgspec.json.Decoder(SubmitReply | ErrorReply)

    async def __call__(self, spec: JobSpec, idempotency_key: str, parent: ParentRef | None = None) -> str:
        """Submit ``spec`` and return its job id once the trigger accepted it.

        Args:
            spec: the follow-up job.
            idempotency_key: the same key always yields the same job id (and one job).
            parent: the workflow step submitting it, whose dependents wait for it too.

        Returns:
            The job id.

        Raises:
            Unavailable: no trigger answered in time.
            JobmeshError: the trigger refused the job (``InvalidMessage`` names the field).
        """
        request = SubmitRequest(jobs=[Submission(spec=spec, idempotency_key=idempotency_key, parent=parent)])
        try:
            reply = await self._nc.request(subjects.API_SUBMIT, encode(request), timeout=self._timeout)
        except nats.errors.NoRespondersError as exc:
            raise Unavailable(
                f"no trigger answers on {subjects.API_SUBMIT}: the follow-up job was not submitted"
            ) from exc
        except nats.errors.TimeoutError as exc:
            raise Unavailable(
                f"the trigger did not answer within {self._timeout:g}s: the follow-up may not exist"
            ) from exc
        try:
            decoded = self._decoder.decode(reply.data)
        except msgspec.DecodeError as exc:
            raise InvalidMessage(f"the trigger's answer does not decode: {exc}") from exc
        if isinstance(decoded, ErrorReply):
            raise decoded.error()
        return decoded.job_ids[0]
