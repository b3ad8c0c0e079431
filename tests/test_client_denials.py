"""A request NATS refuses this client's key fails at once, saying so, instead of timing out."""

from __future__ import annotations

import asyncio
import time

import nats.errors
import pytest

from jobmesh.client.client import Client
from jobmesh.client.denials import Denials, PermissionDenied, refused_subject
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import JobSpec, NoopRuntime, Submission


def test_the_subject_a_violation_names():
    text = 'nats: permissions violation for publish to "jobmesh.v1.api.submit"'
    assert refused_subject(text) == "jobmesh.v1.api.submit"
    assert refused_subject("nats: permissions violation") == ""
    assert refused_subject("nats: stale connection") is None


async def _started(denials: Denials, request, subject: str) -> asyncio.Future:
    waiting = asyncio.ensure_future(denials.guard(request, subject))
    await asyncio.sleep(0)  # one loop turn: the guard registers its request (a yield, not a wait: noqa)
    return waiting


async def test_a_violation_for_another_subject_leaves_a_request_waiting():
    denials = Denials("_INBOX_client")
    answered: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def request() -> str:
        return await answered

    waiting = await _started(denials, request(), "jobmesh.v1.api.submit")
    await denials.on_error(nats.errors.Error('nats: permissions violation for publish to "jobmesh.v1.api.nodes"'))
    # A watch's own refused subscription is not the reply inbox: the request goes on.
    await denials.on_error(nats.errors.Error('nats: permissions violation for subscription to "jobmesh.v1.x.*"'))
    await denials.on_error(nats.errors.Error("nats: slow consumer"))
    assert not waiting.done()
    answered.set_result("reply")
    assert await waiting == "reply"


async def test_a_refused_reply_inbox_fails_every_request_now_and_later():
    denials = Denials("_INBOX_client")
    # A request that would wait 30 s; the refusal fails it long before (a deliberate sleep: noqa).
    pending = await _started(denials, asyncio.sleep(30), "jobmesh.v1.api.queues")
    await denials.on_error(nats.errors.Error('nats: permissions violation for subscription to "_inbox_client.abc.*"'))
    with pytest.raises(PermissionDenied):
        await pending
    later = asyncio.sleep(30)  # never awaited: refused before it starts (noqa)
    with pytest.raises(PermissionDenied):
        await denials.guard(later, "jobmesh.v1.api.nodes")


async def test_a_cancelled_caller_takes_its_request_with_it():
    denials = Denials()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def request() -> None:
        started.set()
        try:
            await asyncio.sleep(30)  # a request that ends only by its cancel (a deliberate sleep: noqa)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    waiting = asyncio.ensure_future(denials.guard(request(), "jobmesh.v1.api.submit"))
    await asyncio.wait_for(started.wait(), 5)
    waiting.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)  # the request itself was cancelled, not left to time out
    with pytest.raises(asyncio.CancelledError):
        await waiting


@pytest.mark.integration
async def test_a_submit_with_the_integrators_key_is_refused_by_name_at_once(nats_server, monkeypatch):
    # The integrator may publish events and read job events, not submit (docs/operations.md).
    monkeypatch.setenv("JOBMESH_NATS_NKEY_FILE", str(nats_server.credentials / "integrator.nk"))
    monkeypatch.setenv("JOBMESH_NATS_IDENTITY", "integrator")
    client = await Client.connect(nats_server.plain_url, timeout=10.0)
    try:
        started = time.monotonic()
        with pytest.raises(PermissionDenied) as refused:
            await client.submit([Submission(spec=JobSpec(runtime=NoopRuntime()))])
        assert time.monotonic() - started < 5.0  # not the 10 s reply timeout
        assert subjects.API_SUBMIT in str(refused.value) and "JOBMESH_NATS_NKEY_FILE" in str(refused.value)
        assert not refused.value.retryable
    finally:
        await client.close()
