"""Two commits of dsserve against each other, alternated in one run: compare.py's offline throughput and batch-1
latency, and online_vs_offline.py's online/offline ratio, each round running the baseline then the candidate.

    python benchmarks/ab.py --before 565534a --rounds 3
    python benchmarks/ab.py --before 565534a --after HEAD --engines dsserve dsserve-bf16-f16kv --models qwen2 deepseek

Each commit is checked out once into a temporary git worktree and run with its own benchmark scripts, its own
package (PYTHONPATH) and the same arguments, so a change of the engine is all that differs. Prints best and median
per commit and the candidate's median as a share of the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from worktrees import checked_out


def run(tree: Path, script: str, args: list[str], out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, str(tree / "benchmarks" / script), *args], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL if script == "compare.py" else None)
    if not out.exists():
        raise SystemExit(f"{script} in {tree} wrote no results")


def online_ratio(tree: Path, args, log: Path) -> dict[str, float]:
    """online_vs_offline.py's summary lines: the online / offline ratio per model."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(tree / "benchmarks" / "online_vs_offline.py"), "--rounds", "1",
                           "--models", *args.models, "--num-prompts", str(args.num_prompts)],
                          cwd=tree, env=env, check=True, capture_output=True, text=True)
    log.write_text(done.stdout)
    ratios = {}
    for line in done.stdout.splitlines():  # "round 1 qwen2: --stream-interval 1: online 812.3 tok/s (0.93 of offline); ..."
        if ": --stream-interval " in line and " of offline)" in line:
            model = line.split(":")[0].split()[-1]
            ratios[model] = float(line.split(" of offline)")[0].rsplit("(", 1)[1])
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the baseline commit")
    ap.add_argument("--after", default="HEAD", help="the candidate commit (default HEAD)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["qwen2", "deepseek"])
    ap.add_argument("--engines", nargs="+", default=["dsserve", "dsserve-bf16-f16kv"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--online", action="store_true", help="also online_vs_offline.py's ratio, one per round")
    args = ap.parse_args()
    rows: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, checked_out({"before": args.before, "after": args.after}) as trees:
        for round_ in range(args.rounds):
            for name, tree in trees.items():
                out = Path(tmp) / f"{name}-{round_}.json"
                run(tree, "compare.py", ["--models", *args.models, "--engines", *args.engines, "--repeats", "1",
                                         "--num-prompts", str(args.num_prompts), "--json", str(out)], out)
                for r in json.loads(out.read_text()):
                    rows.setdefault((r["model"], r["engine"], "output tok/s", name), []).append(r["best_tok_s"])
                    rows.setdefault((r["model"], r["engine"], "batch-1 ms/token", name), []).append(
                        r["batch1_ms_per_token"])
                if args.online:
                    for model, ratio in online_ratio(tree, args, Path(tmp) / f"{name}-{round_}.log").items():
                        rows.setdefault((model, "online/offline", "ratio", name), []).append(ratio)
                print(f"# round {round_ + 1}, {name} done", flush=True)
    print(f"\n{args.before} (before) vs {args.after} (after), {args.rounds} rounds alternated\n")
    print("| model | engine | metric | before best | before median | after best | after median | after / before (median) |")
    print("|---|---|---|---|---|---|---|---|")
    keys = sorted({key[:3] for key in rows})
    for model, engine, metric in keys:
        before, after = rows.get((model, engine, metric, "before"), []), rows.get((model, engine, metric, "after"), [])
        if not before or not after:
            continue
        lower_is_better = metric.startswith("batch-1")
        best = min if lower_is_better else max
        share = statistics.median(after) / statistics.median(before)
        print(f"| {model} | {engine} | {metric} | {best(before)} | {statistics.median(before):.4g} | {best(after)} | "
              f"{statistics.median(after):.4g} | {share:.3f} |")


if __name__ == "__main__":
    main()
