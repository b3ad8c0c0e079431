"""The HTTP API's pure parts: the token check, the workflow graph's layout, error fields,
the merged queue view, the live stream's overflow, and the committed OpenAPI document."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from jobmesh.client.logs import LogPage
from jobmesh.contract.messages.v1 import (
    AttemptLease,
    JobSpec,
    JobView,
    NodeInfo,
    NodesReply,
    NodeView,
    NoopRuntime,
    PartitionStats,
    QueuesReply,
    QueueStats,
    Resources,
)
from jobmesh.errors import UsageError
from jobmesh.web import auth, guard
from jobmesh.web.graph import layered
from jobmesh.web.live import QUEUE_SIZE, Listener, LiveEvent
from jobmesh.web.openapi import document
from jobmesh.web.problems import field_of
from jobmesh.web.routes import ENDPOINTS
from jobmesh.web.views import job_timeline, queues_view
from tests.cluster_fixtures import jobmesh_cli

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "http-api.json"


# --- auth ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "host", "port", "loopback"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, True),
        ("localhost:0", "localhost", 0, True),
        ("[::1]:9000", "::1", 9000, True),
        ("0.0.0.0:8080", "0.0.0.0", 8080, False),
        ("10.1.2.3:80", "10.1.2.3", 80, False),
    ],
)
def test_listen_addresses(text, host, port, loopback):
    listen = auth.parse_listen(text)
    assert (listen.host, listen.port, listen.loopback) == (host, port, loopback)


@pytest.mark.parametrize("text", ["8080", "host:", ":8080", "host:99999", "host:http"])
def test_a_bad_listen_address_names_the_flag(text):
    with pytest.raises(UsageError) as caught:
        auth.parse_listen(text)
    assert caught.value.field == "listen"


def test_no_token_is_refused_off_loopback():
    auth.check_listen(auth.parse_listen("127.0.0.1:8080"), None, open_on_loopback=True)
    auth.check_listen(auth.parse_listen("0.0.0.0:8080"), "secret")
    with pytest.raises(UsageError, match="without a token") as caught:
        auth.check_listen(auth.parse_listen("0.0.0.0:8080"), None, open_on_loopback=True)
    assert "--token-file" in str(caught.value) and "JOBMESH_WEB_TOKEN" in str(caught.value)


def test_no_token_on_loopback_needs_the_explicit_open_flag():
    # Issue 11: only jobmesh dev runs open; a plain jobmesh web on loopback needs a token.
    with pytest.raises(UsageError, match="--open-on-loopback") as caught:
        auth.check_listen(auth.parse_listen("127.0.0.1:8080"), None)
    assert caught.value.field == "token"
    auth.check_listen(auth.parse_listen("127.0.0.1:8080"), "secret")


def test_jobmesh_web_on_loopback_without_a_token_refuses_to_start():
    result = jobmesh_cli(["web", "--listen", "127.0.0.1:0"], "nats://127.0.0.1:1", timeout=60, env={"PATH": ""})
    assert result.returncode == 1, result.stderr
    assert "--open-on-loopback" in result.stderr and "without a token" in result.stderr


def test_the_token_comes_from_the_file_before_the_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert auth.read_token(str(token_file), {"JOBMESH_WEB_TOKEN": "from-env"}) == "from-file"
    assert auth.read_token(None, {"JOBMESH_WEB_TOKEN": "from-env"}) == "from-env"
    assert auth.read_token(None, {"JOBMESH_WEB_TOKEN": ""}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UsageError, match="empty"):
        auth.read_token(str(tmp_path / "empty"), {})
    with pytest.raises(UsageError, match="cannot read"):
        auth.read_token(str(tmp_path / "missing"), {})


@pytest.mark.parametrize(
    ("header", "cookie", "problem"),
    [
        ("Bearer s3cret", None, None),
        ("bearer s3cret", None, None),
        (None, "s3cret", None),
        (None, None, "authentication required"),
        ("Bearer nope", None, "not valid"),
        ("Basic s3cret", None, "must be 'Bearer <token>'"),
        ("Bearer ", None, "must be 'Bearer <token>'"),
        (None, "nope", "log in again"),
    ],
)
def test_requests_are_refused_with_the_reason(header, cookie, problem):
    found = auth.refusal("s3cret", header, cookie)
    assert found is None if problem is None else problem in (found or "")


def test_an_open_server_lets_everything_through():
    assert auth.refusal(None, None, None) is None
    assert auth.refusal(None, "Bearer whatever", None) is None


def test_jobmesh_web_refuses_a_public_address_without_a_token():
    result = jobmesh_cli(["web", "--listen", "0.0.0.0:8080"], "nats://127.0.0.1:1", timeout=60, env={"PATH": ""})
    assert result.returncode == 1, result.stderr
    assert "refusing to listen on 0.0.0.0:8080 without a token" in result.stderr


# --- the guard -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1:8080", True),
        ("127.0.0.1", True),
        ("LOCALHOST:9", True),
        ("[::1]:8080", True),
        ("[::1]", True),
        ("evil.example:8080", False),
        ("127.0.0.1.evil.example", False),
        ("localhost.evil.example:8080", False),
        ("", False),
        (None, False),
    ],
)
def test_an_open_server_answers_only_loopback_host_names(host, loopback):
    assert (guard.host_refusal(host) is None) == loopback


@pytest.mark.parametrize(
    ("method", "headers", "refused"),
    [
        ("GET", {"origin": "http://evil.example", "host": "127.0.0.1:8080"}, False),
        ("POST", {"host": "127.0.0.1:8080"}, False),
        ("POST", {"origin": "http://127.0.0.1:8080", "host": "127.0.0.1:8080"}, False),
        ("POST", {"origin": "https://jobs.example.com", "host": "jobs.example.com:443"}, False),
        ("POST", {"origin": "http://evil.example", "host": "127.0.0.1:8080"}, True),
        ("POST", {"origin": "http://127.0.0.1:9999", "host": "127.0.0.1:8080"}, True),
        ("DELETE", {"origin": "null", "host": "127.0.0.1:8080"}, True),
        ("POST", {"sec-fetch-site": "cross-site", "host": "127.0.0.1:8080"}, True),
        ("POST", {"sec-fetch-site": "same-origin", "host": "127.0.0.1:8080"}, False),
    ],
)
def test_unsafe_requests_from_another_origin_are_refused(method, headers, refused):
    assert (guard.origin_refusal(method, headers) is not None) == refused


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        (None, False),
    ],
)
def test_a_body_must_be_json(content_type, ok):
    assert (guard.content_type_refusal(content_type) is None) == ok


# --- the graph -------------------------------------------------------------------------------
def test_steps_are_laid_out_by_dependency_depth():
    layout = layered({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": []})
    placed = {p.step: (p.column, p.row) for p in layout.steps}
    assert placed == {"a": (0, 0), "b": (1, 0), "c": (1, 1), "d": (2, 0), "e": (0, 1)}
    assert (layout.columns, layout.rows) == (3, 2)
    assert {(e.source, e.target) for e in layout.edges} == {("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")}


def test_a_long_chain_goes_right_of_its_deepest_need():
    layout = layered({"x": ["c"], "a": [], "b": ["a"], "c": ["b"], "y": ["a", "x"]})
    assert {p.step: p.column for p in layout.steps} == {"a": 0, "b": 1, "c": 2, "x": 3, "y": 4}


def test_a_chain_of_the_most_steps_a_workflow_may_have_is_laid_out():
    from jobmesh.contract.messages.v1.workflows import MAX_STEPS

    chain = {f"s{i}": [f"s{i - 1}"] if i else [] for i in range(MAX_STEPS)}
    layout = layered(dict(reversed(chain.items())))  # the deepest first: the walk goes all the way down at once
    assert {p.step: p.column for p in layout.steps} == {f"s{i}": i for i in range(MAX_STEPS)}
    assert (layout.columns, layout.rows) == (MAX_STEPS, 1)


def test_a_cycle_inside_a_longer_graph_is_drawn_as_if_cut():
    layout = layered({"a": [], "b": ["a", "d"], "c": ["b"], "d": ["c"], "e": ["d"]})
    columns = {p.step: p.column for p in layout.steps}
    assert columns["a"] == 0 and columns["e"] > columns["d"]


def test_unknown_needs_and_cycles_do_not_break_the_page():
    layout = layered({"a": ["ghost"], "b": ["c"], "c": ["b"]})
    assert {p.step for p in layout.steps} == {"a", "b", "c"}
    assert all(e.source != "ghost" for e in layout.edges)


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("Expected `int`, got `str` - at `$.jobs[0].spec.priority`", "jobs[0].spec.priority"),
        ("Object missing required field `spec` - at `$.jobs[0]`", "jobs[0].spec"),
        ("Object missing required field `jobs`", "jobs"),
        ("Object contains unknown field `extra` - at `$.jobs[0]`", "jobs[0].extra"),
        ("Object contains unknown field `dry_run`", "dry_run"),
        ("Expected `object`, got `array`", ""),
    ],
)
def test_the_field_of_a_validation_error(message, field):
    assert field_of(message) == field


# --- views -----------------------------------------------------------------------------------
def test_queues_are_taken_from_the_newest_owner_of_each_partition():
    def stats(queue: str, pending: int) -> QueueStats:
        return QueueStats(queue=queue, pending=pending, in_flight=0, waiting={}, tenants={"acme": pending})

    old = QueuesReply(
        instance="s1",
        partitions=2,
        owned=[PartitionStats(partition=0, owner="s1", queues=[stats("q", 1)], at=1.0)],
    )
    new = QueuesReply(
        instance="s2",
        partitions=2,
        owned=[
            PartitionStats(partition=0, owner="s2", queues=[stats("q", 5)], at=2.0),
            PartitionStats(partition=1, owner="s2", queues=[stats("a", 2)], at=2.0),
        ],
    )
    view = queues_view([old, new])
    assert view.partitions == 2 and view.answered == [0, 1]
    assert [(r.queue, r.pending, r.owner, r.tenants) for r in view.queues] == [
        ("a", 2, "s2", {"acme": 2}),
        ("q", 5, "s2", {"acme": 5}),
    ]


def test_a_running_jobs_timeline_carries_its_progress():
    view = JobView(
        job_id="j1",
        name="",
        queue="default",
        tenant="default",
        state="running",
        reason="",
        attempt=2,
        node_id="n1",
        submitted_at=1.0,
        updated_at=2.0,
        spec=JobSpec(runtime=NoopRuntime()),
    )
    lease = [
        AttemptLease(job_id="j1", attempt=1, partition=0, started_at=1.0, progress=0.9),
        AttemptLease(job_id="j1", attempt=2, partition=0, started_at=1.5, progress=0.25, message="a quarter"),
    ]
    node = NodeView(
        node=NodeInfo(node_id="n1", cpu_milli=1000, memory_mb=512, attempts=lease),
        alive=True,
        allocated=Resources(),
        reservations=1,
    )
    timeline = job_timeline(view, NodesReply(nodes=[node]), LogPage(lines=[], total=0), None)
    assert timeline.progress is not None
    assert (timeline.progress.attempt, timeline.progress.fraction, timeline.progress.message) == (2, 0.25, "a quarter")
    assert timeline.result == "" and timeline.result_bytes == 0


# --- the live stream -------------------------------------------------------------------------
async def test_a_listener_that_falls_behind_gets_one_resync():
    listener = Listener()
    for i in range(QUEUE_SIZE + 10):
        listener.offer(LiveEvent("job", str(i).encode()))
    first = await listener.next()
    assert first.kind == "resync"
    assert listener.queue.empty()
    listener.offer(LiveEvent("job", b"after"))
    assert (await asyncio.wait_for(listener.next(), 1)).data == b"after"


# --- the OpenAPI document --------------------------------------------------------------------
def test_the_committed_openapi_document_is_fresh():
    committed = json.loads(SCHEMA.read_text())
    assert committed == json.loads(json.dumps(document())), (
        "schemas/http-api.json is stale: python -m jobmesh.web.openapi > schemas/http-api.json"
    )


def test_every_endpoint_is_documented_once_with_its_errors():
    doc = document()
    ids = [e.operation_id for e in ENDPOINTS]
    assert len(ids) == len(set(ids))
    for e in ENDPOINTS:
        op = doc["paths"][e.path][e.method.lower()]
        assert op["operationId"] == e.operation_id
        assert ("401" in op["responses"]) == e.auth
        for param in e.params:
            if param.where == "path":
                assert f"{{{param.name}}}" in e.path
    assert "SubmitBody" in doc["components"]["schemas"]
    assert doc["x-generated"].startswith("generated by")


def test_jobmesh_web_says_that_it_waits_for_nats_and_gives_up_after_wait():
    result = jobmesh_cli(
        ["web", "--listen", "127.0.0.1:0", "--open-on-loopback", "--nats-url", "nats://127.0.0.1:1", "--wait", "3"],
        "",
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "waiting for NATS at nats://127.0.0.1:1" in result.stderr
    assert "cannot reach NATS at nats://127.0.0.1:1 within 3s" in result.stderr


def test_the_document_lists_exactly_the_served_routes_and_every_ref_resolves():
    from jsonschema import Draft202012Validator
    from starlette.routing import Route

    from jobmesh.web.app import create_app

    async def never() -> None:
        raise AssertionError("not started")

    app = create_app(never, None)  # type: ignore[arg-type]
    served = {(m, r.path) for r in app.routes if isinstance(r, Route) for m in (r.methods or ()) if m != "HEAD"}
    doc = document()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    schemas = doc["components"]["schemas"]
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)

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


async def test_a_crash_answers_with_the_error_shape():
    from starlette.requests import Request

    from jobmesh.web.app import _crash

    request = Request({"type": "http", "method": "GET", "path": "/api/v1/jobs", "headers": [], "query_string": b""})
    response = await _crash(request, RuntimeError("boom"))
    assert response.status_code == 500
    assert json.loads(bytes(response.body)) == {
        "code": "internal",
        "message": "the server failed: RuntimeError",
        "field": "",
        "retryable": False,
    }


async def test_a_stalled_event_stream_reader_times_out():
    from starlette.requests import Request

    from jobmesh.web.routes import SSE_SEND_TIMEOUT_SECONDS, WebState, events

    request = Request({"type": "http", "method": "GET", "path": "/api/v1/events", "headers": [], "query_string": b""})
    web = WebState(client=None, hub=None, token=None)  # type: ignore[arg-type]  # not touched before streaming
    response = await events(request, web)
    assert response.send_timeout == SSE_SEND_TIMEOUT_SECONDS == 30.0


# --- log reads ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mine", "limit"),
    [
        (list(range(1, 1001)), 100),  # the stream holds only this job's lines
        (list(range(5, 200_000, 7)), 500),  # interleaved with other jobs' lines
        ([3, 4, *range(150_000, 150_050)], 20),  # a burst long after two early lines
        ([3, 4, *range(150_000, 150_050)], 51),  # all but the first
        ([10, 20, 30], 1),
    ],
)
async def test_log_reads_start_at_the_newest_lines(mine, limit):
    from bisect import bisect_left

    from jobmesh.client.logs import newest_start

    probes = []

    async def count_from(seq: int) -> int:
        probes.append(seq)
        return len(mine) - bisect_left(mine, seq)

    start = await newest_start(count_from, 1, mine[-1], limit)
    assert [s for s in mine if s >= start] == mine[-limit:]
    assert len(probes) < 64
