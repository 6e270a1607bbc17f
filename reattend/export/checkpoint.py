"""Export a converted model as an ordinary Hugging Face folder that loads with ``from_pretrained``.

The folder holds sharded safetensors, ``config.json`` (base config + ``attention_plan`` + ``auto_map``), the
bundled modeling code (so ``trust_remote_code=True`` works where reattend is not installed), the tokenizer,
the resolved recipe, metrics and a model card.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from .model_card import write_model_card

MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    dir: str | None = Field(None, description="default: <output_dir>/export")
    max_shard_size: str = "2GB"
    dtype: str | None = Field(None, description="cast weights before saving, e.g. bfloat16; default: as trained")
    native: bool = Field(False, description="also write a stock-transformers checkpoint to <dir>-native, where a stock "
                                            "config can express the plan (local layers -> sliding_window/layer_types; "
                                            "all-mla -> deepseek_v3)")


def bundled_files() -> list[Path]:
    return sorted(p for p in MODELING_DIR.glob("*.py") if p.name != "__init__.py")


@contextmanager
def atomic_folder(out_dir: Path):
    """Yield a fresh temporary folder beside ``out_dir`` that replaces ``out_dir`` once the block has finished."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    yield tmp
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def save_stock_checkpoint(model, tokenizer, out_dir: Path, *, max_shard_size: str) -> Path:
    """A stock transformers model (and its tokenizer) written atomically to ``out_dir``: the native exports."""
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir


def export_model(student, tokenizer, out_dir: str | Path, *, recipe: dict | None = None, metrics: dict | None = None,
                 max_shard_size: str = "2GB", dtype: str | None = None) -> Path:
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        if dtype is not None:
            student = student.to(getattr(torch, dtype))
        student.save_pretrained(tmp, max_shard_size=max_shard_size)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config["auto_map"] = {
            "AutoConfig": f"configuration_reattend.{type(student.config).__name__}",
            "AutoModelForCausalLM": f"modeling_reattend.{type(student).__name__}",
        }
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        for source in bundled_files():
            shutil.copy2(source, tmp / source.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe is not None:
            (tmp / "reattend_recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        if metrics is not None:
            (tmp / "reattend_metrics.json").write_text(json.dumps(metrics, indent=2))
        write_model_card(tmp / "README.md", config=config, recipe=recipe, metrics=metrics)
    return out_dir
