"""FP8 weights on the CPU backend: a DeepSeek-V3 FP8 checkpoint (e4m3 bytes + `weight_scale_inv` per 128 x 128
block, DeepSeek's published layout) loads with its linear weights kept as stored and packed for csrc/linear_fp8.c,
and gives the greedy tokens and logprobs of the float path on its dequantized weights; the torch backend loads it
dequantized; `quantization="fp8"` quantizes a float checkpoint's weights as they load."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsserve import LLM, SamplingParams
from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.backends.cpu.packing import Kind
from dsserve.layers.linear import Linear
from dsserve.layers.moe import ExpertMLP, Experts
from dsserve.formats.quantization import QuantScheme, quantize_fp8
from dsserve.models.deepseek import MultiHeadLatentAttention

PROMPTS = [[5, 17, 33, 9, 100, 7], [3, 4], [250, 11, 12, 13, 14, 15, 16, 17, 18]]
needs_kernel = pytest.mark.skipif(not cpu_kernels.linear_fp8_usable(),
                                  reason="the fp8 linear needs AMX tiles and AVX512-BF16")


def _is_fp8_in_checkpoint(name: str, tensor: torch.Tensor) -> bool:
    """What DeepSeek's FP8 checkpoints store in e4m3: every projection of the decoder layers (experts and MLA's
    kv_b_proj included); the embedding, LM head, norms and routers stay bf16."""
    return tensor.dim() == 2 and name.startswith("model.layers.") and "_proj" in name.split(".")[-2]


@pytest.fixture(scope="module")
def fp8_checkpoints(model_dir, tmp_path_factory):
    """(the tiny V3 as an FP8 checkpoint, its twin holding the dequantized values in float32, the stored bytes)."""
    src = model_dir("deepseek_v3")
    fp8_dir, twin_dir = tmp_path_factory.mktemp("fp8"), tmp_path_factory.mktemp("twin")
    for folder in (fp8_dir, twin_dir):
        shutil.copytree(src, folder, dirs_exist_ok=True)
        for shard in folder.glob("*.safetensors"):
            shard.unlink()
    tensors = {}
    for shard in src.glob("*.safetensors"):
        tensors.update(load_file(shard))
    fp8, twin, stored = {}, {}, {}
    for name, tensor in tensors.items():
        if _is_fp8_in_checkpoint(name, tensor):
            quantized = quantize_fp8(tensor.float())  # per 128 x 128 block: scale = amax / 448, e4m3 round to even
            fp8[name], fp8[name + "_scale_inv"] = quantized.q, quantized.scales
            twin[name], stored[name] = quantized.dequantize(), quantized
        else:
            fp8[name] = twin[name] = tensor
    save_file(fp8, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(twin, str(twin_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    return fp8_dir, twin_dir, stored


def _assert_same_generations(got_llm, want_llm, abs_logprob=1e-4, abs_logprob_rows=1e-2):
    """Greedy tokens equal. Logprobs within `abs_logprob` where every linear sees one row (one sequence of one-token
    prompts: the fp8 GEMV, x exact), within `abs_logprob_rows` where they see several (the AMX path rounds x to
    bf16, as linear_bf16.c does: ~3e-3 on this model)."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    cases = [([[5]], abs_logprob), ([[250]], abs_logprob), (PROMPTS, abs_logprob_rows)]
    for prompts, tolerance in cases:
        for a, b in zip(got_llm.generate(prompts, params), want_llm.generate(prompts, params)):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for (x, _), (y, _) in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert x == pytest.approx(y, abs=tolerance)


def _unpacked(panels, rows: int, cols: int) -> torch.Tensor:
    """linear_fp8.c's bytes back in (rows, cols) order."""
    packed = panels.packed  # (panels, Kp / 2, 16, 2)
    return packed.permute(0, 2, 1, 3).reshape(packed.shape[0] * 16, -1)[:rows, :cols]


@needs_kernel
def test_fp8_checkpoint_kept_as_stored(fp8_checkpoints):
    fp8_dir, twin_dir, stored = fp8_checkpoints
    kept = LLM(fp8_dir, num_kv_blocks=64, max_model_len=256, weight_dtype="float32")
    model, backend = kept.engine.runner.model, kept.engine.runner.backend
    linears = {m: backend.packs.linears.get(m) for m in model.modules() if isinstance(m, Linear)}
    kv_b = {m.kv_b_proj for m in model.modules() if isinstance(m, MultiHeadLatentAttention)}
    fp8_linears = [m for m in linears if m not in kv_b]
    assert fp8_linears and all(linears[m].kind is Kind.FP8 and m.weight is None for m in fp8_linears)
    assert all(m.weight is not None and m.weight.dtype == torch.float32 for m in kv_b)  # attention reads it
    assert backend.packs.linears[model.lm_head].kind is Kind.ONEDNN_F32  # the checkpoint's float head as it is
    assert backend.fused is None  # decode_layers.c reads 16-bit panels only: layer by layer
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(p.kind is Kind.FP8 for e in experts for pair in backend.packs.experts[e] for p in pair)
    # the packed weights are the checkpoint's bytes: o_proj of layer 0 and a routed expert's down_proj
    o_proj = model.layers[0].self_attn.o_proj
    want = stored["model.layers.0.self_attn.o_proj.weight"].q
    data = linears[o_proj].data
    assert torch.equal(_unpacked(data, *want.shape), want.view(torch.uint8))
    panels = -(-want.shape[0] // 16)
    assert data.packed.nbytes == (panels + panels % 2) * 16 * -(-want.shape[1] // 128) * 128  # one byte per weight
    assert data.scales.dtype == torch.float32 and data.scales.nbytes * 32 == data.packed.nbytes
    down = backend.packs.experts[experts[0]][5][1].data
    want = stored["model.layers.1.mlp.experts.5.down_proj.weight"].q
    assert torch.equal(_unpacked(down, *want.shape), want.view(torch.uint8))

    reference = LLM(twin_dir, num_kv_blocks=64, max_model_len=256, backend="torch")
    _assert_same_generations(kept, reference)


@needs_kernel
def test_fp8_checkpoint_kept_with_bf16_weights_elsewhere(fp8_checkpoints):
    """The default weight dtype on an AMX CPU (bf16 for the float weights): the fp8 weights are kept all the same."""
    fp8_dir, twin_dir, _ = fp8_checkpoints
    kept = LLM(fp8_dir, num_kv_blocks=64, max_model_len=256)
    model, backend = kept.engine.runner.model, kept.engine.runner.backend
    assert backend.packs.linears[model.layers[0].mlp.gate_up_proj if hasattr(model.layers[0].mlp, "gate_up_proj")
                                 else model.layers[0].self_attn.o_proj].kind is Kind.FP8
    reference = LLM(twin_dir, num_kv_blocks=64, max_model_len=256, weight_dtype="bfloat16")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in kept.generate(PROMPTS, params)] == \
        [o.outputs[0].token_ids for o in reference.generate(PROMPTS, params)]


def test_fp8_checkpoint_on_the_torch_backend_loads_dequantized(fp8_checkpoints):
    fp8_dir, twin_dir, _ = fp8_checkpoints
    fp8 = LLM(fp8_dir, num_kv_blocks=64, max_model_len=256, backend="torch")
    model = fp8.engine.runner.model
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, Linear))
    assert all(not hasattr(p, "quantized") or p.quantized is None for p in model.parameters())
    _assert_same_generations(fp8, LLM(twin_dir, num_kv_blocks=64, max_model_len=256, backend="torch"), 0.0, 0.0)


@needs_kernel
def test_quantization_fp8_from_a_float_checkpoint(model_dir):
    """`quantization="fp8"`: each weight the packer holds quantized per 128 x 128 block (merged gate/up and q/kv
    weights as merged), the LM head in int8; equal to the torch path on those values."""
    path = model_dir("deepseek_v3")
    quantized = LLM(path, num_kv_blocks=64, max_model_len=256, quantization="fp8")
    model, backend = quantized.engine.runner.model, quantized.engine.runner.backend
    assert backend.packs.linears[model.layers[0].self_attn.o_proj].kind is Kind.FP8
    assert backend.packs.linears[model.lm_head].kind is Kind.INT8
    reference = LLM(path, num_kv_blocks=64, max_model_len=256, backend="torch")
    twin = reference.engine.runner.model
    kv_b = {m.kv_b_proj for m in twin.modules() if isinstance(m, MultiHeadLatentAttention)}
    with torch.no_grad():
        for module in twin.modules():
            weights = ([module.weight] if isinstance(module, Linear) and module not in kv_b else
                       [module.w13, module.w2] if isinstance(module, ExpertMLP) else [])
            for weight in weights:
                weight.copy_(quantize_fp8(weight).dequantize())
        twin.lm_head.weight.copy_(QuantScheme(8).quantize(twin.lm_head.weight).dequantize())
    _assert_same_generations(quantized, reference)


def test_fp8_checkpoint_without_the_fp8_kernel_loads_dequantized(fp8_checkpoints, monkeypatch):
    """The CPU backend on a machine without linear_fp8.c (no AMX): the FP8 weights are dequantized and packed as
    float weights, the same values as the twin's."""
    fp8_dir, twin_dir, _ = fp8_checkpoints
    monkeypatch.setattr(cpu_kernels, "linear_fp8_usable", lambda: False)
    fp8 = LLM(fp8_dir, num_kv_blocks=64, max_model_len=256, weight_dtype="float32")
    packs = fp8.engine.runner.backend.packs
    assert packs.linears and all(p.kind is Kind.ONEDNN_F32 for p in packs.linears.values())
    twin = LLM(twin_dir, num_kv_blocks=64, max_model_len=256, weight_dtype="float32")
    _assert_same_generations(fp8, twin, 1e-5, 1e-5)


def test_quantization_fp8_is_refused_without_the_kernel(model_dir, monkeypatch):
    from dsserve.errors import ConfigError

    monkeypatch.setattr(cpu_kernels, "linear_fp8_usable", lambda: False)
    with pytest.raises(ConfigError, match="--quantization fp8 needs dsserve's fp8 CPU kernel"):
        LLM(model_dir("deepseek_v3"), num_kv_blocks=16, max_model_len=64, quantization="fp8")
