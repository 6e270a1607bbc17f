"""Converted-model code. Every module in this folder except this one is copied flat into exported
checkpoints, so they import only torch, transformers, triton and each other (``from .x import y``)."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_reattend import CONFIG_FOR_BASE
from .modeling_reattend import MODEL_FOR_CONFIG


def register_auto_classes() -> None:
    """Let ``AutoModelForCausalLM.from_pretrained`` load exported folders without remote code."""
    for config_cls, model_cls in MODEL_FOR_CONFIG.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


__all__ = ["CONFIG_FOR_BASE", "MODEL_FOR_CONFIG", "register_auto_classes"]
