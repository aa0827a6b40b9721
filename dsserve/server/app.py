"""The FastAPI application: routes, API-key check, body limit, OpenAI error objects, health and metrics."""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers

from dsserve.engine.async_engine import AsyncEngine
from dsserve.errors import EngineDeadError
from dsserve.server import chat, completions, tokenize
from dsserve.server.metrics import Metrics
from dsserve.server.protocol import APIError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-side settings of `dsserve serve`."""

    served_model_name: str  # the name clients send as `model`
    api_key: str | None = None  # required on every route but /health when set
    max_body_bytes: int = 40 * 2**20  # MindIE's maxRequestLength
    max_queued_requests: int = 1024  # beyond running + queued, new requests get 503
    stream_interval: int = 1  # engine steps between a stream's chunks (vLLM's --stream-interval)
    reasoning_parser: str = "none"  # "deepseek_r1" or "none" (resolved from "auto" before freezing)
    strict_reasoning_history: bool = False  # True: reasoning_content in input messages is a 400 (DeepSeek's API)
    max_input_len: int | None = None  # with truncate_input, prompts are cut to this many tokens (MindIE truncation)
    truncate_input: bool = False
    chat_template: str | None = None  # overrides the tokenizer's


class ServerState:
    """Everything the endpoint modules need, passed as `request.app.state.dsserve`."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.metrics = Metrics(engine, config.served_model_name)
        self.in_flight = 0
        self.created = int(time.time())
        scheduler_config = engine.engine.config.scheduler
        self.max_model_len = scheduler_config.max_model_len
        self.capacity = scheduler_config.max_num_seqs + config.max_queued_requests

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")

    def admit(self) -> None:
        if self.engine.dead is not None:
            raise APIError(500, "The engine has stopped after an internal error; the server is shutting down.",
                           type="internal_server_error")
        if self.in_flight >= self.capacity:
            raise APIError(503, f"The server is overloaded ({self.in_flight} requests in flight); retry later.",
                           type="server_overloaded", code="server_overloaded")


class Guard:
    """API key and body-size checks in front of every route, as plain ASGI middleware: a streamed response's
    chunks pass straight through (Starlette's `@app.middleware("http")` relays each one through a memory
    stream and a task switch, a cost paid per token per stream)."""

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _error(refusal)(scope, receive, send)
            return
        started = False

        async def send_tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except APIError as e:
            if started:  # too late for an error response: the stream's own error chunk has said it
                raise
            await _error(e)(scope, receive, send)

    def _refusal(self, scope) -> APIError | None:
        config = self.config
        headers = Headers(scope=scope)
        if config.api_key and scope["path"] != "/health":
            given = headers.get("authorization", "")
            token = given[7:] if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), config.api_key.encode()):
                shown = (token[:3] + "***" + token[-4:]) if len(token) > 8 else "***"
                return APIError(401, f"Incorrect API key provided: {shown}.", param=None, code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            return APIError(413, f"The request body is {length} bytes; the limit is {config.max_body_bytes}.",
                            code="request_too_large")
        return None


def create_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="dsserve", docs_url=None, redoc_url=None, openapi_url=None)
    state = ServerState(engine, config)
    app.state.dsserve = state

    # Every middleware's `send` must hand a message straight on to uvicorn's (Guard's and Starlette's own do): a
    # stream's chunks between its first and last output are written to the connection directly while its handler
    # waits (server/direct.py), which keeps their order only if whatever the handler sent has been written by then.
    # A middleware that buffers or transforms the body (GZip, `@app.middleware("http")`) would break that.
    app.add_middleware(Guard, config=config)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return _error(e)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError):
        return _error(APIError(500, str(e), type="internal_server_error"))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception):
        logger.exception("unexpected error while serving a request")
        return _error(APIError(500, f"Internal server error: {type(e).__name__}", type="internal_server_error"))

    @app.get("/health")
    async def health():
        return Response(status_code=503 if engine.dead is not None else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": config.served_model_name, "object": "model", "created": state.created, "owned_by": "dsserve",
            "root": engine.engine.config.model.path, "max_model_len": state.max_model_len,
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


async def read_body(request: Request, state: ServerState) -> bytes:
    """The body, refused with 413 past the limit even when no Content-Length was sent."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > state.config.max_body_bytes:
            raise APIError(413, f"The request body exceeds the limit of {state.config.max_body_bytes} bytes.",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)
