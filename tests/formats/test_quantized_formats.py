"""The pre-quantized checkpoint readers: tiny tensors packed as each format publishes them (compressed-tensors' own
packer; AutoAWQ's and AutoGPTQ's packing loops written out here from their code), converted, and dequantized: the
result must equal the format's own dequantization, written independently below from the integers the test packed."""

import pytest
import torch

from dsserve.errors import ConfigError, WeightsError
from dsserve.formats.quantized import (AwqGemm, ChannelInt8, Fp8Checkpoint, Gptq, PackedInt, detect_format)
from dsserve.formats.quantization import QuantScheme

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ WQLinear_GEMM.from_linear's order_map


def _ints(low, high, shape, seed):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def _scales(shape, dtype, seed):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.02 + 1e-3).to(dtype)


def _grouped(values, group, dim):
    """Repeat per-group values (…, groups) along the inputs: column k gets group k // group."""
    return values.repeat_interleave(group, dim)


# --- AWQ (AutoAWQ GEMM): intweight (K, N), qweight (K, N/8), nibble i of column c holds output c*8 + AWQ_ORDER[i]


def _awq_pack(ints):  # (R, C) unsigned 4-bit values -> (R, C/8) int32, as WQLinear_GEMM.from_linear packs them
    packed = torch.zeros(ints.shape[0], ints.shape[1] // 8, dtype=torch.int32)
    for col in range(ints.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= ints[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    return packed


@pytest.mark.parametrize("rows, cols, group", [(24, 64, 32), (40, 128, 64), (8, 384, 128)])
def test_awq_gemm(rows, cols, group):
    q = _ints(0, 16, (cols, rows), 1)  # (K, N) as AWQ holds it
    zeros = _ints(0, 16, (cols // group, rows), 2)
    scales = _scales((cols // group, rows), torch.float16, 3)
    tensors = {"qweight": _awq_pack(q), "qzeros": _awq_pack(zeros), "scales": scales}
    reference = ((q - _grouped(zeros, group, 0)).float() * _grouped(scales.float(), group, 0)).t()  # (N, K)
    converted = AwqGemm(QuantScheme(4, group, True)).convert(tensors, "layer")
    assert converted.input_order is None
    assert converted.weight.scheme == QuantScheme(4, group, True)
    assert torch.equal(converted.weight.dequantize(), reference)


# --- GPTQ (AutoGPTQ QuantLinear.pack): qweight (K/pf, N) packed along the inputs, qzeros (G, N/pf) along the outputs


def _gptq_pack_rows(ints, bits):  # (R, C) -> (R/pf, C): value j of row r at bits*j of packed row r // pf
    per_int = 32 // bits
    packed = torch.zeros(ints.shape[0] // per_int, ints.shape[1], dtype=torch.int32)
    for row in range(packed.shape[0]):
        for j in range(per_int):
            packed[row] |= ints[row * per_int + j] << (bits * j)
    return packed


def _gptq_pack_cols(ints, bits):  # (R, C) -> (R, C/pf)
    return _gptq_pack_rows(ints.t().contiguous(), bits).t().contiguous()


def _gptq_tensors(rows, cols, group, bits, sym, v1, act_order, seed=0):
    groups = 1 if group == -1 else -(-cols // group)
    maxq = (1 << bits) - 1
    if act_order:  # columns quantized in a random order: g_idx[k] = (position of k in that order) // group
        perm = torch.randperm(cols, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(cols, dtype=torch.int32)
        g_idx[perm] = (torch.arange(cols) // group).int()
    else:
        g_idx = (torch.arange(cols) // (cols if group == -1 else group)).int()
    zeros = torch.full((groups, rows), 1 << (bits - 1), dtype=torch.int32) if sym else _ints(0, maxq + 1,
                                                                                           (groups, rows), seed + 1)
    q = _ints(0, maxq + 1, (cols, rows), seed + 2)
    scales = _scales((groups, rows), torch.float16, seed + 3)
    stored_zeros = (zeros - 1) & maxq if v1 else zeros  # v1 stores z - 1 (wrapping in the field)
    tensors = {"qweight": _gptq_pack_rows(q, bits), "qzeros": _gptq_pack_cols(stored_zeros, bits), "scales": scales,
               "g_idx": g_idx}
    # GPTQ's dequantization (v1 adds 1 back to the stored field, without wrapping)
    z = ((stored_zeros + 1) if v1 else stored_zeros)[g_idx.long()]  # (K, N)
    reference = ((q - z).float() * scales.float()[g_idx.long()]).t()  # (N, K)
    return tensors, reference


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("v1", [True, False], ids=["gptq", "gptq_v2"])
def test_gptq_4bit(group, sym, v1):
    tensors, reference = _gptq_tensors(24, 256 + group, group, 4, sym, v1, act_order=False)
    fmt = detect_format({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": sym,
                                                 "desc_act": False,
                                                 "checkpoint_format": "gptq" if v1 else "gptq_v2"}})
    converted = fmt.convert(tensors, "layer")
    assert converted.input_order is None
    assert converted.weight.scheme == QuantScheme(4, group, not sym)
    assert torch.equal(converted.weight.dequantize(), reference)


def test_gptq_v1_zero_point_zero_reads_as_sixteen():
    """v1 stores z - 1 in four bits, so a zero point of 0 comes back as 16 (GPTQ's own dequantization does the same):
    the reader gives what the format computes."""
    tensors, reference = _gptq_tensors(8, 64, 32, 4, False, True, act_order=False, seed=5)
    tensors["qzeros"] = torch.full_like(tensors["qzeros"], -1)  # every stored field 15
    q = Gptq(QuantScheme(4, 32, True), zero_offset=1).convert(tensors, "layer").weight
    assert int(q.zeros.max()) == 16 and int(q.zeros.min()) == 16


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_desc_act_reorders_inputs_into_contiguous_groups(sym):
    rows, cols, group = 16, 192, 32
    tensors, reference = _gptq_tensors(rows, cols, group, 4, sym, True, act_order=True, seed=7)
    converted = Gptq(QuantScheme(4, group, not sym), zero_offset=1).convert(tensors, "layer")
    order = converted.input_order
    assert order is not None and torch.equal(order.sort().values, torch.arange(cols))
    assert torch.equal(converted.weight.dequantize(), reference[:, order])
    x = torch.randn(3, cols, dtype=torch.float64)
    torch.testing.assert_close(x[:, order] @ converted.weight.dequantize().double().t(), x @ reference.double().t())


def test_gptq_8bit_per_row():
    tensors, reference = _gptq_tensors(24, 96, -1, 8, True, True, act_order=False, seed=9)
    converted = detect_format({"quantization_config": {"quant_method": "gptq", "bits": 8, "group_size": -1,
                                                       "sym": True, "desc_act": False}}).convert(tensors, "layer")
    assert converted.weight.scheme == QuantScheme.parse("int8")
    assert converted.weight.q.dtype == torch.int8
    assert torch.equal(converted.weight.dequantize(), reference)


def test_gptq_inconsistent_g_idx_is_an_error():
    tensors, _ = _gptq_tensors(8, 64, 32, 4, True, True, act_order=False)
    tensors["g_idx"] = torch.zeros(64, dtype=torch.int32)  # every input in group 0: 64 inputs in a group of 32
    with pytest.raises(WeightsError, match="g_idx"):
        Gptq(QuantScheme(4, 32, False), zero_offset=1).convert(tensors, "model.layers.0.mlp.down_proj")


# --- compressed-tensors, with its own packer and dequantization


try:  # the test extra pins it
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
except ImportError:
    pack_to_int32 = None
needs_compressed_tensors = pytest.mark.skipif(pack_to_int32 is None, reason="compressed-tensors is not installed "
                                                                             "(pip install -e '.[test]')")


def _ct_config(fmt, weights, activations=None):
    group = {"targets": ["Linear"], "weights": weights, "input_activations": activations}
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": fmt,
                                    "config_groups": {"group_0": group}, "ignore": ["lm_head"]}}


@needs_compressed_tensors
@pytest.mark.parametrize("rows, groups", [(37, 3), (16, 2), (13, 1)])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_compressed_tensors_pack_quantized_int4(rows, groups, group, symmetric):
    cols = groups * group  # compressed-tensors' own dequantization needs whole groups
    q = _ints(-8, 8, (rows, cols), 11).to(torch.int8)
    scales = _scales((rows, groups), torch.bfloat16, 12)
    zero_points = _ints(-8, 8, (rows, groups), 13).to(torch.int8) if not symmetric else torch.zeros(rows, groups,
                                                                                                   dtype=torch.int8)
    tensors = {"weight_packed": pack_to_int32(q, 4), "weight_scale": scales, "weight_shape": torch.tensor([rows, cols])}
    if not symmetric:
        tensors["weight_zero_point"] = pack_to_int32(zero_points, 4, packed_dim=0)
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group}
    fmt = detect_format(_ct_config("pack-quantized", weights))
    converted = fmt.convert(tensors, "layer")
    assert converted.weight.scheme == QuantScheme(4, group, not symmetric)
    reference = (q.float() - _grouped(zero_points.float(), group, 1)) * _grouped(scales.float(), group, 1)
    assert torch.equal(converted.weight.dequantize(), reference)
    # compressed-tensors' own decompression (given float32 scales so that it computes in float32)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    own = PackedQuantizationCompressor.decompress({**tensors, "weight_scale": scales.float()}, scheme)
    assert torch.equal(converted.weight.dequantize(), own["weight"])


@needs_compressed_tensors
def test_compressed_tensors_partial_last_group_and_actorder_group():
    """A K that is not a multiple of the group (dsserve pads the last group) and actorder group (weight_g_idx)."""
    rows, cols, group = 9, 100, 32
    q = _ints(-8, 8, (rows, cols), 21).to(torch.int8)
    scales = _scales((rows, 4), torch.float16, 22)
    perm = torch.randperm(cols, generator=torch.Generator().manual_seed(23))
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[perm] = (torch.arange(cols) // group).int()
    tensors = {"weight_packed": pack_to_int32(q, 4), "weight_scale": scales, "weight_shape": torch.tensor([rows, cols]),
               "weight_g_idx": g_idx}
    weights = {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": group, "actorder": "group"}
    converted = detect_format(_ct_config("pack-quantized", weights)).convert(tensors, "layer")
    reference = q.float() * scales.float()[:, g_idx.long()]
    assert torch.equal(converted.weight.dequantize(), reference[:, converted.input_order])
    assert converted.weight.q.shape == (rows, 128) and not converted.weight.q[:, cols:].any()


@needs_compressed_tensors
def test_compressed_tensors_pack_quantized_int8():
    rows, cols = 13, 70
    q = _ints(-128, 128, (rows, cols), 31).to(torch.int8)
    scales = _scales((rows, 1), torch.bfloat16, 32)
    tensors = {"weight_packed": pack_to_int32(q, 8), "weight_scale": scales, "weight_shape": torch.tensor([rows, cols])}
    weights = {"num_bits": 8, "symmetric": True, "strategy": "channel"}
    converted = detect_format(_ct_config("pack-quantized", weights)).convert(tensors, "layer")
    assert converted.weight.scheme == QuantScheme.parse("int8")
    assert torch.equal(converted.weight.dequantize(), q.float() * scales.float())


W8A8_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
W8A8_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


@pytest.mark.parametrize("config, method", [
    pytest.param(_ct_config("int-quantized", W8A8_WEIGHTS, W8A8_ACTIVATIONS), "compressed-tensors int-quantized",
                 id="compressed-tensors-w8a8"),
    pytest.param({"quantization_config": {"quant_method": "w8a8_int8", "activation_scheme": "dynamic"}}, "w8a8_int8",
                 id="sglang-channel-int8"),
])
def test_channel_int8_w8a8(config, method):
    rows, cols = 11, 50
    q = _ints(-127, 128, (rows, cols), 41).to(torch.int8)
    scales = _scales((rows, 1), torch.float32, 42)
    fmt = detect_format(config)
    assert isinstance(fmt, ChannelInt8) and fmt.method == method and fmt.scheme == QuantScheme.parse("w8a8")
    converted = fmt.convert({"weight": q, "weight_scale": scales}, "layer")
    assert torch.equal(converted.weight.dequantize(), q.float() * scales)
    assert converted.weight.scales.dtype == torch.float32 and converted.weight.scales.shape == (rows,)


def test_detection_of_the_other_spellings():
    """AutoAWQ's own field names (w_bit, q_group_size) and compressed-tensors int8 weights without activations
    (W8A16 in naive-quantized / int-quantized) are read too."""
    awq = detect_format({"quantization_config": {"quant_method": "awq", "w_bit": 4, "q_group_size": 64,
                                                 "zero_point": True, "version": "GEMM"}})
    assert isinstance(awq, AwqGemm) and awq.scheme == QuantScheme(4, 64, True)
    w8a16 = detect_format(_ct_config("naive-quantized", W8A8_WEIGHTS))
    assert isinstance(w8a16, ChannelInt8) and w8a16.scheme == QuantScheme.parse("int8")
    q, scales = _ints(-127, 128, (5, 7), 101).to(torch.int8), _scales((5, 1), torch.bfloat16, 102)
    converted = w8a16.convert({"weight": q, "weight_scale": scales}, "layer")
    assert torch.equal(converted.weight.dequantize(), q.float() * scales.float())


def test_linears_groups_the_tensors_of_each_quantized_linear():
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.qweight",
             "model.layers.0.self_attn.q_proj.qzeros", "model.layers.0.self_attn.q_proj.scales",
             "model.layers.0.self_attn.q_proj.g_idx", "model.layers.0.self_attn.q_proj.bias", "lm_head.weight"]
    fmt = Gptq(QuantScheme(4, 128, False), zero_offset=1)
    prefix = "model.layers.0.self_attn.q_proj"
    assert fmt.linears(names) == {prefix: {s: f"{prefix}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")}}
    with pytest.raises(WeightsError, match=r"q_proj\.scales is missing"):
        fmt.linears([n for n in names if not n.endswith("scales")])


def test_fp8_checkpoints_are_detected_for_the_fp8_path():
    float_weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    detected = detect_format(_ct_config("float-quantized", float_weights, {**float_weights, "strategy": "token",
                                                                          "dynamic": True}))
    assert isinstance(detected, Fp8Checkpoint) and detected.method == "compressed-tensors float-quantized"
    deepseek = detect_format({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    assert isinstance(deepseek, Fp8Checkpoint) and deepseek.method == "fp8"
    assert detect_format({"model_type": "qwen2"}) is None


def _gptq(**fields):
    return {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
                                    "desc_act": False, **fields}}


def _awq(**fields):
    return {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                    "version": "gemm", **fields}}


@pytest.mark.parametrize("config, message", [
    pytest.param({"quantization_config": {"quant_method": "bitsandbytes"}}, "quant_method='bitsandbytes'", id="bnb"),
    pytest.param(_gptq(bits=3), "quantization_config.bits=3 is not supported", id="gptq-3bit"),
    pytest.param(_gptq(bits=2), "quantization_config.bits=2", id="gptq-2bit"),
    pytest.param(_gptq(group_size=-1), "quantization_config.group_size=-1", id="gptq-4bit-per-channel"),
    pytest.param(_gptq(group_size=256), "quantization_config.group_size=256", id="gptq-group-256"),
    pytest.param(_gptq(bits=8, group_size=128), "quantization_config.group_size=128", id="gptq-8bit-grouped"),
    pytest.param(_gptq(bits=8, group_size=-1, sym=False), "quantization_config.sym=False", id="gptq-8bit-asym"),
    pytest.param(_gptq(checkpoint_format="marlin"), "checkpoint_format='marlin'", id="gptq-marlin"),
    pytest.param(_gptq(dynamic={r"+:.*\.1\..*": {"bits": 8}}), "quantization_config.dynamic=", id="gptq-dynamic"),
    pytest.param(_awq(bits=8), "quantization_config.bits=8", id="awq-8bit"),
    pytest.param(_awq(version="gemv"), "quantization_config.version='gemv'", id="awq-gemv"),
    pytest.param(_awq(zero_point=False), "quantization_config.zero_point=False", id="awq-no-zero-point"),
    pytest.param(_awq(group_size=-1), "quantization_config.group_size=-1", id="awq-per-channel"),
    pytest.param({"quantization_config": {"quant_method": "w8a8_int8", "activation_scheme": "static"}},
                 "activation_scheme='static'", id="int8-static-activations"),
    pytest.param(_ct_config("pack-quantized", {"num_bits": 3, "strategy": "group", "group_size": 128}),
                 "config_groups.group_0.weights.num_bits=3", id="ct-3bit"),
    pytest.param(_ct_config("pack-quantized", {"num_bits": 4, "strategy": "channel"}),
                 "config_groups.group_0.weights.strategy='channel'", id="ct-int4-channel"),
    pytest.param(_ct_config("pack-quantized", {"num_bits": 4, "strategy": "group", "group_size": 16}),
                 "config_groups.group_0.weights.group_size=16", id="ct-group-16"),
    pytest.param(_ct_config("pack-quantized", {"num_bits": 8, "strategy": "channel", "symmetric": False}),
                 "config_groups.group_0.weights.symmetric=False", id="ct-int8-asym"),
    pytest.param(_ct_config("int-quantized", {**W8A8_WEIGHTS, "strategy": "tensor"}, W8A8_ACTIVATIONS),
                 "weights.strategy='tensor'", id="ct-w8a8-per-tensor"),
    pytest.param(_ct_config("int-quantized", W8A8_WEIGHTS, {**W8A8_ACTIVATIONS, "dynamic": False,
                                                            "strategy": "tensor"}),
                 "input_activations.strategy='tensor'", id="ct-w8a8-static"),
    pytest.param(_ct_config("int-quantized", W8A8_WEIGHTS, {**W8A8_ACTIVATIONS, "symmetric": False}),
                 "input_activations.symmetric=False", id="ct-w8a8-asym-activations"),
    pytest.param(_ct_config("sparse-24-bitmask", W8A8_WEIGHTS), "quantization_config.format='sparse-24-bitmask'",
                 id="ct-sparse-format"),
    pytest.param({"quantization_config": {**_ct_config("int-quantized", W8A8_WEIGHTS)["quantization_config"],
                                          "kv_cache_scheme": {"num_bits": 8, "type": "float"}}},
                 "quantization_config.kv_cache_scheme=", id="ct-kv-cache"),
])
def test_unsupported_variants_name_the_field(config, message):
    with pytest.raises(ConfigError, match="is not supported") as error:
        detect_format(config)
    assert message in str(error.value)


def test_a_tensor_of_the_wrong_dtype_names_the_tensor():
    with pytest.raises(WeightsError, match=r"model\.x\.weight is torch\.float16, not torch\.int8"):
        ChannelInt8("w8a8_int8", QuantScheme.parse("w8a8")).convert(
            {"weight": torch.zeros(2, 2, dtype=torch.float16), "weight_scale": torch.ones(2, 1)}, "model.x")


# --- tensor parallelism: a slice of the checkpoint tensors converts to that slice of the whole


def _awq_case():
    rows, cols, group = 48, 256, 64
    q, zeros = _ints(0, 16, (cols, rows), 51), _ints(0, 16, (cols // group, rows), 52)
    tensors = {"qweight": _awq_pack(q), "qzeros": _awq_pack(zeros), "scales": _scales((cols // group, rows),
                                                                                      torch.float16, 53)}
    return AwqGemm(QuantScheme(4, group, True)), tensors


def _gptq_case(bits, sym):
    group = 64 if bits == 4 else -1
    tensors, _ = _gptq_tensors(48, 256, group, bits, sym, True, act_order=False, seed=61)
    scheme = QuantScheme(4, group, not sym) if bits == 4 else QuantScheme.parse("int8")
    return Gptq(scheme, zero_offset=1), tensors


def _ct_case(bits, symmetric):
    rows, cols, group = 44, 256, 64
    q = _ints(-(1 << (bits - 1)), 1 << (bits - 1), (rows, cols), 71).to(torch.int8)
    groups = cols // group if bits == 4 else 1
    tensors = {"weight_packed": pack_to_int32(q, bits), "weight_scale": _scales((rows, groups), torch.bfloat16, 72),
               "weight_shape": torch.tensor([rows, cols])}
    if not symmetric:
        tensors["weight_zero_point"] = pack_to_int32(_ints(-8, 8, (rows, groups), 73).to(torch.int8), 4, packed_dim=0)
    scheme = QuantScheme(4, group, not symmetric) if bits == 4 else QuantScheme.parse("int8")
    return PackedInt(scheme), tensors


def _int8_case():
    tensors = {"weight": _ints(-127, 128, (44, 100), 81).to(torch.int8), "weight_scale": _scales((44, 1), torch.float32,
                                                                                               82)}
    return ChannelInt8("w8a8_int8", QuantScheme.parse("w8a8")), tensors


SLICE_CASES = [
    pytest.param(_awq_case, id="awq"),
    pytest.param(lambda: _gptq_case(4, True), id="gptq-4bit-sym"),
    pytest.param(lambda: _gptq_case(4, False), id="gptq-4bit-asym"),
    pytest.param(lambda: _gptq_case(8, True), id="gptq-8bit"),
    pytest.param(lambda: _ct_case(4, True), id="ct-int4", marks=needs_compressed_tensors),
    pytest.param(lambda: _ct_case(4, False), id="ct-int4-zp", marks=needs_compressed_tensors),
    pytest.param(lambda: _ct_case(8, True), id="ct-int8", marks=needs_compressed_tensors),
    pytest.param(_int8_case, id="channel-int8"),
]


@pytest.mark.parametrize("case", SLICE_CASES)
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_slices_convert_to_slices_of_the_whole(case, world):
    fmt, tensors = case()
    whole = fmt.convert(tensors, "layer").weight.dequantize()
    rows, cols = whole.shape
    for rank in range(world):
        # column slices start on multiples of 8 rows (packed zero points, AWQ's int32s); the last one runs to the end
        n0, n1 = rank * rows // world // 8 * 8, (rank + 1) * rows // world // 8 * 8 if rank < world - 1 else rows
        column = fmt.convert(fmt.slice_tensors(tensors, "column", n0, n1, "layer"), "layer").weight
        assert torch.equal(column.dequantize(), whole[n0:n1])
        k0, k1 = rank * cols // world, (rank + 1) * cols // world
        row = fmt.convert(fmt.slice_tensors(tensors, "row", k0, k1, "layer"), "layer").weight
        assert row.in_features == k1 - k0 and torch.equal(row.dequantize(), whole[:, k0:k1])


@pytest.mark.parametrize("parallel, start, stop, message", [
    pytest.param("row", 0, 96, "inputs 0:96 of 256", id="inside-a-group"),
    pytest.param("column", 4, 24, "output rows 4:24 of 48", id="inside-a-packed-int32"),
])
def test_a_slice_off_the_packing_boundaries_is_refused(parallel, start, stop, message):
    fmt, tensors = _awq_case()
    with pytest.raises(WeightsError, match=message):
        fmt.slice_tensors(tensors, parallel, start, stop, "layer")


def test_desc_act_linears_are_not_split_by_inputs():
    tensors, _ = _gptq_tensors(16, 128, 32, 4, True, True, act_order=True, seed=91)
    fmt = Gptq(QuantScheme(4, 32, False), zero_offset=1)
    with pytest.raises(WeightsError, match="cannot be split row-parallel"):
        fmt.slice_tensors(tensors, "row", 0, 64, "layer")
    whole = fmt.convert(tensors, "layer")
    column = fmt.convert(fmt.slice_tensors(tensors, "column", 8, 16, "layer"), "layer")
    assert torch.equal(column.input_order, whole.input_order)
    assert torch.equal(column.weight.dequantize(), whole.weight.dequantize()[8:16])
