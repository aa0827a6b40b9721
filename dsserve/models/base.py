"""What every model shares: embedding -> decoder layers -> norm -> LM head, and loading from the checkpoint."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from dsserve.config import ModelConfig
from dsserve.errors import WeightsError
from dsserve.formats.quantized import ConvertedLinear
from dsserve.layers.linear import VocabParallel
from dsserve.layers.norm import RMSNorm
from dsserve.formats.quantization import QuantizedWeight
from dsserve.layers.parallel import SINGLE, TensorParallel

logger = logging.getLogger(__name__)


class DecoderLayer(nn.Module):
    """Pre-norm block shared by every architecture: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int, self_attn: nn.Module, mlp: nn.Module, dtype: torch.dtype):
        super().__init__()
        prefix = f"model.layers.{layer_idx}"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, f"{prefix}.input_layernorm.weight", dtype)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, f"{prefix}.post_attention_layernorm.weight", dtype
        )
        self.mlp = mlp

    def forward(self, positions, hidden, meta, cache):
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), meta, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class CausalLM(nn.Module):
    """Subclasses fill `self.layers` with modules taking (positions, hidden, meta, cache) and set
    `kv_cache_entry_shape` (one token's cache entry on this rank)."""

    kv_cache_entry_shape: tuple[int, ...]

    def __init__(self, config: ModelConfig, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config = config
        self.tp = tp
        self.embed_tokens = VocabParallel(config.vocab_size, config.hidden_size, "model.embed_tokens.weight", dtype, tp)
        self.layers = nn.ModuleList()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "model.norm.weight", dtype)
        self.lm_head = (
            self.embed_tokens if config.tie_word_embeddings
            else VocabParallel(config.vocab_size, config.hidden_size, "lm_head.weight", dtype, tp)
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta, kv_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """input_ids, positions (T,) -> final hidden states (T, D); `meta` is the backend's attention metadata."""
        hidden = self.embed_tokens.embed(input_ids)
        for layer, cache in zip(self.layers, kv_caches):
            hidden = layer(positions, hidden, meta, cache)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, D) -> (N, V) float32; with tensor parallelism every rank takes part and only rank 0 gets them."""
        return self.lm_head.logits(hidden)

    def checkpoint_slices(self) -> dict[str, tuple]:
        """Each checkpoint tensor this rank reads -> the slice of it that it needs (() for all)."""
        return {name: source for _, name, _, source in self._targets()}

    def _targets(self):
        for param in self.parameters():
            for name, selector, source in getattr(param, "sources", ()):
                yield param, name, selector, source

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight | ConvertedLinear]],
                     on_loaded: Callable[[nn.Module], None] | None = None) -> None:
        """Copy every checkpoint tensor (already sliced to this rank's part) into the parameter slice bound to its
        name; name what is missing. `on_loaded(module)` is called as soon as a module's own parameters are
        complete (a backend moves them into its layout then, one module at a time).

        A pre-quantized checkpoint tensor (a `QuantizedWeight`: the loader's FP8 weights kept as stored, or any
        converter's) goes as it is to `param.stage_quantized(selector, tensor)` where a backend set that (its packer
        keeps it: backends/cpu/packing.py), and is dequantized into the parameter anywhere else. A ConvertedLinear
        (GPTQ desc_act) is its QuantizedWeight with the inputs in `input_order`: the Linear takes that order (it
        reorders x), the weight goes on as above with its columns as they are."""
        targets = {name: (param, selector) for param, name, selector, _ in self._targets()}
        required = set(targets)
        owner: dict[int, nn.Module] = {}  # parameter -> the module holding it
        pending: dict[nn.Module, int] = {}  # module -> checkpoint tensors it still waits for
        for module in self.modules():
            for param in module.parameters(recurse=False):
                if id(param) not in owner and getattr(param, "sources", None):
                    owner[id(param)] = module
                    pending[module] = pending.get(module, 0) + len(param.sources)
        loaded: set[str] = set()
        ignored: list[str] = []
        orders: dict[int, torch.Tensor | None] = {}  # parameter -> the input order of its first part
        for name, tensor in weights:
            target = targets.pop(name, None)  # no reference is kept: a backend may free the parameter once packed
            if target is None:
                ignored.append(name)
                continue
            param, selector = target
            order = None
            if isinstance(tensor, ConvertedLinear):
                tensor, order = tensor.weight, tensor.input_order
            _take_input_order(owner[id(param)], param, name, order, orders)
            view = param.data[selector] if selector else param.data
            if tuple(view.shape) != tuple(tensor.shape):
                raise WeightsError(
                    f"tensor {name} in {self.config.path} has shape {tuple(tensor.shape)} but config.json implies "
                    f"{tuple(view.shape)}; the config does not belong to these weights"
                )
            stage = getattr(param, "stage_quantized", None)
            if isinstance(tensor, QuantizedWeight) and stage is not None:
                stage(selector, tensor)
            else:
                view.copy_(tensor.dequantize() if isinstance(tensor, QuantizedWeight) else tensor)
            loaded.add(name)
            module = owner[id(param)]
            del tensor, view, param, target
            pending[module] -= 1
            if pending[module] == 0 and on_loaded is not None:
                on_loaded(module)
        missing = sorted(required - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise WeightsError(
                f"checkpoint {self.config.path} lacks {len(missing)} tensor(s) the model needs: {shown}; "
                "a shard is missing or the index does not match: download the checkpoint again"
            )
        if ignored:
            logger.info("ignored %d checkpoint tensors not used by dsserve (e.g. %s)", len(ignored), ignored[0])


def _take_input_order(module: nn.Module, param: nn.Parameter, name: str, order: torch.Tensor | None,
                      orders: dict[int, torch.Tensor | None]) -> None:
    """Give `module` (a Linear) the input order of the checkpoint linear `name` (GPTQ desc_act; None: as stored).
    Every checkpoint linear stacked into one parameter (q/k/v, gate/up) must have the same order: they are quantized
    from the same inputs, so GPTQ's activation order agrees among them."""
    if id(param) not in orders:
        orders[id(param)] = order
        if order is None:
            return
        if not getattr(module, "accepts_input_order", False) or param is not getattr(module, "weight", None):
            raise WeightsError(
                f"{name} is quantized with its inputs reordered (GPTQ desc_act / actorder), which dsserve applies to "
                f"plain linear layers, not to this {type(module).__name__} (routed experts, MLA's kv_b_proj); use a "
                "checkpoint quantized without desc_act"
            )
        module.input_order = order.to(param.device)
        return
    first = orders[id(param)]
    if (first is None) != (order is None) or (order is not None and not torch.equal(first, order)):
        raise WeightsError(
            f"{name} orders its inputs differently from the other checkpoint linears dsserve stacks with it into one "
            "layer (GPTQ desc_act: their g_idx differ); dsserve holds one input order per layer: use a checkpoint "
            "quantized without desc_act"
        )
