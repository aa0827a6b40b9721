"""Peak and final resident memory while dsserve loads a real-shape checkpoint (random bf16 weights, built once).

    python benchmarks/load_memory.py --shape r1-distill-qwen-1.5b
    python benchmarks/load_memory.py --shape deepseek-v2-lite --layers 4 --before 565534a

Each load runs in a fresh process (its peak is the process's ru_maxrss) with a 64 MiB KV cache, so the figures are
the weights' and the loading's own. `--before REV` also loads with that commit (from a temporary git worktree),
alternated with this tree, for a before / after table. Prints the checkpoint's size, each run's peak and final RSS,
the load time and the first generated tokens (which must agree between commits).
"""

from __future__ import annotations

import argparse

import compare
from worktrees import checked_out, run_probe

PROBE = r"""
import json, resource, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
start = time.perf_counter()
from dsserve import LLM, SamplingParams
llm = LLM(sys.argv[1], max_model_len=1024, kv_cache_memory="64MiB")
loaded = time.perf_counter() - start
out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "final": rss(),
                  "load_s": round(loaded, 1), "tokens": out[0].outputs[0].token_ids}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.shape_arguments(ap)
    ap.add_argument("--before", help="also load with this commit, alternated")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    checkpoint = compare.shape_checkpoint(args)
    size = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    print(f"# {args.shape}, {args.layers or 'all'} layers: {size / 2**30:.2f} GiB of safetensors")
    commits = {args.before: args.before} if args.before else {}
    with checked_out({**commits, "this tree": None}) as trees:
        for _ in range(args.rounds):
            for name, tree in trees.items():
                r = run_probe(tree, PROBE, str(checkpoint))
                print(f"| {name} | {r['peak'] / 2**30:.2f} GiB | {r['final'] / 2**30:.2f} GiB | {r['load_s']} s | "
                      f"{r['tokens']} |", flush=True)

if __name__ == "__main__":
    main()
