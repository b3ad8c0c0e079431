"""A small async client for jobmesh's request/reply APIs, used by the CLI, tests and bench.

Errors come back as ``JobmeshError`` subclasses with the server's code and field; a
cluster that does not answer raises ``Unavailable`` with a message saying which part.
Besides the APIs it reads what the cluster stores for its users: results (``jm_results``)
and dead letters (``JM_DEADLETTER``, see ``deadletters``); it uploads a job's input files
(``jm_uploads``, see ``uploads``), waits for a job's end, and calls a Python handler as a
job and returns its typed result (``call``, see ``handlercalls``). Trigger rules are managed
through the trigger service's ``api.triggers.*`` requests (``put_trigger`` and the rest;
rule files are read by ``triggers``), workflow runs through its ``api.workflows.*``
requests (``run_workflow`` and the rest; what a run's state is, is ``workflows``).
"""

from __future__ import annotations

import asyncio
import builtins
import os
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import msgspec
import nats
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from jobmesh.client import deadletters
from jobmesh.client.deadletters import DeadLetterPage, Replayed
from jobmesh.client.denials import Denials
from jobmesh.client.handlercalls import decode_result, failure_of, input_data
from jobmesh.client.logs import LogPage, read_log_lines
from jobmesh.client.pipeline import LINGER, MAX_BATCH, JobHandle, SubmitPipeline
from jobmesh.client.results import JobResult, result_attempt
from jobmesh.client.triggers import rule_from_data
from jobmesh.client.uploads import UploadProgress, plan_uploads, put_uploads, upload_items
from jobmesh.client.workflows import WorkflowStatus, run_status, workflow_from_data
from jobmesh.contract import permissions, subjects
from jobmesh.contract.codec import Codec, encode
from jobmesh.contract.ids import new_idempotency_key
from jobmesh.contract.messages.v1 import (
    CancelReply,
    CancelRequest,
    ErrorReply,
    ExplainReply,
    ExplainRequest,
    HandlerRuntime,
    InputFile,
    JobGetRequest,
    JobListReply,
    JobListRequest,
    JobSpec,
    JobSummary,
    JobUpdate,
    JobView,
    NodesReply,
    NodesRequest,
    QueueConfig,
    QueuesReply,
    QueuesRequest,
    SampleEvent,
    Submission,
    SubmitReply,
    SubmitRequest,
    TenantConfig,
    TriggerDeleteRequest,
    TriggerGetRequest,
    TriggerListReply,
    TriggerListRequest,
    TriggerPauseRequest,
    TriggerPutRequest,
    TriggerReply,
    TriggerRule,
    TriggerTestReply,
    TriggerTestRequest,
    TriggerView,
    WorkflowCancelReply,
    WorkflowCancelRequest,
    WorkflowGetRequest,
    WorkflowListReply,
    WorkflowListRequest,
    WorkflowRetryReply,
    WorkflowRetryRequest,
    WorkflowRun,
    WorkflowRunReply,
    WorkflowRunRequest,
    WorkflowSpec,
    ZoneMap,
)
from jobmesh.errors import InvalidSpec, NotFound, Unavailable, UsageError

R = TypeVar("R")
ConfigValue = QueueConfig | TenantConfig | ZoneMap
# What each kind of ``jm_config`` key holds: ``queue.<name>``, ``tenant.<name>``, ``zones``.
_CONFIG_KINDS: dict[str, type[ConfigValue]] = {"queue": QueueConfig, "tenant": TenantConfig, "zones": ZoneMap}

DEV_ENV = Path(".jobmesh") / "dev.env"
# How often ``cancel`` asks again while the scheduler does not know a job the tracker shows
# as not ended (the scheduler has not read its submission yet, or the tracker its end).
CANCEL_RETRY_SECONDS = 0.2
WORKFLOW_PAGE = 2_000  # rows per request when reading a run's jobs (about 0.7 MB)
# How long ``wait`` trusts the tracker's watch announcements (core NATS, which may drop
# one) before it asks the tracker itself.
WAIT_POLL_SECONDS = 2.0
_update_decoder = msgspec.json.Decoder(JobUpdate)


def find_dev_env(start: Path | None = None) -> Path | None:
    """The nearest ``.jobmesh/dev.env`` in ``start`` or its parents."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / DEV_ENV
        if candidate.exists():
            return candidate
    return None


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def resolve_nats_url() -> str:
    """``JOBMESH_NATS_URL``, else the URL of a ``jobmesh dev`` cluster found nearby.

    Raises:
        Unavailable: when neither exists.
    """
    url = os.environ.get("JOBMESH_NATS_URL")
    if url:
        return url
    env_file = find_dev_env()
    if env_file is not None:
        url = read_env_file(env_file).get("JOBMESH_NATS_URL")
        if url:
            return url
    raise Unavailable("no jobmesh cluster found: set JOBMESH_NATS_URL or start one with `jobmesh dev --detach`")


INTEGRATOR_KEY_VARIABLE = "JOBMESH_INTEGRATOR_NKEY_FILE"


def integrator_options() -> dict[str, Any]:
    """``nats.connect`` arguments for an integrator's own connection (plain nats-py that
    publishes ``jobmesh.v1.events.>`` and follows job events): its seed file
    (``JOBMESH_INTEGRATOR_NKEY_FILE``, else that of a ``jobmesh dev`` cluster found nearby)
    and its inbox prefix. Empty for a cluster that runs without authentication.

    Raises:
        InvalidSpec: the seed file named does not exist.
    """
    seed = os.environ.get(INTEGRATOR_KEY_VARIABLE, "")
    if not seed and "JOBMESH_NATS_URL" not in os.environ:
        env_file = find_dev_env()
        if env_file is not None:
            seed = read_env_file(env_file).get(INTEGRATOR_KEY_VARIABLE, "")
    if not seed:
        return {}
    if not os.path.isfile(seed):
        raise InvalidSpec(f"{INTEGRATOR_KEY_VARIABLE}: no file {seed}", field=INTEGRATOR_KEY_VARIABLE)
    return {"nkeys_seed": seed, "inbox_prefix": permissions.inbox_of("integrator")}


def server_urls(url: str) -> list[str]:
    """A comma-separated ``JOBMESH_NATS_URL`` (a cluster's members) as the list nats-py
    takes: a joined string would be read as one URL (the services' ``Settings.nats_servers``)."""
    return [part.strip() for part in url.split(",") if part.strip()] or [url]


CREDENTIAL_VARIABLES = (
    "JOBMESH_NATS_IDENTITY",
    "JOBMESH_NATS_NKEY_FILE",
    "JOBMESH_NATS_NKEY",
    "JOBMESH_NATS_TLS_CA",
    "JOBMESH_NATS_TLS_CERT",
    "JOBMESH_NATS_TLS_KEY",
)


ADMIN_KEY_VARIABLE = "JOBMESH_ADMIN_NKEY_FILE"


def connect_options(url: str, admin: bool = False) -> dict[str, Any]:
    """Credentials and TLS for ``nats.connect``: the identity's inbox prefix (the client's,
    or ``JOBMESH_NATS_IDENTITY``'s), its nkey seed (``JOBMESH_NATS_NKEY_FILE`` or
    ``JOBMESH_NATS_NKEY``, else those of a
    ``jobmesh dev`` cluster found nearby) and TLS (``JOBMESH_NATS_TLS_*`` or a tls:// URL).

    Raises:
        InvalidSpec: naming the variable, for a seed file that is missing or a CA, a
            certificate or a key that cannot be read.
    """
    wanted = (*CREDENTIAL_VARIABLES, ADMIN_KEY_VARIABLE)
    found = {name: os.environ[name] for name in wanted if os.environ.get(name)}
    if not found and "JOBMESH_NATS_URL" not in os.environ:
        env_file = find_dev_env()
        if env_file is not None:
            found = {k: v for k, v in read_env_file(env_file).items() if k in wanted and v}
    if admin and found.get(ADMIN_KEY_VARIABLE):
        # An operator's command (cluster configuration, a replay): the administrator's key.
        found = {**found, "JOBMESH_NATS_NKEY_FILE": found[ADMIN_KEY_VARIABLE], "JOBMESH_NATS_IDENTITY": "provisioner"}
        found.pop("JOBMESH_NATS_NKEY", None)
    # The client identity's, unless the key is another's (an operator's commands run as the
    # provisioner: JOBMESH_NATS_IDENTITY=provisioner).
    identity = found.get("JOBMESH_NATS_IDENTITY") or "client"
    options: dict[str, Any] = {"inbox_prefix": permissions.inbox_of(identity)}
    seed_file = found.get("JOBMESH_NATS_NKEY_FILE")
    if seed_file:
        if not os.path.isfile(seed_file):
            raise InvalidSpec(f"JOBMESH_NATS_NKEY_FILE: no file {seed_file}", field="JOBMESH_NATS_NKEY_FILE")
        options["nkeys_seed"] = seed_file
    elif found.get("JOBMESH_NATS_NKEY"):
        options["nkeys_seed_str"] = found["JOBMESH_NATS_NKEY"].strip()
    ca, cert, key = (found.get(f"JOBMESH_NATS_TLS_{part}", "") for part in ("CA", "CERT", "KEY"))
    if ca or cert or url.startswith("tls://"):
        try:
            context = ssl.create_default_context(cafile=ca or None)
            if cert:
                context.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidSpec(f"JOBMESH_NATS_TLS_*: {exc}", field="JOBMESH_NATS_TLS_CA") from exc
        options["tls"] = context
    return options


class ClusterSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The cluster configuration in ``jm_config``, as the schedulers apply it.

    Attributes:
        queues: queue name -> its release regulation (queues not listed are unlimited).
        tenants: tenant name -> its fair-share weight (tenants not listed weigh 1).
        zones: the zone distance map, None when none is set.
        invalid: key -> why its value was ignored (the schedulers ignore it too).
    """

    queues: dict[str, QueueConfig] = {}
    tenants: dict[str, TenantConfig] = {}
    zones: ZoneMap | None = None
    invalid: dict[str, str] = {}


def config_kind(key: str) -> type[ConfigValue] | None:
    """The config message a ``jm_config`` key holds, None for a key jobmesh does not use.

    Args:
        key: a key of the bucket (``queue.<name>``, ``tenant.<name>`` or ``zones``).

    Returns:
        ``QueueConfig``, ``TenantConfig``, ``ZoneMap`` or None.
    """
    kind, dot, name = key.partition(".")
    if kind == "zones":
        return ZoneMap if not dot else None
    return _CONFIG_KINDS.get(kind) if dot and name else None


class CancelOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What a cancel did.

    Attributes:
        job_id: the job.
        state: ``cancelled`` (it had not started; it ended now), ``cancelling`` (its
            attempt is being stopped; it ends cancelled shortly) or ``ended`` (it had
            already ended: nothing was done).
        message: what happened, in words (``already ended succeeded``).
    """

    job_id: str
    state: Literal["cancelled", "cancelling", "ended"]
    message: str


class Client:
    """Request/reply access to a running cluster.

    Args:
        nc: a connected NATS client.
        timeout: seconds to wait for each reply.
    """

    def __init__(self, nc: NATS, timeout: float = 10.0, denials: Denials | None = None) -> None:
        self.nc = nc
        self.timeout = timeout
        # The connection's permission violations (when it was made by connect): a request
        # the server refused fails at once, saying so, rather than timing out.
        self._denials = denials
        self._pipeline: SubmitPipeline | None = None  # enqueue's, made on first use

    @classmethod
    async def connect(
        cls, url: str | None = None, timeout: float = 10.0, admin: bool = False
    ) -> Client:  # timeout: per reply
        """Connect once, without retrying, so a missing cluster fails fast and clearly.

        ``admin`` asks for the administrator's key (``JOBMESH_ADMIN_NKEY_FILE``) when one is
        given: what writing the cluster configuration or replaying dead letters needs.
        """
        url = url or resolve_nats_url()
        options = connect_options(url, admin)
        # Also the connection's error callback: nats-py logs connection errors itself (the
        # one line below says them better), and a permission violation fails its request.
        denials = Denials(options["inbox_prefix"])

        try:
            # max_reconnect_attempts=0 makes nats-py retry the first connect forever; 1 with
            # a short wait fails within a fraction of a second.
            nc = await asyncio.wait_for(
                nats.connect(
                    server_urls(url),
                    **options,
                    connect_timeout=3,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.2,
                    error_cb=denials.on_error,
                ),
                10,
            )
        except Exception as exc:
            raise Unavailable(f"cannot reach NATS at {url}: {type(exc).__name__} {exc}".rstrip()) from exc
        return cls(nc, timeout, denials)

    async def close(self) -> None:
        """Send what :meth:`enqueue` queued (so nothing queued is dropped), then disconnect."""
        try:
            if self._pipeline is not None:
                await self._pipeline.close()
        finally:
            await self.nc.close()

    async def request(self, subject: str, message: Any, reply_type: type[R], service: str) -> R:
        """Send ``message``, decode the reply as ``reply_type`` or raise its error.

        Args:
            subject: the API subject.
            message: the request struct.
            reply_type: the struct the answer decodes to.
            service: the service that answers, named in errors.

        Returns:
            The decoded reply.

        Raises:
            Unavailable: nobody answered in time.
            JobmeshError: the error the service replied with.
            PermissionDenied: NATS refused this client's key the subject.
        """
        try:
            pending = self.nc.request(subject, encode(message), timeout=self.timeout)
            reply = await (pending if self._denials is None else self._denials.guard(pending, subject))
        except nats.errors.NoRespondersError as exc:
            raise Unavailable(f"the {service} service is not running (no responders on {subject})") from exc
        except nats.errors.TimeoutError as exc:
            raise Unavailable(f"the {service} service did not answer on {subject} within {self.timeout}s") from exc
        decoded: R | ErrorReply = msgspec.json.decode(reply.data, type=reply_type | ErrorReply)
        if isinstance(decoded, ErrorReply):
            raise decoded.error()
        return decoded

    async def submit(self, submissions: list[Submission]) -> SubmitReply:
        """Submit jobs; returns their ids once every job is durably accepted (one
        request/reply per call: see :meth:`enqueue` for a loop of single submits)."""
        return await self.request(subjects.API_SUBMIT, SubmitRequest(jobs=submissions), SubmitReply, "trigger")

    async def _submit_request(self, request: SubmitRequest) -> SubmitReply:
        return await self.request(subjects.API_SUBMIT, request, SubmitReply, "trigger")

    def pipeline(self, max_batch: int = MAX_BATCH, linger: float = LINGER) -> SubmitPipeline:
        """A pipeline of its own (``pipeline.py``): submits coalesced into batched requests."""
        return SubmitPipeline(self._submit_request, max_batch, linger)

    def enqueue(self, job: JobSpec | Submission) -> JobHandle:
        """Queue one job and return at once; submits queued meanwhile travel in one request.

        The handle's ``job_id`` is known at once; ``await handle`` returns it once the job is
        durable, or raises the error (naming ``jobs[0]...``) that kept it out; a retryable
        error leaves its fate unknown: submit again with ``handle.idempotency_key``.
        :meth:`flush` waits for every job queued so far; :meth:`close` flushes first. Do not
        await each handle in the loop: that is a round trip per job again.
        """
        if self._pipeline is None:
            self._pipeline = self.pipeline()
        return self._pipeline.submit(job)

    async def flush(self) -> None:
        """Return once every job :meth:`enqueue` queued has been answered."""
        if self._pipeline is not None:
            await self._pipeline.flush()

    async def get(self, job_id: str) -> JobView:
        """Everything the tracker knows about one job."""
        return await self.request(subjects.API_JOB_GET, JobGetRequest(job_id=job_id), JobView, "tracker")

    async def list(self, limit: int = 50, state: str = "", queue: str = "", states: Sequence[str] = ()) -> JobListReply:
        """Recent jobs, newest first.

        Args:
            limit: at most this many (1-1000).
            state: only jobs in this state ("" for any).
            queue: only jobs of this queue ("" for any).
            states: only jobs in any of these states; wins over ``state`` when given.

        Returns:
            The tracker's reply.
        """
        # Not checked here: the tracker refuses a state it does not know, naming the field.
        request = JobListRequest(limit=limit, state=cast(Any, state), queue=queue, states=cast(Any, list(states)))
        return await self.request(subjects.API_JOB_LIST, request, JobListReply, "tracker")

    async def explain(self, partition: int, job_id: str) -> ExplainReply:
        """Ask the owner of ``partition`` why ``job_id`` is not running yet."""
        return await self.request(
            subjects.scheduler_explain(partition), ExplainRequest(job_id=job_id), ExplainReply, "scheduler"
        )

    async def partition_of(self, view: JobView) -> int:
        """The scheduler partition of a job: from its view, else from its queue.

        Args:
            view: the tracker's view of the job.

        Returns:
            The partition whose scheduler holds the job.

        Raises:
            Unavailable: the view does not say and no scheduler answers with the count.
        """
        if view.partition >= 0:
            return view.partition
        replies = await self.queues(wait=0.5)
        return subjects.partition_of(view.queue, replies[0].partitions)

    async def cancel(self, job_id: str, reason: str = "") -> CancelOutcome:
        """Cancel a job: a held one ends at once, a running one is stopped, an ended one stays.

        Args:
            job_id: the job.
            reason: why, recorded with the cancel.

        Returns:
            What happened; cancelling a job that has ended is a no-op (``ended``).

        Raises:
            NotFound: the tracker does not know the job.
            Unavailable: the scheduler does not answer, or does not know a job that has not
                ended within this client's timeout.
        """
        deadline = time.monotonic() + self.timeout
        request = CancelRequest(job_id=job_id, reason=reason)
        while True:
            try:
                view = await self.get(job_id)
            except NotFound:
                # Submitted a moment ago, the tracker may not have recorded it yet.
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(CANCEL_RETRY_SECONDS)
                continue
            if view.final:
                return CancelOutcome(job_id=job_id, state="ended", message=f"already ended {view.state}")
            partition = await self.partition_of(view)
            try:
                reply = await self.request(subjects.scheduler_cancel(partition), request, CancelReply, "scheduler")
            except Unavailable:
                # The partition is moving to another scheduler (its old owner refuses): ask
                # again, as long as the deadline allows.
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(CANCEL_RETRY_SECONDS)
                continue
            if reply.state != "unknown":
                return CancelOutcome(job_id=job_id, state=reply.state, message=reply.message)
            # The scheduler holds no such job, yet the tracker has not seen it end: one of
            # the two has not caught up. Ask both again until one has.
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"the scheduler of partition {partition} does not know job {job_id}, which the tracker shows"
                    f" {view.state} and not ended; try again in a moment ({reply.message})"
                )
            await asyncio.sleep(CANCEL_RETRY_SECONDS)

    async def result(self, job_id: str, attempt: int | None = None) -> JobResult:
        """The result a job's successful attempt wrote (inline, or from ``jm_results``).

        Args:
            job_id: the job.
            attempt: a given attempt's result; None for the successful one.

        Returns:
            The result's bytes and where they came from.

        Raises:
            NotFound: the job is unknown, has no such attempt, has no result, or its stored
                result has expired.
            Unavailable: the object store cannot be read.
        """
        chosen = result_attempt(await self.get(job_id), attempt)
        if not chosen.result_ref:
            return JobResult(job_id=job_id, attempt=chosen.attempt, data=chosen.result.encode())
        ref = chosen.result_ref
        try:
            store = await self.nc.jetstream(timeout=self.timeout).object_store(subjects.OBJ_RESULTS)
            stored = await store.get(ref)
        except nats.js.errors.BucketNotFoundError as exc:
            raise Unavailable(
                f"the {subjects.OBJ_RESULTS} object store does not exist: run `jobmesh provision`"
            ) from exc
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError) as exc:
            raise NotFound(
                f"the result of attempt {chosen.attempt} of job {job_id} ({subjects.OBJ_RESULTS}/{ref}) is no longer"
                " stored: results are kept for 7 days"
            ) from exc
        except nats.errors.Error as exc:
            raise Unavailable(f"cannot read {subjects.OBJ_RESULTS}/{ref}: {type(exc).__name__} {exc}".rstrip()) from exc
        return JobResult(job_id=job_id, attempt=chosen.attempt, data=stored.data or b"", ref=ref)

    async def wait(self, job_id: str, timeout: float | None = None) -> JobView:
        """Wait until a job is final (it ran, and no retry follows) and return its view.

        Args:
            job_id: the job.
            timeout: give up after this many seconds; None waits as long as it takes.

        Returns:
            The tracker's final view of the job.

        Raises:
            TimeoutError: the job was not final within ``timeout``.
            Unavailable: the tracker does not answer.
        """
        changed = asyncio.Event()

        async def on_update(msg: Msg) -> None:
            try:
                if _update_decoder.decode(msg.data).final:
                    changed.set()
            except msgspec.DecodeError:
                changed.set()  # a newer tracker's message: ask the tracker itself

        # Subscribe before the first read, so that an end between the two is not missed.
        sub = await self.nc.subscribe(subjects.job_watch(job_id), cb=on_update)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        view = await self.get(job_id)
                        if view.final:
                            return view
                    except NotFound:
                        pass  # submitted a moment ago: the tracker has not recorded it yet
                    changed.clear()
                    try:
                        await asyncio.wait_for(changed.wait(), WAIT_POLL_SECONDS)
                    except TimeoutError:
                        pass  # no announcement: ask the tracker again anyway
        finally:
            await sub.unsubscribe()

    async def upload(
        self, paths: Iterable[str | Path | tuple[str | Path, str]], progress: UploadProgress | None = None
    ) -> builtins.list[InputFile]:
        """Upload files for a job's working directory to ``jm_uploads``; returns the spec's entries.

        Args:
            paths: local files or directories (a directory's files keep their paths
                relative to it, under its name), each optionally paired with its
                destination in the working directory, as ``--upload LOCAL:DEST`` takes.
            progress: called as bytes go out, with (destination, bytes sent, size).

        Returns:
            One ``InputFile`` per file, for ``JobSpec.files``; an object the bucket already
            holds (same content) is not sent again.

        Raises:
            UsageError: a path that cannot be read, a bad destination, or more than
                ``MAX_UPLOAD_BYTES`` in all (the message names the file that crosses it).
            Unavailable: the bucket cannot be written.
        """
        # Blocking work (stat, walk, hashing every byte): in a thread.
        planned = await asyncio.to_thread(lambda: plan_uploads(upload_items(paths)))
        await put_uploads(self.nc.jetstream(timeout=self.timeout), planned, progress)
        return [p.input for p in planned]

    async def call(
        self,
        handler: str,
        input: Any = None,
        output_type: type[R] | None = None,
        *,
        idempotency_key: str = "",
        wait_timeout: float | None = None,
        **spec_fields: Any,
    ) -> R | Any:
        """Run the Python handler ``handler`` as a job, wait for its end, return its result.

        Args:
            handler: the handler's name (``@handler("name")`` on an executor).
            input: its input: a msgspec struct (or builtin data) of the handler's input type.
            output_type: decode the result into this type; None for builtin data.
            idempotency_key: the job's key (the same key, the same job); fresh when empty.
            wait_timeout: stop waiting after this many seconds (the job goes on).
            **spec_fields: any other ``JobSpec`` field (``queue``, ``timeouts``...).

        Returns:
            The handler's return value, decoded.

        Raises:
            JobFailed: the job ended without succeeding; ``code`` is its failure code
                (``handler_failed``, ``input_invalid``...).
            InvalidMessage: the trigger refused the input (the field named), or the result
                does not fit ``output_type``.
            TimeoutError: the job was not final within ``wait_timeout``.
        """
        spec = JobSpec(runtime=HandlerRuntime(handler=handler, input=input_data(input)), **spec_fields)
        reply = await self.submit([Submission(spec=spec, idempotency_key=idempotency_key)])
        view = await self.wait(reply.job_ids[0], wait_timeout)
        if view.state != "succeeded":
            raise failure_of(view)
        result = await self.result(view.job_id)
        return decode_result(result.data, output_type)

    async def dead_letters(self, service: str = "", limit: int = 50) -> DeadLetterPage:
        """The newest dead letters: messages the services refused, and why.

        Args:
            service: only this service's ("" for all).
            limit: at most this many, the newest.

        Returns:
            The dead letters, oldest first, each with its sequence (what ``replay`` takes).
        """
        return await deadletters.read_dead_letters(self.nc, service, limit, self.timeout)

    async def replay_dead_letter(self, seq: int) -> Replayed:
        """Publish a dead letter's payload again to the subject it was refused on (once).

        Args:
            seq: the dead letter's sequence in ``JM_DEADLETTER``.

        Returns:
            Where it went, and whether it was a duplicate of an earlier replay.
        """
        return await deadletters.replay_dead_letter(self.nc, seq, self.timeout)

    async def logs(self, job_id: str, limit: int = 500) -> LogPage:
        """The newest output lines of a job (every attempt's), oldest first.

        Args:
            job_id: the job.
            limit: at most this many.

        Returns:
            The lines and how many the stream holds in all.
        """
        return await read_log_lines(self.nc, job_id, limit, self.timeout)

    async def nodes(self) -> NodesReply:
        """Every node with capacity, allocation and last heartbeat (from the binder)."""
        return await self.request(subjects.API_NODES, NodesRequest(), NodesReply, "binder")

    async def queues(self, wait: float = 1.0) -> builtins.list[QueuesReply]:
        """Queue depths from every scheduler; returns once every partition has answered.

        Every scheduler replica answers for the partitions it owns, so this gathers
        replies until all partitions are covered or ``wait`` seconds have passed.
        """
        inbox = self.nc.new_inbox()
        replies: builtins.list[QueuesReply] = []
        covered: set[int] = set()
        done = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            reply = msgspec.json.decode(msg.data, type=QueuesReply | ErrorReply)
            if isinstance(reply, QueuesReply):
                replies.append(reply)
                covered.update(p.partition for p in reply.owned)
                if len(covered) >= reply.partitions:
                    done.set()

        sub = await self.nc.subscribe(inbox, cb=on_reply)
        try:
            await self.nc.publish(subjects.API_QUEUES, encode(QueuesRequest()), reply=inbox)
            try:
                await asyncio.wait_for(done.wait(), wait)
            except TimeoutError:
                if not replies:
                    raise Unavailable("no scheduler answered on " + subjects.API_QUEUES) from None
        finally:
            await sub.unsubscribe()
        return replies

    # --- trigger rules (the trigger service's api.triggers.*) ---------------------------
    async def put_trigger(self, rule: TriggerRule | Mapping[str, Any], paused: bool = False) -> TriggerReply:
        """Add a rule, or change the rule of its name (a new version when it differs).

        Args:
            rule: the rule, or its data as a rule file holds it (checked here first, so a
                wrong field is named without a round trip).
            paused: add it paused.

        Returns:
            The stored record; ``changed`` is false when the same rule was stored already.

        Raises:
            InvalidMessage: the rule is invalid (its field named): here, or at the service,
                which also checks its CEL expressions, job template and subjects.
        """
        request = TriggerPutRequest(rule=_rule_of(rule), paused=paused)
        return await self.request(subjects.API_TRIGGERS_PUT, request, TriggerReply, "trigger")

    async def get_trigger(self, name: str) -> TriggerView:
        """One rule: its record, figures, next tick and pending partial state.

        Raises:
            NotFound: there is no rule of that name.
        """
        return await self.request(subjects.API_TRIGGERS_GET, TriggerGetRequest(name=name), TriggerView, "trigger")

    async def list_triggers(self) -> TriggerListReply:
        """Every rule, by name, with its figures."""
        return await self.request(subjects.API_TRIGGERS_LIST, TriggerListRequest(), TriggerListReply, "trigger")

    async def delete_trigger(self, name: str) -> TriggerReply:
        """Remove a rule, its figures and its partial state; returns the record removed.

        Raises:
            NotFound: there is no rule of that name.
        """
        return await self.request(
            subjects.API_TRIGGERS_DELETE, TriggerDeleteRequest(name=name), TriggerReply, "trigger"
        )

    async def pause_trigger(self, name: str, paused: bool = True) -> TriggerReply:
        """Pause a rule (``paused``) or resume it (not ``paused``); its version stays.

        Raises:
            NotFound: there is no rule of that name.
        """
        request = TriggerPauseRequest(name=name, paused=paused)
        return await self.request(subjects.API_TRIGGERS_PAUSE, request, TriggerReply, "trigger")

    async def test_trigger(
        self, name_or_rule: str | TriggerRule | Mapping[str, Any], event: SampleEvent | None = None
    ) -> TriggerTestReply:
        """The job an event would make of a rule, without submitting it.

        Args:
            name_or_rule: a stored rule's name, or a rule (or its data) not stored.
            event: the event; None for the rule's sample.

        Returns:
            Whether it matched and why not, the job spec and its idempotency key.

        Raises:
            NotFound: there is no stored rule of that name.
            InvalidMessage: the rule or event is invalid (its field named).
        """
        if isinstance(name_or_rule, str):
            request = TriggerTestRequest(name=name_or_rule, event=event)
        else:
            request = TriggerTestRequest(rule=_rule_of(name_or_rule), event=event)
        return await self.request(subjects.API_TRIGGERS_TEST, request, TriggerTestReply, "trigger")

    # --- workflows (the trigger service's api.workflows.*) -------------------------------
    async def run_workflow(
        self, spec: WorkflowSpec | Mapping[str, Any], input: Any = None, idempotency_key: str = ""
    ) -> WorkflowRunReply:
        """Start a run of a workflow.

        Args:
            spec: the workflow (``Workflow.spec()``, ``read_workflow_file``), or its data as
                a workflow file holds it; checked here first (fields, needs, cycles), so a
                wrong field is named without a round trip.
            input: the run's input (``${input...}``); None for the workflow's own.
            idempotency_key: the same key always names the same run (a second request
                returns it, ``duplicate``); a fresh one is made here when empty, so that
                a request retried by the client's own timeout makes one run, not two.

        Returns:
            The run's record and whether it existed already.

        Raises:
            InvalidMessage: the workflow is invalid (its field named, ``steps.b.needs[0]``):
                here, or at the service, which also checks its templates and every
                step's job.
        """
        request = WorkflowRunRequest(
            spec=_workflow_of(spec), input=input, idempotency_key=idempotency_key or new_idempotency_key()
        )
        return await self.request(subjects.API_WORKFLOWS_RUN, request, WorkflowRunReply, "trigger")

    async def get_workflow(self, run_id: str) -> WorkflowRun:
        """One run's record: its spec, input and each step's current job.

        Raises:
            NotFound: there is no such run.
        """
        return await self.request(subjects.API_WORKFLOWS_GET, WorkflowGetRequest(run_id=run_id), WorkflowRun, "trigger")

    async def list_workflows(self, limit: int = 50, name: str = "") -> WorkflowListReply:
        """Recent runs, newest first.

        Args:
            limit: at most this many (1-1000).
            name: only runs of this workflow ("" for all).

        Returns:
            The trigger's reply.
        """
        request = WorkflowListRequest(limit=limit, name=name)
        return await self.request(subjects.API_WORKFLOWS_LIST, request, WorkflowListReply, "trigger")

    async def cancel_workflow(self, run_id: str, reason: str = "") -> WorkflowCancelReply:
        """Cancel a run: its held and running steps and their items end cancelled.

        Args:
            run_id: the run.
            reason: why, recorded with the cancel.

        Returns:
            How many jobs the cancel reached.

        Raises:
            NotFound: there is no such run.
        """
        request = WorkflowCancelRequest(run_id=run_id, reason=reason)
        return await self.request(subjects.API_WORKFLOWS_CANCEL, request, WorkflowCancelReply, "trigger")

    async def retry_workflow(self, run_id: str) -> WorkflowRetryReply:
        """Run a run's failed, skipped and cancelled steps again (the next generation);
        the steps that succeeded keep their results.

        Raises:
            NotFound: there is no such run.
        """
        request = WorkflowRetryRequest(run_id=run_id)
        return await self.request(subjects.API_WORKFLOWS_RETRY, request, WorkflowRetryReply, "trigger")

    async def workflow_jobs(self, run_id: str) -> builtins.list[JobSummary]:
        """Every job of a run as the tracker lists it: each step's jobs (older generations
        too) and their mapped items, in submission order."""
        jobs: builtins.list[JobSummary] = []
        while True:  # in pages: the rows of a large run would not fit in one message
            request = JobListRequest(workflow=run_id, limit=WORKFLOW_PAGE, offset=len(jobs))
            reply = await self.request(subjects.API_JOB_LIST, request, JobListReply, "tracker")
            jobs.extend(reply.jobs)
            if len(reply.jobs) < WORKFLOW_PAGE:
                return jobs

    async def workflow_status(self, run_id: str) -> WorkflowStatus:
        """A run as a person should see it: every step's state and the run's outcome.

        Args:
            run_id: the run.

        Returns:
            The status (``workflows.run_status`` of the record and the run's jobs); its
            ``outcome`` is ``running`` until every step's job has ended.

        Raises:
            NotFound: there is no such run.
        """
        record = await self.get_workflow(run_id)
        return run_status(record, await self.workflow_jobs(run_id))

    async def put_config(self, key: str, value: ConfigValue) -> None:
        """Write one configuration value to ``jm_config``; schedulers apply it at once.

        Args:
            key: ``queue.<name>``, ``tenant.<name>`` or ``zones``.
            value: the config message that key holds.

        Raises:
            UsageError: when ``value`` is not what ``key`` holds.
            Unavailable: when the bucket cannot be reached.
        """
        kind = config_kind(key)
        if kind is None or not isinstance(value, kind):
            raise UsageError(f"key {key!r} cannot hold a {type(value).__name__}", field="key")
        # A struct built in Python is not checked against its constraints (a negative rate,
        # say); the schedulers would ignore it with a warning. Check it as the wire would.
        Codec(kind).decode(encode(value))
        kv = await self._config_bucket()
        try:
            await kv.put(key, encode(value))
        except nats.errors.Error as exc:
            raise Unavailable(f"cannot write {key} to {subjects.KV_CONFIG}: {type(exc).__name__} {exc}") from exc

    async def read_config(self) -> ClusterSettings:
        """Every configuration value in ``jm_config``, decoded.

        Returns:
            The queues, tenants and zone map; a value that does not decode is reported in
            ``invalid`` (the schedulers ignore it as well) rather than failing the read.

        Raises:
            Unavailable: when the bucket cannot be reached.
        """
        kv = await self._config_bucket()
        queues: dict[str, QueueConfig] = {}
        tenants: dict[str, TenantConfig] = {}
        zones: ZoneMap | None = None
        invalid: dict[str, str] = {}
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        except nats.errors.Error as exc:
            raise Unavailable(f"cannot read {subjects.KV_CONFIG}: {type(exc).__name__} {exc}") from exc
        for key in sorted(keys):
            kind = config_kind(key)
            if kind is None:
                continue
            try:
                entry = await kv.get(key)
            except nats.js.errors.NotFoundError:
                continue  # deleted since it was listed
            except nats.errors.Error as exc:
                raise Unavailable(f"cannot read {key} from {subjects.KV_CONFIG}: {type(exc).__name__} {exc}") from exc
            try:
                value = msgspec.json.decode(entry.value or b"", type=kind)
            except msgspec.DecodeError as exc:
                invalid[key] = str(exc)
                continue
            name = key.partition(".")[2]
            if isinstance(value, QueueConfig):
                queues[name] = value
            elif isinstance(value, TenantConfig):
                tenants[name] = value
            else:
                zones = value
        return ClusterSettings(queues=queues, tenants=tenants, zones=zones, invalid=invalid)

    async def _config_bucket(self) -> KeyValue:
        try:
            return await self.nc.jetstream(timeout=self.timeout).key_value(subjects.KV_CONFIG)
        except nats.js.errors.BucketNotFoundError as exc:
            raise Unavailable(
                f"the {subjects.KV_CONFIG} bucket does not exist: start the services or run `jobmesh provision`"
            ) from exc
        except nats.errors.Error as exc:
            raise Unavailable(f"cannot open {subjects.KV_CONFIG}: {type(exc).__name__} {exc}") from exc


def _rule_of(rule: TriggerRule | Mapping[str, Any]) -> TriggerRule:
    """A rule as sent: data decoded strictly; a struct built in Python re-checked as the
    wire would (its constructor does not check constraints such as the name's pattern)."""
    if isinstance(rule, TriggerRule):
        return rule_from_data(msgspec.to_builtins(rule))
    return rule_from_data(rule)


def _workflow_of(spec: WorkflowSpec | Mapping[str, Any]) -> WorkflowSpec:
    """A workflow as sent: data decoded strictly, a struct re-checked as the wire would
    (its constructor checks no constraints) and for its needs and cycles."""
    if isinstance(spec, WorkflowSpec):
        return workflow_from_data(msgspec.to_builtins(spec), f"workflow {spec.name}")
    return workflow_from_data(spec)
