"""A small async client for jobmesh's request/reply APIs, used by the CLI, tests and bench.

Errors come back as ``JobmeshError`` subclasses with the server's code and field; a
cluster that does not answer raises ``Unavailable`` with a message saying which part.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.errors import Unavailable
from jobmesh.contract.messages.v1 import (
    ErrorReply, ExplainReply, ExplainRequest, JobGetRequest, JobListReply, JobListRequest, JobView, NodesReply,
    NodesRequest, QueuesReply, QueuesRequest, SubmitReply, SubmitRequest, Submission,
)

DEV_ENV = Path(".jobmesh") / "dev.env"


def find_dev_env(start: Path | None = None) -> Path | None:
    """The nearest ``.jobmesh/dev.env`` in ``start`` or its parents."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / DEV_ENV
        if candidate.exists():
            return candidate
    return None


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def resolve_nats_url() -> str:
    """``JOBMESH_NATS_URL``, else the URL of a ``jobmesh dev`` cluster found nearby.

    Raises:
        Unavailable: when neither exists.
    """
    url = os.environ.get("JOBMESH_NATS_URL")
    if url:
        return url
    env_file = find_dev_env()
    if env_file is not None:
        url = read_env_file(env_file).get("JOBMESH_NATS_URL")
        if url:
            return url
    raise Unavailable("no jobmesh cluster found: set JOBMESH_NATS_URL or start one with `jobmesh dev --detach`")


class Client:
    """Request/reply access to a running cluster.

    Args:
        nc: a connected NATS client.
        timeout: seconds to wait for each reply.
    """

    def __init__(self, nc: NATS, timeout: float = 10.0) -> None:
        self.nc = nc
        self.timeout = timeout

    @classmethod
    async def connect(cls, url: str | None = None, timeout: float = 10.0) -> "Client":
        """Connect once, without retrying, so a missing cluster fails fast and clearly."""
        url = url or resolve_nats_url()
        async def quiet(exc: Exception) -> None:
            # nats-py logs connection errors itself; the one line below says it better.
            return None

        try:
            # max_reconnect_attempts=0 makes nats-py retry the first connect forever; 1 with
            # a short wait fails within a fraction of a second.
            nc = await asyncio.wait_for(
                nats.connect(
                    url, connect_timeout=3, allow_reconnect=False, max_reconnect_attempts=1,
                    reconnect_time_wait=0.2, error_cb=quiet,
                ),
                10,
            )
        except Exception as exc:  # noqa: BLE001 - translated once, here
            raise Unavailable(f"cannot reach NATS at {url}: {type(exc).__name__} {exc}".rstrip()) from exc
        return cls(nc, timeout)

    async def close(self) -> None:
        await self.nc.close()

    async def request(self, subject: str, message: Any, reply_type: Any, service: str) -> Any:
        """Send ``message``, decode the reply as ``reply_type`` or raise its error."""
        try:
            reply = await self.nc.request(subject, encode(message), timeout=self.timeout)
        except nats.errors.NoRespondersError as exc:
            raise Unavailable(f"the {service} service is not running (no responders on {subject})") from exc
        except nats.errors.TimeoutError as exc:
            raise Unavailable(f"the {service} service did not answer on {subject} within {self.timeout}s") from exc
        decoded = msgspec.json.decode(reply.data, type=reply_type | ErrorReply)
        if isinstance(decoded, ErrorReply):
            raise decoded.error()
        return decoded

    async def submit(self, submissions: list[Submission]) -> SubmitReply:
        """Submit jobs; returns their ids once every job is durably accepted."""
        return await self.request(subjects.API_SUBMIT, SubmitRequest(jobs=submissions), SubmitReply, "trigger")

    async def get(self, job_id: str) -> JobView:
        """Everything the tracker knows about one job."""
        return await self.request(subjects.API_JOB_GET, JobGetRequest(job_id=job_id), JobView, "tracker")

    async def list(self, limit: int = 50, state: str = "", queue: str = "") -> JobListReply:
        """Recent jobs, newest first."""
        return await self.request(
            subjects.API_JOB_LIST, JobListRequest(limit=limit, state=state, queue=queue), JobListReply, "tracker"
        )

    async def explain(self, partition: int, job_id: str) -> ExplainReply:
        """Ask the owner of ``partition`` why ``job_id`` is not running yet."""
        return await self.request(
            subjects.scheduler_explain(partition), ExplainRequest(job_id=job_id), ExplainReply, "scheduler"
        )

    async def nodes(self) -> NodesReply:
        """Every node with capacity, allocation and last heartbeat (from the binder)."""
        return await self.request(subjects.API_NODES, NodesRequest(), NodesReply, "binder")

    async def queues(self, wait: float = 1.0) -> list[QueuesReply]:
        """Queue depths from every scheduler; returns once every partition has answered.

        Every scheduler replica answers for the partitions it owns, so this gathers
        replies until all partitions are covered or ``wait`` seconds have passed.
        """
        inbox = self.nc.new_inbox()
        replies: list[QueuesReply] = []
        covered: set[int] = set()
        total = {"n": None}
        done = asyncio.Event()

        async def on_reply(msg) -> None:
            reply = msgspec.json.decode(msg.data, type=QueuesReply | ErrorReply)
            if isinstance(reply, QueuesReply):
                replies.append(reply)
                covered.update(p.partition for p in reply.owned)
                total["n"] = reply.partitions
                if len(covered) >= reply.partitions:
                    done.set()

        sub = await self.nc.subscribe(inbox, cb=on_reply)
        try:
            await self.nc.publish(subjects.API_QUEUES, encode(QueuesRequest()), reply=inbox)
            try:
                await asyncio.wait_for(done.wait(), wait)
            except asyncio.TimeoutError:
                if not replies:
                    raise Unavailable("no scheduler answered on " + subjects.API_QUEUES) from None
        finally:
            await sub.unsubscribe()
        return replies
