"""Export a CLEAR student as an ordinary diffusers/transformers folder, and load it back.

The folder is the base model's ``save_pretrained`` output (safetensors), ``reattend_local_2d.json``, which says
how to re-apply the conversion, and ``reattend_local_2d.safetensors`` with the tensors the conversion adds (the
pooling weights) under the converted model's own names. ``save_pretrained`` writes those tensors too, but not
reliably under names a reload finds: transformers 5 renames keys to the original checkpoint layout on save
(``vit.layers.0`` -> ``vit.encoder.layer.0``) and drops what it cannot map back on load. ``load_image_student``
loads the base class, converts it again and loads the added tensors, so it computes exactly what the student did.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from ..export.checkpoint import atomic_folder
from .attention import convert_image_model, local_2d_settings

SETTINGS_FILE = "reattend_local_2d.json"
ADDED_FILE = "reattend_local_2d.safetensors"


def model_class(name: str):
    """A model class by name, from diffusers or transformers; (class, library)."""
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        cls = getattr(library, name, None)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            return cls, library.__name__
    raise ValueError(f"model class {name!r} is in neither diffusers nor transformers; use a class name such as "
                     "PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel or ViTModel")


def export_image_student(student, out_dir: str | Path, *, base_model: str, recipe: dict | None = None,
                         metrics: dict | None = None, max_shard_size: str = "5GB", dtype: str | None = None) -> Path:
    settings = local_2d_settings(student)
    if settings is None:
        raise ValueError("export: the model has no local 2-D attention (was it converted?)")
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:
        if dtype is not None:
            student = student.to(getattr(torch, dtype))
        cls, library = model_class(type(student).__name__)
        student.save_pretrained(tmp, max_shard_size=max_shard_size)
        base_keys = _base_keys(student, cls, library)
        save_file({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items() if k not in base_keys},
                  tmp / ADDED_FILE)
        info = {"settings": settings, "class": cls.__name__, "library": library, "base_model": base_model}
        (tmp / SETTINGS_FILE).write_text(json.dumps(info, indent=2))
        if recipe is not None:
            (tmp / "reattend_recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        if metrics is not None:
            (tmp / "reattend_metrics.json").write_text(json.dumps(metrics, indent=2))
        (tmp / "README.md").write_text(_model_card(info, metrics))
    return out_dir


def load_image_student(folder: str | Path, *, dtype: torch.dtype | None = None):
    """The exported student: base class ``from_pretrained``, conversion re-applied, added tensors loaded."""
    folder = Path(folder)
    info_path = folder / SETTINGS_FILE
    if not info_path.exists():
        raise FileNotFoundError(f"{folder} has no {SETTINGS_FILE}; it is not a reattend image export")
    info = json.loads(info_path.read_text())
    cls, library = model_class(info["class"])
    options = {"torch_dtype" if library == "diffusers" else "dtype": dtype} if dtype is not None else {}
    with _quiet(library):  # it would report the pooling weights as unused; they are loaded below
        model = cls.from_pretrained(folder, **options)
    base_keys = set(model.state_dict())
    settings = info["settings"]
    convert_image_model(model, radius=settings["radius"], pool=settings.get("pool"), tile=settings.get("tile"),
                        layers=settings.get("layers", "all"))
    added = set(model.state_dict()) - base_keys
    found = load_file(folder / ADDED_FILE) if (folder / ADDED_FILE).exists() else {}
    missing = sorted(added - set(found))
    if missing:
        raise ValueError(f"{folder}: the converted model expects {len(missing)} tensor(s) the export lacks, e.g. "
                         f"{missing[0]}; re-export the student")
    model.load_state_dict({k: found[k] for k in added}, strict=False)
    return model.eval()


def _base_keys(model, cls, library: str) -> set[str]:
    """State-dict keys of the unconverted class, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        base = cls.from_config(model.config) if library == "diffusers" else cls(model.config)
    return set(base.state_dict())


@contextmanager
def _quiet(library: str):
    logger = logging.getLogger(library)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _model_card(info: dict, metrics: dict | None) -> str:
    s = info["settings"]
    load = "from reattend.image.export import load_image_student\nmodel = load_image_student(path)"
    parts = [
        "---",
        yaml.safe_dump({"library_name": info["library"], "tags": ["reattend", "clear", "local-attention", "distillation"],
                        **({"base_model": info["base_model"]} if not info["base_model"].startswith("random") else {})},
                       sort_keys=False).strip(),
        "---",
        f"# {info['class']} with CLEAR local attention (reattend)",
        "",
        f"Base model: `{info['base_model']}`. Image self-attention ({s['family']}, layers: {s['layers']}) attends "
        f"only to image tokens within radius {s['radius']} on the token grid"
        + (f", plus keys pooled over {s['pool']}x{s['pool']} blocks" if s.get("pool") else "")
        + "; text tokens stay global. The attention projections were distilled from the base model.",
        "",
        "## Loading",
        "",
        "```python",
        load,
        "```",
        "",
        f"`{info['class']}.from_pretrained(path)` alone loads the weights with full attention; "
        f"`{SETTINGS_FILE}` holds the conversion settings.",
    ]
    if metrics:
        parts += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=2), "```"]
    return "\n".join(parts) + "\n"
