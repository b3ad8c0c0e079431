"""The HTTP API's endpoints: one table (:data:`ENDPOINTS`) that both the app and the
OpenAPI document are made from, and the handlers, each a thin translation of one request
into one client call.

Every handler gets the request and the server's :class:`WebState`; it returns a response
or raises (``HttpProblem`` for the API's own refusals, ``JobmeshError`` from the cluster),
and ``app`` turns what it raises into the one error shape.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, get_args

import msgspec
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from jobmesh.client.client import CancelOutcome, Client
from jobmesh.client.deadletters import DeadLetterPage
from jobmesh.client.logs import LogPage
from jobmesh.client.results import has_result
from jobmesh.contract.messages.v1 import (
    JobListReply,
    JobState,
    JobView,
    NodesReply,
    SubmitReply,
    TriggerListReply,
    TriggerView,
    WorkflowCancelReply,
    WorkflowListReply,
    WorkflowRunReply,
)
from jobmesh.errors import JobmeshError, NotFound
from jobmesh.web import auth, guard
from jobmesh.web.live import LiveHub
from jobmesh.web.problems import HttpProblem, decode_body, json_response
from jobmesh.web.views import (
    CancelBody,
    Health,
    QueuesView,
    Session,
    SubmitBody,
    Timeline,
    WorkflowBody,
    WorkflowView,
    job_timeline,
    queues_view,
    workflow_view,
)

JOB_STATES: tuple[str, ...] = get_args(JobState)
MAX_LIST = 1000
RESULT_READ_LIMIT = 1024 * 1024  # the largest result a timeline reads (it shows the first 64 KiB)
SSE_PING_SECONDS = 15  # a comment line this often keeps proxies from closing an idle stream
# A client that takes no bytes for this long (a stalled or vanished reader whose socket
# stays open) loses its stream, rather than holding the connection and its listener forever.
SSE_SEND_TIMEOUT_SECONDS = 30.0


@dataclass
class WebState:
    """What every handler needs: the cluster client, the live hub and the token.

    Attributes:
        client: the connected cluster client.
        hub: the live event hub.
        token: the API token; None when the server runs open (loopback only).
    """

    client: Client
    hub: LiveHub
    token: str | None


@dataclass(frozen=True)
class Param:
    """A path or query parameter, for the OpenAPI document."""

    name: str
    where: str  # "path" or "query"
    schema: dict[str, Any]
    description: str
    required: bool = False


Handler = Callable[[Request, WebState], Awaitable[Response]]


@dataclass(frozen=True)
class Endpoint:
    """One operation of the API.

    Attributes:
        method: the HTTP method.
        path: the path, with ``{name}`` parameters.
        handler: what answers it.
        operation_id: its OpenAPI ``operationId``.
        summary: one line.
        reply: the type of its 200 body (None: no JSON body).
        body: the type of its request body (None: none).
        params: its parameters.
        errors: the error statuses it may answer with (beyond 401 when ``auth``).
        auth: whether it needs the token.
        stream: it answers ``text/event-stream``.
        description: more words for the document.
    """

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    reply: Any = None
    body: Any = None
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = (503,)
    auth: bool = True
    stream: bool = False
    description: str = ""


# --- parameters --------------------------------------------------------------------------
def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter between ``low`` and ``high``.

    Raises:
        HttpProblem: 400 ``invalid_parameter`` naming it, when it is not such a number.
    """
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise HttpProblem(400, "invalid_parameter", f"{name} must be a whole number from {low} to {high}", name)
    return value


def query_states(request: Request) -> list[str]:
    """The ``state`` parameter: job states separated by commas.

    Raises:
        HttpProblem: 400 naming ``state`` and the state it does not know.
    """
    states = [s.strip() for s in request.query_params.get("state", "").split(",") if s.strip()]
    for s in states:
        if s not in JOB_STATES:
            raise HttpProblem(400, "invalid_parameter", f"state {s!r} is not one of {', '.join(JOB_STATES)}", "state")
    return states


async def body_of(request: Request, kind: type[Any], default: Any = None) -> Any:
    """The request's JSON body decoded as ``kind`` (see ``problems.decode_body``).

    Args:
        request: the request.
        kind: the body's type.
        default: what an empty body stands for; None when a body is required.

    Raises:
        HttpProblem: 415 naming ``Content-Type`` when a body is not ``application/json``
            (no other page can send that without a CORS preflight, which this server never
            grants), or what ``decode_body`` raises.
    """
    raw = await request.body()
    if default is not None and not raw.strip():
        return default
    if raw:
        problem = guard.content_type_refusal(request.headers.get("content-type"))
        if problem is not None:
            raise HttpProblem(415, "unsupported_media_type", problem, "Content-Type")
    return decode_body(raw, kind)


# --- handlers ----------------------------------------------------------------------------
async def healthz(request: Request, web: WebState) -> Response:
    connected = web.client.nc.is_connected
    health = Health(ok=connected, nats="connected" if connected else "disconnected", auth=web.token is not None)
    return json_response(health, 200 if connected else 503)


async def start_session(request: Request, web: WebState) -> Response:
    # Reached only with a valid bearer token (or none needed): hand it back as the cookie.
    response = json_response(Session(auth=web.token is not None))
    if web.token is not None:
        response.set_cookie(
            auth.COOKIE, web.token, httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
    return response


async def end_session(request: Request, web: WebState) -> Response:
    response = json_response(Session(auth=web.token is not None))
    response.delete_cookie(auth.COOKIE, httponly=True, samesite="strict")
    return response


async def submit_jobs(request: Request, web: WebState) -> Response:
    body: SubmitBody = await body_of(request, SubmitBody)
    return json_response(await web.client.submit(body.jobs))


async def list_jobs(request: Request, web: WebState) -> Response:
    limit = query_int(request, "limit", 50, 1, MAX_LIST)
    states = query_states(request)
    queue = request.query_params.get("queue", "")
    workflow = request.query_params.get("workflow", "")
    tenant = request.query_params.get("tenant", "")
    if workflow:
        reply = JobListReply(jobs=(await web.client.workflow_jobs(workflow))[:limit])
    else:
        reply = await web.client.list(limit=limit, queue=queue, states=states)
    if tenant or (workflow and (queue or states)):
        # The tracker filters by state and queue; the rest is filtered here, in the page asked for.
        reply = JobListReply(
            jobs=[
                j
                for j in reply.jobs
                if (not tenant or j.tenant == tenant)
                and (not queue or j.queue == queue)
                and (not states or j.state in states)
            ]
        )
    return json_response(reply)


async def get_job(request: Request, web: WebState) -> Response:
    return json_response(await web.client.get(request.path_params["job_id"]))


async def get_timeline(request: Request, web: WebState) -> Response:
    job_id = request.path_params["job_id"]
    lines = query_int(request, "lines", 500, 1, 5000)
    view = await web.client.get(job_id)
    result = None
    ok = [a for a in view.attempts if a.state == "succeeded" and has_result(a)]
    # A stored result larger than a page can show is not read at all: the timeline names
    # its size and where it is (``jobmesh result ID`` reads it).
    if ok and ok[-1].result_bytes <= RESULT_READ_LIMIT:
        try:
            result = (await web.client.result(job_id)).data
        except NotFound:
            result = None  # it expired: the attempts say where it was
    nodes = None
    if not view.final:
        try:
            nodes = await web.client.nodes()
        except JobmeshError:
            nodes = None  # progress is a nicety: the binder being down must not hide the timeline
    return json_response(job_timeline(view, nodes, await web.client.logs(job_id, lines), result))


async def get_logs(request: Request, web: WebState) -> Response:
    job_id = request.path_params["job_id"]
    return json_response(await web.client.logs(job_id, query_int(request, "lines", 500, 1, 5000)))


async def cancel_job(request: Request, web: WebState) -> Response:
    body: CancelBody = await body_of(request, CancelBody, default=CancelBody())
    return json_response(await web.client.cancel(request.path_params["job_id"], body.reason))


async def run_workflow(request: Request, web: WebState) -> Response:
    body: WorkflowBody = await body_of(request, WorkflowBody)
    return json_response(await web.client.run_workflow(body.spec, body.input, body.idempotency_key))


async def list_workflows(request: Request, web: WebState) -> Response:
    limit = query_int(request, "limit", 50, 1, MAX_LIST)
    return json_response(await web.client.list_workflows(limit=limit, name=request.query_params.get("name", "")))


async def get_workflow(request: Request, web: WebState) -> Response:
    return json_response(workflow_view(await web.client.workflow_status(request.path_params["run_id"])))


async def cancel_workflow(request: Request, web: WebState) -> Response:
    body: CancelBody = await body_of(request, CancelBody, default=CancelBody())
    return json_response(await web.client.cancel_workflow(request.path_params["run_id"], body.reason))


async def list_nodes(request: Request, web: WebState) -> Response:
    return json_response(await web.client.nodes())


async def list_queues(request: Request, web: WebState) -> Response:
    return json_response(queues_view(await web.client.queues()))


async def list_dead_letters(request: Request, web: WebState) -> Response:
    limit = query_int(request, "limit", 50, 1, MAX_LIST)
    service = request.query_params.get("service", "")
    return json_response(await web.client.dead_letters(service=service, limit=limit))


async def list_triggers(request: Request, web: WebState) -> Response:
    return json_response(await web.client.list_triggers())


async def get_trigger(request: Request, web: WebState) -> Response:
    return json_response(await web.client.get_trigger(request.path_params["name"]))


async def events(request: Request, web: WebState) -> Response:
    job_id = request.query_params.get("job", "")

    async def stream() -> AsyncIterator[ServerSentEvent]:
        with web.hub.listen(job_id) as listener:
            # Said first, so a client knows that every update from now on reaches it.
            yield ServerSentEvent(data=msgspec.json.encode({"job": job_id}).decode(), event="ready")
            while True:
                event = await listener.next()
                yield ServerSentEvent(data=event.data.decode(), event=event.kind)

    return EventSourceResponse(
        stream(), ping=SSE_PING_SECONDS, send_timeout=SSE_SEND_TIMEOUT_SECONDS, headers={"Cache-Control": "no-store"}
    )


async def openapi(request: Request, web: WebState) -> Response:
    from jobmesh.web.openapi import document  # the document imports this table

    return json_response(await asyncio.to_thread(document))


# --- the table -----------------------------------------------------------------------------
_JOB = Param("job_id", "path", {"type": "string"}, "the job's id", required=True)
_RUN = Param("run_id", "path", {"type": "string"}, "the workflow run's id", required=True)
_LIMIT = Param(
    "limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIST, "default": 50}, "at most this many"
)
_LINES = Param("lines", "query", {"type": "integer", "minimum": 1, "maximum": 5000, "default": 500}, "the newest lines")

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET",
        "/healthz",
        healthz,
        "health",
        "Whether the server reaches NATS (no token needed)",
        reply=Health,
        auth=False,
        errors=(503,),
    ),
    Endpoint("GET", "/openapi.json", openapi, "openapi", "This document", auth=False, errors=()),
    Endpoint(
        "POST",
        "/api/v1/session",
        start_session,
        "startSession",
        "Trade the bearer token for the dashboard's HttpOnly cookie",
        reply=Session,
        errors=(),
    ),
    Endpoint(
        "DELETE",
        "/api/v1/session",
        end_session,
        "endSession",
        "Clear the cookie (log out)",
        reply=Session,
        auth=False,
        errors=(),
    ),
    Endpoint(
        "POST",
        "/api/v1/jobs",
        submit_jobs,
        "submitJobs",
        "Submit jobs (jobmesh.v1.api.submit)",
        reply=SubmitReply,
        body=SubmitBody,
        errors=(400, 422, 503),
        description="Answered once every job is durably accepted; ids in request order.",
    ),
    Endpoint(
        "GET",
        "/api/v1/jobs",
        list_jobs,
        "listJobs",
        "Recent jobs, newest first (a run's in submission order)",
        reply=JobListReply,
        errors=(400, 503),
        params=(
            _LIMIT,
            Param("state", "query", {"type": "string"}, "only these states, separated by commas"),
            Param("queue", "query", {"type": "string"}, "only this queue"),
            Param("tenant", "query", {"type": "string"}, "only this tenant (filtered within the page)"),
            Param("workflow", "query", {"type": "string"}, "only the jobs of this workflow run"),
        ),
    ),
    Endpoint(
        "GET",
        "/api/v1/jobs/{job_id}",
        get_job,
        "getJob",
        "Everything the tracker knows about a job",
        reply=JobView,
        params=(_JOB,),
        errors=(404, 503),
    ),
    Endpoint(
        "GET",
        "/api/v1/jobs/{job_id}/timeline",
        get_timeline,
        "getJobTimeline",
        "A job's transitions, attempts, nodes, progress, output and result",
        reply=Timeline,
        params=(_JOB, _LINES),
        errors=(400, 404, 503),
    ),
    Endpoint(
        "GET",
        "/api/v1/jobs/{job_id}/logs",
        get_logs,
        "getJobLogs",
        "A job's newest output lines",
        reply=LogPage,
        params=(_JOB, _LINES),
        errors=(400, 503),
    ),
    Endpoint(
        "POST",
        "/api/v1/jobs/{job_id}/cancel",
        cancel_job,
        "cancelJob",
        "Cancel a job (an ended one stays)",
        reply=CancelOutcome,
        body=CancelBody,
        params=(_JOB,),
        errors=(400, 404, 422, 503),
    ),
    Endpoint(
        "POST",
        "/api/v1/workflows",
        run_workflow,
        "runWorkflow",
        "Start a workflow run",
        reply=WorkflowRunReply,
        body=WorkflowBody,
        errors=(400, 422, 503),
    ),
    Endpoint(
        "GET",
        "/api/v1/workflows",
        list_workflows,
        "listWorkflows",
        "Recent workflow runs, newest first",
        reply=WorkflowListReply,
        errors=(400, 503),
        params=(_LIMIT, Param("name", "query", {"type": "string"}, "only runs of this workflow")),
    ),
    Endpoint(
        "GET",
        "/api/v1/workflows/{run_id}",
        get_workflow,
        "getWorkflow",
        "A run's steps with their states, and the layout of its graph",
        reply=WorkflowView,
        params=(_RUN,),
        errors=(404, 503),
    ),
    Endpoint(
        "POST",
        "/api/v1/workflows/{run_id}/cancel",
        cancel_workflow,
        "cancelWorkflow",
        "Cancel a workflow run",
        reply=WorkflowCancelReply,
        body=CancelBody,
        params=(_RUN,),
        errors=(400, 404, 422, 503),
    ),
    Endpoint(
        "GET",
        "/api/v1/nodes",
        list_nodes,
        "listNodes",
        "Every node: capacity, allocation, isolation level, running attempts",
        reply=NodesReply,
    ),
    Endpoint("GET", "/api/v1/queues", list_queues, "listQueues", "Every queue's depth, per tenant", reply=QueuesView),
    Endpoint(
        "GET",
        "/api/v1/dead-letters",
        list_dead_letters,
        "listDeadLetters",
        "The newest messages the services refused, and why",
        reply=DeadLetterPage,
        errors=(400, 503),
        params=(_LIMIT, Param("service", "query", {"type": "string"}, "only this service's")),
    ),
    Endpoint(
        "GET",
        "/api/v1/triggers",
        list_triggers,
        "listTriggers",
        "Every trigger rule with its figures",
        reply=TriggerListReply,
    ),
    Endpoint(
        "GET",
        "/api/v1/triggers/{name}",
        get_trigger,
        "getTrigger",
        "One trigger rule",
        reply=TriggerView,
        params=(Param("name", "path", {"type": "string"}, "the rule's name", required=True),),
        errors=(404, 503),
    ),
    Endpoint(
        "GET",
        "/api/v1/events",
        events,
        "streamEvents",
        "Live updates (server-sent events)",
        stream=True,
        errors=(),
        params=(Param("job", "query", {"type": "string"}, "only this job's updates"),),
        description="Events: `ready` once subscribed; `job` (a JobUpdate) after the tracker commits a change;"
        " `nodes` (NodesReply) and `queues` (QueuesView) when they change (not with `job`); `resync` when the"
        " stream fell behind and dropped events. A comment line every 15 s keeps it open.",
    ),
)
