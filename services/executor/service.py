"""The executor service: start, register, heartbeat, consume dispatches, drain, stop.

``service_main`` wires the parts together on the shared :class:`~jobmesh.runtime.service.Runtime`:
the node record (:class:`Registration`), the reporter, the attempt register and the
dispatch handler. On SIGTERM the runtime stops pulling and calls :meth:`Executor.stop`,
which gives running attempts the rest of ``drain_seconds``, fails what is left with
``node_drained``, publishes everything still queued and removes the node record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec
import nats.errors
from nats.js.kv import KeyValue

from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec, encode
from jobmesh.contract.messages.v1 import JobBound, NodeInfo
from jobmesh.errors import InvalidSpec, Unavailable
from jobmesh.executor.attempts import Attempts
from jobmesh.executor.handlers import DispatchHandler
from jobmesh.executor.node import build_node_info, read_machine_facts
from jobmesh.executor.reporter import Reporter
from jobmesh.executor.runner import ProcessRunner
from jobmesh.runtime.service import ConsumerSpec, Runtime
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import Tracing

log = logging.getLogger("jobmesh.executor")

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DISPATCH_ACK_WAIT = 30.0
# How often the heartbeat loop looks at whether the runtime began stopping, so the node is
# marked draining within this long of SIGTERM (the runtime has no stop hook before on_stop).
STOP_POLL_SECONDS = 0.2
FINAL_FLUSH_SECONDS = 10.0


def check_settings(settings: Settings) -> None:
    """Refuse timings under which the node record would flap in and out of KV.

    Raises:
        InvalidSpec: when a heartbeat does not come well within the record's TTL.
    """
    if settings.heartbeat_seconds <= 0:
        raise InvalidSpec("JOBMESH_HEARTBEAT_SECONDS must be > 0", field="heartbeat_seconds")
    if settings.heartbeat_seconds * 2 > settings.node_ttl_seconds:
        raise InvalidSpec(
            f"JOBMESH_HEARTBEAT_SECONDS ({settings.heartbeat_seconds:g}) must be at most half of "
            f"JOBMESH_NODE_TTL_SECONDS ({settings.node_ttl_seconds:g}), or one late heartbeat "
            "makes the node vanish",
            field="heartbeat_seconds",
        )


def job_base_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The few variables every job inherits from the executor: PATH and LANG."""
    return {"PATH": environ.get("PATH") or DEFAULT_PATH, "LANG": environ.get("LANG") or "C.UTF-8"}


class Registration:
    """This node's record in KV ``jm_nodes``; a put every heartbeat keeps it alive.

    The bucket's TTL is the node lease: if the puts stop, the record vanishes and the
    binder stops placing work here.

    Args:
        kv: the ``jm_nodes`` bucket.
        info: the node record; ``heartbeat_at`` and ``draining`` are filled in per put.
        interval: seconds between heartbeats.
        clock: epoch seconds.
    """

    def __init__(self, kv: KeyValue, info: NodeInfo, interval: float, clock: Callable[[], float] = time.time) -> None:
        self._kv = kv
        self._info = info
        self._interval = interval
        self._clock = clock
        self._draining = False
        self._failure: str | None = None
        self.beats = 0

    @property
    def node_id(self) -> str:
        return self._info.node_id

    @property
    def draining(self) -> bool:
        return self._draining

    async def register(self) -> None:
        """The first put; the node is not ready until it is visible.

        Raises:
            Unavailable: when the record cannot be written.
        """
        if not await self.beat():
            raise Unavailable(f"cannot register node {self.node_id}: {self._failure}")

    async def beat(self) -> bool:
        """Put the record with a fresh ``heartbeat_at``. Returns False when that failed."""
        info = msgspec.structs.replace(self._info, heartbeat_at=self._clock(), draining=self._draining)
        try:
            # A put slower than a heartbeat interval is as good as failed: the next one is due.
            await asyncio.wait_for(self._kv.put(self.node_id, encode(info)), max(self._interval, 1.0))
        except (TimeoutError, nats.errors.Error) as exc:
            self._failure = f"{type(exc).__name__}: {exc}"
            log.warning("heartbeat of node %s failed: %s", self.node_id, self._failure)
            return False
        self._failure = None
        self.beats += 1
        return True

    async def mark_draining(self) -> None:
        """Advertise that this node takes no new work (binders skip draining nodes)."""
        if not self._draining:
            self._draining = True
            await self.beat()

    async def deregister(self) -> None:
        """Delete the record; if that fails the TTL removes it soon enough."""
        try:
            await asyncio.wait_for(self._kv.delete(self.node_id), 5.0)
        except (TimeoutError, nats.errors.Error) as exc:
            log.warning("could not delete node record %s (it expires with the TTL): %s", self.node_id, exc)

    async def run(self, stop_requested: Callable[[], bool], on_stop_requested: Callable[[], object]) -> None:
        """Heartbeat until cancelled; mark the node draining as soon as a stop begins."""
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self._interval
        while True:
            if not self._draining and stop_requested():
                on_stop_requested()
                await self.mark_draining()
                next_beat = loop.time() + self._interval
            if loop.time() >= next_beat:
                await self.beat()
                next_beat = loop.time() + self._interval
            await asyncio.sleep(max(0.0, min(STOP_POLL_SECONDS, next_beat - loop.time())))

    def problem(self) -> str | None:
        """A health-check problem: the last heartbeat put failed."""
        if self._failure is not None:
            return f"heartbeat of node {self.node_id} failed: {self._failure}"
        return None


class Executor:
    """Everything one executor process runs besides the runtime itself.

    Args:
        rt: the connected runtime.
        info: this node's record (:func:`~jobmesh.executor.node.build_node_info`).
        kv: the ``jm_nodes`` bucket.
        base_env: variables every job inherits (:func:`job_base_env`).
        clock: epoch seconds.
    """

    def __init__(
        self,
        rt: Runtime,
        info: NodeInfo,
        kv: KeyValue,
        base_env: Mapping[str, str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        settings = rt.settings
        self._rt = rt
        self._settings = settings
        self.node_id = info.node_id
        self.work_root = Path(info.work_dir)
        # Room for the Started and the no-op Succeeded of a whole pulled batch in one flush.
        self.reporter = Reporter(rt.publisher, max_batch=max(512, 2 * settings.batch_size), on_crash=self._crashed)
        self.attempts = Attempts(info.node_id, self.work_root, self.reporter, ProcessRunner(base_env), rt.tracer, clock)
        self.handler = DispatchHandler(
            info.node_id, self.attempts, self.reporter, clock, started_timeout=DISPATCH_ACK_WAIT * 2 / 3
        )
        self.registration = Registration(kv, info, settings.heartbeat_seconds, clock)
        self._heartbeat: asyncio.Task | None = None
        self._drain_deadline: float | None = None

    async def start(self) -> None:
        """Prepare the work directory, start publishing, and register the node."""
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.reporter.start()
        await self.registration.register()
        self._heartbeat = asyncio.get_running_loop().create_task(
            self.registration.run(lambda: self._rt.stopping, self._stop_begun), name="executor-heartbeat"
        )
        self._heartbeat.add_done_callback(self._heartbeat_done)
        self._rt.add_health_check(self.registration.problem)
        self._rt.add_health_check(self.reporter.problem)
        log.info("node %s registered (work dir %s)", self.node_id, self.work_root)

    def consumer(self) -> ConsumerSpec:
        """The durable consumer of this node's dispatch subject."""
        return ConsumerSpec(
            stream=subjects.STREAM_DISPATCH,
            durable=subjects.durable("executor", self.node_id),
            filter_subjects=(subjects.node_dispatch(self.node_id),),
            codec=Codec(JobBound, self._settings.max_message_bytes),
            handle=self.handler,
            span_name="process jobmesh.v1.node.*.dispatch",
            ack_wait=DISPATCH_ACK_WAIT,
        )

    async def stop(self) -> None:
        """Drain: mark draining, let attempts finish, fail the rest, flush, deregister."""
        deadline = self._stop_begun()
        await self.registration.mark_draining()
        grace = max(0.0, deadline - asyncio.get_running_loop().time())
        stopped = await self.attempts.drain(grace)
        await self.reporter.close(FINAL_FLUSH_SECONDS)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        await self.registration.deregister()
        log.info(
            "node %s drained: %d attempts stopped, %d messages published in %d flushes",
            self.node_id,
            stopped,
            self.reporter.published,
            self.reporter.flushes,
        )

    def _stop_begun(self) -> float:
        # Attempts get drain_seconds from the moment the stop began, not from on_stop,
        # which the runtime calls only after its own wait for in-flight batches.
        if self._drain_deadline is None:
            self._drain_deadline = asyncio.get_running_loop().time() + self._settings.drain_seconds
        return self._drain_deadline

    def _crashed(self, exc: BaseException) -> None:
        log.error("executor part failed (%s: %s); stopping", type(exc).__name__, exc)
        self._rt.stop()

    def _heartbeat_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("heartbeat loop crashed", exc_info=task.exception())
            self._rt.stop()


async def service_main(settings: Settings, tracing: Tracing) -> None:
    """Run one executor node until SIGTERM/SIGINT, then drain.

    Args:
        settings: the process settings (``Settings.from_env("executor")``).
    """
    # Checked before connecting, so a bad JOBMESH_NODE_LABELS fails at once and clearly.
    check_settings(settings)
    info = build_node_info(settings, read_machine_facts(), time.time())
    rt = Runtime(settings, tracing)
    await rt.connect()
    kv = await rt.js.key_value(subjects.KV_NODES)
    executor = Executor(rt, info, kv, job_base_env(os.environ))
    await executor.start()
    await rt.serve(consumers=[executor.consumer()], on_stop=executor.stop)
