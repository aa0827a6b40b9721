"""Routed experts grouped by expert in one C call (csrc/moe.c) against the module path they replace
(TorchBackend.experts calling the packed experts one by one): the same bits, for bf16 (AMX) and fp16 experts, at
decode and prompt sizes, with other ranks' experts among the ids; and against float64 arithmetic."""

import pytest
import torch
import torch.nn.functional as F

from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.backends.cpu.backend import CpuBackend
from dsserve.backends.cpu.packing import Kind, PackedLinear
from dsserve.backends.torch import TorchBackend

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="the CPU kernel library did not build")

DTYPES = [pytest.param(torch.float16, id="fp16",
                       marks=pytest.mark.skipif(not cpu_kernels.linear_f16_usable(), reason="no fp16 kernel")),
          pytest.param(torch.bfloat16, id="bf16",
                       marks=pytest.mark.skipif(not cpu_kernels.linear_bf16_usable(), reason="no AMX bf16 kernel"))]


class _Layer:  # what the backend reads of an Experts module
    def __init__(self, num: int, first: int = 0):
        self.num_local, self.first_expert = num, first


def _setup(dtype, num, hidden, inter, first=0, seed=0):
    torch.manual_seed(seed)
    w13 = [torch.randn(2 * inter, hidden) * 0.1 for _ in range(num)]
    w2 = [torch.randn(hidden, inter) * 0.1 for _ in range(num)]
    pairs = [(PackedLinear(a, None, dtype), PackedLinear(b, None, dtype)) for a, b in zip(w13, w2)]
    assert all(p.kind in (Kind.F16, Kind.BF16) for pair in pairs for p in pair)
    backend, layer = CpuBackend(dtype), _Layer(num, first)
    backend.packs.experts[layer] = pairs
    backend.packs.expert_tables[layer] = cpu_kernels.ExpertTable(
        [a.data for a, _ in pairs], [b.data for _, b in pairs], inter, hidden, bf16=dtype == torch.bfloat16)
    return backend, layer, w13, w2


def _routing(tokens, top_k, num, first, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num + 8, generator=g)[:top_k] for _ in range(tokens)]) + first - 4
    return torch.rand(tokens, top_k, generator=g), ids  # ids below first or past the last: other ranks' experts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,top_k", [(1, 6), (3, 2), (16, 6), (70, 4), (300, 8)])
@pytest.mark.parametrize("inter", [48, 40])  # 40: not whole 16-row panels of each half (no fused SwiGLU)
def test_grouped_equals_the_module_path(dtype, tokens, top_k, inter):
    num, hidden, first = 16, 64, 3
    backend, layer, _, _ = _setup(dtype, num, hidden, inter, first, seed=tokens)
    weights, ids = _routing(tokens, top_k, num, first, seed=tokens + top_k)
    x = torch.randn(tokens, hidden)
    expected = TorchBackend.experts(backend, layer, x, weights, ids)  # per expert through CpuBackend.expert
    got = cpu_kernels.moe_grouped(x, weights, ids - first, backend.packs.expert_tables[layer])
    assert torch.equal(got, expected)
    if dtype == torch.bfloat16 or tokens * top_k > num:  # what the backend itself picks for these
        assert torch.equal(backend.experts(layer, x, weights, ids), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_matches_float64(dtype):
    num, hidden, inter, tokens, top_k = 8, 96, 64, 40, 3
    backend, layer, w13, w2 = _setup(dtype, num, hidden, inter, seed=7)
    weights, ids = _routing(tokens, top_k, num, 0, seed=8)
    x = torch.randn(tokens, hidden)
    bf16 = dtype == torch.bfloat16
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for s in range(top_k):
            e = int(ids[t, s])
            if 0 <= e < num:
                xt = (x[t].bfloat16() if bf16 else x[t]).double()  # AMX rounds the activations to bf16 as well
                gate, up = (xt @ w13[e].to(dtype).double().T).chunk(2)
                act = F.silu(gate) * up
                act = act.float().bfloat16().double() if bf16 else act
                expected[t] += weights[t, s] * (act @ w2[e].to(dtype).double().T)
    got = cpu_kernels.moe_grouped(x, weights, ids, backend.packs.expert_tables[layer])
    tol = 2e-2 if bf16 else 1e-5
    torch.testing.assert_close(got, expected.float(), rtol=tol, atol=tol)


def test_grouped_without_local_experts_is_zero():
    if not cpu_kernels.linear_f16_usable():
        pytest.skip("no fp16 kernel")
    backend, layer, _, _ = _setup(torch.float16, 4, 32, 16)
    x = torch.randn(5, 32)
    ids = torch.full((5, 2), 9)  # every pair on another rank
    got = cpu_kernels.moe_grouped(x, torch.rand(5, 2), ids, backend.packs.expert_tables[layer])
    assert torch.equal(got, torch.zeros(5, 32))
