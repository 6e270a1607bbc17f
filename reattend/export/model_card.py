"""Model card (README.md) for an exported converted model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import yaml


def _plan_summary(plan: list[dict]) -> str:
    counts = Counter(json.dumps(entry, sort_keys=True) for entry in plan)
    lines = ["| layers | attention |", "|---|---|"]
    for key, n in counts.items():
        entry = json.loads(key)
        layers = [i for i, e in enumerate(plan) if json.dumps(e, sort_keys=True) == key]
        options = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "target")
        lines.append(f"| {_ranges(layers)} ({n}) | {entry['target']}{' (' + options + ')' if options else ''} |")
    return "\n".join(lines)


def _ranges(indices: list[int]) -> str:
    spans, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None]):
        if cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(spans)


def write_model_card(path: Path, *, config: dict, recipe: dict | None, metrics: dict | None) -> None:
    base = recipe.get("model") if recipe else None
    plan = config.get("attention_plan") or []
    parts = [
        "---",
        yaml.safe_dump({"library_name": "transformers", "tags": ["reattend", "linear-attention", "distillation"],
                        **({"base_model": base} if base and not str(base).startswith("embedded:") else {})},
                       sort_keys=False).strip(),
        "---",
        f"# {config.get('architectures', ['model'])[0]} converted by reattend",
        "",
        f"Base model: `{base}`. The softmax attention of the layers below was replaced and the model distilled "
        "back from the original (attention transfer, then LoRA recovery).",
        "",
        _plan_summary(plan) if plan else "",
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # or `import reattend` first",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
        "",
        "Fused Triton kernels are used on CUDA when triton is installed; elsewhere the plain PyTorch path runs.",
    ]
    if metrics:
        parts += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=2), "```"]
    if recipe:
        parts += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```"]
    path.write_text("\n".join(parts) + "\n")
