"""Service processes kept running as Nomad or compose would keep them: a process that dies
is started again about a second later, with the same settings.

The chaos suite (``jobmesh.dev.chaos``) kills these processes; the supervisor brings them
back and records, per replacement, when it was started and when its own ``/healthz``
(``JOBMESH_OPS_LISTEN``, one port per slot) first answered ok. It starts processes through
``LocalCluster.start_service`` so they run exactly as the tests' and ``jobmesh dev``'s do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from jobmesh.dev.cluster import LocalCluster, ServiceProcess
from jobmesh.dev.servers import free_port

RESTART_DELAY = 1.0  # what a supervisor waits before starting a dead process again


@dataclass
class Start:
    """One start of a slot's process: when, and when its /healthz first said ok.

    Attributes:
        started_at: Unix time the process was spawned.
        healthy_at: Unix time its /healthz first answered 200; None until then.
        pid: the process id.
    """

    started_at: float
    pid: int
    healthy_at: float | None = None


@dataclass
class Slot:
    """One supervised replica: a service, its own settings, its ops port and its starts.

    Attributes:
        name: the service (``executor``, ...).
        tag: names the replica in its log file and in the report (``executor-n2``).
        env: settings of this replica only.
        ops_port: its ``JOBMESH_OPS_LISTEN`` port, the same across restarts.
    """

    name: str
    tag: str
    env: dict[str, str]
    ops_port: int = field(default_factory=free_port)
    current: ServiceProcess | None = None
    starts: list[Start] = field(default_factory=list)
    stopped: bool = False  # SIGSTOPped on purpose: alive, and not to be killed meanwhile
    restart_due: float | None = None

    @property
    def label(self) -> str:
        return f"{self.name}{self.tag}"

    @property
    def pid(self) -> int | None:
        return self.current.proc.pid if self.current is not None else None

    def alive(self) -> bool:
        return self.current is not None and self.current.proc.poll() is None


class Supervisor:
    """Starts every slot, restarts the dead ones after ``restart_delay`` and watches health.

    Args:
        cluster: the cluster whose ``start_service`` spawns the processes (its ``procs``
            list loses each dead process, so ``check_alive`` speaks of the living).
        slots: the replicas to keep running.
        restart_delay: seconds between a death being seen and the new start.
        clock: Unix time (injected so a test can drive it).
    """

    def __init__(
        self,
        cluster: LocalCluster,
        slots: list[Slot],
        restart_delay: float = RESTART_DELAY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.slots = slots
        self.restart_delay = restart_delay
        self.clock = clock
        self.deaths: list[tuple[float, str, int | None]] = []  # (when seen, slot label, exit code)
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    def start_all(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        env = dict(slot.env, JOBMESH_OPS_LISTEN=f"127.0.0.1:{slot.ops_port}")
        slot.current = self.cluster.start_service(slot.name, env, tag=slot.tag)
        slot.starts.append(Start(started_at=self.clock(), pid=slot.current.proc.pid))
        slot.restart_due = None

    async def run(self) -> None:
        """Watch every slot until cancelled: restart the dead, note the first ok /healthz."""
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5))
        try:
            while True:
                now = self.clock()
                for slot in self.slots:
                    await self._tend(slot, now)
                await asyncio.sleep(0.1)  # the supervisor's polling period (a deliberate sleep: noqa)
        finally:
            await self._http.close()

    async def _tend(self, slot: Slot, now: float) -> None:
        if slot.current is not None and slot.current.proc.poll() is not None:
            self.deaths.append((now, slot.label, slot.current.proc.returncode))
            with contextlib.suppress(ValueError):
                self.cluster.procs.remove(slot.current)
            slot.current = None
            slot.restart_due = now + self.restart_delay
        if slot.current is None and slot.restart_due is not None and now >= slot.restart_due:
            if slot.starts and slot.starts[-1].healthy_at is None:
                # It may have died of its port: one found free can be taken before the
                # process binds it. A fresh one costs nothing.
                slot.ops_port = free_port()
            self._spawn(slot)
            return
        last = slot.starts[-1] if slot.starts else None
        if slot.current is not None and last is not None and last.healthy_at is None and not slot.stopped:
            if await self._healthy(slot):
                last.healthy_at = self.clock()

    async def _healthy(self, slot: Slot) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(f"http://127.0.0.1:{slot.ops_port}/healthz") as response:
                return response.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    def start_watching(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="supervisor")

    async def stop_watching(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def kill(self, slot: Slot) -> int | None:
        """SIGKILL the slot's process (the supervisor restarts it). Returns the pid killed."""
        pid = slot.pid
        if pid is not None and slot.alive():
            os.kill(pid, signal.SIGKILL)
            return pid
        return None

    def pause(self, slot: Slot) -> None:
        """SIGSTOP the slot's process: alive to the supervisor, silent to the cluster."""
        assert slot.pid is not None
        slot.stopped = True
        os.kill(slot.pid, signal.SIGSTOP)

    def resume(self, slot: Slot) -> None:
        """SIGCONT a paused slot's process."""
        if slot.pid is not None:
            os.kill(slot.pid, signal.SIGCONT)
        slot.stopped = False

    def start_after(self, slot: Slot, at: float) -> Start | None:
        """The slot's first start after ``at`` (the replacement of a process killed then)."""
        return next((s for s in slot.starts if s.started_at >= at), None)
