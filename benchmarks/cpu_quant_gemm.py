"""Several-rows speed of the quantized linears against the bf16 AMX kernel (csrc/linear_bf16.c): w8a8 (csrc/linear_w8a8.c:
AMX int8 tiles, VNNI below W8A8_TILE_ROWS) and the weight-only int8 / int4 path (csrc/linear_quant.c), per layer
shape of a model and rows per call (prompt chunks, decode batches).

    python benchmarks/cpu_quant_gemm.py                              # R1-Distill-Qwen-1.5B's four linears
    python benchmarks/cpu_quant_gemm.py --rows 1 16 2048 --formats bf16 w8a8

Each (shape, rows) times every format in turn, --repeats rounds alternating them (the machine's load drifts), and
prints best and median ms and the best's TFLOP/s (2 M N K per call). Activations are float32 in and out for all:
the time includes bf16's rounding of x and w8a8's quantization of it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.formats.quantization import QuantScheme


def _linear(weight: torch.Tensor, form: str):
    n = weight.shape[0]
    if form == "bf16":
        packed = cpu_kernels.pack_bf16(weight)
        return lambda x: cpu_kernels.linear_bf16(x, packed, n)
    panels = cpu_kernels.pack_quantized(QuantScheme.parse(form).quantize(weight))
    if form == "w8a8":
        return lambda x: cpu_kernels.linear_w8a8(x, panels, n)
    return lambda x: cpu_kernels.linear_quant(x, panels, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=8960)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256, 2048])
    ap.add_argument("--formats", nargs="+", default=["bf16", "w8a8", "int8"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if not (cpu_kernels.linear_bf16_usable() and cpu_kernels.linear_w8a8_usable()):
        raise SystemExit("needs the kernel library with linear_bf16.c (AMX) and linear_w8a8.c (AVX512-VNNI) built")
    torch.manual_seed(0)
    h, i = args.hidden, args.intermediate
    shapes = {"qkv": (h + 2 * args.kv_heads * (h // args.heads), h), "o": (h, h), "gate_up": (2 * i, h),
              "down": (h, i)}
    status = cpu_kernels.status()
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}; w8a8 "
          f"{'AMX int8 tiles from ' + str(cpu_kernels.W8A8_TILE_ROWS) + ' rows' if status.w8a8_amx else 'VNNI only'}")
    print("| layer (N x K) | rows | " + " | ".join(f"{f} ms best / median | {f} TFLOP/s" for f in args.formats)
          + " |\n|---|---|" + "---|---|" * len(args.formats))
    for name, (n, k) in shapes.items():
        weight = torch.randn(n, k) * 0.02
        linears = {form: _linear(weight, form) for form in args.formats}
        for rows in args.rows:
            x = torch.randn(rows, k)
            times = {form: [] for form in args.formats}
            for fn in linears.values():
                fn(x)  # warm: pages touched, tiles configured
            for _ in range(args.repeats):
                for form, fn in linears.items():
                    started = time.perf_counter()
                    fn(x)
                    times[form].append(time.perf_counter() - started)
            cells = []
            for form in args.formats:
                best, median = min(times[form]), statistics.median(times[form])
                cells.append(f"{best * 1e3:.3f} / {median * 1e3:.3f} | {2 * rows * n * k / best / 1e12:.2f}")
            print(f"| {name} ({n} x {k}) | {rows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
