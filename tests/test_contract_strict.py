"""One rule for every request, one for everything else, and job ids anyone can compute.

Requests (what a client sends to an ``api.*`` subject) are strict: an unknown field anywhere,
``version: 2`` included, and a missing ``type`` tag are refused with an ErrorReply whose
``field`` names the field. Events, replies and records are lenient to unknown fields (a
newer v1 writer may add some) but need their tag too. The first tests check the codec; the
last ones send raw JSON to every API subject of a real cluster, as an outside integrator
would. Job ids are checked against the derivation docs/integrations.md states, with hashlib.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec
import pytest

from jobmesh.contract import ids, subjects
from jobmesh.contract.channels import request_messages, type_tag, wire_messages
from jobmesh.contract.codec import Codec, encode
from jobmesh.contract.messages import v1
from jobmesh.errors import InvalidMessage

NOOP = {"kind": "noop"}
# A minimal valid body of every request (its tag added from the type).
BODIES: dict[type[msgspec.Struct], dict[str, Any]] = {
    v1.SubmitRequest: {"jobs": [{"spec": {"runtime": NOOP}}]},
    v1.JobGetRequest: {"job_id": "0" * 32},
    v1.JobListRequest: {},
    v1.NodesRequest: {},
    v1.QueuesRequest: {},
    v1.ExplainRequest: {"job_id": "0" * 32},
    v1.CancelRequest: {"job_id": "0" * 32},
    v1.TriggerPutRequest: {"rule": {"name": "strict-x", "source": {"kind": "schedule", "every": 3600}, "job": {}}},
    v1.TriggerGetRequest: {"name": "strict-x"},
    v1.TriggerListRequest: {},
    v1.TriggerDeleteRequest: {"name": "strict-x"},
    v1.TriggerPauseRequest: {"name": "strict-x"},
    v1.TriggerTestRequest: {"name": "strict-x"},
    v1.WorkflowRunRequest: {"spec": {"name": "w", "steps": {"a": {"runtime": NOOP}}}},
    v1.WorkflowGetRequest: {"run_id": "0" * 32},
    v1.WorkflowListRequest: {},
    v1.WorkflowCancelRequest: {"run_id": "0" * 32},
    v1.WorkflowRetryRequest: {"run_id": "0" * 32},
}


def _tagged(kind: type[msgspec.Struct], **extra: Any) -> bytes:
    return json.dumps({"type": type_tag(kind), **BODIES[kind], **extra}).encode()


def _refusal(kind: Any, payload: bytes) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as caught:
        Codec(kind).decode(payload)
    return caught.value


def test_every_request_has_a_body_here_and_declares_itself_strict() -> None:
    assert set(request_messages()) == set(BODIES)
    for kind in request_messages():
        assert kind.__struct_config__.forbid_unknown_fields, kind.__name__
        Codec(kind).decode(_tagged(kind))  # the minimal body is valid


@pytest.mark.parametrize("kind", list(BODIES), ids=lambda k: k.__name__)
def test_a_request_refuses_an_unknown_field_and_names_it(kind: type[msgspec.Struct]) -> None:
    refused = _refusal(kind, _tagged(kind, version=2))
    assert refused.field == "version" and "unknown field: version" in str(refused)


@pytest.mark.parametrize("kind", list(BODIES), ids=lambda k: k.__name__)
def test_a_request_without_its_type_is_refused(kind: type[msgspec.Struct]) -> None:
    refused = _refusal(kind, json.dumps(BODIES[kind]).encode())
    assert refused.field == "type" and "`type`" in str(refused)
    wrong = _refusal(kind, json.dumps({**BODIES[kind], "type": "api.nonsense"}).encode())
    assert wrong.field == "type"
    nul = _refusal(kind, json.dumps({**BODIES[kind], "type": "\x00"}).encode())
    assert nul.field == "type"


def test_unknown_fields_deep_inside_a_request_are_refused_with_their_path() -> None:
    body = {"type": "api.submit", "jobs": [{"spec": {"runtime": {**NOOP, "exit_cod": 1}}}]}
    refused = _refusal(v1.SubmitRequest, json.dumps(body).encode())
    assert refused.field == "jobs[0].spec.runtime.exit_cod"
    body = {"type": "api.workflows.run", "spec": {"name": "w", "steps": {"a": {"runtime": NOOP, "neds": []}}}}
    assert _refusal(v1.WorkflowRunRequest, json.dumps(body).encode()).field == "spec.steps[...].neds"


def test_a_missing_required_field_is_named_in_field() -> None:
    assert _refusal(v1.JobGetRequest, b'{"type": "api.jobs.get"}').field == "job_id"
    assert _refusal(v1.SubmitRequest, b'{"type": "api.submit", "jobs": [{}]}').field == "jobs[0].spec"
    body = b'{"type": "api.submit", "jobs": [{"spec": {"queue": "q"}}]}'
    assert _refusal(v1.SubmitRequest, body).field == "jobs[0].spec.runtime"
    assert _refusal(v1.SubmitRequest, b'{"type": "api.submit", "jobs": [{"spec": 3}]}').field == "jobs[0].spec"


def test_events_and_replies_ignore_unknown_fields_but_need_their_tag() -> None:
    started = v1.JobStarted(job_id="j1", partition=0, attempt=1, node_id="n1", at=1.0)
    newer = {**json.loads(encode(started)), "added_in_a_later_v1": {"x": 1}}
    assert Codec(v1.JobStarted).decode(json.dumps(newer).encode()) == started
    assert Codec(v1.LifecycleEvent).decode(json.dumps(newer).encode()) == started
    untagged = {k: v for k, v in newer.items() if k != "type"}
    assert _refusal(v1.JobStarted, json.dumps(untagged).encode()).field == "type"
    assert _refusal(v1.LifecycleEvent, json.dumps(untagged).encode()).field == "type"
    reply = {"type": "api.submitted", "job_ids": [], "duplicates": [], "server_time": 1}
    assert Codec(v1.SubmitReply).decode(json.dumps(reply).encode()).job_ids == []


def test_no_message_outside_the_requests_is_strict() -> None:
    requests = set(request_messages())
    for kind in wire_messages():
        assert bool(kind.__struct_config__.forbid_unknown_fields) == (kind in requests), kind.__name__


# --- job ids, as docs/integrations.md derives them ------------------------------------
def _documented_job_id(key: str) -> str:
    # BLAKE2b, 16-byte digest, no key, no salt, personalisation "jobmesh.job.v1" padded with
    # zero bytes to 16, over the key's UTF-8 bytes; 32 lower-case hex digits.
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16, person=b"jobmesh.job.v1\0\0").hexdigest()


@pytest.mark.parametrize("key", ["order-7", "", "ü-ключ-鍵", "trigger:nightly:3:id:evt-1", "x" * 256])
def test_the_documented_job_id_derivation_is_the_codes(key: str) -> None:
    assert ids.job_id_for(key) == _documented_job_id(key)
    assert len(ids.job_id_for(key)) == 32
    # ... and a plain BLAKE2b of the key is not it: the personalisation matters.
    assert ids.job_id_for(key) != hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    person = b"jobmesh.wf.v1\0\0\0"
    assert ids.workflow_run_id(key) == hashlib.blake2b(key.encode(), digest_size=16, person=person).hexdigest()


def test_the_documented_key_of_a_fired_job() -> None:
    assert ids.trigger_key("nightly", 3, "id:evt-1") == "trigger:nightly:3:id:evt-1"
    assert ids.trigger_key("r", 1, "JM_EVENTS:42") == "trigger:r:1:JM_EVENTS:42"
    long_id = "e" * 201
    digest = hashlib.blake2b(long_id.encode(), digest_size=16).hexdigest()
    assert ids.trigger_key("r", 1, long_id) == f"trigger:r:1:h:{digest}"


# --- every API subject of a real cluster, as an outside integrator sees it ------------
SUBJECTS: dict[type[msgspec.Struct], str] = {
    v1.SubmitRequest: subjects.API_SUBMIT,
    v1.JobGetRequest: subjects.API_JOB_GET,
    v1.JobListRequest: subjects.API_JOB_LIST,
    v1.NodesRequest: subjects.API_NODES,
    v1.QueuesRequest: subjects.API_QUEUES,
    v1.ExplainRequest: subjects.scheduler_explain(0),
    v1.CancelRequest: subjects.scheduler_cancel(0),
    v1.TriggerPutRequest: subjects.API_TRIGGERS_PUT,
    v1.TriggerGetRequest: subjects.API_TRIGGERS_GET,
    v1.TriggerListRequest: subjects.API_TRIGGERS_LIST,
    v1.TriggerDeleteRequest: subjects.API_TRIGGERS_DELETE,
    v1.TriggerPauseRequest: subjects.API_TRIGGERS_PAUSE,
    v1.TriggerTestRequest: subjects.API_TRIGGERS_TEST,
    v1.WorkflowRunRequest: subjects.API_WORKFLOWS_RUN,
    v1.WorkflowGetRequest: subjects.API_WORKFLOWS_GET,
    v1.WorkflowListRequest: subjects.API_WORKFLOWS_LIST,
    v1.WorkflowCancelRequest: subjects.API_WORKFLOWS_CANCEL,
    v1.WorkflowRetryRequest: subjects.API_WORKFLOWS_RETRY,
}


async def _ask(nc: Any, subject: str, payload: bytes) -> dict[str, Any]:
    reply = await nc.request(subject, payload, timeout=10)
    answer: dict[str, Any] = json.loads(reply.data)
    return answer


async def test_every_api_subject_applies_the_one_rule(cluster, nc) -> None:
    assert set(SUBJECTS) == set(BODIES)
    for kind, subject in SUBJECTS.items():
        unknown = await _ask(nc, subject, _tagged(kind, version=2))
        assert unknown["type"] == "api.error" and unknown["code"] == "invalid_message", (subject, unknown)
        assert unknown["field"] == "version", (subject, unknown)
        untagged = await _ask(nc, subject, json.dumps(BODIES[kind]).encode())
        assert untagged["type"] == "api.error" and untagged["field"] == "type", (subject, untagged)


async def test_a_submit_without_type_makes_no_job(cluster, nc) -> None:
    key = "strict-untagged-submit"
    body = {"jobs": [{"idempotency_key": key, "spec": {"runtime": NOOP}}]}
    refused = await _ask(nc, subjects.API_SUBMIT, json.dumps(body).encode())
    assert refused["field"] == "type"
    # The tracker never heard of it: a tagged get of its would-be id is not found.
    view = await _ask(
        nc, subjects.API_JOB_GET, json.dumps({"type": "api.jobs.get", "job_id": ids.job_id_for(key)}).encode()
    )
    assert view["type"] == "api.error" and view["code"] == "not_found", view
    missing = await _ask(nc, subjects.API_JOB_GET, b'{"type": "api.jobs.get"}')
    assert missing["field"] == "job_id" and "job_id" in missing["message"]


def test_the_job_id_snippet_of_the_docs_runs_and_agrees() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text(encoding="utf-8")
    [snippet] = [block.split("```", 1)[0] for block in text.split("```python\n")[1:] if "hashlib.blake2b" in block]
    scope: dict[str, Any] = {}
    exec(snippet, scope)  # the docs' own assertion runs
    assert scope["job_id"] == ids.job_id_for("order-7")
