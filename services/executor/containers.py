"""The container runtime: which engine the node has, the ``run`` command of an attempt, and its runner.

At start the executor looks for an engine that can really run a container
(:func:`probe_engine`: ``podman`` then ``docker`` under ``auto``, each asked to run
``<engine> run --rm --network none <probe image> true``); only then does the node offer
the ``container`` runtime. :func:`container_argv` builds the ``run`` command of one attempt
with the same limits a process gets (memory, cpu, pids, an unprivileged user, no
capabilities, no network unless asked), its working directory at ``/work``, its secrets at
``/run/secrets`` and its GPUs' device files. :class:`ContainerRunner` runs that command as
a subprocess (a :class:`~jobmesh.executor.runrequest.Runner`).

Exit statuses 125, 126 and 127 are the engine's own (it could not create or start the
container, or the command cannot be run or found) and fail the attempt with code
``container_failed``; a command of the image that itself exits with one of them is reported
the same way, which docker and podman do not let a caller tell apart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobmesh.contract.messages.v1 import ContainerRuntime, JobError
from jobmesh.contract.messages.v1.jobs import FailureCode
from jobmesh.executor.childprocess import READ_CHUNK, start_piped
from jobmesh.executor.gpus import gpu_device_nodes
from jobmesh.executor.outcomes import TIMEOUT, Outcome, exit_outcome, failed_outcome
from jobmesh.executor.runner import MAX_LINE_BYTES, LineSink, OutputStream, OutputTail
from jobmesh.executor.runrequest import RunRequest

log = logging.getLogger("jobmesh.executor.containers")

CONTAINER_FAILED: FailureCode = "container_failed"
ENGINES = ("podman", "docker")  # what ``auto`` tries, in this order
AUTO = "auto"
PROBE_TIMEOUT = 60.0  # seconds: the first probe may pull the (small) probe image
ENGINE_COMMAND_TIMEOUT = 15.0  # seconds for ``kill`` / ``rm -f``
ENGINE_STATUSES = {
    125: "the container engine failed",
    126: "the container's command cannot be invoked",
    127: "the container's command was not found",
}
WORKDIR = "/work"  # where the attempt's working directory is inside the container
SECRETS = "/run/secrets"
# Variables that mean something only on the node: an image has its own PATH, and the
# progress pipe's descriptor does not reach into a container.
HOST_ONLY_VARS = ("PATH", "JOBMESH_PROGRESS_FD")
CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"
# What the engine client reads of its environment: PATH (the OCI runtime, conmon, helpers
# such as slirp4netns or newuidmap), HOME and XDG_* (rootless podman's storage, its
# configuration, the socket in XDG_RUNTIME_DIR), DBUS_SESSION_BUS_ADDRESS (rootless podman's
# systemd cgroup manager), the locale, TMPDIR, the proxies a podman pull goes through, and
# SSH_AUTH_SOCK (an engine reached over ssh).
ENGINE_VARS = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LC_ALL",
        "TMPDIR",
        "XDG_RUNTIME_DIR",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_CACHE_HOME",
        "DBUS_SESSION_BUS_ADDRESS",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "REGISTRY_AUTH_FILE",
        "STORAGE_DRIVER",
        "STORAGE_OPTS",
        "SSH_AUTH_SOCK",
    }
)
# Which engine and how to reach it: CONTAINER_HOST/CONTAINER_CONNECTION/CONTAINER_SSHKEY
# (podman remote), CONTAINERS_CONF/CONTAINERS_STORAGE_CONF/CONTAINERS_REGISTRIES_CONF
# (podman's configuration), DOCKER_HOST/DOCKER_CONFIG/DOCKER_CONTEXT/DOCKER_TLS_VERIFY/
# DOCKER_CERT_PATH (docker's), PODMAN_* (podman's own switches).
ENGINE_PREFIXES = ("CONTAINER_", "CONTAINERS_", "DOCKER_", "PODMAN_")

Which = Callable[[str], str | None]
Run = Callable[..., "subprocess.CompletedProcess[Any]"]


@dataclass(frozen=True, slots=True)
class EngineProbe:
    """What the container probe found.

    Attributes:
        engine: the engine program to run (a path), None when the node has no working one.
        detail: which engine ran the probe image, or why none did (``NodeInfo.probe["container"]``).
    """

    engine: str | None
    detail: str


def probe_engine(
    setting: str, image: str, which: Which = shutil.which, run: Run = subprocess.run, timeout: float = PROBE_TIMEOUT
) -> EngineProbe:
    """Find a container engine that can run a container here.

    Args:
        setting: ``settings.container_engine``: ``auto`` tries podman, then docker; ""
            turns containers off; anything else is the one engine to try (a name on PATH
            or a path).
        image: the probe image (``settings.container_probe_image``), run with ``true``.
        which: finds a program on PATH (``shutil.which``).
        run: runs a program (``subprocess.run``'s signature).
        timeout: seconds each probe container may take (an image pull included).

    Returns:
        The first engine whose probe container ran and exited 0, else no engine and every
        engine's reason (not found, the exit status and the first line of its error, or
        that it did not finish in time).
    """
    if not setting:
        return EngineProbe(None, "off (JOBMESH_CONTAINER_ENGINE is empty)")
    candidates = ENGINES if setting == AUTO else (setting,)
    reasons: list[str] = []
    for candidate in candidates:
        path = which(candidate)
        if path is None:
            reasons.append(f"{candidate}: not found on PATH")
            continue
        argv = [path, "run", "--rm", "--network", "none", image, "true"]
        try:
            done = run(
                argv, capture_output=True, text=True, timeout=timeout, check=False, env=engine_environment(os.environ)
            )
        except subprocess.TimeoutExpired:
            reasons.append(f"{candidate}: `{candidate} run --rm {image} true` did not finish within {timeout:g}s")
            continue
        except OSError as exc:
            reasons.append(f"{candidate}: cannot run {path}: {exc.strerror or exc}")
            continue
        if done.returncode == 0:
            return EngineProbe(path, f"{candidate} ({path}): ran {image}")
        said = _first_line(done.stderr) or _first_line(done.stdout) or "no output"
        reasons.append(f"{candidate}: `{candidate} run --rm {image} true` exited with code {done.returncode}: {said}")
    return EngineProbe(None, "unavailable: " + "; ".join(reasons))


def container_name(job_id: str, attempt: int) -> str:
    """The container's name, ``jm-<job>-<attempt>`` (job ids hold only ``[A-Za-z0-9_-]``).

    Args:
        job_id: the job.
        attempt: the attempt number.

    Returns:
        The name, unique per attempt, so a stale one can be killed by name.
    """
    return f"jm-{job_id}-{attempt}"


def container_argv(
    engine: str,
    request: RunRequest,
    *,
    uid: int | None,
    gid: int | None,
    pids_max: int,
    name: str,
    dev: Path = Path("/dev"),
    env_file: Path | None = None,
) -> list[str]:
    """The engine command that runs one attempt's container.

    ``<engine> run --rm --name <name> --network none|bridge --memory <m>m --cpus <c>
    --pids-limit <n> --user uid:gid --cap-drop ALL --security-opt no-new-privileges
    -v <workdir>:/work -w /work [-v <secrets>:/run/secrets:ro] [-i] --env K=V...
    [--device /dev/nvidia<i> ...] <image> [argv...]``.

    The environment is :func:`container_env`. With ``env_file`` its single-line variables
    go in through ``--env-file <env_file>`` (the caller writes it with
    :func:`write_env_file`), so that no value, a secret's included, shows in the node's
    process list. A value holding a line break (which an env file cannot carry) would go as
    ``--env K=V``; :meth:`ContainerRunner.run` refuses such a variable before it gets here,
    and the trigger refuses one in a container job's spec.

    Args:
        engine: the engine program (:attr:`EngineProbe.engine`).
        request: the attempt; ``request.runtime`` is a ``ContainerRuntime``.
        uid: the user the container runs as (None: the image's own user).
        gid: its group (None: the user's).
        pids_max: the container's process limit (``settings.attempt_pids_max``).
        name: the container's name (:func:`container_name`).
        dev: the device directory GPU device files are looked up in (a test passes its own).
        env_file: where the variables are written for ``--env-file``; None: all inline.

    Returns:
        The argv, engine first.

    Raises:
        TypeError: when the request's runtime is not a container runtime.
        ValueError: when a variable's name cannot be one (:func:`env_key_problem`).
    """
    runtime = request.runtime
    if not isinstance(runtime, ContainerRuntime):
        raise TypeError(f"container_argv needs a ContainerRuntime, got {type(runtime).__name__}")
    res = request.resources
    argv = [engine, "run", "--rm", "--name", name, "--network", "bridge" if request.network else "none"]
    if res.memory_mb:
        argv += ["--memory", f"{res.memory_mb}m"]
    if res.cpu_milli:
        argv += ["--cpus", f"{res.cpu_milli / 1000:g}"]
    argv += ["--pids-limit", str(pids_max)]
    if uid is not None:
        argv += ["--user", f"{uid}:{gid if gid is not None else uid}"]
    argv += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    argv += ["-v", f"{request.workdir}:{WORKDIR}", "-w", WORKDIR]
    if request.secrets_dir is not None:
        argv += ["-v", f"{request.secrets_dir}:{SECRETS}:ro"]
    if request.stdin is not None:
        argv.append("-i")
    env = container_env(request, runtime)
    if env_file is not None:
        argv += ["--env-file", str(env_file)]
        env = split_env(env)[1]
    for key, value in env.items():
        problem = env_key_problem(key)
        if problem:
            raise ValueError(problem)
        argv += ["--env", f"{key}={value}"]
    for node in gpu_device_nodes(request.gpu_devices, dev):
        argv += ["--device", node]
    argv.append(runtime.image)
    argv += runtime.argv
    return argv


def container_env(request: RunRequest, runtime: ContainerRuntime) -> dict[str, str]:
    """The container's environment: the request's, with node paths made container paths.

    A value naming the working directory (or a file in it) names ``/work`` instead, one
    naming the secrets directory ``/run/secrets``. PATH goes only when the job set it
    itself (the image's own PATH is what its programs need), the progress descriptor not
    at all. With GPUs reserved, ``CUDA_VISIBLE_DEVICES`` is left out: only the reserved
    GPUs are in the container, and CUDA numbers them from 0 there, so the node's indices
    would name the wrong ones or none (``NVIDIA_VISIBLE_DEVICES`` keeps the node's
    indices: the NVIDIA container toolkit reads it on the node's side).

    Args:
        request: the attempt (its env, workdir, secrets directory and GPUs).
        runtime: its container runtime (a PATH the job set itself is kept).

    Returns:
        The variables to pass in.
    """
    mounts = [(str(request.workdir), WORKDIR)]
    if request.secrets_dir is not None:
        # The more specific mount first: a secrets directory may sit inside the workdir.
        mounts.insert(0, (str(request.secrets_dir), SECRETS))
    env: dict[str, str] = {}
    for key, value in request.env.items():
        if key in HOST_ONLY_VARS and key not in runtime.env:
            continue
        if key == CUDA_VISIBLE and request.gpu_devices:
            continue
        env[key] = _inside(value, mounts)
    return env


def split_env(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Which variables an env file can carry and which must go on the command line.

    Args:
        env: the container's variables.

    Returns:
        ``(single-line variables, variables whose value holds a line break)``.
    """
    lines: dict[str, str] = {}
    breaks: dict[str, str] = {}
    for key, value in env.items():
        (breaks if "\n" in value or "\r" in value else lines)[key] = value
    return lines, breaks


def env_key_problem(key: str) -> str:
    """Why ``key`` cannot go into a container's environment as a name ("" when it can).

    The trigger refuses every job variable that is not a plain name; this is the check
    right where it matters, for whatever else ends up in the container's variables: in an
    env file a line break in a name starts another line (a bare ``NAME`` line is filled
    from the engine client's own environment), an ``=`` moves the split, a leading ``#``
    makes a comment.

    Args:
        key: a variable's name.

    Returns:
        The problem in words, or "".
    """
    if not key or key.startswith("#") or any(c == "=" or c == "\x00" or c.isspace() for c in key):
        return f"{key!r} cannot be a variable's name in a container (empty, '=', a space, a line break or NUL)"
    return ""


def write_env_file(path: Path, env: Mapping[str, str]) -> None:
    """Write the single-line variables of ``env`` as an engine's ``--env-file`` (``K=V`` lines), mode 0600.

    Args:
        path: the file (created or replaced; outside the working directory, which the
            container sees).
        env: the container's variables (:func:`container_env`).

    Raises:
        ValueError: a name that is not a variable's name (:func:`env_key_problem`);
            nothing is written then.
    """
    lines = split_env(env)[0]
    for key in lines:
        problem = env_key_problem(key)
        if problem:
            raise ValueError(problem)
    text = "".join(f"{key}={value}\n" for key, value in lines.items())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        out.write(text)


class ContainerRunner:
    """Runs a ``ContainerRuntime`` attempt through the engine's ``run`` command.

    The engine client runs in a session of its own with the container's output on its
    pipes, handed to ``request.on_line`` line by line. A timeout or an abort stops the
    container by name (``<engine> kill <name>``), then kills the client's process group
    once ``kill_grace`` has passed, and removes the container (``<engine> rm -f``) in case
    the client went before its ``--rm`` could.

    Args:
        engine: the engine program (:attr:`EngineProbe.engine`).
        uid: the user containers run as (None: the image's own).
        gid: their group.
        pids_max: each container's process limit.
        kill_grace: seconds between ``<engine> kill`` and SIGKILL of the client's group.
        pipe_grace: seconds to keep reading output after the client exited.
        dev: where GPU device files are looked up.
    """

    def __init__(
        self,
        engine: str,
        *,
        uid: int | None,
        gid: int | None,
        pids_max: int,
        kill_grace: float = 5.0,
        pipe_grace: float = 2.0,
        dev: Path = Path("/dev"),
    ) -> None:
        self._engine = engine
        self._uid = uid
        self._gid = gid
        self._pids_max = pids_max
        self._kill_grace = kill_grace
        self._pipe_grace = pipe_grace
        self._dev = dev

    def argv(self, request: RunRequest, env_file: Path | None = None) -> list[str]:
        """The command :meth:`run` starts for ``request`` (see :func:`container_argv`).

        Args:
            request: the attempt.
            env_file: where :meth:`run` writes the variables (None: all inline).

        Returns:
            The argv, engine first.
        """
        return container_argv(
            self._engine,
            request,
            # The attempt's own uid, which its working directory belongs to, where it has one.
            uid=request.uid if request.uid is not None else self._uid,
            gid=request.gid if request.uid is not None else self._gid,
            pids_max=self._pids_max,
            name=container_name(request.job_id, request.attempt),
            dev=self._dev,
            env_file=env_file,
        )

    async def run(self, request: RunRequest) -> Outcome:
        """Run the attempt's container to its end and say how it ended.

        Args:
            request: the attempt, with a ``ContainerRuntime``.

        Returns:
            Success for exit 0; ``container_failed`` for the engine's own statuses (125,
            126, 127) and when the engine cannot be started; ``timeout`` past the run
            timeout; the abort's reason when aborted; else ``exit_code``. The tail is the
            last output.
        """
        if request.abort.error is not None:
            await _spawned(request)
            return Outcome(None, request.abort.error)
        if not isinstance(request.runtime, ContainerRuntime):
            raise TypeError(f"ContainerRunner runs ContainerRuntime attempts, got {type(request.runtime).__name__}")
        # A private directory (0700) outside the workdir: the job's variables, its secrets
        # among them, never show in the node's process list nor inside /work.
        with tempfile.TemporaryDirectory(prefix="jm-container-") as private:
            env_file = Path(private) / "env"
            env = container_env(request, request.runtime)
            broken = sorted(split_env(env)[1])
            if broken:
                # An env file cannot carry it, and the engine's command line is readable by
                # every user of the node (/proc/<pid>/cmdline): a secret would show there.
                await _spawned(request)
                return failed_outcome(
                    CONTAINER_FAILED,
                    f"variable {broken[0]} holds a line break, which would reach the container only on the "
                    "engine's command line, readable by every user of the node; give it as a file instead "
                    "(--upload, or --secret with --secrets-as file)",
                )
            try:
                write_env_file(env_file, env)
                argv = self.argv(request, env_file)
            except ValueError as exc:  # a bad variable name; the trigger refuses these at submit
                await _spawned(request)
                return failed_outcome(CONTAINER_FAILED, f"the container's variables are refused: {exc}")
            except OSError as exc:
                await _spawned(request)
                return failed_outcome(CONTAINER_FAILED, f"cannot write the container's env file: {exc}")
            return await self._run(request, argv)

    async def _run(self, request: RunRequest, argv: list[str]) -> Outcome:
        name = container_name(request.job_id, request.attempt)
        tail = OutputTail()
        with ExitStack() as files:
            try:
                stdin: Any = (
                    files.enter_context(request.stdin.open("rb"))
                    if request.stdin is not None
                    else asyncio.subprocess.DEVNULL
                )
                transport, protocol = await start_piped(argv, cwd=request.workdir, env=_client_env(), stdin=stdin)
            except OSError as exc:
                await _spawned(request)
                return failed_outcome(CONTAINER_FAILED, f"cannot start {self._engine!r}: {exc.strerror or exc}")
        pid = transport.get_pid()
        assert protocol.stdout is not None and protocol.stderr is not None  # both pipes asked for
        pumps = [
            asyncio.ensure_future(_pump(protocol.stdout, "stdout", tail, request.on_line)),
            asyncio.ensure_future(_pump(protocol.stderr, "stderr", tail, request.on_line)),
        ]
        exited = protocol.exited
        aborted = asyncio.ensure_future(request.abort.wait())
        stopped_by: JobError | None = None
        try:
            await _spawned(request)
            await asyncio.wait({exited, aborted}, timeout=request.timeout, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                stopped_by = request.abort.error or JobError(
                    code=TIMEOUT, message=f"ran longer than its run timeout of {request.timeout:g}s"
                )
                await self._stop(name, pid, exited)
            _signal_group(pid, signal.SIGKILL)
            await self._finish(pumps, request.name)
        finally:
            aborted.cancel()
            if not exited.done():  # cancelled: take the client down, and its container by name
                _signal_group(pid, signal.SIGKILL)
            transport.close()
        if stopped_by is not None:
            await self._engine_command(["rm", "-f", name], request.name)
            return Outcome(None, stopped_by, tail.text())
        returncode = transport.get_returncode()
        assert returncode is not None  # set before ``exited`` resolved
        if returncode in ENGINE_STATUSES:
            last = _last_line(tail.text())
            message = f"{ENGINE_STATUSES[returncode]} (exit code {returncode})" + (f": {last}" if last else "")
            return failed_outcome(CONTAINER_FAILED, message, returncode, tail.text())
        return exit_outcome(returncode, tail.text())

    async def _stop(self, name: str, pid: int, exited: asyncio.Future[None]) -> None:
        """``<engine> kill <name>``, then SIGKILL the client's group if it is still there after the grace."""
        await self._engine_command(["kill", name], name)
        try:
            await asyncio.wait_for(asyncio.shield(exited), self._kill_grace)
        except TimeoutError:
            _signal_group(pid, signal.SIGKILL)
            await exited

    async def _engine_command(self, args: list[str], name: str) -> None:
        """Run ``<engine> <args>`` to stop or remove a container; a failure is logged, not raised
        (the container may be gone already)."""
        try:
            process = await asyncio.create_subprocess_exec(
                self._engine,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=_client_env(),
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("%s: cannot run %s %s: %s", name, self._engine, " ".join(args), exc)
            return
        try:
            _, err = await asyncio.wait_for(process.communicate(), ENGINE_COMMAND_TIMEOUT)
        except TimeoutError:
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
            log.warning("%s: %s %s did not finish in %gs", name, self._engine, " ".join(args), ENGINE_COMMAND_TIMEOUT)
            return
        if process.returncode != 0:
            log.info("%s: %s %s exited %s: %s", name, self._engine, " ".join(args), process.returncode, err[:200])

    async def _finish(self, pumps: list[asyncio.Task[None]], name: str) -> None:
        """Wait for the output readers; one still reading after ``pipe_grace`` is stopped
        (only something that left the client's group can hold its pipe open now)."""
        done, pending = await asyncio.wait(pumps, timeout=self._pipe_grace)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                log.error("%s: reading the container's output failed", name, exc_info=task.exception())


async def _pump(reader: asyncio.StreamReader, stream: OutputStream, tail: OutputTail, on_line: LineSink) -> None:
    """Hand a pipe's output over line by line; a line longer than MAX_LINE_BYTES in pieces."""

    async def emit(raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        tail.add(text + "\n")
        await on_line(stream, text)

    buffer = b""
    while chunk := await reader.read(READ_CHUNK):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            for start in range(0, max(len(raw), 1), MAX_LINE_BYTES):
                await emit(raw[start : start + MAX_LINE_BYTES])
        while len(buffer) > MAX_LINE_BYTES:
            await emit(buffer[:MAX_LINE_BYTES])
            buffer = buffer[MAX_LINE_BYTES:]
    if buffer:
        await emit(buffer)


async def _spawned(request: RunRequest) -> None:
    if request.on_spawned is not None:
        await request.on_spawned()


def engine_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The engine client's own environment: only what podman or docker need of the executor's.

    The job's variables go in with --env-file/--env, never here, so none of them can
    reconfigure the engine (DOCKER_HOST, LD_PRELOAD). And the executor's own variables stay
    out besides what the engine reads (:data:`ENGINE_VARS`, :data:`ENGINE_PREFIXES`): the
    client need not see the executor's settings or secrets, and a bare name in an env file
    or ``--env NAME`` copies a variable of the client's environment into the container.

    Args:
        environ: the executor's environment.

    Returns:
        The variables to start the engine client with.
    """
    return {
        key: value
        for key, value in environ.items()
        if (key in ENGINE_VARS or key.startswith(ENGINE_PREFIXES)) and not key.startswith("JOBMESH_")
    }


def _client_env() -> dict[str, str]:
    return engine_environment(os.environ)


def _inside(value: str, mounts: list[tuple[str, str]]) -> str:
    for host, inside in mounts:
        if value == host:
            return inside
        if value.startswith(host + "/"):
            return inside + value[len(host) :]
    return value


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group is already gone


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()[:200]
    return ""
