"""The executor service: probe, start, register, heartbeat, consume dispatches, drain, stop.

``service_main`` probes the node first (:func:`~jobmesh.executor.isolation.probe.probe_node`:
the isolation level it advertises and enforces; :func:`~jobmesh.executor.gpus.probe_gpus`;
:func:`~jobmesh.executor.containers.probe_engine`), starts the handler pool when handler
modules are configured (its handlers' records go into KV ``jm_handlers``), and wires the
parts together on the shared :class:`~jobmesh.runtime.service.Runtime`: the runner of each
runtime kind, the node record (:class:`~jobmesh.executor.registration.Registration`) and the
leases it renews, the reporter, the attempt register and the dispatch handler. The record
says what the probes found (``NodeInfo.isolation``, ``network``, ``probe``, ``runtimes``,
``handlers``, ``gpu_devices``). At start the executor
reads the record an earlier process of this node left and reports its attempts lost
(:mod:`jobmesh.executor.restart`) before its own first put. On SIGTERM the runtime stops
pulling and calls :meth:`Executor.stop`, which keeps heartbeating while running attempts
get the rest of ``drain_seconds``, fails what is left with ``node_drained``, publishes
everything still queued, stops the handler pool and removes the node record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import msgspec
from nats.js.kv import KeyValue

from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec
from jobmesh.contract.ids import attempt_key
from jobmesh.contract.messages.v1 import HandlerInfo, NodeInfo
from jobmesh.errors import InvalidSpec
from jobmesh.executor.attempts import Attempts, AttemptSetup, Runners, attempt_name
from jobmesh.executor.containers import ContainerRunner, probe_engine
from jobmesh.executor.followups import Followups
from jobmesh.executor.gpus import gpu_device_nodes, probe_gpus
from jobmesh.executor.handlerpool import HandlerLoadError, HandlerPool
from jobmesh.executor.handlers import DISPATCH_MESSAGES, DispatchHandler
from jobmesh.executor.inputs import parse_allowed_roots
from jobmesh.executor.isolation.environment import allowed_environment
from jobmesh.executor.isolation.probe import NodeIsolation, probe_node, unreachable_parent
from jobmesh.executor.isolation.workers import isolated_spawn
from jobmesh.executor.leases import LeaseBook
from jobmesh.executor.metrics import ExecutorMetrics
from jobmesh.executor.node import build_node_info, node_work_dir, read_machine_facts, resolve_node_id
from jobmesh.executor.registration import Registration
from jobmesh.executor.reporter import Reporter
from jobmesh.executor.restart import kill_leftovers, left_behind, orphaned_attempts, remove_leftovers, reports_of
from jobmesh.executor.results import ObjectPut, ResultLimits, ResultStore
from jobmesh.executor.runner import ProcessRunner
from jobmesh.executor.runrequest import Runner
from jobmesh.executor.secrets import SecretSource
from jobmesh.runtime.service import BatchHandler, ConsumerSpec, Runtime, not_consumed
from jobmesh.runtime.settings import Settings
from jobmesh.runtime.tracing import Tracing

log = logging.getLogger("jobmesh.executor")

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DISPATCH_ACK_WAIT = 30.0
FINAL_FLUSH_SECONDS = 10.0
# How long a starting executor waits for its reports of the previous one's attempts to be
# durable before its first record (which then lists them as ended).
TAKEOVER_REPORT_SECONDS = 10.0
# How long the old attempts stay listed as running when those reports took longer.
LATE_REPORT_SECONDS = 60.0


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


class Executor:
    """Everything one executor process runs besides the runtime itself.

    Args:
        rt: the connected runtime.
        info: this node's record (:func:`~jobmesh.executor.node.build_node_info`); its
            ``incarnation`` is set here, fresh for every process.
        kv: the ``jm_nodes`` bucket.
        base_env: variables every job inherits (the allow-list, :func:`allowed_environment`).
        results: the ``jm_results`` object store (None: result files are ignored).
        clock: epoch seconds.
        setup: the runners of the runtime kinds besides processes, the node's isolation,
            secrets and uploads (None: processes only, unisolated).
        pool: the handler pool (stopped after the drain), if the node runs one.
    """

    def __init__(
        self,
        rt: Runtime,
        info: NodeInfo,
        kv: KeyValue,
        base_env: Mapping[str, str],
        results: ObjectPut | None = None,
        clock: Callable[[], float] = time.time,
        *,
        setup: AttemptSetup | None = None,
        pool: HandlerPool | None = None,
    ) -> None:
        settings = rt.settings
        self._rt = rt
        self._settings = settings
        self._clock = clock
        info = msgspec.structs.replace(info, incarnation=uuid.uuid4().hex)
        self.node_id = info.node_id
        self.incarnation = info.incarnation
        self.work_root = Path(info.work_dir)
        self.leases = LeaseBook()
        # Room for the Started and the no-op Succeeded of a whole pulled batch in one flush.
        self.metrics = ExecutorMetrics()
        self.reporter = Reporter(
            rt.publisher,
            max_batch=max(512, 2 * settings.batch_size),
            on_crash=self._crashed,
            reconnects=rt.reconnects,
            on_durable=self.metrics.reported,
        )
        limits = ResultLimits(settings.result_inline_bytes, settings.result_max_bytes)
        isolation = setup.isolation if setup is not None else None
        process = ProcessRunner(
            base_env, kill_grace=settings.kill_grace_seconds, isolation=isolation, device_nodes=gpu_device_nodes
        )
        runners: Runners = {**(setup.runners if setup is not None else {}), "process": process}
        self.isolation = isolation
        self.pool = pool
        self.attempts = Attempts(
            info.node_id,
            self.work_root,
            self.reporter,
            runners,
            rt.tracer,
            leases=self.leases,
            results=ResultStore(results, limits) if results is not None else None,
            clock=clock,
            setup=setup if setup is not None else AttemptSetup(runners, base_env),
        )
        self.registration = Registration(kv, info, self.leases, settings.heartbeat_seconds, clock)
        self.attempts.record_put = self.registration.put_soon
        self.handler = DispatchHandler(
            info.node_id,
            self.attempts,
            self.reporter,
            self.registration,
            clock,
            started_timeout=DISPATCH_ACK_WAIT * 2 / 3,
            incarnation=self.incarnation,
            metrics=self.metrics,
        )
        self.metrics.observe_running(info.node_id, lambda: self.attempts.running)
        self._heartbeat: asyncio.Task | None = None
        self._handover: asyncio.Task | None = None  # clearing the previous process's directories
        self._drain_deadline: float | None = None

    async def start(self) -> None:
        """Prepare the work directory, start publishing, take over from an earlier process
        of this node, and register the node."""
        self.work_root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # Jobs pass through to their own directory, but cannot list the others' names.
            self.work_root.chmod(0o711)
        self.reporter.start()
        handover = await self._take_over()
        try:
            await self.registration.register()
        except BaseException:
            if handover is not None:
                handover.close()  # the directories stay for the next start
            raise
        if handover is not None:
            self._handover = asyncio.get_running_loop().create_task(handover, name="executor-handover")
            self._handover.add_done_callback(_log_failure)
        self._heartbeat = asyncio.get_running_loop().create_task(
            self.registration.run(lambda: self._rt.stopping, self._stop_begun), name="executor-heartbeat"
        )
        self._heartbeat.add_done_callback(self._heartbeat_done)
        self._rt.add_health_check(self.registration.problem)
        self._rt.add_health_check(self.reporter.problem)
        log.info("node %s registered (incarnation %s, work dir %s)", self.node_id, self.incarnation, self.work_root)

    async def _take_over(self) -> Coroutine[Any, Any, None] | None:
        """Before the first put: report what became of the attempts an earlier process of this
        node ran, as its record lists them or, once that record expired, as their lease files
        do: the terminal event an attempt kept, else its loss.

        Returns:
            What is left to do once this process is registered (None: nothing): removing
            the old attempts' directories, which must outlast the reports' way into a record.
        """
        previous = await self.registration.read_previous()
        orphans = orphaned_attempts(previous, self.incarnation)
        ended = list(previous.ended) if previous is not None else []
        accounted = {attempt_key(o.job_id, o.attempt) for o in orphans} | set(ended)
        behind, stray = await asyncio.to_thread(left_behind, self.work_root, accounted)
        lost = [*orphans, *behind]
        lost_keys = [attempt_key(o.job_id, o.attempt) for o in lost]
        self.attempts.adopt_previous(lost_keys, ended)
        # What the old process had finished stays listed as ended: a scheduler that has not
        # consumed its terminal event yet must not take the new incarnation's silence about
        # it for a loss.
        now = self._clock()
        for key in ended:
            self.leases.end(key, now)
        if not lost and not stray:
            return None
        # Read before anything goes: an attempt that ended kept its terminal event.
        reports, kept = await asyncio.to_thread(reports_of, self.work_root, lost, self.node_id, now)
        for orphan, where in [(o, "its record") for o in orphans] + [(b, "its lease file") for b in behind]:
            log.warning(
                "%s was running in the previous executor of node %s (as %s says): reporting what became of it",
                attempt_name(orphan.job_id, orphan.attempt),
                self.node_id,
                where,
            )
        if kept:
            log.info("%d of them had ended: publishing the terminal events they kept", kept)
        # What the old processes left running goes first: "not running any more" must be true
        # before the attempt is retried elsewhere. Their directories stay for now: a process
        # killed before its reports are recorded leaves the next one the same kept outcomes.
        workdirs = sorted({self.work_root / f"{o.job_id}-{o.attempt}" for o in orphans} | set(stray))
        await asyncio.to_thread(kill_leftovers, workdirs, remove=False)
        if not reports:
            return self._clear(workdirs, None)
        # Durable before the first record, when the wait allows: that record then lists them
        # as ended, so the executor after this one neither reports them again nor runs a
        # dispatch of theirs. Bounded: the scheduler also takes a new incarnation's record
        # that omits an attempt for its loss, and the handover finishes it later.
        durable = self.reporter.emit(reports)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(durable), TAKEOVER_REPORT_SECONDS)
        if durable.done():
            done = self._clock()
            for key in lost_keys:
                self.leases.end(key, done)
            return self._clear(workdirs, None)
        log.warning(
            "the reports of %d attempts of the previous executor are not durable after %.0fs; registering anyway",
            len(reports),
            TAKEOVER_REPORT_SECONDS,
        )
        # Listed as running meanwhile: a record of a new incarnation that omits them would
        # make the scheduler declare them lost at once, racing a kept end it has not read.
        for lease in lost:
            self.leases.add(lease.job_id, lease.attempt, lease.partition, lease.started_at, lease.checkpoint)
        return self._clear(workdirs, (durable, lost_keys))

    async def _clear(self, workdirs: list[Path], late: tuple[asyncio.Future[None], list[str]] | None) -> None:
        """After registering: once the reports of the old attempts are durable (``late``: not
        yet at registration) and a record listing them as ended is, remove their directories."""
        if late is not None:
            durable, keys = late
            try:
                await asyncio.wait_for(asyncio.shield(durable), LATE_REPORT_SECONDS)
            except TimeoutError:
                # Not listed for ever: the scheduler then takes their absence for a loss.
                log.error("the reports of %d attempts of the previous executor are still not durable", len(keys))
                for key in keys:
                    self.leases.drop(key)
                return  # their directories stay for the next start
            done = self._clock()
            for key in keys:
                self.leases.end(key, done)
            await self.registration.put_soon()
        await asyncio.to_thread(remove_leftovers, workdirs)

    def consumer(self) -> ConsumerSpec:
        """The durable consumer of this node's dispatch and cancel subjects."""
        return dispatch_consumer(self._settings, self.node_id, self.handler)

    async def stop(self) -> None:
        """Drain: mark draining, keep the leases alive while attempts finish, fail the rest,
        flush, deregister."""
        deadline = self._stop_begun()
        await self.registration.mark_draining()
        grace = max(0.0, deadline - asyncio.get_running_loop().time())
        log.info("node %s draining: %d attempts running, %.1fs to finish", self.node_id, self.attempts.running, grace)
        stopped = await self.attempts.drain(grace)
        if self.pool is not None:
            await self.pool.stop()
        await self.reporter.close(FINAL_FLUSH_SECONDS)
        if self._handover is not None:
            self._handover.cancel()  # its directories stay for the next start
            await asyncio.gather(self._handover, return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        await self.registration.deregister()
        if self.isolation is not None and self.isolation.cgroups is not None:
            self.isolation.cgroups.close()
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


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("clearing what the previous executor left failed", exc_info=task.exception())


def check_work_dir(isolation: NodeIsolation, work_root: Path) -> None:
    """Refuse a work directory that the uid jobs run as cannot reach at the process level.

    Raises:
        InvalidSpec: naming JOBMESH_WORK_DIR and the directory in the way.
    """
    if isolation.level != "process" or isolation.uid is None or isolation.gid is None:
        return  # a sandbox makes its own path to the work directory
    blocked = unreachable_parent(work_root, isolation.uid, isolation.gid)
    if blocked is not None:
        raise InvalidSpec(
            f"JOBMESH_WORK_DIR: jobs run as uid {isolation.uid} at the process level, and {blocked} "
            f"(mode {blocked.stat().st_mode & 0o777:o}) keeps them out of {work_root}; use a work directory "
            "whose parents others may search (mode o+x)",
            field="work_dir",
        )


async def start_pool(
    settings: Settings, isolation: NodeIsolation, rt: Runtime, kv_handlers: KeyValue
) -> tuple[HandlerPool | None, list[HandlerInfo]]:
    """Start the handler pool of ``JOBMESH_HANDLER_MODULES`` inside the node's isolation and
    record its handlers in KV ``jm_handlers``.

    Returns:
        The pool (None when no modules are configured) and its handlers.

    Raises:
        InvalidSpec: naming JOBMESH_HANDLER_MODULES when a module does not load.
    """
    modules = [m.strip() for m in settings.handler_modules.split(",") if m.strip()]
    if not modules:
        return None, []
    pool = HandlerPool(
        modules,
        settings.handler_workers,
        spawn=isolated_spawn(isolation, settings.handler_worker_memory_mb, modules),
        submit=Followups(rt.nc),
        kill_grace=settings.kill_grace_seconds,
    )
    try:
        infos = await pool.start()
    except HandlerLoadError as exc:
        raise InvalidSpec(f"JOBMESH_HANDLER_MODULES: {exc}", field="handler_modules") from exc
    for info in infos:
        await kv_handlers.put(info.name, msgspec.json.encode(info))
    return pool, infos


async def service_main(settings: Settings, tracing: Tracing) -> None:
    """Run one executor node until SIGTERM/SIGINT, then drain.

    Args:
        settings: the process settings (``Settings.from_env("executor")``).
    """
    # Checked before connecting, so a bad JOBMESH_NODE_LABELS fails at once and clearly.
    check_settings(settings)
    # First of all: it takes the JOBMESH_SECRET_* variables out of os.environ, so no
    # program started from here on (the probes included) inherits the node's secrets.
    secrets_dir = Path(settings.secrets_dir) if settings.secrets_dir else None
    secrets = SecretSource(secrets_dir, settings.secrets_env_prefix, os.environ)
    facts = read_machine_facts()
    node_id = resolve_node_id(settings, facts)
    try:
        allowed_roots = parse_allowed_roots(settings.allowed_input_paths)
    except ValueError as exc:
        raise InvalidSpec(str(exc), field="allowed_input_paths") from exc
    engine = await asyncio.to_thread(probe_engine, settings.container_engine, settings.container_probe_image)
    isolation = await asyncio.to_thread(probe_node, settings, node_id, engine.engine is not None, engine.detail)
    check_work_dir(isolation, node_work_dir(settings, node_id))
    gpus = await asyncio.to_thread(probe_gpus, settings.node_gpu, settings.node_gpu_kind)
    rt = Runtime(settings, tracing)
    await rt.connect()
    kv = await rt.js.key_value(subjects.KV_NODES)
    results = await rt.js.object_store(subjects.OBJ_RESULTS)
    uploads = await rt.js.object_store(subjects.OBJ_UPLOADS)
    runners: dict[str, Runner] = {}
    runtimes = ["process", "noop"]
    if engine.engine is not None:
        runners["container"] = ContainerRunner(
            engine.engine,
            uid=isolation.uid,
            gid=isolation.gid,
            pids_max=settings.attempt_pids_max,
            kill_grace=settings.kill_grace_seconds,
        )
        runtimes.append("container")
    pool, handlers = await start_pool(settings, isolation, rt, await rt.js.key_value(subjects.KV_HANDLERS))
    if pool is not None:
        runners["handler"] = pool
        runtimes.append("handler")
    probe = {**isolation.probe, "gpu": gpus.detail}
    if pool is not None:
        probe["handlers"] = f"{settings.handler_workers} workers: {', '.join(h.name for h in handlers) or 'none'}"
    info = build_node_info(
        settings,
        facts,
        time.time(),
        isolation=isolation.level,
        probe=probe,
        runtimes=runtimes,
        handlers=[h.name for h in handlers],
        gpu_devices=gpus.devices,
    )
    setup = AttemptSetup(
        runners,
        allowed_environment(os.environ, settings.env_allow),
        isolation,
        secrets,
        uploads,
        allowed_roots,
        gpu_node=info.gpu > 0,
    )
    executor = Executor(rt, info, kv, setup.base_env, results, setup=setup, pool=pool)
    await executor.start()
    await rt.serve(consumers=[executor.consumer()], on_stop=executor.stop)


def dispatch_consumer(settings: Settings, node_id: str, handler: BatchHandler) -> ConsumerSpec:
    """The durable consumer of one node's dispatch and cancel subjects."""
    return ConsumerSpec(
        stream=subjects.STREAM_DISPATCH,
        durable=subjects.durable("executor", node_id),
        filter_subjects=(subjects.node_dispatch(node_id), subjects.node_cancel(node_id)),
        codec=Codec(DISPATCH_MESSAGES, settings.max_message_bytes),
        handle=handler,
        span_name="process jobmesh.v1.node.*.dispatch",
        ack_wait=DISPATCH_ACK_WAIT,
    )


async def provision_main(settings: Settings, tracing: Tracing) -> None:
    """A node's part of the one-shot provisioner (``jobmesh provision --node <id>``): its
    dispatch durable, which an executor with its own NATS identity may read but not make.

    Raises:
        InvalidSpec: JOBMESH_NODE_ID is not set (the durable is that node's).
    """
    if not settings.node_id:
        raise InvalidSpec("JOBMESH_NODE_ID: provisioning an executor needs the node's id", field="node_id")
    rt = Runtime(settings, tracing)
    await rt.connect()
    try:
        await rt.ensure_consumers([dispatch_consumer(settings, settings.node_id, not_consumed)])
    finally:
        await rt.close()
