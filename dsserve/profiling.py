"""Where a step's time goes: named sections timed with perf_counter, off (one attribute check) unless enabled.

`dsserve bench latency --profile` turns it on and prints the per-step table. Sections nest (attention runs
inside model); the report gives each section's mean per step and its share of the step. On CUDA each
section synchronizes the device at its ends, so timings are honest there too (and slower: profile only).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


class StepProfiler:
    def __init__(self) -> None:
        self.enabled = False
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.steps = 0
        self._sync = None

    def start(self, synchronize=None) -> None:
        """Begin collecting; `synchronize` (e.g. torch.cuda.synchronize) is called at section ends."""
        self.totals.clear()
        self.calls.clear()
        self.steps = 0
        self._sync = synchronize
        self.enabled = True

    def stop(self) -> None:
        self.enabled = False

    @contextmanager
    def section(self, name: str):
        if not self.enabled:
            yield
            return
        if self._sync:
            self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.totals[name] += time.perf_counter() - started
            self.calls[name] += 1

    def step_done(self) -> None:
        if self.enabled:
            self.steps += 1

    def report(self, order: list[tuple[str, str]]) -> list[tuple[str, float, float]]:
        """[(label, ms per step, share of the step)] for the (name, label) pairs given, then 'other'."""
        steps = max(self.steps, 1)
        step_total = self.totals.get("step", 0.0)
        rows = []
        for name, label in order:
            seconds = self.totals.get(name, 0.0)
            rows.append((label, 1000 * seconds / steps, seconds / step_total if step_total else 0.0))
        return rows


PROFILER = StepProfiler()

PROFILE_SECTIONS = [
    ("schedule", "scheduling (incl. block tables)"),
    ("prepare", "step inputs (ids, positions, slots, masks)"),
    ("model", "model forward"),
    ("attention", "  of which attention"),
    ("fused_layers", "  of which all layers in one C call"),
    ("logits", "LM head (logits)"),
    ("sample", "sampling"),
    ("update", "output bookkeeping"),
    ("detokenize", "  of which detokenizing"),
]


def profile_rows() -> list[tuple[str, float, float]]:
    """The profiled steps: [(section, ms per step, share)], with the unaccounted rest and the whole step."""
    rows = PROFILER.report(PROFILE_SECTIONS)
    steps = max(PROFILER.steps, 1)
    step_ms = 1000 * PROFILER.totals.get("step", 0.0) / steps
    top_level = sum(ms for label, ms, _ in rows if not label.startswith("  "))
    rest = max(step_ms - top_level, 0.0)
    return rows + [("other (Python between sections)", rest, rest / step_ms if step_ms else 0.0),
                   ("whole decode step", step_ms, 1.0 if step_ms else 0.0)]
