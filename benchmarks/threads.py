"""Thread count and binding per phase at a real shape: batch-1 decode, a batch of 16 decoding together, and one
long prompt's prefill, each configuration in a fresh process, alternated over --rounds.

    python benchmarks/threads.py --shape r1-distill-qwen-1.5b --rounds 2

Configurations: all cores unbound (the default), all cores bound one thread per core (OMP_PROC_BIND=close,
OMP_PLACES=cores: libgomp's binding, shared by torch and dsserve's kernels, which run in the same OpenMP
runtime), and one thread (`num_threads=1`); each on top of the caller's environment. Prints tokens/s per phase,
best of the rounds.
"""

from __future__ import annotations

import argparse

import compare
from worktrees import REPO, run_probe

PROBE = r"""
import json, sys, time
import torch
from dsserve import LLM, SamplingParams
threads = int(sys.argv[2]) or None
llm = LLM(sys.argv[1], max_model_len=2200, kv_cache_memory="1GiB", max_num_batched_tokens=2048,
          enable_prefix_caching=False, num_threads=threads)
g = torch.Generator().manual_seed(0)
vocab = int(sys.argv[3])
def ids(n):
    return torch.randint(10, vocab, (n,), generator=g).tolist()
def timed(prompts, tokens):
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - start
timed([ids(16)], 4)
# decode rates: the same prompts with 2 and with 34 new tokens; the difference is 32 decode steps
one = 32 / (timed([ids(128)], 34) - timed([ids(128)], 2))
batch = [ids(128) for _ in range(16)]
sixteen = 16 * 32 / (timed(batch, 34) - timed(batch, 2))
prefill = 2048 / timed([ids(2048)], 1)
print(json.dumps({"batch-1 decode": one, "16 decoding together": sixteen, "2048-token prefill": prefill}))
"""

CONFIGS = {
    "2 threads, unbound (default)": ("0", {}),
    "2 threads, one per core (OMP_PROC_BIND=close OMP_PLACES=cores)": ("0", {"OMP_PROC_BIND": "close",
                                                                            "OMP_PLACES": "cores"}),
    "1 thread": ("1", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.shape_arguments(ap)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    checkpoint = compare.shape_checkpoint(args)
    vocab = str(min(100_000, compare.SHAPES[args.shape]["vocab_size"]))
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for name, (threads, env) in CONFIGS.items():
            r = run_probe(REPO, PROBE, str(checkpoint), threads, vocab, env=env)
            best[name] = {k: max(v, best.get(name, {}).get(k, 0.0)) for k, v in r.items()}
            print(name, {k: round(v, 1) for k, v in r.items()}, flush=True)
    phases = list(next(iter(best.values())))
    print(f"\n# {args.shape}, {args.layers or 'all'} layers, tokens/s, best of {args.rounds}")
    print("| configuration | " + " | ".join(phases) + " |\n|---|" + "---|" * len(phases))
    for name, r in best.items():
        print(f"| {name} | " + " | ".join(f"{r[p]:.1f}" for p in phases) + " |")


if __name__ == "__main__":
    main()
