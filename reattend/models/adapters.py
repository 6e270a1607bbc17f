"""Which teacher architectures reattend converts, and how to read their attention layers."""

from __future__ import annotations

from dataclasses import dataclass

from ..modeling.configuration_reattend import CONFIG_FOR_BASE
from ..modeling.modeling_reattend import MODEL_FOR_CONFIG


class UnsupportedArchitectureError(ValueError):
    pass


SUPPORTED = {
    "llama": "Llama (and Llama-style: SmolLM, TinyLlama, ...)",
    "qwen2": "Qwen2 / Qwen2.5 (q/k/v bias)",
    "qwen3": "Qwen3 (q/k norm)",
    "mistral": "Mistral",
    "gemma3_text": "Gemma 3 text models (q/k norm, query scaling, local/global layers)",
}


@dataclass(frozen=True)
class LayerShape:
    """What a target needs to know about one teacher attention layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    sliding_window: int | None

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        hint = " (load Gemma 3 as its text model: Gemma3ForCausalLM / model_type gemma3_text)" if model_type == "gemma3" else ""
        listed = ", ".join(f"{k} [{v}]" for k, v in SUPPORTED.items())
        raise UnsupportedArchitectureError(
            f"model: architecture {model_type!r} is not supported{hint}. Supported model types: {listed}."
        )


def layer_shapes(config) -> list[LayerShape]:
    check_supported(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    shapes = []
    for layer_type in layer_types:
        window = getattr(config, "sliding_window", None)
        if config.model_type == "mistral":
            sliding = window
        else:
            sliding = window if layer_type == "sliding_attention" else None
        shapes.append(LayerShape(config.num_attention_heads, config.num_key_value_heads, head_dim, config.hidden_size, sliding))
    return shapes


def converted_classes(config):
    """(config class, model class) of the converted model for a teacher config."""
    check_supported(config)
    config_cls = CONFIG_FOR_BASE[config.model_type]
    return config_cls, MODEL_FOR_CONFIG[config_cls]
