"""Heat-map of MoH routing: the fraction of tokens that chose each routed head, per layer, over a stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)

PREFIX = "head_usage/layer"


def mean_head_usage(metrics_path: Path) -> dict[int, list[float]]:
    """Per layer, the mean over the logged records of each routed head's token fraction ({} when none)."""
    sums: dict[int, list[float]] = {}
    counts: dict[int, int] = {}
    if not metrics_path.exists():
        return {}
    for line in metrics_path.read_text().splitlines():
        for key, usage in json.loads(line).items():
            if key.startswith(PREFIX):
                layer = int(key[len(PREFIX):])
                sums[layer] = [a + b for a, b in zip(sums.get(layer, [0.0] * len(usage)), usage)]
                counts[layer] = counts.get(layer, 0) + 1
    return {layer: [s / counts[layer] for s in sums[layer]] for layer in sorted(sums)}


def write_head_usage_plot(stage_path: Path) -> Path | None:
    """``head_usage.png`` in ``stage_path`` from its ``metrics.jsonl``; None (nothing written) without MoH records."""
    usage = mean_head_usage(stage_path / "metrics.jsonl")
    if not usage:
        return None
    layers = list(usage)
    width = max(len(u) for u in usage.values())
    # Layers may route different numbers of heads; missing cells stay blank.
    grid = [u + [math.nan] * (width - len(u)) for u in usage.values()]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * width, 1.2 + 0.35 * len(layers)))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    if width * len(layers) <= 400:
        for row, values in enumerate(grid):
            for col, value in enumerate(values):
                if not math.isnan(value):
                    ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if value > 0.6 else "white")
    ax.set_xticks(range(width))
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("routed head")
    ax.set_ylabel("layer")
    ax.set_title("fraction of tokens choosing each routed head\n(mean over the stage's logged steps)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    path = stage_path / "head_usage.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
