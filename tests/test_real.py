"""End to end on the real packaged SmolLM2-135M and King James text (marked `real`; runs in CI)."""

import json

import pytest

from reattend.recipe import load_recipe
from reattend.runner import Run

pytestmark = pytest.mark.real


def test_demo_recipe_small_budget_transfer_beats_untrained_conversion(tmp_path):
    """The demo recipe with CI-sized budgets: attention transfer must lower held-out perplexity."""
    recipe = load_recipe("recipes/smollm2-135m/demo.yaml", [
        f"output_dir={tmp_path / 'run'}",
        # LoLCATs' own init (gamma 0.1, no affine): at init the linear terms swamp the window, so a few
        # hundred steps of transfer make a large, reliable difference.
        "convert.rules.0.options.affine=false",
        "convert.rules.0.options.gamma_init=0.1",
        "data.block_size=256",
        "data.extra_eval=[]",
        "stage_eval.blocks=2",
        "transfer.tokens=6144",
        "transfer.checkpoint_every=0",
        "recover.enabled=false",
    ])
    run = Run(recipe)
    run.run(("convert", "transfer"))
    converted = json.loads((tmp_path / "run" / "convert" / "done.json").read_text())
    transferred = json.loads((tmp_path / "run" / "transfer" / "done.json").read_text())
    name = "kjv-heldout"
    teacher, before, after = converted["teacher_perplexity"][name], converted["perplexity"][name], transferred["perplexity"][name]
    assert 5 < teacher < 100, teacher
    assert after < before, (before, after)
    assert transferred["tokens"] == 6144
