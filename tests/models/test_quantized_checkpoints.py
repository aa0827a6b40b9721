"""Checkpoints other tools quantized (formats/quantized.py) load with no flag: a tiny Qwen2 / DeepSeek-V3 written by
the test in each format (compressed-tensors by `dsserve weights quantize`; AWQ, GPTQ and SGLang's w8a8_int8 packed
as tests/formats packs them) gives the greedy tokens and logprobs of the float path on its dequantized weights
(written as a second checkpoint), its quantized linears packed in their own form on the CPU backend; -tp 2 equals
-tp 1."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsserve import LLM, SamplingParams
from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.backends.cpu.packing import Kind
from dsserve.config import ModelConfig
from dsserve.errors import ConfigError, WeightsError
from dsserve.formats.quantized import checkpoint_reader
from dsserve.layers.linear import Linear
from dsserve.layers.moe import ExpertMLP, Experts
from dsserve.formats.quantization import QuantScheme
from dsserve.weights.quantize import quantize_checkpoint
from formats.test_quantized_formats import _awq_pack, _gptq_pack_cols, _gptq_pack_rows

PROMPTS = [[5, 17, 33, 9, 100, 7], [3, 4], [250, 11, 12, 13, 14, 15, 16, 17, 18]]
OPTIONS = dict(num_kv_blocks=64, max_model_len=256, weight_dtype="float32")
GROUP = 32
QWEN2_CONFIG = {"model_type": "qwen2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": 4}
needs_kernel = pytest.mark.skipif(not cpu_kernels.linear_quant_usable(), reason="the quantized linears need AVX-512")
# the inputs each projection reads: GPTQ desc_act quantizes linears of the same inputs in the same order
INPUTS = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp", "up_proj": "mlp",
          "down_proj": "down"}


def _tensors(folder):
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


def _write(src, dst, tensors, quantization_config=None):
    """`src`'s config and tokenizer with `tensors` as its weights (and `quantization_config`)."""
    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        shard.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# --- each format's tensors for one float weight (N, K), and the values its own dequantization gives


def _awq(w):
    """AutoAWQ GEMM: per group of the inputs scale = (max - min) / 15, zero = round(-min / scale); intweight (K, N)."""
    groups = w.t().reshape(-1, GROUP, w.shape[0])  # (G, g, N)
    low, high = groups.amin(1).clamp(max=0), groups.amax(1).clamp(min=0)
    scales = ((high - low) / 15).clamp(min=1e-5).half()  # (G, N)
    zeros = torch.round(-low / scales.float()).clamp(0, 15).int()
    q = torch.round(groups / scales.float().unsqueeze(1)).int() + zeros.unsqueeze(1)
    q = q.clamp(0, 15).reshape(w.shape[1], w.shape[0])  # (K, N)
    value = ((q - zeros.repeat_interleave(GROUP, 0)).float() * scales.float().repeat_interleave(GROUP, 0)).t()
    return {"qweight": _awq_pack(q), "qzeros": _awq_pack(zeros), "scales": scales}, value


def _gptq(w, order, sym):
    """AutoGPTQ (v1: qzeros holds zero - 1): the inputs quantized in `order` (desc_act; arange: none), group j the
    inputs at positions j*g...(j+1)*g of that order; g_idx[k] = the group of input k."""
    g_idx = torch.empty(w.shape[1], dtype=torch.int32)
    g_idx[order] = (torch.arange(w.shape[1]) // GROUP).int()
    groups = w[:, order].t().reshape(-1, GROUP, w.shape[0])  # (G, g, N)
    if sym:
        scales = (groups.abs().amax(1) / 7).clamp(min=1e-5).half()
        zeros = torch.full(scales.shape, 8, dtype=torch.int32)
    else:
        low, high = groups.amin(1).clamp(max=0), groups.amax(1).clamp(min=0)
        scales = ((high - low) / 15).clamp(min=1e-5).half()
        zeros = torch.round(-low / scales.float()).clamp(1, 15).int()  # v1 stores zero - 1: keep it >= 0
    rows = g_idx.long()  # each input's group
    q = torch.round(w.t() / scales.float()[rows]).int() + zeros[rows]
    q = q.clamp(0, 15)  # (K, N)
    value = ((q - zeros[rows]).float() * scales.float()[rows]).t()
    tensors = {"qweight": _gptq_pack_rows(q, 4), "qzeros": _gptq_pack_cols(zeros - 1, 4), "scales": scales,
               "g_idx": g_idx}
    return tensors, value


def _channel_int8(w):
    """SGLang w8a8_int8: int8 weight, float32 scale per output row (N, 1)."""
    scales = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-8)
    q = torch.round(w / scales).clamp(-127, 127).to(torch.int8)
    return {"weight": q, "weight_scale": scales}, q.float() * scales


FORMATS = {
    "awq": ({"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": GROUP, "zero_point": True},
            lambda w, order: _awq(w), QuantScheme(4, GROUP, True)),
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True, "desc_act": False},
             lambda w, order: _gptq(w, torch.arange(w.shape[1]), sym=True), QuantScheme(4, GROUP)),
    "gptq-desc-act": ({"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": False, "desc_act": True},
                      lambda w, order: _gptq(w, order, sym=False), QuantScheme(4, GROUP, True)),
    "w8a8_int8": ({"quant_method": "w8a8_int8", "activation_scheme": "dynamic"},
                  lambda w, order: _channel_int8(w), QuantScheme.parse("w8a8")),
}


def _packed_format(src, tmp_path, name):
    """(the checkpoint in format `name`: every q/k/v/o/gate/up/down projection quantized, the rest as it is; its twin
    with the dequantized values in float32)."""
    config, pack, _ = FORMATS[name]
    quantized, twin = {}, {}
    for tensor_name, tensor in _tensors(src).items():
        prefix, _, suffix = tensor_name.rpartition(".")
        projection = prefix.rpartition(".")[2]
        if suffix != "weight" or projection not in INPUTS:
            quantized[tensor_name] = twin[tensor_name] = tensor
            continue
        layer = int(tensor_name.split(".")[2])
        seed = 8 * layer + ("attn", "o", "mlp", "down").index(INPUTS[projection])
        order = torch.randperm(tensor.shape[1], generator=torch.Generator().manual_seed(seed))
        parts, value = pack(tensor.float(), order)
        quantized.update({f"{prefix}.{part}": t for part, t in parts.items()})
        twin[tensor_name] = value
    return (_write(src, tmp_path / name, quantized, config), _write(src, tmp_path / f"{name}-twin", twin))


def _compressed_tensors(src, tmp_path, scheme):
    """(`dsserve weights quantize` of `src`, its twin: each linear it quantized replaced by its dequantized values)."""
    out = quantize_checkpoint(src, tmp_path / scheme.name, scheme)
    written = _tensors(out)
    twin = {}
    for name, tensor in _tensors(src).items():
        quantized = name.endswith(".weight") and name.removesuffix(".weight") + ".weight_scale" in written
        twin[name] = scheme.quantize(tensor.float()).dequantize() if quantized else tensor
    return out, _write(src, tmp_path / f"{scheme.name}-twin", twin)


def _has_kernel(scheme):
    """This build runs `scheme`'s weights as they are (w8a8: once its kernel, csrc/linear_w8a8.c, is in)."""
    if scheme.activations:
        return getattr(cpu_kernels, "linear_w8a8_usable", lambda: False)()
    return cpu_kernels.linear_quant_usable()


def _reference(twin, scheme):
    """The float path (torch backend) on the dequantized weights; for w8a8 where this build has its kernel (it
    quantizes the activations too), the torch backend computing each linear the checkpoint quantized with
    `reference_linear` on those weights (per-row requantizing q * scale gives q and the scale back)."""
    llm = LLM(twin, backend="torch", **OPTIONS)
    if scheme.activations and _has_kernel(scheme):
        backend, model = llm.engine.runner.backend, llm.engine.runner.model
        for module in model.modules():
            if isinstance(module, Linear) and module.accepts_input_order:  # all but MLA's kv_b_proj
                backend._quantized[module] = scheme.quantize(module.weight)
            elif isinstance(module, ExpertMLP):
                backend._quantized[module] = (scheme.quantize(module.w13), scheme.quantize(module.w2))
    return llm


def _assert_same_generations(got_llm, want_llm, tolerance=1e-4):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    for prompts in ([[5]], PROMPTS):
        for a, b in zip(got_llm.generate(prompts, params), want_llm.generate(prompts, params)):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for (x, _), (y, _) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert x == pytest.approx(y, abs=tolerance)


def _assert_packed(llm, scheme, num_quantized):
    """`num_quantized` Linears (those the checkpoint quantized) and every routed expert packed in `scheme`'s kind with
    the layout of that form (where this build has its kernel; else dequantized into float32 packs, as the packer
    logs); the LM head as the checkpoint holds it."""
    model, packs = llm.engine.runner.model, llm.engine.runner.backend.packs
    kind = Kind.ONEDNN_F32
    if _has_kernel(scheme):
        kind = Kind["W8A8"] if scheme.activations else Kind.INT8 if scheme.bits == 8 else Kind.INT4
    linears = [m for m in model.modules() if isinstance(m, Linear) and m in packs.linears
               and packs.linears[m].kind is kind]
    assert len(linears) == num_quantized
    for m in linears:
        data = packs.linears[m].data
        if kind is Kind.INT4:  # half a byte per weight, the scheme's groups and zero points
            assert data.packed.shape[1] * 2 == -(-data.in_features // scheme.group_size) * scheme.group_size
            assert data.group_size == scheme.group_size and (data.zeros is not None) == scheme.zero_point
        elif kind is Kind.INT8:  # (a W8A8 kind's layout is its own)
            assert data.packed.dtype == torch.int8 and data.packed.shape[1] == data.in_features
    for experts in (m for m in model.modules() if isinstance(m, Experts)):
        assert all(p.kind is kind for pair in packs.experts[experts] for p in pair)
    assert packs.linears[model.lm_head].kind is Kind.ONEDNN_F32  # kept as the checkpoint holds it


@pytest.fixture(scope="module")
def qwen2(model_dir):
    return model_dir("qwen2_untied")


@needs_kernel
@pytest.mark.parametrize("name", list(FORMATS))
def test_packed_formats_load_quantized(qwen2, tmp_path, name):
    folder, twin = _packed_format(qwen2, tmp_path, name)
    scheme = FORMATS[name][2]
    llm = LLM(folder, **OPTIONS)
    assert llm.engine.config.checkpoint_quantization == scheme.name
    _assert_packed(llm, scheme, num_quantized=8)  # 2 layers x q/k/v, o, gate/up, down
    ordered = [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear) and m.input_order is not None]
    assert len(ordered) == (8 if name == "gptq-desc-act" else 0)
    # decode_layers.c reads int4 panels, but not x reordered: a desc_act model decodes layer by layer
    if scheme.bits == 4:
        assert (llm.engine.runner.backend.fused is None) == (name == "gptq-desc-act")
    if scheme.bits == 4:  # the checkpoint's own float16 scales packed as they are (not requantized)
        o_proj = llm.engine.runner.model.layers[0].self_attn.o_proj
        packed = llm.engine.runner.backend.packs.linears[o_proj].data.scales  # (panels, groups, 16)
        stored = load_file(folder / "model.safetensors")["model.layers.0.self_attn.o_proj.scales"]  # (groups, N)
        assert torch.equal(packed.permute(0, 2, 1).reshape(-1, stored.shape[0])[: stored.shape[1]], stored.t())
    _assert_same_generations(llm, _reference(twin, scheme))


@needs_kernel
@pytest.mark.parametrize("scheme", [QuantScheme(4, GROUP), QuantScheme(4, 64, True), QuantScheme.parse("int8"),
                                    QuantScheme.parse("w8a8")], ids=lambda s: s.name)
def test_compressed_tensors_from_weights_quantize(qwen2, tmp_path, scheme):
    folder, twin = _compressed_tensors(qwen2, tmp_path, scheme)
    llm = LLM(folder, **OPTIONS)
    assert llm.engine.config.checkpoint_quantization == scheme.name
    _assert_packed(llm, scheme, num_quantized=8)  # K is 64 or 128: whole groups everywhere
    _assert_same_generations(llm, _reference(twin, scheme))


@needs_kernel
def test_deepseek_v3_experts_stack_quantized_parts(model_dir, tmp_path):
    """compressed-tensors int4 on the tiny V3: routed and shared experts, dense MLPs and attention projections
    whose inputs hold whole groups quantized; routers, kv_b_proj and the LM head kept float and loaded as usual."""
    scheme = QuantScheme(4, GROUP)
    folder, twin = _compressed_tensors(model_dir("deepseek_v3"), tmp_path, scheme)
    llm = LLM(folder, **OPTIONS)
    _assert_packed(llm, scheme, num_quantized=15)  # 3 layers x q_a, kv_a, o, gate/up, down (q_b: K = 48, float)
    _assert_same_generations(llm, LLM(twin, backend="torch", **OPTIONS))


def test_torch_backend_loads_them_dequantized(qwen2, tmp_path):
    folder, twin = _packed_format(qwen2, tmp_path, "gptq-desc-act")
    llm = LLM(folder, backend="torch", **OPTIONS)
    model = llm.engine.runner.model
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, Linear))
    _assert_same_generations(llm, LLM(twin, backend="torch", **OPTIONS), 1e-5)


def test_desc_act_orders_that_differ_within_one_layer_are_refused(qwen2, tmp_path):
    """q/k/v are stacked into one weight: their g_idx must give one input order."""
    folder, _ = _packed_format(qwen2, tmp_path, "gptq-desc-act")
    tensors = _tensors(folder)
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="self_attn.(q|k)_proj.weight orders its inputs differently"):
        LLM(folder, backend="torch", **OPTIONS)


@needs_kernel
@pytest.mark.parametrize("kind", ["awq", "w8a8"])
def test_tp2_equals_tp1(qwen2, tmp_path, kind):
    """Each rank converts only its slice of every linear (cut on the format's packing and group boundaries). AWQ's
    weight-only products are one rank's to 1e-4. w8a8 quantizes each row of activations over the inputs a rank holds,
    so a row-parallel layer's activation scale is the slice's (as in any engine running w8a8 split over ranks): its
    log-probabilities agree within that rounding, the weights themselves being exactly one rank's."""
    if kind == "awq":
        folder, _ = _packed_format(qwen2, tmp_path, "awq")
    else:
        folder, _ = _compressed_tensors(qwen2, tmp_path, QuantScheme.parse("w8a8"))
    options = dict(OPTIONS, step_timeout=30, connect_timeout=60)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    expected = LLM(folder, **options).generate(PROMPTS, params)
    llm = LLM(folder, tensor_parallel_size=2, **options)
    tolerance = 1e-4 if kind == "awq" else 0.05
    try:
        for a, b in zip(llm.generate(PROMPTS, params), expected):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for (x, _), (y, _) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert x == pytest.approx(y, abs=tolerance)
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("quantization_config, form", [
    (FORMATS["awq"][0], "int4-zp"),
    (FORMATS["gptq-desc-act"][0], "int4-zp"),
    ({**FORMATS["gptq"][0], "group_size": 128}, "int4-g128"),
    (FORMATS["w8a8_int8"][0], "w8a8"),
])
def test_the_reader_names_the_form(quantization_config, form):
    config = ModelConfig.from_dict({**QWEN2_CONFIG, "quantization_config": quantization_config})
    assert config.fp8_block_size is None and checkpoint_reader(config.quantization_config).scheme.name == form


@pytest.mark.parametrize("quantization_config, message", [
    ({"quant_method": "awq", "version": "gemv", "bits": 4, "group_size": 32, "zero_point": True}, "version"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 32, "sym": True}, "bits=3"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}}}},
     "compressed-tensors float-quantized, which dsserve does not load yet"),
    ({"quant_method": "bitsandbytes"}, "quant_method"),
])
def test_what_no_reader_holds_is_refused(quantization_config, message):
    config = ModelConfig.from_dict({**QWEN2_CONFIG, "quantization_config": quantization_config})
    with pytest.raises(ConfigError, match=message):
        checkpoint_reader(config.quantization_config)


def test_a_refused_format_stops_the_engine_config(qwen2, tmp_path):
    folder = _write(qwen2, tmp_path / "bnb", _tensors(qwen2), {"quant_method": "bitsandbytes"})
    with pytest.raises(ConfigError, match="quant_method"):
        LLM(folder, **OPTIONS)


def test_a_linear_whose_tensors_lie_in_several_shards(qwen2, tmp_path, monkeypatch):
    """The reader groups a linear's tensors across shards (qweight here, qzeros and scales there); the shard being
    read is remapped as its pages add up (a tiny _REMAP_BYTES) between quantized linears too."""
    import dsserve.models.loader as loader

    folder, _ = _packed_format(qwen2, tmp_path, "awq")
    tensors = _tensors(folder)
    files = {name: f"model-0000{1 + name.endswith(('qzeros', 'scales'))}-of-00002.safetensors" for name in tensors}
    sharded = _write(folder, tmp_path / "sharded", {}, FORMATS["awq"][0])
    (sharded / "model.safetensors").unlink()
    for file in set(files.values()):
        save_file({n: t for n, t in tensors.items() if files[n] == file}, str(sharded / file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    monkeypatch.setattr(loader, "_REMAP_BYTES", 4096)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in LLM(sharded, backend="torch", **OPTIONS).generate(PROMPTS, params)] == \
        [o.outputs[0].token_ids for o in LLM(folder, backend="torch", **OPTIONS).generate(PROMPTS, params)]


def test_a_row_parallel_slice_of_a_desc_act_linear_is_refused(qwen2, tmp_path):
    """desc_act scatters each group over the inputs: o_proj / down_proj cannot be split by inputs under -tp."""
    from dsserve.models.loader import iter_checkpoint

    folder, _ = _packed_format(qwen2, tmp_path, "gptq-desc-act")
    slices = {"model.layers.0.self_attn.o_proj.weight": (slice(None), slice(0, 32))}
    with pytest.raises(WeightsError, match="o_proj"):
        list(iter_checkpoint(ModelConfig.from_path(folder), None, slices, keep_quantized=True))


def test_weights_verify_names_the_format(qwen2, tmp_path):
    from dsserve.weights.verify import verify

    folder, _ = _packed_format(qwen2, tmp_path, "gptq")
    lines = [text for _, text in verify(folder).lines]
    assert "config.json: model_type qwen2, 2 layers, gptq quantized (loads as int4)" in lines
    assert any(text.startswith("tensors: ") and "; gptq quantized (loads as int4); " in text for text in lines)
