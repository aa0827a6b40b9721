"""The metrics' request bookkeeping, without a server: what counts as an aborted request."""

from types import SimpleNamespace

from dsserve.server.metrics import Metrics


def test_only_started_unfinished_requests_count_as_aborted():
    metrics = Metrics(SimpleNamespace(observers=[]), "m")
    metrics.arrived("left", 1.0)
    metrics.forget("left", aborted=True)  # its client went away mid-stream
    metrics.forget("left", aborted=True)  # forgetting twice counts once
    metrics.forget("never-arrived", aborted=True)
    metrics.arrived("done", 1.0)
    metrics.forget("done", aborted=False)  # finished normally (or rejected before it started)
    assert metrics.finished == {"abort": 1}


def _output(rid: str, tokens: int, finish: str | None = None, prompt: int = 4):
    completion = SimpleNamespace(token_ids=list(range(tokens)), finish_reason=finish)
    return SimpleNamespace(request_id=rid, outputs=[completion], prompt_token_ids=[0] * prompt,
                           finished=finish is not None)


def _count(histogram) -> float:
    return next(s.value for m in histogram.collect() for s in m.samples if s.name.endswith("_count"))


def test_a_step_s_outputs_are_observed_together():
    """One call per engine step: first outputs give TTFT and prompt tokens, later ones ITL per new token, finished
    ones E2E and their reason; a request seen twice in one step counts its new tokens once."""
    metrics = Metrics(SimpleNamespace(observers=[]), "m")
    metrics.arrived("a", 0.0)
    metrics.arrived("b", 0.0)
    metrics.observe([_output("a", 1), _output("b", 1)], 1.0)  # both requests' first tokens
    assert (metrics.prompt_tokens, metrics.generation_tokens, _count(metrics.ttft)) == (8, 2, 2)
    metrics.observe([_output("a", 3), _output("b", 2, "length")], 2.0)
    assert metrics.generation_tokens == 5 and _count(metrics.itl) == 2
    assert metrics.finished == {"length": 1} and _count(metrics.e2e) == 1
    metrics.observe([_output("a", 4), _output("a", 4, "stop")], 3.0)  # the same request twice in one step
    assert metrics.generation_tokens == 6 and metrics.finished == {"length": 1, "stop": 1}
    assert metrics._last == {} and metrics._arrivals == {}
