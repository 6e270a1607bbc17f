"""Stage directories: resolved recipe, weights written atomically, metrics log, done marker, checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

STAGES = ("convert", "transfer", "recover", "eval", "export")


class NonFiniteLossError(RuntimeError):
    pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


class StageDir:
    """``<output_dir>/<stage>/`` and what a stage leaves there."""

    def __init__(self, output_dir: str | Path, name: str, *, is_main: bool = True):
        self.name = name
        self.path = Path(output_dir) / name
        self.is_main = is_main
        self._started = time.time()

    @property
    def done(self) -> bool:
        return (self.path / "done.json").exists()

    def result(self) -> dict:
        return json.loads((self.path / "done.json").read_text())

    def begin(self, resolved_recipe: dict) -> None:
        if self.is_main:
            atomic_write_bytes(self.path / "recipe.yaml", yaml.safe_dump(resolved_recipe, sort_keys=False).encode())

    def finish(self, metrics: dict) -> dict:
        metrics = {"stage": self.name, "wall_time_s": round(time.time() - self._started, 1), **metrics}
        if self.is_main:
            atomic_write_bytes(self.path / "done.json", json.dumps(metrics, indent=2).encode())
        return metrics

    def log(self, record: dict) -> None:
        if self.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.is_main:
            atomic_save_tensors(tensors, self.path / name)

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self.path / name
        return load_file(path) if path.exists() else None

    # Mid-stage checkpoints: trainable tensors, optimizer state and the step, replaced as a whole.
    def save_checkpoint(self, tensors: dict[str, torch.Tensor], optimizer, step: int, extra: dict | None = None) -> None:
        if not self.is_main:
            return
        ckpt = self.path / "checkpoint"
        atomic_save_tensors(tensors, ckpt / "trainable.safetensors")
        buffer = tempfile.SpooledTemporaryFile()
        torch.save(optimizer.state_dict(), buffer)
        buffer.seek(0)
        atomic_write_bytes(ckpt / "optimizer.pt", buffer.read())
        atomic_write_bytes(ckpt / "state.json", json.dumps({"step": step, **(extra or {})}).encode())

    def load_checkpoint(self):
        ckpt = self.path / "checkpoint"
        if not (ckpt / "state.json").exists():
            return None
        state = json.loads((ckpt / "state.json").read_text())
        tensors = load_file(ckpt / "trainable.safetensors")
        optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
        return tensors, optimizer, state
