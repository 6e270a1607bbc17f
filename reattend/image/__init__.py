"""Image-token transformers (DiT, PixArt, SD3, FLUX, ViT): 2-D local (CLEAR) attention conversion."""

from .attention import (
    FAMILIES,
    convert_image_model,
    detect_family,
    local_2d_settings,
    trainable_attention_parameters,
)

__all__ = ["FAMILIES", "convert_image_model", "detect_family", "local_2d_settings", "trainable_attention_parameters"]
