"""Garbage, wrong-type and oversized messages on every consumed subject are dead-lettered
with their reason, and every service keeps serving afterwards."""

from __future__ import annotations

from typing import TypeVar

import msgspec
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.messages.v1 import ErrorReply, HandlerInfo, JobSpec, ProcessRuntime, Submission
from jobmesh.errors import InvalidMessage, InvalidSpec
from tests.cluster_fixtures import NODE_ID, dead_letters, job_status, jobmesh_cli, submitted_job_id
from tests.helpers import eventually

pytestmark = pytest.mark.integration

GARBAGE = b"\x00not json at all{"
OVERSIZED = b'{"type":"job.submitted","pad":"' + b"x" * (300 * 1024) + b'"}'


def wrong_type(tag: str) -> bytes:
    # Valid JSON with the right tag but a field of the wrong type.
    return msgspec.json.encode({"type": tag, "job_id": 12345, "attempt": "one", "partition": 0})


# subject -> the services that consume it (each must dead-letter what it cannot read)
CONSUMED = {
    subjects.job_event(0, subjects.SUBMITTED): ({"scheduler", "tracker"}, "job.submitted"),
    subjects.job_event(0, subjects.UNPLACEABLE): ({"scheduler", "tracker"}, "job.unplaceable"),
    subjects.job_event(0, subjects.READY): ({"binder", "tracker"}, "job.ready"),
    subjects.job_event(0, subjects.SUCCEEDED): ({"scheduler", "binder", "tracker"}, "job.succeeded"),
    subjects.job_event(0, subjects.FAILED): ({"scheduler", "binder", "tracker"}, "job.failed"),
    subjects.job_event(0, subjects.STARTED): ({"tracker"}, "job.started"),
    subjects.node_dispatch(NODE_ID): ({"executor", "tracker"}, "job.bound"),
}


async def test_bad_messages_are_dead_lettered_and_services_keep_serving(cluster, nats_server, nc):
    js = nc.jetstream()
    expected: set[tuple[str, str, str]] = set()
    for subject, (services, tag) in CONSUMED.items():
        for kind, payload in (("garbage", GARBAGE), ("wrong_type", wrong_type(tag)), ("oversized", OVERSIZED)):
            await js.publish(subject, payload, headers={"Nats-Msg-Id": f"bad:{subject}:{kind}"})
            for service in services:
                expected.add((service, subject, kind))

    def classify(letter) -> str:
        if letter.code == "oversized_message":
            return "oversized"
        if "malformed JSON" in letter.reason:
            return "garbage"
        return "wrong_type"

    async def all_recorded():
        got = {(d.service, d.subject, classify(d)) for d in await dead_letters(js)}
        return expected <= got

    await eventually(all_recorded, timeout=30, what="every bad message to be dead-lettered")
    letters = await dead_letters(js)
    for letter in letters:
        assert letter.reason and letter.code in ("invalid_message", "oversized_message")
    wrong = [d for d in letters if d.subject == subjects.job_event(0, subjects.READY) and classify(d) == "wrong_type"]
    assert any("job_id" in d.reason or "attempt" in d.reason for d in wrong), [d.reason for d in wrong]
    # Each names the path of the first field it could not read.
    for letter in letters:
        if letter.subject in CONSUMED and classify(letter) == "wrong_type":
            assert letter.reason.endswith("at `$.job_id`"), letter

    # The API: garbage gets a clear error reply and a dead letter; nothing is published.
    reply = await nc.request(subjects.API_SUBMIT, GARBAGE, timeout=5)
    error = msgspec.json.decode(reply.data, type=ErrorReply)
    assert error.code == "invalid_message"
    assert error.field == "", error  # not JSON: there is no field to name
    client = await Client.connect(nats_server.url)
    try:
        with pytest.raises(InvalidMessage) as caught:
            await client.request(
                subjects.API_SUBMIT,
                {
                    "type": "api.submit",
                    "jobs": [{"spec": {"runtime": {"kind": "process", "argv": ["x"]}, "priority": -1}}],
                },
                ErrorReply,
                "trigger",
            )
        assert caught.value.field == "jobs[0].spec.priority"
        with pytest.raises(InvalidSpec) as caught:
            await client.submit([Submission(spec=JobSpec(runtime=ProcessRuntime(argv=["x"]), concurrency_limit=2))])
        assert caught.value.field == "jobs[0].spec.concurrency_key"
        reply = await nc.request(subjects.API_SUBMIT, OVERSIZED, timeout=5)
        error = msgspec.json.decode(reply.data, type=ErrorReply)
        assert error.code == "oversized_message"
        assert error.field == "", error  # refused by its size, before any field is read

        async def api_letters():
            return len([d for d in await dead_letters(js) if d.service == "trigger"]) >= 4

        await eventually(api_letters, what="API rejects to be dead-lettered")
    finally:
        await client.close()

    # Every service still serves: a real job goes through all five.
    result = jobmesh_cli(["run", "--", "sh", "-c", "echo still-alive"], nats_server.url)
    assert result.returncode == 0, result.stderr
    assert "still-alive" in result.stdout
    assert job_status(submitted_job_id(result.stderr), nats_server.url)["state"] == "succeeded"
    cluster.check_alive()


# --- runtimes and isolation: refused at submit, the field named, nothing created ---------------
E = TypeVar("E", bound=Exception)
HANDLER = {"runtime": {"kind": "handler", "handler": "digits.train", "input": {}}}


async def refused_submit(nats_server, nc, spec: dict, error: type[E]) -> E:
    """The error a submit of ``spec`` is refused with; nothing reached JM_JOBS."""
    before = (await nc.jetstream().stream_info(subjects.STREAM_JOBS)).state.messages
    client = await Client.connect(nats_server.url)
    try:
        with pytest.raises(error) as caught:
            await client.request(subjects.API_SUBMIT, _raw_submit(spec), ErrorReply, "trigger")
    finally:
        await client.close()
    assert (await nc.jetstream().stream_info(subjects.STREAM_JOBS)).state.messages == before
    return caught.value


def _raw_submit(spec: dict) -> dict:
    return {"type": "api.submit", "jobs": [{"spec": {"runtime": {"kind": "process", "argv": ["x"]}, **spec}}]}


@pytest.mark.parametrize(
    ("spec", "field", "says"),
    [
        ({"constraints": {"isolation": "chroot"}}, "jobs[0].spec.constraints.isolation", "Invalid enum value 'chroot'"),
        ({"secrets": ["../etc/passwd"]}, "jobs[0].spec.secrets[0]", "matching regex"),
        ({"secrets": ["ok", "a/b"]}, "jobs[0].spec.secrets[1]", "matching regex"),
        ({"files": [{"path": "a/../../x", "object": "sha256/0"}]}, "jobs[0].spec.files[0].path", "'..' component"),
        ({"files": [{"path": "/etc/passwd", "object": "sha256/0"}]}, "jobs[0].spec.files[0].path", "matching regex"),
        ({"files": [{"path": "a", "node_path": "relative"}]}, "jobs[0].spec.files[0].node_path", "not an absolute"),
        ({"files": [{"path": "a"}]}, "jobs[0].spec.files[0]", "exactly one source"),
        ({"stdin": "x", "stdin_object": "sha256/0"}, "jobs[0].spec.stdin_object", "both set"),
        # 40000 characters, under the contract's max_length, but 80000 bytes of UTF-8.
        ({"stdin": "é" * 40_000}, "jobs[0].spec.stdin", "80000 bytes (UTF-8) exceed the inline limit"),
        ({"constraints": {"labels": {"gpu\n": "a100"}}}, "jobs[0].spec.constraints.labels", "bad label key"),
        # A handler gets its input alone: what a process starts from would be silently lost.
        (HANDLER | {"secrets": ["API_TOKEN"]}, "jobs[0].spec.secrets", "a handler job gets only its runtime.input"),
        (HANDLER | {"stdin": "x"}, "jobs[0].spec.stdin", "a stdin is for process and container jobs"),
        (HANDLER | {"stdin_object": "sha256/" + "0" * 64}, "jobs[0].spec.stdin_object", "a stdin is for"),
        (HANDLER | {"files": [{"path": "a", "node_path": "/srv/a"}]}, "jobs[0].spec.files", "input files are for"),
    ],
)
async def test_bad_isolation_secrets_files_and_stdin_are_refused_by_the_api_naming_the_field(
    cluster, nats_server, nc, spec, field, says
):
    caught = await refused_submit(nats_server, nc, spec, InvalidMessage)
    assert caught.field == field and says in caught.message, caught


async def test_the_cli_names_the_field_of_a_bad_isolation_secret_or_handler_input(cluster, nats_server, nc):
    bad_level = jobmesh_cli(["submit", "--isolation", "chroot", "--", "true"], nats_server.url)
    assert bad_level.returncode == 1 and "argument --isolation: invalid choice: 'chroot'" in bad_level.stderr

    bad_secret = jobmesh_cli(["submit", "--secret", "../id_rsa", "--", "true"], nats_server.url)
    assert bad_secret.returncode == 1
    assert "(flag --secret) (field secrets[0])" in bad_secret.stderr, bad_secret.stderr

    # A handler whose type an executor advertised: the trigger checks the input at submit.
    record = HandlerInfo(
        name="bad-input-adder",
        input_type="tests.AddIn",
        output_type="tests.AddOut",
        input_schema={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        output_schema={"type": "object"},
    )
    await (await nc.jetstream().key_value(subjects.KV_HANDLERS)).put(record.name, encode(record))
    bad_input = jobmesh_cli(["submit", "--handler", record.name, "--input", '{"n": "two"}'], nats_server.url)
    assert bad_input.returncode == 1
    assert "(field jobs[0].spec.runtime.input.n)" in bad_input.stderr, bad_input.stderr
    good = jobmesh_cli(["submit", "--handler", record.name, "--input", '{"n": 2}'], nats_server.url)
    assert good.returncode == 0, good.stderr


@pytest.mark.parametrize(
    ("spec", "field", "says"),
    [
        # A line break in a name would be a line of its own in a container's env file.
        (
            {"runtime": {"kind": "container", "image": "alpine:3", "env": {"X\nJOBMESH_SECRET_DB": "1"}}},
            "jobs[0].spec.runtime.env['X\\nJOBMESH_SECRET_DB']",
            "is not a variable name",
        ),
        (
            {"runtime": {"kind": "process", "argv": ["x"], "env": {"A=B": "1"}}},
            "jobs[0].spec.runtime.env['A=B']",
            "is not a variable name",
        ),
        (
            {"runtime": {"kind": "process", "argv": ["x"], "env": {"1X": "1"}}},
            "jobs[0].spec.runtime.env['1X']",
            "not a digit first",
        ),
        (
            {"runtime": {"kind": "process", "argv": ["x"], "env": {"A": "x\u0000y"}}},
            "jobs[0].spec.runtime.env['A']",
            "NUL",
        ),
        (
            {"runtime": {"kind": "container", "image": "i", "env": {"CERT": "line one\nline two"}}},
            "jobs[0].spec.runtime.env['CERT']",
            "a container's variable cannot hold a line break",
        ),
        (
            {"retry": {"fallback": {"runtime": {"kind": "container", "image": "i", "env": {"BAD KEY": "1"}}}}},
            "jobs[0].spec.retry.fallback.runtime.env['BAD KEY']",
            "is not a variable name",
        ),
    ],
)
async def test_a_variable_name_that_is_not_a_name_is_refused_by_the_api_naming_the_variable(
    cluster, nats_server, nc, spec, field, says
):
    caught = await refused_submit(nats_server, nc, spec, InvalidSpec)
    assert caught.field == field and says in caught.message, caught
