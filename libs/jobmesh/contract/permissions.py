"""What each NATS identity may publish and subscribe: least privilege, as data.

Every service connects as its own identity, every executor as one per node, and clients,
integrators and the provisioner as theirs. An identity's permissions name the subjects it
owns or consumes: its JetStream API calls for its own durable consumers and buckets, its
acks, and its own inbox prefix (the nats-py ``inbox_prefix``), so it can read replies meant
for itself only. Only the provisioner may create, update or delete streams and durables.

The functions here are pure: they turn the subject catalogue of :mod:`subjects` into allow
lists. Rendering them into a nats-server configuration is the runtime's business.

An executor reports on subjects that name its node (``subjects.node_event``), and may
publish on no other node's: a report for another node's attempt must claim that node's id
on its own node's subject, which the consumers refuse (``runtime.fencing``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from jobmesh.contract import subjects

API = "$JS.API"
# Ordered consumers (KV watches, object reads, log follows) answer the server's flow-control
# requests by publishing to $JS.FC.<stream>.>.
FLOW_CONTROL = "$JS.FC"

# Read-only calls about the account: its limits, and which stream holds a subject (nats-py
# asks that before reading an object or following a subject without naming the stream).
ACCOUNT_READS = (f"{API}.INFO", f"{API}.STREAM.NAMES")

ROLES = ("provisioner", *subjects.SERVICES, "client", "integrator")


@dataclass(frozen=True)
class Permissions:
    """One identity's allow lists.

    Attributes:
        identity: the name it connects as (``scheduler``, ``executor-<node>``, ...).
        inbox: its inbox prefix; replies to it arrive under ``<inbox>.>``.
        publish: subject patterns it may publish to.
        subscribe: subject patterns it may subscribe to.
        responds: whether it answers requests (publishes to the reply subject it was sent).
    """

    identity: str
    inbox: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    responds: bool = False


def inbox_of(identity: str) -> str:
    """The inbox prefix of ``identity``: ``_INBOX_<identity>`` (one token, dots replaced)."""
    return "_INBOX_" + identity.replace(".", "_")


def executor_identity(node_id: str) -> str:
    """The identity of the executor of ``node_id``."""
    return f"executor-{node_id}"


# --- JetStream API pieces ----------------------------------------------------------------
def _durable(stream: str, durable: str) -> list[str]:
    """Fetch from, read the state of and ack one durable pull consumer (not create it)."""
    return [
        f"{API}.CONSUMER.MSG.NEXT.{stream}.{durable}",
        f"{API}.CONSUMER.INFO.{stream}.{durable}",
        f"$JS.ACK.{stream}.{durable}.>",
    ]


def _stream_read(stream: str) -> list[str]:
    """Read a stream's state and single messages, and follow it with ordered consumers of
    one's own (ephemeral: they go when the reader does)."""
    return [
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.STREAM.MSG.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}.>",
        # The unnamed create makes an ephemeral consumer only: the server refuses a durable
        # name there, so no identity but the provisioner can create or change a durable.
        f"{API}.CONSUMER.CREATE.{stream}",
        f"{FLOW_CONTROL}.{stream}.>",
    ]


def _ephemeral_cleanup(stream: str) -> list[str]:
    """Delete the ordered consumers one made (nats-py deletes a watch's consumer when it
    stops). Never granted on a stream with durables another identity needs."""
    return [f"{API}.CONSUMER.DELETE.{stream}.>", f"{API}.CONSUMER.INFO.{stream}.>"]


def _kv_read(bucket: str) -> list[str]:
    return [*_stream_read(f"KV_{bucket}"), *_ephemeral_cleanup(f"KV_{bucket}")]


def _kv_write(bucket: str, keys: str = ">") -> list[str]:
    return [f"$KV.{bucket}.{keys}"]


def _objects_read(store: str) -> list[str]:
    return [*_stream_read(f"OBJ_{store}"), *_ephemeral_cleanup(f"OBJ_{store}")]


def _objects_write(store: str) -> list[str]:
    # Chunks go to $O.<store>.C.<nuid> and the object's record to $O.<store>.M.<name>;
    # putting an object again purges the old one's chunks (a purge of the store's stream
    # with a filter, which a permission cannot narrow to one object).
    return [f"$O.{store}.C.>", f"$O.{store}.M.>", f"{API}.STREAM.PURGE.OBJ_{store}"]


def _dead_letters(service: str) -> list[str]:
    return [subjects.deadletter(service)]


def _common(service: str) -> tuple[list[str], list[str]]:
    """What every service identity may do: answer its health checks, record its dead
    letters, read the cluster configuration and account information."""
    publish = [*_dead_letters(service), *_kv_read(subjects.KV_CONFIG), *ACCOUNT_READS]
    subscribe = [subjects.health(service)]
    return publish, subscribe


def _events(kinds: Iterable[str]) -> list[str]:
    return [subjects.job_event("*", kind) for kind in kinds]


# --- the identities ----------------------------------------------------------------------
def provisioner() -> Permissions:
    """The administrator: the only identity that creates, updates and deletes streams,
    consumers and buckets (the one-shot set-up, a new node's durable), and the one the
    operators' own commands use (cluster configuration, replaying dead letters, tests that
    look at everything). It may do anything; its key stays with the operators."""
    identity = "provisioner"
    return Permissions(identity, inbox_of(identity), publish=(">",), subscribe=(">",))


def service(name: str, *, partitions: int = 0) -> Permissions:
    """The identity every replica of service ``name`` shares.

    Args:
        name: one of :data:`subjects.SERVICES` other than ``executor`` (see :func:`executor`).
        partitions: the scheduler's partition count (its durables and request subjects).
    """
    publish, subscribe = _common(name)
    if name == "trigger":
        publish += [
            *_events((subjects.SUBMITTED, subjects.CHILD_ADDED)),
            *_durable(subjects.STREAM_EVENTS, subjects.durable("trigger", "events")),
            *_durable(subjects.STREAM_EXTERNAL, subjects.durable("trigger", "external")),
            *_durable(subjects.STREAM_JOBS, subjects.durable("trigger", "completions")),
            *_stream_read(subjects.STREAM_JOBS),
        ]
        for bucket in (
            subjects.KV_TRIGGERS,
            subjects.KV_TRIGGER_STATE,
            subjects.KV_TRIGGER_STATS,
            subjects.KV_WORKFLOWS,
        ):
            publish += [*_kv_read(bucket), *_kv_write(bucket)]
        publish += _kv_read(subjects.KV_HANDLERS)
        # Cancelling a workflow cancels its jobs through their partitions' owners; a plain
        # submit's `after` and a workflow's state are checked with the tracker.
        publish += [f"{subjects.PREFIX}.api.scheduler.*.cancel", subjects.API_JOB_GET, subjects.API_JOB_LIST]
        subscribe += [
            subjects.API_SUBMIT,
            f"{subjects.PREFIX}.api.triggers.*",
            f"{subjects.PREFIX}.api.workflows.*",
        ]
    elif name == "scheduler":
        publish += [
            *_events(
                (
                    subjects.SUBMITTED,  # a fallback job, and a mapped step's items
                    subjects.READY,
                    subjects.SUCCEEDED,  # a mapped step ends when its items have
                    subjects.WAITING,
                    subjects.RETRYING,
                    subjects.GAVE_UP,
                    subjects.LOST,
                    subjects.EXPIRED,
                    subjects.CANCELLING,
                    subjects.CANCELLED,
                    subjects.DEP_WATCH,
                    subjects.DEP_ENDED,
                )
            ),
            subjects.node_cancel("*"),
            *_kv_read(subjects.KV_LEASES),
            *_kv_write(subjects.KV_LEASES),
            *_objects_read(subjects.OBJ_RESULTS),
            *_objects_write(subjects.OBJ_RESULTS),
            *_kv_read(subjects.KV_NODES),
        ]
        for number in range(partitions):
            publish += _durable(subjects.STREAM_JOBS, subjects.durable("scheduler", f"p{number}"))
        # How far a partition's events are handled (services/scheduler/service.py
        # processed_through): the message after its durable's ack floor.
        publish += [f"{API}.STREAM.MSG.GET.{subjects.STREAM_JOBS}", f"{API}.DIRECT.GET.{subjects.STREAM_JOBS}"]
        subscribe += [f"{subjects.PREFIX}.api.scheduler.*.*", subjects.API_QUEUES]
    elif name == "binder":
        publish += [
            *_events((subjects.BOUND, subjects.UNPLACEABLE)),
            subjects.node_dispatch("*"),
            subjects.node_cancel("*"),
            *_durable(subjects.STREAM_JOBS, subjects.durable("binder", "ready")),
            *_durable(subjects.STREAM_JOBS, subjects.durable("binder", "release")),
            *_durable(subjects.STREAM_JOBS, subjects.durable("binder", "cancel")),
            *_kv_read(subjects.KV_ALLOC),
            *_kv_write(subjects.KV_ALLOC),
            *_kv_read(subjects.KV_NODES),
        ]
        subscribe.append(subjects.API_NODES)
    elif name == "tracker":
        publish += [
            *_durable(subjects.STREAM_JOBS, subjects.durable("tracker", "jobs")),
            *_durable(subjects.STREAM_DISPATCH, subjects.durable("tracker", "dispatch")),
            *_stream_read(subjects.STREAM_LOGS),
            *_ephemeral_cleanup(subjects.STREAM_LOGS),
            *_objects_read(subjects.OBJ_RESULTS),
            f"{subjects.PREFIX}.watch.*",
        ]
        subscribe += [subjects.API_JOB_GET, subjects.API_JOB_LIST]
    else:
        raise ValueError(f"service: {name!r} is not a service with a shared identity (executors have one per node)")
    inbox = inbox_of(name)
    return Permissions(name, inbox, tuple(publish), (*subscribe, f"{inbox}.>"), responds=True)


def in_domain(patterns: Iterable[str], domain: str) -> list[str]:
    """The JetStream API and KV grants among ``patterns`` as they reach the permission
    check of an edge server (a leaf node of a hub whose JetStream domain is ``domain``).

    That server maps its clients' ``$JS.API.>`` onto ``$JS.<domain>.API.>`` and ``$KV.>``
    onto ``$JS.<domain>.API.$KV.>`` (``jobmesh.dev.servers.nats_config``, docs/nats-cluster.md)
    before it checks the client's publish permissions, so a grant holds there only in that
    form. Each is the same call on the same stream or key, only addressed through the
    domain: nothing is granted that the plain form does not grant.

    Raises:
        ValueError: ``domain`` is not one subject token (a wildcard would grant the calls in
            every domain).
    """
    if not domain or any(c in domain for c in ".*> \t"):
        raise ValueError(f"in_domain: {domain!r} is not a JetStream domain (one subject token, no wildcards)")
    found = []
    for pattern in patterns:
        if pattern.startswith(f"{API}."):
            found.append(f"$JS.{domain}.API.{pattern.removeprefix(f'{API}.')}")
        elif pattern.startswith("$KV."):
            found.append(f"$JS.{domain}.API.{pattern}")
    return found


def executor(node_id: str, *, domain: str | None = None) -> Permissions:
    """The identity of one node's executor: its own dispatch durable, its own node record,
    and events, logs and results of the attempts it runs.

    Args:
        node_id: the node.
        domain: the hub's JetStream domain, for an executor that connects to an edge
            server: its JetStream and KV grants in that form too (:func:`in_domain`).
    """
    identity = executor_identity(node_id)
    publish, subscribe = _common("executor")
    publish += [
        *(subjects.node_event("*", kind, node_id) for kind in subjects.EXECUTOR_KINDS),
        subjects.job_log("*"),
        subjects.API_SUBMIT,  # a job's follow-ups are submitted like any client's
        *_durable(subjects.STREAM_DISPATCH, subjects.durable("executor", node_id)),
        *_kv_read(subjects.KV_NODES),
        *_kv_write(subjects.KV_NODES, node_id),
        *_kv_read(subjects.KV_HANDLERS),
        *_kv_write(subjects.KV_HANDLERS),
        *_objects_read(subjects.OBJ_RESULTS),
        *_objects_write(subjects.OBJ_RESULTS),
        *_objects_read(subjects.OBJ_UPLOADS),
    ]
    if domain is not None:
        publish += in_domain(publish, domain)
    inbox = inbox_of(identity)
    return Permissions(identity, inbox, tuple(publish), (*subscribe, f"{inbox}.>"), responds=True)


def client() -> Permissions:
    """The CLI, the SDK and the web API: submit, query and cancel, and nothing else."""
    identity = "client"
    inbox = inbox_of(identity)
    publish = [
        subjects.API_SUBMIT,
        subjects.API_JOB_GET,
        subjects.API_JOB_LIST,
        subjects.API_NODES,
        subjects.API_QUEUES,
        f"{subjects.PREFIX}.api.triggers.*",
        f"{subjects.PREFIX}.api.workflows.*",
        f"{subjects.PREFIX}.api.scheduler.*.*",
        subjects.health("*"),
        *ACCOUNT_READS,
        *_stream_read(subjects.STREAM_LOGS),
        *_ephemeral_cleanup(subjects.STREAM_LOGS),
        *_stream_read(subjects.STREAM_DEADLETTER),
        *_ephemeral_cleanup(subjects.STREAM_DEADLETTER),
        *_objects_read(subjects.OBJ_RESULTS),
        *_objects_read(subjects.OBJ_UPLOADS),
        *_objects_write(subjects.OBJ_UPLOADS),
        *_kv_read(subjects.KV_NODES),
        *_kv_read(subjects.KV_CONFIG),
    ]
    # A job's state changes and its output lines as they happen (`jobmesh run`, `logs -f`).
    subscribe = [f"{subjects.PREFIX}.watch.*", subjects.job_log("*"), f"{inbox}.>"]
    return Permissions(identity, inbox, tuple(publish), tuple(subscribe))


def integrator() -> Permissions:
    """Another system: publishes trigger events and reads what happens to jobs."""
    identity = "integrator"
    inbox = inbox_of(identity)
    # It follows job events with ephemeral consumers of its own; they go when it stops
    # reading (JM_JOBS holds every service's durables, so it may delete none).
    publish = [subjects.EVENTS_ALL, *ACCOUNT_READS, *_stream_read(subjects.STREAM_JOBS)]
    subscribe = [f"{subjects.PREFIX}.watch.*", f"{inbox}.>"]
    return Permissions(identity, inbox, tuple(publish), tuple(subscribe))


def matches(pattern: str, subject: str) -> bool:
    """Whether NATS subject ``pattern`` (``*`` one token, ``>`` the rest) covers ``subject``."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def allows(patterns: Iterable[str], subject: str) -> bool:
    """Whether any of ``patterns`` covers ``subject``."""
    return any(matches(pattern, subject) for pattern in patterns)
