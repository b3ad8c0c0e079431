"""The trigger's HTTP ingress against a real nats-server, with real HTTP requests.

The ingress runs in-process on a free port, over a real JetStream (JobSubmitted on
``JM_JOBS``, dead letters on ``JM_DEADLETTER``); rules are written straight into the
``jm_triggers`` bucket as ``TriggerRecord`` JSON, as the rule API stores them, and the rule
set's KV watch picks them up. Every reply that names a job comes after its PubAck, so the
stream is read right after the reply, without waiting; a refused request (bad signature,
too large, not JSON) must leave the stream as it was.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import nats
import pytest

from jobmesh.contract import subjects
from jobmesh.contract.codec import encode
from jobmesh.contract.ids import job_id_for
from jobmesh.contract.messages.v1 import (
    JobSubmitted,
    TriggerRecord,
    TriggerRule,
    WebhookSource,
    WorkflowRun,
    WorkflowRunReply,
)
from jobmesh.runtime.publisher import Publisher
from jobmesh.runtime.service import Runtime
from jobmesh.runtime.settings import Settings
from jobmesh.trigger.firing import Firer
from jobmesh.trigger.handlers import SubmitHandler
from jobmesh.trigger.router import Router
from jobmesh.trigger.ruleset import RuleSet
from jobmesh.trigger.stats import RuleStats
from jobmesh.trigger.webhooks import ROUTES, HttpIngress, SecretReader, openapi_document, render_openapi
from tests.cluster_fixtures import dead_letters
from tests.helpers import eventually

pytestmark = pytest.mark.integration

HMAC_SECRET = b"hmac-secret-value"
BEARER_SECRET = b"bearer-secret-value"
SUBMIT_TOKEN = b"submit-token-value"
OPENAPI_PATH = Path(__file__).resolve().parents[1] / "schemas" / "openapi.json"
_submitted = msgspec.json.Decoder(JobSubmitted)


@dataclass
class Harness:
    ingress: HttpIngress
    runtime: Runtime
    rules: RuleSet
    http: aiohttp.ClientSession
    base: str

    async def put_rule(self, rule: TriggerRule, paused: bool = False) -> None:
        """Store a rule as the rule API would, and wait until the ingress sees it."""
        kv = await self.runtime.js.key_value(subjects.KV_TRIGGERS)
        await kv.put(rule.name, encode(TriggerRecord(rule=rule, version=1, paused=paused)))

        async def seen() -> bool:
            current = self.rules.get(rule.name)
            return current is not None and current.paused == paused

        await eventually(seen, what=f"rule {rule.name} in the rule set")

    async def submitted(self) -> list[JobSubmitted]:
        """Every JobSubmitted on JM_JOBS now."""
        js = self.runtime.js
        info = await js.stream_info(subjects.STREAM_JOBS)
        found = []
        if info.state.messages:
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(subjects.STREAM_JOBS, seq)
                if msg.subject.endswith("." + subjects.SUBMITTED):
                    found.append(_submitted.decode(msg.data))
        return found


def hook_rule(name: str, source: WebhookSource, **extra) -> TriggerRule:
    return TriggerRule(
        name=name,
        source=source,
        job={
            "name": "build-{{ event.repo }}",
            "runtime": {"kind": "process", "argv": ["echo", "{{ event.repo }}", "{{ headers['x-event'] }}"]},
            "priority": "{{ event.priority }}",
            "metadata": {"ref": "{{ event.ref }}"},
        },
        **extra,
    )


def signed(body: bytes, secret: bytes = HMAC_SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@pytest.fixture(scope="module")
async def harness(nats_server, tmp_path_factory):
    secrets_dir = tmp_path_factory.mktemp("secrets")
    (secrets_dir / "hook-hmac").write_bytes(HMAC_SECRET + b"\n")  # a file's trailing newline is dropped
    (secrets_dir / "hook-bearer").write_bytes(BEARER_SECRET)
    settings = Settings(nats_url=nats_server.url, service="trigger", instance="http-test")
    rt = Runtime(settings)
    await rt.connect()
    stats = RuleStats(None, settings.instance)
    router = Router(Firer(rt.publisher, settings.partitions, None, stats), stats)
    rules = RuleSet(rt.js)
    watch = asyncio.create_task(rules.run())
    await asyncio.wait_for(rules.ready.wait(), 20)
    ingress = HttpIngress(
        "127.0.0.1:0",
        SubmitHandler(rt.publisher, settings.partitions),
        rules,
        router,
        SecretReader(secrets_dir, "JOBMESH_SECRET_", {"JOBMESH_SECRET_hook-env": "env-secret"}),
        rt.dead_letter,
        SUBMIT_TOKEN,
    )
    await ingress.start()
    http = aiohttp.ClientSession()
    h = Harness(ingress, rt, rules, http, f"http://127.0.0.1:{ingress.port}")
    await h.put_rule(
        hook_rule(
            "gh", WebhookSource(secret="hook-hmac", auth="hmac", id_header="X-GitHub-Delivery", max_body_bytes=1024)
        )
    )
    await h.put_rule(hook_rule("plain", WebhookSource(secret="hook-bearer")))
    yield h
    await http.close()
    await ingress.stop()
    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)
    await rt.nc.close()


# --- HMAC hooks -------------------------------------------------------------------------
async def test_a_good_signature_makes_one_job_with_the_bodys_fields(harness):
    body = json.dumps({"repo": "api", "ref": "refs/heads/main", "priority": 7}).encode()
    headers = {"X-Hub-Signature-256": signed(body), "X-Event": "push", "Content-Type": "application/json"}
    async with harness.http.post(f"{harness.base}/v1/hooks/gh", data=body, headers=headers) as resp:
        reply = await resp.json()
        assert resp.status == 202, reply
    assert reply["duplicate"] is False and len(reply["job_ids"]) == 1
    job = next(j for j in await harness.submitted() if j.job_id == reply["job_ids"][0])
    assert job.spec.name == "build-api"
    assert job.spec.runtime.argv == ["echo", "api", "push"]
    assert job.spec.priority == 7
    assert job.spec.metadata["ref"] == "refs/heads/main"
    assert job.origin is not None and job.origin.kind == "webhook" and job.origin.rule == "gh"
    assert job.origin.event == reply["event_id"]


async def test_a_signature_without_the_prefix_is_accepted_too(harness):
    body = b'{"repo": "bare", "ref": "x", "priority": 1}'
    bare = signed(body).removeprefix("sha256=")
    async with harness.http.post(
        f"{harness.base}/v1/hooks/gh", data=body, headers={"X-Hub-Signature-256": bare, "X-Event": "e"}
    ) as resp:
        assert resp.status == 202, await resp.text()


@pytest.mark.parametrize(
    ("signature", "says"),
    [(None, "missing signature"), ("sha256=" + "0" * 64, "bad signature"), ("garbage", "bad signature")],
)
async def test_a_missing_or_bad_signature_is_401_and_makes_no_job(harness, signature, says):
    before = len(await harness.submitted())
    body = b'{"repo": "evil", "ref": "x", "priority": 1}'
    headers = {} if signature is None else {"X-Hub-Signature-256": signature}
    async with harness.http.post(f"{harness.base}/v1/hooks/gh", data=body, headers=headers) as resp:
        reply = await resp.json()
        assert resp.status == 401, reply
    assert says in reply["message"] and reply["code"] == "unauthorized"
    assert "WWW-Authenticate" in resp.headers
    assert len(await harness.submitted()) == before


async def test_a_signature_of_another_body_is_refused(harness):
    before = len(await harness.submitted())
    body = b'{"repo": "a", "ref": "x", "priority": 1}'
    other = b'{"repo": "b", "ref": "x", "priority": 1}'
    async with harness.http.post(
        f"{harness.base}/v1/hooks/gh", data=other, headers={"X-Hub-Signature-256": signed(body)}
    ) as resp:
        assert resp.status == 401
    assert len(await harness.submitted()) == before


async def test_an_oversized_body_is_413_by_length_and_by_chunks_and_makes_no_job(harness):
    before = len(await harness.submitted())
    big = json.dumps({"repo": "x" * 2000, "ref": "x", "priority": 1}).encode()  # the rule allows 1024
    async with harness.http.post(
        f"{harness.base}/v1/hooks/gh", data=big, headers={"X-Hub-Signature-256": signed(big)}
    ) as resp:
        reply = await resp.json()
        assert resp.status == 413, reply
    assert "Content-Length" in reply["message"]

    async def chunks():
        for i in range(0, len(big), 256):
            yield big[i : i + 256]

    # No Content-Length: the limit holds on what arrives.
    async with harness.http.post(
        f"{harness.base}/v1/hooks/gh", data=chunks(), headers={"X-Hub-Signature-256": signed(big)}
    ) as resp:
        reply = await resp.json()
        assert resp.status == 413, reply
    assert "more than 1024 bytes" in reply["message"]
    assert len(await harness.submitted()) == before


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"repo": "x"'])
async def test_a_malformed_body_is_400_with_the_reason_and_makes_no_job(harness, body):
    before = len(await harness.submitted())
    async with harness.http.post(
        f"{harness.base}/v1/hooks/gh", data=body, headers={"X-Hub-Signature-256": signed(body)}
    ) as resp:
        reply = await resp.json()
        assert resp.status == 400, reply
    assert reply["message"].startswith("malformed body: the body must be JSON: ")
    assert len(await harness.submitted()) == before


async def test_the_senders_delivery_id_header_makes_a_redelivery_the_same_job(harness):
    body = b'{"repo": "redeliver", "ref": "x", "priority": 1}'
    headers = {"X-Hub-Signature-256": signed(body), "X-GitHub-Delivery": "delivery-1", "X-Event": "e"}
    replies = []
    for _ in range(2):
        async with harness.http.post(f"{harness.base}/v1/hooks/gh", data=body, headers=headers) as resp:
            assert resp.status == 202
            replies.append(await resp.json())
    assert replies[0]["job_ids"] == replies[1]["job_ids"]
    assert [r["duplicate"] for r in replies] == [False, True]
    assert replies[0]["event_id"] == "delivery-1"


# --- bearer hooks -----------------------------------------------------------------------
async def test_a_bearer_hook_accepts_its_secret_and_refuses_anything_else(harness):
    body = b'{"repo": "bearer", "ref": "x", "priority": 2}'
    before = len(await harness.submitted())
    for auth in (None, "Bearer wrong", "Basic " + BEARER_SECRET.decode(), "Bearer"):
        headers = {} if auth is None else {"Authorization": auth}
        async with harness.http.post(f"{harness.base}/v1/hooks/plain", data=body, headers=headers) as resp:
            assert resp.status == 401, (auth, await resp.text())
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert len(await harness.submitted()) == before
    headers = {"Authorization": "Bearer " + BEARER_SECRET.decode(), "X-Event": "ping"}
    async with harness.http.post(f"{harness.base}/v1/hooks/plain", data=body, headers=headers) as resp:
        reply = await resp.json()
        assert resp.status == 202, reply
    job = next(j for j in await harness.submitted() if j.job_id == reply["job_ids"][0])
    assert job.spec.runtime.argv == ["echo", "bearer", "ping"]


async def test_the_same_idempotency_key_twice_is_one_job(harness):
    body = b'{"repo": "idem", "ref": "x", "priority": 3}'
    headers = {"Authorization": "Bearer " + BEARER_SECRET.decode(), "Idempotency-Key": "idem-42", "X-Event": "e"}
    replies = []
    for _ in range(2):
        async with harness.http.post(f"{harness.base}/v1/hooks/plain", data=body, headers=headers) as resp:
            assert resp.status == 202
            replies.append(await resp.json())
    assert replies[0]["job_ids"] == replies[1]["job_ids"] and replies[1]["duplicate"] is True
    jobs = [j for j in await harness.submitted() if j.job_id == replies[0]["job_ids"][0]]
    # The stream dedupes the second publish (Nats-Msg-Id): one JobSubmitted.
    assert len(jobs) == 1 and jobs[0].idempotency_key == "trigger:plain:1:idem-42"


async def test_without_an_id_each_post_is_a_job_of_its_own(harness):
    body = b'{"repo": "fresh", "ref": "x", "priority": 3}'
    headers = {"Authorization": "Bearer " + BEARER_SECRET.decode(), "X-Event": "e"}
    ids = set()
    for _ in range(2):
        async with harness.http.post(f"{harness.base}/v1/hooks/plain", data=body, headers=headers) as resp:
            ids.update((await resp.json())["job_ids"])
    assert len(ids) == 2


async def test_credentials_never_reach_the_templates(harness):
    rule = TriggerRule(
        name="echo-headers",
        source=WebhookSource(secret="hook-hmac", auth="hmac"),
        job={
            "runtime": {"kind": "process", "argv": ["echo"]},
            "metadata": {
                "seen": "auth={{ 'authorization' in headers }} cookie={{ 'cookie' in headers }} "
                "sig={{ 'x-hub-signature-256' in headers }} keep={{ headers['x-keep'] }}"
            },
        },
    )
    await harness.put_rule(rule)
    body = b"[1, 2]"  # any JSON value is an event
    headers = {"X-Hub-Signature-256": signed(body), "Authorization": "Bearer leaked", "Cookie": "c=1", "X-Keep": "yes"}
    async with harness.http.post(f"{harness.base}/v1/hooks/echo-headers", data=body, headers=headers) as resp:
        reply = await resp.json()
        assert resp.status == 202, reply
    job = next(j for j in await harness.submitted() if j.job_id == reply["job_ids"][0])
    assert job.spec.metadata["seen"] == "auth=false cookie=false sig=false keep=yes"


# --- what else a hook may answer --------------------------------------------------------
async def test_an_unknown_hook_is_404(harness):
    async with harness.http.post(f"{harness.base}/v1/hooks/nope", data=b"{}") as resp:
        reply = await resp.json()
        assert resp.status == 404 and reply["code"] == "not_found", reply


async def test_a_secret_the_service_cannot_read_is_503_naming_it(harness):
    await harness.put_rule(hook_rule("no-secret", WebhookSource(secret="not-provided")))
    async with harness.http.post(
        f"{harness.base}/v1/hooks/no-secret", data=b"{}", headers={"Authorization": "Bearer x"}
    ) as resp:
        reply = await resp.json()
        assert resp.status == 503, reply
    assert "'not-provided'" in reply["message"] and "JOBMESH_SECRET_not-provided" in reply["message"]
    assert resp.headers["Retry-After"]


async def test_a_secret_may_come_from_the_environment(harness):
    await harness.put_rule(hook_rule("env-hook", WebhookSource(secret="hook-env")))
    body = b'{"repo": "env", "ref": "x", "priority": 1}'
    headers = {"Authorization": "Bearer env-secret", "X-Event": "e"}
    async with harness.http.post(f"{harness.base}/v1/hooks/env-hook", data=body, headers=headers) as resp:
        assert resp.status == 202, await resp.text()


async def test_a_body_the_template_cannot_use_is_422_and_a_dead_letter(harness):
    before = len(await harness.submitted())
    body = b'{"ref": "x", "priority": 1}'  # no repo
    headers = {"Authorization": "Bearer " + BEARER_SECRET.decode(), "X-Event": "e"}
    async with harness.http.post(f"{harness.base}/v1/hooks/plain", data=body, headers=headers) as resp:
        reply = await resp.json()
        assert resp.status == 422, reply
    assert reply["message"].startswith("rule plain v1: ")
    assert len(await harness.submitted()) == before

    async def lettered():
        return [d for d in await dead_letters(harness.runtime.js) if d.rule == "plain" and d.subject == "hooks.plain"]

    letters = await eventually(lettered, what="the dead letter of the refused body")
    assert letters[-1].payload_head == body.decode()


async def test_a_filtered_event_is_200_and_a_paused_rule_202_without_a_job(harness):
    await harness.put_rule(hook_rule("picky", WebhookSource(secret="hook-bearer"), filter="event.repo == 'wanted'"))
    before = len(await harness.submitted())
    headers = {"Authorization": "Bearer " + BEARER_SECRET.decode(), "X-Event": "e"}
    body = b'{"repo": "other", "ref": "x", "priority": 1}'
    async with harness.http.post(f"{harness.base}/v1/hooks/picky", data=body, headers=headers) as resp:
        reply = await resp.json()
        assert resp.status == 200 and reply["filtered"] is True and reply["job_ids"] == [], reply
    await harness.put_rule(hook_rule("picky", WebhookSource(secret="hook-bearer")), paused=True)
    async with harness.http.post(f"{harness.base}/v1/hooks/picky", data=body, headers=headers) as resp:
        reply = await resp.json()
        assert resp.status == 202 and reply["paused"] is True and reply["job_ids"] == [], reply
    assert len(await harness.submitted()) == before


# --- POST /v1/jobs ----------------------------------------------------------------------
# A SubmitRequest as on jobmesh.v1.api.submit: its type tag is required over HTTP too.
SUBMIT = {
    "type": "api.submit",
    "jobs": [{"spec": {"runtime": {"kind": "process", "argv": ["true"]}, "name": "http"}, "idempotency_key": "http-1"}],
}


async def test_a_submit_with_the_token_is_answered_with_the_durable_job(harness):
    headers = {"Authorization": "Bearer " + SUBMIT_TOKEN.decode()}
    async with harness.http.post(f"{harness.base}/v1/jobs", json=SUBMIT, headers=headers) as resp:
        reply = await resp.json()
        assert resp.status == 200, reply
    assert reply["job_ids"] == [job_id_for("http-1")] and reply["duplicates"] == [False]
    assert any(j.job_id == job_id_for("http-1") and j.spec.name == "http" for j in await harness.submitted())


async def test_a_submit_without_or_with_a_wrong_token_is_401(harness):
    before = len(await harness.submitted())
    for headers in ({}, {"Authorization": "Bearer nope"}):
        async with harness.http.post(
            f"{harness.base}/v1/jobs", json=SUBMIT | {"jobs": [{"spec": SUBMIT["jobs"][0]["spec"]}]}, headers=headers
        ) as resp:
            assert resp.status == 401, await resp.text()
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert len(await harness.submitted()) == before


@pytest.mark.parametrize(
    ("request_body", "field"),
    [
        (
            {
                "type": "api.submit",
                "jobs": [{"spec": {"runtime": {"kind": "process", "argv": ["true"]}, "prority": 3}}],
            },
            "jobs[0].spec.prority",
        ),
        (
            {
                "type": "api.submit",
                "jobs": [{"spec": {"runtime": {"kind": "process", "argv": ["true"]}, "priority": "high"}}],
            },
            "jobs[0].spec.priority",
        ),
        ({"type": "api.submit", "jobs": []}, "jobs"),
        ({"jobs": [{"spec": {"runtime": {"kind": "noop"}}}]}, "type"),
    ],
)
async def test_an_invalid_submit_is_400_naming_the_field(harness, request_body, field):
    headers = {"Authorization": "Bearer " + SUBMIT_TOKEN.decode()}
    async with harness.http.post(f"{harness.base}/v1/jobs", json=request_body, headers=headers) as resp:
        reply = await resp.json()
        assert resp.status == 400, reply
    assert reply["field"] == field and reply["type"] == "api.error", reply


async def test_without_a_configured_token_the_submit_endpoint_is_403_saying_how_to_enable_it(harness):
    off = HttpIngress(
        "127.0.0.1:0", harness.ingress._submit, harness.rules, harness.ingress._router, lambda _name: None,
        harness.runtime.dead_letter, None,
    )  # fmt: skip
    await off.start()
    try:
        async with harness.http.post(
            f"http://127.0.0.1:{off.port}/v1/jobs", json=SUBMIT, headers={"Authorization": "Bearer x"}
        ) as resp:
            reply = await resp.json()
            assert resp.status == 403, reply
        assert "JOBMESH_HTTP_SUBMIT_TOKEN_SECRET" in reply["message"]
    finally:
        await off.stop()


# --- health and the document ------------------------------------------------------------
async def test_health_and_the_served_document(harness):
    async with harness.http.get(f"{harness.base}/v1/health") as resp:
        assert resp.status == 200 and await resp.json() == {"ok": True}
    async with harness.http.get(f"{harness.base}/v1/openapi.json") as resp:
        assert resp.status == 200 and await resp.json() == openapi_document()


def test_the_openapi_document_is_current_valid_and_lists_exactly_the_served_routes():
    assert OPENAPI_PATH.read_text(encoding="utf-8") == render_openapi(), (
        "schemas/openapi.json is stale: .venv/bin/python -m jobmesh.trigger.webhooks > schemas/openapi.json"
    )
    doc = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"] and doc["info"]["version"]
    ingress = HttpIngress("127.0.0.1:0", None, None, None, lambda _n: None, None, None)  # type: ignore[arg-type]
    served = {(r.method, r.resource.canonical) for r in ingress.app.router.routes()}
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented == {(m, p) for m, p, _ in ROUTES}
    # Every operation is complete, and every $ref points at a schema the document holds.
    schemas = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["operationId"] and op["responses"], (method, path)
            for param in op.get("parameters", []):
                assert param["in"] in ("path", "query", "header", "cookie") and "schema" in param
                if param["in"] == "path":
                    assert "{" + param["name"] + "}" in path and param["required"] is True
            for sec in op.get("security", []):
                assert set(sec) <= set(doc["components"]["securitySchemes"])

    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref


# --- the documented example, as pasted ------------------------------------------------------
DOC = Path(__file__).resolve().parents[1] / "docs" / "webhooks.md"
EXAMPLE_RULE = Path(__file__).resolve().parents[1] / "examples" / "triggers" / "github-push.yaml"


# Outside CI a machine without curl or openssl skips it; in CI it must run (and fails, naming them).
@pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("openssl")) and not os.environ.get("CI"), reason="needs curl and openssl"
)
async def test_the_documented_curl_and_openssl_example_makes_the_job(harness, tmp_path):
    import yaml

    rule = msgspec.convert(yaml.safe_load(EXAMPLE_RULE.read_text()), TriggerRule)
    await harness.put_rule(rule)
    secrets_dir = harness.ingress._secrets.directory
    (secrets_dir / "github-webhook").write_text("change-me")
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    snippet = next(b for b in blocks if "openssl dgst" in b)
    script = tmp_path / "snippet.sh"
    script.write_text(snippet)
    replies = []
    for _ in range(2):  # the doc says: run it again and the same job comes back
        # A subprocess of this loop's own: the ingress answers it from this very loop.
        proc = await asyncio.create_subprocess_exec(
            "bash", "-eu", str(script), env={"PATH": os.environ["PATH"], "JOBMESH_URL": harness.base},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        replies.append(json.loads(out))
    assert replies[0]["event_id"] == "72d3162e-cc78-11e3-81ab-4c9367dc0958" and len(replies[0]["job_ids"]) == 1
    assert replies[1]["job_ids"] == replies[0]["job_ids"] and replies[1]["duplicate"] is True
    job = next(j for j in await harness.submitted() if j.job_id == replies[0]["job_ids"][0])
    assert job.spec.name == "build example/app@6f1c2a9"


async def test_when_nats_cannot_take_the_job_the_answer_is_503_with_retry_after(harness, nats_server):
    # A publisher whose connection is closed: every publish fails as in an outage.
    conn = await nats.connect(nats_server.url)
    publisher = Publisher(conn.jetstream())
    await conn.close()
    stats = RuleStats(None, "down")
    down = HttpIngress(
        "127.0.0.1:0", SubmitHandler(publisher, 4), harness.rules, Router(Firer(publisher, 4, None, stats), stats),
        harness.ingress._secrets, harness.runtime.dead_letter, SUBMIT_TOKEN,
    )  # fmt: skip
    await down.start()
    base = f"http://127.0.0.1:{down.port}"
    try:
        headers = {"Authorization": "Bearer " + SUBMIT_TOKEN.decode()}
        async with harness.http.post(f"{base}/v1/jobs", json=SUBMIT, headers=headers) as resp:
            reply = await resp.json()
            assert resp.status == 503 and reply["code"] == "unavailable" and reply["retryable"] is True, reply
            assert int(resp.headers["Retry-After"]) > 0
        body = b'{"repo": "down", "ref": "x", "priority": 1}'
        headers = {"Authorization": "Bearer " + BEARER_SECRET.decode(), "X-Event": "e"}
        async with harness.http.post(f"{base}/v1/hooks/plain", data=body, headers=headers) as resp:
            reply = await resp.json()
            assert resp.status == 503 and reply["code"] == "unavailable", reply
            assert int(resp.headers["Retry-After"]) > 0
    finally:
        await down.stop()


async def test_a_stop_lets_a_request_in_flight_finish_and_then_refuses_connections(harness):
    entered, release = asyncio.Event(), asyncio.Event()
    real = harness.ingress._submit

    async def gated(env):
        entered.set()
        await release.wait()
        return await real(env)

    ingress = HttpIngress(
        "127.0.0.1:0", gated, harness.rules, harness.ingress._router, harness.ingress._secrets,
        harness.runtime.dead_letter, SUBMIT_TOKEN,
    )  # fmt: skip
    await ingress.start()
    base = f"http://127.0.0.1:{ingress.port}"
    body = {"type": "api.submit", "jobs": [{"spec": SUBMIT["jobs"][0]["spec"], "idempotency_key": "in-flight"}]}
    headers = {"Authorization": "Bearer " + SUBMIT_TOKEN.decode()}
    request = asyncio.ensure_future(harness.http.post(f"{base}/v1/jobs", json=body, headers=headers))
    await asyncio.wait_for(entered.wait(), 10)
    port = ingress.port
    stopping = asyncio.ensure_future(ingress.stop())

    async def refused() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return True
        writer.close()
        return False

    # The stop is under way (no new connections) while the request is still held.
    await eventually(refused, what="the ingress to stop listening")
    assert not stopping.done() and not request.done()
    release.set()
    resp = await asyncio.wait_for(request, 10)
    assert resp.status == 200 and (await resp.json())["job_ids"] == [job_id_for("in-flight")]
    resp.release()
    await asyncio.wait_for(stopping, 10)


class _Runs:
    """Stands in for the trigger's workflow API: records what a hook started."""

    def __init__(self) -> None:
        self.started: list = []

    async def start(self, spec, input=None, idempotency_key="", *, origin=None, context=None):
        self.started.append((spec.name, input, idempotency_key))
        return WorkflowRunReply(run=WorkflowRun(run_id="run-from-hook", spec=spec, input=input))


async def test_a_hook_whose_rule_starts_a_workflow_answers_with_the_run(harness):
    runs = _Runs()
    harness.ingress._router.firer.workflows = runs
    rule = TriggerRule(
        name="wf-hook",
        source=WebhookSource(secret="hook-bearer"),
        workflow={
            "name": "hooked",
            "steps": {"a": {"runtime": {"kind": "process", "argv": ["echo", "${input.repo}"]}}},
        },
    )
    await harness.put_rule(rule)
    try:
        async with harness.http.post(
            f"{harness.base}/v1/hooks/wf-hook",
            data=b'{"repo": "jobmesh"}',
            headers={"Authorization": f"Bearer {BEARER_SECRET.decode()}", "Content-Type": "application/json"},
        ) as resp:
            body = await resp.json()
        assert resp.status == 202, body
        assert body["run_id"] == "run-from-hook" and body["job_ids"] == []
        assert runs.started[0][:2] == ("hooked", {"repo": "jobmesh"})
    finally:
        harness.ingress._router.firer.workflows = None
