"""The int8 / int4 weight-only linears (csrc/linear_quant.c) against their plain-torch twin: dequantize
(formats/quantization.py), then F.linear. One row (the GEMV), several rows (the dequantized-block path), odd N and K,
K not a multiple of the group, bias; and the quantizers' own rules."""

import pytest
import torch
import torch.nn.functional as F

from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.errors import ConfigError
from dsserve.formats.quantization import QuantScheme, quantize_activations, quantize_int4, quantize_int8, reference_linear

needs_kernel = pytest.mark.skipif(not cpu_kernels.linear_quant_usable(),
                                  reason="the quantized linears need AVX-512")

SCHEMES = ["int8", "int4", "int4-g64", "int4-g128", "int4-zp", "int4-g64-zp", "int4-g128-zp"]
SHAPES = [(16, 32), (37, 33), (100, 130), (48, 7), (200, 1408), (33, 257)]


def _reference(x, quantized, bias):
    return F.linear(x.double(), quantized.dequantize().double(), None if bias is None else bias.double()).float()


@needs_kernel
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 5, 64, 70])
def test_matches_the_dequantized_weight(scheme, out_features, in_features, rows):
    torch.manual_seed(out_features * 7 + in_features + rows)
    weight = torch.randn(out_features, in_features) * 0.05
    bias = torch.randn(out_features) if rows % 2 else None
    x = torch.randn(rows, in_features)
    quantized = QuantScheme.parse(scheme).quantize(weight)
    got = cpu_kernels.linear_quant(x, cpu_kernels.pack_quantized(quantized), out_features, bias)
    want = _reference(x, quantized, bias)
    scale = want.abs().amax().item() + 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * scale * in_features ** 0.5)


@needs_kernel
def test_a_wrong_kernel_is_caught():
    """The tolerance above is tight enough to see a weight that is off by one step in one place."""
    weight, x = torch.randn(32, 64) * 0.05, torch.randn(1, 64)
    quantized = quantize_int4(weight, 32, False)
    panels = cpu_kernels.pack_quantized(quantized)
    quantized.q[5, 40] = (quantized.q[5, 40] + 1) % 16
    got = cpu_kernels.linear_quant(x, panels, 32)
    assert (got - _reference(x, quantized, None)).abs().amax() > 1e-4


@needs_kernel
def test_batch_shapes_errors_and_empty_input():
    panels = cpu_kernels.pack_quantized(quantize_int8(torch.randn(24, 64)))
    assert cpu_kernels.linear_quant(torch.randn(2, 3, 64), panels, 24).shape == (2, 3, 24)
    assert cpu_kernels.linear_quant(torch.empty(0, 64), panels, 24).shape == (0, 24)
    with pytest.raises(TypeError, match="float32 activations"):
        cpu_kernels.linear_quant(torch.randn(2, 64).double(), panels, 24)
    with pytest.raises(ValueError, match="has 64 inputs, x has 32"):
        cpu_kernels.linear_quant(torch.randn(2, 32), panels, 24)


def test_packed_layouts():
    weight = torch.randn(20, 6)
    int8 = quantize_int8(weight)
    panels = cpu_kernels.pack_quantized(int8)
    assert panels.packed.shape == (2, 6, 16) and panels.packed.dtype == torch.int8  # 2 panels (padded to even)
    assert torch.equal(panels.packed[0, 3], int8.q[:16, 3]) and torch.equal(panels.packed[1, 3, :4], int8.q[16:, 3])
    assert not panels.packed[1, :, 4:].any() and panels.scales.shape == (32,)
    int4 = quantize_int4(torch.randn(40, 70), 32, True)
    panels = cpu_kernels.pack_quantized(int4)
    assert panels.packed.shape == (4, 48, 16) and panels.scales.shape == (4, 3, 16)  # K 70 -> 3 groups of 32
    byte = int(panels.packed[1, 5, 2])  # row 18, inputs 10 (low nibble) and 11 (high)
    assert (byte & 15, byte >> 4) == (int(int4.q[18, 10]), int(int4.q[18, 11]))
    assert torch.equal(panels.zeros[2, 1, :8], int4.zeros[32:, 1])


@needs_kernel
@pytest.mark.parametrize("scheme", ["int8", "int4-zp"])
def test_large_weights_are_packed_on_huge_page_aligned_memory(scheme):
    """From 4 MiB up the packed panels sit in their own 2 MiB-aligned mapping (advised MADV_HUGEPAGE) with the same
    values and products; smaller ones stay in torch's memory."""
    torch.manual_seed(1)
    weight, x = torch.randn(4096, 2048) * 0.05, torch.randn(1, 2048)
    quantized = QuantScheme.parse(scheme).quantize(weight)
    panels = cpu_kernels.pack_quantized(quantized)
    assert panels.packed.nbytes >= 4 << 20 and panels.packed.data_ptr() % (2 << 20) == 0
    assert panels.packed.is_contiguous() and panels.scales.nbytes < 4 << 20
    small = cpu_kernels.pack_quantized(QuantScheme.parse(scheme).quantize(weight[:64]))
    assert torch.equal(panels.packed[:4], small.packed)  # the first 64 rows' panels, the same bytes
    want = _reference(x, quantized, None)
    torch.testing.assert_close(cpu_kernels.linear_quant(x, panels, 4096), want, rtol=1e-5,
                               atol=2e-6 * want.abs().amax().item() * 2048 ** 0.5)
    t = torch.arange(3 << 20, dtype=torch.int32).view(-1, 1024)
    assert torch.equal(cpu_kernels.on_huge_pages(t.t()), t.t().contiguous())  # a transposed view, laid out anew


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantization_error_is_within_half_a_step(scheme):
    torch.manual_seed(0)
    weight = torch.randn(48, 200)
    quantized = QuantScheme.parse(scheme).quantize(weight)
    error = (quantized.dequantize() - weight).abs()
    if quantized.scheme.bits == 8:
        steps = quantized.scales.unsqueeze(1)
    else:
        group = quantized.scheme.group_size
        steps = quantized.scales.float().repeat_interleave(group, 1)[:, :200]
    # half a step, plus float16 rounding of the scale times the largest |q - z| (15)
    assert bool((error <= steps * (0.5 + 15 * 2**-11) + 1e-7).all())
    assert quantized.dequantize().shape == weight.shape


def test_int8_uses_the_full_range_and_zero_rows():
    weight = torch.randn(4, 16)
    weight[2] = 0
    quantized = quantize_int8(weight)
    assert quantized.q.abs().amax(dim=1).tolist() == [127, 127, 0, 127]
    assert not quantized.dequantize()[2].any()


def test_int4_storage_is_about_four_and_a_half_bits():
    weight = torch.randn(64, 256)
    assert quantize_int4(weight, 32, False).nbytes * 8 / weight.numel() == 4.5
    assert quantize_int4(weight, 32, True).nbytes * 8 / weight.numel() == 4.75
    assert quantize_int8(weight).nbytes * 8 / weight.numel() == 8 + 32 / 256


@pytest.mark.parametrize("name,expected", [("int8", (8, None, False)), ("int4", (4, 32, False)),
                                           ("int4-g128", (4, 128, False)), ("int4-g64-zp", (4, 64, True))])
def test_scheme_names(name, expected):
    scheme = QuantScheme.parse(name)
    assert (scheme.bits, scheme.group_size, scheme.zero_point) == expected and scheme.name == name


@pytest.mark.parametrize("name", ["int3", "int4-g48", "w4a8", "fp4", "INT8", "int4-zp-g64"])
def test_unsupported_scheme_names_are_refused(name):
    with pytest.raises(ConfigError, match=f"--quantization '{name}' is not supported: the forms are int8, w8a8, fp8"):
        QuantScheme.parse(name)


@pytest.mark.parametrize("name", ["int8", "w8a8", "fp8", "int4", "int4-g64", "int4-g128-zp"])
def test_scheme_names_round_trip(name):
    assert QuantScheme.parse(name).name == name


def test_w8a8_reference_quantizes_the_activations_per_row():
    torch.manual_seed(0)
    weight = QuantScheme.parse("w8a8").quantize(torch.randn(40, 70))
    x = torch.randn(3, 70)
    xq, x_scales = quantize_activations(x)
    assert torch.equal(x_scales, x.abs().amax(dim=1) / 127)
    expect = (xq.double() @ weight.q.double().t()) * x_scales.double()[:, None] * weight.scales.double()
    assert torch.equal(reference_linear(x, weight), expect.float())
    # int8 weight-only on the same integers differs by the activations' rounding only
    assert not torch.equal(reference_linear(x, weight), torch.nn.functional.linear(x, weight.dequantize()))
    torch.testing.assert_close(reference_linear(x, weight), torch.nn.functional.linear(x, weight.dequantize()),
                               atol=0.2, rtol=0.05)


def test_fp8_blocks_of_128_hold_their_own_scale():
    torch.manual_seed(0)
    w = torch.randn(200, 300)
    w[:128, :128] *= 100  # one block far larger than the rest: its scale must not spill onto the others
    fp8 = QuantScheme.parse("fp8").quantize(w)
    assert fp8.q.dtype == torch.float8_e4m3fn and fp8.scales.shape == (2, 3)
    assert torch.allclose(fp8.scales, torch.stack([w[r:r + 128, c:c + 128].abs().amax() / 448
                                                   for r in (0, 128) for c in (0, 128, 256)]).view(2, 3))
    # e4m3 keeps 3 mantissa bits (off by at most 1/16 of the value) down to its subnormals (steps of 2^-9 x scale)
    scale = fp8.scales.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert ((fp8.dequantize() - w).abs() <= w.abs() / 16 + scale / 1024 + 1e-7).all()
    assert fp8.nbytes == 200 * 300 + 6 * 4
