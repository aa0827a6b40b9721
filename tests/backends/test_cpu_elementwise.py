"""RMSNorm, rotary and silu * up as C calls (csrc/elementwise.c) against the torch expressions they replace,
on strided inputs, both rotary layouts, sizes off the vector width, batches large enough to go parallel."""

import pytest
import torch
import torch.nn.functional as F

from dsserve.config import RopeConfig
from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.backends.cpu.backend import CpuBackend
from dsserve.backends.torch import TorchBackend
from dsserve.layers.rotary import RotaryEmbedding

CPU, TORCH = CpuBackend(), TorchBackend("cpu")

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler: the kernels cannot be built")


@pytest.mark.parametrize("rows,dim", [(1, 512), (3, 37), (200, 512), (5, 7168)])
def test_rms_norm_matches_torch(rows, dim):
    torch.manual_seed(dim)
    wide = torch.randn(rows, dim + 9) * 3
    x = wide[:, 4 : 4 + dim]  # rows strided, as a slice of a wider buffer
    weight = torch.randn(dim)
    got = cpu_kernels.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(got, F.rms_norm(x, (dim,), weight, 1e-6), rtol=2e-6, atol=2e-6)
    batched = torch.randn(2, 3, dim)
    torch.testing.assert_close(cpu_kernels.rms_norm(batched, weight, 1e-5), F.rms_norm(batched, (dim,), weight, 1e-5),
                               rtol=2e-6, atol=2e-6)


def _torch_rotary(rotary: RotaryEmbedding, positions, *xs):
    cos, sin, cos_full, sin_signed = TORCH._step_tables(rotary, positions)
    out = []
    for x in xs:
        if rotary.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            out.append(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
        else:
            x1, x2 = x.chunk(2, dim=-1)
            out.append(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_rotary_matches_torch(interleaved, tokens):
    torch.manual_seed(tokens)
    rope = RopeConfig(rope_type="yarn", theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                      beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0) if interleaved else RopeConfig(theta=1e6, rope_type="default")
    rotary = RotaryEmbedding(64, rope, 4096, interleaved=interleaved, dtype=torch.float32)
    positions = torch.randint(0, 4096, (tokens,))
    qkv = torch.randn(tokens, 12 * 64)
    qk = qkv[:, : 10 * 64].view(tokens, 10, 64)  # rows strided (the v columns follow)
    k_pe = torch.randn(tokens, 64).unsqueeze(1)  # one head, as DeepSeek's shared k_pe
    got = CPU.rotary(rotary, positions, (qk, k_pe))
    assert all(g.is_contiguous() for g in got)
    for g, expected in zip(got, _torch_rotary(rotary, positions, qk, k_pe)):
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,inner", [(1, 1408), (7, 13), (64, 1408)])
def test_silu_mul_matches_torch(rows, inner):
    torch.manual_seed(inner)
    gate_up = torch.randn(rows, 2 * inner) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -1e-8])  # e^-|g| underflow, exact zero
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(CPU.silu_and_mul(gate_up), F.silu(gate) * up, rtol=2e-6, atol=1e-6)


def test_other_dtypes_take_the_torch_path():
    assert not cpu_kernels.fused_ops_usable(torch.randn(2, 4, dtype=torch.bfloat16))
    gate_up = torch.randn(3, 8, dtype=torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(CPU.silu_and_mul(gate_up), F.silu(gate) * up)


def _same_routing(router, x, weights, ids):
    """The C kernel's (weights, ids) for x are the torch path's, up to the order of the k picks."""
    ref_weights, ref_ids = TORCH.route(router, x)
    order, ref_order = ids.argsort(dim=-1), ref_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens,experts,groups,topk_group,top_k", [(1, 16, 4, 2, 4), (7, 64, 8, 4, 8), (300, 16, 1, 1, 2)])
def test_noaux_router_matches_torch(tokens, experts, groups, topk_group, top_k):
    from types import SimpleNamespace

    from dsserve.layers.moe import Router

    torch.manual_seed(tokens + experts)
    config = SimpleNamespace(n_routed_experts=experts, hidden_size=48, topk_method="noaux_tc", scoring_func="sigmoid",
                             n_group=groups, topk_group=topk_group, num_experts_per_tok=top_k, norm_topk_prob=True,
                             routed_scaling_factor=2.5)
    router = Router(config, "gate")
    router.weight.data.normal_(0, 0.3)
    router.e_score_correction_bias.data.normal_(0, 0.1)
    x = torch.randn(tokens, 48)
    weights, ids = CPU.route(router, x)  # the C kernel
    _same_routing(router, x, weights, ids)


@pytest.mark.parametrize("tokens,experts,method,groups,topk_group,top_k,normalize", [
    (1, 8, "group_limited_greedy", 4, 2, 2, False), (7, 64, "group_limited_greedy", 8, 3, 6, True),
    (300, 64, "greedy", 1, 1, 6, False), (5, 16, "greedy", 1, 1, 3, True)])
def test_softmax_router_matches_torch(tokens, experts, method, groups, topk_group, top_k, normalize):
    """V2's routers (V2: group-limited; V2-Lite: greedy) in C against the torch expressions."""
    from types import SimpleNamespace

    from dsserve.layers.moe import Router

    torch.manual_seed(tokens + experts)
    config = SimpleNamespace(n_routed_experts=experts, hidden_size=40, topk_method=method, scoring_func="softmax",
                             n_group=groups, topk_group=topk_group, num_experts_per_tok=top_k, norm_topk_prob=normalize,
                             routed_scaling_factor=16.0)
    router = Router(config, "gate")
    router.weight.data.normal_(0, 0.3)
    x = torch.randn(tokens, 40)
    calls = []
    real = cpu_kernels.router_softmax
    try:
        cpu_kernels.router_softmax = lambda *a: calls.append(1) or real(*a)
        weights, ids = CPU.route(router, x)  # the C kernel
    finally:
        cpu_kernels.router_softmax = real
    assert calls
    _same_routing(router, x, weights, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cache_write_matches_index_copy(dtype):
    torch.manual_seed(0)
    qkv = torch.randn(5, 3 * 2 * 8)  # k and v: strided views of a wider buffer, as in a layer
    k, v = qkv[:, 16:32].view(5, 2, 8), qkv[:, 32:].view(5, 2, 8)
    slots = torch.tensor([17, 3, 40, 0, 22])
    got, expected = torch.zeros(6, 8, 2, 2, 8, dtype=dtype), torch.zeros(6, 8, 2, 2, 8, dtype=dtype)
    if dtype == torch.float16 and not cpu_kernels._state.get("half"):
        pytest.skip("this build writes no float16 cache")
    assert cpu_kernels.cache_write(got, slots, k, v)
    TORCH.write_cache(expected, slots, k, v, stack=True)
    assert torch.equal(got, expected)
    latent, k_pe = torch.randn(5, 32), torch.randn(5, 1, 8)[:, 0]  # MLA: the latent then the rope key
    got, expected = torch.zeros(6, 8, 40, dtype=dtype), torch.zeros(6, 8, 40, dtype=dtype)
    CPU.write_cache(got, slots, latent, k_pe, stack=False)
    TORCH.write_cache(expected, slots, latent, k_pe, stack=False)
    assert torch.equal(got, expected)
    assert not cpu_kernels.cache_write(got, slots, latent.double(), k_pe)  # not float32: the caller uses torch
