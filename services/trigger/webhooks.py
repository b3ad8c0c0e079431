"""The trigger's HTTP ingress: webhooks in, jobs out; and submits over HTTP.

An ``aiohttp`` application that runs inside the trigger's event loop (``JOBMESH_HTTP_LISTEN``):

- ``POST /v1/hooks/{name}``: the rule ``name`` (a webhook source) makes a job of the body.
  The sender proves itself with a bearer token or an HMAC-SHA256 signature of the raw body,
  both compared in constant time against a secret the service reads by name (a file in
  ``JOBMESH_SECRETS_DIR`` or ``JOBMESH_SECRET_<NAME>``; it never travels). The body is
  refused before anything is routed when it is too large, unsigned or not JSON, so none of
  those can make a job.
- ``POST /v1/jobs``: a ``SubmitRequest``, as on ``jobmesh.v1.api.submit``, behind a bearer
  token (off, 403, until the operator names the token's secret).
- ``GET /v1/health`` and ``GET /v1/openapi.json`` (the document of this module's routes,
  :func:`openapi_document`; ``schemas/openapi.json`` is that document, written by
  ``python -m jobmesh.trigger.webhooks``).

Every reply that says a job exists is sent after its JobSubmitted's PubAck (the router and
the submit handler return only then), so a 2xx is a job that cannot be lost; a 503 means
nothing was promised, and sending the same request again (same ``Idempotency-Key``) is safe.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from opentelemetry import trace

from jobmesh.contract import subjects
from jobmesh.contract.codec import Codec, encode
from jobmesh.contract.ids import new_idempotency_key
from jobmesh.contract.messages.v1 import ErrorReply, SubmitReply, SubmitRequest, WebhookSource
from jobmesh.errors import InvalidMessage, JobmeshError, Overloaded, OversizedMessage, Unavailable
from jobmesh.runtime.opsserver import parse_listen
from jobmesh.runtime.outcomes import Reject
from jobmesh.runtime.secretfiles import SecretFileError, read_secret_file
from jobmesh.runtime.service import Envelope
from jobmesh.runtime.tracing import Tracing
from jobmesh.trigger.metrics import TriggerMetrics
from jobmesh.trigger.router import Incoming, Router
from jobmesh.trigger.rules import event_variables
from jobmesh.trigger.ruleset import RuleSet

log = logging.getLogger("jobmesh.trigger.http")

# Every route the application serves: (method, path, operation id). The OpenAPI document and
# the router are both built from this table, so neither can list a route the other lacks.
ROUTES = (
    ("POST", "/v1/jobs", "submitJobs"),
    ("POST", "/v1/hooks/{name}", "postHook"),
    ("GET", "/v1/health", "health"),
    ("GET", "/v1/openapi.json", "openapi"),
)
# Headers that carry credentials: never handed to a rule's templates (the signature header
# of the rule is dropped as well).
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
# Headers the ingress reads itself; trace context continues in the job, not in templates.
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
# Seconds a sender is asked to wait after a 503: an outage (NATS) or a full stream.
RETRY_AFTER_UNAVAILABLE = 2
RETRY_AFTER_OVERLOADED = 5
SUBMIT_DISABLED = (
    "POST /v1/jobs is off: set JOBMESH_HTTP_SUBMIT_TOKEN_SECRET to the name of a secret (a file "
    "<JOBMESH_SECRETS_DIR>/<NAME> or a variable JOBMESH_SECRET_<NAME> of the trigger) holding the token "
    "that callers send as 'Authorization: Bearer <token>'"
)

DeadLetter = Callable[..., Awaitable[bool]]
SubmitCall = Callable[[Envelope], Awaitable[SubmitReply]]
SecretLookup = Callable[[str], bytes | None]


# --- replies -------------------------------------------------------------------------
class HookReply(msgspec.Struct, frozen=True, kw_only=True):
    """What a hook's POST did (HTTP only, not a wire message).

    ``job_ids`` holds the job the body started (empty when none did), ``run_id`` the
    workflow run a workflow rule started; ``duplicate`` is true when that job or run
    existed already (the same event id again); ``held`` when a
    debounce or batch rule keeps the event for a later job; ``filtered`` when the rule's
    filter let it pass; ``paused`` when the rule is paused.
    """

    event_id: str
    job_ids: list[str] = []
    run_id: str = ""
    duplicate: bool = False
    held: bool = False
    filtered: bool = False
    paused: bool = False


class HealthBody(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v1/health``: the ingress answers."""

    ok: bool


class HttpError(Exception):
    """Raised inside a request to answer it with an ``ErrorReply`` and a status.

    Args:
        status: the HTTP status.
        code: the reply's stable error code.
        message: the human message.
        field: the offending field or header, when there is one.
        headers: extra response headers (``WWW-Authenticate``, ``Retry-After``).
    """

    def __init__(
        self, status: int, code: str, message: str, *, field: str = "", headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reply = ErrorReply(code=code, message=message, field=field, retryable=status == 503)
        self.headers = dict(headers or {})


def _json(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=encode(body), status=status, content_type="application/json", headers=headers)


def error_for(exc: JobmeshError) -> HttpError:
    """The HTTP answer to an error the submit path raised.

    Returns:
        400 for an invalid request (413 when too large), 503 with ``Retry-After`` for an
        outage or a full stream, 404/409 for not found/conflict, else 500.
    """
    reply = ErrorReply.of(exc)
    if isinstance(exc, OversizedMessage):
        status = 413
    elif isinstance(exc, InvalidMessage):
        status = 400
    elif isinstance(exc, Overloaded):
        return HttpError(
            503, reply.code, reply.message, field=reply.field, headers={"Retry-After": str(RETRY_AFTER_OVERLOADED)}
        )
    elif isinstance(exc, Unavailable):
        return HttpError(
            503, reply.code, reply.message, field=reply.field, headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE)}
        )
    elif exc.code == "not_found":
        status = 404
    elif exc.code == "conflict":
        status = 409
    else:
        status = 500
    return HttpError(status, reply.code, reply.message, field=reply.field)


# --- secrets -------------------------------------------------------------------------
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}")


class SecretUnreadable(Exception):
    """Raised when a secret's file exists but cannot be read, or its name is not a plain
    name. The message names the secret and why, never a value."""


class SecretReader:
    """The trigger's secrets, looked up as the executor looks up a job's: the file
    ``<directory>/<NAME>`` (one trailing newline dropped), else the variable
    ``<env_prefix><NAME>``.

    Files are read on every lookup, so a rotated secret applies at once; variables are
    copied when the reader is made (the trigger starts no children, so they stay in its
    environment).

    Args:
        directory: ``JOBMESH_SECRETS_DIR`` ("" or None: no directory).
        env_prefix: ``JOBMESH_SECRETS_ENV_PREFIX`` ("" turns variables off).
        environ: the process environment (``os.environ``).
    """

    def __init__(self, directory: str | Path | None, env_prefix: str, environ: Mapping[str, str]) -> None:
        self.directory = Path(directory) if directory else None
        self.env_prefix = env_prefix
        self._environ = {k: v for k, v in environ.items() if k.startswith(env_prefix)} if env_prefix else {}

    def __call__(self, name: str) -> bytes | None:
        """The secret's value, or None when there is no such secret.

        Raises:
            SecretUnreadable: the name is not a plain name, or its file is there but cannot
                be read (a fallback to a variable would hide the operator's mistake).
        """
        if not _PLAIN_NAME.fullmatch(name):
            raise SecretUnreadable(f"secret name {name[:128]!r} is not a plain name (letters, digits, '_' and '-')")
        found = self._from_file(name)
        if found is None and self.env_prefix:
            value = self._environ.get(self.env_prefix + name)
            found = None if value is None else value.encode("utf-8", "surrogateescape")
        return found

    def where(self, name: str) -> str:
        """Where a secret of that name is looked for (for an error message)."""
        places = []
        if self.directory is not None:
            places.append(f"the file {self.directory / name}")
        if self.env_prefix:
            places.append(f"the variable {self.env_prefix}{name}")
        return " or ".join(places) or "nowhere: JOBMESH_SECRETS_DIR is not set and JOBMESH_SECRETS_ENV_PREFIX is empty"

    def _from_file(self, name: str) -> bytes | None:
        if self.directory is None:
            return None
        try:
            return read_secret_file(self.directory, name)
        except SecretFileError as exc:
            raise SecretUnreadable(str(exc)) from None


# --- pure checks ---------------------------------------------------------------------
def bearer_token(header: str) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (None when it is not one)."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("utf-8", "surrogateescape")


def signature_matches(secret: bytes, body: bytes, header: str) -> bool:
    """Whether ``header`` (hex, optionally ``sha256=``) is the HMAC-SHA256 of ``body``
    under ``secret``; compared in constant time."""
    given = header.strip()
    if given[:7].lower() == "sha256=":
        given = given[7:]
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    return hmac.compare_digest(expected, given.lower().encode("utf-8", "surrogateescape"))


def template_headers(headers: Mapping[str, str], signature_header: str) -> dict[str, str]:
    """The request's headers as a rule's templates see them: names lower-cased, repeated
    headers joined with ", ", and no credential, signature or trace header."""
    drop = CREDENTIAL_HEADERS | TRACE_HEADERS | {signature_header.lower()}
    out: dict[str, str] = {}
    for key, value in headers.items():
        name = key.lower()
        if name in drop:
            continue
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def event_id_of(headers: Mapping[str, str], source: WebhookSource) -> str:
    """The event's identity: ``Idempotency-Key``, else the rule's ``id_header``, else a
    fresh random id (each such POST is a job of its own)."""
    key = headers.get("Idempotency-Key", "").strip()
    if key:
        return key
    if source.id_header:
        delivery = headers.get(source.id_header, "").strip()
        if delivery:
            return delivery
    return new_idempotency_key()


class _TooLarge(Exception):
    pass


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body, refused once it is larger than ``limit`` bytes: by its
    ``Content-Length`` before reading, and by what arrives (a chunked body has no length).

    Raises:
        HttpError: 413.
    """
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit, f"Content-Length {length}")
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int, got: str) -> HttpError:
    return HttpError(413, OversizedMessage.code, f"body too large: {got}; the limit is {limit} bytes")


# --- the application -----------------------------------------------------------------
class HttpIngress:
    """The HTTP server of one trigger replica.

    Args:
        listen: ``host:port`` to bind (``JOBMESH_HTTP_LISTEN``; port 0 picks a free one).
        submit: the API submit handler (:class:`jobmesh.trigger.handlers.SubmitHandler`).
        rules: the live rule set.
        router: applies a hook's rule to its body and submits.
        secrets: a secret's value by name (None: no such secret); may raise
            :class:`SecretUnreadable`. A :class:`SecretReader`, usually.
        dead_letter: records a body its rule could not make a job of (``Runtime.dead_letter``).
        submit_token: the token ``POST /v1/jobs`` requires (None: that route answers 403).
        clock: unix time.
        tracing: extracts the sender's ``traceparent`` (carry-only when omitted).
        max_submit_bytes: the largest ``POST /v1/jobs`` body (``JOBMESH_MAX_MESSAGE_BYTES``).
        drain_seconds: how long :meth:`stop` waits for requests in flight.
        metrics: the trigger's instruments (every request's duration and status).
    """

    def __init__(
        self,
        listen: str,
        submit: SubmitCall,
        rules: RuleSet,
        router: Router,
        secrets: SecretLookup,
        dead_letter: DeadLetter,
        submit_token: bytes | None,
        clock: Callable[[], float] = time.time,
        *,
        tracing: Tracing | None = None,
        max_submit_bytes: int = 256 * 1024,
        drain_seconds: float = 10.0,
        metrics: TriggerMetrics | None = None,
    ) -> None:
        self._metrics = metrics or TriggerMetrics()
        self.host, self._port = parse_listen(listen, "JOBMESH_HTTP_LISTEN")
        self._submit = submit
        self._rules = rules
        self._router = router
        self._secrets = secrets
        self._dead_letter = dead_letter
        self._submit_token = submit_token or None
        self._clock = clock
        self._tracing = tracing or Tracing.off()
        self._codec: Codec[SubmitRequest] = Codec(SubmitRequest, max_submit_bytes)
        self._max_submit = max_submit_bytes
        self._drain = drain_seconds
        self._runner: web.AppRunner | None = None
        self.app = self._make_app()

    def _make_app(self) -> web.Application:
        # Outermost first: the duration covers the error handling, and every answer has a status.
        app = web.Application(middlewares=[self._measured, self._errors])
        handlers = {
            "submitJobs": self._post_jobs,
            "postHook": self._post_hook,
            "health": self._health,
            "openapi": self._openapi,
        }
        for method, path, operation in ROUTES:
            app.router.add_route(method, path, handlers[operation], name=operation)
        return app

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`; useful with port 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the HTTP ingress is not started")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        """Bind and serve in the running event loop."""
        runner = web.AppRunner(
            self.app, access_log=logging.getLogger("jobmesh.trigger.http.access"), shutdown_timeout=self._drain
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._port).start()
        except OSError as exc:
            await runner.cleanup()
            raise Unavailable(f"cannot listen on {self.host}:{self._port} (JOBMESH_HTTP_LISTEN): {exc}") from exc
        self._runner = runner
        log.info("HTTP ingress listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish (up to ``drain_seconds``), close."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # --- middleware ----------------------------------------------------------------
    @web.middleware
    async def _measured(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        start = time.perf_counter()
        response = await handler(request)  # _errors turns every failure into an answer
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else ""
        self._metrics.http_request(request.method, route, response.status, time.perf_counter() - start)
        return response

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as exc:
            response = _json(exc.reply, exc.status, exc.headers)
            if exc.status == 413:
                response.force_close()  # the rest of the body is not worth reading
            return response
        except web.HTTPException as exc:
            # aiohttp's own answers (unknown path, wrong method) in the same JSON shape.
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            return _json(
                ErrorReply(code=code, message=f"{request.method} {request.path}: {exc.reason}"), exc.status, headers
            )
        except JobmeshError as exc:
            err = error_for(exc)
            return _json(err.reply, err.status, err.headers)
        except Exception as exc:
            log.exception("HTTP %s %s failed", request.method, request.path)
            reply = ErrorReply(code="internal", message=f"internal error: {type(exc).__name__}: {exc}")
            return _json(reply, 500)

    # --- routes --------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return _json(HealthBody(ok=True))

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.Response(text=render_openapi(), content_type="application/json")

    async def _post_jobs(self, request: web.Request) -> web.Response:
        if self._submit_token is None:
            raise HttpError(403, "forbidden", SUBMIT_DISABLED)
        self._check_bearer(request, self._submit_token, "the submit token")
        body = await read_body(request, self._max_submit)
        headers = {k.lower(): v for k, v in request.headers.items() if k.lower() not in CREDENTIAL_HEADERS}
        try:
            message = self._codec.decode(body)  # strict: unknown fields are refused, naming them
        except InvalidMessage as exc:
            await self._record_refused(body, exc)
            raise error_for(exc) from exc
        span, context = self._tracing.open_span("POST /v1/jobs", headers, trace.SpanKind.SERVER)
        try:
            # raw=None: the handler then checks the spec for NUL characters itself, and the
            # unknown fields were refused above against the body as it came.
            env = Envelope(message, subjects.API_SUBMIT, headers, context, None, span)
            try:
                reply = await self._submit(env)
            except InvalidMessage as exc:
                await self._record_refused(body, exc)
                raise
        finally:
            if span is not None:
                span.end()
        return _json(reply)

    async def _post_hook(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        rule = self._rules.get(name)
        if rule is None or not isinstance(rule.rule.source, WebhookSource):
            raise HttpError(404, "not_found", f"no webhook rule named {name!r}", field="name")
        source = rule.rule.source
        secret = self._secret(name, source.secret)
        if source.auth == "bearer":
            self._check_bearer(request, secret, f"hook {name}'s secret")
        body = await read_body(request, source.max_body_bytes)
        if source.auth == "hmac":
            signature = request.headers.get(source.signature_header, "")
            if not signature or not signature_matches(secret, body, signature):
                raise HttpError(
                    401,
                    "unauthorized",
                    f"{'missing' if not signature else 'bad'} signature: {source.signature_header} must be the hex "
                    "HMAC-SHA256 of the raw body under the hook's secret (optionally prefixed 'sha256=')",
                    field=source.signature_header,
                    headers={
                        "WWW-Authenticate": f'Signature header="{source.signature_header}", algorithm="hmac-sha256"'
                    },
                )
        try:
            data = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise HttpError(400, InvalidMessage.code, f"malformed body: the body must be JSON: {exc}") from exc
        except RecursionError as exc:
            raise HttpError(400, InvalidMessage.code, "malformed body: JSON nested too deeply") from exc
        event_id = event_id_of(request.headers, source)
        hook_subject = f"hooks.{name}"
        now = self._clock()
        variables = event_variables(
            hook_subject, data, template_headers(request.headers, source.signature_header), event_id, now
        )
        span, context = self._tracing.open_span("POST /v1/hooks/{name}", request.headers, trace.SpanKind.SERVER)
        try:
            routed = await self._router.route(
                [
                    Incoming(
                        kind="webhook",
                        variables=variables,
                        event_id=event_id,
                        subject=hook_subject,
                        rules=[rule],
                        context=context,
                    )
                ]
            )
        finally:
            if span is not None:
                span.end()
        if routed.failures:
            failure = routed.failures[0]
            error = failure.error
            reason = f"rule {rule.name} v{rule.version}: {error}"
            if not await self._dead_letter(hook_subject, body, Reject(error.code, reason), rule=rule.name):
                log.error("hook %s: could not record the dead letter of a body its rule refused", name)
            raise HttpError(422, error.code, reason, field=error.field or "")
        if routed.fired:
            fired = routed.fired[0][2]
            return _json(
                HookReply(
                    event_id=event_id,
                    job_ids=[fired.job_id] if fired.job_id else [],
                    run_id=fired.run_id,
                    duplicate=fired.duplicate,
                ),
                202,
            )
        if routed.held:
            return _json(HookReply(event_id=event_id, held=True), 202)
        if routed.skipped:
            return _json(HookReply(event_id=event_id, paused=True), 202)
        return _json(HookReply(event_id=event_id, filtered=True), 200)

    # --- helpers -------------------------------------------------------------------
    def _secret(self, hook: str, name: str) -> bytes:
        """The secret a hook checks against, or a 503 naming it (the sender did nothing
        wrong: the operator has to provide it)."""
        try:
            value = self._secrets(name)
            why = "not found"
        except SecretUnreadable as exc:
            value, why = None, str(exc)
        if value:
            return value
        where = self._secrets.where(name) if isinstance(self._secrets, SecretReader) else "the secrets directory"
        if value is not None:
            why = "it is empty"
        log.error("hook %s: its secret %r cannot be read (%s; looked in %s)", hook, name, why, where)
        raise HttpError(
            503,
            Unavailable.code,
            f"hook {hook}: the trigger cannot read its secret {name!r} ({why}); the operator provides it as {where}",
            headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE)},
        )

    @staticmethod
    def _check_bearer(request: web.Request, expected: bytes, what: str) -> None:
        token = bearer_token(request.headers.get("Authorization", ""))
        if token is None or not hmac.compare_digest(token, expected):
            problem = "missing bearer token" if token is None else "bad bearer token"
            raise HttpError(
                401,
                "unauthorized",
                f"{problem}: send 'Authorization: Bearer <token>' with {what}",
                field="Authorization",
                headers={
                    "WWW-Authenticate": 'Bearer realm="jobmesh"' + ("" if token is None else ', error="invalid_token"')
                },
            )

    async def _record_refused(self, body: bytes, exc: InvalidMessage) -> None:
        # An authenticated submit that fails validation is recorded like one over NATS.
        if not await self._dead_letter("http:POST /v1/jobs", body, Reject(exc.code, str(exc))):
            log.error("could not record the dead letter of a refused HTTP submit")


# --- the OpenAPI document ------------------------------------------------------------
OPENAPI_MARKER = "generated by python -m jobmesh.trigger.webhooks > schemas/openapi.json; do not edit"


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of :data:`ROUTES`; message schemas come from the wire types."""
    refs, components = msgspec.json.schema_components(
        (SubmitRequest, SubmitReply, ErrorReply, HookReply, HealthBody), ref_template="#/components/schemas/{name}"
    )
    submit_request, submit_reply, error, hook_reply, health = refs

    def error_response(description: str, retry: bool = False, auth: bool = False) -> dict[str, Any]:
        response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": error}}}
        headers: dict[str, Any] = {}
        if retry:
            headers["Retry-After"] = {
                "description": "seconds to wait before sending again",
                "schema": {"type": "integer"},
            }
        if auth:
            headers["WWW-Authenticate"] = {"description": "the expected credentials", "schema": {"type": "string"}}
        if headers:
            response["headers"] = headers
        return response

    def ok(schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    trace_header = {
        "name": "traceparent",
        "in": "header",
        "required": False,
        "description": "W3C trace context; the job's trace continues it",
        "schema": {"type": "string"},
    }
    operations: dict[str, dict[str, Any]] = {
        "submitJobs": {
            "summary": "Submit jobs (the SubmitRequest of jobmesh.v1.api.submit)",
            "description": "Answered only after every JobSubmitted is durable. Off (403) until the operator sets "
            "JOBMESH_HTTP_SUBMIT_TOKEN_SECRET.",
            "security": [{"bearer": []}],
            "parameters": [trace_header],
            "requestBody": {"required": True, "content": {"application/json": {"schema": submit_request}}},
            "responses": {
                "200": ok(submit_reply, "the job ids, in request order"),
                "400": error_response("the request is not a valid SubmitRequest (field named)"),
                "401": error_response("missing or bad bearer token", auth=True),
                "403": error_response("the endpoint is off: no submit token is configured"),
                "413": error_response("the body is larger than JOBMESH_MAX_MESSAGE_BYTES"),
                "503": error_response("NATS is unreachable or a stream is full: send again later", retry=True),
            },
        },
        "postHook": {
            "summary": "Deliver an event to the webhook rule {name}",
            "description": "The body (any JSON value) becomes the rule's `event`. Answered with a job only after it "
            "is durable.",
            "security": [{"bearer": []}, {"signature": []}],
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "the event's id: the same id twice is one job (else the rule's id_header, else random)",
                    "schema": {"type": "string"},
                },
                trace_header,
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
            "responses": {
                "200": ok(hook_reply, "the rule's filter let the event pass: no job"),
                "202": ok(hook_reply, "a job (job_ids), a held event (held) or a paused rule (paused)"),
                "400": error_response("malformed body: not JSON"),
                "401": error_response("missing or bad bearer token or signature", auth=True),
                "404": error_response("no webhook rule of that name"),
                "413": error_response("the body is larger than the rule's max_body_bytes"),
                "422": error_response("the rule cannot make a job of this body (dead-lettered)"),
                "503": error_response(
                    "the hook's secret is unreadable, NATS is unreachable or a stream is full", retry=True
                ),
            },
        },
        "health": {"summary": "The ingress answers", "responses": {"200": ok(health, "ok")}},
        "openapi": {
            "summary": "This document",
            "responses": {"200": ok({"type": "object"}, "the OpenAPI 3.1 document")},
        },
    }
    paths: dict[str, dict[str, Any]] = {}
    for method, path, operation in ROUTES:
        paths.setdefault(path, {})[method.lower()] = {"operationId": operation, **operations[operation]}
    return {
        "openapi": "3.1.0",
        "x-generated": OPENAPI_MARKER,
        "info": {
            "title": "jobmesh trigger HTTP ingress",
            "version": "1",
            "description": "Webhooks and HTTP submits of the jobmesh trigger service (docs/webhooks.md).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <secret>"},
                "signature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-Hub-Signature-256",
                    "description": "hex HMAC-SHA256 of the raw body under the hook's secret, optionally 'sha256='; "
                    "the header is the rule's source.signature_header",
                },
            },
        },
    }


@functools.cache
def render_openapi() -> str:
    """:func:`openapi_document` as the text of ``schemas/openapi.json``."""
    return json.dumps(openapi_document(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_openapi())
