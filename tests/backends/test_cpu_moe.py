"""Routed experts grouped by expert in one C call (csrc/moe.c) against the module path they replace
(TorchBackend.experts calling the packed experts one by one): the same bits, for bf16 (AMX), fp16 and int8 / int4
experts, at decode and prompt sizes, with other ranks' experts among the ids; and against float64 arithmetic."""

import pytest
import torch
import torch.nn.functional as F

from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.backends.cpu.backend import CpuBackend
from dsserve.backends.cpu.packing import Kind, PackedLinear
from dsserve.backends.torch import TorchBackend
from dsserve.formats.quantization import QuantScheme

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="the CPU kernel library did not build")

DTYPES = [pytest.param(torch.float16, id="fp16",
                       marks=pytest.mark.skipif(not cpu_kernels.linear_f16_usable(), reason="no fp16 kernel")),
          pytest.param(torch.bfloat16, id="bf16",
                       marks=pytest.mark.skipif(not cpu_kernels.linear_bf16_usable(), reason="no AMX bf16 kernel"))]
QUANTIZED = [pytest.param(QuantScheme.parse(name), id=name,
                          marks=pytest.mark.skipif(not cpu_kernels.linear_quant_usable(), reason="no int8/int4 kernel"))
             for name in ("int8", "int4", "int4-g64-zp")]


class _Layer:  # what the backend reads of an Experts module
    def __init__(self, num: int, first: int = 0):
        self.num_local, self.first_expert = num, first


def _setup(dtype, num, hidden, inter, first=0, seed=0, scheme=None):
    """dtype float16 / bfloat16, or float32 with `scheme` (int8 / int4 experts)"""
    torch.manual_seed(seed)
    w13 = [torch.randn(2 * inter, hidden) * 0.1 for _ in range(num)]
    w2 = [torch.randn(hidden, inter) * 0.1 for _ in range(num)]
    pairs = [(PackedLinear(a, None, dtype, scheme), PackedLinear(b, None, dtype, scheme)) for a, b in zip(w13, w2)]
    kinds = (Kind.INT8, Kind.INT4) if scheme is not None else (Kind.F16, Kind.BF16)
    assert all(p.kind in kinds for pair in pairs for p in pair)
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


@pytest.mark.parametrize("scheme", QUANTIZED)
@pytest.mark.parametrize("tokens,top_k", [(1, 6), (3, 2), (70, 4)])
@pytest.mark.parametrize("inter", [48, 40])
def test_grouped_quantized_equals_the_module_path(scheme, tokens, top_k, inter):
    """int8 / int4 experts: one C call gives the bits of the module path's expert-by-expert linear_quant calls, and
    the backend takes it at every size (no few-token kernel reads them)."""
    num, hidden, first = 16, 64, 3
    backend, layer, w13, w2 = _setup(torch.float32, num, hidden, inter, first, seed=tokens, scheme=scheme)
    table = backend.packs.expert_tables[layer]
    assert table.quantized and table.weights_kind == 2
    weights, ids = _routing(tokens, top_k, num, first, seed=tokens + top_k)
    x = torch.randn(tokens, hidden)
    expected = TorchBackend.experts(backend, layer, x, weights, ids)
    assert torch.equal(cpu_kernels.moe_grouped(x, weights, ids - first, table), expected)
    assert torch.equal(backend.experts(layer, x, weights, ids), expected)
    # and that is the dequantized experts' SwiGLU (not vacuous: the weights are quantized)
    plain = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for s in range(top_k):
            e = int(ids[t, s]) - first
            if 0 <= e < num:
                gate, up = F.linear(x[t], scheme.quantize(w13[e]).dequantize()).chunk(2)
                plain[t] += weights[t, s] * F.linear(F.silu(gate) * up, scheme.quantize(w2[e]).dequantize())
    torch.testing.assert_close(expected, plain, rtol=1e-4, atol=1e-5)


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
