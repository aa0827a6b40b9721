"""The machine's own limits, against which docs/benchmarks.md reads every real-shape figure: memory bandwidth
(read and copy, GB/s) and bf16 matmul throughput (TFLOP/s), on all threads (OMP_NUM_THREADS sets how many).

    python benchmarks/machine.py
    OMP_NUM_THREADS=1 python benchmarks/machine.py --shape deepseek-v2-lite    # one core

- **read**: one row through dsserve's bf16 GEMV over 1 GiB of packed weights (what a batch-1 decode step does with
  its weights: stream them once); without the AMX kernel, the sum of a 1 GiB float32 tensor.
- **copy**: `dst.copy_(src)` of 1 GiB (bytes read + bytes written).
- **bf16 GEMM, weights in cache**: dsserve's AMX kernel (backends/cpu/csrc/linear_bf16.c) on 2048 rows times a
  1024 x 1024 weight (2 MiB, in cache across calls).
- **bf16 GEMM at the shape's linears**: that kernel, and oneDNN's packed bf16 matmul (torch's mkldnn linear on
  bf16 activations; what vLLM's CPU build calls), on `--rows` rows times each weight of one decoder layer of
  `--shape` (random values), best of --repeats. dsserve's gate_up row is its fused SwiGLU kernel, as the model
  runs it (the (M, 2I) product is not written).
"""

from __future__ import annotations

import argparse

import torch

import compare
from cpu_linears import _best as _best_ms


def _best(fn, repeats: int) -> float:
    """The best of `repeats` calls of fn, in seconds (cpu_linears' timer gives milliseconds)."""
    return _best_ms(fn, repeats) / 1000
from dsserve.backends.cpu import kernels as cpu_kernels


def bandwidth(repeats: int) -> dict[str, float]:
    src = torch.ones(256 * 1024 * 1024)  # 1 GiB
    dst = torch.empty_like(src)
    size = src.numel() * 4
    if cpu_kernels.linear_bf16_usable():
        rows, depth = 32768, 16384  # 1 GiB of bf16 weights
        packed = cpu_kernels.pack_bf16(torch.zeros(rows, depth, dtype=torch.bfloat16))
        x = torch.randn(1, depth)
        read = packed.nbytes / _best(lambda: cpu_kernels.linear_bf16(x, packed, rows), repeats)
    else:
        read = size / _best(lambda: src.sum(), repeats)
    return {"read GB/s": read / 1e9, "copy GB/s": 2 * size / _best(lambda: dst.copy_(src), repeats) / 1e9}


def layer_weights(shape: str) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of one decoder layer's linears (the dense MLP where the shape has one)."""
    s = compare.SHAPES[shape]
    hidden, inter = s["hidden_size"], s["intermediate_size"]
    heads, kv_heads = s["num_attention_heads"], s["num_key_value_heads"]
    if "kv_lora_rank" not in s:
        head_dim = hidden // heads
        return {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, heads * head_dim),
                "gate_up": (2 * inter, hidden), "down": (hidden, inter)}
    qk_head = s["qk_nope_head_dim"] + s["qk_rope_head_dim"]
    q = {"q": (heads * qk_head, hidden)} if not s.get("q_lora_rank") else {
        "q_a": (s["q_lora_rank"], hidden), "q_b": (heads * qk_head, s["q_lora_rank"])}
    return {**q, "kv_a": (s["kv_lora_rank"] + s["qk_rope_head_dim"], hidden),
            "kv_b": (heads * (s["qk_nope_head_dim"] + s["v_head_dim"]), s["kv_lora_rank"]),
            "o": (hidden, heads * s["v_head_dim"]), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}


def gemm(rows: int, shape: str, repeats: int) -> list[dict]:
    out = []
    tiles_ok = cpu_kernels.linear_bf16_usable()
    if tiles_ok:
        w = cpu_kernels.pack_bf16(torch.randn(1024, 1024))
        x = torch.randn(2048, 1024)
        seconds = _best(lambda: [cpu_kernels.linear_bf16(x, w, 1024) for _ in range(5)], repeats) / 5
        out.append({"linear": "weights in cache: 2048 x 1024 -> 1024",
                    "dsserve TFLOP/s": 2 * 2048 * 1024 * 1024 / seconds / 1e12})
    for name, (n, k) in layer_weights(shape).items():
        weight = torch.randn(n, k) * 0.02
        x = torch.randn(rows, k)
        flops = 2 * rows * n * k
        row = {"linear": f"{name} ({rows} x {k} -> {n})"}
        if tiles_ok:
            packed = cpu_kernels.pack_bf16(weight)
            if name == "gate_up":
                into = torch.empty(rows, n // 2)
                run = lambda: cpu_kernels.linear_bf16_swiglu(x, packed, n // 2, out=into)  # noqa: E731
            else:
                run = lambda: cpu_kernels.linear_bf16(x, packed, n)  # noqa: E731
            row["dsserve TFLOP/s"] = flops / _best(run, repeats) / 1e12
        onednn = torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16(), rows)
        xb = x.bfloat16()
        row["oneDNN TFLOP/s"] = flops / _best(
            lambda: torch.ops.mkldnn._linear_pointwise(xb, onednn, None, "none", [], ""), repeats) / 1e12
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="r1-distill-qwen-1.5b", choices=list(compare.SHAPES))
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"bf16 linears: {cpu_kernels.status().paths()['linears']}")
    for key, value in bandwidth(args.repeats).items():
        print(f"{key}: {value:.1f}")
    print(f"\n{args.shape}\n| linear | dsserve TFLOP/s | oneDNN TFLOP/s |\n|---|---|---|")
    for r in gemm(args.rows, args.shape, args.repeats):
        cells = [f"{r[key]:.2f}" if key in r else "-" for key in ("dsserve TFLOP/s", "oneDNN TFLOP/s")]
        print(f"| {r['linear']} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
