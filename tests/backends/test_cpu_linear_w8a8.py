"""The w8a8 linear (csrc/linear_w8a8.c) against its plain-torch twin, `reference_linear`: int8 weights per output row,
activations quantized per row on the fly, int32 sums. The integer sums are exact, so the kernel's outputs differ from
the twin's (scaled in float64) by float32 rounding of the final scaling only. Both the AMX tile path (5 rows and
more) and the AVX512-VNNI path (fewer rows, and every row count with the tiles turned off)."""

import pytest
import torch

from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.formats.quantization import QuantScheme, quantize_activations, quantize_int8, reference_linear

needs_kernel = pytest.mark.skipif(not cpu_kernels.linear_w8a8_usable(), reason="the w8a8 linear needs AVX512-VNNI")
W8A8 = QuantScheme.parse("w8a8")
SHAPES = [(16, 32), (37, 33), (100, 130), (48, 7), (200, 1408), (33, 257), (64, 4100), (40, 9000)]
ROWS = [1, 2, 3, 4, 5, 7, 16, 31, 33, 64, 70]


def assert_matches_reference(got, x, weight, bias):
    """Within float32 rounding of the final scaling: a few units in the last place of the scaled sum, and of the
    bias where one is added (the twin adds it to its rounded product too)."""
    want = reference_linear(x, weight, bias)
    scaled = reference_linear(x, weight).abs()
    tolerance = 4 * 2**-24 * (scaled + (0 if bias is None else bias.abs()))
    excess = (got - want).abs() - tolerance
    assert excess.amax().item() <= 0, f"off by {(got - want).abs().amax().item():.3g} beyond float32 rounding"


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_the_reference(out_features, in_features, rows):
    torch.manual_seed(out_features * 7 + in_features + rows)
    weight = W8A8.quantize(torch.randn(out_features, in_features) * 0.05)
    bias = torch.randn(out_features) if rows % 2 else None
    x = torch.randn(rows, in_features) * torch.logspace(-4, 4, rows).unsqueeze(1)  # tiny to big rows
    if rows > 3:
        x[-2] *= 1e-37  # a row so tiny that 1 / its scale overflows
    if rows > 2:
        x[rows // 2] = 0  # a zero row: scale 0, outputs the bias alone
    got = cpu_kernels.linear_w8a8(x, cpu_kernels.pack_quantized(weight), out_features, bias)
    assert_matches_reference(got, x, weight, bias)
    if rows > 2:
        assert torch.equal(got[rows // 2], torch.zeros(out_features) if bias is None else bias)


@needs_kernel
@pytest.mark.parametrize("rows", [3, 40])
def test_vnni_path_without_tiles(monkeypatch, rows):
    """The VNNI path over many rows too (a CPU without AMX takes it for every row count): the same outputs as the
    tiles, bit for bit (both scale the same exact int32 sums the same way)."""
    torch.manual_seed(rows)
    weight = W8A8.quantize(torch.randn(70, 300) * 0.05)
    panels = cpu_kernels.pack_quantized(weight)
    x, bias = torch.randn(rows, 300), torch.randn(70)
    tiles = cpu_kernels.linear_w8a8(x, panels, 70, bias)
    monkeypatch.setattr(cpu_kernels, "W8A8_TILE_ROWS", 1 << 30)
    vnni = cpu_kernels.linear_w8a8(x, panels, 70, bias)
    assert_matches_reference(vnni, x, weight, bias)
    assert torch.equal(tiles, vnni)
    assert torch.equal(cpu_kernels.linear_w8a8(x[:1], panels, 70, bias), vnni[:1])  # one row alone: the same


@needs_kernel
@pytest.mark.parametrize("rows", [1, 4, 37])
def test_activations_round_as_quantize_activations(rows):
    """Weight rows 127 e_i (scale 1) and activations whose row maximum is 127 (scale 1): every output is one
    quantized activation times 127, exact in float32, so the kernel's rounding of x / scale (half to even, clamped)
    shows directly. Ties at .5 on both sides, values just past them, and the maximum itself."""
    k = 24
    weight = quantize_int8(127 * torch.eye(k), W8A8)
    assert torch.equal(weight.scales, torch.ones(k))
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 0.49999997, 2.5000002, -3.4999998, 127.0,
                         -127.0, 0.0, 63.5, 64.5, 1e-3, -1e-3, 100.25, -99.75, 3.5, 4.5, -5.5, 6.5])
    x = ties.repeat(rows, 1)
    x[:, 11] = 127  # every row's maximum: scale exactly 1
    got = cpu_kernels.linear_w8a8(x, cpu_kernels.pack_quantized(weight), k)
    xq, scales = quantize_activations(x)
    assert torch.equal(scales, torch.ones(rows))
    assert torch.equal(got, xq.float() * 127)
    assert xq[0, :6].tolist() == [0, 2, 2, 0, -2, -2]


@needs_kernel
def test_integer_sums_are_exact():
    """Sums past 2^24 are exact in int32 (a float32 accumulator would not be): all-127 rows over 9000 inputs."""
    weight = quantize_int8(torch.full((32, 9000), 127.0), W8A8)
    x = torch.full((6, 9000), 127.0)
    x[1, 5] = 126
    got = cpu_kernels.linear_w8a8(x, cpu_kernels.pack_quantized(weight), 32)
    assert got[0, 0].item() == float(torch.tensor(127 * 127 * 9000, dtype=torch.float32))
    assert got[1, 0].item() == float(torch.tensor(127 * 127 * 8999 + 126 * 127, dtype=torch.float32))


@needs_kernel
def test_a_wrong_kernel_is_caught():
    """The tolerance above sees one weight off by one step."""
    torch.manual_seed(0)
    weight = W8A8.quantize(torch.randn(32, 64))
    panels = cpu_kernels.pack_quantized(weight)
    weight.q[5, 40] += 1 if weight.q[5, 40] < 127 else -1
    x = torch.randn(6, 64)
    with pytest.raises(AssertionError, match="beyond float32 rounding"):
        assert_matches_reference(cpu_kernels.linear_w8a8(x, panels, 32), x, weight, None)


@needs_kernel
def test_batch_shapes_errors_and_empty_input():
    panels = cpu_kernels.pack_quantized(W8A8.quantize(torch.randn(24, 64)))
    assert cpu_kernels.linear_w8a8(torch.randn(2, 3, 64), panels, 24).shape == (2, 3, 24)
    assert cpu_kernels.linear_w8a8(torch.empty(0, 64), panels, 24).shape == (0, 24)
    with pytest.raises(TypeError, match="float32 activations"):
        cpu_kernels.linear_w8a8(torch.randn(2, 64).double(), panels, 24)
    with pytest.raises(ValueError, match="has 64 inputs, x has 32"):
        cpu_kernels.linear_w8a8(torch.randn(2, 32), panels, 24)


def test_packed_layout():
    torch.manual_seed(0)
    weight = W8A8.quantize(torch.randn(20, 70))
    panels = cpu_kernels.pack_quantized(weight)
    assert panels.packed.shape == (2, 32, 16, 4) and panels.packed.dtype == torch.int8  # K 70 -> 128, 2 panels
    assert panels.packed[1, 16, 3, 2].item() == weight.q[19, 66].item()  # row 16 + 3, input 4 * 16 + 2
    assert not panels.packed[1, :, 4:].any() and not panels.packed[:, 18:].any()
    assert torch.equal(panels.sums[:20], weight.q.sum(dim=1, dtype=torch.int32)) and not panels.sums[20:].any()
    assert torch.equal(panels.scales[:20], weight.scales) and panels.scales.shape == (32,)


@needs_kernel
@pytest.mark.parametrize("rows,in_features", [(1, 96), (4, 96), (5, 96), (70, 300), (40, 4200)])
def test_swiglu_is_the_linear_then_silu_mul(rows, in_features):
    """The fused gate/up + SwiGLU (tiles in one pass; few rows, and K past one depth range, through the linear):
    the linear's values followed by silu * up, without the (T, 2 I) product."""
    torch.manual_seed(rows)
    weight = W8A8.quantize(torch.randn(2 * 48, in_features) * 0.05)
    panels = cpu_kernels.pack_quantized(weight)
    x = torch.randn(rows, in_features)
    want = cpu_kernels.silu_mul(cpu_kernels.linear_w8a8(x, panels, 96))
    torch.testing.assert_close(cpu_kernels.linear_w8a8_swiglu(x, panels, 48), want, rtol=2e-7, atol=1e-7)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_kernels.linear_w8a8_swiglu(x, panels, 40)
