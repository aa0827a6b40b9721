"""freeze_startup_heap: what a serving process has loaded at start-up is out of the garbage collector's passes."""

import subprocess
import sys
import types

# In a child process: freezing is process-wide, and the test process must keep collecting its own garbage.
_CHILD = r"""
import gc
import sys

from dsserve.runner.model_runner import freeze_startup_heap
import torch  # noqa: F401  (a serving process's heap: torch and the rest of the modules)

import weakref


class Node:
    pass


startup = [[i] for i in range(100_000)]  # long-lived objects, as a model's Python objects
garbage = Node()
garbage.self = garbage  # a cycle left over from start-up: collected first, never frozen
dead = weakref.ref(garbage)
del garbage
tracked = len(gc.get_objects())
freeze_startup_heap()
assert dead() is None
assert gc.isenabled()
assert gc.get_freeze_count() >= tracked // 2, (gc.get_freeze_count(), tracked)
after = len(gc.get_objects())
assert after < tracked // 20, (after, tracked)  # a full pass now walks a few objects, not the startup heap

cycle = []  # garbage made after the freeze is still collected
cycle.append(cycle)
del cycle
assert gc.collect() >= 1
print("ok", tracked, after)
"""


def test_startup_heap_is_frozen_and_later_garbage_still_collected():
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_a_worker_rank_freezes_its_heap_once_the_model_is_loaded(monkeypatch):
    from dsserve.runner import worker

    calls = []

    class Runner:
        def __init__(self, config):
            calls.append("load")

        def serve_steps(self):
            calls.append("serve")

        def shutdown(self):
            calls.append("shutdown")

    monkeypatch.setattr(worker, "ModelRunner", Runner)
    monkeypatch.setattr(worker, "freeze_startup_heap", lambda: calls.append("freeze"))
    config = types.SimpleNamespace(parallel=types.SimpleNamespace(rank=1))
    assert worker.run_worker(config) == 0
    assert calls == ["load", "freeze", "serve", "shutdown"]
