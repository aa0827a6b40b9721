"""Batch-1 GEMV bandwidth of the quantized linears (csrc/linear_quant.c, linear_fp8.c for fp8) against the bf16 GEMV (csrc/linear_bf16.c),
over a model's worth of weights read in turn, as a decode step reads them (from memory, not from cache).

    python benchmarks/cpu_quant_gemv.py                   # R1-Distill-Qwen-1.5B's shapes, all 28 layers + LM head
    python benchmarks/cpu_quant_gemv.py --layers 8 --formats bf16 int8 int4 fp8
    python benchmarks/cpu_quant_gemv.py --threads 1 --cpu-time     # a busy machine: one core, this process's time

One format at a time (its weights built from random float32 one matrix at a time, the float copy dropped): one
pass over every layer's q/k/v, o, gate/up and down, then the LM head alone. Prints, best of --repeats, ms per pass
and GB/s of packed bytes read (weights + scales). --cpu-time times by this process's CPU time instead of the wall
clock, so that time the process spends descheduled on a shared machine does not count (with one thread only: idle
OpenMP threads spin, and their spinning would count).
"""

from __future__ import annotations

import argparse
import time

import torch

from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.formats.quantization import QuantScheme


def _best(fn, repeats: int, clock=time.perf_counter) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = clock()
        fn()
        best = min(best, clock() - started)
    return best


def _packed(shape: tuple[int, int], form: str):
    """(callable taking x (1, K), packed bytes) for one random weight of `shape` in `form`."""
    n, k = shape
    weight = torch.randn(n, k) * 0.02
    if form == "bf16":
        packed = cpu_kernels.pack_bf16(weight)
        return (lambda x: cpu_kernels.linear_bf16(x, packed, n)), packed.nbytes
    panels = cpu_kernels.pack_quantized(QuantScheme.parse(form).quantize(weight))
    if form == "fp8":  # csrc/linear_fp8.c
        return (lambda x: cpu_kernels.linear_fp8(x, panels, n)), panels.nbytes
    return (lambda x: cpu_kernels.linear_quant(x, panels, n)), panels.nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=8960)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4", "int4-zp", "int4-g128"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, help="torch / OpenMP threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true", help="time by process CPU time (needs --threads 1)")
    args = ap.parse_args()
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time needs --threads 1: idle OpenMP threads spin, and their spinning would count")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    if not cpu_kernels.linear_quant_usable() or ("bf16" in args.formats and not cpu_kernels.linear_bf16_usable()):
        raise SystemExit("needs the kernel library with linear_quant.c (AVX-512) and linear_bf16.c (AMX) built")
    torch.manual_seed(0)
    h, i = args.hidden, args.intermediate
    head_dim = h // args.heads
    layer = [(h + 2 * args.kv_heads * head_dim, h), (h, h), (2 * i, h), (h, i)]
    inputs = {k: torch.randn(1, k) for k in (h, i)}
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}; {args.layers} layers of {layer}, "
          f"LM head ({args.vocab}, {h}); {'process CPU time' if args.cpu_time else 'wall clock'}")
    print("| format | layers ms | layers GB/s | layers MB | head ms | head GB/s | head MB |\n|---|---|---|---|---|---|---|")
    for form in args.formats:
        calls, total = [], 0
        for shape in layer * args.layers:
            fn, nbytes = _packed(shape, form)
            calls.append((fn, inputs[shape[1]]))
            total += nbytes
        seconds = _best(lambda: [fn(x) for fn, x in calls], args.repeats, clock)
        del calls
        head, head_bytes = _packed((args.vocab, h), form)
        head_seconds = _best(lambda: head(inputs[h]), args.repeats, clock)
        del head
        print(f"| {form} | {seconds * 1e3:.2f} | {total / seconds / 1e9:.1f} | {total / 1e6:.0f} | "
              f"{head_seconds * 1e3:.2f} | {head_bytes / head_seconds / 1e9:.1f} | {head_bytes / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
