"""Asyncio facade for the server: the engine loop runs on its own thread; each request gets an output stream.

HTTP handling, tokenisation and JSON happen on the event loop; `step()` runs on the engine thread, so
neither stalls the other. Requests and aborts cross to the engine thread through a queue; outputs come
back with `loop.call_soon_threadsafe`, one call per step. If a step raises, every open stream receives the error, the
engine is marked dead and `on_death` is called (the server then exits non-zero rather than hang).

Outputs are cumulative, so a stream holds only the newest one: when a handler has not taken the last output yet, the
next replaces it (vLLM's RequestOutputCollector merges the same way) and a handler that falls behind sends fewer,
larger chunks instead of working through a backlog. `stream_interval` (vLLM's `--stream-interval`) delivers a
request's output every that many of the steps that gave it tokens, plus its first output and its end: fewer, larger
chunks by choice, each one costing the HTTP thread and the client the same however many tokens it carries.

A consumer may pass an `on_output` callback: the step's delivery hands it each unfinished output first, on the event
loop, and the iteration gets only the outputs it turns down, and the last one. What the callback does with them (the
server writes some straight to the connection: server/direct.py) is the consumer's business.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from dsserve.engine.engine import LLMEngine, Prompt, RequestOutput
from dsserve.engine.request import SamplingParams
from dsserve.errors import EngineDeadError, InvalidRequestError, RequestFailedError

logger = logging.getLogger(__name__)


@dataclass
class RequestStats:
    """Timings the server turns into latency metrics."""

    arrival_s: float
    first_token_s: float | None = None
    last_token_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)


class OutputStream:
    """One request's way from the engine thread to its consumer: the newest output (or the error that ended it), and
    the consumer's `on_output` callback, which sees each unfinished output before the iteration does."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_output: Callable[[RequestOutput], bool] | None = None):
        self.loop = loop
        self.item: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()
        self.on_output = on_output
        self.held = 0  # engine thread: outputs (steps that gave this request tokens) not sent yet (stream_interval)
        self.started = False  # engine thread: the first output has been sent

    def put(self, item) -> None:
        """From any thread."""
        self.loop.call_soon_threadsafe(self.set, item)

    def set(self, item: RequestOutput | BaseException) -> None:
        """On the event loop. An error stays: nothing after it may hide it (nor reach `on_output`). A finished output
        stays too: an engine failure after the request completed does not turn its answer into an error."""
        if isinstance(self.item, BaseException):
            return
        if isinstance(item, BaseException):
            if self.item is not None and self.item.finished:
                return
            self.on_output = None
        self.item = item
        self.ready.set()

    def offer(self, output: RequestOutput) -> None:
        """On the event loop, once per delivered output: `on_output`'s when it takes it (True), else the iteration's.
        The last output always goes to the iteration, which ends with it. A callback that raises ends the stream with
        its error; the step's other streams still get theirs."""
        on_output = self.on_output
        if on_output is not None and not output.finished:
            try:
                if on_output(output):
                    return
            except Exception as e:  # noqa: BLE001 - one stream's failure must not stop the step's other deliveries
                logger.exception("a stream's on_output failed")
                self.set(e)
                return
        self.set(output)

    async def get(self) -> RequestOutput:
        while self.item is None:
            await self.ready.wait()
        item, self.item = self.item, None
        self.ready.clear()
        if isinstance(item, BaseException):
            raise item
        return item


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_death: Callable[[BaseException], None] | None = None,
                 stream_interval: int = 1):
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1 (engine steps between a stream's chunks), "
                             f"got {stream_interval}")
        self.engine = engine
        self.stream_interval = stream_interval
        self.on_death = on_death
        self.dead: BaseException | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, OutputStream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_usage = 0.0
        # Liveness (engine thread writes, /health reads): when the loop last went round, and when a step last ended.
        self.started_s = self.loop_alive_s = time.monotonic()
        self.last_step_s: float | None = None
        # Called on the engine thread once per step with the step's outputs and the time it ended.
        self.observers: list[Callable[[list[RequestOutput], float], None]] = []

    def start(self) -> None:
        """Run the engine loop on a thread of its own (tests, embedding in another program)."""
        self._thread = threading.Thread(target=self.run, name="dsserve-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run the engine loop on the calling thread until `shutdown` or an engine failure.

        `dsserve serve` runs it on the main thread, the one that loaded the model, and serves HTTP from another:
        on CPU, torch's OpenMP pool belongs to the thread that first entered it, a second computing thread gets a
        second pool, and with more OpenMP threads than cores libgomp stops spinning between parallel regions,
        so every op waits for a sleeping worker (offline generation from a second thread: 404-406 vs 480-549
        tok/s from the loading thread, docs/benchmarks.md)."""
        self._loop()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams,
                       on_output: Callable[[RequestOutput], bool] | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative outputs until it finishes. Validation errors raise before the first yield;
        leaving the iteration early (client gone) aborts the request and frees its blocks.

        `on_output(output)` is called on the event loop with each unfinished output as its step delivers it, whether
        or not this iteration is waiting; it returns True when it has dealt with the output (which is then not
        yielded) and False to have it yielded. An exception it raises ends this iteration with that exception."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped after an internal error: {self.dead}")
        stream = OutputStream(asyncio.get_running_loop(), on_output)
        self._streams[request_id] = stream
        done = asyncio.get_running_loop().create_future()
        self._inbox.put(("add", request_id, prompt, params, done))
        self._wake.set()
        finished = False
        try:
            await done  # raises the validation error, if any
            while True:
                item = await stream.get()
                finished = item.finished
                if item.error is not None:
                    raise RequestFailedError(item.error)
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the client left (or the request failed): stop computing it
                self._inbox.put(("abort", request_id))
                self._wake.set()

    # ---- engine thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.loop_alive_s = time.monotonic()
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self.engine.check_health()  # a rank lost while idle ends the engine too
                    self._update_gauges()
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self.last_step_s = self.loop_alive_s = time.monotonic()
                now = time.perf_counter()
                deliveries: dict[asyncio.AbstractEventLoop, list] = {}
                interval = self.stream_interval
                for observer in self.observers:
                    observer(outputs, now)
                for output in outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is None:
                        continue
                    stream.held += 1
                    if stream.held >= interval or not stream.started or output.finished:
                        stream.held, stream.started = 0, True
                        deliveries.setdefault(stream.loop, []).append((stream, output))
                for loop, items in deliveries.items():  # one wake-up of the event loop per step, not per stream
                    loop.call_soon_threadsafe(_deliver, items)
                self._update_gauges()
        except BaseException as e:  # noqa: BLE001 - any failure kills the engine; report it to everyone
            logger.exception("engine loop failed")
            self.dead = e
            error = EngineDeadError(f"the engine stopped after an internal error: {e!r}")
            for stream in list(self._streams.values()):
                stream.put(error)
            self._fail_inbox(error)
            if self.on_death is not None:
                self.on_death(e)

    def _drain_inbox(self) -> None:
        for item in self._pop_inbox():
            if item[0] == "add":
                _, request_id, prompt, params, done = item
                try:
                    self.engine.add_request(request_id, prompt, params)
                except Exception as e:  # only this request fails
                    if not isinstance(e, InvalidRequestError):  # not a validation message: log it, tell the client less
                        logger.error("request %s could not be added: %r", request_id, e, exc_info=e)
                        e = RequestFailedError("the engine could not accept this request")
                    self._streams.pop(request_id, None)
                    done.get_loop().call_soon_threadsafe(_set_exception, done, e)
                else:
                    done.get_loop().call_soon_threadsafe(_set_result, done)
            else:
                self.engine.abort_request(item[1])

    def _fail_inbox(self, error: BaseException) -> None:
        for item in self._pop_inbox():
            if item[0] == "add":
                done = item[4]
                done.get_loop().call_soon_threadsafe(_set_exception, done, error)

    def _pop_inbox(self):
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def stalled_s(self, step_timeout_s: float) -> float | None:
        """Seconds the loop has been stuck (in a step, or unable to go round) when that exceeds `step_timeout_s`,
        else None. An idle loop goes round every half second, so only a loop with work can be stalled."""
        stuck = time.monotonic() - self.loop_alive_s
        return stuck if stuck > step_timeout_s else None

    def end_all(self, error: BaseException) -> int:
        """From any thread: end every open stream with `error` (their requests are aborted as their handlers leave).
        Returns how many there were. The drain uses it when the shutdown timeout has passed."""
        streams = list(self._streams.values())
        for stream in streams:
            stream.put(error)
        return len(streams)

    def _update_gauges(self) -> None:
        scheduler = self.engine.scheduler
        self.num_running = len(scheduler.running)
        self.num_waiting = len(scheduler.waiting)
        self.kv_cache_usage = self.engine.kv_cache.usage


def _deliver(items: list[tuple[OutputStream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.offer(output)


def _set_result(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
