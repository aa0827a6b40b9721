"""Decode rate at a real shape (random bf16 weights), this tree against another commit, alternated.

    python benchmarks/decode.py --shape r1-distill-qwen-1.5b --before a913775
    python benchmarks/decode.py --shape deepseek-v2-lite --layers 8 --batch 16 --rounds 2
    python benchmarks/decode.py --checkpoint /work/peers/ckpt/r1-distill-qwen-1.5b --quantization none int8 int4 fp8
    python benchmarks/decode.py --shape r1-distill-qwen-1.5b --batch 16 --quantization none w8a8

Each run loads the model in a fresh process with defaults (bf16 weights on AMX), warms up, then takes the best of
3: `batch` prompts of 128 random token ids, decoded to 129 tokens each, minus the time of the same prompts to 1
token (so the prefill is not counted): decode tokens/s over the batch. The checkpoint is built as prefill.py
builds it (compare.py's shapes) where the folder has none. --quantization runs each form named (`none`: the
default weights) in turn, alternated with the commits.
"""

from __future__ import annotations

import argparse

import compare
from worktrees import checked_out, run_probe

PROBE = r"""
import json, sys, time, torch
from dsserve import LLM, SamplingParams

llm = LLM(sys.argv[1], **({"quantization": sys.argv[3]} if sys.argv[3] != "none" else {}))
g = torch.Generator().manual_seed(0)
prompts = [{"prompt_token_ids": torch.randint(100, 10000, (128,), generator=g).tolist()}
           for _ in range(int(sys.argv[2]))]

def run(n):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - start

run(8)
rates = []
for _ in range(3):
    first = run(1)
    rates.append(len(prompts) * 128 / (run(129) - first))
llm.shutdown()
print(json.dumps({"best": max(rates), "all": rates}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.shape_arguments(ap)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--before", help="also run this commit, alternated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quantization", nargs="+", default=["none"], metavar="FORM",
                    help="int8, int4, int4-g128, w8a8, fp8, ... or none (the default weights); several: each in turn")
    args = ap.parse_args()
    checkpoint = compare.shape_checkpoint(args)
    commits = {args.before: args.before} if args.before else {}
    commits["this tree"] = None
    print(f"# {checkpoint.name}, {args.layers or 'all'} layers, batch {args.batch}: decode tok/s, best of 3 per run")
    print("| commit | quantization | decode tok/s | the 3 |")
    print("|---|---|---|---|")
    with checked_out(commits) as trees:
        for _ in range(args.rounds):
            for name, tree in trees.items():
                for form in args.quantization:
                    got = run_probe(tree, PROBE, str(checkpoint), str(args.batch), form)
                    print(f"| {name} | {form} | {got['best']:.2f} | {' '.join(f'{r:.2f}' for r in got['all'])} |",
                          flush=True)


if __name__ == "__main__":
    main()
