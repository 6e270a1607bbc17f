"""Configs of converted models: the base architecture's config plus ``attention_plan``.

``attention_plan`` has one entry per decoder layer, ``{"target": "keep"}`` or a target name with its
options, e.g. ``{"target": "linear", "window": 64, "feature_map": "hedgehog", ...}``.
"""

from __future__ import annotations

from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config


class ReattendLlamaConfig(LlamaConfig):
    model_type = "reattend_llama"
    attention_plan: list | None = None


class ReattendQwen2Config(Qwen2Config):
    model_type = "reattend_qwen2"
    attention_plan: list | None = None


class ReattendQwen3Config(Qwen3Config):
    model_type = "reattend_qwen3"
    attention_plan: list | None = None


class ReattendMistralConfig(MistralConfig):
    model_type = "reattend_mistral"
    attention_plan: list | None = None


class ReattendGemma3TextConfig(Gemma3TextConfig):
    model_type = "reattend_gemma3_text"
    attention_plan: list | None = None


# base model_type -> converted config class
CONFIG_FOR_BASE = {
    "llama": ReattendLlamaConfig,
    "qwen2": ReattendQwen2Config,
    "qwen3": ReattendQwen3Config,
    "mistral": ReattendMistralConfig,
    "gemma3_text": ReattendGemma3TextConfig,
}
