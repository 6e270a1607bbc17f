"""Converted models: each is its base ``*ForCausalLM`` with the attention plan applied at construction.

State-dict keys stay those of the base model (plus the new attention parameters), so LoRA targets,
tied embeddings and ``generate()`` behave as in the base model.
"""

from __future__ import annotations

from transformers import Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from .configuration_reattend import (
    ReattendGemma3TextConfig,
    ReattendLlamaConfig,
    ReattendMistralConfig,
    ReattendQwen2Config,
    ReattendQwen3Config,
)
from .linear_attention import LinearAttention
from .local_attention import LocalAttention
from .mla_attention import MlaAttention
from .moh_attention import MohAttention

# target name -> attention module class. Each class has ``target`` (its name), ``from_teacher(teacher_attn, config,
# layer_idx, **options)``, ``feature_parameters()`` (what attention transfer trains) and a ``distill`` attribute:
# when set to a dict, forward returns the teacher's attention output and stores ``distill["losses"]`` ({"mse": ...}).
ATTENTION_TARGETS = {cls.target: cls for cls in (LinearAttention, LocalAttention, MlaAttention, MohAttention)}


def build_student_attention(teacher_attn, config, layer_idx: int, entry: dict):
    options = {key: value for key, value in entry.items() if key != "target"}
    return ATTENTION_TARGETS[entry["target"]].from_teacher(teacher_attn, config, layer_idx, **options)


def apply_attention_plan(model, plan: list[dict]) -> None:
    """Swap each decoder layer's ``self_attn`` for its planned target (``keep`` leaves it)."""
    for layer_idx, entry in enumerate(plan):
        if entry["target"] == "keep":
            continue
        decoder_layer = model.model.layers[layer_idx]
        decoder_layer.self_attn = build_student_attention(decoder_layer.self_attn, model.config, layer_idx, entry)


class _AttentionPlanMixin:
    def _apply_plan(self):
        if self.config.attention_plan:
            apply_attention_plan(self, self.config.attention_plan)


class ReattendLlamaForCausalLM(_AttentionPlanMixin, LlamaForCausalLM):
    config_class = ReattendLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self._apply_plan()


class ReattendQwen2ForCausalLM(_AttentionPlanMixin, Qwen2ForCausalLM):
    config_class = ReattendQwen2Config

    def __init__(self, config):
        super().__init__(config)
        self._apply_plan()


class ReattendQwen3ForCausalLM(_AttentionPlanMixin, Qwen3ForCausalLM):
    config_class = ReattendQwen3Config

    def __init__(self, config):
        super().__init__(config)
        self._apply_plan()


class ReattendMistralForCausalLM(_AttentionPlanMixin, MistralForCausalLM):
    config_class = ReattendMistralConfig

    def __init__(self, config):
        super().__init__(config)
        self._apply_plan()


class ReattendGemma3ForCausalLM(_AttentionPlanMixin, Gemma3ForCausalLM):
    config_class = ReattendGemma3TextConfig

    def __init__(self, config):
        super().__init__(config)
        self._apply_plan()


MODEL_FOR_CONFIG = {
    ReattendLlamaConfig: ReattendLlamaForCausalLM,
    ReattendQwen2Config: ReattendQwen2ForCausalLM,
    ReattendQwen3Config: ReattendQwen3ForCausalLM,
    ReattendMistralConfig: ReattendMistralForCausalLM,
    ReattendGemma3TextConfig: ReattendGemma3ForCausalLM,
}
