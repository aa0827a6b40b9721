"""The float16-weight linear (kernels/linear_f16.c) against F.linear on the fp16-rounded weight: every row-tile
count, panels cut short, odd K, bias, empty batches; the packed layout; and PackedLinear's FBGEMM fallback."""

import pytest
import torch
import torch.nn.functional as F

from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.backends.cpu.packing import Kind, PackedLinear

pytestmark = pytest.mark.skipif(not cpu_kernels.linear_f16_usable(),
                                reason="the float16 linear needs the kernel library built with AVX2 + FMA + F16C")


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 12, 13, 64, 250])
@pytest.mark.parametrize("out_features,in_features", [(16, 8), (37, 33), (768, 512), (100, 1408), (40, 1100)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear_on_the_rounded_weight(rows, out_features, in_features, bias):
    torch.manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features) * 0.05
    b = torch.randn(out_features) if bias else None
    x = torch.randn(rows, in_features)
    packed = cpu_kernels.pack_f16(weight)
    got = cpu_kernels.linear_f16(x, packed, out_features, b)
    expected = F.linear(x.double(), weight.half().double(), None if b is None else b.double()).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


def test_packed_layout_is_panels_of_sixteen_rows():
    weight = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)
    packed = cpu_kernels.pack_f16(weight)
    assert packed.shape == (2, 3, 16) and packed.dtype == torch.float16
    assert torch.equal(packed[0, 2], weight[:16, 2].half())  # panel 0, k = 2: rows 0..15
    assert torch.equal(packed[1, 1, :4], weight[16:, 1].half()) and not packed[1, :, 4:].any()  # rows past N are zero


def test_batch_shapes_and_empty_input():
    weight = torch.randn(24, 16)
    packed = cpu_kernels.pack_f16(weight)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(cpu_kernels.linear_f16(x, packed, 24), F.linear(x, weight.half().float()),
                               rtol=1e-5, atol=1e-5)
    strided = torch.randn(16, 5).t()  # not contiguous
    torch.testing.assert_close(cpu_kernels.linear_f16(strided, packed, 24), F.linear(strided, weight.half().float()),
                               rtol=1e-5, atol=1e-5)
    assert cpu_kernels.linear_f16(torch.randn(0, 16), packed, 24).shape == (0, 24)
    with pytest.raises(TypeError, match="float32 activations"):
        cpu_kernels.linear_f16(x.double(), packed, 24)


def test_packed_linear_uses_the_kernel_and_fbgemm_without_it(monkeypatch):
    weight, bias = torch.randn(40, 24), torch.randn(40)
    x = torch.randn(3, 24)
    expected = F.linear(x, weight.half().float(), bias)
    own = PackedLinear(weight, bias, torch.float16)
    assert own.kind is Kind.F16
    torch.testing.assert_close(own(x), expected, rtol=1e-5, atol=1e-5)
    if cpu_kernels.packed_weights_unavailable(torch.float16) is None:
        monkeypatch.setattr(cpu_kernels, "linear_f16_usable", lambda: False)
        if "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines:
            fallback = PackedLinear(weight, bias, torch.float16)
            assert fallback.kind is Kind.FBGEMM_F16
            torch.testing.assert_close(fallback(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens,top_k", [(1, 4), (3, 2), (2, 8)])
def test_moe_matches_per_expert_torch(tokens, top_k):
    torch.manual_seed(tokens * 10 + top_k)
    num, hidden, inter = 16, 40, 24  # sizes off the 16-row panels
    w13 = [torch.randn(2 * inter, hidden) * 0.1 for _ in range(num)]
    w2 = [torch.randn(hidden, inter) * 0.1 for _ in range(num)]
    table = cpu_kernels.ExpertTable([cpu_kernels.pack_f16(w) for w in w13], [cpu_kernels.pack_f16(w) for w in w2],
                                    inter, hidden)
    x = torch.randn(tokens, hidden)
    ids = torch.stack([torch.randperm(num)[:top_k] for _ in range(tokens)])
    ids[0, 0] = -3  # another rank's expert (expert parallel): contributes nothing
    ids[-1, -1] = num + 5
    weights = torch.rand(tokens, top_k)
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for s in range(top_k):
            e = int(ids[t, s])
            if 0 <= e < num:
                gate, up = (x[t].double() @ w13[e].half().double().T).chunk(2)
                expected[t] += weights[t, s] * ((F.silu(gate) * up) @ w2[e].half().double().T)
    torch.testing.assert_close(cpu_kernels.moe_f16(x, weights, ids, table), expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 7])
def test_per_head_linears_match_einsum(tokens):
    torch.manual_seed(tokens)
    heads, nope, latent, v = 4, 24, 64, 32
    w_kv_b = torch.randn(heads, nope + v, latent) * 0.1
    w_uk, w_uv = w_kv_b[:, :nope], w_kv_b[:, nope:]
    q_nope, out_latent = torch.randn(tokens, heads, nope), torch.randn(tokens, heads, latent)
    uk = cpu_kernels.pack_heads_f16(w_uk.transpose(1, 2))
    uv = cpu_kernels.pack_heads_f16(w_uv)
    torch.testing.assert_close(cpu_kernels.heads_f16(q_nope, uk),
                               torch.einsum("thn,hnc->thc", q_nope, w_uk.half().float()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_kernels.heads_f16(out_latent, uv),
                               torch.einsum("thc,hvc->thv", out_latent, w_uv.half().float()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_kernels.pack_heads_f16(torch.randn(2, 24, 8))
