"""One long prompt's prefill at a real shape (random bf16 weights, built once), with its attention's share.

    python benchmarks/prefill.py --shape r1-distill-qwen-1.5b
    python benchmarks/prefill.py --shape deepseek-v2-lite --layers 4 --before 565534a --rounds 2

Each run loads the model in a fresh process with defaults (bf16 weights on AMX, float32 compute) and
`max_num_batched_tokens` = the prompt, so the whole prompt is one step; it prints the best of two prompts after a
warm-up (tokens/s and seconds), the profiler's attention time of one more, and the sampled token (which must agree
between commits). `--before REV` alternates with that commit, from a temporary git worktree.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import compare
from worktrees import checked_out, run_probe

PROBE = r"""
import json, sys, time
import torch
from dsserve import LLM, SamplingParams
from dsserve.profiling import PROFILER, profile_rows
length = int(sys.argv[2])
llm = LLM(sys.argv[1], max_model_len=length + 64, kv_cache_memory="1GiB", max_num_batched_tokens=length,
          enable_prefix_caching=False)
prompt = torch.randint(10, int(sys.argv[3]), (length,), generator=torch.Generator().manual_seed(0)).tolist()
params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
llm.generate([prompt[:64]], params)
times = []
for _ in range(2):
    start = time.perf_counter()
    out = llm.generate([prompt], params)
    times.append(time.perf_counter() - start)
PROFILER.start()
llm.generate([prompt], params)
PROFILER.stop()
rows = {label.strip(): ms for label, ms, _ in profile_rows()}
print(json.dumps({"seconds": min(times), "attention_s": rows.get("of which attention", 0) / 1000,
                  "token": out[0].outputs[0].token_ids}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="r1-distill-qwen-1.5b", choices=list(compare.SHAPES))
    ap.add_argument("--layers", type=int, help="decoder layers (default: the shape's own)")
    ap.add_argument("--checkpoint", type=Path, help="where the checkpoint is kept (built there when absent)")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--before", help="also run this commit, alternated")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    checkpoint = args.checkpoint or Path(tempfile.gettempdir()) / f"dsserve-{args.shape}-{args.layers or 'all'}"
    if not (checkpoint / "config.json").exists():
        compare.build(args.shape, checkpoint, layers=args.layers)
    print(f"# {args.shape}, {args.layers or 'all'} layers, one {args.length}-token prompt")
    print("| commit | prefill tok/s | seconds | of which attention | token |\n|---|---|---|---|---|")
    commits = {args.before: args.before} if args.before else {}
    with checked_out({**commits, "this tree": None}) as trees:
        for _ in range(args.rounds):
            for name, tree in trees.items():
                vocab = min(100_000, compare.SHAPES[args.shape]["vocab_size"])  # prompt ids drawn below it
                r = run_probe(tree, PROBE, str(checkpoint), str(args.length), str(vocab))
                print(f"| {name} | {args.length / r['seconds']:.0f} | {r['seconds']:.2f} | {r['attention_s']:.2f} s | "
                      f"{r['token']} |", flush=True)

if __name__ == "__main__":
    main()
