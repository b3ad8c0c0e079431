"""OpenTelemetry set-up and W3C trace-context propagation through NATS headers.

One :class:`Tracing` per process, built in the service's entry point and passed to the
runtime and the publisher (no module-level state but the attempt-span id below). Exporting
is off unless the standard variables ask for it (``OTEL_TRACES_EXPORTER=otlp`` or
``console``, or ``OTEL_EXPORTER_OTLP_ENDPOINT``). Propagation always works:

- exporting on: the OTel propagator extracts and injects, and spans are recorded: a
  ``send``, ``receive`` and ``process`` span per message (OpenTelemetry's messaging
  conventions: :func:`messaging_attributes`), named by subject template
  (:func:`subject_template`), never by id; asyncpg's queries beneath them;
- exporting off (the default): nothing is recorded, so an incoming ``traceparent`` is
  carried on as it came (:class:`Carried`), without parsing, validating and rebuilding a
  span context per message. ``make bench`` prints what this fast path saves per message.

docs/tracing.md shows the spans of one job.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import logging
import os
import random
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract as _otel_extract
from opentelemetry.propagate import inject as _otel_inject
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.util.types import Attributes

Context = otel_context.Context

log = logging.getLogger("jobmesh.runtime.tracing")

MESSAGING_SYSTEM = "nats"
# The attributes of OpenTelemetry's messaging conventions jobmesh sets.
SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
TEMPLATE = "messaging.destination.template"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
MESSAGE_ID = "messaging.message.id"
CONSUMER_GROUP = "messaging.consumer.group.name"
BATCH_COUNT = "messaging.batch.message_count"
BODY_SIZE = "messaging.message.body.size"

# Seconds a stopping service gives the exporter to send its last spans: an endpoint that
# cannot be reached must not hold up a drain (the OTLP exporter retries for up to
# OTEL_EXPORTER_OTLP_TIMEOUT, ten seconds by default).
SHUTDOWN_SECONDS = 3.0

# The span id the next span started in this task gets (see :func:`start_attempt_span`).
_WANTED_SPAN_ID: contextvars.ContextVar[int] = contextvars.ContextVar("jobmesh_wanted_span_id", default=0)


class Carried(Context):
    """A trace context that only carries an incoming ``traceparent`` on, unparsed.

    It is an (empty) OTel ``Context`` for any API that receives it, where it means "no
    span"; jobmesh's own inject writes its header back out as it came.
    """

    __slots__ = ("traceparent",)

    def __init__(self, traceparent: str) -> None:
        super().__init__()
        self.traceparent = traceparent


class Tracing:
    """How this process handles trace context: record and export spans, or only carry.

    Args:
        tracer: the tracer spans are started from.
        exporting: whether an SDK provider records and exports spans.
        provider: the SDK provider to flush at shutdown (None when not exporting).
        exporter: the provider's exporter, stopped at once when a flush at shutdown hangs.
    """

    def __init__(self, tracer: trace.Tracer, exporting: bool, provider: Any = None, exporter: Any = None) -> None:
        self.tracer = tracer
        self.exporting = exporting
        self._provider = provider
        self._exporter = exporter

    @classmethod
    def off(cls) -> Tracing:
        """Carry trace context, record nothing (tools, tests, and services by default)."""
        return cls(trace.get_tracer("jobmesh"), exporting=False)

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None) -> Tracing:
        """Install an SDK tracer provider when the OTEL_* variables ask for export.

        The exporter reads the rest of its configuration (endpoint, headers, timeout,
        protocol) from the standard variables itself; asyncpg is instrumented only here,
        so a service that does not export pays nothing for it.

        Args:
            service: becomes ``service.name`` unless OTEL_SERVICE_NAME is set.
            env: the environment to read; ``os.environ`` when omitted.
        """
        env = os.environ if env is None else env
        exporter_name = env.get("OTEL_TRACES_EXPORTER", "")
        wants_export = exporter_name in ("otlp", "console") or (
            bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            and exporter_name != "none"
        )
        if not wants_export or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return cls.off()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        # Resource.create also reads OTEL_RESOURCE_ATTRIBUTES; OTEL_SERVICE_NAME wins over both.
        resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", f"jobmesh-{service}")})
        provider = TracerProvider(resource=resource, id_generator=AttemptIds())
        # The sampler OTEL_TRACES_SAMPLER chose, minus queries that belong to no trace.
        provider.sampler = NoLoneQueries(provider.sampler)
        exporter: SpanExporter
        if exporter_name == "console":
            exporter = ConsoleSpanExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        # The API's global provider, as the OTel SDK and the asyncpg instrumentation expect;
        # jobmesh itself reads only self.
        trace.set_tracer_provider(provider)
        from jobmesh.runtime.db import trace_queries

        trace_queries(provider)
        return cls(provider.get_tracer("jobmesh"), exporting=True, provider=provider, exporter=exporter)

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """Flush and stop the SDK provider, if this process installed one, within ``timeout``.

        A flush that has not finished by then (the endpoint cannot be reached, and the
        exporter waits between retries) is cut short: those spans are dropped, the service
        stops on time.
        """
        if self._provider is None:
            return
        stopping = threading.Thread(target=self._provider.shutdown, name="otel-shutdown", daemon=True)
        stopping.start()
        stopping.join(timeout)
        if stopping.is_alive():
            log.warning("traces: the exporter did not flush within %.0fs; dropping what is left", timeout)
            if self._exporter is not None:
                self._exporter.shutdown()  # ends its retry wait, so the flush thread ends too
            stopping.join(0.5)

    def extract(self, headers: Mapping[str, str] | None) -> Context:
        """The trace context carried by a message's headers (empty when there is none)."""
        if not self.exporting:
            return carried(headers)
        return _otel_extract(headers or {})

    def inject(self, headers: dict[str, str], ctx: Context | None) -> dict[str, str]:
        """Write ``traceparent``/``tracestate`` for ``ctx`` into ``headers`` and return them."""
        if isinstance(ctx, Carried):
            headers["traceparent"] = ctx.traceparent
            return headers
        if not self.exporting:
            if ctx is not None:
                sc = trace.get_current_span(ctx).get_span_context()
                if sc.is_valid:
                    headers["traceparent"] = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
            return headers
        _otel_inject(headers, context=ctx)
        return headers

    def open_span(
        self, name: str, headers: Mapping[str, str] | None, kind: trace.SpanKind
    ) -> tuple[trace.Span | None, Context]:
        """The span for handling one message (None when nothing is recorded) and the
        context that everything published for it continues.

        A message without a trace starts a fresh one, so every message of a job shares one
        trace id even when nothing is exported.
        """
        parent = self.extract(headers)
        if self.exporting:
            span = self.tracer.start_span(name, context=parent, kind=kind)
            return span, trace.set_span_in_context(span, parent)
        return None, parent if carries_trace(parent) else new_root()

    # --- the spans of messages (only called when exporting) ---------------------------
    def received(
        self,
        subject: str,
        headers: Mapping[str, str],
        group: str,
        received_at: int,
        fallback: str,
        size: int = 0,
    ) -> tuple[trace.Span, Context]:
        """A pulled message's ``receive`` span (from ``received_at``, ended now) and the
        ``process`` span below it, which the runtime ends once the message is settled.

        Args:
            subject: the concrete subject.
            headers: the message's headers (its ``traceparent``, its ``Nats-Msg-Id``).
            group: the durable consumer, which every replica shares.
            received_at: when the batch arrived, in epoch nanoseconds.
            fallback: the template of a subject jobmesh does not know (an external event's):
                the consumer's filter.
            size: the payload's size in bytes.

        Returns:
            The process span and the context everything published for the message continues.
        """
        template = subject_template(subject) or fallback
        attributes = messaging_attributes(subject, template, "receive", headers.get("Nats-Msg-Id", ""), group)
        if size:
            attributes[BODY_SIZE] = size
        parent = _otel_extract(headers)
        receive = self.tracer.start_span(
            f"receive {template}",
            context=parent,
            kind=trace.SpanKind.CLIENT,
            attributes=attributes,
            start_time=received_at,
        )
        receive.end()
        receive_context = trace.set_span_in_context(receive, parent)
        attributes[OPERATION_TYPE] = attributes[OPERATION_NAME] = "process"
        process = self.tracer.start_span(
            f"process {template}", context=receive_context, kind=trace.SpanKind.CONSUMER, attributes=attributes
        )
        return process, trace.set_span_in_context(process, receive_context)

    def batch(self, template: str, group: str, contexts: Sequence[Context]) -> tuple[trace.Span, Context]:
        """The span of handling a batch of messages together, linked to each message's
        ``process`` span (the database queries of the batch go beneath it).

        Args:
            template: the consumer's subject template.
            group: the durable consumer.
            contexts: the messages' contexts (as :meth:`received` returned them).
        """
        links = [trace.Link(trace.get_current_span(ctx).get_span_context()) for ctx in contexts]
        attributes: dict[str, Any] = {
            SYSTEM: MESSAGING_SYSTEM,
            TEMPLATE: template,
            OPERATION_TYPE: "process",
            OPERATION_NAME: "process",
            CONSUMER_GROUP: group,
            BATCH_COUNT: len(contexts),
        }
        span = self.tracer.start_span(
            f"process {template}", context=Context(), kind=trace.SpanKind.CONSUMER, attributes=attributes, links=links
        )
        return span, trace.set_span_in_context(span)

    def served(self, subject: str, headers: Mapping[str, str], group: str) -> tuple[trace.Span, Context]:
        """The SERVER span of answering one request (a submit is the root of its job's
        trace when the client sent no ``traceparent``) and the context it makes."""
        template = subject_template(subject) or subject
        attributes = messaging_attributes(subject, template, "process", "", group)
        parent = _otel_extract(headers)
        span = self.tracer.start_span(
            f"process {template}", context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
        )
        return span, trace.set_span_in_context(span, parent)

    def send(self, subject: str, msg_id: str, parent: Context | None) -> trace.Span:
        """The PRODUCER span of publishing one message below ``parent`` (the current
        context when None); its context is what the message's headers carry."""
        template = subject_template(subject) or subject
        return self.tracer.start_span(
            f"send {template}",
            context=None if isinstance(parent, Carried) else parent,
            kind=trace.SpanKind.PRODUCER,
            attributes=messaging_attributes(subject, template, "send", msg_id, ""),
        )


def messaging_attributes(subject: str, template: str, operation: str, msg_id: str, group: str) -> dict[str, Any]:
    """The OpenTelemetry messaging attributes of one message's span.

    Args:
        subject: the concrete subject (``messaging.destination.name``).
        template: the subject with placeholders (``messaging.destination.template``).
        operation: ``send``, ``receive`` or ``process`` (``messaging.operation.type``).
        msg_id: the Nats-Msg-Id (``messaging.message.id``); "" for none.
        group: the durable consumer or queue group (``messaging.consumer.group.name``);
            "" for a publish.
    """
    attributes: dict[str, Any] = {
        SYSTEM: MESSAGING_SYSTEM,
        DESTINATION: subject,
        TEMPLATE: template,
        OPERATION_TYPE: operation,
        OPERATION_NAME: operation,
    }
    if msg_id:
        attributes[MESSAGE_ID] = msg_id
    if group:
        attributes[CONSUMER_GROUP] = group
    return attributes


# The token after the family that is an id, per family of jobmesh subjects; the tokens
# after it (an event kind, dispatch or cancel) are a fixed vocabulary and stay.
_PLACEHOLDERS = {"job": "{partition}", "node": "{node}", "log": "{job_id}", "watch": "{job_id}"}


@functools.lru_cache(maxsize=4096)
def subject_template(subject: str) -> str | None:
    """``subject`` with its ids as placeholders, or None for a subject jobmesh does not
    define (an external event's).

    ``jobmesh.v1.job.3.ready`` is ``jobmesh.v1.job.{partition}.ready``;
    ``jobmesh.v1.node.n1.dispatch`` is ``jobmesh.v1.node.{node}.dispatch``.
    """
    tokens = subject.split(".")
    if len(tokens) < 3 or tokens[0] != "jobmesh" or tokens[1] != "v1":
        return None
    family = tokens[2]
    if family == "events":
        return None  # named by whoever publishes them
    placeholder = _PLACEHOLDERS.get(family)
    if family == "job" and len(tokens) == 6:
        # An executor's report names its node last: the template (span names, metric
        # destinations) stays the kind's, the full subject is in the destination attribute.
        del tokens[5]
    if placeholder is not None and len(tokens) > 3:
        tokens[3] = placeholder
    elif family == "api" and len(tokens) > 4 and tokens[3] == "scheduler":
        tokens[4] = "{partition}"
    return ".".join(tokens)


def attempt_span_id(trace_id: int, job_id: str, attempt: int) -> int:
    """The span id of an attempt's span: derived from the job's trace, the job and the
    attempt number, so the next attempt can link to it without being told it."""
    digest = hashlib.blake2b(f"{trace_id:032x}:{job_id}:{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1


def start_attempt_span(
    tracer: trace.Tracer,
    name: str,
    parent: Context | None,
    job_id: str,
    attempt: int,
    start_time: int | None = None,
    attributes: Attributes = None,
) -> trace.Span:
    """Start the span of one attempt of a job, with its derived id (:func:`attempt_span_id`)
    and, after the first attempt, a link to the attempt before it (the failed or lost one
    this one retries or moves).

    Args:
        tracer: the executor's tracer (a no-op one when nothing is exported).
        name: the span's name.
        parent: the dispatch's context (in the job's trace).
        job_id: the job.
        attempt: the attempt number (from 1).
        start_time: epoch nanoseconds; now when None.
        attributes: more attributes of the span.
    """
    trace_id = trace.get_current_span(parent).get_span_context().trace_id if parent is not None else 0
    links = []
    if trace_id and attempt > 1:
        earlier = trace.SpanContext(
            trace_id,
            attempt_span_id(trace_id, job_id, attempt - 1),
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
        links.append(trace.Link(earlier, {"jobmesh.link": "previous_attempt", "jobmesh.attempt": attempt - 1}))
    token = _WANTED_SPAN_ID.set(attempt_span_id(trace_id, job_id, attempt) if trace_id else 0)
    try:
        return tracer.start_span(
            name,
            context=parent,
            kind=trace.SpanKind.INTERNAL,
            attributes=attributes,
            links=links,
            start_time=start_time,
        )
    finally:
        _WANTED_SPAN_ID.reset(token)


def record_lost_attempt(
    tracing: Tracing, parent: Context | None, job_id: str, attempt: int, node_id: str, reason: str, at: float
) -> None:
    """Record the span of an attempt declared lost, in the executor's stead.

    A lost attempt's executor was killed or cut off, so its attempt span never reaches the
    collector, and the next attempt's link (to the derived id) would point at nothing.
    The scheduler records it when it declares the loss: a zero-length span at ``at`` with
    the derived id and an error status. (If the executor did export its own after all,
    both carry the same id.)

    Args:
        tracing: the scheduler's tracing (nothing is recorded unless it exports).
        parent: the job's context (its stored traceparent).
        job_id: the job.
        attempt: the lost attempt's number.
        node_id: the node it was on.
        reason: why it counts as lost.
        at: when it was declared lost, Unix seconds.
    """
    if not tracing.exporting or parent is None:
        return
    when = int(at * 1e9)
    span = start_attempt_span(
        tracing.tracer,
        "attempt jobmesh.job",
        parent,
        job_id,
        attempt,
        start_time=when,
        attributes={
            "jobmesh.job_id": job_id,
            "jobmesh.attempt": attempt,
            "jobmesh.node_id": node_id,
            "jobmesh.lost": True,
            "jobmesh.recorded_by": "scheduler",
        },
    )
    span.set_status(trace.Status(trace.StatusCode.ERROR, f"lost: {reason}"))
    span.end(end_time=when)


class AttemptIds(RandomIdGenerator):
    """Random ids, except the span id :func:`start_attempt_span` asks for."""

    def generate_span_id(self) -> int:
        wanted = _WANTED_SPAN_ID.get()
        if wanted:
            _WANTED_SPAN_ID.set(0)  # the attempt span alone, not what it starts below it
            return wanted
        return super().generate_span_id()


class NoLoneQueries(Sampler):
    """The configured sampler, except that a database query outside any span (a
    service's background loop) is dropped rather than made a trace of its own."""

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if attributes and ("db.system" in attributes or "db.system.name" in attributes):
            if not trace.get_current_span(parent_context).get_span_context().is_valid:
                return SamplingResult(Decision.DROP)
        return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"NoLoneQueries{{{self._inner.get_description()}}}"


def carried(headers: Mapping[str, str] | None) -> Context:
    """The carry-only context of a message's headers: its ``traceparent`` as it came, when
    it has the W3C shape, else an empty context."""
    parent = (headers or {}).get("traceparent", "")
    if len(parent) == 55 and parent[2] == "-" and parent[35] == "-" and parent[52] == "-":
        return Carried(parent)
    return otel_context.Context()


def carries_trace(ctx: Context | None) -> bool:
    """Whether ``ctx`` continues a trace (a carried header or a valid span)."""
    if isinstance(ctx, Carried):
        return True
    return ctx is not None and trace.get_current_span(ctx).get_span_context().is_valid


def new_root() -> Context:
    """A context starting a fresh trace, for messages that arrived without one."""
    return Carried(f"00-{random.getrandbits(128) or 1:032x}-{random.getrandbits(64) or 1:016x}-00")


def trace_id_of(headers: Mapping[str, str] | None) -> str:
    """The 32-hex trace id in a ``traceparent`` header, or "" (for tests and the CLI)."""
    parent = (headers or {}).get("traceparent", "")
    parts = parent.split("-")
    return parts[1] if len(parts) == 4 else ""
