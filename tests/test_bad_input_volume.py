"""Bad input at volume: 10,000 malformed, oversized, wrong-type and wrong-version messages
on every subject a service consumes, interleaved with valid jobs.

Against the five real services: every process stays alive, every bad stream message is
dead-lettered with a reason by every service that consumes its subject, every API request
is answered with an error, and every valid job still ends as designed.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict

import asyncpg
import msgspec
import nats
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.messages.v1 import DeadLetter, ErrorReply, JobSpec, NoopRuntime, ProcessRuntime, Submission
from tests.helpers import eventually

pytestmark = pytest.mark.integration

NODE_ID = "node-badvol"
NODE_ENV = {
    "JOBMESH_NODE_ID": NODE_ID,
    "JOBMESH_NODE_CPU_MILLI": "8000",
    "JOBMESH_NODE_MEMORY_MB": "8192",
    "JOBMESH_LOG_LEVEL": "WARNING",
}
TOTAL_BAD = 10_000
API_SHARE = 1_000  # of TOTAL_BAD: request/reply messages, the rest go to streams
OVERSIZED_EVERY = 100  # one stream message in 100 is oversized (300 KiB each: 90 of them)
VALID_EVERY = 500  # after every 500 bad messages, a few valid jobs
PAD = b"x" * (300 * 1024)

# Lifecycle kinds on JM_JOBS and the services that consume each (docs/architecture.md, Subjects).
JOB_KINDS = {
    subjects.SUBMITTED: ("job.submitted", {"scheduler", "tracker"}),
    subjects.READY: ("job.ready", {"binder", "tracker"}),
    subjects.UNPLACEABLE: ("job.unplaceable", {"scheduler", "tracker"}),
    subjects.STARTED: ("job.started", {"tracker"}),
    subjects.SUCCEEDED: ("job.succeeded", {"scheduler", "binder", "tracker"}),
    subjects.FAILED: ("job.failed", {"scheduler", "binder", "tracker"}),
    subjects.EXPIRED: ("job.expired", {"scheduler", "binder", "tracker"}),
    subjects.LOST: ("job.lost", {"scheduler", "binder", "tracker"}),
    subjects.RETRYING: ("job.retrying", {"tracker"}),
    subjects.GAVE_UP: ("job.gave_up", {"tracker"}),
    subjects.CANCELLING: ("job.cancelling", {"binder", "tracker"}),
    subjects.CANCELLED: ("job.cancelled", {"scheduler", "binder", "tracker"}),
    subjects.DEP_WATCH: ("job.dep_watch", {"scheduler"}),
    subjects.CHILD_ADDED: ("job.child_added", {"scheduler"}),
    subjects.DEP_ENDED: ("job.dep_ended", {"scheduler"}),
}


def stream_targets() -> list[tuple[str, str, set[str], bool]]:
    """Every consumed stream subject: (subject, its message tag, its consumers, typed).

    ``typed`` is False for external events, which may be any JSON value: only what is not
    JSON (or is oversized) is bad there.
    """
    targets = [
        (subjects.job_event(p, kind), tag, consumers, True)
        for kind, (tag, consumers) in JOB_KINDS.items()
        for p in range(4)  # every scheduler partition (JOBMESH_PARTITIONS defaults to 4)
    ]
    targets.append((subjects.node_dispatch(NODE_ID), "job.bound", {"executor", "tracker"}, True))
    targets.append((subjects.node_cancel(NODE_ID), "node.cancel", {"executor"}, True))
    targets.append((f"{subjects.PREFIX}.events.badvol.probe", "", {"trigger"}, False))
    return targets


def bad_payload(i: int, tag: str, typed: bool) -> tuple[str, bytes]:
    """The ``i``-th bad payload for a subject whose messages carry ``tag``: its kind and bytes."""
    if i % OVERSIZED_EVERY == 0:
        return "oversized", b'{"type":"' + tag.encode() + b'","pad":"' + PAD + b'"}'
    kinds = ("malformed", "wrong_type", "wrong_version") if typed else ("malformed",)
    kind = kinds[i % len(kinds)]
    if kind == "malformed":
        variants = (
            b"\x00not json at all{",
            b'{"type":"' + tag.encode() + b'","job_id":"',  # cut short
            b"\xff\xfe\xfd",  # not UTF-8
            b"",
        )
        # A NUL and the index keep odd ones apart (and never make a variant valid JSON).
        return kind, variants[(i // len(kinds)) % len(variants)] + (b"\x00" + str(i).encode() if i % 2 else b"")
    if kind == "wrong_type":
        return kind, msgspec.json.encode({"type": tag, "job_id": i, "attempt": "one", "partition": "zero"})
    # A message of a version this one does not know: another tag, or not even an object.
    variants = (
        msgspec.json.encode({"type": f"v2.{tag}", "job_id": f"{i:032x}", "attempt": 1}),
        msgspec.json.encode({"version": 2, "payload": {"type": tag}}),
        msgspec.json.encode([tag, i]),
    )
    return kind, variants[(i // 3) % len(variants)]


def api_targets() -> list[str]:
    """Every request/reply API subject a service answers (health checks answer anything)."""
    fixed = [
        subjects.API_SUBMIT,
        subjects.API_JOB_GET,
        subjects.API_JOB_LIST,
        subjects.API_NODES,
        subjects.API_QUEUES,
        subjects.API_TRIGGERS_PUT,
        subjects.API_TRIGGERS_GET,
        subjects.API_TRIGGERS_LIST,
        subjects.API_TRIGGERS_DELETE,
        subjects.API_TRIGGERS_PAUSE,
        subjects.API_TRIGGERS_TEST,
        subjects.API_WORKFLOWS_RUN,
        subjects.API_WORKFLOWS_GET,
        subjects.API_WORKFLOWS_LIST,
        subjects.API_WORKFLOWS_CANCEL,
        subjects.API_WORKFLOWS_RETRY,
    ]
    return fixed + [subjects.scheduler_explain(p) for p in range(4)] + [subjects.scheduler_cancel(p) for p in range(4)]


def api_payload(i: int) -> bytes:
    """The ``i``-th bad request: not JSON, not UTF-8, the wrong message, a wrong field type."""
    variants = (
        b"\x00not json{",
        b"\xff\xfe",
        b'{"type":"api.submit","jobs":"not a list"}',
        b'{"type":"api.jobs.get","job_id":12345}',
        b'{"type":"v2.api.request"}',
        b'"just a string"',
        b'{"type":"api.triggers.put","record":{"name":7}}',
        b'{"type":"api.workflows.run","spec":[]}',
    )
    return variants[i % len(variants)]


def valid_jobs(round_no: int) -> list[tuple[Submission, str]]:
    """A few valid jobs and the state each must end in."""
    ok = JobSpec(runtime=ProcessRuntime(argv=["sh", "-c", "echo fine"]), name="badvol-ok")
    fail = JobSpec(runtime=ProcessRuntime(argv=["sh", "-c", "exit 4"]), name="badvol-fail")
    noop = JobSpec(runtime=NoopRuntime(), name="badvol-noop")
    return [
        (Submission(spec=spec), state) for spec, state in ((ok, "succeeded"), (fail, "failed"), (noop, "succeeded"))
    ]


class LetterTail:
    """Every dead letter, as it arrives: one ordered consumer from the stream's start."""

    def __init__(self) -> None:
        self.by_message: dict[tuple[str, int], set[str]] = defaultdict(set)
        self.letters: list[DeadLetter] = []

    async def start(self, js) -> None:
        async def on_letter(msg) -> None:
            letter = msgspec.json.decode(msg.data, type=DeadLetter)
            self.letters.append(letter)
            self.by_message[(letter.subject, letter.stream_seq)].add(letter.service)

        await js.subscribe(subjects.DEADLETTER_ALL, cb=on_letter, ordered_consumer=True)


async def test_ten_thousand_bad_messages_are_dead_lettered_and_valid_jobs_end_right(
    nats_server, database_url, make_cluster
):
    cluster = await make_cluster(env=NODE_ENV, name="badvol")
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream(publish_async_max_pending=2_000)
    tail = LetterTail()
    await tail.start(js)
    client = await Client.connect(nats_server.url, timeout=30)
    conn = await asyncpg.connect(database_url)
    try:
        targets = stream_targets()
        expected: dict[tuple[str, int], set[str]] = {}
        kinds_sent: dict[str, int] = defaultdict(int)
        valid: dict[str, str] = {}
        pending: list[tuple[str, set[str], asyncio.Future]] = []
        cycle = itertools.cycle(targets)
        stream_count = TOTAL_BAD - API_SHARE
        for i in range(stream_count):
            subject, tag, consumers, typed = next(cycle)
            kind, payload = bad_payload(i, tag, typed)
            kinds_sent[kind] += 1
            future = await js.publish_async(subject, payload, headers={"Nats-Msg-Id": f"badvol:{i}"})
            pending.append((subject, consumers, future))
            if i % VALID_EVERY == VALID_EVERY - 1:
                jobs = valid_jobs(i)
                reply = await client.submit([s for s, _ in jobs])
                valid.update(zip(reply.job_ids, (state for _, state in jobs), strict=True))
        for subject, consumers, future in pending:
            ack = await future
            expected[(subject, ack.seq)] = consumers
        assert len(expected) == stream_count  # every bad message is in its stream, each its own

        # The API: every bad request answered, with an error; many in flight at once.
        apis = api_targets()

        async def ask(i: int) -> ErrorReply | str:
            subject = apis[i % len(apis)]
            try:
                reply = await nc.request(subject, api_payload(i), timeout=20)
            except nats.errors.TimeoutError:
                return f"{subject}: no answer"
            try:
                return msgspec.json.decode(reply.data, type=ErrorReply)
            except msgspec.DecodeError:
                return f"{subject}: answered {reply.data[:120]!r}, not an error"

        answers: list[ErrorReply | str] = []
        for start in range(0, API_SHARE, 100):
            answers.extend(await asyncio.gather(*(ask(i) for i in range(start, min(API_SHARE, start + 100)))))
        refusals = [a for a in answers if isinstance(a, str)]
        assert not refusals, refusals[:10]
        assert all(a.code and a.message for a in answers if isinstance(a, ErrorReply))

        def uncovered() -> list[tuple[tuple[str, int], set[str]]]:
            return [
                (key, want - tail.by_message.get(key, set()))
                for key, want in expected.items()
                if not want <= tail.by_message.get(key, set())
            ]

        async def all_dead_lettered():
            return not uncovered()

        try:
            await eventually(
                all_dead_lettered, timeout=150, what="every bad message dead-lettered by its consumers", interval=1.0
            )
        except AssertionError:
            missing = uncovered()
            raise AssertionError(
                f"{len(missing)} of {len(expected)} bad messages not dead-lettered by all their consumers, e.g. {missing[:10]}"
            ) from None
        for letter in tail.letters:
            assert letter.reason, letter
            assert letter.code in ("invalid_message", "oversized_message"), letter
        by_reason: dict[tuple[str, str], int] = defaultdict(int)
        for letter in tail.letters:
            by_reason[(letter.service, letter.code)] += 1
        print("bad messages sent by kind:", dict(kinds_sent), "; dead letters by service and code:", dict(by_reason))

        # Every valid job, submitted between the bad ones, ends as designed.
        async def valid_final():
            rows = await conn.fetch(
                "SELECT job_id, state FROM tracker.jobs WHERE job_id = ANY($1::text[]) AND (state = 'succeeded' OR ends_job)",
                list(valid),
            )
            return len(rows) == len(valid) and rows

        rows = await eventually(valid_final, timeout=90, what="every valid job to be final", interval=0.5)
        wrong = {r["job_id"]: (r["state"], valid[r["job_id"]]) for r in rows if r["state"] != valid[r["job_id"]]}
        assert not wrong, wrong
        assert len(valid) == 3 * (stream_count // VALID_EVERY)
        cluster.check_alive()  # not one crash
        await cluster.wait_healthy(timeout=30)
    finally:
        await conn.close()
        await client.close()
        await nc.close()
