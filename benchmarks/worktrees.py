"""Commits side by side for a benchmark: each one checked out into a temporary git worktree, and a probe run
there with that commit's own package on PYTHONPATH (benchmarks/ab.py, load_memory.py, prefill.py)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def checked_out(commits: dict[str, str | None]) -> Iterator[dict[str, Path]]:
    """name -> commit (None: this working tree as it is) gives name -> folder; the worktrees are removed after."""
    with tempfile.TemporaryDirectory() as tmp:
        trees, made = {}, []
        try:
            for name, rev in commits.items():
                if rev is None:
                    trees[name] = REPO
                    continue
                folder = Path(tmp) / f"tree{len(made)}"
                subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(folder), rev],
                               check=True)
                made.append(folder)
                trees[name] = folder
            yield trees
        finally:
            for folder in made:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder)], check=False)


def run_probe(tree: Path, code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run `python -c code args` in `tree` with its package (and `env` added to the environment), and return the
    JSON object of its last output line."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=tree, capture_output=True, text=True,
                          env={**os.environ, **(env or {}), "PYTHONPATH": str(tree)})
    if done.returncode != 0:
        raise SystemExit(f"the probe failed in {tree} (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
