"""What the app and its endpoints share: the server's config and state, the per-request record, reading a body."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request
from starlette.requests import ClientDisconnect

from dsserve.engine.async_engine import AsyncEngine
from dsserve.server.audit import AuditLog
from dsserve.server.keys import ApiKey, KeyRing
from dsserve.server.metrics import Metrics
from dsserve.server.protocol import APIError, parse

RECORD_KEY = "dsserve.request"  # the scope's per-request record (server/app.py's Guard makes it)


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-side settings of `dsserve serve`."""

    served_model_name: str  # the name clients send as `model`
    api_keys: tuple[ApiKey, ...] = ()  # when any, one is required on every route but /health (server/keys.py)
    max_body_bytes: int = 40 * 2**20  # MindIE's maxRequestLength
    max_queued_requests: int = 1024  # sequences beyond max_num_seqs + this get 503 (n counts n times)
    stream_interval: int = 1  # engine steps between a stream's chunks (vLLM's --stream-interval)
    reasoning_parser: str = "none"  # "deepseek_r1" or "none" (resolved from "auto" before freezing)
    tool_call_parser: str = "none"  # "deepseek_v3", "deepseek_v31", "deepseek_v32" or "none" (resolved from "auto")
    strict_reasoning_history: bool = False  # True: reasoning_content in input messages is a 400 (DeepSeek's API)
    max_input_len: int | None = None  # with truncate_input, prompts are cut to this many tokens (MindIE truncation)
    truncate_input: bool = False
    chat_template: str | None = None  # overrides the tokenizer's
    chat_encoder: str | None = None  # "deepseek_v32": no template, V3.2's Python encoder renders prompts (encoding_dsv32)
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
    direct_writes: bool = True  # False: streams take plain ASGI streaming, no direct writer (server/direct.py)


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


def note(http: Request, **fields) -> None:
    """Add to the request's record (request id, key name, ...): what the audit line and the logs say of it."""
    record = http.scope.get(RECORD_KEY)
    if record is not None:
        record.update(fields)


_INLINE_BODY_BYTES = 256 * 2**10  # bodies above this are parsed off the event loop
_MAX_CPU_JOBS = 64  # large templating / tokenizing / rendering jobs waiting at once
