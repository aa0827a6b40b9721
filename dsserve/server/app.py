"""The FastAPI application: routes, API-key check, body limit, OpenAI error objects, health and metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect

from dsserve.engine.async_engine import AsyncEngine
from dsserve.errors import EngineDeadError, ShuttingDownError
from dsserve.server import chat, completions, tokenize
from dsserve.server.audit import AuditLog
from dsserve.server.common import RECORD_KEY, note
from dsserve.server.keys import ApiKey, KeyRing, retry_after
from dsserve.server.metrics import Metrics
from dsserve.server.protocol import APIError, parse

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-side settings of `dsserve serve`."""

    served_model_name: str  # the name clients send as `model`
    api_keys: tuple[ApiKey, ...] = ()  # when any, one is required on every route but /health (server/keys.py)
    max_body_bytes: int = 40 * 2**20  # MindIE's maxRequestLength
    max_queued_requests: int = 1024  # sequences beyond max_num_seqs + this get 503 (n counts n times)
    stream_interval: int = 1  # engine steps between a stream's chunks (vLLM's --stream-interval)
    direct_writes: bool = True  # streamed chunks go straight to uvicorn's transport (False: plain ASGI)
    reasoning_parser: str = "none"  # "deepseek_r1" or "none" (resolved from "auto" before freezing)
    strict_reasoning_history: bool = False  # True: reasoning_content in input messages is a 400 (DeepSeek's API)
    max_input_len: int | None = None  # with truncate_input, prompts are cut to this many tokens (MindIE truncation)
    truncate_input: bool = False
    chat_template: str | None = None  # overrides the tokenizer's
    # Per-request caps, each refused with a 400 that names the field and the flag (server/common.py).
    max_messages: int = 2048  # chat messages in one request
    max_prompt_chars: int = 2_000_000  # characters of message contents or prompts, before templating
    max_stop: int = 16  # stop strings per request (OpenAI takes 4)
    max_stop_chars: int = 256  # characters per stop string
    max_prompts: int = 256  # prompts in one /v1/completions request
    max_request_tokens: int = 262_144  # n x max_tokens (x prompts) that one request may ask the engine to generate
    max_tokens_default: int | None = None  # max_tokens when a request gives none (None: what fits the context)
    # Operating it on a network (docs/serving.md).
    audit_log: str | None = None  # one JSON line per request
    audit_log_content: bool = False  # also write prompt and completion text to the audit log
    audit_log_max_bytes: int = 100 * 2**20  # rotate the audit log past this size (10 files kept)
    shutdown_timeout_s: float = 30.0  # SIGTERM: running requests get this long to finish, then end with an error
    step_timeout_s: float = 60.0  # /health answers 503 when the engine has been stuck in a step this long


class ServerState:
    """Everything the endpoint modules need, passed as `request.app.state.dsserve`."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.metrics = Metrics(engine, config.served_model_name)
        self.keyring = KeyRing(config.api_keys)
        self.audit = (AuditLog(config.audit_log, config.audit_log_max_bytes, content=config.audit_log_content)
                      if config.audit_log else None)
        self.in_flight = 0  # sequences admitted and not finished (a request with n=4 counts 4)
        self.created = int(time.time())
        self.draining = False  # SIGTERM: new requests get 503 while running ones finish
        self.open_requests = 0  # admitted by Guard and not answered yet (what the drain waits for)
        self.cpu_jobs = 0  # CPU-work jobs queued or running
        scheduler_config = engine.engine.config.scheduler
        self.max_model_len = scheduler_config.max_model_len
        self.capacity = scheduler_config.max_num_seqs + config.max_queued_requests
        # Chat templating, tokenization and large responses run here, not on the event loop: one heavy request must
        # not stall the streams and health checks the loop serves.
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dsserve-cpu")
        self.metrics.seconds_since_last_step = self.seconds_since_last_step

    async def run_blocking(self, fn, *args):
        """Run `fn(*args)` on the CPU-work threads and wait for it without blocking the event loop. Past
        _MAX_CPU_JOBS waiting jobs (each holding a large body) the request is refused, not queued."""
        if self.cpu_jobs >= _MAX_CPU_JOBS:
            raise APIError(503, f"The server is overloaded ({self.cpu_jobs} large requests are being prepared); "
                           "retry later.", type="server_overloaded", code="server_overloaded",
                           headers={"Retry-After": "1"})
        self.cpu_jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.cpu_jobs -= 1

    def seconds_since_last_step(self) -> float:
        last = self.engine.last_step_s
        return time.monotonic() - (last if last is not None else self.engine.started_s)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")

    def admit(self, num_seqs: int = 1) -> None:
        """Refuse (503) a request whose `num_seqs` sequences would take the server past running + queued capacity."""
        if self.engine.dead is not None:
            raise APIError(500, "The engine has stopped after an internal error; the server is shutting down.",
                           type="internal_server_error")
        if self.draining:
            raise shutting_down()
        if self.in_flight + num_seqs > self.capacity:
            raise APIError(503, f"The server is overloaded ({self.in_flight} sequences in flight, capacity "
                           f"{self.capacity}); retry later.", type="server_overloaded", code="server_overloaded",
                           headers={"Retry-After": "1"})


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
           "/health", "/metrics"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_INLINE_BODY_BYTES = 256 * 2**10  # bodies above this are parsed off the event loop
_MAX_CPU_JOBS = 64  # large templating / tokenizing / rendering jobs waiting at once
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


async def read_request(request: Request, state: ServerState, schema):
    """The body, parsed and validated against `schema` (server/protocol.py); a large body is parsed on the CPU-work
    threads (JSON and validation of megabytes would hold the event loop for the length of the parse)."""
    raw = await read_body(request, state)
    if len(raw) > _INLINE_BODY_BYTES:
        return await state.run_blocking(parse, raw, schema)
    return parse(raw, schema)


async def read_body(request: Request, state: ServerState) -> bytes:
    """The body, refused with 413 past the limit even when no Content-Length was sent."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > state.config.max_body_bytes:
                raise APIError(413, f"The request body exceeds the limit of {state.config.max_body_bytes} bytes.",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # the client hung up mid-body: nobody to answer, nothing to log as an error
        note(request, finish_reason="client disconnected")
        raise APIError(499, "client disconnected", code="client_closed_request") from None
    return b"".join(chunks)


def shutting_down() -> APIError:
    """A request that arrives while the server drains."""
    return APIError(503, "The server is shutting down; retry on another replica or later.", type="server_overloaded",
                    code="server_shutting_down", headers={"Retry-After": "5"})


def internal_error(request_id: str) -> APIError:
    """What a client sees of a failure inside the server: no exception text, no paths (those go to the log)."""
    return APIError(500, "The server had an error while processing your request; the operator can find it in the "
                    f"server log under request id {request_id}.", type="internal_server_error")


def request_id_of(http: Request) -> str:
    """The id the client sees in X-Request-Id (Guard sets it on every request)."""
    record = http.scope.get(RECORD_KEY)
    return record["request_id"] if record else "-"


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
