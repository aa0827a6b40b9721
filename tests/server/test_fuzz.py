"""Schema fuzzing of /v1/chat/completions and /v1/completions: generated bodies never get a 5xx or kill the engine.

Bodies come from the request models' JSON schemas (hypothesis-jsonschema), bounded so that the valid ones run
quickly on the demo model and widened with what clients do send: edge integers (2**63, -2**63 - 1), tiny and huge
floats, special-token and lone-surrogate strings. Six in ten are schema-valid and most of those reach the engine and
sample; the other four are mutated (wrong types, junk values, missing required and unknown fields, non-object,
non-UTF-8 and cut-short bodies). No body may get a 5xx; a 4xx carries an OpenAI error object and a stream ends with
`data: [DONE]`; afterwards the same engine still answers.

The server is the demo model behind uvicorn on 127.0.0.1 in this process, so that a failure reports the server's own
traceback. Each body is sent while a companion stream with every sampling option on is decoding, so that its row is
sampled in a mixed batch. An engine that dies is replaced before the next example (each example, and Hypothesis's
shrinking, starts from a live engine) and the test fails. Each distinct server failure raises its own exception class,
so Hypothesis shrinks and reports every one of them, not only the first.
"""

import json
import logging
import math
import os
import socket
import threading
import time
import traceback
from copy import deepcopy

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

import dsserve
from dsserve.assets import DEMO_SERVED_NAME, demo_model_dir
from dsserve.engine.async_engine import AsyncEngine
from dsserve.engine.engine import LLMEngine, build_engine_config
from dsserve.server.launch import asgi_app, resolve_reasoning_parser
from dsserve.server.protocol import ChatCompletionRequest, CompletionRequest
from dsserve.server.state import ServerConfig

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
NUM_EXAMPLES = 500  # per endpoint, as the hardening issue asks
MAX_MODEL_LEN = 192  # bounds a mutated body without max_tokens to ~190 engine steps
REQUEST_TIMEOUT_S = 20.0  # a request slower than this counts as a hang
_SERVER_LOGGERS = ("dsserve", "uvicorn.error")
_DSSERVE_DIR = os.path.dirname(dsserve.__file__) + os.sep

FUZZ_SETTINGS = settings(
    max_examples=NUM_EXAMPLES,
    derandomize=True,  # the same bodies on every run and machine
    database=None,
    deadline=None,
    phases=(Phase.generate, Phase.shrink),  # shrinking runs only when a bug was found
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    print_blob=False,
)


class FuzzServer:
    """The demo model served by uvicorn on a thread of this process, with the production ASGI app (streams written
    through server/direct.py). The app behind the socket is swapped for a fresh engine's after an engine death."""

    def __init__(self):
        self.served_name = DEMO_SERVED_NAME
        self.engine: AsyncEngine | None = None
        self.server_errors: list[BaseException] = []  # exceptions the server logged while answering one request
        # The server's logged exceptions go into the failure messages, not into pytest's log capture: thousands of
        # lines while Hypothesis shrinks.
        self._capture = _Capture(self.server_errors)
        for name in _SERVER_LOGGERS:
            logging.getLogger(name).addHandler(self._capture)
            logging.getLogger(name).propagate = False
        self._new_engine()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        self._uvicorn = uvicorn.Server(uvicorn.Config(self._app_proxy, log_config=None, access_log=False,
                                                      lifespan="off", interface="asgi3", timeout_graceful_shutdown=1))
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="fuzz-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        # A connection per request: uvicorn closes one whose request raised, and a kept-alive connection would
        # make the next example fail with a disconnect that is not its own.
        self.client = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S,
                                   limits=httpx.Limits(max_keepalive_connections=0))

    @property
    def vocab_size(self) -> int:
        return self.engine.engine.model_config.vocab_size

    def check(self, path: str, raw: bytes) -> None:
        """Send one body; raise a `_failure(kind)` when the server answers 5xx, malformed or not at all, or dies."""
        self.server_errors.clear()
        # Sampling bugs that show only in a mixed batch (one row's top_k 2**63 next to another's top_k 5) need a
        # second request in the engine: the companion runs while the body is answered (it would outlast it), then
        # leaves: an abort.
        with self.client.stream("POST", COMPLETIONS, json={**_COMPANION, "model": self.served_name}) as companion:
            if companion.status_code != 200:
                raise _failure("companion refused")(f"{companion.status_code} {companion.read()[:500]!r}")
            lines = companion.iter_lines()  # kept: a dropped iterator closes the connection
            while not next(lines).startswith("data:"):  # the first token: it has a row in the batch
                pass
            try:
                r = self.client.post(path, content=raw, headers={"content-type": "application/json"})
            except httpx.HTTPError as e:
                r = None
                transport_error = e
        dead = self.engine.dead
        if dead is not None:
            self._new_engine()
            raise _failure(f"engine died: {_origin(dead)}")(f"the engine died on this body:\n{raw!r}\n{_trace(dead)}")
        if r is None:
            kind = _origin(self.server_errors[0]) if self.server_errors else type(transport_error).__name__
            raise _failure(f"no response: {kind}")(
                f"no response ({transport_error!r}) to:\n{raw!r}{self._traces()}")
        if r.status_code >= 500:
            kind = _origin(self.server_errors[0]) if self.server_errors else r.text[:80]
            raise _failure(f"{r.status_code}: {kind}")(f"{r.status_code} {r.text[:500]}\nfor:\n{raw!r}{self._traces()}")
        if r.status_code != 200:
            if not _is_error_body(r.content):
                raise _failure("malformed error body")(f"{r.status_code} {r.text[:500]!r}\nfor:\n{raw!r}")
            return
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            self._check_stream(r.text, raw)
        elif "choices" not in r.json():
            raise _failure("200 without choices")(f"{r.text[:500]}\nfor:\n{raw!r}")

    def assert_alive(self) -> None:
        """The engine still serves (`check` has failed the test if it died): /health 200, plain requests answered."""
        assert self.client.get("/health").status_code == 200
        r = self.client.post(CHAT, json={"model": self.served_name, "max_tokens": 8,
                                         "messages": [{"role": "user", "content": "2+3="}]})
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert (message.get("content") or "") + (message.get("reasoning_content") or "")
        r = self.client.post(COMPLETIONS, json={"model": self.served_name, "prompt": "1+1=", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text

    def stop(self) -> None:
        self.client.close()
        self._uvicorn.should_exit = True
        self._thread.join(10)
        self.engine.shutdown()
        for name in _SERVER_LOGGERS:
            logging.getLogger(name).removeHandler(self._capture)
            logging.getLogger(name).propagate = True

    def _check_stream(self, text: str, raw: bytes) -> None:
        if not text.endswith("data: [DONE]\n\n"):
            raise _failure("stream without [DONE]")(f"stream ends {text[-300:]!r}\nfor:\n{raw!r}{self._traces()}")
        for line in text.split("\n\n")[:-2]:
            event = json.loads(line.removeprefix("data: "))
            if "error" not in event:
                continue
            if not _is_error_body(json.dumps(event).encode()):
                raise _failure("malformed error event")(f"{line}\nfor:\n{raw!r}")
            if event["error"]["type"] == "internal_server_error":
                kind = _origin(self.server_errors[0]) if self.server_errors else event["error"]["message"][:80]
                raise _failure(f"500 in a stream: {kind}")(f"{line}\nfor:\n{raw!r}{self._traces()}")

    def _new_engine(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        config = build_engine_config(demo_model_dir(), kv_cache_memory="64MiB", max_model_len=MAX_MODEL_LEN,
                                     max_num_seqs=16)
        self.engine = AsyncEngine(LLMEngine(config))
        server_config = ServerConfig(served_model_name=self.served_name,
                                     reasoning_parser=resolve_reasoning_parser("auto", self.engine.tokenizer))
        self._app = asgi_app(self.engine, server_config)
        self.engine.start()

    async def _app_proxy(self, scope, receive, send):
        await self._app(scope, receive, send)  # `send` passed as is: the direct stream writer looks through it

    def _traces(self) -> str:
        unique = list({id(e): e for e in self.server_errors}.values())  # the app and uvicorn may log the same one
        return "".join("\nserver traceback:\n" + _trace(e) for e in unique)


@pytest.fixture(scope="module")
def fuzz_server():
    server = FuzzServer()
    yield server
    server.stop()


_HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path,body", [
    pytest.param(CHAT, {"messages": _HI, "max_tokens": 2, "temperature": 1.0, "top_k": 2**63}, id="chat-top_k-2**63"),
    pytest.param(CHAT, {"messages": _HI, "max_tokens": 2, "seed": 2**64}, id="chat-seed-2**64"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2},
                 id="chat-lone-surrogate"),
    pytest.param(CHAT, {"messages": _HI, "max_tokens": 2, "chat_template_kwargs": {"add_generation_prompt": False}},
                 id="chat-template-kwargs-collide"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "temperature": 1.0, "top_k": 2**63},
                 id="completion-top_k-2**63"),
    pytest.param(COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "seed": -2**63 - 1, "stream": True},
                 id="completion-stream-seed-below-int64"),
    pytest.param(COMPLETIONS, {"prompt": ["\ud800"], "max_tokens": 2}, id="completion-lone-surrogate"),
])
def test_bodies_the_fuzzing_found(fuzz_server, path, body):
    """What the fuzzing found once (a 500 or a dead engine), checked the same way on every run."""
    fuzz_server.check(path, json.dumps({"model": fuzz_server.served_name, **body}).encode())


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS], ids=["chat", "completions"])
def test_generated_bodies_never_get_5xx(fuzz_server, path):
    bodies = _bodies(path, fuzz_server.served_name, fuzz_server.vocab_size)

    @FUZZ_SETTINGS
    @given(raw=bodies)
    def fuzz(raw):
        fuzz_server.check(path, raw)

    fuzz()
    fuzz_server.assert_alive()


# ---- bodies -----------------------------------------------------------------------------------------------------

_EDGE_INTS = (0, 1, -1, 2, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1,
              -2**31, -2**63, -2**63 - 1, -2**64, 10**30, -10**30)
_EDGE_FLOATS = (0.0, -0.0, 5e-324, 1e-300, 1e-45, 1e-7, 0.5, 0.9999999999999999, 1.0000000000000002, 1.9999999,
                1e30, 1e300, 1.7976931348623157e308, -1e-300, -1.7976931348623157e308)
_NON_FINITE = (math.inf, -math.inf, math.nan)  # Python's json writes and reads them; some clients send them
_EDGE_STRINGS = ("", " ", "\ud800", "a\udfffb", "\udc00\ud800", "\x00", "\u202e\ufeff", "\U0001f600" * 3, "加减法",
                 "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>\n",
                 "</think>", "{{ 7 * 7 }}", "{% for x in y %}", "\r\n\t", "x" * 3000)
_TEMPLATE_KWARGS = ({"messages": []}, {"add_generation_prompt": False}, {"chat_template": "{{ 1 }}"},
                    {"bos_token": 5}, {"thinking": True}, {"enable_thinking": False}, {"tools": [{"x": None}]})

_LOGIT_BIASES = ({"5": 100}, {"5": -100, "261": 100}, {"262": 1}, {"-1": 1}, {"x": 1}, {"5": 1e308},
                 {str(2**64): 1}, {"1": 100})  # token 1: the demo model's end of sentence

# Every per-row sampling feature on, so that the body's row is batched with rows unlike it.
_COMPANION = {"prompt": "1+1=", "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True, "stream": True,
              "temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.05, "presence_penalty": 0.5,
              "frequency_penalty": 0.5, "repetition_penalty": 1.2, "seed": 1, "logprobs": 2, "min_tokens": 2}


_text = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(exclude_categories=()), max_size=8),  # lone surrogates included
    st.sampled_from(_EDGE_STRINGS),
)
_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(_EDGE_INTS), st.floats(),
    st.sampled_from(_EDGE_FLOATS + _NON_FINITE), _text,
)
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                     | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
_junk = st.one_of(
    st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
                 max_leaves=10),
    st.builds(lambda item, count: [item] * count, _scalar, st.integers(0, 3000)),  # long lists
)


def _bodies(path: str, served_name: str, vocab_size: int) -> st.SearchStrategy[bytes]:
    """Encoded bodies: six in ten schema-valid (bounded to run fast), four in ten mutated."""
    request = ChatCompletionRequest if path == CHAT else CompletionRequest
    schema = _valid_schema(request, served_name, vocab_size, path == CHAT)
    valid = _from(schema, schema["$defs"]) if "$defs" in schema else _from(schema, {})
    fields = sorted(schema["properties"])
    return st.integers(0, 9).flatmap(lambda pick: valid.flatmap(_encoded) if pick < 6 else
                                     _mutated(valid, fields).flatmap(lambda body: _encoded(body, cut_short=True)))


def _valid_schema(request, served_name: str, vocab_size: int, is_chat: bool) -> dict:
    """The request model's schema, bounded (short strings and lists, a few tokens) and widened with edge values that
    still satisfy it, so that most of these bodies reach the engine and sample."""
    schema = _widen(deepcopy(request.model_json_schema()))
    props = schema["properties"]
    few_tokens = {"type": "integer", "minimum": 1, "maximum": 8}
    token_id = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    props["model"] = {"const": served_name}
    props["max_tokens"] = few_tokens  # required below: without it a request may run to the end of the context
    props["n"] = {"type": "integer", "minimum": 1, "maximum": 3}
    props["min_tokens"] = {"type": "integer", "minimum": 0, "maximum": 8}
    props["stop_token_ids"] = {"anyOf": [{"type": "array", "items": token_id, "maxItems": 4}, {"type": "null"}]}
    if "logit_bias" in props:
        props["logit_bias"] = {"anyOf": [props["logit_bias"], {"enum": list(_LOGIT_BIASES)}]}
    if is_chat:
        schema["required"] = ["model", "messages", "max_tokens"]
        props["max_completion_tokens"] = {"anyOf": [few_tokens, {"type": "null"}]}
        props["chat_template_kwargs"]["anyOf"].append({"enum": list(_TEMPLATE_KWARGS)})
        schema["$defs"]["ContentPart"]["properties"]["type"] = {"anyOf": [{"const": "text"}, {"type": "string"}]}
    else:
        schema["required"] = ["model", "prompt", "max_tokens"]
        tokens = {"type": "array", "items": token_id, "minItems": 1, "maxItems": 8}
        props["prompt"] = {"anyOf": [{"type": "string", "maxLength": 24}, {"type": "array", "items": _short_text(),
                                                                             "minItems": 1, "maxItems": 3},
                                     tokens, {"type": "array", "items": tokens, "minItems": 1, "maxItems": 3}]}
    return schema


def _widen(node):
    """Bound every string and array; let numbers and strings also take edge values that satisfy the schema."""
    if isinstance(node, list):
        return [_widen(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: (v if k in ("enum", "const", "required") else _widen(v)) for k, v in node.items()}
    kind = node.get("type")
    if kind == "array":
        node.setdefault("maxItems", 3)
    elif kind == "string" and "enum" not in node:
        return _short_text()
    elif kind in ("integer", "number"):
        edges = [v for v in (_EDGE_INTS if kind == "integer" else _EDGE_INTS + _EDGE_FLOATS) if _within(node, v)]
        return {"anyOf": [node, {"enum": edges}]} if edges else node
    return node


def _from(node: dict, defs: dict) -> st.SearchStrategy:
    """Objects, arrays and unions composed here, leaves from hypothesis-jsonschema: its own object strategy works
    the schema over again on every draw (0.1 s a body, half the test's time)."""
    if "$ref" in node:
        return _from(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in node:
        return st.one_of([_from(option, defs) for option in node["anyOf"]])
    kind = node.get("type")
    if kind == "object" and "properties" in node:  # a request model: unknown fields are for the mutations to add
        fields = {name: _from(field, defs) for name, field in node["properties"].items()}
        required = node.get("required", ())
        return _model_body({k: v for k, v in fields.items() if k in required},
                           {k: v for k, v in fields.items() if k not in required})
    if kind == "object":  # a free-form map
        values = node.get("additionalProperties")
        return st.dictionaries(_text, _from(values, defs) if isinstance(values, dict) else _json, max_size=3)
    if kind == "array":
        return st.lists(_from(node.get("items", {}), defs), min_size=node.get("minItems", 0),
                        max_size=node["maxItems"])
    return from_schema(node) if node else _json


@st.composite
def _model_body(draw, required: dict, optional: dict) -> dict:
    """The required fields and up to five optional ones: an edge value is then seldom refused for another field's
    sake before it reaches the sampler."""
    body = {name: draw(field) for name, field in required.items()}
    if not optional:  # a model of required fields only (e.g. a named tool_choice's function)
        return body
    for name in draw(st.lists(st.sampled_from(sorted(optional)), max_size=5, unique=True)):
        body[name] = draw(optional[name])
    return body


def _short_text() -> dict:
    return {"anyOf": [{"type": "string", "maxLength": 16}, {"enum": list(_EDGE_STRINGS)}]}


def _within(schema: dict, value) -> bool:
    return (schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)
            and schema.get("exclusiveMinimum", -math.inf) < value < schema.get("exclusiveMaximum", math.inf))


@st.composite
def _mutated(draw, valid, fields: list[str]):
    """A valid body with one to three mutations, or now and then no object at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(_junk)
    body = draw(valid)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(("replace", "drop", "add", "nested")))
        if how == "replace":
            body[draw(st.sampled_from(fields))] = draw(_junk)
        elif how == "drop" and body:
            del body[draw(st.sampled_from(sorted(body)))]  # required ones too
        elif how == "add":
            body[draw(_text)] = draw(_junk)
        elif isinstance(body.get("messages"), list) and body["messages"]:
            message = body["messages"][draw(st.integers(0, len(body["messages"]) - 1))]
            key = draw(st.sampled_from(("role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content")))
            if isinstance(message, dict):
                message[key] = draw(_junk)
        elif isinstance(body.get("prompt"), list) and body["prompt"]:
            body["prompt"][draw(st.integers(0, len(body["prompt"]) - 1))] = draw(_junk)
    return body


def _encoded(body, cut_short: bool = False) -> st.SearchStrategy[bytes]:
    """JSON as Python writes it (lone surrogates as `\\ud800` escapes) or as UTF-8 (lone surrogates passed through:
    not UTF-8), and, for mutated bodies, cut short."""
    text = json.dumps(body)
    encodings = [st.just(text.encode()), st.just(json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"))]
    if cut_short and len(text) > 1:
        encodings.append(st.integers(1, len(text) - 1).map(lambda cut: text[:cut].encode()))
    return st.one_of(encodings)


# ---- failures -----------------------------------------------------------------------------------------------------

_FAILURES: dict[str, type] = {}


def _failure(kind: str) -> type:
    """One AssertionError subclass per kind of failure: Hypothesis tells bugs apart by exception type and line."""
    if kind not in _FAILURES:
        _FAILURES[kind] = type("ServerFailure", (AssertionError,), {"__qualname__": f"ServerFailure[{kind}]"})
    return _FAILURES[kind]


def _origin(error: BaseException) -> str:
    """`OverflowError at sampler.py:42`: the exception's type and the innermost dsserve line that raised it."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if f.filename.startswith(_DSSERVE_DIR)] or frames
    where = f" at {ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno}" if ours else ""
    return f"{type(error).__name__}{where}"


def _trace(error: BaseException) -> str:
    """The traceback through dsserve's frames only (and the frame that raised): the framework's add nothing."""
    trace = traceback.TracebackException.from_exception(error)
    link = trace
    while link is not None:
        link.stack = traceback.StackSummary.from_list(
            [f for f in link.stack[:-1] if f.filename.startswith(_DSSERVE_DIR)] + link.stack[-1:])
        link = link.__cause__ or link.__context__
    return "".join(trace.format())


def _is_error_body(content: bytes) -> bool:
    try:
        error = json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str) and bool(error["message"]) and isinstance(error["type"], str))


class _Capture(logging.Handler):
    """Keeps the exceptions the server logs (`logger.exception`) so that a failure shows the server's traceback."""

    def __init__(self, into: list):
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.into.append(record.exc_info[1])
