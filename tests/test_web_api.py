"""The HTTP API against a real cluster: the five services and ``python -m jobmesh.web``, each
its own process, spoken to over HTTP as any client would (aiohttp)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from jobmesh.client.client import Client
from jobmesh.contract import subjects
from jobmesh.dev.devcluster import start_dashboard, wait_dashboard
from tests.cluster_fixtures import NODE_ID
from tests.helpers import eventually

TOKEN = "web-api-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
async def web_url(cluster) -> str:
    """The API of the module's cluster, with a token."""
    port = free_port()
    start_dashboard(cluster, port, token=TOKEN)
    url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_dashboard, cluster, url)
    return url


@pytest.fixture(scope="module")
async def open_url(cluster) -> str:
    """The API of the module's cluster without a token, as jobmesh dev runs it."""
    port = free_port()
    start_dashboard(cluster, port)
    url = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_dashboard, cluster, url)
    return url


@pytest.fixture
async def http(web_url) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=web_url, headers=AUTH) as session:
        yield session


def job(argv: list[str], **fields) -> dict:
    return {"spec": {"runtime": {"kind": "process", "argv": argv}, **fields}}


async def submit(http: aiohttp.ClientSession, *jobs: dict) -> list[str]:
    async with http.post("/api/v1/jobs", json={"jobs": list(jobs)}) as response:
        body = await response.json()
        assert response.status == 200, body
        return body["job_ids"]


async def get_json(http: aiohttp.ClientSession, path: str, status: int = 200) -> dict:
    async with http.get(path) as response:
        body = await response.json()
        assert response.status == status, body
        return body


async def final_view(http: aiohttp.ClientSession, job_id: str, timeout: float = 30.0) -> dict:
    async def probe() -> dict | None:
        async with http.get(f"/api/v1/jobs/{job_id}") as response:
            if response.status != 200:
                return None  # 404 until the tracker has recorded the submission
            view = await response.json()
            return view if view["final"] else None

    return await eventually(probe, timeout=timeout, what=f"job {job_id} to end")


async def test_healthz_answers_without_a_token(web_url):
    async with aiohttp.ClientSession() as session, session.get(f"{web_url}/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"ok": True, "nats": "connected", "auth": True}


async def test_submit_get_list_and_timeline(http):
    job_id, other = await submit(
        http,
        job(["sh", "-c", "echo hello from the api; printf 42 > $JOBMESH_RESULT_PATH"], name="web-hello", queue="webq"),
        job(["true"], name="web-other", queue="webq2", tenant="acme"),
    )
    view = await final_view(http, job_id)
    assert view["state"] == "succeeded"
    assert view["name"] == "web-hello"
    await final_view(http, other)

    listed = await get_json(http, "/api/v1/jobs?queue=webq&state=succeeded&limit=10")
    assert [j["job_id"] for j in listed["jobs"]] == [job_id]
    by_tenant = await get_json(http, "/api/v1/jobs?tenant=acme&limit=100")
    assert [j["job_id"] for j in by_tenant["jobs"]] == [other]
    assert not (await get_json(http, "/api/v1/jobs?queue=webq&state=failed"))["jobs"]

    timeline = await get_json(http, f"/api/v1/jobs/{job_id}/timeline")
    assert timeline["job"]["job_id"] == job_id
    assert [a["state"] for a in timeline["attempts"]] == ["succeeded"]
    assert timeline["attempts"][0]["node_id"] == NODE_ID
    kinds = {e["kind"] for e in timeline["job"]["events"]}
    assert {"submitted", "started", "succeeded"} <= kinds
    assert timeline["result"] == "42"

    async def logged() -> dict | None:
        page = await get_json(http, f"/api/v1/jobs/{job_id}/logs")
        return page if page["total"] else None

    page = await eventually(logged, what="the job's output line")
    assert page["lines"][0]["line"] == "hello from the api"


async def test_a_result_too_large_for_a_page_is_named_not_read(http):
    big = "head -c 1500000 /dev/zero | tr '\\0' a > $JOBMESH_RESULT_PATH"
    (job_id,) = await submit(http, job(["sh", "-c", big], name="web-big-result"))
    assert (await final_view(http, job_id))["state"] == "succeeded"
    timeline = await get_json(http, f"/api/v1/jobs/{job_id}/timeline")
    assert timeline["result"] == "" and timeline["result_bytes"] == 0
    assert timeline["attempts"][0]["result"] == "1500000 bytes in jm_results"


async def test_cancel_a_waiting_job_and_an_ended_one(http):
    (held,) = await submit(http, job(["true"], name="web-held", not_before=4102444800.0))

    async def cancelled() -> dict | None:
        async with http.post(f"/api/v1/jobs/{held}/cancel", json={"reason": "from the test"}) as response:
            body = await response.json()
            assert response.status in (200, 503), body
            return body if response.status == 200 else None

    outcome = await eventually(cancelled, what="the cancel to reach the scheduler")
    assert outcome["state"] in ("cancelled", "cancelling")
    view = await final_view(http, held)
    assert view["state"] == "cancelled"
    async with http.post(f"/api/v1/jobs/{held}/cancel") as response:
        assert response.status == 200
        assert (await response.json())["state"] == "ended"


async def test_workflow_run_and_its_graph(http):
    spec = {
        "name": "web-flow",
        "steps": {
            "a": {"runtime": {"kind": "process", "argv": ["true"]}},
            "b": {"runtime": {"kind": "process", "argv": ["true"]}, "needs": ["a"]},
            "c": {"runtime": {"kind": "process", "argv": ["true"]}, "needs": ["a"]},
            "d": {"runtime": {"kind": "process", "argv": ["true"]}, "needs": ["b", "c"]},
        },
    }
    async with http.post("/api/v1/workflows", json={"spec": spec}) as response:
        body = await response.json()
        assert response.status == 200, body
    run_id = body["run"]["run_id"]

    async def ended() -> dict | None:
        view = await get_json(http, f"/api/v1/workflows/{run_id}")
        return view if view["status"]["outcome"] != "running" else None

    view = await eventually(ended, timeout=60, what="the workflow run to end")
    assert view["status"]["outcome"] == "succeeded"
    columns = {p["step"]: p["column"] for p in view["layout"]["steps"]}
    assert columns == {"a": 0, "b": 1, "c": 1, "d": 2}
    assert {(e["source"], e["target"]) for e in view["layout"]["edges"]} == {
        ("a", "b"),
        ("a", "c"),
        ("b", "d"),
        ("c", "d"),
    }
    runs = await get_json(http, "/api/v1/workflows?name=web-flow")
    assert run_id in [r["run_id"] for r in runs["runs"]]
    jobs = await get_json(http, f"/api/v1/jobs?workflow={run_id}")
    assert sorted(j["step"] for j in jobs["jobs"]) == ["a", "b", "c", "d"]


async def test_nodes_queues_dead_letters_and_rules(http, nc):
    nodes = await get_json(http, "/api/v1/nodes")
    (node,) = [n for n in nodes["nodes"] if n["node"]["node_id"] == NODE_ID]
    assert node["alive"] and node["node"]["cpu_milli"] == 8000
    assert node["node"]["isolation"]
    queues = await get_json(http, "/api/v1/queues")
    assert queues["partitions"] >= 1 and queues["answered"]

    rule = {
        "name": "web-rule",
        "source": {"kind": "event", "subjects": ["jobmesh.v1.events.web-rule"]},
        "job": {"runtime": {"kind": "process", "argv": ["true"]}},
        "sample": {"subject": "jobmesh.v1.events.web-rule", "data": {}},
    }
    await Client(nc).put_trigger(rule)
    rules = await get_json(http, "/api/v1/triggers")
    assert "web-rule" in [r["name"] for r in rules["triggers"]]
    one = await get_json(http, "/api/v1/triggers/web-rule")
    assert one["record"]["rule"]["name"] == "web-rule"
    await get_json(http, "/api/v1/triggers/no-such-rule", status=404)

    # A message the services must refuse: recorded as a dead letter, which the API lists.
    subject = subjects.job_event(0, subjects.SUBMITTED)
    await nc.jetstream().publish(subject, b"\x00not json at all{")

    async def refused() -> list[dict]:
        letters = await get_json(http, "/api/v1/dead-letters?limit=50")
        return [e for e in letters["entries"] if e["letter"]["subject"] == subject]

    (entry, *_) = await eventually(refused, what="the dead letter")
    assert entry["letter"]["reason"]


async def test_the_event_stream_sees_a_jobs_updates(http):
    async with http.get("/api/v1/events", timeout=aiohttp.ClientTimeout(total=60)) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(stream)
        kind, _ = await anext(events)
        assert kind == "ready"
        (job_id,) = await submit(http, job(["true"], name="web-sse"))
        seen = []
        async with asyncio.timeout(30):
            async for kind, data in events:
                if kind == "job" and data.get("job_id") == job_id:
                    seen.append(data["state"])
                    if data["final"]:
                        break
        assert seen[-1] == "succeeded"


async def test_the_event_stream_of_one_job(http):
    (held,) = await submit(http, job(["true"], name="web-sse-one", not_before=4102444800.0))
    seen: list[tuple[str, dict]] = []
    async with http.get(f"/api/v1/events?job={held}", timeout=aiohttp.ClientTimeout(total=60)) as stream:
        events = sse_events(stream)
        assert (await anext(events))[0] == "ready"
        # Another job runs and ends meanwhile: its updates, and the node and queue changes it
        # makes (snapshots every 2 s on an unfiltered stream), must not reach this one.
        (other,) = await submit(http, job(["sh", "-c", "sleep 2.5"], name="web-sse-other"))
        assert (await final_view(http, other))["state"] == "succeeded"

        async def cancelled() -> bool:
            async with http.post(f"/api/v1/jobs/{held}/cancel", json={"reason": "sse test"}) as response:
                return response.status == 200  # 503 until the scheduler has seen the job

        await eventually(cancelled, what="the cancel to reach the scheduler")
        async with asyncio.timeout(30):
            async for kind, data in events:
                seen.append((kind, data))
                if kind == "job" and data.get("final"):
                    break
    assert seen, "no update of the job came"
    assert all(kind == "job" for kind, _ in seen), [kind for kind, _ in seen]
    assert {data["job_id"] for _, data in seen} == {held}
    assert seen[-1][1]["state"] == "cancelled"


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict]]:
    """The (event, data) pairs of a server-sent event stream (comment lines skipped)."""
    kind, data = "message", []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        ({}, "authentication required"),
        ({"Authorization": "Bearer wrong"}, "not valid"),
        ({"Authorization": "Basic abc"}, "must be 'Bearer <token>'"),
    ],
)
async def test_refusals_without_the_right_token(web_url, headers, problem):
    async with aiohttp.ClientSession(base_url=web_url) as session:
        for method, path in (("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"), ("GET", "/api/v1/events")):
            async with session.request(method, path, headers=headers) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                body = await response.json()
                assert body["code"] == "unauthorized"
                assert body["field"] == "Authorization"
                assert problem in body["message"]


async def test_the_session_cookie_stands_for_the_token(web_url):
    # unsafe: aiohttp keeps no cookie of a bare IP address otherwise (a browser does).
    async with aiohttp.ClientSession(base_url=web_url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.post("/api/v1/session", headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 401
        async with session.post("/api/v1/session", headers=AUTH) as response:
            assert response.status == 200
            cookie = response.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        async with session.get("/api/v1/jobs?limit=1") as response:
            assert response.status == 200  # the cookie alone
        async with session.delete("/api/v1/session") as response:
            assert response.status == 200
        async with session.get("/api/v1/jobs?limit=1") as response:
            assert response.status == 401


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "field"),
    [
        ("POST", "/api/v1/jobs", b"{not json", 400, "bad_request", "body"),
        ("POST", "/api/v1/jobs", b"", 400, "bad_request", "body"),
        ("POST", "/api/v1/jobs", b'{"jobs": []}', 422, "invalid_body", "jobs"),
        ("POST", "/api/v1/jobs", b'{"jobs": [{}]}', 422, "invalid_body", "jobs[0].spec"),
        (
            "POST",
            "/api/v1/jobs",
            b'{"jobs": [{"spec": {"runtime": {"kind": "process", "argv": ["true"]}, "priority": "high"}}]}',
            422,
            "invalid_body",
            "jobs[0].spec.priority",
        ),
        ("GET", "/api/v1/jobs?limit=0", None, 400, "invalid_parameter", "limit"),
        ("GET", "/api/v1/jobs?limit=many", None, 400, "invalid_parameter", "limit"),
        ("GET", "/api/v1/jobs?state=done", None, 400, "invalid_parameter", "state"),
        ("GET", "/api/v1/jobs/0123456789abcdef0123456789abcdef", None, 404, "not_found", "job_id"),
        ("POST", "/api/v1/workflows", b'{"spec": {"name": "w", "steps": {}}}', 422, "invalid_body", "spec.steps"),
        (
            "POST",
            "/api/v1/workflows",
            b'{"spec": {"name": "w", "steps": {"a": {"runtime": {"kind": "noop"}, "needs": ["zz"]}}}}',
            422,
            "invalid_spec",
            "steps.a.needs[0]",
        ),
        ("POST", "/api/v1/jobs/x/cancel", b'{"reason": 3}', 422, "invalid_body", "reason"),
    ],
)
async def test_bad_input_names_the_field(http, method, path, body, status, code, field):
    async with http.request(method, path, data=body, headers={"Content-Type": "application/json"}) as response:
        problem = await response.json()
        assert response.status == status, problem
        assert problem["code"] == code, problem
        assert problem["field"] == field, problem
        assert problem["message"]


async def test_openapi_is_served(web_url):
    from jobmesh.web.openapi import document

    async with aiohttp.ClientSession() as session, session.get(f"{web_url}/openapi.json") as response:
        assert response.status == 200
        assert await response.json() == json.loads(json.dumps(document()))


SIMPLE_SUBMIT = b'{"jobs": [{"spec": {"runtime": {"kind": "process", "argv": ["touch", "/tmp/pwned"]}}}]}'


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_a_body_that_is_not_json_typed_is_refused(open_url, content_type):
    # What any web page can make a browser send without a preflight ("simple" requests).
    headers = {"Content-Type": content_type} if content_type else {}
    async with aiohttp.ClientSession(base_url=open_url) as session:
        for path in ("/api/v1/jobs", "/api/v1/jobs/x/cancel", "/api/v1/workflows"):
            async with session.post(path, data=SIMPLE_SUBMIT, headers=headers, skip_auto_headers=["Content-Type"]) as r:
                problem = await r.json()
                assert r.status == 415, problem
                assert problem["field"] == "Content-Type", problem


@pytest.mark.parametrize(
    ("headers", "field"),
    [
        ({"Origin": "http://evil.example"}, "Origin"),
        ({"Origin": "null"}, "Origin"),
        ({"Sec-Fetch-Site": "cross-site"}, "Origin"),
        ({"Host": "evil.example:8080"}, "Host"),  # a DNS-rebinding page's own host name
    ],
)
async def test_an_open_server_refuses_other_sites(open_url, headers, field):
    async with aiohttp.ClientSession(base_url=open_url) as session:
        json_body = {**headers, "Content-Type": "application/json"}
        async with session.post("/api/v1/jobs", data=SIMPLE_SUBMIT, headers=json_body) as response:
            problem = await response.json()
            assert response.status == 403, problem
            assert problem["field"] == field and problem["code"] == "forbidden", problem


async def test_an_open_server_answers_its_own_origin_and_loopback_names(open_url):
    port = open_url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession(base_url=open_url) as session:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]"):
            async with session.get("/api/v1/jobs?limit=1", headers={"Host": host}) as response:
                assert response.status == 200, (host, await response.text())
        own = {"Origin": open_url, "Sec-Fetch-Site": "same-origin"}
        async with session.post(
            "/api/v1/jobs", json={"jobs": [job(["true"], name="web-own-origin")]}, headers=own
        ) as r:
            assert r.status == 200, await r.text()
        async with session.get("/", headers={"Host": "evil.example"}) as response:
            assert response.status == 403  # the pages too: a rebound page must not read them
        async with session.get("/") as response:
            assert response.status == 200
            assert "default-src 'self'" in response.headers["Content-Security-Policy"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/v1/jobs", {"jobs": [job(["true"], prority=9)]}, "jobs[0].spec.prority"),
        ("/api/v1/jobs", {"jobs": [{**job(["true"]), "extra": 1}]}, "jobs[0].extra"),
        ("/api/v1/jobs", {"jobs": [job(["true"])], "dry_run": True}, "dry_run"),
        (
            "/api/v1/workflows",
            {
                "spec": {
                    "name": "w",
                    "steps": {"a": {"runtime": {"kind": "noop"}}, "b": {"runtime": {"kind": "noop"}, "neds": ["a"]}},
                }
            },
            "spec.steps[...].neds",  # msgspec does not name the key of a dict
        ),
        (
            "/api/v1/workflows",
            {"spec": {"name": "w", "steps": {"a": {"runtime": {"kind": "noop"}}}}, "inptu": 1},
            "inptu",
        ),
        ("/api/v1/jobs/x/cancel", {"reason": "r", "force": True}, "force"),
        ("/api/v1/workflows/x/cancel", {"reson": "r"}, "reson"),
    ],
)
async def test_an_unknown_field_is_refused_not_dropped(http, path, body, field):
    async with http.post(path, json=body) as response:
        problem = await response.json()
        assert response.status == 422, problem
        assert problem["code"] == "invalid_body", problem
        assert problem["field"] == field, problem


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/api/v1/no-such-thing", 404, "not_found"),
        ("GET", "/no-such-page.html", 404, "not_found"),
        ("DELETE", "/api/v1/jobs", 405, "method_not_allowed"),
        ("PUT", "/api/v1/nodes", 405, "method_not_allowed"),
    ],
)
async def test_what_no_endpoint_answers_has_the_error_shape(http, method, path, status, code):
    async with http.request(method, path) as response:
        assert response.status == status
        assert response.headers["Content-Type"].startswith("application/json")
        problem = await response.json()
        assert problem["code"] == code and problem["message"] and problem["retryable"] is False, problem
        if status == 405:
            assert "GET" in response.headers["Allow"]


async def test_only_the_newest_output_lines_are_read(http):
    script = "i=1; while [ $i -le 3000 ]; do echo line $i; i=$((i+1)); done"
    (job_id,) = await submit(http, job(["sh", "-c", script], name="web-many-lines"))
    assert (await final_view(http, job_id))["state"] == "succeeded"

    async def all_stored() -> dict | None:
        page = await get_json(http, f"/api/v1/jobs/{job_id}/logs?lines=100")
        return page if page["total"] >= 3000 else None

    page = await eventually(all_stored, what="the job's 3000 output lines")
    assert [line["line"] for line in page["lines"]] == [f"line {i}" for i in range(2901, 3001)]
    assert page["truncated"] is True
    timeline = await get_json(http, f"/api/v1/jobs/{job_id}/timeline?lines=10")
    assert [line["line"] for line in timeline["logs"]["lines"]][-1] == "line 3000"
    assert len(timeline["logs"]["lines"]) == 10 and timeline["logs"]["truncated"] is True
    whole = await get_json(http, f"/api/v1/jobs/{job_id}/logs?lines=5000")
    assert len(whole["lines"]) == whole["total"] and whole["truncated"] is False
