"""Native export of the ``local`` target: a stock transformers checkpoint (no remote code, no reattend).

Stock configs express one sliding window per model, applied to the layers ``layer_types`` marks
``sliding_attention`` (Qwen2, Qwen3, Gemma 3) or to every layer (Mistral). A converted Llama whose every layer is
local becomes a Mistral checkpoint: Mistral is Llama's architecture plus ``sliding_window``, with the same weight
names. Sink tokens have no stock equivalent, so a plan with ``sinks > 0`` is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig

from .checkpoint import save_stock_checkpoint

# Fields MistralConfig shares with LlamaConfig; the rest of a Llama config (attention/mlp bias) must be at default.
_MISTRAL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                   "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                   "rope_parameters", "attention_dropout")


class NativeExportError(ValueError):
    """The plan cannot be written as a stock config; the message says why and what to change."""


def layer_windows(student) -> list[int | None]:
    """Each layer's causal window as the student runs it (None = full attention)."""
    plan = student.config.attention_plan or [{"target": "keep"}] * len(student.model.layers)
    windows = []
    for idx, entry in enumerate(plan):
        if entry["target"] == "keep":  # the teacher's own module, with its own window if it had one
            windows.append(getattr(student.model.layers[idx].self_attn, "sliding_window", None))
        elif entry["target"] == "local":
            if entry.get("sinks", 0):
                raise NativeExportError(
                    f"export.native: layer {idx} has sinks={entry['sinks']}, and stock sliding-window configs cannot "
                    "keep sink tokens. Convert with sinks: 0, or set export.native: false (reattend format).")
            windows.append(student.model.layers[idx].self_attn.window)
        else:
            raise NativeExportError(
                f"export.native: layer {idx} has target {entry['target']!r}; only 'local' and 'keep' layers have a "
                "stock equivalent. Set export.native: false to export in reattend's format.")
    return windows


def native_config(student):
    """The stock config that runs the student's attention plan exactly."""
    config = student.config
    windows = layer_windows(student)
    distinct = sorted({w for w in windows if w is not None})
    if len(distinct) > 1:
        raise NativeExportError(
            f"export.native: the layers use windows {distinct}, but a stock config has one sliding_window. "
            "Give every local layer the same window, or set export.native: false.")
    window = distinct[0] if distinct else None
    base = {k: v for k, v in config.to_dict().items()
            if k not in ("attention_plan", "auto_map", "architectures", "model_type", "transformers_version")}
    base_type = type(config).__mro__[1].model_type
    if base_type in ("llama", "mistral"):
        if None in windows:
            raise NativeExportError(
                f"export.native: {base_type} has one window for all layers, but layers "
                f"{[i for i, w in enumerate(windows) if w is None]} keep full attention. Convert every layer to "
                "local, or set export.native: false.")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise NativeExportError("export.native: this Llama has attention_bias or mlp_bias, which Mistral cannot "
                                    "load; set export.native: false.")
        return MistralConfig(**{k: base[k] for k in _MISTRAL_FIELDS if k in base}, sliding_window=window,
                             architectures=["MistralForCausalLM"])
    layer_types = ["full_attention" if w is None else "sliding_attention" for w in windows]
    if base_type == "gemma3_text" and layer_types != list(config.layer_types):
        changed = [i for i, (a, b) in enumerate(zip(layer_types, config.layer_types)) if a != b]
        raise NativeExportError(
            f"export.native: Gemma 3 layers {changed} change between global and local attention, and Gemma 3 gives "
            "local layers a different RoPE base, so a stock config cannot run them as trained. Convert only the "
            "teacher's sliding layers, or set export.native: false.")
    extra = {"use_sliding_window": window is not None} if base_type in ("qwen2", "qwen3") else {}
    return AutoConfig.for_model(base_type, **{**base, **extra, "sliding_window": window, "layer_types": layer_types})


def export_native_local(student, tokenizer, out_dir: str | Path, *, max_shard_size: str = "2GB") -> Path:
    """Write ``student`` as a stock checkpoint to ``out_dir`` (atomically); raises ``NativeExportError`` if it cannot."""
    config = native_config(student)
    with torch.device("meta"):
        stock = AutoModelForCausalLM.from_config(config)
    stock.load_state_dict(student.state_dict(), strict=True, assign=True)
    if config.tie_word_embeddings:
        stock.tie_weights()
    return save_stock_checkpoint(stock, tokenizer, Path(out_dir), max_shard_size=max_shard_size)
