"""`--quantization` is never silently dropped: where the packed weights or a quantized layer's check fail, loading
stops with an error instead of serving float weights."""

import pytest

from dsserve import LLM
from dsserve.backends.cpu import kernels as cpu_kernels
from dsserve.backends.cpu import packing
from dsserve.errors import ConfigError

needs_kernel = pytest.mark.skipif(not cpu_kernels.linear_quant_usable(), reason="the quantized linears need AVX-512")


@needs_kernel
def test_quantization_without_packed_weights_is_refused(model_dir, monkeypatch):
    monkeypatch.setattr(packing, "resolve_weight_dtype", lambda dtype: None)
    with pytest.raises(ConfigError, match="--quantization int8 needs packed weights"):
        LLM(model_dir("qwen2_untied"), num_kv_blocks=64, max_model_len=256, quantization="int8")


@needs_kernel
def test_a_quantized_layer_failing_its_check_stops_the_load(model_dir, monkeypatch):
    real = packing.pack_checked

    def failing(weight, bias, weight_dtype, scheme=None):
        if scheme is not None:
            raise packing.PackingFailed(f"the packed {scheme.name} linear disagrees with F.linear")
        return real(weight, bias, weight_dtype, scheme)

    monkeypatch.setattr(packing, "pack_checked", failing)
    with pytest.raises(ConfigError, match="--quantization int4: the packed int[48] linear disagrees"):
        LLM(model_dir("qwen2_untied"), num_kv_blocks=64, max_model_len=256, quantization="int4")
    # without --quantization a failing layer still falls back to F.linear (the float path stays correct)
    LLM(model_dir("qwen2_untied"), num_kv_blocks=64, max_model_len=256).shutdown()
