"""The trigger service: API submits, workflow runs, event rules, webhooks, schedules and
completions in; JobSubmitted out.

It keeps live views of ``jm_triggers`` (the rules) and ``jm_handlers`` (to check a handler
job's input), consumes ``JM_EVENTS`` (and ``JM_EXTERNAL`` for subjects the operator allows),
and, while completion rules exist, the job-end events of ``JM_JOBS``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec
from jobmesh.contract.messages.v1 import SubmitRequest
from jobmesh.errors import InvalidMessage, InvalidSpec
from jobmesh.runtime.clusterconfig import ClusterConfig
from jobmesh.runtime.provisioning import ensure_stream, external_stream_config
from jobmesh.runtime.service import BatchHandler, ConsumerSpec, ResponderSpec, Runtime, not_consumed
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import Tracing
from jobmesh.trigger.bursts import Bursts
from jobmesh.trigger.completions import CompletionConsumer, CompletionHandler, completions_spec
from jobmesh.trigger.firing import Firer
from jobmesh.trigger.handlers import JobLookup, SubmitHandler
from jobmesh.trigger.handlerschemas import HandlerSchemas
from jobmesh.trigger.metrics import TriggerMetrics
from jobmesh.trigger.router import Router
from jobmesh.trigger.ruleapi import RuleApi
from jobmesh.trigger.rules import pattern_problem
from jobmesh.trigger.ruleset import RuleSet
from jobmesh.trigger.stats import RuleStats
from jobmesh.trigger.subjectevents import EventCodec, EventHandler
from jobmesh.trigger.ticker import Ticker
from jobmesh.trigger.webhooks import HttpIngress, SecretReader
from jobmesh.trigger.workflowapi import HandlerTypes, WorkflowApi

log = logging.getLogger("jobmesh.trigger.service")


def allowed_subjects(setting: str) -> tuple[tuple[str, ...], ...]:
    """The patterns of ``JOBMESH_TRIGGER_SUBJECTS``, checked.

    Raises:
        InvalidMessage: a pattern is malformed or overlaps jobmesh's own subjects.
    """
    out = []
    for raw in setting.split(","):
        pattern = raw.strip()
        if not pattern:
            continue
        tokens = tuple(pattern.split("."))
        if tokens[0] in ("jobmesh", "$JS", "$KV", "$O", "_INBOX", ">", "*"):
            raise InvalidMessage(
                f"JOBMESH_TRIGGER_SUBJECTS: {pattern!r} overlaps jobmesh's or JetStream's own subjects",
                field="trigger_subjects",
            )
        problem = pattern_problem(pattern)
        if problem:
            raise InvalidMessage(
                f"JOBMESH_TRIGGER_SUBJECTS: {pattern!r} is not a subject pattern: {problem}", field="trigger_subjects"
            )
        out.append(tokens)
    return tuple(out)


async def service_main(settings: Settings, tracing: Tracing) -> None:
    """Connect, serve submits and rules until told to stop, then drain."""
    allowed = allowed_subjects(settings.trigger_subjects)
    rt = Runtime(settings, tracing)
    await rt.connect()
    if rt.provisions:
        await _ensure_external(rt, settings, allowed)
    schemas = HandlerSchemas(rt.js)
    rt.spawn(schemas.run(), "handler-schemas")
    rt.on_reconnect(schemas.restart)
    rules = RuleSet(rt.js, allowed)
    rt.spawn(rules.run(), "rule-view")
    rt.on_reconnect(rules.restart)
    instruments = TriggerMetrics()
    stats = RuleStats(rt.js, settings.instance, instruments)
    rt.spawn(stats.run(), "rule-stats")
    firer = Firer(rt.publisher, settings.partitions, schemas, stats)
    bursts = Bursts(rt.js, firer, stats, rules, dead_letter=rt.dead_letter)
    rt.spawn(bursts.run(), "bursts")
    rt.on_reconnect(bursts.restart)
    router = Router(firer, stats, bursts)
    completions = CompletionConsumer(
        rt, rules, CompletionHandler(rules, router, rt.dead_letter), settings.max_message_bytes
    )
    rt.spawn(completions.run(), "completions")
    ticker = Ticker(rules, router, rt.js, rt.dead_letter)
    rt.spawn(ticker.run(), "schedule-ticker")
    api = RuleApi(
        rt.js,
        allowed,
        stats,
        schemas,
        bursts=bursts,
        ticker=ticker,
        clock=time.time,
        max_bytes=settings.max_message_bytes,
        view=rules,
    )
    jobs = JobLookup(rt.nc)
    # Read only to refuse a job that asks to preempt on a queue that does not allow it.
    config = ClusterConfig(rt.js)
    rt.spawn(config.run(), "config-watch")
    await config.wait_ready()
    submit = SubmitHandler(rt.publisher, settings.partitions, schemas, jobs=jobs, queues=config.queue)
    workflows = WorkflowApi(
        rt.nc,
        rt.js,
        rt.publisher,
        settings.partitions,
        jobs,
        handlers=HandlerTypes(rt.js),
        tracing=tracing,
        clock=time.time,
        max_bytes=settings.max_message_bytes,
    )
    firer.workflows = workflows  # rules that start a workflow start it as the API does
    rt.spawn(workflows.run_sweeper(), "workflow-sweeper")
    secrets = SecretReader(settings.secrets_dir, settings.secrets_env_prefix, os.environ)
    token = None
    if settings.http_submit_token_secret:
        token = secrets(settings.http_submit_token_secret)
        if not token:
            raise InvalidSpec(
                f"JOBMESH_HTTP_SUBMIT_TOKEN_SECRET: secret {settings.http_submit_token_secret!r} not found "
                f"(a file in JOBMESH_SECRETS_DIR, or the variable {settings.secrets_env_prefix}<NAME>)",
                field="http_submit_token_secret",
            )
    ingress = None
    if settings.http_listen:
        ingress = HttpIngress(
            settings.http_listen,
            submit,
            rules,
            router,
            secrets,
            rt.dead_letter,
            token,
            time.time,
            tracing=tracing,
            max_submit_bytes=settings.max_message_bytes,
            drain_seconds=settings.drain_seconds,
            metrics=instruments,
        )
    # Events are matched against the rules as they stand: consuming before the view holds
    # every stored rule would acknowledge events that a rule should have fired for (and an
    # early hook would get 404).
    await rules.ready.wait()
    if ingress is not None:
        await ingress.start()
        log.info("HTTP ingress on %s (port %d)", settings.http_listen, ingress.port)
    await rt.serve(
        consumers=event_consumers(
            settings, allowed, lambda stream: EventHandler(rules, router, rt.dead_letter, stream, time.time)
        ),
        responders=[
            ResponderSpec(
                subjects.API_SUBMIT,
                Codec(SubmitRequest, settings.max_message_bytes),
                submit,
                queue="trigger",
            ),
            *api.responders(),
            *workflows.responders(),
        ],
        on_stop=lambda: _stop(ingress, stats),
    )


async def _stop(ingress: HttpIngress | None, stats: RuleStats) -> None:
    if ingress is not None:
        await ingress.stop()
    await stats.flush()


def event_consumers(
    settings: Settings, allowed: tuple[tuple[str, ...], ...], handler: Callable[[str], BatchHandler]
) -> list[ConsumerSpec]:
    """The durables events are matched from: ``jobmesh.v1.events.>`` on JM_EVENTS, and the
    subjects JOBMESH_TRIGGER_SUBJECTS allows on JM_EXTERNAL.

    Args:
        settings: the process settings.
        allowed: the allowed external patterns, as tokens.
        handler: the batch handler of a stream's consumer.
    """
    sources: list[tuple[str, str, tuple[str, ...]]] = [(subjects.STREAM_EVENTS, "events", (subjects.EVENTS_ALL,))]
    if allowed:
        sources.append((subjects.STREAM_EXTERNAL, "external", tuple(".".join(t) for t in allowed)))
    return [
        ConsumerSpec(
            stream=stream,
            durable=subjects.durable("trigger", purpose),
            filter_subjects=filters,
            codec=EventCodec(settings.max_message_bytes),
            handle=handler(stream),
            span_name=f"process {filters[0]}",
        )
        for stream, purpose, filters in sources
    ]


async def _ensure_external(rt: Runtime, settings: Settings, allowed: tuple[tuple[str, ...], ...]) -> None:
    if allowed:
        # Made with JOBMESH_STREAM_REPLICAS like every stream; a restart adds subjects the
        # setting gained and leaves limits an operator changed by hand alone.
        external = external_stream_config([".".join(t) for t in allowed])
        external.num_replicas = settings.stream_replicas
        await ensure_stream(rt.js, external)


async def provision_main(settings: Settings, tracing: Tracing) -> None:
    """The trigger's part of the one-shot provisioner: the external-events stream (when
    subjects are allowed), the event durables and the completions durable, then exit. (A
    trigger without credentials makes and deletes the completions durable itself as
    completion rules come and go; one with an identity of its own may not, so it is made
    here and stays.)"""
    allowed = allowed_subjects(settings.trigger_subjects)
    rt = Runtime(settings, tracing)
    await rt.connect()
    try:
        await _ensure_external(rt, settings, allowed)
        await rt.ensure_consumers(event_consumers(settings, allowed, lambda _stream: not_consumed))
        await rt.ensure_consumers([completions_spec(settings.max_message_bytes, not_consumed)])
    finally:
        await rt.close()
