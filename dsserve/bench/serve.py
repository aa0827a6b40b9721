"""`dsserve bench serve`: streaming load against any OpenAI-compatible server, reported as vLLM's serving benchmark
reports it (TTFT, TPOT, ITL, end-to-end latency: mean, median, p90, p99; throughput; goodput).

Random prompts go to /v1/completions as token ids (exact input lengths); ShareGPT conversations go to
/v1/chat/completions as text. `ignore_eos` and `max_tokens` fix the output length on servers that honour
them (dsserve, vLLM, SGLang). Arrivals are Poisson at `request_rate` (or all at once), at most
`max_concurrency` in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import statistics
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11


@dataclass
class RequestResult:
    ok: bool
    input_len: int
    output_len: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

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


class _Connection:
    """One HTTP/1.1 connection: asyncio streams move the bytes, h11 frames the messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)

    async def send(self, *events) -> None:
        for event in events:
            self.writer.write(self.h11.send(event))
        await self.writer.drain()

    async def next_event(self):
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.reader.read(65536))  # b"" at EOF: h11 then reports the closed peer

    def reusable(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False

    def close(self) -> None:
        self.writer.close()


class Client:
    """Streaming POSTs to one server over keep-alive connections.

    The benchmark client shares the machine with the server it measures when both run on one box, and every
    streamed token costs it a read and a parse: this path (asyncio streams + h11) spends about a fifth of the
    CPU time per token that httpx's async stack does (docs/benchmarks.md), so it perturbs the server less.
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
        self.connect_timeout_s = connect_timeout_s
        self._idle: list[_Connection] = []
        self.connections_opened = 0

    async def _connect(self) -> _Connection:
        if self._idle:
            return self._idle.pop()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.ssl), self.connect_timeout_s)
        self.connections_opened += 1
        return _Connection(reader, writer)

    async def post_stream(self, path: str, payload: dict[str, Any]) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (status, body bytes as they arrive) for a POST of `payload` as JSON; the connection goes back
        to the pool when the response was read to its end."""
        body = json.dumps(payload).encode()
        conn = await self._connect()
        done = False
        try:
            await conn.send(h11.Request(method="POST", target=self.prefix + path,
                                        headers=[*self.headers, ("Content-Length", str(len(body)))]),
                            h11.Data(data=body), h11.EndOfMessage())
            event = await conn.next_event()
            while isinstance(event, h11.InformationalResponse):
                event = await conn.next_event()
            if not isinstance(event, h11.Response):
                raise ConnectionError(f"no HTTP response (got {type(event).__name__})")
            status = event.status_code
            yield status, b""
            while True:
                event = await conn.next_event()
                if isinstance(event, h11.Data):
                    yield status, bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    done = True
                    return
                else:
                    raise ConnectionError(f"the response ended early ({type(event).__name__})")
        finally:
            if done and conn.reusable():
                self._idle.append(conn)
            else:
                conn.close()

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


async def _one(client: Client, model: str, work: Workload) -> RequestResult:
    chat = isinstance(work.prompt, list) and work.prompt and isinstance(work.prompt[0], dict)
    body: dict[str, Any] = {"model": model, "max_tokens": work.output_len, "stream": True, "ignore_eos": True,
                            "temperature": 0, "stream_options": {"include_usage": True}}
    body["messages" if chat else "prompt"] = work.prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    result = RequestResult(ok=False, input_len=work.input_len)
    started = time.perf_counter()
    last = started
    chunks = 0
    pending = b""
    status = None
    try:
        async with contextlib.aclosing(client.post_stream(path, body)) as stream:
            async for status, data in stream:
                if status != 200:
                    pending += data
                    continue
                now = time.perf_counter()
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:  # Server-sent events: "data: {json}" lines, blank lines between events
                    line = line.strip()
                    if not line.startswith(b"data:") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        result.error = (chunk["error"] or {}).get("message", "error")
                        return result
                    if chunk.get("usage"):
                        result.output_len = chunk["usage"].get("completion_tokens", chunks)
                    # A token event: a completions chunk (one per token, its text may be empty) or a chat delta
                    # with text.
                    if any(c.get("text") is not None or bool((c.get("delta") or {}).get("content")
                                                             or (c.get("delta") or {}).get("reasoning_content"))
                           for c in chunk.get("choices", [])):
                        if chunks == 0:
                            result.ttft_s = now - started
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        chunks += 1
        if status != 200:
            result.error = f"HTTP {status}: {pending.decode(errors='replace')[:200]}"
            return result
        result.e2e_s = time.perf_counter() - started
        result.output_len = result.output_len or chunks
        result.ok = True
    except (OSError, asyncio.TimeoutError, h11.ProtocolError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run(base_url: str, model: str, workload: list[Workload], request_rate: float, max_concurrency: int | None,
              api_key: str | None = None, seed: int = 0, progress=None) -> tuple[list[RequestResult], float]:
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency or len(workload))
    client = Client(base_url, api_key)

    async def guarded(work: Workload) -> RequestResult:
        async with limit:
            r = await _one(client, model, work)
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
        return list(results), time.perf_counter() - started
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



