"""Completions: a job that ends for good (succeeded, gave up, cancelled, expired) starts others.

The end events carry the finished job's queue, name and metadata labels, so matching a
completion rule needs no lookup. The durable consumer exists only while some completion
rule does: it is created with ``deliver_policy=new`` when the first such rule appears (a
new rule does not fire for jobs that ended before it); pulling stops when the last one
goes, and the durable is deleted 30 s later unless a rule came back meanwhile, and only
when no replica pulls from it. A replica that starts without completion rules deletes a
durable nobody pulls in the same way, so one left by a restart cannot replay old job ends
into a rule added weeks later. A cluster without completion rules pays nothing for them.

Chains are bounded: each job a completion starts carries its depth in the metadata label
``jobmesh.chain_depth`` (1 for a job that a plain job's end started, and so on); past
:data:`MAX_CHAIN_DEPTH` the rule fails for that event instead of firing, so a rule that
triggers on its own jobs' ends cannot loop forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import DeliverPolicy

from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec
from jobmesh.contract.messages.v1 import CompletionSource, JobCancelled, JobExpired, JobGaveUp, JobSucceeded
from jobmesh.errors import Unavailable
from jobmesh.runtime.backoff import backoff
from jobmesh.runtime.outcomes import Reject
from jobmesh.runtime.service import BatchHandler, ConsumerSpec, Envelope, Runtime
from jobmesh.trigger.router import Incoming, Router
from jobmesh.trigger.rules import CompiledRule, event_variables
from jobmesh.trigger.ruleset import RuleSet

log = logging.getLogger("jobmesh.trigger.completions")

JobEnd = JobSucceeded | JobGaveUp | JobCancelled | JobExpired
DEPTH_LABEL = "jobmesh.chain_depth"
MAX_CHAIN_DEPTH = 32
DELETE_GRACE = 30.0  # seconds without completion rules before the durable is deleted
PULL_RENEW_SECONDS = 6.0  # longer than a pull request lives (PullConsumer's expires, 5 s)
DURABLE = subjects.durable("trigger", "completions")


def job_variables(end: Any) -> dict[str, Any]:
    """The ``job`` variable of a finished job: id, outcome, state, queue, name, labels,
    attempt, result, result_ref, result_bytes and error."""
    if isinstance(end, JobSucceeded):
        state, outcome = "succeeded", "succeeded"
    elif isinstance(end, JobGaveUp):
        state, outcome = end.state, "failed"
    elif isinstance(end, JobCancelled):
        state, outcome = "cancelled", "failed"
    else:
        state, outcome = "expired", "failed"
    error: dict[str, str] = {}
    if isinstance(end, JobGaveUp):
        error = {"code": end.error.code, "message": end.error.message}
    elif isinstance(end, (JobCancelled, JobExpired)):
        error = {"code": state, "message": end.reason}
    return {
        "id": end.job_id,
        "outcome": outcome,
        "state": state,
        "queue": end.queue,
        "name": end.name,
        "labels": dict(end.metadata),
        "attempt": getattr(end, "attempt", 0),
        "result": getattr(end, "result", ""),
        "result_ref": getattr(end, "result_ref", ""),
        "result_bytes": getattr(end, "result_bytes", 0),
        "error": error,
        "at": end.at,
    }


def completion_matches(source: CompletionSource, job: dict[str, Any]) -> bool:
    """Whether a finished job (its ``job`` variable) is one ``source`` waits for."""
    if source.outcome != "any" and job["outcome"] != source.outcome:
        return False
    if source.queue and job["queue"] != source.queue:
        return False
    if source.name and job["name"] != source.name:
        return False
    labels = job["labels"]
    return all(labels.get(k) == v for k, v in source.labels.items())


def chain_depth(job: dict[str, Any]) -> int:
    """How deep in a completion chain a finished job was (0: not started by one)."""
    try:
        return max(0, int(job["labels"].get(DEPTH_LABEL, "0")))
    except ValueError:
        return 0


class CompletionHandler:
    """The batch handler of the completions consumer.

    Args:
        rules: the live rule set.
        router: applies rules and submits.
        dead_letter: records an end a rule could not make a job of (``Runtime.dead_letter``).
    """

    def __init__(self, rules: RuleSet, router: Router, dead_letter: Callable[..., Awaitable[bool]]) -> None:
        self._rules = rules
        self._router = router
        self._dead_letter = dead_letter

    async def __call__(self, envelopes: list[Envelope]) -> None:
        rules = self._rules.of_kind("completion")
        items: list[Incoming] = []
        too_deep: list[tuple[Envelope, CompiledRule, int]] = []
        for env in envelopes:
            job = job_variables(env.message)
            matched = [r for r in rules if completion_matches(r.rule.source, job)]  # type: ignore[arg-type]
            if not matched:
                continue
            depth = chain_depth(job) + 1
            if depth > MAX_CHAIN_DEPTH:
                too_deep.extend((env, r, depth) for r in matched)
                continue
            variables = event_variables(env.subject, job, {}, f"end:{end_id(env.message)}", job["at"])
            variables["job"] = job
            items.append(
                Incoming(
                    "completion",
                    variables,
                    f"end:{end_id(env.message)}",
                    env.subject,
                    matched,
                    env.context,
                    depth=depth,
                    metadata={DEPTH_LABEL: str(depth)},
                    extra=env,
                )
            )
        failures: list[tuple[Envelope, str, str, str]] = []
        for env, rule, depth in too_deep:
            reason = (
                f"rule {rule.name}: a completion chain may be at most {MAX_CHAIN_DEPTH} jobs deep (this is {depth})"
            )
            failures.append((env, rule.name, "chain_too_deep", reason))
        if items:
            routed = await self._router.route(items)
            for failure in routed.failures:
                reason = f"rule {failure.rule.name} v{failure.rule.version}: {failure.error}"
                failures.append((failure.incoming.extra, failure.rule.name, failure.error.code, reason))
        for env, rule_name, code, reason in failures:
            if not await self._dead_letter(
                env.subject, env.data, Reject(code, reason), 1, env.stream_seq, rule=rule_name
            ):
                raise Unavailable("cannot record a dead letter for a finished job a rule refused")


def end_id(end: Any) -> str:
    """A job ends for good once: its id names the end."""
    return str(end.job_id)


def completions_spec(max_bytes: int, handler: BatchHandler) -> ConsumerSpec:
    """The completions durable: every job's end, from those that come after it is made."""
    return ConsumerSpec(
        stream=subjects.STREAM_JOBS,
        durable=DURABLE,
        filter_subjects=tuple(subjects.job_events("*", subjects.JOB_END_KINDS)),
        codec=Codec(JobEnd, max_bytes),
        handle=handler,
        span_name="process jobmesh.v1.job.end",
        deliver_policy=DeliverPolicy.NEW,
    )


class CompletionConsumer:
    """Keeps the completions consumer in step with the rules: present while a completion
    rule exists, gone when none does.

    Args:
        rt: the service runtime (adds and removes the consumer).
        rules: the live rule set.
        handler: the batch handler.
        max_bytes: the largest end event accepted.
        delete_grace: seconds without completion rules before an idle durable is deleted.
        pull_renew: seconds between the two looks for pullers (longer than a pull request lives).
    """

    def __init__(
        self,
        rt: Runtime,
        rules: RuleSet,
        handler: CompletionHandler,
        max_bytes: int,
        delete_grace: float = DELETE_GRACE,
        pull_renew: float = PULL_RENEW_SECONDS,
    ) -> None:
        self._delete_grace = delete_grace
        self._pull_renew = pull_renew
        self._rt = rt
        self._rules = rules
        self._handler = handler
        self._max_bytes = max_bytes
        # With an identity of its own the trigger may not make or delete the durable: the
        # provisioner made it, and it is consumed whether completion rules exist or not.
        self._permanent = not rt.provisions
        self._running = False
        self._deleting: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        rules.on_change(self._wake.set)

    def spec(self) -> ConsumerSpec:
        return completions_spec(self._max_bytes, self._handler)

    async def run(self) -> None:
        """Follow the rule set forever (a background task)."""
        await self._rules.ready.wait()
        self._wake.set()
        # Also at start without completion rules: a durable left by replicas that stopped
        # during the grace (or ran with rules since removed) is deleted once nobody pulls it.
        self._idle_check()
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._follow()
                failures = 0
            except (TimeoutError, nats.errors.Error, Unavailable) as exc:
                # NATS away for a moment (or the durable not provisioned yet): the consumer is
                # created (or stopped) when it is back.
                failures += 1
                delay = backoff(failures, base=0.5, cap=10.0)
                log.warning("completions consumer: %s: %s; again in %.1fs", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                self._wake.set()

    async def _follow(self) -> None:
        """Start or stop pulling as the rules now ask."""
        wanted = self._permanent or bool(self._rules.of_kind("completion"))
        if wanted and not self._running:
            await self._rt.add_consumer(self.spec())
            self._running = True
            log.info("completion rules exist: consuming job ends")
        elif not wanted and self._running:
            await self._rt.remove_consumer(DURABLE)
            self._running = False
            log.info("no completion rules: stopped consuming job ends")
            self._idle_check()

    def _idle_check(self) -> None:
        """(Re)start the one timer that deletes the durable when it is idle."""
        if self._permanent:
            return
        if self._deleting is not None:
            self._deleting.cancel()
        self._deleting = self._rt.spawn(self._delete_when_idle(), "completions-idle")

    async def _delete_when_idle(self) -> None:
        """Delete the durable after DELETE_GRACE without completion rules here, and only when
        no replica pulls from it (two looks, a pull request's lifetime apart).

        Never at once: a replica whose view of the rules is a moment ahead may be pulling
        from it for a new rule, and deleting it then would lose the job ends in between. A
        rule added within the grace resumes the durable where it stopped."""
        await asyncio.sleep(self._delete_grace)  # a grace, not a wait for an event (a deliberate sleep: noqa)
        for look in range(2):
            if self._rules.of_kind("completion") or self._running:
                return
            try:
                info = await self._rt.js.consumer_info(subjects.STREAM_JOBS, DURABLE)
            except nats.js.errors.NotFoundError:
                return
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("completions consumer: cannot look whether it is idle (%s); keeping it", exc)
                return
            if info.num_waiting:
                return  # another replica pulls: it has a completion rule this view lacks
            if look == 0:
                # A puller renews its requests at least this often (runtime/pull.py).
                await asyncio.sleep(self._pull_renew)  # (a deliberate sleep: noqa)
        if not self._rules.of_kind("completion") and not self._running:
            await self._delete()
            log.info("deleted the idle completions consumer")

    async def _delete(self) -> None:
        try:
            await self._rt.js.delete_consumer(subjects.STREAM_JOBS, DURABLE)
        except nats.js.errors.NotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - the next change tries again; it only costs storage
            log.warning("could not delete the completions consumer: %s", exc)
