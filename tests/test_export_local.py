"""Native export of local layers: stock transformers (no remote code) reloads them with equal logits."""

import json

import pytest
import torch
from conftest import reload_without_reattend, tiny_teacher
from transformers import AutoModelForCausalLM

from reattend.convert import convert_model
from reattend.export.native_local import NativeExportError, export_native_local

LOCAL = {"target": "local", "window": 5, "sinks": 0}
KEEP = {"target": "keep"}


@pytest.mark.parametrize("arch,plan,model_type,layer_types", [
    ("llama", [LOCAL, LOCAL], "mistral", None),
    ("mistral", [LOCAL, LOCAL], "mistral", None),
    ("qwen2", [KEEP, LOCAL], "qwen2", ["full_attention", "sliding_attention"]),
    ("qwen3", [LOCAL, KEEP], "qwen3", ["sliding_attention", "full_attention"]),
    ("gemma3_text", [LOCAL, LOCAL, KEEP], "gemma3_text", ["sliding_attention", "sliding_attention", "full_attention"]),
])
def test_native_export_reloads_in_stock_transformers_with_equal_logits(tmp_path, arch, plan, model_type, layer_types):
    student = convert_model(tiny_teacher(arch), plan)
    out = export_native_local(student, None, tmp_path / "native")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and "auto_map" not in config and "attention_plan" not in config
    assert config["sliding_window"] == 5 and config.get("layer_types", layer_types) == layer_types
    assert not list(out.glob("*.py")), "a native export must not need bundled code"
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__module__.startswith("transformers.models.")
    ids = torch.randint(0, 128, (2, 21))  # several windows long
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5)
        # and the stock sliding-window cache decodes what ours does
        ours = student.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, min_new_tokens=8)
        stock = reloaded.generate(ids[:1, :8], max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("arch,plan,message", [
    ("llama", [LOCAL, {**LOCAL, "sinks": 2}], "sinks=2"),
    ("llama", [KEEP, LOCAL], r"layers \[0\] keep full attention"),
    ("qwen2", [LOCAL, {**LOCAL, "window": 7}], r"windows \[5, 7\]"),
    ("gemma3_text", [LOCAL, LOCAL, LOCAL], "Gemma 3 layers \\[2\\]"),
    ("qwen2", [KEEP, {"target": "linear", "window": 4, "sinks": 0, "feature_map": "hedgehog", "feature_dim": 8,
                      "tie_qk": False, "affine": False, "gamma_init": 0.5}], "target 'linear'"),
])
def test_native_export_refuses_what_stock_configs_cannot_express(tmp_path, arch, plan, message):
    student = convert_model(tiny_teacher(arch), plan)
    with pytest.raises(NativeExportError, match=message):
        export_native_local(student, None, tmp_path / "native")
    assert not (tmp_path / "native").exists()


def test_local_recipe_runs_every_stage_and_both_exports_reload_without_reattend(tmp_path, tiny_model_dir, corpus_file):
    from test_pipeline import write_recipe

    from reattend.recipe import load_recipe
    from reattend.runner import Run

    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, corpus_file, tmp_path / "out",
                               convert={"rules": [{"target": "local", "options": {"window": 4, "sinks": 0}}]},
                               transfer={"lr": 0.005}, export={"native": True})
    run = Run(load_recipe(recipe_path))
    summary = run.run(stages=("convert", "transfer", "recover", "export"))  # eval has its own tests
    assert summary["recover"]["perplexity"] and summary["export"]["native_dir"].endswith("model-native")
    ids = torch.randint(0, 100, (1, 40))
    with torch.no_grad():
        expected = run.student("recover")(ids).logits
    modules = reload_without_reattend(
        tmp_path, [(summary["export"]["dir"], True), (summary["export"]["native_dir"], False)], ids, expected)
    assert len(modules) == 2 and modules[0].startswith("transformers_modules")
    assert modules[1].startswith("transformers.models.mistral")
