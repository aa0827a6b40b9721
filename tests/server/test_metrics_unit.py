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
