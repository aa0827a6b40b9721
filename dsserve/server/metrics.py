"""Prometheus metrics under vLLM's names (label model_name), so existing Grafana dashboards work unchanged."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dsserve.engine.async_engine import AsyncEngine
from dsserve.engine.engine import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class Metrics:
    """Observes engine outputs (on the engine thread) and serves gauges read at scrape time."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(self)
        labels = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self._arrivals: dict[str, float] = {}
        self._last: dict[str, tuple[float, int]] = {}  # request -> (time of its last token, tokens so far)
        self._lock = threading.Lock()
        self.http_requests: dict[tuple[str, str, str], int] = {}  # (key name, route, status) -> count (event loop)
        self.rate_limits: dict[str, int] = {}  # key name -> 429s
        self.seconds_since_last_step = lambda: 0.0  # set by the server state
        engine.observers.append(self.observe)

    def http_request(self, key_name: str | None, route: str, status: int) -> None:
        label = (key_name or "", route, str(status))
        self.http_requests[label] = self.http_requests.get(label, 0) + 1

    def rate_limited(self, key_name: str) -> None:
        self.rate_limits[key_name] = self.rate_limits.get(key_name, 0) + 1

    def arrived(self, request_id: str, now: float) -> None:
        self._arrivals[request_id] = now

    def forget(self, request_id: str, aborted: bool = False) -> None:
        """Drop a request's timing state; `aborted`: it ended unfinished (its client left, or the engine failed), so
        it counts as finished_reason "abort", as vLLM counts it (a rejected request never started: not counted)."""
        with self._lock:
            if self._arrivals.pop(request_id, None) is not None and aborted:
                self.finished["abort"] = self.finished.get("abort", 0) + 1
            self._last.pop(request_id, None)

    def observe(self, outputs: list[RequestOutput], now: float) -> None:
        """One engine step's outputs, on the engine thread: its time is the step's, so one lock per step."""
        last, arrivals = self._last, self._arrivals
        with self._lock:
            for output in outputs:
                rid = output.request_id
                num_tokens = sum(len(c.token_ids) for c in output.outputs)
                previous = last.get(rid)
                arrival = arrivals.get(rid)
                if previous is None:
                    self.prompt_tokens += len(output.prompt_token_ids)
                    if arrival is not None:
                        self.ttft.observe(now - arrival)
                    new = num_tokens
                else:
                    new = num_tokens - previous[1]
                    if new > 0:
                        self.itl.observe((now - previous[0]) / new)
                self.generation_tokens += max(new, 0)
                if output.finished:
                    if arrival is not None:
                        self.e2e.observe(now - arrival)
                    for c in output.outputs:
                        self.finished[c.finish_reason or "abort"] = self.finished.get(c.finish_reason or "abort", 0) + 1
                    arrivals.pop(rid, None)
                    last.pop(rid, None)
                else:
                    last[rid] = (now, num_tokens)

    def collect(self):
        name = [self.model_name]
        for metric, doc, value in (
            ("vllm:num_requests_running", "Requests in the running batch", self.engine.num_running),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled", self.engine.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 1 means 100 percent", self.engine.kv_cache_usage),
        ):
            gauge = GaugeMetricFamily(metric, doc, labels=["model_name"])
            gauge.add_metric(name, value)
            yield gauge
        for metric, doc, value in (
            ("vllm:prompt_tokens", "Prefill tokens processed", self.prompt_tokens),
            ("vllm:generation_tokens", "Generation tokens processed", self.generation_tokens),
            ("vllm:num_preemptions", "Preemptions by the scheduler", self.engine.engine.scheduler.num_preemptions),
        ):
            counter = CounterMetricFamily(metric, doc, labels=["model_name"])
            counter.add_metric(name, value)
            yield counter
        success = CounterMetricFamily("vllm:request_success", "Finished requests by reason",
                                      labels=["model_name", "finished_reason"])
        for reason, count in sorted(self.finished.items()):
            success.add_metric([self.model_name, reason], count)
        yield success
        requests = CounterMetricFamily("dsserve:http_requests", "HTTP requests by API key name (empty: no keys "
                                       "configured), route and status", labels=["key_name", "route", "status"])
        for (key_name, route, status), count in sorted(self.http_requests.items()):
            requests.add_metric([key_name, route, status], count)
        yield requests
        limited = CounterMetricFamily("dsserve:rate_limited_requests", "Requests refused with 429 by API key name",
                                      labels=["key_name"])
        for key_name, count in sorted(self.rate_limits.items()):
            limited.add_metric([key_name], count)
        yield limited
        since = GaugeMetricFamily("dsserve:seconds_since_last_step", "Seconds since the engine last finished a step "
                                  "(since start before the first)", labels=["model_name"])
        since.add_metric(name, self.seconds_since_last_step())
        yield since
        blocks = GaugeMetricFamily("dsserve:kv_cache_free_blocks", "Free KV-cache blocks", labels=["model_name"])
        blocks.add_metric(name, self.engine.engine.kv_cache.pool.num_free)
        yield blocks
        total = GaugeMetricFamily("dsserve:kv_cache_total_blocks", "KV-cache blocks", labels=["model_name"])
        total.add_metric(name, self.engine.engine.kv_cache.num_blocks)
        yield total
