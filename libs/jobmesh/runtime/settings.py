"""Typed settings read once from the environment.

``Settings.from_env()`` is called in each service's ``__main__`` and the result is passed
down; nothing else reads the environment. Every variable starts with ``JOBMESH_``.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from jobmesh.contract.streams import DUPLICATE_WINDOW
from jobmesh.errors import InvalidSpec

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
NonNegative = Annotated[int, Meta(ge=0)]
Positive = Annotated[float, Meta(gt=0)]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a jobmesh process needs to know about its surroundings."""

    nats_url: str = DEFAULT_NATS_URL
    # This process's NATS identity (docs/operations.md, "Security"): the file holding its
    # nkey seed (mode 0600), or the seed itself in the variable (a container's secret).
    # Neither set: no authentication (a server without an authorization block).
    nats_nkey_file: str = ""
    nats_nkey: str = ""
    # The identity the seed belongs to, when it is not this process's own (a service's
    # provisioning step runs as the provisioner).
    nats_identity: str = ""
    # TLS to NATS: the CA that signs the server's certificate, and this process's own
    # certificate and key when the server asks for one (mutual TLS). A tls:// URL or a CA
    # turns TLS on.
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    database_url: str | None = None
    service: str = "jobmesh"
    instance: str = ""
    # Queues hash onto this many scheduler partitions. Fixed for the life of a cluster.
    partitions: Annotated[int, Meta(ge=1, le=1024)] = 4
    # How many messages one pull loop takes and handles at once.
    batch_size: Annotated[int, Meta(ge=1, le=10_000)] = 256
    # A message larger than this is dead-lettered without being decoded.
    max_message_bytes: Annotated[int, Meta(ge=1024)] = 256 * 1024
    # Seconds a service waits for in-flight batches when told to stop.
    drain_seconds: Annotated[float, Meta(ge=0)] = 10.0
    # Executor node identity and capacity (the executor reads these only).
    node_id: str = ""
    node_cpu_milli: NonNegative = 0
    node_memory_mb: NonNegative = 0
    node_gpu: NonNegative = 0
    node_gpu_kind: str = ""
    node_disk_mb: NonNegative = 10_240
    node_zone: str = ""
    node_labels: str = ""
    # Executor: the host name or IP the members of a gang on other nodes reach this node's
    # member at (NodeInfo.address); empty: the host name.
    node_address: str = ""
    # The strongest isolation level the node may advertise: "auto" advertises the strongest
    # its probe finds it can enforce; a level caps it there (a level the probe cannot
    # enforce stops the executor at start, with what the probe found).
    node_isolation: Literal["auto", "process", "sandbox", "container"] = "auto"
    # Whether jobs that ask for outbound network may have it on this node.
    node_network: bool = True
    node_datasets: str = ""  # comma-separated datasets held on this node's local disk
    node_handlers: str = ""  # comma-separated handler names this node hosts
    work_dir: str = ""
    # Executor, isolation: the uid and gid jobs run as when the executor runs as root.
    sandbox_uid: Annotated[int, Meta(ge=1)] = 65534
    sandbox_gid: Annotated[int, Meta(ge=1)] = 65534
    # Executor, isolation: as root, each attempt runs as a uid (and gid) of its own from
    # this range, which no other user of the node may have (0: every attempt runs as
    # sandbox_uid, and jobs can reach each other). Handler workers run as sandbox_uid.
    attempt_uid_base: Annotated[int, Meta(ge=1000, le=4_000_000_000)] = 2_000_000_000
    attempt_uid_count: Annotated[int, Meta(ge=0, le=1_000_000)] = 65536
    # Executor, isolation: the most processes (cgroup pids.max) one attempt may have.
    attempt_pids_max: Annotated[int, Meta(ge=8)] = 512
    # Executor, isolation: the most open files (RLIMIT_NOFILE) of one attempt's processes.
    attempt_open_files: Annotated[int, Meta(ge=64)] = 4096
    # Executor: variables of its own environment a job sees besides PATH and LANG
    # (comma-separated names; the job's env and jobmesh's variables are added after).
    env_allow: str = "PATH,LANG,LC_ALL,TZ"
    # Executor, secrets: a job's secret NAME is the file <secrets_dir>/NAME, else the
    # variable <secrets_env_prefix>NAME of the executor's environment.
    secrets_dir: str = ""
    secrets_env_prefix: str = "JOBMESH_SECRET_"
    # Executor, files: node directories a job may start its working directory from
    # (comma-separated absolute paths; empty: none).
    allowed_input_paths: str = ""
    # Executor, handlers: modules to import for @handler functions (comma-separated), and
    # how many worker processes serve them.
    handler_modules: str = ""
    handler_workers: Annotated[int, Meta(ge=1, le=256)] = 2
    # Executor, handlers: memory (MiB) each worker process may use, however many jobs it serves.
    handler_worker_memory_mb: Annotated[int, Meta(ge=64)] = 2048
    # Executor, containers: "auto" uses podman or docker when a probe container runs; ""
    # turns the container runtime off; a name or path uses that engine.
    container_engine: str = "auto"
    container_probe_image: str = "docker.io/library/busybox:stable"
    heartbeat_seconds: Positive = 2.0
    node_ttl_seconds: Positive = 10.0
    # Executor: seconds between SIGTERM and SIGKILL when an attempt is stopped (cancel,
    # run timeout, drain).
    kill_grace_seconds: Annotated[float, Meta(ge=0, le=600)] = 3.0
    # Executor: a result file up to this size travels inline in JobSucceeded (UTF-8 text);
    # up to result_max_bytes it goes to the jm_results object store; beyond, the attempt fails.
    result_inline_bytes: Annotated[int, Meta(ge=0, le=128 * 1024)] = 16 * 1024
    result_max_bytes: Annotated[int, Meta(ge=0)] = 64 * 1024 * 1024
    # Scheduler: an attempt released this long ago and never seen running in its node's
    # lease record is released again (its JobReady or JobBound was lost). A safety net for
    # a message a stream lost: long enough that a backed-up pipeline (a burst, an outage
    # just over) never looks lost, since a re-release of a live attempt is wasted work.
    bind_timeout_seconds: Positive = 300.0
    # Scheduler: every instance beats six times per lease TTL; a standby takes a partition
    # over at most this long (plus a beat) after its owner's last renewal.
    lease_ttl_seconds: Positive = 6.0
    # Scheduler: finished jobs are remembered this long, so a submit redelivered after its
    # job ended is not run again (JetStream's duplicate window covers only two minutes).
    # This is the idempotency window of a key: unset, it follows history_retention_seconds
    # plus one retention round, so the tracker forgets a job before the scheduler could run
    # its key again, and a re-run never shows the first run's outcome (checked below).
    done_retention_seconds: Annotated[float, Meta(ge=0)] = 30 * 86_400.0 + 300.0
    # Tracker: a finished job (with its attempts, events and log lines) is pruned this long
    # after its last change. Never a job that is not final.
    history_retention_seconds: Annotated[float, Meta(ge=DUPLICATE_WINDOW)] = 30 * 86_400.0
    # Tracker and binder: seconds between two rounds of pruning and of node reaping.
    retention_interval_seconds: Annotated[float, Meta(gt=0, le=3600)] = 300.0
    # Tracker: jobs deleted per statement (each in its own short transaction, off the write path).
    retention_batch: Annotated[int, Meta(ge=1, le=10_000)] = 500
    # Binder: a node absent from jm_nodes this long, with no reservation left, is gone for
    # good: its allocation record and its dispatch consumer are removed.
    node_grace_seconds: Annotated[float, Meta(ge=60)] = 86_400.0
    # How long results stay in jm_results after they were written, a workflow's
    # intermediate results included (read by later steps, a retry, `jobmesh result`).
    result_retention_seconds: Positive = 7 * 86_400.0
    # Binder: within the best locality tier, "spread" prefers the node with most free
    # capacity, "pack" the one with least that still fits.
    placement: Literal["spread", "pack"] = "spread"
    # Trigger: subject patterns outside jobmesh.v1.events.> that rules may watch
    # (comma-separated; the trigger stores them in the stream JM_EXTERNAL).
    trigger_subjects: str = ""
    # Trigger: the HTTP ingress (POST /v1/jobs, POST /v1/hooks/<rule>) listens here
    # (host:port; "" turns it off). Its submit endpoint needs the bearer token held by the
    # secret this names (read like a job's secret: <secrets_dir>/NAME or the variable).
    http_listen: str = ""
    http_submit_token_secret: str = ""
    # Replicas of each stream when it is first created (3 on a NATS cluster).
    stream_replicas: Literal[1, 3, 5] = 1
    log_level: str = "INFO"
    # "json": one JSON object per line with trace and job ids (what a log pipeline reads);
    # "text": plain lines for a person (what `jobmesh dev` sets).
    log_format: Literal["json", "text"] = "json"
    # Each replica's own operations endpoint (host:port; "" turns it off): GET /healthz
    # answers for this process alone (200 healthy, 503 with the problems), GET /metrics is
    # its Prometheus scrape. A compose or Nomad check reaches the replica beside it here.
    ops_listen: str = ""
    # When set, a service writes a cProfile dump <service>-<pid>.prof here at a graceful stop.
    profile_dir: str = ""

    @property
    def nats_servers(self) -> list[str]:
        """``nats_url`` as the list nats-py takes: a comma-separated value names several
        servers of one cluster (a joined string would be read as one URL)."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()] or [self.nats_url]

    @property
    def authenticated(self) -> bool:
        """Whether this process connects with an identity of its own (an nkey)."""
        return bool(self.nats_nkey_file or self.nats_nkey)

    @property
    def identity(self) -> str:
        """The NATS identity this process connects as: its service, or an executor's
        ``executor-<node_id>`` (its inbox prefix and permissions follow from it)."""
        if self.nats_identity:
            return self.nats_identity
        if self.service == "executor" and self.node_id:
            return f"executor-{self.node_id}"
        if self.service == "provision":
            return "provisioner"
        return self.service

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings for ``service`` from ``JOBMESH_*`` variables.

        Args:
            service: the service name (trigger, scheduler, ...), used in durable names.
            env: the environment to read; ``os.environ`` when omitted.

        Returns:
            A frozen, checked ``Settings``.

        Raises:
            InvalidSpec: when a variable does not parse; the message names the variable.
        """
        env = os.environ if env is None else env
        raw: dict[str, object] = {"service": service}
        for field in cls.__struct_fields__:
            key = f"JOBMESH_{field.upper()}"
            if key in env and field != "service":
                raw[field] = env[key]
        if not raw.get("instance"):
            raw["instance"] = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            # The constraints are declared on the fields; msgspec checks them all here.
            settings = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise InvalidSpec(f"bad environment: {_env_name(str(exc))}", field=_field(str(exc))) from exc
        if "JOBMESH_DONE_RETENTION_SECONDS" not in env:
            settings = msgspec.structs.replace(settings, done_retention_seconds=idempotency_window(settings))
        settings.check_retention()
        settings.check_credentials()
        return settings

    def check_credentials(self) -> None:
        """Refuse credentials that cannot work, naming the variable, before connecting.

        Raises:
            InvalidSpec: two sources of one seed, a seed file that is missing or readable
                by others, a TLS certificate without its key, or a file that is not there.
        """
        if self.nats_nkey_file and self.nats_nkey:
            raise InvalidSpec(
                "bad environment: set JOBMESH_NATS_NKEY_FILE or JOBMESH_NATS_NKEY, not both", field="nats_nkey"
            )
        if self.nats_nkey and not self.nats_nkey.strip().startswith("SU"):
            raise InvalidSpec("bad environment: JOBMESH_NATS_NKEY is not a NATS user seed (SU...)", field="nats_nkey")
        if self.nats_nkey_file:
            path = Path(self.nats_nkey_file)
            if not path.is_file():
                raise InvalidSpec(f"bad environment: JOBMESH_NATS_NKEY_FILE: no file {path}", field="nats_nkey_file")
            if path.stat().st_mode & 0o077:
                raise InvalidSpec(
                    f"bad environment: JOBMESH_NATS_NKEY_FILE: {path} is readable by others (chmod 600 it)",
                    field="nats_nkey_file",
                )
        if self.service == "executor" and self.authenticated and not self.node_id and not self.nats_identity:
            raise InvalidSpec(
                "bad environment: JOBMESH_NODE_ID: an executor with NATS credentials must name its node"
                " (its key and permissions are issued for that node id)",
                field="node_id",
            )
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise InvalidSpec(
                "bad environment: JOBMESH_NATS_TLS_CERT and JOBMESH_NATS_TLS_KEY go together", field="nats_tls_cert"
            )
        for name in ("nats_tls_ca", "nats_tls_cert", "nats_tls_key"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise InvalidSpec(f"bad environment: JOBMESH_{name.upper()}: no file {value}", field=name)

    def check_retention(self) -> None:
        """Refuse an idempotency window shorter than the tracker's history.

        The scheduler runs a key again once it forgot the key's job; if the tracker still
        held that job's row, the re-run's events (same ids) would merge into the finished
        row and the old outcome would show. So the scheduler must remember a job at least
        one pruning round longer than the tracker keeps it.

        Raises:
            InvalidSpec: naming both variables, when the window is too short.
        """
        needed = idempotency_window(self)
        if self.done_retention_seconds < needed:
            raise InvalidSpec(
                f"bad environment: JOBMESH_DONE_RETENTION_SECONDS ({self.done_retention_seconds:g}) must be at"
                f" least JOBMESH_HISTORY_RETENTION_SECONDS + JOBMESH_RETENTION_INTERVAL_SECONDS ({needed:g}):"
                " the scheduler would run a reused idempotency key again while the tracker still shows the"
                " job's first outcome",
                field="done_retention_seconds",
            )


def idempotency_window(settings: Settings) -> float:
    """The shortest time the scheduler may remember a finished job: the tracker's history
    plus one pruning round (the tracker prunes at most that late).

    Args:
        settings: the process settings.

    Returns:
        Seconds.
    """
    return settings.history_retention_seconds + settings.retention_interval_seconds


def _field(message: str) -> str | None:
    if "`$." in message:
        return message.partition("`$.")[2].partition("`")[0] or None
    return None


def _env_name(message: str) -> str:
    # msgspec says "at `$.batch_size`"; a user set JOBMESH_BATCH_SIZE, so say that.
    if "`$." in message:
        head, _, rest = message.partition("`$.")
        field, _, tail = rest.partition("`")
        return f"{head}JOBMESH_{field.upper()}{tail}"
    return message
