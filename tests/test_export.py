"""Export: sharded safetensors, config with the attention plan and auto_map, bundled code, model card."""

import json

import torch
from conftest import tiny_teacher
from transformers import AutoModelForCausalLM

from reattend.convert import convert_model
from reattend.export.checkpoint import bundled_files, export_model

PLAN = [{"target": "keep"}, {"target": "linear", "window": 4, "sinks": 1, "feature_map": "hedgehog", "feature_dim": 8,
                             "tie_qk": False, "affine": True, "gamma_init": 0.9}]


def test_sharded_export_reloads_with_equal_logits(tmp_path):
    student = convert_model(tiny_teacher("qwen2"), PLAN)
    out = export_model(student, None, tmp_path / "model", recipe={"model": "tiny"}, metrics={"ppl": 1.0},
                       max_shard_size="20KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "reattend_qwen2" and config["attention_plan"] == PLAN
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_reattend.ReattendQwen2ForCausalLM"
    assert {p.name for p in bundled_files()} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "| 1 (1) | linear (affine=True, feature_dim=8" in card and "window=4)" in card and "| 0 (1) | keep |" in card
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 128, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits)
    assert not list(tmp_path.glob(".model.*")), "the temporary export folder must be renamed into place"


def test_export_can_cast_dtype(tmp_path):
    student = convert_model(tiny_teacher("llama"), PLAN)
    out = export_model(student, None, tmp_path / "m", dtype="bfloat16")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.model.layers[1].self_attn.feature_map_q.weight.dtype == torch.bfloat16
