"""model_type -> model class, imported lazily so that loading one architecture never imports the others."""

from __future__ import annotations

import importlib

from dsserve.config import ModelConfig
from dsserve.errors import ConfigError

_MODELS: dict[str, tuple[str, str]] = {
    "deepseek_v3": ("dsserve.models.deepseek", "DeepseekForCausalLM"),
    "deepseek_v2": ("dsserve.models.deepseek", "DeepseekForCausalLM"),
    "qwen2": ("dsserve.models.qwen2", "Qwen2ForCausalLM"),
    "llama": ("dsserve.models.llama", "LlamaForCausalLM"),
}


def model_class(config: ModelConfig) -> type:
    if config.model_type not in _MODELS:
        raise ConfigError(f"model_type {config.model_type!r} is not supported; dsserve runs {', '.join(_MODELS)}")
    module, name = _MODELS[config.model_type]
    return getattr(importlib.import_module(module), name)
