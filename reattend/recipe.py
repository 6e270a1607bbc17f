"""Recipes: the YAML schema of a run, loading, ``key=value`` overrides and provenance."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .convert.rules import TARGET_OPTIONS, Rule
from .data import DataConfig
from .distill.recover import RecoverConfig
from .distill.transfer import TransferConfig
from .evaluate.config import EvalConfig
from .export.checkpoint import ExportConfig


class RecipeError(ValueError):
    """A recipe problem, phrased for the user: field, value, fix."""


class ConvertConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(..., min_length=1, description="first matching rule wins; unmatched layers are kept")


class StageEvalConfig(BaseModel):
    """The quick held-out perplexity measured after each stage (the full comparison is ``eval``)."""

    model_config = ConfigDict(extra="forbid")

    blocks: int = Field(16, ge=1, description="held-out blocks (of data.block_size tokens) per text")
    batch_size: int = Field(1, ge=1)


class PushConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo_id: str | None = None
    private: bool = True


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="hub id, local folder, or embedded:smollm2-135m")
    dtype: str = Field("float32", pattern="^(float32|bfloat16|float16)$")
    seed: int = 0
    output_dir: str
    data: DataConfig = Field(default_factory=DataConfig)
    convert: ConvertConfig
    stage_eval: StageEvalConfig = Field(default_factory=StageEvalConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    recover: RecoverConfig = Field(default_factory=RecoverConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    push: PushConfig = Field(default_factory=PushConfig)

    @model_validator(mode="after")
    def _transfer_fits_targets(self):
        if not self.transfer.enabled:
            return self
        for i, rule in enumerate(self.convert.rules):
            if not getattr(TARGET_OPTIONS.get(rule.target), "supports_transfer", True):
                raise ValueError(f"transfer.enabled is true, but convert.rules.{i} uses target {rule.target!r}, which "
                                 "has no attention-transfer stage; set transfer.enabled: false (recovery trains it)")
        return self


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"recipe {source} is invalid:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (value {e['input']!r}); remove it or check its spelling")
        elif e["type"] == "missing":
            lines.append(f"  {where}: required field is missing")
        else:
            value = e.get("input")
            shown = f" (got {value!r})" if not isinstance(value, dict) else ""
            lines.append(f"  {where}: {e['msg']}{shown}")
    return "\n".join(lines)


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``a.b.c=value`` (YAML value; list items by index: ``convert.rules.0.options.window=32``)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected key=value, e.g. transfer.tokens=100000")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"override {key!r}: {'.'.join(parts[:i])} has no item {part}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise RecipeError(f"override {key!r}: {'.'.join(parts[:i + 1])} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"override {key!r}: no list item {last}")
            node[int(last)] = _parse_value(value)
        else:
            node[last] = _parse_value(value)
    return raw


def read_recipe_file(path: str | Path, overrides: list[str] | None, sections: str) -> dict:
    """A recipe file's YAML mapping with ``overrides`` applied; ``sections`` names a few of its sections for the
    error a file that is not a mapping gets."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file {str(path)!r} does not exist; pass the path of a YAML recipe (see recipes/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections ({sections}, ...)")
    return apply_overrides(raw, overrides or [])


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    return recipe_from_dict(read_recipe_file(path, overrides, "model, output_dir, convert"), source=str(path))


def recipe_from_dict(raw: dict, source: str = "<dict>") -> Recipe:
    try:
        return Recipe(**raw)
    except ValidationError as err:
        raise RecipeError(_format_error(err, source)) from None


def resolved(recipe: Recipe) -> dict:
    """The recipe with every default filled in, plus provenance, as saved beside each stage's output."""
    import torch
    import transformers

    from . import __version__

    data = recipe.model_dump(mode="json")
    data["provenance"] = {
        "reattend": __version__,
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    return data
