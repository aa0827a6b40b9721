"""One long prompt's prefill at a real shape (random bf16 weights, built once), with its attention's share.

    python benchmarks/prefill.py --shape r1-distill-qwen-1.5b
    python benchmarks/prefill.py --shape deepseek-v2-lite --layers 4 --before 565534a --rounds 2
    python benchmarks/prefill.py --shape r1-distill-qwen-1.5b --ops     # where the prompt's time goes, by op
    python benchmarks/prefill.py --shape r1-distill-qwen-1.5b --quantization none w8a8 --rounds 2

Each run loads the model in a fresh process with defaults (bf16 weights on AMX, float32 compute) and
`max_num_batched_tokens` = the prompt, so the whole prompt is one step; it prints the best of two prompts after a
warm-up (tokens/s and seconds), the profiler's attention time of one more, and the sampled token (which must agree
between commits). `--before REV` alternates with that commit, from a temporary git worktree. `--ops` also times
every CPU backend op of one more prompt (wall time inside the op, the linears with their TFLOP/s) and prints the
table for this tree. `--quantization` runs each named form (`none`: the default weights) in turn, alternated.
"""

from __future__ import annotations

import argparse

import compare
from worktrees import checked_out, run_probe

PROBE = r"""
import collections, json, sys, time
import torch
from dsserve import LLM, SamplingParams
from dsserve.profiling import PROFILER, profile_rows
length = int(sys.argv[2])
llm = LLM(sys.argv[1], max_model_len=length + 64, kv_cache_memory="1GiB", max_num_batched_tokens=length,
          enable_prefix_caching=False, quantization=None if sys.argv[5] == "none" else sys.argv[5])
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
ops = {}
if sys.argv[4] == "ops":  # every op CpuBackend defines, timed around the call; linears keyed by shape, with FLOPs
    from dsserve.backends.cpu.backend import CpuBackend
    seconds, flops = collections.defaultdict(float), collections.defaultdict(float)
    def timed(name, method):
        def call(self, *args):  # (layer, x, ...); silu_and_mul takes (gate_up,) alone
            start = time.perf_counter()
            out = method(self, *args)
            key = name
            if name in ("linear", "gated_linear") and args[1].dim() == 2:
                x = args[1]
                n = out.shape[-1] * (2 if name == "gated_linear" else 1)
                key = f"{name} {x.shape[1]} -> {n}"
                flops[key] += 2 * x.shape[0] * x.shape[1] * n
            seconds[key] += time.perf_counter() - start
            return out
        return call
    for name, method in list(vars(CpuBackend).items()):
        if name in ("linear", "gated_linear", "silu_and_mul", "rms_norm", "rotary", "attention", "mla_attention",
                    "experts", "route", "embed"):
            setattr(CpuBackend, name, timed(name, method))
    start = time.perf_counter()
    llm.generate([prompt], params)
    total = time.perf_counter() - start
    ops = {"total_s": total, "ops": {k: [v, flops.get(k, 0.0) / v / 1e12 if k in flops else None]
                                     for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}}
print(json.dumps({"seconds": min(times), "attention_s": rows.get("of which attention", 0) / 1000,
                  "token": out[0].outputs[0].token_ids, **ops}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.shape_arguments(ap)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--before", help="also run this commit, alternated")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--ops", action="store_true", help="also time each backend op of one prompt (this tree)")
    ap.add_argument("--quantization", nargs="+", default=["none"], help="forms to run in turn (none: no quantization)")
    args = ap.parse_args()
    checkpoint = compare.shape_checkpoint(args)
    print(f"# {args.shape}, {args.layers or 'all'} layers, one {args.length}-token prompt")
    print("| commit | prefill tok/s | seconds | of which attention | token |\n|---|---|---|---|---|")
    commits = {args.before: args.before} if args.before else {}
    profiles = []
    with checked_out({**commits, "this tree": None}) as trees:
        for _ in range(args.rounds):
            for (name, tree), form in ((t, f) for t in trees.items() for f in args.quantization):
                vocab = min(100_000, compare.SHAPES[args.shape]["vocab_size"])  # prompt ids drawn below it
                ops = "ops" if args.ops and name == "this tree" else "-"
                r = run_probe(tree, PROBE, str(checkpoint), str(args.length), str(vocab), ops, form)
                label = name if form == "none" else f"{name}, {form}"
                print(f"| {label} | {args.length / r['seconds']:.0f} | {r['seconds']:.2f} | {r['attention_s']:.2f} s | "
                      f"{r['token']} |", flush=True)
                if r.get("ops"):
                    profiles.append((label, r))
    for label, profile in profiles[-len(args.quantization):]:  # the last round's, one per form
        print(f"\n# {label}, by op, one more prompt: {profile['total_s']:.2f} s\n"
              "| op | seconds | share | TFLOP/s |\n|---|---|---|---|")
        for key, (seconds, tflops) in profile["ops"].items():
            rate = f"{tflops:.2f}" if tflops is not None else ""
            print(f"| {key} | {seconds:.2f} | {seconds / profile['total_s']:.0%} | {rate} |")
        rest = profile["total_s"] - sum(seconds for seconds, _ in profile["ops"].values())
        print(f"| everything else | {rest:.2f} | {rest / profile['total_s']:.0%} | |")

if __name__ == "__main__":
    main()
