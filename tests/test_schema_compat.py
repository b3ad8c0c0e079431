"""The v1 schemas stay compatible with the released ones, and the check sees every break.

``schemas/released/v1`` holds the schemas as last released; :mod:`jobmesh.dev.schemacompat`
compares them with ``schemas/v1``. The mutation tests change a copy of a real schema the way
a careless edit would (drop a field, change its type, make an optional field required,
rename a tag) and expect the check to fail naming the message and the field.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from jobmesh.contract.channels import request_messages
from jobmesh.dev import schemacompat, schemas

SCHEMAS = schemas.default_out_dir()
RELEASED = SCHEMAS / schemas.RELEASED_DIR
CURRENT = SCHEMAS / "v1"


def _load(directory: Path, name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    return document


def _body(document: dict[str, Any], name: str) -> dict[str, Any]:
    """The object schema of ``name`` inside a schema file (its ``$defs`` entry)."""
    body: dict[str, Any] = document["$defs"][name]
    return body


def _breaks(name: str, current: dict[str, Any]) -> list[str]:
    requests = {m.__name__ for m in request_messages()}
    return [str(b) for b in schemacompat.compare(name, _load(RELEASED, name), current, request=name in requests)]


def test_every_released_message_is_still_compatible() -> None:
    assert sorted(p.name for p in RELEASED.glob("*.json")), "the released schemas are missing"
    assert [str(b) for b in schemas.incompatible(SCHEMAS)] == []


def test_the_current_schemas_are_unchanged_against_themselves() -> None:
    for path in CURRENT.glob("*.json"):
        document = json.loads(path.read_text(encoding="utf-8"))
        assert schemacompat.compare(path.stem, document, document) == [], path.name


def test_a_dropped_field_is_a_break() -> None:
    current = copy.deepcopy(_load(CURRENT, "JobSucceeded"))
    del _body(current, "JobSucceeded")["properties"]["exit_code"]
    assert "JobSucceeded: field exit_code removed" in _breaks("JobSucceeded", current)


def test_a_dropped_nested_field_is_named_by_its_path() -> None:
    current = copy.deepcopy(_load(CURRENT, "SubmitRequest"))
    del _body(current, "Resources")["properties"]["memory_mb"]
    assert "SubmitRequest: field jobs[].spec.resources.memory_mb removed" in _breaks("SubmitRequest", current)


def test_a_changed_type_is_a_break() -> None:
    current = copy.deepcopy(_load(CURRENT, "JobListRequest"))
    _body(current, "JobListRequest")["properties"]["limit"] = {"type": "string"}
    assert "JobListRequest: field limit changed type integer -> string" in _breaks("JobListRequest", current)


def test_a_field_that_is_no_longer_nullable_changed_type() -> None:
    current = copy.deepcopy(_load(CURRENT, "JobFailed"))
    _body(current, "JobFailed")["properties"]["exit_code"] = {"type": "integer"}
    assert "JobFailed: field exit_code changed type integer|null -> integer" in _breaks("JobFailed", current)


def test_an_optional_field_made_required_is_a_break() -> None:
    current = copy.deepcopy(_load(CURRENT, "JobStarted"))
    _body(current, "JobStarted")["required"].append("incarnation")
    assert "JobStarted: field incarnation became required" in _breaks("JobStarted", current)


def test_a_new_field_added_as_required_is_a_break() -> None:
    current = copy.deepcopy(_load(CURRENT, "JobStarted"))
    body = _body(current, "JobStarted")
    body["properties"]["zone"] = {"type": "string", "description": "The node's zone."}
    body["required"].append("zone")
    assert "JobStarted: field zone added as required (must have a default)" in _breaks("JobStarted", current)
    # The same field with a default (optional) is additive.
    body["required"].remove("zone")
    assert _breaks("JobStarted", current) == []


def test_a_renamed_tag_is_a_break() -> None:
    current = copy.deepcopy(_load(CURRENT, "JobLost"))
    _body(current, "JobLost")["properties"]["type"] = {"enum": ["job.gone"]}
    assert any(b.startswith('JobLost: field type enum lost "job.lost"') for b in _breaks("JobLost", current))


def test_a_runtime_variant_removed_is_a_break() -> None:
    current = copy.deepcopy(_load(CURRENT, "JobSubmitted"))
    runtime = _body(current, "JobSpec")["properties"]["runtime"]
    runtime["anyOf"] = [r for r in runtime["anyOf"] if not r["$ref"].endswith("/ContainerRuntime")]
    assert "JobSubmitted: field spec.runtime<container> variant removed" in _breaks("JobSubmitted", current)


def test_additive_changes_pass() -> None:
    current = copy.deepcopy(_load(CURRENT, "JobStarted"))
    body = _body(current, "JobStarted")
    body["properties"]["new_optional"] = {"type": "string", "default": "", "description": "added later"}
    body["properties"]["node_id"]["description"] = "reworded"
    assert _breaks("JobStarted", current) == []


def test_an_enum_narrows_a_request_but_only_documents_an_event() -> None:
    request = copy.deepcopy(_load(CURRENT, "JobListRequest"))
    _body(request, "JobListRequest")["properties"]["queue"]["enum"] = ["a", "b"]
    assert "JobListRequest: field queue became an enum in a request (narrows what is accepted)" in _breaks(
        "JobListRequest", request
    )
    event = copy.deepcopy(_load(CURRENT, "JobLost"))
    _body(event, "JobLost")["properties"]["reason"]["enum"] = ["lease expired"]
    assert _breaks("JobLost", event) == []


def test_a_removed_message_fails_the_command_line_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "schemas"
    assert schemas.main(["--out", str(out)]) == 0
    shutil.copytree(RELEASED, out / schemas.RELEASED_DIR)
    assert schemas.main(["--check", "--out", str(out)]) == 0

    broken = json.loads((out / "v1" / "JobStarted.json").read_text(encoding="utf-8"))
    del broken["$defs"]["JobStarted"]["properties"]["node_id"]
    (out / schemas.RELEASED_DIR / "Gone.json").write_text(json.dumps({"$defs": {}}), encoding="utf-8")
    # The stale check would fire first; the compatibility check is what is under test.
    (out / "v1" / "JobStarted.json").write_text(json.dumps(broken), encoding="utf-8")
    found = [str(b) for b in schemas.incompatible(out)]
    assert "Gone: message removed" in found
    assert "JobStarted: field node_id removed" in found
