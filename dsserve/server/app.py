"""The FastAPI application: routes, API-key check, body limit, OpenAI error objects, health and metrics."""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers

from dsserve.engine.async_engine import AsyncEngine
from dsserve.errors import EngineDeadError, ShuttingDownError
from dsserve.server import chat, completions, tokenize
from dsserve.server.keys import ApiKey, retry_after
from dsserve.server.protocol import APIError
from dsserve.server.state import RECORD_KEY, ServerConfig, ServerState, internal_error, request_id_of, shutting_down

logger = logging.getLogger(__name__)


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
           "/health", "/metrics"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_UNAUDITED = {"/health", "/metrics"}  # probes and scrapes: audited only when refused


class Guard:
    """In front of every route, as plain ASGI middleware: request id, drain, API key and its limits, body size; then
    the audit line and per-key metrics. (Plain ASGI: a streamed response's chunks pass straight through, where
    Starlette's `@app.middleware("http")` relays each one through a memory stream and a task switch.)"""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        started_s = time.perf_counter()
        path = scope["path"]
        request_id, id_error, from_client = _request_id(scope)
        record = scope[RECORD_KEY] = {"request_id": request_id, "key": None, "client": _client(scope),
                                      "method": scope["method"], "route": path if path in _ROUTES else "other",
                                      "client_request_id": from_client}
        status = 0
        tag = (b"x-request-id", request_id.encode())

        async def send_tracked(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), tag]}
            await send(message)

        key, admitted = None, False
        try:
            key = self._admit(scope, record, id_error)
            admitted = True
            state.open_requests += 1
            await self.app(scope, receive, send_tracked)
        except APIError as e:
            if status:  # too late for an error response: the stream's own error chunk has said it
                raise
            await _error(e)(scope, receive, send_tracked)
        except Exception:  # here, not in Starlette's outermost handler: the 500 gets its id, audit line and metrics
            if status:
                raise
            logger.exception("request %s: unexpected error", request_id)
            await _error(internal_error(request_id))(scope, receive, send_tracked)
        finally:
            if admitted:
                state.open_requests -= 1
            if key is not None:
                state.keyring.release(key)
            self._account(record, status, started_s)

    def _admit(self, scope, record: dict, id_error: APIError | None) -> ApiKey | None:
        """Raise the APIError that refuses this request, or return the key it holds a slot of (None: no keys)."""
        if id_error is not None:
            raise id_error
        state, config, path = self.state, self.state.config, scope["path"]
        if state.draining and path not in ("/health", "/metrics"):
            raise shutting_down()
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            raise APIError(413, f"The request body is {length} bytes; the limit is {config.max_body_bytes}.",
                           code="request_too_large")
        if not state.keyring.enabled or path == "/health":
            return None
        given = headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        key = state.keyring.find(token) if token else None
        if key is None:
            raise APIError(401, "Incorrect API key provided. You can find your API key with the server's operator."
                           if token else "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
                           code="invalid_api_key")
        record["key"] = key.name
        wait_s = state.keyring.acquire(key)
        if wait_s is not None:
            state.metrics.rate_limited(key.name)
            raise APIError(429, state.keyring.describe_limit(key, wait_s), type="requests",
                           code="rate_limit_exceeded", headers={"Retry-After": str(retry_after(wait_s))})
        return key

    def _account(self, record: dict, status: int, started_s: float) -> None:
        record.pop("client_request_id", None)  # what the engine id is made of; not an audit field
        record["status"] = status
        record["latency_s"] = round(time.perf_counter() - started_s, 4)
        self.state.metrics.http_request(record["key"], record["route"], status)
        audit = self.state.audit
        if audit is not None and (record["route"] not in _UNAUDITED or status >= 400):
            try:
                audit.write(record)
            except Exception:  # noqa: BLE001 - a full disk must not fail the request that was already answered
                logger.exception("could not write the audit line of request %s", record["request_id"])


def create_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="dsserve", docs_url=None, redoc_url=None, openapi_url=None)
    state = ServerState(engine, config)
    app.state.dsserve = state

    # Every middleware's `send` must hand a message straight on to uvicorn's (Guard's and Starlette's own do): a
    # stream's chunks between its first and last output are written to the connection directly while its handler
    # waits (server/direct.py), which keeps their order only if whatever the handler sent has been written by then.
    # A middleware that buffers or transforms the body (GZip, `@app.middleware("http")`) would break that.
    app.add_middleware(Guard, state=state)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return _error(e)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(http: Request, e: EngineDeadError):
        logger.error("request %s: %s", request_id_of(http), e)
        return _error(APIError(500, "The engine has stopped after an internal error; the server is shutting down. "
                               f"(request id {request_id_of(http)})", type="internal_server_error"))

    @app.exception_handler(ShuttingDownError)
    async def shutting_down(_: Request, e: ShuttingDownError):
        return _error(APIError(503, str(e), type="server_overloaded", code="server_shutting_down"))

    @app.exception_handler(Exception)
    async def unexpected(http: Request, e: Exception):
        logger.exception("request %s: unexpected error", request_id_of(http))
        return _error(internal_error(request_id_of(http)))

    @app.get("/health")
    async def health():
        """200 while the server takes requests; 503 (with the reason) when the engine died, is stuck in a step
        for --step-timeout, or the server is draining."""
        reason = None
        if engine.dead is not None:
            reason = "the engine has stopped after an internal error"
        elif state.draining:
            reason = "the server is shutting down"
        elif (stalled := engine.stalled_s(config.step_timeout_s)) is not None:
            reason = f"the engine has made no progress for {stalled:.0f} s (--step-timeout {config.step_timeout_s:g})"
        if reason is None:
            return Response(status_code=200)
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": config.served_model_name, "object": "model", "created": state.created, "owned_by": "dsserve",
            "root": config.served_model_name, "max_model_len": state.max_model_len,
        }]}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.post("/v1/chat/completions")(chat.create_chat_completion)
    app.post("/v1/completions")(completions.create_completion)
    app.post("/tokenize")(tokenize.tokenize)
    app.post("/detokenize")(tokenize.detokenize)
    app.get("/tokenizer_info")(tokenize.tokenizer_info)
    return app


def _request_id(scope) -> tuple[str, APIError | None, bool]:
    """The client's X-Request-Id when it is a plain token of at most 128 characters (else a 400), or a new one; and
    whether it is the client's."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return text, None, True
            fresh = uuid.uuid4().hex
            return fresh, APIError(400, "X-Request-Id must be 1 to 128 letters, digits or any of . _ : - ; leave it out "
                                   "to have one made.", param="X-Request-Id", code="invalid_value"), False
    return uuid.uuid4().hex, None, False


def _client(scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
