"""freeze_startup_heap: what a serving process has loaded at start-up is out of the garbage collector's passes."""

import subprocess
import sys

# In a child process: freezing is process-wide, and the test process must keep collecting its own garbage.
_CHILD = r"""
import gc
import sys

from dsserve.runner.model_runner import freeze_startup_heap
import torch  # noqa: F401  (a serving process's heap: torch and the rest of the modules)

startup = [[i] for i in range(100_000)]  # long-lived objects, as a model's Python objects
tracked = len(gc.get_objects())
freeze_startup_heap()
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
