"""Batched JetStream publishing with deterministic message ids and trace context.

When spans are exported, each message gets a ``send`` span (PRODUCER, named by its subject
template) that ends with its PubAck, and its headers carry that span's context.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError
from opentelemetry import trace

from jobmesh.contract.codec import encode
from jobmesh.errors import Overloaded, Unavailable
from jobmesh.runtime.reconnects import Reconnects
from jobmesh.runtime.tracing import Context, Tracing

PUBLISH_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish.

    Attributes:
        subject: where it goes (built by ``jobmesh.contract.subjects``).
        message: a msgspec struct, encoded as JSON.
        msg_id: the Nats-Msg-Id that makes a re-publish a no-op within the duplicate window.
        context: the trace context this message continues (usually the input's).
        spanned: whether exporting records a ``send`` span for it. A job's output lines
            are not: a chatty job would fill the exporter's queue and crowd out every
            other job's spans (they still carry the trace context).
    """

    subject: str
    message: Any
    msg_id: str
    context: Context | None = None
    spanned: bool = True


class Publisher:
    """Publishes many messages at once and waits for every PubAck together.

    Args:
        js: the JetStream context.
        tracing: writes each message's trace context into its headers; carry-only when
            omitted (tools and tests).
        timeout: seconds to wait for all acks before raising ``Unavailable``.
        reconnects: when given, a reconnect while acks are awaited raises ``Unavailable``
            at once (the service runtime passes its own).
    """

    def __init__(
        self,
        js: JetStreamContext,
        tracing: Tracing | None = None,
        timeout: float = PUBLISH_TIMEOUT,
        reconnects: Reconnects | None = None,
    ) -> None:
        self._js = js
        self._tracing = tracing or Tracing.off()
        self._inject = self._tracing.inject
        self._timeout = timeout
        self._reconnects = reconnects

    async def publish(self, items: Iterable[Outgoing]) -> list[Any]:
        """Publish ``items`` concurrently; return their PubAcks in order.

        Raises:
            Overloaded: a stream refused a message because it is full (discard=new).
            Unavailable: no stream answered, or acks did not come within the timeout.
        """
        if self._tracing.exporting:
            return await self._publish_traced(list(items))
        return await self._publish(items)

    async def _publish_traced(self, items: list[Outgoing]) -> list[Any]:
        """:meth:`publish` with a ``send`` span per message, ended once its fate is known."""
        spans = [
            self._tracing.send(item.subject, item.msg_id, item.context) if item.spanned else None for item in items
        ]
        try:
            acks = await self._publish(items, spans)
        except Exception as exc:
            for span in spans:
                if span is None:
                    continue
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                span.end()
            raise
        for span, ack in zip(spans, acks, strict=True):
            if span is None:
                continue
            if getattr(ack, "duplicate", False):
                span.set_attribute("jobmesh.duplicate", True)  # the stream already had it
            span.end()
        return acks

    async def _publish(self, items: Iterable[Outgoing], spans: list[trace.Span | None] | None = None) -> list[Any]:
        futures = []
        try:
            for n, item in enumerate(items):
                span = spans[n] if spans is not None else None
                if span is None:
                    headers = self._inject({"Nats-Msg-Id": item.msg_id}, item.context)
                else:
                    headers = self._inject({"Nats-Msg-Id": item.msg_id}, trace.set_span_in_context(span))
                futures.append(await self._js.publish_async(item.subject, encode(item.message), headers=headers))
        except nats.errors.Error as exc:  # disconnected, closed, outbound buffer full
            _cancel(futures)
            raise Unavailable(f"cannot publish: {type(exc).__name__}: {exc}") from exc
        if not futures:
            return []
        try:
            gathered = asyncio.gather(*futures)
            # When the wait is given up, the acks still in flight are cancelled and the gather
            # ends with that cancellation, which nobody reads: mark it read, so asyncio does
            # not log it as lost.
            gathered.add_done_callback(_read_outcome)
            acks = asyncio.wait_for(gathered, self._timeout)
            if self._reconnects is None:
                return await acks
            # PubAcks the old server owed die with it: after a reconnect, give up at once
            # (the caller retries; ids make the re-publish a no-op) rather than after the timeout.
            return await self._reconnects.guard(acks, f"waiting for {len(futures)} PubAcks")
        except Unavailable:
            _cancel(futures)
            raise
        except TimeoutError as exc:
            for future in futures:
                future.cancel()
            raise Unavailable(f"no PubAck within {self._timeout}s for {len(futures)} messages") from exc
        except NoStreamResponseError as exc:
            _cancel(futures)
            raise Unavailable("no stream answered the publish; is the cluster provisioned?") from exc
        except APIError as exc:
            _cancel(futures)
            if exc.code == 503 or (exc.description or "").startswith("maximum"):
                raise Overloaded(f"stream refused the publish: {exc.description}") from exc
            raise Unavailable(f"publish failed: {exc.description}") from exc


def _read_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _cancel(futures: list[asyncio.Future[Any]]) -> None:
    for future in futures:
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()  # mark retrieved, so asyncio does not log it again
