"""The bfloat16-weight linear (kernels/linear_bf16.c): one row as an fp32 GEMV over the bf16-rounded weight,
several rows on AMX tiles with the activations rounded to bf16 too; every row-block and panel-pair edge, K not a
multiple of 32, odd K, a depth summed in several ranges (K > 2048), bias; the packed layout; PackedLinear's choice of kernel."""

import pytest
import torch
import torch.nn.functional as F

from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.backends.cpu.packing import Kind, PackedLinear

needs_kernel = pytest.mark.skipif(not cpu_kernels.linear_bf16_usable(),
                                  reason="the bfloat16 linear needs AMX tiles and AVX512-BF16")


def _reference(x, weight, bias, rows):
    w = weight.bfloat16().double()
    xs = x.double() if rows == 1 else x.bfloat16().double()  # one row keeps x exact; tiles take bf16 rows
    return F.linear(xs, w, None if bias is None else bias.double()).float()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 15, 16, 17, 31, 32, 33, 64, 100])
@pytest.mark.parametrize("out_features,in_features",
                         [(16, 32), (37, 33), (768, 512), (100, 1408), (48, 7), (40, 4133), (64, 2080)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear_on_the_rounded_operands(rows, out_features, in_features, bias):
    torch.manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features) * 0.05
    b = torch.randn(out_features) if bias else None
    x = torch.randn(rows, in_features)
    got = cpu_kernels.linear_bf16(x, cpu_kernels.pack_bf16(weight), out_features, b)
    torch.testing.assert_close(got, _reference(x, weight, b, rows), rtol=1e-5, atol=3e-5)


def test_packed_layout_is_pairs_within_panels():
    weight = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)
    packed = cpu_kernels.pack_bf16(weight)
    # two panels (an even count), K padded to 32 in pairs of inputs: (panels, 16 pairs, 16 rows, 2)
    assert packed.shape == (2, 16, 16, 2) and packed.dtype == torch.bfloat16
    assert torch.equal(packed[0, 0, :, 0], weight[:16, 0].bfloat16())  # pair 0, first input: rows 0..15
    assert torch.equal(packed[0, 1, :, 0], weight[:16, 2].bfloat16())  # pair 1, first input is k = 2
    assert not packed[0, 1, :, 1].any() and not packed[1, :, 4:].any()  # past K and past N: zeros
    assert cpu_kernels.pack_bf16(torch.zeros(40, 64)).shape == (4, 32, 16, 2)  # 3 panels -> 4


@needs_kernel
def test_batch_shapes_and_empty_input():
    weight = torch.randn(24, 64)
    packed = cpu_kernels.pack_bf16(weight)
    x = torch.randn(2, 3, 64)
    assert cpu_kernels.linear_bf16(x, packed, 24).shape == (2, 3, 24)
    assert cpu_kernels.linear_bf16(torch.empty(0, 64), packed, 24).shape == (0, 24)
    with pytest.raises(TypeError, match="float32 activations"):
        cpu_kernels.linear_bf16(x.double(), packed, 24)


@pytest.mark.parametrize("kernel", [Kind.BF16, Kind.ONEDNN_BF16])
def test_packed_linear_takes_the_kernel_there_is(monkeypatch, kernel):
    if not cpu_kernels.native_bf16():
        pytest.skip("needs a CPU with native bf16")
    if kernel is Kind.BF16 and not cpu_kernels.linear_bf16_usable():
        pytest.skip("needs the bfloat16 linear kernel")
    if kernel is Kind.ONEDNN_BF16:
        monkeypatch.setattr(cpu_kernels, "linear_bf16_usable", lambda: False)
    weight, bias = torch.randn(40, 64) * 0.1, torch.randn(40)
    packed = PackedLinear(weight, bias, torch.bfloat16)
    assert packed.kind is kernel
    x = torch.randn(5, 64)
    torch.testing.assert_close(packed(x), _reference(x, weight, bias, 5), rtol=1e-2, atol=1e-2)


def test_a_file_whose_extra_flags_fail_builds_as_its_stub(monkeypatch, tmp_path, caplog):
    """A compiler that rejects linear_bf16.c's AMX flags (older gcc) costs the bf16 kernel, not the library."""
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("DSSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(cpu_kernels._FILE_FLAGS, "linear_bf16.c", lambda: ["-mno-such-flag-in-any-compiler"])
    assert cpu_kernels.library() is not None
    assert not cpu_kernels.linear_bf16_usable()
    assert "linear_bf16.c did not build with -mno-such-flag-in-any-compiler" in caplog.text


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 31, 33, 300])
@pytest.mark.parametrize("intermediate,in_features", [(16, 32), (48, 33), (160, 1408), (32, 2100)])
def test_swiglu_matches_silu_of_gate_times_up(rows, intermediate, in_features):
    torch.manual_seed(rows + intermediate)
    weight = torch.randn(2 * intermediate, in_features) * 0.05
    x = torch.randn(rows, in_features)
    got = cpu_kernels.linear_bf16_swiglu(x, cpu_kernels.pack_bf16(weight), intermediate)
    gate, up = _reference(x, weight, None, rows).double().chunk(2, dim=-1)
    torch.testing.assert_close(got, (F.silu(gate) * up).float(), rtol=1e-5, atol=3e-5)


@needs_kernel
@pytest.mark.parametrize("rows", [2, 300])
def test_deep_swiglu_is_the_linear_then_silu_mul(rows):
    """Past 2048 inputs the fused kernel runs the linear's depth ranges, 256 rows at a time, then silu * up: the
    same bits as the two calls."""
    torch.manual_seed(rows)
    weight, x = torch.randn(64, 2100) * 0.05, torch.randn(rows, 2100)
    packed = cpu_kernels.pack_bf16(weight)
    assert torch.equal(cpu_kernels.linear_bf16_swiglu(x, packed, 32),
                       cpu_kernels.silu_mul(cpu_kernels.linear_bf16(x, packed, 64)))


@needs_kernel
def test_swiglu_refuses_a_partial_panel():
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_kernels.linear_bf16_swiglu(torch.randn(2, 32), cpu_kernels.pack_bf16(torch.randn(40, 32)), 20)
    assert not PackedLinear(torch.randn(40, 32), None, torch.bfloat16).fuses_swiglu
    assert not PackedLinear(torch.randn(64, 32), torch.randn(64), torch.bfloat16).fuses_swiglu


@needs_kernel
def test_swiglu_writes_into_a_given_buffer():
    weight, x = torch.randn(64, 32) * 0.1, torch.randn(3, 32)
    packed = cpu_kernels.pack_bf16(weight)
    out = torch.empty(3, 32)
    assert cpu_kernels.linear_bf16_swiglu(x, packed, 32, out=out) is out
    torch.testing.assert_close(out, cpu_kernels.linear_bf16_swiglu(x, packed, 32))
    with pytest.raises(ValueError, match="contiguous float32 \\(3, 32\\)"):
        cpu_kernels.linear_bf16_swiglu(x, packed, 32, out=torch.empty(3, 16))
