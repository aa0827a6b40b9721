"""Decode attention on CPU: dsserve's kernel (dsserve/backends/cpu/csrc/paged_attention.c) against its torch twin (the
context gathered from the paged cache into a workspace, then SDPA or, for MLA, two matmuls), on random caches
with shuffled blocks, as the CPU backend (dsserve/backends/cpu/backend.py) calls them.

    python benchmarks/cpu_attention.py                              # batch 64 and 1, 256 tokens of context
    python benchmarks/cpu_attention.py --batch 32 --context 1024 --heads 16 --kv-heads 2 --head-dim 128

Shapes: GQA as the Qwen2-shaped benchmark model (8 heads, 2 KV heads, head dim 64); MLA as DeepSeek-V3's
latent (512 + 64) with --mla-heads query heads. Prints ms per call, best of --repeats rounds of --calls calls.
Each call reads a different layer's cache (--layers of them), so the context comes from memory as in a step.
"""

from __future__ import annotations

import argparse
import time

import torch

from dsserve.backends.cpu import kernels as kernels
from dsserve.backends import torch as A


def _meta(batch: int, context: int, block_size: int, num_blocks: int) -> A.AttentionMetadata:
    per_seq = -(-context // block_size)
    tables = torch.randperm(num_blocks)[: batch * per_seq].view(batch, per_seq)
    lens = torch.full((batch,), context)
    mask = torch.arange(per_seq * block_size).view(1, 1, 1, -1) < lens.view(-1, 1, 1, 1)
    return A.AttentionMetadata(slot_mapping=None, query_index=None, query_valid=None, block_tables=tables,
                               attn_mask=mask, is_decode=True, workspace=A.Workspace(), context_lens=lens)


def _time(fn, calls: int, repeats: int) -> float:
    fn(0)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(calls):
            fn(i)
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mla-heads", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4, help="caches cycled through (so reads come from memory)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if kernels.library() is None:
        raise SystemExit(f"the kernel is unavailable here ({kernels.why_unavailable()})")
    torch.manual_seed(0)
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}; "
          f"context {args.context} tokens, block size {args.block_size}")
    print("| shape | batch | kernel ms | torch ms |\n|---|---|---|---|")
    h, hkv, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    with torch.inference_mode():
        for batch in args.batch:
            num_blocks = batch * -(-args.context // bs) + 8
            meta = _meta(batch, args.context, bs, num_blocks)
            caches = [torch.randn(num_blocks, bs, 2, hkv, d) for _ in range(args.layers)]
            q = torch.randn(batch, h, d)

            def kernel(i):
                kernels.paged_decode(q, caches[i % len(caches)], meta.block_tables, meta.context_lens, d**-0.5,
                                     num_kv_heads=hkv, v_dim=d, token_stride=2 * hkv * d, head_stride=d,
                                     v_offset=hkv * d)

            def twin(i):
                _torch_gqa(q, caches[i % len(caches)], meta, d**-0.5)

            print(f"| GQA {h}/{hkv} heads x {d} | {batch} | {_time(kernel, args.calls, args.repeats):.3f} | "
                  f"{_time(twin, args.calls, args.repeats):.3f} |")
            latent, rope = 512, 64
            caches = [torch.randn(num_blocks, bs, latent + rope) for _ in range(args.layers)]
            queries = torch.randn(batch, args.mla_heads, latent + rope)

            def mla_kernel(i):
                kernels.paged_decode(queries, caches[i % len(caches)], meta.block_tables, meta.context_lens, 0.1,
                                     num_kv_heads=1, v_dim=latent, token_stride=latent + rope, head_stride=0,
                                     v_offset=0)

            def mla_twin(i):
                keys = meta.gather(caches[i % len(caches)]).unsqueeze(1)
                A._grouped_attention(meta.pad_queries(queries), keys, keys[..., :latent], meta, 0.1)

            print(f"| MLA {args.mla_heads} heads x (512 + 64) | {batch} | "
                  f"{_time(mla_kernel, args.calls, args.repeats):.3f} | {_time(mla_twin, args.calls, args.repeats):.3f} |")


def _torch_gqa(q, cache, meta, scale):
    context = meta.gather(cache)
    keys, values = context[:, :, 0].transpose(1, 2), context[:, :, 1].transpose(1, 2)
    return meta.unpad(A._grouped_attention(meta.pad_queries(q), keys, values, meta, scale))


if __name__ == "__main__":
    main()
