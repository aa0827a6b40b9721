"""`dsserve bench serve`: streaming load against any OpenAI-compatible server, reported as vLLM's serving benchmark
reports it (TTFT, TPOT, ITL, end-to-end latency: mean, median, p90, p99; throughput; goodput).

Random prompts go to /v1/completions as token ids (exact input lengths); ShareGPT conversations go to
/v1/chat/completions as text. `ignore_eos` and `max_tokens` fix the output length on servers that honour
them (dsserve, vLLM, SGLang). Arrivals are Poisson at `request_rate` (or all at once), at most
`max_concurrency` in flight.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import statistics
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools


@dataclass
class RequestResult:
    ok: bool
    input_len: int
    output_len: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""
    # the streamed body as it arrived, (arrival time, bytes), until `read_stream` turns it into the fields above
    stream: list[tuple[float, bytes]] = field(default_factory=list, repr=False)
    started: float = 0.0

    @property
    def tpot_s(self) -> float:
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1) if self.output_len > 1 else 0.0


@dataclass
class Workload:
    prompt: Any  # token ids (completions) or messages (chat)
    input_len: int
    output_len: int


def random_workload(num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int) -> list[Workload]:
    rng = random.Random(seed)
    low = min(10, vocab_size - 1)
    return [Workload([rng.randrange(low, vocab_size) for _ in range(input_len)], input_len, output_len)
            for _ in range(num_prompts)]


def sharegpt_workload(path: str | Path, num_prompts: int, output_len: int | None, seed: int) -> list[Workload]:
    """ShareGPT_V3 JSON: [{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}, ...]."""
    data = json.loads(Path(path).read_text())
    rng = random.Random(seed)
    rng.shuffle(data)
    out = []
    for item in data:
        turns = item.get("conversations") or []
        if len(turns) < 2:
            continue
        question, answer = turns[0].get("value", ""), turns[1].get("value", "")
        out.append(Workload([{"role": "user", "content": question}], len(question.split()),
                            output_len or max(1, len(answer.split()))))
        if len(out) == num_prompts:
            break
    return out


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection. httptools (llhttp, in C) parses the bytes inside `data_received`, and
    every piece of a response body goes straight to the request's handler there: a streamed token costs a
    callback, not a wake-up of the waiting task. On a machine the client shares with the server it measures, the
    client's CPU time is taken from the server (docs/benchmarks.md)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.on_body_handler: Callable[[int, bytes, float], bool] | None = None  # True: stop reading
        self.status = 0
        self.keep_alive = False
        self.now = 0.0
        self.done: asyncio.Future | None = None  # the current response: None (read to its end) or an exception

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.done is None or self.done.done():
            return
        self.now = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except _Stopped as e:  # raised by on_body through the parser
            self._finish(e)
        except (httptools.HttpParserError, ValueError) as e:  # ValueError: raised by an on_body handler
            self._finish(ConnectionError(f"bad HTTP response: {e}") if isinstance(e, httptools.HttpParserError) else e)

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.on_body_handler(self.status, body, self.now):
            raise _Stopped()

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim response: the real one follows
            self.parser = httptools.HttpResponseParser(self)
            return
        self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionError("the server closed the connection before the response ended"))

    def _finish(self, error: BaseException | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(error)

    def request(self, request: bytes, on_body: Callable[[int, bytes, float], bool]) -> asyncio.Future:
        self.on_body_handler, self.status, self.keep_alive = on_body, 0, False
        self.parser = httptools.HttpResponseParser(self)
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.done

    def reusable(self) -> bool:
        return self.keep_alive and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Stopped(Exception):
    """The body handler asked to stop reading (an error event arrived): the connection is not reused."""


def run_async(coro):
    """Run `coro` on uvloop's event loop where it is installed (Linux, macOS: its I/O callbacks run in C, a
    fraction of the client's CPU time per streamed token), else on asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    if not hasattr(asyncio, "Runner"):  # Python 3.10
        return asyncio.run(coro) if uvloop.install() is None else None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class Client:
    """Streaming POSTs to one server over keep-alive connections.

    The benchmark client shares the machine with the server it measures when both run on one box, and every
    streamed token costs it a read and a parse: httptools parsing in a protocol callback, on uvloop, spends a
    fraction of the CPU time per token that httpx's async stack does (docs/benchmarks.md), so it perturbs the
    server less.
    """

    def __init__(self, base_url: str, api_key: str | None = None, connect_timeout_s: float = 30.0):
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base URL {base_url!r}: expected http://HOST[:PORT] or https://HOST[:PORT]")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.prefix = url.path.rstrip("/")
        self.headers = [("Host", url.netloc), ("Content-Type", "application/json"), ("Accept", "text/event-stream")]
        if api_key:
            self.headers.append(("Authorization", f"Bearer {api_key}"))
        for name, value in self.headers:
            if any(c in name + value for c in "\r\n"):
                raise ValueError(f"header {name!r} may not contain a line break")
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[_Connection] = []
        self.connections_opened = 0

    async def _connect(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.transport.is_closing():
                return conn
        _, conn = await asyncio.wait_for(
            asyncio.get_running_loop().create_connection(_Connection, self.host, self.port, ssl=self.ssl),
            self.connect_timeout_s)
        self.connections_opened += 1
        return conn

    async def post(self, path: str, payload: dict[str, Any], on_body: Callable[[int, bytes, float], bool]) -> int:
        """POST `payload` as JSON and hand each piece of the response body to `on_body(status, data, arrival
        time)` as it arrives; `on_body` returns True to stop reading. Returns the status. The connection goes back
        to the pool when the response was read to its end."""
        conn = await self._connect()
        body = json.dumps(payload).encode()
        head = "".join(f"{name}: {value}\r\n" for name, value in (*self.headers, ("Content-Length", str(len(body)))))
        request = f"POST {self.prefix + path} HTTP/1.1\r\n{head}\r\n".encode("latin-1") + body
        error: BaseException | None = ConnectionError("the request was cancelled")
        try:
            error = await conn.request(request, on_body)
        finally:
            if error is None and conn.reusable():
                self._idle.append(conn)
            else:
                conn.close()
        if error is not None and not isinstance(error, _Stopped):
            raise error
        return conn.status

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


async def send_request(client: Client, model: str, work: Workload) -> RequestResult:
    """One streamed request of the workload; its chunks are stored with their arrival times (`read_stream` reads
    them after the run)."""
    chat = isinstance(work.prompt, list) and work.prompt and isinstance(work.prompt[0], dict)
    body: dict[str, Any] = {"model": model, "max_tokens": work.output_len, "stream": True, "ignore_eos": True,
                            "temperature": 0, "stream_options": {"include_usage": True}}
    body["messages" if chat else "prompt"] = work.prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    result = RequestResult(ok=False, input_len=work.input_len)

    def on_body(status: int, data: bytes, now: float) -> bool:
        result.stream.append((now, data))
        return False

    result.started = time.perf_counter()
    try:
        status = await client.post(path, body, on_body)
        # the end: the last piece's arrival (this task may resume later, behind other streams' callbacks)
        finished = result.stream[-1][0] if result.stream else time.perf_counter()
        if status != 200:
            result.error = f"HTTP {status}: {b''.join(d for _, d in result.stream).decode(errors='replace')[:200]}"
            result.stream.clear()
            return result
        result.e2e_s = finished - result.started
        result.ok = True
    except (OSError, asyncio.TimeoutError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
        result.stream.clear()
    return result


def read_stream(result: RequestResult) -> RequestResult:
    """Turn a finished request's stored event stream into its token timings: TTFT, the inter-token latencies (each
    event timed by the arrival of the piece that completed it) and the output length (the usage chunk's, else the
    count of token events); an error event fails the request. `run` calls it once every request is done: while
    requests run, the client (which on a small machine shares the CPU with the server it measures) only stores
    bytes and arrival times."""
    last, chunks, pending = result.started, 0, b""
    stream, result.stream = result.stream, []
    try:
        for now, data in stream:
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:  # Server-sent events: "data: {json}" lines, blank lines between events
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    result.ok, result.error = False, (chunk["error"] or {}).get("message", "error")
                    return result
                if chunk.get("usage"):
                    result.output_len = chunk["usage"].get("completion_tokens", chunks)
                # A token event: a completions chunk (one per token, its text may be empty) or a chat delta with text.
                if any(c.get("text") is not None or bool((c.get("delta") or {}).get("content")
                                                         or (c.get("delta") or {}).get("reasoning_content"))
                       for c in chunk.get("choices", [])):
                    if chunks == 0:
                        result.ttft_s = now - result.started
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    chunks += 1
    except ValueError as e:  # a malformed JSON event
        result.ok, result.error = False, f"ValueError: {e}"
        return result
    result.output_len = result.output_len or chunks
    return result


async def run(base_url: str, model: str, workload: list[Workload], request_rate: float, max_concurrency: int | None,
              api_key: str | None = None, seed: int = 0, progress=None) -> tuple[list[RequestResult], float]:
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency or len(workload))
    client = Client(base_url, api_key)

    async def guarded(work: Workload) -> RequestResult:
        async with limit:
            r = await send_request(client, model, work)
        if progress:
            progress()
        return r

    try:
        started = time.perf_counter()
        tasks = []
        for work in workload:
            tasks.append(asyncio.create_task(guarded(work)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
        return [read_stream(r) if r.ok else r for r in results], duration
    finally:
        await client.close()


def summarize(results: list[RequestResult], duration_s: float, goodput: dict[str, float] | None = None) -> dict[str, Any]:
    done = [r for r in results if r.ok]

    def stats(values: list[float]) -> dict[str, float]:
        if not values:
            return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
        ordered = sorted(values)

        def pct(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

        return {"mean": 1000 * statistics.fmean(values), "median": 1000 * statistics.median(values),
                "p90": 1000 * pct(0.9), "p99": 1000 * pct(0.99)}

    out_tokens = sum(r.output_len for r in done)
    in_tokens = sum(r.input_len for r in done)
    summary = {
        "successful_requests": len(done), "failed_requests": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration_s, "output_token_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "ttft_ms": stats([r.ttft_s for r in done]), "tpot_ms": stats([r.tpot_s for r in done if r.output_len > 1]),
        "itl_ms": stats([x for r in done for x in r.itl_s]), "e2el_ms": stats([r.e2e_s for r in done]),
    }
    if goodput:
        good = [r for r in done if all(1000 * {"ttft": r.ttft_s, "tpot": r.tpot_s, "e2el": r.e2e_s}[k] <= v
                                       for k, v in goodput.items())]
        summary["goodput"] = len(good) / duration_s
        summary["goodput_slos_ms"] = goodput
    return summary


def report(summary: dict[str, Any]) -> str:
    lines = ["============ Serving Benchmark Result ============",
             f"Successful requests:                     {summary['successful_requests']}",
             f"Failed requests:                         {summary['failed_requests']}",
             f"Benchmark duration (s):                  {summary['duration_s']:.2f}",
             f"Total input tokens:                      {summary['total_input_tokens']}",
             f"Total generated tokens:                  {summary['total_output_tokens']}",
             f"Request throughput (req/s):              {summary['request_throughput']:.2f}",
             f"Output token throughput (tok/s):         {summary['output_token_throughput']:.2f}",
             f"Total Token throughput (tok/s):          {summary['total_token_throughput']:.2f}"]
    if "goodput" in summary:
        lines.append(f"Request goodput (req/s):                 {summary['goodput']:.2f}")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        lines.append(f"{'-' * 15}{title}{'-' * 15}")
        short = key.split("_")[0].upper()
        for stat in ("mean", "median", "p90", "p99"):
            label = f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {short} (ms):"
            lines.append(f"{label:<41}{summary[key][stat]:.2f}")
    if summary["errors"]:
        lines.append(f"errors: {summary['errors']}")
    return "\n".join(lines)


def to_json(summary: dict[str, Any], args: dict[str, Any]) -> str:
    return json.dumps({"args": args, **summary}, indent=1)



