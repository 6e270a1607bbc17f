"""Image recipes (``kind: image``): CLEAR local 2-D attention for diffusion and vision transformers.

The schema mirrors the language-model recipe (reattend/recipe.py): unknown keys are refused, ``key=value``
overrides use the same syntax, and errors name the field, the value and the fix.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..recipe import RecipeError, _format_error, read_recipe_file


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    path: str | None = Field(None, description="hub id or local folder of a diffusers/transformers model")
    subfolder: str | None = Field(None, description='e.g. "transformer" inside a diffusers pipeline repo')
    family: Literal["dit", "pixart", "sd3", "flux", "vit"] | None = Field(None, description="default: detected")
    class_name: str | None = Field(None, alias="class", description="model class; default: read from config.json")
    random_config: dict[str, Any] | None = Field(
        None, description="{class: PixArtTransformer2DModel, ...config kwargs}: a random-init model (tests, smoke runs)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.random_config is None):
            raise ValueError("give exactly one of model.path (hub id or folder) and model.random_config")
        if self.random_config is not None and "class" not in self.random_config:
            raise ValueError("model.random_config needs a `class` key, e.g. class: PixArtTransformer2DModel")
        return self

    def describe(self) -> str:
        if self.path is not None:
            return self.path + (f"/{self.subfolder}" if self.subfolder else "")
        return f"random {self.random_config['class']}"


class ConvertConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    radius: float = Field(..., gt=0, description="window radius r in tokens: (dy)^2 + (dx)^2 < r^2")
    pool: int | None = Field(None, ge=1, description="also attend to keys averaged over pool x pool blocks")
    tile: int | None = Field(None, ge=1, description="tile-ordered token layout (block-sparse kernels)")
    layers: Literal["all"] | list[int] = Field("all", description="blocks to convert: all, or a list of block indices")


class SamplesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["pipeline", "latents", "synthetic"] = Field(
        ..., description="pipeline: the teacher generates (CLEAR); latents: a file; synthetic: gaussians (smoke runs)")
    count: int = Field(10_000, ge=1, description="stored training inputs (transformer calls x batch elements)")
    heldout: int = Field(16, ge=1, description="extra inputs kept out of training, for eval")
    path: str | None = Field(None, description="source=latents: safetensors file of transformer call kwargs")
    prompts: list[str] | str | None = Field(None, description="source=pipeline: a list, or a text file (one a line)")
    steps: int = Field(20, ge=1, description="denoising steps per generated image")
    per_image: int = Field(2, ge=1, description="inputs recorded per generated image, at random denoising steps")
    guidance_scale: float | None = Field(None, ge=0, description="default: the pipeline's")
    height: int | None = Field(None, ge=8, description="image height in pixels; default: the model's native size")
    width: int | None = Field(None, ge=8)
    batch_size: int = Field(1, ge=1, description="images per pipeline call / synthetic inputs per write")
    text_tokens: int = Field(16, ge=1, description="source=synthetic: length of the random text embedding")
    shard_size: int = Field(256, ge=1, description="inputs per safetensors shard")

    @model_validator(mode="after")
    def _source_needs(self):
        if self.source == "latents" and not self.path:
            raise ValueError("samples.source=latents needs samples.path, a safetensors file of transformer inputs")
        if self.source == "pipeline" and not self.prompts:
            raise ValueError("samples.source=pipeline needs samples.prompts: a list of prompts or a text file")
        if self.per_image > self.steps:
            raise ValueError(f"samples.per_image={self.per_image} is more than samples.steps={self.steps}; "
                             "lower per_image or raise steps")
        return self


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(10_000, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(1, ge=1, description="inputs per step per process")
    output_loss_weight: float = Field(1.0, ge=0, description="MSE between student and teacher predictions")
    attention_loss_weight: float = Field(1.0, ge=0, description="MSE between attention-module outputs")
    attention_layers: int | list[int] | Literal["all"] = Field(
        4, description="converted modules compared by the attention loss: every k-th (int), indices, or all")
    task_loss_weight: float = Field(0.0, ge=0, description="diffusion loss against the sample's clean latent "
                                                          "(flow target for sd3/flux, noise for dit/pixart)")
    max_grad_norm: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(500, ge=0, description="steps between resumable checkpoints; 0 = never")

    @field_validator("attention_layers")
    @classmethod
    def _positive_stride(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("attention_layers as an int is a stride (every k-th converted module) and must be >= 1")
        return value

    @model_validator(mode="after")
    def _some_loss(self):
        if self.output_loss_weight == self.attention_loss_weight == self.task_loss_weight == 0:
            raise ValueError("every loss weight is 0; set distill.output_loss_weight (or another weight) above 0")
        return self


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(1, ge=1)
    repeats: int = Field(5, ge=1, description="timed forwards per model (the median is reported)")
    warmup: int = Field(1, ge=0)


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    dir: str | None = Field(None, description="default: <output_dir>/export/model")
    max_shard_size: str = "5GB"
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="default: as trained")


class ImageRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["image"]
    model: ModelConfig
    pipeline: str | None = Field(None, description="diffusers pipeline (hub id or folder) for source=pipeline")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
    output_dir: str
    convert: ConvertConfig
    samples: SamplesConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _pipeline_for_pipeline_source(self):
        if self.samples.source == "pipeline" and not self.pipeline:
            raise ValueError("samples.source=pipeline needs `pipeline:`, a diffusers pipeline hub id or folder")
        if self.samples.source == "pipeline" and self.model.family == "vit":
            raise ValueError("samples.source=pipeline is for diffusion models; for vit use synthetic or latents")
        return self


def read_kind(path: str | Path) -> str | None:
    """The top-level ``kind`` of a YAML recipe, or None (language-model recipes have none, or unreadable files)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return raw.get("kind") if isinstance(raw, dict) else None


def load_image_recipe(path: str | Path, overrides: list[str] | None = None) -> ImageRecipe:
    return image_recipe_from_dict(read_recipe_file(path, overrides, "kind, model, output_dir, convert"),
                                  source=str(path))


def image_recipe_from_dict(raw: dict, source: str = "<dict>") -> ImageRecipe:
    try:
        return ImageRecipe(**raw)
    except ValidationError as err:
        raise RecipeError(_format_error(err, source)) from None


def resolved(recipe: ImageRecipe) -> dict:
    """The recipe with every default filled in, plus provenance, as saved beside each stage's output."""
    import diffusers
    import torch
    import transformers

    from .. import __version__

    data = recipe.model_dump(mode="json", by_alias=True)
    data["provenance"] = {
        "reattend": __version__,
        "torch": str(torch.__version__),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    return data
