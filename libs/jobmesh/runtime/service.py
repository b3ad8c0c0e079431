"""The one service runtime every jobmesh service runs on.

It connects to NATS, provisions streams, runs one pull loop per durable consumer and one
responder per request/reply subject, decides every message's fate in one place (ack,
nak with delay, or term plus a dead letter), carries trace context, answers health checks
and drains gracefully on SIGTERM. Services supply handlers; they never ack themselves.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from opentelemetry import context as otel_context
from opentelemetry import trace

from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec, encode
from jobmesh.contract.ids import deadletter_id
from jobmesh.contract.messages.v1 import DeadLetter, ErrorReply, HealthReply
from jobmesh.errors import InvalidMessage, JobmeshError, Unavailable
from jobmesh.runtime import logs
from jobmesh.runtime.consumerlag import poll_lag
from jobmesh.runtime.fencing import subject_fence
from jobmesh.runtime.metrics import Metrics
from jobmesh.runtime.natsauth import connect_options
from jobmesh.runtime.opsserver import OpsServer
from jobmesh.runtime.outcomes import ACK, Ack, Outcome, Reject, Retry, fate_for
from jobmesh.runtime.provisioning import (
    PROVISION_PATIENCE_SECONDS,
    consumer_config,
    ensure_consumer,
    provision,
    retry_timeouts,
)
from jobmesh.runtime.publisher import Outgoing, Publisher
from jobmesh.runtime.pull import PullConsumer
from jobmesh.runtime.reconnects import Reconnects
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import Context, Tracing

log = logging.getLogger("jobmesh.runtime.service")

# Payloads up to this size are kept whole in their dead letter (base64 grows them by a
# third; the stream takes messages up to 1 MiB).
DEAD_LETTER_PAYLOAD_MAX = 512 * 1024


@dataclass(slots=True)
class Envelope:
    """A decoded message with what the handler may need besides its body."""

    message: Any
    subject: str
    headers: dict[str, str]
    context: Context
    raw: Msg | None = None
    span: Any = None

    @property
    def data(self) -> bytes:
        """The message as it came on the wire (encoded again when built without one, in tests)."""
        return self.raw.data if self.raw is not None else encode(self.message)

    @property
    def deliveries(self) -> int:
        """How often this message was delivered (parsed on demand: it is rarely needed)."""
        return _deliveries(self.raw) if self.raw is not None else 1

    @property
    def stream_seq(self) -> int:
        """The message's sequence in its stream (0 for a request or a test's envelope)."""
        return _stream_seq(self.raw) if self.raw is not None else 0


BatchHandler = Callable[[list[Envelope]], Awaitable[Sequence[Outcome] | None]]
RequestHandler = Callable[[Envelope], Awaitable[Any]]


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer and the batch handler behind it.

    The handler returns one outcome per envelope (``None`` means ack them all) or raises;
    an exception is mapped by :func:`jobmesh.runtime.outcomes.fate_for` for every envelope.
    """

    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    codec: Codec[Any]
    handle: BatchHandler
    span_name: str
    # Short, so that a message whose ack died with a crashed server (or its consumer) is
    # redelivered within seconds; a batch that takes longer tells the server it is still
    # at work (in-progress acks), so a slow batch is not redelivered meanwhile.
    ack_wait: float = 10.0
    max_deliver: int = 20  # unexpected exceptions tolerated before a dead letter (fate_for)
    max_ack_pending: int = 20_000
    batch_size: int | None = None
    # Where a new durable starts: ALL for work that must not be missed; NEW for a consumer
    # created on demand that must not replay history (the trigger's completion rules).
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL


@dataclass(frozen=True)
class ResponderSpec:
    """A request/reply subject served by a queue group of every replica."""

    subject: str
    codec: Codec[Any] | None  # None: the handler gets the raw payload bytes
    handle: RequestHandler
    queue: str
    concurrency: int = 256


@dataclass
class _Stats:
    handled: int = 0
    batches: int = 0
    dead_lettered: int = 0
    retried: int = 0
    last_error: str = ""


class Runtime:
    """Connection, provisioning, loops and drain for one service process.

    Args:
        settings: the process settings.
        tracing: what the process does with trace context (``Tracing.from_env`` in
            :func:`jobmesh.runtime.entrypoint.run_service`); carry-only when omitted.
    """

    def __init__(self, settings: Settings, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.service = settings.service
        self.tracing = tracing or Tracing.off()
        self.tracer = self.tracing.tracer
        self._connection: tuple[NATS, JetStreamContext, Publisher] | None = None
        self.stats = _Stats()
        self.metrics = Metrics()
        self._ops: OpsServer | None = None
        self._durables: dict[str, str] = {}  # durable -> stream, of the pull loops running
        self._stopping = asyncio.Event()
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._pulls: list[PullConsumer] = []
        self._subs: list[Any] = []
        self._responders: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._health_checks: list[Callable[[], str | None]] = []
        self._reconnect_hooks: list[Callable[[], None]] = []
        # Waits on NATS begun before a reconnect are hopeless after it: this cuts them short.
        self.reconnects = Reconnects()

    @property
    def nc(self) -> NATS:
        """The NATS connection (after :meth:`connect`)."""
        return self._connected()[0]

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context (after :meth:`connect`)."""
        return self._connected()[1]

    @property
    def publisher(self) -> Publisher:
        """The batched publisher every handler publishes through (after :meth:`connect`)."""
        return self._connected()[2]

    def _connected(self) -> tuple[NATS, JetStreamContext, Publisher]:
        if self._connection is None:
            raise Unavailable(f"{self.service}: not connected to NATS yet (Runtime.connect first)")
        return self._connection

    # --- lifecycle -----------------------------------------------------------------
    async def connect(self) -> None:
        """Connect to NATS (retrying forever on later disconnects) and provision."""
        try:
            nc = await nats.connect(
                servers=self.settings.nats_servers,
                **connect_options(self.settings),
                name=f"jobmesh-{self.service}-{self.settings.instance}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=5,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnect,
                reconnected_cb=self._on_reconnect,
            )
        except Exception as exc:
            raise Unavailable(f"cannot reach NATS at {self.settings.nats_url}: {exc}") from exc
        js = nc.jetstream(timeout=10, publish_async_max_pending=20_000)
        self._connection = (nc, js, Publisher(js, self.tracing, reconnects=self.reconnects))
        if not self.provisions:
            return  # the provisioner made the streams and buckets; this identity may not
        await provision(
            js,
            node_ttl=self.settings.node_ttl_seconds,
            lease_ttl=self.settings.lease_ttl_seconds,
            replicas=self.settings.stream_replicas,
            result_retention=self.settings.result_retention_seconds,
        )

    def on_reconnect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` after every reconnect to NATS (views that watch KV restart their
        watch then: a watch can lag far behind the bucket after a reconnect)."""
        self._reconnect_hooks.append(hook)

    def add_health_check(self, check: Callable[[], str | None]) -> None:
        """Register a check returning a problem description, or None when healthy."""
        self._health_checks.append(check)

    def spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        """Run a background task; a crash stops the service, a cancel does not."""
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    async def serve(
        self,
        consumers: Sequence[ConsumerSpec] = (),
        responders: Sequence[ResponderSpec] = (),
        on_stop: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run until SIGTERM/SIGINT (or :meth:`stop`), then drain and close.

        Args:
            consumers: durable pull consumers to run.
            responders: request/reply subjects to answer.
            on_stop: called after in-flight work finished, before the connection closes.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError):
                pass
        for spec in consumers:
            await self.add_consumer(spec)
        for responder in responders:
            await self.add_responder(responder)
        await self.add_responder(ResponderSpec(subjects.health(self.service), None, self._health, queue=self.service))
        await self._start_ops()
        log.info("%s ready (instance %s)", self.service, self.settings.instance)
        await self._stopping.wait()
        await self._drain(on_stop)

    def stop(self) -> None:
        """Begin a graceful stop: no new batches; in-flight ones finish."""
        if not self._stopping.is_set():
            log.info("%s stopping: draining in-flight work", self.service)
            self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _drain(self, on_stop: Callable[[], Awaitable[None]] | None) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                log.debug("unsubscribe failed during drain", exc_info=True)
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_seconds)
        except TimeoutError:
            log.warning("%s: in-flight work did not finish within %.0fs", self.service, self.settings.drain_seconds)
        for pull in self._pulls:
            await pull.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if on_stop is not None:
            await on_stop()
        if self._connection is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), 5)
            except Exception:  # noqa: BLE001 - closing anyway
                await self.nc.close()
        if self._ops is not None:
            await self._ops.stop()
        self.tracing.shutdown()
        log.info(
            "%s stopped: %d messages in %d batches, %d retried, %d dead-lettered",
            self.service,
            self.stats.handled,
            self.stats.batches,
            self.stats.retried,
            self.stats.dead_lettered,
        )

    # --- consumers -----------------------------------------------------------------
    async def ensure_consumers(self, specs: Sequence[ConsumerSpec]) -> None:
        """Create (or bring up to date) the durable consumers of ``specs`` without
        consuming from them: a service's part of the one-shot provisioner."""
        for spec in specs:
            await self._ensure_consumer(spec)
            log.info("%s: durable consumer %s on %s is provisioned", self.service, spec.durable, spec.stream)

    @property
    def provisions(self) -> bool:
        """Whether this process creates what it needs: without NATS credentials (one
        identity for everything), or as the provisioner. A service with an identity of its
        own may use its streams and durables, never create or change them."""
        return not self.settings.authenticated or self.settings.identity == "provisioner"

    async def _ensure_consumer(self, spec: ConsumerSpec) -> None:
        if not self.provisions:
            try:
                await self.js.consumer_info(spec.stream, spec.durable)
            except nats.js.errors.NotFoundError:
                raise Unavailable(
                    f"durable consumer {spec.durable} on {spec.stream} does not exist: run `jobmesh provision"
                    " --services` (and `--node <id>` for an executor) with the provisioner's credentials"
                ) from None
            return
        config = consumer_config(
            spec.durable,
            list(spec.filter_subjects),
            ack_wait=spec.ack_wait,
            max_ack_pending=spec.max_ack_pending,
            deliver_policy=spec.deliver_policy,
        )
        deadline = asyncio.get_running_loop().time() + PROVISION_PATIENCE_SECONDS
        await retry_timeouts(lambda: ensure_consumer(self.js, spec.stream, config), f"durable {spec.durable}", deadline)

    async def close(self) -> None:
        """Close the connection of a runtime that never served (a provisioning run)."""
        if self._connection is not None and not self.nc.is_closed:
            await self.nc.close()

    async def add_consumer(self, spec: ConsumerSpec) -> None:
        """Ensure the durable consumer exists and start its pull loop."""
        await self._ensure_consumer(spec)
        pull = PullConsumer(self.nc, spec.stream, spec.durable, spec.batch_size or self.settings.batch_size)
        await pull.start()
        self._pulls.append(pull)
        self._durables[spec.durable] = spec.stream
        self.spawn(self._consume(spec, pull), f"consume:{spec.durable}")

    async def remove_consumer(self, durable: str) -> None:
        """Stop pulling from ``durable`` after the batch in hand (e.g. a lost lease).

        Messages already pulled but not handled are given back at once.
        """
        stream = self._durables.pop(durable, None)
        if stream is not None:
            self.metrics.drop_lag(stream, durable)  # another replica reports it now
        for pull in [p for p in self._pulls if p.durable == durable]:
            pull.stopped = True
            self._pulls.remove(pull)
            await pull.close()

    async def _consume(self, spec: ConsumerSpec, pull: PullConsumer) -> None:
        while not self._stopping.is_set() and not pull.stopped:
            raws = await pull.next_batch(timeout=1.0)
            if not raws:
                continue
            if self._stopping.is_set() or pull.stopped:
                # Give them back at once so another replica takes them now, not after ack_wait.
                for raw in raws:
                    await raw.nak()
                break
            self._begin()
            try:
                await self.process_batch(spec, raws)
            finally:
                self._end()

    async def process_batch(self, spec: ConsumerSpec, raws: list[Msg]) -> None:
        """Decode, handle and settle one batch. Never raises for a bad message."""
        envelopes: list[Envelope] = []
        decoded: list[Msg] = []
        traced = self.tracing.exporting
        received_at = time.time_ns() if traced else 0
        span: trace.Span | None
        # Every consumer of JM_JOBS, whichever service runs it, refuses an executor's event
        # that speaks for another node than its subject's before any handler sees it.
        fenced = spec.stream == subjects.STREAM_JOBS
        for raw in raws:
            headers = raw.headers or {}
            try:
                message = spec.codec.decode(raw.data)
            except InvalidMessage as exc:
                await self._settle(raw, Reject(exc.code, str(exc)), _deliveries(raw))
                continue
            except Exception as exc:  # a decoder's bug must not stop the consumer
                log.exception("%s: decoding a message on %s failed", spec.durable, raw.subject)
                await self._settle(raw, Reject("invalid_message", f"{type(exc).__name__}: {exc}"), _deliveries(raw))
                continue
            if fenced and (forged := subject_fence(raw.subject, message)) is not None:
                await self._settle(raw, forged, _deliveries(raw))
                continue
            if traced:
                span, context = self.tracing.received(
                    raw.subject, headers, spec.durable, received_at, _template_of(spec), len(raw.data)
                )
                _describe(span, message)
            else:
                span, context = self.tracing.open_span(spec.span_name, headers, trace.SpanKind.CONSUMER)
            envelopes.append(Envelope(message, raw.subject, headers, context, raw, span))
            decoded.append(raw)
        if not envelopes:
            return
        # A batch that outlives a third of ack_wait keeps its messages checked out.
        keepalive = _KeepAlive(decoded, spec.ack_wait / 3)
        batch_span, token = self._enter_batch(spec, envelopes) if traced else (None, None)
        # A batch about one job (every batch at light load) lends its ids to the log lines
        # written meanwhile; a batch of several jobs has no single trace to name.
        ids = logs.current.set(self._log_ids(envelopes[0]) if _one_job(envelopes) else None)
        try:
            outcomes = await self.handle(spec, envelopes)
        finally:
            logs.current.reset(ids)
            keepalive.cancel()
            if token is not None:
                otel_context.detach(token)
        if outcomes is None:
            for raw in decoded:
                await raw.ack()
        else:
            for env, raw, outcome in zip(envelopes, decoded, outcomes, strict=True):
                if traced and isinstance(outcome, Reject):
                    # Its dead letter's send span goes into the refused message's trace.
                    settling = otel_context.attach(env.context)
                    try:
                        await self._settle(raw, outcome, env.deliveries)
                    finally:
                        otel_context.detach(settling)
                    continue
                await self._settle(raw, outcome, 1 if isinstance(outcome, Ack) else env.deliveries)
        if traced:
            _end_spans(envelopes, outcomes, batch_span)
        self.stats.handled += len(envelopes)
        self.stats.batches += 1
        self.metrics.processed(self.service, spec.span_name.partition(" ")[2] or spec.durable, len(envelopes))

    def _enter_batch(
        self, spec: ConsumerSpec, envelopes: list[Envelope]
    ) -> tuple[trace.Span | None, contextvars.Token[Context]]:
        """Make the batch's span current while its handler runs, so that what the handler
        does without naming a context (a database query, a publish without one) goes
        beneath it: a message's own ``process`` span, or for a batch of several a span of
        the batch, linked to each message's."""
        if len(envelopes) == 1:
            return None, otel_context.attach(envelopes[0].context)
        span, context = self.tracing.batch(_template_of(spec), spec.durable, [env.context for env in envelopes])
        return span, otel_context.attach(context)

    async def handle(self, spec: ConsumerSpec, envelopes: list[Envelope]) -> Sequence[Outcome] | None:
        """Run the handler; map an exception to every message's fate.

        Any error that is not an outage (a bug, a value the database refuses, a message
        the handler finds invalid) may come from one message of the batch: the batch is
        then handled again one message at a time, so only that message gets its fate and
        its neighbours are neither held back nor dead-lettered with it. This is the one
        place batches are split; handlers do not do it themselves.
        """
        try:
            return await spec.handle(envelopes)
        except Exception as exc:
            known = isinstance(exc, JobmeshError)
            if isinstance(exc, JobmeshError) and exc.retryable:
                # An outage: one line per batch, not a traceback per retry.
                log.warning("%s: batch of %d will be retried: %s: %s", spec.durable, len(envelopes), exc.code, exc)
            elif len(envelopes) > 1:
                log.warning(
                    "%s: a batch of %d failed (%s: %s); handling its messages one at a time",
                    spec.durable,
                    len(envelopes),
                    type(exc).__name__,
                    exc,
                    exc_info=not known,
                )
                outcomes: list[Outcome] = []
                for env in envelopes:
                    outcomes.extend(await self.handle(spec, [env]) or [ACK])
                return outcomes
            elif not known:
                log.exception("%s: handler failed for a message on %s", spec.durable, envelopes[0].subject)
            return [
                fate_for(exc, env.deliveries, spec.max_deliver, key=_stream_seq(env.raw) if env.raw else None)
                for env in envelopes
            ]

    async def _settle(self, raw: Msg, outcome: Outcome, deliveries: int) -> None:
        if isinstance(outcome, Ack):
            await raw.ack()
        elif isinstance(outcome, Retry):
            self.stats.retried += 1
            await raw.nak(delay=outcome.delay)
        else:
            if not await self.dead_letter(raw.subject, raw.data, outcome, deliveries, _stream_seq(raw)):
                # Could not record it: leave it for redelivery rather than lose it.
                await raw.nak(delay=5.0)
                return
            await raw.term()

    async def dead_letter(
        self,
        subject: str,
        payload: bytes,
        outcome: Reject,
        deliveries: int = 1,
        stream_seq: int = 0,
        rule: str = "",
        event_id: str = "",
    ) -> bool:
        """Record a refused message with its reason. Returns False if that failed.

        ``rule`` names the trigger rule that could not use the message (one event can be
        refused by several rules, one dead letter each), and ``event_id`` the event's
        identity, which a replay carries back."""
        self.stats.dead_lettered += 1
        self.metrics.dead_lettered(self.service, outcome.code)
        self.stats.last_error = f"{outcome.code}: {outcome.reason}"
        log.warning("%s: dead-lettering a message on %s: %s: %s", self.service, subject, outcome.code, outcome.reason)
        letter = DeadLetter(
            service=self.service,
            subject=subject,
            code=outcome.code,
            reason=outcome.reason[:2000],
            size=len(payload),
            payload_head=payload[:512].decode("utf-8", "replace"),
            # The whole payload, for a replay; left out when its base64 would not fit in a
            # message (a refused record must never be one that cannot be written).
            payload_b64=base64.b64encode(payload).decode() if len(payload) <= DEAD_LETTER_PAYLOAD_MAX else "",
            stream_seq=stream_seq,
            deliveries=deliveries,
            at=time.time(),
            rule=rule,
            event_id=event_id,
        )
        msg_id = deadletter_id(self.service, subject + (f":{rule}" if rule else ""), stream_seq, time.time_ns())
        try:
            await self.publisher.publish([Outgoing(subjects.deadletter(self.service), letter, msg_id)])
        except JobmeshError:
            log.exception("%s: could not record a dead letter", self.service)
            return False
        return True

    # --- responders ----------------------------------------------------------------
    async def add_responder(self, spec: ResponderSpec) -> None:
        """Answer requests on ``spec.subject`` in a queue group, many at a time."""
        limit = asyncio.Semaphore(spec.concurrency)

        async def on_request(msg: Msg) -> None:
            await limit.acquire()
            self._begin()
            task = asyncio.ensure_future(self._respond(spec, msg))
            task.add_done_callback(done)

        def done(_task: asyncio.Future[None]) -> None:
            limit.release()
            self._end()

        sub = await self.nc.subscribe(spec.subject, queue=spec.queue, cb=on_request)
        self._subs.append(sub)
        self._responders[spec.subject] = sub

    async def remove_responder(self, subject: str) -> None:
        """Stop answering on ``subject``."""
        sub = self._responders.pop(subject, None)
        if sub is not None:
            self._subs.remove(sub)
            await sub.unsubscribe()

    async def _respond(self, spec: ResponderSpec, msg: Msg) -> None:
        try:
            message = spec.codec.decode(msg.data) if spec.codec is not None else msg.data
        except InvalidMessage as exc:
            await self.dead_letter(msg.subject, msg.data, Reject(exc.code, str(exc)))
            await _reply(msg, ErrorReply.of(exc))
            return
        except Exception as exc:  # a decoder's bug: the sender still gets an answer
            log.exception("%s: decoding a request on %s failed", self.service, msg.subject)
            refused = InvalidMessage(f"cannot decode the request: {type(exc).__name__}: {exc}")
            await self.dead_letter(msg.subject, msg.data, Reject(refused.code, str(refused)))
            await _reply(msg, ErrorReply.of(refused))
            return
        headers = msg.headers or {}
        span: trace.Span | None
        if self.tracing.exporting:
            span, context = self.tracing.served(msg.subject, headers, spec.queue)
            # Each request is its own task: what it does without naming a context (a
            # database query) goes beneath its span, and needs no detach.
            otel_context.attach(context)
        else:
            span, context = self.tracing.open_span(f"process {spec.subject}", headers, trace.SpanKind.SERVER)
        # Each request is its own task, so its log lines carry its ids without a reset.
        env = Envelope(message, msg.subject, headers, context, msg)
        logs.current.set(self._log_ids(env))
        reply: Any = None  # set below; None only when the handler was cancelled
        try:
            try:
                reply = await spec.handle(env)
            except InvalidMessage as exc:
                # Well-formed but invalid (e.g. an impossible spec): record it like garbage.
                await self.dead_letter(msg.subject, msg.data, Reject(exc.code, str(exc)))
                reply = ErrorReply.of(exc)
            except JobmeshError as exc:
                reply = ErrorReply.of(exc)
            except Exception as exc:
                log.exception("%s: request on %s failed", self.service, msg.subject)
                # A bug, not an outage: the same request would fail the same way.
                reply = ErrorReply.of(JobmeshError(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            if span is not None:
                if isinstance(reply, ErrorReply):
                    span.set_status(trace.Status(trace.StatusCode.ERROR, reply.message))
                span.end()
        self.metrics.processed(self.service, spec.subject)
        await _reply(msg, reply)

    def _log_ids(self, env: Envelope) -> logs.LogIds:
        """The trace, span and job ids that log lines about ``env`` carry."""
        job_id = getattr(env.message, "job_id", "")
        traceparent = self.tracing.inject({}, env.context).get("traceparent", "")
        return logs.ids_from_traceparent(traceparent, job_id if isinstance(job_id, str) else "")

    async def _start_ops(self) -> None:
        """This replica's own /healthz and /metrics (JOBMESH_OPS_LISTEN), and the lag poll
        behind the consumer-lag gauge (only when something can read it). The poll asks
        about the consumers running at each round: the scheduler's come and go with its
        partition leases, the trigger's completion consumer with its rules."""
        if not self.settings.ops_listen:
            return
        self._ops = OpsServer(self.settings.ops_listen, self.health_reply)
        await self._ops.start()
        self.spawn(
            poll_lag(self.js, lambda: [(st, d) for d, st in self._durables.items()], self.metrics), "consumer-lag"
        )

    async def _health(self, env: Envelope) -> HealthReply:
        return self.health_reply()

    def health_reply(self) -> HealthReply:
        """This process's health now: its own checks, the NATS connection, stopping."""
        problems = [p for p in (check() for check in self._health_checks) if p]
        if self._connection is None or not self.nc.is_connected:
            problems.append("not connected to NATS")
        return HealthReply(
            service=self.service,
            instance=self.settings.instance,
            ok=not problems and not self.stopping,
            detail="; ".join(problems) or ("stopping" if self.stopping else "ok"),
        )

    # --- bookkeeping ---------------------------------------------------------------
    def _begin(self) -> None:
        self._busy += 1
        self._idle.clear()

    def _end(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stopping.is_set():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s: background task %s crashed; stopping", self.service, task.get_name(), exc_info=exc)
            self.stop()

    async def _on_error(self, exc: Exception) -> None:
        log.warning("%s: NATS error: %s", self.service, exc)

    async def _on_disconnect(self) -> None:
        if self.stopping:
            log.info("%s: disconnected from NATS", self.service)  # the drain closes the connection
        else:
            log.warning("%s: disconnected from NATS", self.service)

    async def _on_reconnect(self) -> None:
        log.info("%s: reconnected to NATS", self.service)
        self.reconnects.reconnected()
        for pull in self._pulls:
            pull.reconnected()
        for hook in self._reconnect_hooks:
            hook()


class _KeepAlive:
    """While a batch is handled, tells the server every ``every`` seconds that its messages
    are still being worked on (an in-progress ack resets their ack_wait). Costs one timer
    per batch: only a batch that outlives ``every`` sends anything."""

    __slots__ = ("_every", "_handle", "_raws", "_task")

    def __init__(self, raws: list[Msg], every: float) -> None:
        self._raws = raws
        self._every = every
        self._task: asyncio.Task[None] | None = None
        self._handle = asyncio.get_running_loop().call_later(every, self._fire)

    def _fire(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._beat())
        self._handle = asyncio.get_running_loop().call_later(self._every, self._fire)

    async def _beat(self) -> None:
        for raw in self._raws:
            try:
                await raw.in_progress()
            except Exception:  # noqa: BLE001 - disconnected: a redelivery is harmless, just wasted
                return

    def cancel(self) -> None:
        self._handle.cancel()
        if self._task is not None:
            self._task.cancel()


def _template_of(spec: ConsumerSpec) -> str:
    """The subject template a consumer's spans fall back on for a subject jobmesh does not
    define (an external event's): its one filter, or its span name's subject."""
    if len(spec.filter_subjects) == 1:
        return spec.filter_subjects[0]
    return spec.span_name.partition(" ")[2] or spec.span_name


def _describe(span: trace.Span, message: Any) -> None:
    """The job and attempt a message is about, as span attributes (searchable in Tempo)."""
    job_id = getattr(message, "job_id", None)
    if isinstance(job_id, str):
        span.set_attribute("jobmesh.job_id", job_id)
    attempt = getattr(message, "attempt", None)
    if isinstance(attempt, int):
        span.set_attribute("jobmesh.attempt", attempt)


def _end_spans(envelopes: list[Envelope], outcomes: Sequence[Outcome] | None, batch_span: trace.Span | None) -> None:
    """End each message's ``process`` span with its fate, then the batch's span."""
    for n, env in enumerate(envelopes):
        span = env.span
        if span is None:
            continue
        outcome = outcomes[n] if outcomes is not None else ACK
        if isinstance(outcome, Retry):
            span.set_attribute("jobmesh.fate", "retry")
        elif isinstance(outcome, Reject):
            span.set_attribute("jobmesh.fate", "dead_letter")
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{outcome.code}: {outcome.reason}"[:500]))
        span.end()
    if batch_span is not None:
        batch_span.end()


async def _reply(msg: Msg, reply: Any) -> None:
    if msg.reply:
        await msg.respond(encode(reply))


async def not_consumed(envelopes: list[Envelope]) -> Sequence[Outcome] | None:
    """The handler of a consumer spec made only to provision its durable
    (:meth:`Runtime.ensure_consumers`): it is never consumed from."""
    raise RuntimeError("a consumer spec made for provisioning was consumed from")


def _one_job(envelopes: list[Envelope]) -> bool:
    """Whether every message of a batch is about the same job (one trace)."""
    first = getattr(envelopes[0].message, "job_id", None)
    return first is not None and all(getattr(env.message, "job_id", None) == first for env in envelopes[1:])


def _deliveries(raw: Msg) -> int:
    try:
        return raw.metadata.num_delivered or 1
    except Exception:  # noqa: BLE001 - not a JetStream message
        return 1


def _stream_seq(raw: Msg) -> int:
    try:
        return raw.metadata.sequence.stream
    except Exception:  # noqa: BLE001 - not a JetStream message
        return 0
