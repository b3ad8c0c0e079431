"""The generated wire contract under schemas/ is current, well-formed and true to the code.

Runs ``jobmesh.dev.schemas``'s check in-process (no subprocess, no server), then checks each
generated file and validates real encoded messages against their schemas with a small
validator (required keys, the ``type`` tag, types, enums, bounds), so no JSON Schema
library is needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from jobmesh.dev import schemas as schemagen
from jobmesh.contract import subjects
from jobmesh.contract.messages import v1

SCHEMAS = schemagen.default_out_dir()


def _load(relative: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / relative).read_text(encoding="utf-8"))


# --- freshness -----------------------------------------------------------------------
def test_schemas_are_current() -> None:
    stale = schemagen.check(SCHEMAS)
    assert not stale, stale.report(SCHEMAS)


def test_check_names_every_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "schemas"
    assert schemagen.main(["--out", str(out)]) == 0  # a fresh copy, whatever the checkout's state
    (out / "v1" / "JobReady.json").write_text("{}\n")
    (out / "v1" / "JobLost.json").unlink()
    (out / "v1" / "Gone.json").write_text(json.dumps({"$comment": schemagen.MARKER}) + "\n")

    stale = schemagen.check(out)
    assert stale.changed == ("v1/JobReady.json",)
    assert stale.missing == ("v1/JobLost.json",)
    assert stale.unexpected == ("v1/Gone.json",)

    assert schemagen.main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    for name in ("JobReady.json", "JobLost.json", "Gone.json", "make schemas"):
        assert name in err

    assert schemagen.main(["--out", str(out)]) == 0
    assert not schemagen.check(out)
    assert not (out / "v1" / "Gone.json").exists()


def test_rendering_is_deterministic() -> None:
    assert schemagen.render() == schemagen.render()


# --- files ---------------------------------------------------------------------------
def _generated_files() -> list[str]:
    return sorted(schemagen.render())


@pytest.mark.parametrize("relative", _generated_files())
def test_file_is_marked_json(relative: str) -> None:
    text = (SCHEMAS / relative).read_text(encoding="utf-8")
    assert text.endswith("}\n")
    document = json.loads(text)
    marker_key = "x-generated" if relative == schemagen.ASYNCAPI_PATH else "$comment"
    assert document[marker_key] == schemagen.MARKER
    # The marker leads the file, so a reader sees it before anything else.
    assert next(iter(document)) == marker_key


def test_every_wire_message_has_a_schema_and_a_channel() -> None:
    names = {m.__name__ for m in schemagen.wire_messages()}
    expected = {
        "JobSubmitted", "JobReady", "JobUnplaceable", "JobBound", "JobStarted", "JobSucceeded",
        "JobFailed", "JobExpired", "JobLost", "LogLine", "SubmitRequest", "SubmitReply",
        "ErrorReply", "JobGetRequest", "JobListRequest", "JobView", "JobListReply",
        "JobUpdate", "HealthReply", "DeadLetter", "NodeInfo", "Allocation",
    }
    assert expected <= names
    for name in names:
        assert (SCHEMAS / "v1" / f"{name}.json").exists(), name
    assert schemagen.unmapped_messages() == [], "add these messages to schemagen.CHANNELS"


@pytest.mark.parametrize("message", schemagen.wire_messages(), ids=lambda m: m.__name__)
def test_schema_carries_the_type_tag(message: type[msgspec.Struct]) -> None:
    schema = _load(f"v1/{message.__name__}.json")
    body = _resolve(schema, schema)
    assert "type" in body["required"]
    assert body["properties"]["type"]["enum"] == [schemagen.type_tag(message)]


# --- samples -------------------------------------------------------------------------
SPEC = v1.JobSpec(runtime=v1.ProcessRuntime(argv=["echo", "hi"]), queue="q1", priority=3)
SAMPLES: list[msgspec.Struct] = [
    v1.JobSubmitted(job_id="j-1", partition=0, spec=SPEC, idempotency_key="k", submitted_at=1.0),
    v1.JobReady(
        job_id="j-1", attempt=1, partition=0, spec=SPEC, candidates=["n1"], submitted_at=1.0, ready_at=2.0
    ),
    v1.JobBound(
        job_id="j-1", attempt=1, partition=0, node_id="n1", spec=SPEC, scratch_dir="/tmp/j-1",
        submitted_at=1.0, bound_at=2.0,
    ),
    v1.JobFailed(
        job_id="j-1", attempt=2, partition=0, node_id="n1", exit_code=None,
        error=v1.JobError(code="timeout", message="run timeout"), output_tail="",
        submitted_at=1.0, started_at=2.0, at=3.0,
    ),
    v1.LogLine(job_id="j-1", attempt=1, stream="stderr", line="boom", at=1.0),
    v1.SubmitRequest(jobs=[v1.Submission(spec=SPEC, idempotency_key="order-7")]),
    v1.SubmitReply(job_ids=["j-1"], duplicates=[False]),
    v1.ErrorReply(code="invalid_message", message="bad", field="jobs[0].spec.priority"),
    v1.JobListRequest(limit=10, state="running"),
    v1.JobUpdate(job_id="j-1", state="running", attempt=1, node_id="n1", at=2.0),
    v1.HealthReply(service="tracker", instance="h-1", ok=True),
    v1.DeadLetter(service="binder", subject="jobmesh.v1.job.0.ready", code="invalid_message",
                  reason="missing field", size=3, payload_head="{}"),
    v1.NodeInfo(node_id="n1", cpu_milli=2000, memory_mb=4096, labels={"arch": "amd64"}),
    v1.Allocation(
        node_id="n1",
        reservations={"j-1:1": v1.Reservation(resources=v1.Resources(), scratch_dir="/tmp/j-1", at=1.0)},
    ),
]


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_encoded_sample_validates(sample: msgspec.Struct) -> None:
    schema = _load(f"v1/{type(sample).__name__}.json")
    instance = json.loads(msgspec.json.encode(sample))
    assert instance["type"] == schemagen.type_tag(type(sample))
    assert _errors(instance, schema) == []


def test_validator_rejects_a_broken_message() -> None:
    schema = _load("v1/JobSubmitted.json")
    good = json.loads(msgspec.json.encode(SAMPLES[0]))
    missing = {k: v for k, v in good.items() if k != "job_id"}
    wrong_tag = {**good, "type": "job.ready"}
    bad_priority = {**good, "spec": {**good["spec"], "priority": 12}}
    assert any("job_id" in e for e in _errors(missing, schema))
    assert any("$.type" in e for e in _errors(wrong_tag, schema))
    assert any("$.spec.priority" in e for e in _errors(bad_priority, schema))


# --- AsyncAPI ------------------------------------------------------------------------
def test_asyncapi_references_resolve() -> None:
    doc = _load(schemagen.ASYNCAPI_PATH)
    assert doc["asyncapi"] == "3.0.0"
    refs = list(_refs(doc))
    assert refs
    for ref in refs:
        assert ref.startswith("#/"), ref
        _pointer(doc, ref)  # raises KeyError when dangling


def test_asyncapi_covers_every_subject() -> None:
    doc = _load(schemagen.ASYNCAPI_PATH)
    addresses = {c["address"] for c in doc["channels"].values()}
    expected = {
        subjects.API_SUBMIT, subjects.API_JOB_GET, subjects.API_JOB_LIST, subjects.API_NODES,
        subjects.API_QUEUES, subjects.health("{service}"), subjects.job_watch("{job_id}"),
        subjects.job_log("{job_id}"), subjects.node_dispatch("{node_id}"),
        subjects.deadletter("{service}"), subjects.job_event("{partition}", "{kind}"),  # type: ignore[arg-type]
    }
    expected |= {subjects.job_event("{partition}", k) for k in schemagen.job_kinds()}  # type: ignore[arg-type]
    assert expected <= addresses
    assert any(a and a.startswith(subjects.EVENTS_ALL.removesuffix(">")) for a in addresses)
    streams = {c.get("x-stream") for c in doc["channels"].values()}
    assert {subjects.STREAM_JOBS, subjects.STREAM_DISPATCH, subjects.STREAM_LOGS,
            subjects.STREAM_DEADLETTER, subjects.STREAM_EVENTS} <= streams


def test_asyncapi_parameters_and_operations_are_consistent() -> None:
    doc = _load(schemagen.ASYNCAPI_PATH)
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
    doc = _load(schemagen.ASYNCAPI_PATH)
    ops = doc["operations"]

    def parties(channel: str, action: str) -> set[str]:
        return {op["tags"][0]["name"] for op in ops.values()
                if op["channel"]["$ref"] == f"#/channels/{channel}" and op["action"] == action}

    assert parties("jobSubmitted", "send") == {"trigger"}
    assert parties("jobReady", "send") == {"scheduler"}
    assert parties("jobExpired", "send") == {"scheduler"}
    assert parties("nodeDispatch", "send") == {"binder"}
    assert parties("jobUnplaceable", "send") == {"binder"}
    assert parties("jobStarted", "send") == parties("jobSucceeded", "send") == {"executor"}
    assert parties("jobLog", "send") == {"executor"}
    assert parties("jobWatch", "send") == {"tracker"}
    assert parties("jobLost", "send") == {"binder"}  # it holds the dead node's reservations
    assert "tracker" in parties("jobEvents", "receive") & parties("nodeDispatch", "receive")
    assert parties("apiSubmit", "receive") == {"trigger"}
    assert parties("apiJobsGet", "receive") == parties("apiJobsList", "receive") == {"tracker"}
    assert parties("apiNodes", "receive") == {"binder"}  # the binder owns allocations
    assert parties("apiQueues", "receive") == parties("apiSchedulerExplain", "receive") == {"scheduler"}
    assert parties("externalEvents", "receive") == set()  # trigger rules are not built yet
    assert "x-stream" not in doc["channels"]["jobWatch"]  # core NATS, not a stream


# --- a small JSON Schema validator (the subset msgspec emits) -------------------------
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),),
}


def _pointer(doc: Any, ref: str) -> Any:
    node = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = _pointer(root, schema["$ref"])
    return schema


def _refs(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _is(value: Any, kind: str) -> bool:
    # JSON has no separate boolean-as-integer; Python's bool is an int, so exclude it.
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[kind])


def _errors(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None, path: str = "$") -> list[str]:
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if "anyOf" in schema:
        options = [_errors(value, s, root, path) for s in schema["anyOf"]]
        return [] if any(not o for o in options) else [f"{path}: matches no anyOf option: {options}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            return [*errors, f"{path}: {value!r} is not {kinds}"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > {schema['maximum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{path}: length {len(value)} out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        for i, item in enumerate(value):
            errors += _errors(item, schema.get("items", {}), root, f"{path}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: missing required {key!r}")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                errors += _errors(item, properties[key], root, f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _errors(item, schema["additionalProperties"], root, f"{path}.{key}")
    return errors
