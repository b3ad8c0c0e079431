"""The generated wire contract under schemas/ is current, well-formed and true to the code.

Runs ``jobmesh.dev.schemas``'s check in-process, renders in subprocesses under different hash
seeds, then checks each generated file with the ``jsonschema`` library: every schema is a
valid draft 2020-12 schema (``check_schema``), real encoded messages validate against their
schemas (and against the AsyncAPI document's components), a broken message is rejected,
and every ``$ref`` of the AsyncAPI document resolves (``referencing``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from jsonschema import Draft7Validator, Draft202012Validator  # type: ignore[import-untyped]
from jsonschema.exceptions import ValidationError  # type: ignore[import-untyped]
from jsonschema.protocols import Validator  # type: ignore[import-untyped]
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT7, DRAFT202012

from jobmesh.contract import channelcheck, channels, subjects
from jobmesh.contract.messages import v1
from jobmesh.dev import asyncapi, schemas

SCHEMAS = schemas.default_out_dir()
ASYNCAPI_URI = "urn:jobmesh:asyncapi"  # a name for the document in the registry; never fetched


def _load(relative: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((SCHEMAS / relative).read_text(encoding="utf-8"))
    return document


def _errors(validator: Validator, instance: Any) -> list[str]:
    """Every error as ``<JSON path>: <message>``, with the errors of each anyOf branch too."""
    found: list[str] = []

    def walk(errors: Iterator[ValidationError] | list[ValidationError]) -> None:
        for error in errors:
            found.append(f"{error.json_path}: {error.message}")
            walk(error.context or [])

    walk(validator.iter_errors(instance))
    return found


def _message_validator(name: str) -> Draft202012Validator:
    schema = _load(f"v1/{name}.json")
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _asyncapi_validator(name: str) -> Draft7Validator:
    """A validator for one payload schema of the AsyncAPI document, its $refs resolved in place.

    AsyncAPI 3's default schema format is a superset of JSON Schema draft 7, hence Draft7.
    """
    doc = _load(asyncapi.ASYNCAPI_PATH)
    Draft7Validator.check_schema(doc["components"]["schemas"][name])
    registry = Registry().with_resource(ASYNCAPI_URI, DRAFT7.create_resource(doc))
    return Draft7Validator({"$ref": f"{ASYNCAPI_URI}#/components/schemas/{name}"}, registry=registry)


# --- freshness -----------------------------------------------------------------------
def test_schemas_are_current() -> None:
    stale = schemas.check(SCHEMAS)
    assert not stale, stale.report(SCHEMAS)


def test_default_out_dir_is_the_checkouts_whatever_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert schemas.default_out_dir() == Path(__file__).resolve().parents[1] / "schemas"


def test_check_names_every_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "schemas"
    assert schemas.main(["--out", str(out)]) == 0  # a fresh copy, whatever the checkout's state
    (out / "v1" / "JobReady.json").write_text("{}\n")
    (out / "v1" / "JobLost.json").unlink()
    (out / "v1" / "Gone.json").write_text(json.dumps({"$comment": asyncapi.MARKER}) + "\n")

    stale = schemas.check(out)
    assert stale.changed == ("v1/JobReady.json",)
    assert stale.missing == ("v1/JobLost.json",)
    assert stale.unexpected == ("v1/Gone.json",)

    assert schemas.main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    for name in ("JobReady.json", "JobLost.json", "Gone.json", "make schemas"):
        assert name in err

    assert schemas.main(["--out", str(out)]) == 0
    assert not schemas.check(out)
    assert not (out / "v1" / "Gone.json").exists()


def test_rendering_is_deterministic() -> None:
    assert asyncapi.render() == asyncapi.render()


_RENDER = "import json, sys; from jobmesh.dev.asyncapi import render; sys.stdout.write(json.dumps(render()))"


def _render_in_subprocess(hash_seed: str) -> bytes:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-c", _RENDER], env=env, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def test_rendering_does_not_depend_on_the_hash_seed() -> None:
    # The iteration order of a set of str follows the hash seed; a generated file must not.
    first, second = _render_in_subprocess("0"), _render_in_subprocess("12345")
    assert first == second
    assert json.loads(first) == asyncapi.render()  # and this process has a random seed of its own


def test_an_inconsistent_table_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = channels.Channel(
        "jobBogus",
        subjects.job_event(channels.PARTITION, "bogus"),  # type: ignore[arg-type]
        (v1.JobStarted,),
        subjects.STREAM_DISPATCH,
        ("nobody",),
        (),
        "Wrong on purpose.",
    )
    monkeypatch.setattr(channels, "CHANNELS", (*channels.CHANNELS, bogus))
    with pytest.raises(channelcheck.ChannelTableError) as refused:
        channelcheck.checked_channels()
    assert "jobBogus: unknown party 'nobody'" in str(refused.value)
    assert f"jobBogus: subject jobmesh.v1.job.0.bogus is stored by ['{subjects.STREAM_JOBS}']" in str(refused.value)

    assert schemas.main(["--out", str(tmp_path / "schemas")]) == 2
    assert "jobBogus" in capsys.readouterr().err
    assert not (tmp_path / "schemas").exists()  # nothing half-written


# --- files ---------------------------------------------------------------------------
def _generated_files() -> list[str]:
    return sorted(asyncapi.render())


@pytest.mark.parametrize("relative", _generated_files())
def test_file_is_marked_json(relative: str) -> None:
    text = (SCHEMAS / relative).read_text(encoding="utf-8")
    assert text.endswith("}\n")
    document = json.loads(text)
    marker_key = "x-generated" if relative == asyncapi.ASYNCAPI_PATH else "$comment"
    assert document[marker_key] == asyncapi.MARKER
    # The marker leads the file, so a reader sees it before anything else.
    assert next(iter(document)) == marker_key


def test_every_wire_message_has_a_schema_and_a_channel() -> None:
    names = {m.__name__ for m in channels.wire_messages()}
    expected = {
        "JobSubmitted",
        "JobReady",
        "JobUnplaceable",
        "JobBound",
        "JobStarted",
        "JobSucceeded",
        "JobFailed",
        "JobExpired",
        "JobLost",
        "LogLine",
        "SubmitRequest",
        "SubmitReply",
        "ErrorReply",
        "JobGetRequest",
        "JobListRequest",
        "JobView",
        "JobListReply",
        "JobUpdate",
        "HealthReply",
        "DeadLetter",
        "NodeInfo",
        "Allocation",
    }
    assert expected <= names
    for name in names:
        assert (SCHEMAS / "v1" / f"{name}.json").exists(), name
    assert channelcheck.unmapped_messages() == [], "add these messages to jobmesh.contract.channels.CHANNELS"


@pytest.mark.parametrize("message", channels.wire_messages(), ids=lambda m: m.__name__)
def test_message_schema_is_a_valid_json_schema(message: type[msgspec.Struct]) -> None:
    schema = _load(f"v1/{message.__name__}.json")
    assert schema["$schema"] == asyncapi.JSON_SCHEMA_DIALECT
    Draft202012Validator.check_schema(schema)  # raises SchemaError naming the bad keyword


@pytest.mark.parametrize("message", channels.wire_messages(), ids=lambda m: m.__name__)
def test_schema_carries_the_type_tag(message: type[msgspec.Struct]) -> None:
    schema = _load(f"v1/{message.__name__}.json")
    uri = f"urn:jobmesh:v1:{message.__name__}"
    resolver = Registry().with_resource(uri, DRAFT202012.create_resource(schema)).resolver(uri)
    body = schema
    while "$ref" in body:
        resolved = resolver.lookup(body["$ref"])
        body, resolver = resolved.contents, resolved.resolver
    assert "type" in body["required"]
    assert body["properties"]["type"]["enum"] == [channels.type_tag(message)]


# --- samples -------------------------------------------------------------------------
SPEC = v1.JobSpec(runtime=v1.ProcessRuntime(argv=["echo", "hi"]), queue="q1", priority=3)
SAMPLES: list[msgspec.Struct] = [
    v1.JobSubmitted(job_id="j-1", partition=0, spec=SPEC, idempotency_key="k", submitted_at=1.0),
    v1.JobReady(job_id="j-1", attempt=1, partition=0, spec=SPEC, candidates=["n1"], submitted_at=1.0, ready_at=2.0),
    v1.JobBound(
        job_id="j-1",
        attempt=1,
        partition=0,
        node_id="n1",
        spec=SPEC,
        scratch_dir="/tmp/j-1",
        submitted_at=1.0,
        bound_at=2.0,
    ),
    v1.JobFailed(
        job_id="j-1",
        attempt=2,
        partition=0,
        node_id="n1",
        exit_code=None,
        error=v1.JobError(code="timeout", message="run timeout"),
        output_tail="",
        submitted_at=1.0,
        started_at=2.0,
        at=3.0,
    ),
    v1.LogLine(job_id="j-1", attempt=1, stream="stderr", line="boom", at=1.0),
    v1.SubmitRequest(jobs=[v1.Submission(spec=SPEC, idempotency_key="order-7")]),
    v1.SubmitReply(job_ids=["j-1"], duplicates=[False]),
    v1.ErrorReply(code="invalid_message", message="bad", field="jobs[0].spec.priority"),
    v1.JobListRequest(limit=10, state="running"),
    v1.JobUpdate(job_id="j-1", state="running", attempt=1, node_id="n1", at=2.0),
    v1.HealthReply(service="tracker", instance="h-1", ok=True),
    v1.DeadLetter(
        service="binder",
        subject="jobmesh.v1.job.0.ready",
        code="invalid_message",
        reason="missing field",
        size=3,
        payload_head="{}",
    ),
    v1.NodeInfo(node_id="n1", cpu_milli=2000, memory_mb=4096, labels={"arch": "amd64"}),
    v1.Allocation(
        node_id="n1",
        reservations={"j-1:1": v1.Reservation(resources=v1.Resources(), scratch_dir="/tmp/j-1", at=1.0)},
    ),
]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_encoded_sample_validates(sample: msgspec.Struct) -> None:
    name = type(sample).__name__
    instance = json.loads(msgspec.json.encode(sample))
    assert instance["type"] == channels.type_tag(type(sample))
    assert _errors(_message_validator(name), instance) == []
    assert _errors(_asyncapi_validator(name), instance) == []


@pytest.mark.parametrize("validator", [_message_validator, _asyncapi_validator], ids=["message", "asyncapi"])
def test_validator_rejects_a_broken_message(validator: Any) -> None:
    check = validator("JobSubmitted")
    good = json.loads(msgspec.json.encode(SAMPLES[0]))
    missing = {k: v for k, v in good.items() if k != "job_id"}
    wrong_tag = {**good, "type": "job.ready"}
    bad_priority = {**good, "spec": {**good["spec"], "priority": 12}}
    assert _errors(check, good) == []
    assert any("'job_id' is a required property" in e for e in _errors(check, missing))
    assert any(e.startswith("$.type:") for e in _errors(check, wrong_tag))
    assert any(e.startswith("$.spec.priority:") for e in _errors(check, bad_priority))


# --- AsyncAPI ------------------------------------------------------------------------
def _ref_values(node: Any) -> Iterator[str]:
    # The AsyncAPI document is not a JSON Schema, so no library walks it for us.
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _ref_values(value)
    elif isinstance(node, list):
        for value in node:
            yield from _ref_values(value)


def test_asyncapi_references_resolve() -> None:
    doc = _load(asyncapi.ASYNCAPI_PATH)
    assert doc["asyncapi"] == "3.0.0"
    resolver = Registry().with_resource(ASYNCAPI_URI, DRAFT7.create_resource(doc)).resolver(ASYNCAPI_URI)
    refs = sorted(set(_ref_values(doc)))
    assert refs
    dangling: list[str] = []
    for ref in refs:
        assert ref.startswith("#/"), ref
        try:
            resolver.lookup(ref)
        except Unresolvable:  # its message holds the whole document: name the ref only
            dangling.append(ref)
    assert dangling == []


def test_asyncapi_covers_every_subject() -> None:
    doc = _load(asyncapi.ASYNCAPI_PATH)
    addresses = {c["address"] for c in doc["channels"].values()}
    expected = {
        subjects.API_SUBMIT,
        subjects.API_JOB_GET,
        subjects.API_JOB_LIST,
        subjects.API_NODES,
        subjects.API_QUEUES,
        subjects.health("{service}"),
        subjects.job_watch("{job_id}"),
        subjects.job_log("{job_id}"),
        subjects.node_dispatch("{node_id}"),
        subjects.deadletter("{service}"),
    }
    expected |= {subjects.job_event("{partition}", k) for k in channels.job_kinds()}  # type: ignore[arg-type]
    # What executors publish, on the node form as well (the node is the last token).
    expected |= {subjects.node_event("{partition}", k, "{node_id}") for k in subjects.EXECUTOR_KINDS}
    assert channels.node_kinds() == list(subjects.EXECUTOR_KINDS)
    assert expected <= addresses
    # Each kind once, with its own message: no generic job.{partition}.{kind} channel besides.
    assert subjects.job_event("{partition}", "{kind}") not in addresses  # type: ignore[arg-type]
    job_channels = [c for c in doc["channels"].values() if c.get("x-stream") == subjects.STREAM_JOBS]
    assert len(job_channels) == len(channels.job_kinds()) + len(channels.node_kinds())
    assert all(len(c["messages"]) == 1 for c in job_channels)
    assert any(a and a.startswith(subjects.EVENTS_ALL.removesuffix(">")) for a in addresses)
    streams = {c.get("x-stream") for c in doc["channels"].values()}
    assert {
        subjects.STREAM_JOBS,
        subjects.STREAM_DISPATCH,
        subjects.STREAM_LOGS,
        subjects.STREAM_DEADLETTER,
        subjects.STREAM_EVENTS,
    } <= streams


def test_asyncapi_parameters_and_operations_are_consistent() -> None:
    doc = _load(asyncapi.ASYNCAPI_PATH)
    for key, channel in doc["channels"].items():
        declared = set(channel.get("parameters", {}))
        used = set(re.findall(r"\{([a-z_]+)\}", channel["address"] or ""))
        assert declared == used, key
    for op_id, op in doc["operations"].items():
        channel_ref = op["channel"]["$ref"]
        for message in op.get("messages", []):
            assert message["$ref"].startswith(channel_ref + "/messages/"), op_id
        if "reply" in op:
            for message in op["reply"]["messages"]:
                assert message["$ref"].startswith(op["reply"]["channel"]["$ref"] + "/messages/"), op_id


def test_asyncapi_matches_the_design_table() -> None:
    doc = _load(asyncapi.ASYNCAPI_PATH)
    ops = doc["operations"]

    def parties(channel: str, action: str) -> set[str]:
        return {
            op["tags"][0]["name"]
            for op in ops.values()
            if op["channel"]["$ref"] == f"#/channels/{channel}" and op["action"] == action
        }

    assert parties("jobSubmitted", "send") == {"trigger"}
    assert parties("jobReady", "send") == {"scheduler"}
    assert parties("jobExpired", "send") == {"scheduler"}
    assert parties("nodeDispatch", "send") == {"binder"}
    assert parties("jobUnplaceable", "send") == {"binder"}
    # Executors publish on the node form only; the partition form is the services' own.
    assert parties("jobStartedOnNode", "send") == parties("jobSucceededOnNode", "send") == {"executor"}
    assert parties("jobFailedOnNode", "send") == {"executor"}
    assert parties("jobStarted", "send") == parties("jobFailed", "send") == set()
    assert parties("jobSucceeded", "send") == {"scheduler"}  # a mapped step's end
    assert parties("jobLog", "send") == {"executor"}
    assert parties("jobWatch", "send") == {"tracker"}
    # The scheduler declares expired leases; an executor that restarted declares its own.
    assert parties("jobLost", "send") == {"scheduler"}
    assert parties("jobLostOnNode", "send") == {"executor"}
    # The tracker reads every kind (one filter, jobmesh.v1.job.>), named on each kind's channel.
    for kind in ("jobSubmitted", "jobReady", "jobSucceeded", "jobSucceededOnNode", "jobGaveUp", "jobChildAdded"):
        assert "tracker" in parties(kind, "receive"), kind
    assert "tracker" in parties("nodeDispatch", "receive")
    assert parties("apiSubmit", "receive") == {"trigger"}
    assert parties("apiJobsGet", "receive") == parties("apiJobsList", "receive") == {"tracker"}
    assert parties("apiNodes", "receive") == {"binder"}  # the binder owns allocations
    assert parties("apiQueues", "receive") == parties("apiSchedulerExplain", "receive") == {"scheduler"}
    assert parties("externalEvents", "receive") == {"trigger"}  # event rules
    assert "trigger" in parties("jobSucceeded", "receive") & parties("jobGaveUp", "receive")  # completion rules
    assert "trigger" in parties("jobSucceededOnNode", "receive")
    assert "x-stream" not in doc["channels"]["jobWatch"]  # core NATS, not a stream


# --- the AsyncAPI document against the AsyncAPI 3.0 specification's own JSON Schema ----
# The specification's schema ships in the AsyncAPI initiative's npm package @asyncapi/specs
# (no PyPI package carries it). It is fetched once with the npm client, pinned by version and
# by the registry's sha512 integrity, and kept under .venv (like every other dependency).
ASYNCAPI_SPECS = "@asyncapi/specs@6.11.1"
ASYNCAPI_SPECS_INTEGRITY = (
    "sha512-A3WBLqAKGoJ2+6FWFtpjBlCQ1oFCcs4GxF7zsIGvNqp/klGUHjlA3aAcZ9XMMpLGE8zPeYDz2x9FmO6DSuKraQ=="
)
ASYNCAPI_SPEC_MEMBER = "package/schemas/3.0.0-without-$id.json"


def _asyncapi_specification_schema() -> dict[str, Any]:
    import base64
    import hashlib
    import shutil
    import tarfile

    cache = Path(sys.prefix) / "share" / "asyncapi-specs" / ASYNCAPI_SPECS.rsplit("@", 1)[1]
    target = cache / "3.0.0-without-$id.json"
    if not target.exists():
        npm = shutil.which("npm")
        assert npm, "the npm client is needed once, to fetch the AsyncAPI 3.0 JSON Schema (apt-get install npm)"
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [npm, "pack", ASYNCAPI_SPECS, "--pack-destination", str(cache), "--silent"],
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        tarball = cache / done.stdout.decode().strip().splitlines()[-1]
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
        assert digest == ASYNCAPI_SPECS_INTEGRITY, f"{tarball} does not match the pinned integrity"
        with tarfile.open(tarball) as archive:
            member = archive.extractfile(ASYNCAPI_SPEC_MEMBER)
            assert member is not None, ASYNCAPI_SPEC_MEMBER
            target.write_bytes(member.read())
    schema: dict[str, Any] = json.loads(target.read_text(encoding="utf-8"))
    return schema


def test_asyncapi_document_is_valid_asyncapi_3() -> None:
    spec = _asyncapi_specification_schema()
    assert spec["title"].startswith("AsyncAPI 3.0.0"), spec.get("title")
    Draft7Validator.check_schema(spec)
    validator = Draft7Validator(spec)
    doc = _load(asyncapi.ASYNCAPI_PATH)
    assert _errors(validator, doc) == []
    # And the specification's schema is not a pushover: a document it must refuse.
    broken = {**doc, "operations": {"x": {"action": "publish", "channel": {"$ref": "#/channels/apiSubmit"}}}}
    assert _errors(validator, broken)


def test_request_operations_say_where_the_reply_goes() -> None:
    doc = _load(asyncapi.ASYNCAPI_PATH)
    requests = [op for op in doc["operations"].values() if op["action"] == "send" and "reply" in op]
    assert len(requests) >= 20
    for op in requests:
        assert op["reply"]["address"]["location"].startswith("$message.")
        assert "reply subject" in op["reply"]["address"]["description"]


def _objects(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


@pytest.mark.parametrize("message", channels.wire_messages(), ids=lambda m: m.__name__)
def test_a_request_schema_is_closed_and_an_event_schema_open(message: type[msgspec.Struct]) -> None:
    schema = _load(f"v1/{message.__name__}.json")
    objects = list(_objects(schema))
    assert objects
    if message in channels.request_messages():
        assert all(o.get("additionalProperties") is False for o in objects), message.__name__
        assert asyncapi.STRICT_NOTE in schema["description"]
    else:
        assert all("additionalProperties" not in o or o["additionalProperties"] is not False for o in objects)
        assert asyncapi.LENIENT_NOTE in schema["description"]


def test_external_events_have_a_schema_file() -> None:
    schema = _load("v1/ExternalEvent.json")
    Draft202012Validator.check_schema(schema)
    assert "not JSON is dead-lettered" in schema["description"]
    for value in ({"order": 7}, [1, 2], "text", 3):
        assert _errors(Draft202012Validator(schema), value) == []


def _properties(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict):
            for name, prop in props.items():
                yield f"{where}.{name}", prop
        for key, value in node.items():
            yield from _properties(value, f"{where}/{key}")
    elif isinstance(node, list):
        for value in node:
            yield from _properties(value, where)


@pytest.mark.parametrize("relative", [p for p in _generated_files() if p.startswith("v1/")])
def test_every_field_is_described(relative: str) -> None:
    undescribed = [where for where, prop in _properties(_load(relative), relative) if not prop.get("description")]
    assert undescribed == []


def test_states_and_codes_are_enums() -> None:
    def prop(message: str, struct: str, field: str) -> dict[str, Any]:
        found: dict[str, Any] = _load(f"v1/{message}.json")["$defs"][struct]["properties"][field]
        return found

    assert prop("ErrorReply", "ErrorReply", "code")["enum"] == list(v1.ERROR_CODES)
    assert {"invalid_message", "not_found", "unavailable"} <= set(v1.ERROR_CODES)
    assert prop("DeadLetter", "DeadLetter", "code")["enum"] == list(v1.DEADLETTER_CODES)
    assert prop("JobFailed", "JobError", "code")["enum"] == list(v1.FAILURE_CODE_NAMES)
    assert "running" in prop("JobUpdate", "JobUpdate", "state")["enum"]
    assert prop("CancelReply", "CancelReply", "state")["enum"] == ["cancelled", "cancelling", "unknown"]
    assert prop("ExplainReply", "ExplainReply", "where")["enum"] == list(v1.WAIT_PLACES)
    # Listed, not enforced: a reader of v1 still takes a code a later v1 adds.
    assert (
        msgspec.json.decode(b'{"type": "api.error", "code": "a_new_code", "message": "m"}', type=v1.ErrorReply).code
        == "a_new_code"
    )
