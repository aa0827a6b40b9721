"""The CPU linear kernels dsserve can pack weights for, on a model's worth of weights read in turn (as a decode
step reads them: from memory, not from cache).

    python benchmarks/cpu_linears.py                      # Qwen2-shaped: hidden 512, 8 layers, vocab 32000
    python benchmarks/cpu_linears.py --rows 1 4 16 64 --hidden 1536 --intermediate 8960 --layers 28 --vocab 151936

For each batch size (rows, M): one pass over every layer's q/k/v, o, gate/up and down weights and the LM head
through F.linear (MKL, fp32), oneDNN's packed fp32 weights, FBGEMM's packed fp16 weights and dsserve's own
fp16 kernel (backends/cpu/csrc/linear_f16.c; what `backends/cpu/packing.py: PackedLinear` calls, FBGEMM where it cannot be built);
then DeepSeek-style routed experts, one matmul pair per expert.
Prints ms per pass, best of --repeats.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dsserve.backends.cpu import kernels as cpu_kernels

_HINT = 64  # as layers/linear.py packs oneDNN weights


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best * 1000


def _kernels(weights: list[torch.Tensor]) -> dict[str, list]:
    """name -> one callable per weight, taking x (M, K)."""
    plain = [lambda x, w=w: F.linear(x, w) for w in weights]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, _HINT) for w in weights]
    fp16 = [torch.ops.quantized.linear_prepack_fp16(w, None) for w in weights]
    own = {}
    if cpu_kernels.linear_f16_usable():
        own = {"dsserve fp16 kernel": [lambda x, p=cpu_kernels.pack_f16(w), n=w.shape[0]: cpu_kernels.linear_f16(x, p, n)
                                       for w in weights]}
    return {
        "F.linear fp32": plain,
        "oneDNN fp32 packed": [lambda x, p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                               for p in onednn],
        "FBGEMM fp16 packed": [lambda x, p=p: torch.ops.quantized.linear_dynamic_fp16(x, p) for p in fp16],
        **own,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64], help="batch sizes (M)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=48, help="routed expert pairs (DeepSeek-shaped: 3 layers x 16)")
    ap.add_argument("--expert-intermediate", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    h, i = args.hidden, args.intermediate
    head_dim = h // args.heads
    shapes = [(h + 2 * args.kv_heads * head_dim, h), (h, h), (2 * i, h), (h, i)] * args.layers + [(args.vocab, h)]
    weights = [torch.randn(n, k) * 0.02 for n, k in shapes]
    megabytes = sum(w.numel() for w in weights) * 4 / 1e6
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}; "
          f"{len(weights)} matrices, {megabytes:.0f} MB in fp32")
    kernels = _kernels(weights)
    print("| rows | " + " | ".join(kernels) + " |\n|---|" + "---|" * len(kernels))
    for m in args.rows:
        inputs = {k: torch.randn(m, k) for k in {k for _, k in shapes}}
        cells = [_best(lambda calls=calls: [f(inputs[w.shape[1]]) for f, w in zip(calls, weights)], args.repeats)
                 for calls in kernels.values()]
        print(f"| {m} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    if args.experts:
        ei = args.expert_intermediate
        up = [torch.randn(2 * ei, h) * 0.02 for _ in range(args.experts)]
        down = [torch.randn(h, ei) * 0.02 for _ in range(args.experts)]
        up_k, down_k = _kernels(up), _kernels(down)
        print(f"\n{args.experts} routed experts ({h} -> {2 * ei}, {ei} -> {h}), ms per pass, by tokens per expert:")
        print("| tokens | " + " | ".join(up_k) + " |\n|---|" + "---|" * len(up_k))
        for m in args.rows:
            x, y = torch.randn(m, h), torch.randn(m, ei)
            cells = [_best(lambda a=up_k[name], b=down_k[name]: [(f(x), g(y)) for f, g in zip(a, b)], args.repeats)
                     for name in up_k]
            print(f"| {m} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
