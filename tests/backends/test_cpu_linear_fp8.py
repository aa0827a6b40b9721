"""The fp8 linear (csrc/linear_fp8.c) against its plain-torch twin, formats/quantization.py `reference_linear`: per
128 inputs an fp32 sum of x times the e4m3 values, times that block's scale for the row; x exact for one row (the
GEMV), rounded to bf16 for several (the AMX tiles). Odd N and K (not multiples of 16 or 128), 1-70 rows, bias,
both scale shapes (128 x 128 blocks, per row), every e4m3 byte including subnormals and NaN."""

import pytest
import torch

from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.formats.quantization import QuantizedWeight, QuantScheme, quantize_fp8, reference_linear

needs_kernel = pytest.mark.skipif(not cpu_kernels.linear_fp8_usable(),
                                  reason="the fp8 linear needs AMX tiles and AVX512-BF16")

SHAPES = [(16, 32), (37, 33), (100, 130), (48, 7), (200, 1408), (129, 257), (300, 128)]
FP8 = QuantScheme.parse("fp8")


def _tolerance(want, in_features):
    return dict(rtol=1e-5, atol=2e-6 * (want.abs().amax().item() + 1e-3) * in_features ** 0.5)


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 5, 33, 64, 70])
def test_matches_the_twin(out_features, in_features, rows):
    torch.manual_seed(out_features * 7 + in_features + rows)
    weight = torch.randn(out_features, in_features) * 0.05
    bias = torch.randn(out_features) if rows % 2 else None
    x = torch.randn(rows, in_features)
    quantized = quantize_fp8(weight)
    got = cpu_kernels.linear_fp8(x, cpu_kernels.pack_quantized(quantized), out_features, bias)
    want = reference_linear(x, quantized, bias)
    torch.testing.assert_close(got, want, **_tolerance(want, in_features))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 40])
def test_per_row_scales_and_every_byte(rows):
    """Every e4m3 byte value (subnormals 0x01-0x07, negative zero, the largest 0x7e = 448) with a scale per row per
    128 inputs: the widening to bf16 is exact, so the kernel equals the twin; NaN bytes give NaN outputs."""
    torch.manual_seed(rows)
    bytes_ = torch.arange(256, dtype=torch.int32).remainder(256).to(torch.uint8)
    finite = bytes_[(bytes_ & 0x7f) != 0x7f]
    q = finite[torch.randint(len(finite), (45, 300))].view(torch.float8_e4m3fn)
    scales = torch.rand(45, 3) * 0.01
    quantized = QuantizedWeight(FP8, q, scales, None, 300)
    x = torch.randn(rows, 300)
    got = cpu_kernels.linear_fp8(x, cpu_kernels.pack_quantized(quantized), 45)
    want = reference_linear(x, quantized)
    torch.testing.assert_close(got, want, **_tolerance(want, 300))
    q[7, 200] = torch.tensor([0x7f], dtype=torch.uint8).view(torch.float8_e4m3fn)[0]
    q[9, 3] = torch.tensor([0xff], dtype=torch.uint8).view(torch.float8_e4m3fn)[0]
    got = cpu_kernels.linear_fp8(x, cpu_kernels.pack_quantized(quantized), 45)
    assert got[:, 7].isnan().all() and got[:, 9].isnan().all() and not got[:, [0, 8, 10, 44]].isnan().any()


@needs_kernel
def test_a_wrong_kernel_is_caught():
    """The tolerance is tight enough to see one weight one e4m3 step off, and a scale applied to the wrong block."""
    torch.manual_seed(0)
    quantized = quantize_fp8(torch.randn(32, 256) * 0.05)
    x = torch.randn(1, 256)
    panels = cpu_kernels.pack_quantized(quantized)
    want = reference_linear(x, quantized)
    q = quantized.q.view(torch.uint8).clone()
    q[5, 40] += 1
    off = QuantizedWeight(FP8, q.view(torch.float8_e4m3fn), quantized.scales, None, 256)
    assert not torch.allclose(cpu_kernels.linear_fp8(x, cpu_kernels.pack_quantized(off), 32), want,
                              **_tolerance(want, 256))
    swapped = QuantizedWeight(FP8, quantized.q, quantized.scales.flip(1), None, 256)
    assert not torch.allclose(cpu_kernels.linear_fp8(x, cpu_kernels.pack_quantized(swapped), 32), want,
                              **_tolerance(want, 256))
    torch.testing.assert_close(cpu_kernels.linear_fp8(x, panels, 32), want, **_tolerance(want, 256))


@needs_kernel
def test_batch_shapes_errors_and_empty_input():
    panels = cpu_kernels.pack_quantized(quantize_fp8(torch.randn(24, 64)))
    assert cpu_kernels.linear_fp8(torch.randn(2, 3, 64), panels, 24).shape == (2, 3, 24)
    assert cpu_kernels.linear_fp8(torch.empty(0, 64), panels, 24).shape == (0, 24)
    with pytest.raises(TypeError, match="float32 activations"):
        cpu_kernels.linear_fp8(torch.randn(2, 64).double(), panels, 24)
    with pytest.raises(ValueError, match="has 64 inputs, x has 32"):
        cpu_kernels.linear_fp8(torch.randn(2, 32), panels, 24)


def test_packed_layout_and_scale_shapes():
    weight = torch.randn(20, 150)
    quantized = quantize_fp8(weight)
    assert quantized.scales.shape == (1, 2)
    panels = cpu_kernels.pack_fp8(quantized)
    assert panels.packed.shape == (2, 128, 16, 2) and panels.scales.shape == (2, 2, 16)  # K 150 -> 2 blocks
    q = quantized.q.view(torch.uint8)
    assert int(panels.packed[1, 7, 3, 1]) == int(q[19, 15])  # row 16 + 3, input 2 * 7 + 1
    assert not panels.packed[1, :, 4:].any() and not panels.packed[0, 75:].any()  # rows past 20, inputs past 150
    assert torch.equal(panels.scales[1, 1, :4], quantized.scales[0, 1].expand(4)) and not panels.scales[1, :, 4:].any()
    per_row = QuantizedWeight(FP8, quantized.q, quantized.row_scales(), None, 150)
    assert torch.equal(per_row.dequantize(), quantized.dequantize())
    with pytest.raises(ValueError, match=r"takes scales of shape \(1, 2\).*or \(20, 2\)"):
        QuantizedWeight(FP8, quantized.q, torch.ones(2, 2), None, 150)


def test_twin_is_exact_on_e4m3_values():
    """The twin's sums: x exact for one row, rounded to bf16 for several; each equals F.linear on the dequantized
    weight up to fp32 rounding."""
    torch.manual_seed(1)
    quantized = quantize_fp8(torch.randn(40, 300))
    x = torch.randn(3, 300)
    dense = torch.nn.functional.linear
    torch.testing.assert_close(reference_linear(x[:1], quantized), dense(x[:1], quantized.dequantize()))
    torch.testing.assert_close(reference_linear(x, quantized), dense(x.bfloat16().float(), quantized.dequantize()))
