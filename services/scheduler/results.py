"""The scheduler's edge to ``jm_results``: the lists mapped steps map over, and their
manifests. The only object-store I/O the scheduler does, and only for mapped steps."""

from __future__ import annotations

from typing import Any, Protocol

import msgspec
from nats.js.errors import NotFoundError, ObjectNotFoundError

from jobmesh.contract import subjects


class Results(Protocol):
    async def kept(self, job_id: str) -> Any: ...

    async def put_manifest(self, job_id: str, data: bytes) -> None: ...


class ResultMissing(Exception):
    """Raised when a job's kept result is not in ``jm_results`` (it did not keep one, or it expired)."""


class ObjectResults:
    """``Results`` over the object store bucket (opened on first use).

    Args:
        js: the JetStream context.
    """

    def __init__(self, js: Any) -> None:
        self._js = js
        self._store: Any = None

    async def _bucket(self) -> Any:
        if self._store is None:
            self._store = await self._js.object_store(subjects.OBJ_RESULTS)
        return self._store

    async def kept(self, job_id: str) -> Any:
        """The decoded result ``job_id`` kept (``step/<job_id>``); text that is not JSON
        is the string itself."""
        store = await self._bucket()
        try:
            found = await store.get(subjects.step_result_key(job_id))
        except (ObjectNotFoundError, NotFoundError) as exc:
            raise ResultMissing(f"job {job_id} kept no result (or it expired)") from exc
        data = found.data or b""
        try:
            return msgspec.json.decode(data)
        except msgspec.DecodeError:
            return data.decode(errors="replace")

    async def put_manifest(self, job_id: str, data: bytes) -> None:
        store = await self._bucket()
        await store.put(subjects.map_manifest_key(job_id), data)
