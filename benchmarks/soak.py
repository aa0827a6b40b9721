"""Soak benchmark: many mixed requests, client disconnects and malformed bodies against one server, then checks that
it is left as it started: no 5xx, no KV-cache blocks held once idle, RSS back within 10% of its post-warm-up value,
and a normal request still answered.

    python benchmarks/soak.py                                   # starts `dsserve serve` (the demo model) itself
    python benchmarks/soak.py --requests 500 --concurrency 32 --json soak.json
    python benchmarks/soak.py --server-arg=--max-num-seqs --server-arg=32   # extra `dsserve serve` flags
    python benchmarks/soak.py --url http://127.0.0.1:8000 --server-pid 1234  # an already running server
    python benchmarks/soak.py --list-cases                      # the malformed bodies; --skip-case NAME leaves one out

Each request is drawn from one seeded stream: chat or completions, streamed or not, max_tokens 8..128, some n=2,
some logprobs (and echo), some sharing a long system prompt (prefix-cache hits). A share of clients
(--disconnect) close their socket at a drawn point: after the request headers, part way through the body, while
waiting for a non-streamed answer, after the response headers, or after k stream events; half of them with a
FIN, half with a RST. Another share (--malformed) sends one of the bodies in MALFORMED_CASES. The client is raw
asyncio sockets with `Connection: close` (no HTTP library), so that on a small machine it takes little CPU from the
server and can stop at any byte.

After the run it waits for /metrics to show no running or waiting request, then reads the KV blocks in use as
`dsserve:kv_cache_total_blocks - dsserve:kv_cache_free_blocks`. The free count is the length of the block pool's
free queue (dsserve/engine/kv_cache.py `BlockPool.num_free`), which holds every block with ref_count 0, including
blocks freed but still registered for prefix caching; so a block still referenced by a finished or aborted
request shows as in use, while a prefix-cached block does not. `vllm:kv_cache_usage_perc` is `1 - free / total`
from the same count (`KVCacheManager.usage`), refreshed by the engine loop while idle.

RSS is VmRSS from /proc/PID/status of the server and its descendants (own server, or --server-pid with --url).
The server is started in its own session with a parent-death signal, stopped with SIGTERM (SIGKILL after 30 s)
in a `finally`, so Ctrl-C, SIGTERM or an exception never leave it running. Exit status 1 when a pass condition
fails, 2 when the server could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dsserve.assets import demo_tasks

RSS_TOLERANCE = 0.10  # RSS at the end may exceed RSS after warm-up by this share
FAILING_OUTCOMES = ("5xx", "stream_error", "stream_incomplete", "bad_body", "unexpected_4xx", "conn_error", "timeout")


@dataclass
class Spec:
    """One planned request and how its client behaves."""

    index: int
    path: str
    body: bytes
    stream: bool
    num_choices: int | None  # choices a complete answer must carry (n x prompts); None: not checked
    case: str | None = None  # the malformed case, if any
    expect: str = "2xx"  # "2xx", "4xx" (malformed) or "not5xx" (odd but arguably valid)
    disconnect: str | None = None  # see DISCONNECTS_*
    disconnect_at: float = 0.0  # seconds (before_response), events (mid_stream) or body share (during_body)
    is_reset: bool = False  # close with RST rather than FIN


@dataclass
class Result:
    index: int
    outcome: str  # ok | client_abort | rejected | malformed_accepted | not_run | one of FAILING_OUTCOMES
    status: int | None = None
    latency_s: float = 0.0
    started_s: float = 0.0  # since the run's start
    detail: str = ""


@dataclass
class Phase:
    results: list[Result] = field(default_factory=list)
    duration_s: float = 0.0
    stopped_early: str = ""  # why the run stopped launching requests, if it did


DISCONNECTS_STREAM = (("after_request_headers", 1), ("during_body", 1), ("before_response", 1),
                      ("after_response_headers", 1), ("mid_stream", 3))
DISCONNECTS_PLAIN = (("after_request_headers", 1), ("during_body", 1), ("before_response", 3))


def main() -> int:
    args = _parse_args()
    if args.list_cases:
        for name, (expect, _) in MALFORMED_CASES.items():
            print(f"{name:28s} expect {expect}")
        return 0
    unknown = set(args.skip_case) - set(MALFORMED_CASES)
    if unknown:
        sys.exit(f"unknown --skip-case {sorted(unknown)}; --list-cases lists them")
    signal.signal(signal.SIGTERM, _raise_exit)  # run the `finally` that stops the server
    server = None
    try:
        if args.url:
            parts = urlsplit(args.url)
            host, port, pid = parts.hostname, parts.port or 80, args.server_pid
        else:
            server = OwnServer(args.server_arg)
            host, port = server.start()
            pid = server.proc.pid
        report = asyncio.run(soak(args, host, port, pid, server))
    except ServerStartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        print("interrupted: no report" + (" (stopping the server)" if server is not None else ""), file=sys.stderr)
        raise
    finally:
        if server is not None:
            server.stop()
    if server is not None:
        report["server"]["exit_code_after_sigterm"] = server.exit_code
        report["server"]["log"] = str(server.log_path)
    _print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0 if report["passed"] else 1


async def soak(args, host: str, port: int, pid: int | None, server: "OwnServer | None") -> dict:
    client = Client(host, port, args.timeout)
    model, max_model_len = await client.model_info()
    gen = Generator(model, max_model_len, args.seed)
    report: dict = {"config": {k: v for k, v in vars(args).items() if k != "list_cases"}, "model": model,
                    "server": {"pid": pid, "url": f"http://{host}:{port}"}}
    sampler = RssSampler(pid)
    sampler_task = asyncio.create_task(sampler.run())

    # The warm-up is the main run's own mix (another seed), long enough for the server's memory high-water marks
    # (allocator arenas, the batch sizes 64 concurrent requests reach) to be reached before RSS is read.
    warm_rng = random.Random(args.seed * 7919 + 1)
    warm = [gen.draw(i, warm_rng, args.disconnect, args.malformed, set(args.skip_case)) for i in range(args.warmup)]
    warm_phase = await run_phase(client, warm, args.concurrency, server)
    await wait_idle(client, 60)
    rss_warm = sampler.read()

    rng = random.Random(args.seed)
    specs = [gen.draw(i, rng, args.disconnect, args.malformed, set(args.skip_case)) for i in range(args.requests)]
    before = await client.metrics()
    main_phase = await run_phase(client, specs, args.concurrency, server)

    alive = server is None or server.proc.poll() is None
    idle = await wait_idle(client, args.idle_timeout) if alive else None
    rss_end = sampler.read() if idle is not None else None  # not while a dying server shuts down
    final = await final_check(client, gen) if alive else ["server is gone"]
    sampler_task.cancel()

    report.update(_summarise(specs, warm_phase, main_phase, before, idle, rss_warm, rss_end, sampler.peak_kib,
                             sampler.timeline, final, server))
    return report


# ---- running requests --------------------------------------------------------------------------------------------


async def run_phase(client: "Client", specs: list[Spec], concurrency: int, server: "OwnServer | None") -> Phase:
    """Run `specs` with `concurrency` clients; stop launching when the server is gone (it exits when its engine
    dies) or, with --url, after 20 connection errors in a row."""
    phase = Phase(results=[Result(s.index, "not_run") for s in specs])
    queue = list(reversed(specs))
    t0 = time.perf_counter()
    consecutive_conn_errors = 0

    async def worker() -> None:
        nonlocal consecutive_conn_errors
        while queue and not phase.stopped_early:
            spec = queue.pop()
            if server is not None and server.proc.poll() is not None:
                phase.stopped_early = f"server exited with code {server.proc.returncode}"
                return
            result = await client.run(spec)
            result.started_s -= t0
            phase.results[spec.index] = result
            consecutive_conn_errors = consecutive_conn_errors + 1 if result.outcome == "conn_error" else 0
            if consecutive_conn_errors >= 20:
                phase.stopped_early = "20 connection errors in a row"

    async def progress() -> None:
        while True:
            await asyncio.sleep(10)
            done = [r for r in phase.results if r.outcome != "not_run"]
            failing = sum(r.outcome in FAILING_OUTCOMES for r in done)
            print(f"  {len(done)}/{len(specs)} done in {time.perf_counter() - t0:.0f} s, {failing} failing, "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)

    reporter = asyncio.create_task(progress())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    reporter.cancel()
    phase.duration_s = time.perf_counter() - t0
    return phase


async def wait_idle(client: "Client", timeout_s: float) -> dict | None:
    """/metrics once it has shown no running and no waiting request three times, a second apart (the engine
    refreshes those gauges every 0.5 s while idle; a non-streamed request's disconnect is noticed within 0.5 s)."""
    deadline, quiet = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline:
        try:
            m = await client.metrics()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            return None
        quiet = quiet + 1 if m.get("vllm:num_requests_running", 1) == 0 and m.get("vllm:num_requests_waiting", 1) == 0 else 0
        if quiet >= 3:
            return m
        await asyncio.sleep(1.0)
    return None


async def final_check(client: "Client", gen: "Generator") -> list[str]:
    """A plain and a streamed chat request after the soak; returns the problems."""
    problems = []
    for stream in (False, True):
        body = {"model": gen.model, "messages": [{"role": "user", "content": "What is 12+34?"}], "max_tokens": 32,
                "temperature": 0, "stream": stream}
        spec = Spec(-1, "/v1/chat/completions", json.dumps(body).encode(), stream, 1)
        result = await client.run(spec)
        if result.outcome != "ok":
            problems.append(f"{'streamed' if stream else 'plain'} chat: {result.outcome} {result.status} {result.detail}")
    return problems


class Client:
    """HTTP/1.1 over asyncio streams, one connection per request, able to stop at any point."""

    def __init__(self, host: str, port: int, timeout_s: float):
        self.host, self.port, self.timeout_s = host, port, timeout_s

    async def run(self, spec: Spec) -> Result:
        t0 = time.perf_counter()
        result = Result(spec.index, "conn_error", started_s=t0)
        writer = None
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            result = await asyncio.wait_for(self._exchange(spec, reader, writer, result), self.timeout_s)
        except TimeoutError:
            result.outcome, result.detail = "timeout", f"no complete answer in {self.timeout_s} s"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            result.outcome, result.detail = "conn_error", f"{type(e).__name__}: {e}"[:300]
        finally:
            if writer is not None:
                _close(writer, spec.is_reset and result.outcome == "client_abort")
        result.latency_s = time.perf_counter() - t0
        return result

    async def _exchange(self, spec: Spec, reader, writer, result: Result) -> Result:
        head = (f"POST {spec.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(spec.body)}\r\nConnection: close\r\n\r\n").encode()
        mode = spec.disconnect
        if mode in ("after_request_headers", "during_body"):
            writer.write(head + (spec.body[: int(len(spec.body) * spec.disconnect_at)] if mode == "during_body" else b""))
            await writer.drain()
            await asyncio.sleep(0.01)  # let the server start reading
            result.outcome = "client_abort"
            return result
        writer.write(head + spec.body)
        await writer.drain()
        if mode == "before_response":
            try:
                status, body, stopped = await asyncio.wait_for(_read_response(reader), spec.disconnect_at)
            except TimeoutError:
                result.outcome = "client_abort"
                return result
        elif mode == "after_response_headers":
            status, _ = await _read_head(reader)
            result.status = status
            result.outcome = "5xx" if status >= 500 else "client_abort"
            return result
        else:
            stop_after = int(spec.disconnect_at) if mode == "mid_stream" else None
            status, body, stopped = await _read_response(reader, stop_after)
        result.status = status
        if stopped and status < 300:
            has_error = b'data: {"error"' in body
            result.outcome, result.detail = ("stream_error", body[-300:].decode("utf-8", "replace")) if has_error \
                else ("client_abort", "")
            return result
        result.outcome, result.detail = _judge(spec, status, body)
        return result

    async def get(self, path: str) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nConnection: close\r\n\r\n".encode())
            status, body, _ = await asyncio.wait_for(_read_response(reader), 30)
            return status, body
        finally:
            _close(writer, False)

    async def metrics(self) -> dict[str, float]:
        """Unlabelled-by-reason gauges and counters by name; request_success by `name:reason`."""
        status, body = await self.get("/metrics")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            if "finished_reason=" in name_labels:
                name += ":" + name_labels.split('finished_reason="', 1)[1].split('"', 1)[0]
            out[name] = float(value)
        return out

    async def model_info(self) -> tuple[str, int]:
        status, body = await self.get("/v1/models")
        if status != 200:
            raise ServerStartError(f"GET /v1/models answered {status}: {body[:200]!r}")
        entry = json.loads(body)["data"][0]
        return entry["id"], int(entry.get("max_model_len") or 1024)


async def _read_head(reader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def _read_response(reader, stop_after_events: int | None = None) -> tuple[int, bytes, bool]:
    """(status, body, stopped): `stopped` when `stop_after_events` server-sent events had arrived first."""
    status, headers = await _read_head(reader)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks, num_events = [], 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return status, b"".join(chunks), False
            data = await reader.readexactly(size + 2)
            chunks.append(data[:-2])
            if stop_after_events is not None:
                num_events += data.count(b"\n\n")
                if num_events >= stop_after_events:
                    return status, b"".join(chunks), True
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"])), False
    return status, await reader.read(), False


def _judge(spec: Spec, status: int, body: bytes) -> tuple[str, str]:
    """The outcome of a complete response, and a detail for the report."""
    if status >= 500:
        return "5xx", body[:300].decode("utf-8", "replace")
    if status >= 400:
        if spec.case is None:
            return "unexpected_4xx", body[:300].decode("utf-8", "replace")
        try:
            json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return "bad_body", f"{status} without an OpenAI error object: {body[:200]!r}"
        return "rejected", ""
    if status < 200 or status >= 300:
        return "bad_body", f"status {status}"
    problem = _check_stream(spec, body) if spec.stream else _check_plain(spec, body)
    if problem:
        return problem
    if spec.case is not None and spec.expect == "4xx":
        return "malformed_accepted", f"{status}"
    return "ok", ""


def _check_stream(spec: Spec, body: bytes) -> tuple[str, str] | None:
    events = [e for e in body.split(b"\n\n") if e.strip()]
    errors = [e for e in events if e.startswith(b'data: {"error"')]
    if errors:
        return "stream_error", errors[0][:300].decode("utf-8", "replace")
    if not events or events[-1] != b"data: [DONE]":
        return "stream_incomplete", f"last event {events[-1][:120] if events else b''!r}"
    finished = set()
    for event in events:
        # only the chunks that finish a choice: json.loads on every token would take CPU from the server
        if event.count(b'"finish_reason"') > event.count(b'"finish_reason":null') + event.count(b'"finish_reason": null'):
            for choice in json.loads(event[6:])["choices"]:
                if choice.get("finish_reason"):
                    finished.add(choice["index"])
    if spec.num_choices is not None and finished != set(range(spec.num_choices)):
        return "stream_incomplete", f"finish_reason for choices {sorted(finished)} of {spec.num_choices}"
    return None


def _check_plain(spec: Spec, body: bytes) -> tuple[str, str] | None:
    try:
        choices = json.loads(body)["choices"]
    except (ValueError, KeyError, TypeError):
        return "bad_body", f"not a completion: {body[:200]!r}"
    if spec.num_choices not in (None, len(choices)) or not all(c.get("finish_reason") for c in choices):
        return "bad_body", f"{len(choices)} choices of {spec.num_choices}, finish_reasons " \
                           f"{[c.get('finish_reason') for c in choices]}"
    return None


def _close(writer, is_reset: bool) -> None:
    if is_reset:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()


# ---- the request mix ---------------------------------------------------------------------------------------------


class Generator:
    """Seeded request bodies: normal ones, and the malformed ones of MALFORMED_CASES."""

    def __init__(self, model: str, max_model_len: int, seed: int):
        self.model = model
        self.max_prompt_bytes = max(32, min(600, max_model_len - 128 - 64))  # the demo tokenizer: ~1 token per byte
        self.questions = [p.question for p in demo_tasks.generate(seed + 1, 200)]
        self.system_prompts = [(f"You are assistant {k}. " + "Answer briefly and show the steps. " * 40)
                               [: self.max_prompt_bytes // 2] for k in range(3)]
        self._deck: list[str] = []

    def draw(self, index: int, rng: random.Random, disconnect: float, malformed: float, skip: set[str]) -> Spec:
        u = rng.random()
        if u < malformed:
            if not self._deck:  # every case once per round, in a shuffled order: all of them show up
                self._deck = [n for n in MALFORMED_CASES if n not in skip]
                rng.shuffle(self._deck)
            if self._deck:
                return self.malformed(index, rng, self._deck.pop())
        spec = self.normal(index, rng)
        if malformed <= u < malformed + disconnect:
            modes = DISCONNECTS_STREAM if spec.stream else DISCONNECTS_PLAIN
            spec.disconnect = rng.choices([m for m, _ in modes], [w for _, w in modes])[0]
            spec.is_reset = rng.random() < 0.5
            spec.disconnect_at = {"during_body": rng.random(), "before_response": rng.uniform(0.0, 2.0),
                                  "mid_stream": rng.randint(1, 40)}.get(spec.disconnect, 0.0)
        return spec

    def normal(self, index: int, rng: random.Random) -> Spec:
        is_chat = rng.random() < 0.6
        stream = rng.random() < 0.5
        n = 2 if rng.random() < 0.15 else 1
        body: dict = {"model": self.model, "max_tokens": rng.randint(8, 128), "stream": stream}
        if n > 1:
            body["n"] = n
        temperature = rng.choice([0.0, 0.6, 1.0, None])
        if temperature is not None:
            body["temperature"] = temperature
        if rng.random() < 0.2:
            body["top_p"] = rng.choice([0.5, 0.9, 1.0])
        if rng.random() < 0.2:
            body["top_k"] = rng.choice([-1, 0, 1, 5, 50])
        if rng.random() < 0.3:
            body["seed"] = rng.randint(0, 2**31)
        if rng.random() < 0.1:
            body["stop"] = rng.choice(["\n\n", ["</think>", "="], "0"])
        if rng.random() < 0.1:
            body["ignore_eos"] = True
        if stream and rng.random() < 0.3:
            body["stream_options"] = {"include_usage": True}
        num_prompts = 1
        if is_chat:
            messages = [{"role": "user", "content": self._question(rng)}]
            if rng.random() < 0.4:  # shared long prefixes: prefix-cache hits and cached-free blocks
                messages.insert(0, {"role": "system", "content": rng.choice(self.system_prompts)})
            body["messages"] = messages
            if rng.random() < 0.2:
                body["logprobs"] = True
                body["top_logprobs"] = rng.randint(0, 5)
            path = "/v1/chat/completions"
        else:
            kind = rng.random()
            if kind < 0.1:
                body["prompt"] = [rng.randint(2, 250) for _ in range(rng.randint(1, 64))]
            elif kind < 0.2 and not stream:  # a streamed completion takes one prompt (400 otherwise)
                body["prompt"] = [self._question(rng), self._question(rng)]
                num_prompts = 2
            else:
                body["prompt"] = self._question(rng)
            if rng.random() < 0.2:
                body["logprobs"] = rng.randint(0, 5)
                if rng.random() < 0.25:
                    body["echo"] = True  # prompt logprobs: no prefix-cache hits for this request
            path = "/v1/completions"
        return Spec(index, path, json.dumps(body, ensure_ascii=False).encode(), stream, n * num_prompts)

    def malformed(self, index: int, rng: random.Random, name: str) -> Spec:
        expect, make = MALFORMED_CASES[name]
        base = json.loads(self.normal(index, rng).body)
        base["stream"] = rng.random() < 0.5
        path = "/v1/chat/completions" if "messages" in base else "/v1/completions"
        body = make(base, rng)
        if isinstance(body, dict):
            path = body.pop("_path", path)
            body = json.dumps(body).encode()
        return Spec(index, path, body, base["stream"], None, case=name, expect=expect)

    def _question(self, rng: random.Random) -> str:
        text = rng.choice(self.questions)
        if rng.random() < 0.1:  # a long prompt
            text = (text + " ") * max(1, self.max_prompt_bytes // (3 * len(text.encode())))
        return text


def _with(**fields):
    return lambda body, rng: {**body, **fields}


def _truncated(body: dict, rng: random.Random) -> bytes:
    raw = json.dumps(body).encode()
    return raw[: rng.randint(1, len(raw) - 1)]


def _non_utf8(body: dict, rng: random.Random) -> bytes:
    raw = json.dumps(body).encode()
    cut = raw.index(b'"model"')
    return raw[:cut] + b'"\xff\xfe\xc3(": "\x80\x81", ' + raw[cut:]


def _chat(**fields):
    def make(body: dict, rng: random.Random) -> dict:
        body = {k: v for k, v in body.items() if k not in ("prompt", "echo", "logprobs")}
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        return {**body, **fields, "_path": "/v1/chat/completions"}
    return make


def _completion(**fields):
    def make(body: dict, rng: random.Random) -> dict:
        body = {k: v for k, v in body.items() if k not in ("messages", "logprobs", "top_logprobs")}
        body.setdefault("prompt", "hi")
        return {**body, **fields, "_path": "/v1/completions"}
    return make


def _without(key: str):
    return lambda body, rng: {k: v for k, v in body.items() if k != key}


# name -> (expected outcome, body maker); "not5xx": arguably valid, any answer but a 5xx passes
MALFORMED_CASES = {
    "invalid_json": ("4xx", lambda b, r: b'{"model": "x", "messages": [}'),
    "truncated_json": ("4xx", _truncated),
    "json_list": ("4xx", lambda b, r: json.dumps([b]).encode()),
    "json_string": ("4xx", lambda b, r: b'"hello"'),
    "json_null": ("4xx", lambda b, r: b"null"),
    "empty_body": ("4xx", lambda b, r: b""),
    "deeply_nested": ("4xx", lambda b, r: b"[" * 100_000 + b"]" * 100_000),
    "non_utf8": ("4xx", _non_utf8),
    "nan_temperature": ("4xx", lambda b, r: json.dumps({**b, "temperature": float("nan")}).encode()),
    "infinite_top_p": ("4xx", lambda b, r: json.dumps({**b, "top_p": float("inf")}).encode()),
    "unknown_model": ("4xx", _with(model="gpt-4-does-not-exist")),
    "missing_model": ("4xx", _without("model")),
    "missing_messages_or_prompt": ("4xx", lambda b, r: {k: v for k, v in b.items() if k not in ("messages", "prompt")}),
    "temperature_hot": ("4xx", _with(temperature="hot")),
    "temperature_too_high": ("4xx", _with(temperature=1e308)),
    "max_tokens_string": ("4xx", _with(max_tokens="ten")),
    "max_tokens_float": ("4xx", _with(max_tokens=1.5)),
    "max_tokens_zero": ("4xx", _with(max_tokens=0)),
    "max_tokens_2e63": ("4xx", _with(max_tokens=2**63)),
    "n_zero": ("4xx", _with(n=0)),
    "n_1000": ("4xx", _with(n=1000)),
    "stream_string": ("4xx", _with(stream="yes")),
    "top_p_zero": ("4xx", _with(top_p=0)),
    "top_k_2e63": ("4xx", _with(top_k=2**63)),
    "top_k_2e31": ("not5xx", _with(top_k=2**31)),
    "top_k_minus_2": ("4xx", _with(top_k=-2)),
    "seed_2e64": ("4xx", _with(seed=2**64)),
    "seed_2e63": ("not5xx", _with(seed=2**63)),
    "seed_negative": ("not5xx", _with(seed=-1)),
    "seed_minus_2e63": ("not5xx", _with(seed=-(2**63))),
    "presence_penalty_string": ("4xx", _with(presence_penalty="much")),
    "min_tokens_over_max": ("not5xx", _with(min_tokens=10_000, max_tokens=8)),
    "huge_stop_list": ("not5xx", lambda b, r: {**b, "stop": [f"stop{i}" for i in range(5000)]}),
    "stop_wrong_type": ("4xx", _with(stop={"a": 1})),
    "stop_token_ids_out_of_vocab": ("4xx", _with(stop_token_ids=[10**9])),
    "stop_token_ids_too_many": ("4xx", _with(stop_token_ids=list(range(1000)))),
    "messages_string": ("4xx", _chat(messages="hello")),
    "messages_empty": ("4xx", _chat(messages=[])),
    "messages_bad_role": ("4xx", _chat(messages=[{"role": "wizard", "content": "hi"}])),
    "messages_content_number": ("4xx", _chat(messages=[{"role": "user", "content": 42}])),
    "messages_unknown_part": ("not5xx", _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])),
    "top_logprobs_100": ("4xx", _chat(logprobs=True, top_logprobs=100)),
    "logprobs_100": ("4xx", _completion(logprobs=100)),
    "prompt_token_out_of_vocab": ("4xx", _completion(prompt=[10**6])),
    "prompt_token_2e63": ("4xx", _completion(prompt=[2**63])),
    "prompt_token_negative": ("4xx", _completion(prompt=[-1, 5])),
    "prompt_empty_string": ("not5xx", _completion(prompt="")),
    "prompt_empty_list": ("4xx", _completion(prompt=[])),
    "prompt_mixed_list": ("4xx", _completion(prompt=["a", 1, None])),
    "prompt_too_long": ("4xx", _completion(prompt="x" * 5000)),
    "max_tokens_over_context": ("4xx", _with(max_tokens=10**6)),
}


# ---- the server --------------------------------------------------------------------------------------------------


class ServerStartError(Exception):
    pass


class OwnServer:
    """`dsserve serve` on a free 127.0.0.1 port, its output in a log file; `stop` is safe to call more than once."""

    def __init__(self, extra_args: list[str]):
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="dsserve-soak-", suffix=".log")[1])

    def start(self, timeout_s: float = 300) -> tuple[str, int]:
        port = _free_port()
        cmd = [sys.executable, "-m", "dsserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *self.extra_args]
        print(f"starting {' '.join(cmd)} (log {self.log_path})", file=sys.stderr)
        with open(self.log_path, "wb") as log:
            # own session: the terminal's Ctrl-C reaches only us, and we stop it; the parent-death signal covers
            # a soak killed with SIGKILL
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_term_when_parent_dies)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"the server exited with {self.proc.returncode} while starting:\n"
                                       + self.log_tail())
            if _health(port) == 200:
                return "127.0.0.1", port
            time.sleep(0.25)
        raise ServerStartError(f"no GET /health 200 within {timeout_s} s:\n" + self.log_tail())

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc is None or self.exit_code is not None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                print(f"the server ignored SIGTERM for {timeout_s} s: SIGKILL", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode

    def log_tail(self, num_lines: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])

    def engine_failure(self) -> str:
        """The traceback of the engine loop's failure in the log, if there is one."""
        text = self.log_path.read_text(errors="replace")
        at = text.find("engine loop failed")
        if at < 0:
            return ""
        lines = text[at:].splitlines()
        end = next((i for i, line in enumerate(lines) if line and not line[0].isspace() and i > 1), len(lines))
        return "\n".join(lines[:1] + [line for line in lines[1:end] if line.lstrip()[:1] != "^"][-6:] + lines[end : end + 1])


def _term_when_parent_dies() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(port: int) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return int(s.recv(64).split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


class RssSampler:
    """VmRSS of a process and its descendants, sampled once a second for the peak and a timeline."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.peak_kib = 0
        self.timeline: list[tuple[float, int]] = []  # (seconds since the first sample, KiB)
        self._t0 = time.monotonic()

    def read(self) -> int | None:
        if self.pid is None:
            return None
        total = sum(_vm_rss_kib(p) for p in _descendants(self.pid))
        self.peak_kib = max(self.peak_kib, total)
        return total

    async def run(self) -> None:
        while self.pid is not None:
            self.timeline.append((round(time.monotonic() - self._t0, 1), self.read()))
            await asyncio.sleep(1.0)


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split())
        except OSError:
            pass
    return found


def _vm_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---- the report --------------------------------------------------------------------------------------------------


def _summarise(specs, warm_phase, main_phase, before, idle, rss_warm, rss_end, rss_peak, rss_timeline, final,
               server) -> dict:
    results = main_phase.results
    by_outcome: dict[str, int] = {}
    by_status: dict[str, int] = {}
    for r in results:
        by_outcome[r.outcome] = by_outcome.get(r.outcome, 0) + 1
        if r.status is not None:
            by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
    num_5xx = sum(1 for r in results if r.status is not None and r.status >= 500)
    by_case: dict[str, dict[str, int]] = {}
    for s, r in zip(specs, results):
        if s.case:
            counts = by_case.setdefault(s.case, {})
            key = f"{r.outcome}:{r.status}"
            counts[key] = counts.get(key, 0) + 1
    failures = [(s, r) for s, r in zip(specs, results) if r.outcome in FAILING_OUTCOMES]
    accepted = [(s, r) for s, r in zip(specs, results) if r.outcome == "malformed_accepted"]
    # the engine dies on a step: the malformed requests in flight then are the suspects; otherwise the malformed
    # requests that failed themselves
    death_s = min((r.started_s + r.latency_s for _, r in failures if "engine stopped" in r.detail), default=None)
    suspects = [(s, r) for s, r in zip(specs, results) if s.case and r.outcome != "rejected" and (
        r.outcome in FAILING_OUTCOMES if death_s is None else r.started_s <= death_s <= r.started_s + r.latency_s + 0.5)]

    kv = None
    if idle is not None:
        total, free = idle.get("dsserve:kv_cache_total_blocks"), idle.get("dsserve:kv_cache_free_blocks")
        kv = {"total_blocks": total, "free_blocks": free, "blocks_in_use": None if total is None else total - free,
              "usage_perc": idle.get("vllm:kv_cache_usage_perc"),
              "aborted_by_engine": idle.get("vllm:request_success_total:abort", 0)
              - before.get("vllm:request_success_total:abort", 0)}
    rss_change = None if rss_warm is None or rss_end is None else (rss_end - rss_warm) / rss_warm
    checks = {
        "no_5xx": num_5xx == 0,
        "no_other_failures": not failures,
        "warmup_without_failures": not any(r.outcome in FAILING_OUTCOMES for r in warm_phase.results),
        "all_requests_run": not main_phase.stopped_early,
        "idle_after_run": idle is not None,
        "no_leaked_kv_blocks": kv is not None and kv["blocks_in_use"] == 0,
        "rss_within_10pct": None if server is None and rss_change is None else  # --url without --server-pid
        rss_change is not None and rss_change <= RSS_TOLERANCE,
        "normal_request_after": not final,
    }
    num_done = sum(1 for r in results if r.outcome != "not_run")
    return {
        "passed": all(ok is not False for ok in checks.values()), "checks": checks,
        "warmup": {"requests": len(warm_phase.results), "duration_s": warm_phase.duration_s,
                   "failures": sum(r.outcome in FAILING_OUTCOMES for r in warm_phase.results)},
        "duration_s": main_phase.duration_s, "requests_run": num_done, "load_average_1min_end": os.getloadavg()[0],
        "requests_per_s": num_done / main_phase.duration_s if main_phase.duration_s else None,
        "stopped_early": main_phase.stopped_early,
        "by_outcome": by_outcome, "by_status": by_status, "num_5xx": num_5xx,
        "num_2xx": sum(1 for r in results if r.status is not None and 200 <= r.status < 300),
        "num_4xx": sum(1 for r in results if r.status is not None and 400 <= r.status < 500),
        "num_client_aborted": by_outcome.get("client_abort", 0),
        "malformed_by_case": by_case, "kv": kv,
        "rss_kib": {"after_warmup": rss_warm, "end": rss_end, "peak": rss_peak or None, "change": rss_change,
                    "timeline": rss_timeline},
        "final_check_problems": final,
        "failures": [_failure(s, r) for s, r in failures[:50]],
        "malformed_accepted": [_failure(s, r) for s, r in accepted[:20]],
        "suspects": [_failure(s, r) for s, r in suspects[:20]],
        "engine_failure": server.engine_failure() if server is not None else "",
        "latency_s": _percentiles([r.latency_s for r in results if r.outcome == "ok"]),
    }


def _failure(spec: Spec, result: Result) -> dict:
    return {"index": spec.index, "path": spec.path, "case": spec.case, "disconnect": spec.disconnect,
            "outcome": result.outcome, "status": result.status, "detail": result.detail,
            "started_s": round(result.started_s, 3), "body": repr(spec.body[:400])}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    return {f"p{q}": round(values[min(len(values) - 1, int(q / 100 * len(values)))], 3) for q in (50, 90, 99)} | \
        {"max": round(values[-1], 3)}


def _print_report(r: dict) -> None:
    mark = {True: "PASS", False: "FAIL", None: "not measured"}.get
    print(f"\nsoak: {r['requests_run']} requests in {r['duration_s']:.1f} s ({r['requests_per_s'] or 0:.1f} req/s), "
          f"concurrency {r['config']['concurrency']}, seed {r['config']['seed']}, model {r['model']}, "
          f"load average at the end {r['load_average_1min_end']:.1f} on {os.cpu_count()} CPUs")
    if r["stopped_early"]:
        print(f"  STOPPED EARLY: {r['stopped_early']}")
    print(f"  warm-up: {r['warmup']['requests']} requests in {r['warmup']['duration_s']:.1f} s, "
          f"{r['warmup']['failures']} failed (5xx, broken streams, unexpected 4xx)")
    print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(r["by_outcome"].items())))
    print("  statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(r["by_status"].items())))
    print(f"  2xx {r['num_2xx']}, 4xx {r['num_4xx']}, 5xx {r['num_5xx']}, client-aborted {r['num_client_aborted']}; "
          f"latency of ok requests {r['latency_s']}")
    kv = r["kv"]
    if kv:
        print(f"  KV after idle: {kv['blocks_in_use']:.0f} blocks in use of {kv['total_blocks']:.0f} "
              f"(usage {kv['usage_perc']}); engine counted {kv['aborted_by_engine']:.0f} aborted requests")
    else:
        print("  KV after idle: unknown (the server never went idle or is gone)")
    rss = r["rss_kib"]
    if rss["after_warmup"] is not None and rss["end"] is not None:
        print(f"  RSS: after warm-up {rss['after_warmup'] / 1024:.1f} MiB, end {rss['end'] / 1024:.1f} MiB "
              f"({rss['change']:+.1%}), peak {rss['peak'] / 1024:.1f} MiB")
        samples = [kib for _, kib in rss["timeline"]]
        print("  RSS timeline (MiB, whole soak, 10 samples): "
              + " ".join(f"{samples[i * (len(samples) - 1) // 9] / 1024:.0f}" for i in range(10)))
    else:
        print(f"  RSS: not measured (--url without --server-pid, or the server is gone): {rss}")
    for s in r["final_check_problems"]:
        print(f"  after the soak: {s}")
    for f in r["failures"][:10]:
        print(f"  failure #{f['index']} {f['outcome']} {f['status']} {f['path']} case={f['case']} "
              f"disconnect={f['disconnect']} at {f['started_s']} s: {f['detail'][:200]}\n      body {f['body'][:300]}")
    if r["failures"] and r["suspects"]:
        print("  suspects (malformed requests in flight when the engine died, or failing themselves):")
        for f in r["suspects"][:10]:
            print(f"    #{f['index']} {f['case']} -> {f['outcome']} {f['status']}: {f['body'][:200]}")
    for f in r["malformed_accepted"][:10]:
        print(f"  note: malformed #{f['index']} ({f['case']}) was answered {f['status']}: {f['body'][:160]}")
    if r["engine_failure"]:
        print("  server log, engine failure:\n    " + r["engine_failure"].replace("\n", "\n    "))
    if "exit_code_after_sigterm" in r["server"]:
        print(f"  server exit code after SIGTERM: {r['server']['exit_code_after_sigterm']} (log {r['server']['log']})")
    print("  checks: " + ", ".join(f"{k} {mark(v)}" for k, v in r["checks"].items()))
    print("PASSED" if r["passed"] else "FAILED")


def _parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--disconnect", type=float, default=0.2, help="share of clients that close their socket early")
    p.add_argument("--malformed", type=float, default=0.05, help="share of requests with a malformed body")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=500,
                   help="requests of the same mix (another seed) before RSS 'after warm-up'")
    p.add_argument("--url", help="an already running server (default: start `dsserve serve` on a free port)")
    p.add_argument("--server-pid", type=int, help="with --url: the server's pid, for RSS")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `dsserve serve` argument (repeat; use --server-arg=--flag for flags)")
    p.add_argument("--skip-case", action="append", default=[], help="leave this malformed case out (repeat)")
    p.add_argument("--list-cases", action="store_true")
    p.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    p.add_argument("--idle-timeout", type=float, default=120, help="seconds to wait for the server to go idle")
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
