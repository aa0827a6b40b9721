"""Every op the CPU backend overrides against the torch reference backend, called as the layers call them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dsserve.backends.cpu import kernels
from dsserve.backends.cpu.backend import CpuBackend
from dsserve.backends.torch import TorchBackend

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="needs the CPU kernel library")

CPU, TORCH = CpuBackend(), TorchBackend("cpu")


class Layer(SimpleNamespace):
    """A stand-in for the calling layer: backends key per-layer state by the layer object itself."""

    __hash__ = object.__hash__
BLOCK = 16


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_rms_norm_silu_and_rotary():
    torch.manual_seed(0)
    norm = SimpleNamespace(weight=torch.randn(96), eps=1e-6)
    x = torch.randn(7, 96)
    _close(CPU.rms_norm(norm, x), TORCH.rms_norm(norm, x))
    gate_up = torch.randn(5, 2 * 40)
    _close(CPU.silu_and_mul(gate_up), TORCH.silu_and_mul(gate_up))
    positions = torch.tensor([0, 3, 9, 100, 4])
    for interleaved in (False, True):
        angles = torch.randn(128, 16)
        rotary = SimpleNamespace(cos=angles.cos(), sin=angles.sin(), interleaved=interleaved)
        xs = (torch.randn(5, 4, 32), torch.randn(5, 1, 32))
        for got, want in zip(CPU.rotary(rotary, positions, xs), TORCH.rotary(rotary, positions, xs)):
            _close(got, want)


@pytest.mark.skipif(not kernels.linear_bf16_usable(), reason="needs the bf16 AMX linear")
@pytest.mark.parametrize("rows", [1, 40])
def test_gated_linear_fuses_swiglu_into_the_bf16_kernel(rows, monkeypatch):
    """The gate_up product never materialises (silu_and_mul is not called) and the result is the torch backend's
    on the same bf16-rounded weight, its activations rounded to bf16 where the tiles take them."""
    from dsserve.backends.cpu.packing import PackedLinear

    torch.manual_seed(rows)
    weight = (torch.randn(2 * 48, 64) * 0.1).bfloat16().float()
    layer = Layer(weight=weight, bias=None)
    cpu = CpuBackend()
    cpu.packs.linears[layer] = PackedLinear(weight, None, torch.bfloat16)
    x = torch.randn(rows, 64)
    monkeypatch.setattr(CpuBackend, "silu_and_mul", lambda *a: pytest.fail("the product left the kernel"))
    want = TORCH.gated_linear(layer, x if rows == 1 else x.bfloat16().float())
    _close(cpu.gated_linear(layer, x), want, tol=1e-4)


@pytest.mark.parametrize("method, scoring, groups", [("noaux_tc", "sigmoid", 4), ("greedy", "softmax", 1),
                                                     ("group_limited_greedy", "softmax", 4)])
def test_routers(method, scoring, groups):
    torch.manual_seed(1)
    config = SimpleNamespace(topk_method=method, scoring_func=scoring, n_group=groups, topk_group=2,
                             num_experts_per_tok=3, norm_topk_prob=True, routed_scaling_factor=2.5,
                             n_routed_experts=16)
    router = SimpleNamespace(config=config, weight=torch.randn(16, 64),
                             e_score_correction_bias=torch.randn(16) * 0.1 if method == "noaux_tc" else None)
    x = torch.randn(9, 64)
    (w_cpu, ids_cpu), (w_ref, ids_ref) = CPU.route(router, x), TORCH.route(router, x)
    order_cpu, order_ref = ids_cpu.argsort(dim=1), ids_ref.argsort(dim=1)  # the same experts, in any order
    assert torch.equal(ids_cpu.gather(1, order_cpu), ids_ref.gather(1, order_ref))
    _close(w_cpu.gather(1, order_cpu), w_ref.gather(1, order_ref))


def _step(query_lens, starts, num_blocks=32, per_row=8):
    """A step's inputs as the runner builds them: each row's blocks, positions and cache slots."""
    rows = len(query_lens)
    tables = torch.randperm(num_blocks)[: per_row * rows].view(rows, per_row)  # no block shared by two rows
    query_lens, starts = torch.tensor(query_lens), torch.tensor(starts)
    seq = torch.repeat_interleave(torch.arange(len(query_lens)), query_lens)
    first = torch.cumsum(query_lens, 0) - query_lens
    positions = starts[seq] + torch.arange(int(query_lens.sum())) - first[seq]
    slots = tables[seq, positions // BLOCK] * BLOCK + positions % BLOCK
    return query_lens, starts, tables, positions, slots


STEPS = {"decode": ([1, 1, 1], [5, 40, 17]), "prompts": ([6, 3], [0, 0]), "mixed": ([1, 9, 1], [30, 0, 2]),
         "continued chunk": ([12], [50])}


@pytest.mark.parametrize("step", STEPS)
def test_paged_attention(step):
    torch.manual_seed(2)
    query_lens, starts, tables, positions, slots = _step(*STEPS[step])
    tokens, heads, kv_heads, dim = positions.numel(), 4, 2, 32
    layer = SimpleNamespace(scale=dim**-0.5)
    q, k, v = torch.randn(tokens, heads, dim), torch.randn(tokens, kv_heads, dim), torch.randn(tokens, kv_heads, dim)
    cache = torch.randn(32, BLOCK, 2, kv_heads, dim)
    outs, caches = [], []
    for backend in (CPU, TORCH):
        meta = backend.attention_metadata(query_lens, starts, tables, positions, slots, BLOCK, torch.device("cpu"))
        caches.append(cache.clone())
        outs.append(backend.attention(layer, q, k, v, caches[-1], meta))
    assert torch.equal(caches[0], caches[1])
    _close(outs[0], outs[1], 1e-4)


@pytest.mark.parametrize("step", ["decode", "mixed"])
def test_mla_attention(step):
    torch.manual_seed(3)
    query_lens, starts, tables, positions, slots = _step(*STEPS[step])
    tokens, heads, nope, rope, v_dim, rank = positions.numel(), 4, 16, 16, 16, 32
    layer = Layer(scale=0.1, num_heads=heads, nope_dim=nope, v_dim=v_dim, kv_lora_rank=rank,
                            kv_b_proj=SimpleNamespace(weight=torch.randn(heads * (nope + v_dim), rank) * 0.2))
    q_nope, q_pe = torch.randn(tokens, heads, nope), torch.randn(tokens, heads, rope)
    latent, k_pe = torch.randn(tokens, rank), torch.randn(tokens, rope)
    cache = torch.randn(32, BLOCK, rank + rope)
    outs, caches = [], []
    for backend in (CPU, TORCH):
        meta = backend.attention_metadata(query_lens, starts, tables, positions, slots, BLOCK, torch.device("cpu"))
        caches.append(cache.clone())
        outs.append(backend.mla_attention(layer, q_nope, q_pe, latent, k_pe, caches[-1], meta))
    assert torch.equal(caches[0], caches[1])
    _close(outs[0], outs[1], 1e-4)


def test_unknown_backend_is_refused():
    from dsserve.backends import select
    from dsserve.errors import ConfigError

    with pytest.raises(ConfigError, match="is not one of cpu, torch"):
        select("triton", torch.device("cpu"))
    assert isinstance(select("torch", torch.device("cpu")), TorchBackend)


@pytest.mark.parametrize("bf16, long_row", [(False, 40), (False, 1100), (True, 40)])
def test_fresh_prompts_take_one_flash_attention_per_row(bf16, long_row, monkeypatch):
    """Fresh prompts (and decode rows beside them): a prompt row is one causal SDPA over its own keys, in bf16 when
    the backend's linears round activations to bf16, in float32 only from 1024 tokens (shorter rows are faster
    through the per-token kernel); every way equals the reference within its rounding."""
    torch.manual_seed(4)
    query_lens, starts, tables, positions, slots = _step([1, long_row, 1, 25], [30, 0, 7, 0], num_blocks=320,
                                                         per_row=80)
    tokens, heads, kv_heads, dim = positions.numel(), 8, 2, 64
    layer = SimpleNamespace(scale=dim**-0.5)
    q, k, v = torch.randn(tokens, heads, dim), torch.randn(tokens, kv_heads, dim), torch.randn(tokens, kv_heads, dim)
    cache = torch.randn(320, BLOCK, 2, kv_heads, dim)
    backend = CpuBackend()
    backend.bf16_activations = bf16
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: calls.append((q.shape, q.dtype)) or real(q, *a, **kw))
    meta = backend.attention_metadata(query_lens, starts, tables, positions, slots, BLOCK, torch.device("cpu"))
    assert meta.fresh_rows == [(1, long_row), (long_row + 2, 25)] and meta.single_tokens.tolist() == [0, long_row + 1]
    got_cache = cache.clone()
    got = backend.attention(layer, q, k, v, got_cache, meta)
    dtype = torch.bfloat16 if bf16 else torch.float32
    expected = {(True, 40): [((1, heads, 40, dim), dtype), ((1, heads, 25, dim), dtype)],
                (False, 40): [], (False, 1100): [((1, heads, 1100, dim), dtype)]}[bf16, long_row]
    assert calls == expected
    want_cache = cache.clone()
    ref_meta = TORCH.attention_metadata(query_lens, starts, tables, positions, slots, BLOCK, torch.device("cpu"))
    want = TORCH.attention(layer, q, k, v, want_cache, ref_meta)
    assert torch.equal(got_cache, want_cache)
    _close(got, want, 2e-2 if bf16 else 1e-4)
    # a chunk continuing its prompt is not fresh: the per-token kernel
    continued = _step([12, 1], [20, 5])
    assert CPU.attention_metadata(*continued, BLOCK, torch.device("cpu")).fresh_rows is None


@pytest.mark.parametrize("bf16", [False, True])
def test_fresh_prompts_under_mla(bf16):
    """MLA's fresh prompts: the row's latents expanded tile by tile, flash SDPA per tile; decode rows beside them
    in the absorbed form over the cache: the reference's output within bf16 (or float32) rounding."""
    torch.manual_seed(5)
    query_lens, starts, tables, positions, slots = _step([1, 33, 1, 20], [30, 0, 7, 0])
    tokens, heads, nope, rope, v_dim, rank = positions.numel(), 4, 32, 16, 32, 64
    layer = Layer(scale=0.1, num_heads=heads, nope_dim=nope, v_dim=v_dim, kv_lora_rank=rank,
                  kv_b_proj=SimpleNamespace(weight=torch.randn(heads * (nope + v_dim), rank) * 0.2))
    q_nope, q_pe = torch.randn(tokens, heads, nope), torch.randn(tokens, heads, rope)
    latent, k_pe = torch.randn(tokens, rank), torch.randn(tokens, rope)
    cache = torch.randn(32, BLOCK, rank + rope)
    backend = CpuBackend()
    backend.bf16_activations = bf16
    meta = backend.attention_metadata(query_lens, starts, tables, positions, slots, BLOCK, torch.device("cpu"))
    assert meta.fresh_rows == [(1, 33), (35, 20)]
    got_cache, want_cache = cache.clone(), cache.clone()
    got = backend.mla_attention(layer, q_nope, q_pe, latent, k_pe, got_cache, meta)
    ref_meta = TORCH.attention_metadata(query_lens, starts, tables, positions, slots, BLOCK, torch.device("cpu"))
    want = TORCH.mla_attention(layer, q_nope, q_pe, latent, k_pe, want_cache, ref_meta)
    assert torch.equal(got_cache, want_cache)
    _close(got, want, 5e-2 if bf16 else 1e-4)


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("half_cache", [False, True])
def test_mla_prompts_in_tiles_of_keys(bf16, half_cache, monkeypatch):
    """Prompt rows continuing a cached context and fresh ones, with tiles of 16 keys so that every row spans several
    (cached tiles seen by every query, own tiles causal, tiles cut at the row's start): the tiles' outputs merged by
    log-sum-exp equal the reference's one softmax over the whole context; at most a tile of keys is expanded."""
    from dsserve.backends.cpu import backend as cpu_backend

    monkeypatch.setattr(cpu_backend, "_mla_tile", lambda heads, width: 16)
    torch.manual_seed(6)
    query_lens, starts, tables, positions, slots = _step([37, 1, 20, 5], [45, 30, 0, 3], num_blocks=48, per_row=8)
    tokens, heads, nope, rope, v_dim, rank = positions.numel(), 4, 32, 16, 32, 64
    weight = torch.randn(heads * (nope + v_dim), rank) * 0.2
    expanded = []
    layer = Layer(scale=0.1, num_heads=heads, nope_dim=nope, v_dim=v_dim, kv_lora_rank=rank,
                  kv_b_proj=SimpleNamespace(weight=weight))
    q_nope, q_pe = torch.randn(tokens, heads, nope), torch.randn(tokens, heads, rope)
    latent, k_pe = torch.randn(tokens, rank), torch.randn(tokens, rope)
    cache = torch.randn(48, BLOCK, rank + rope).to(torch.float16 if half_cache else torch.float32)
    backend = CpuBackend()
    backend.bf16_activations = bf16
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(cpu_backend.F, "linear", lambda x, w, *a: expanded.append(x.shape[0]) or real_linear(x, w, *a))
    meta = backend.attention_metadata(query_lens, starts, tables, positions, slots, BLOCK, torch.device("cpu"))
    assert meta.fresh_rows is None and [r[:3] for r in meta.prompt_rows] == [(0, 37, 45), (38, 20, 0), (58, 5, 3)]
    got_cache, want_cache = cache.clone(), cache.clone()
    got = backend.mla_attention(layer, q_nope, q_pe, latent, k_pe, got_cache, meta)
    assert expanded and max(expanded) <= 16
    monkeypatch.setattr(cpu_backend.F, "linear", real_linear)
    ref_meta = TORCH.attention_metadata(query_lens, starts, tables, positions, slots, BLOCK, torch.device("cpu"))
    want = TORCH.mla_attention(layer, q_nope, q_pe, latent, k_pe, want_cache, ref_meta)
    assert torch.equal(got_cache, want_cache)
    _close(got, want, 5e-2 if bf16 else 1e-4)
