"""A whole run on a tiny local model and text: stages, resume, export, reload without reattend."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import reload_without_reattend

from reattend.cli import main
from reattend.distill.loop import learning_rate
from reattend.pipeline import NonFiniteLossError
from reattend.recipe import load_recipe
from reattend.runner import Run

FAST_EVAL = {
    "perplexity": {"context_lengths": [32, 64], "max_tokens": 128},
    "kl_agreement": {"context_length": 32, "max_tokens": 64},
    "fidelity": {"context_length": 32},
    "lm_eval": {"enabled": False},
    "recall": {"enabled": False},
    "efficiency": {"context_lengths": [32, 64], "decode_tokens": 4},
    "generations": {"prompts": ["The tool"], "max_new_tokens": 4},
}


def write_recipe(path, model_dir, corpus, output_dir, **sections):
    recipe = {
        "model": str(model_dir),
        "seed": 0,
        "output_dir": str(output_dir),
        "data": {"source": {"kind": "text", "path": str(corpus)}, "block_size": 32, "heldout_fraction": 0.2,
                 "extra_eval": []},
        "convert": {"rules": [{"layers": 0, "target": "linear",
                               "options": {"window": 4, "sinks": 1, "feature_dim": 8}},
                              {"layers": "all", "target": "linear",
                               "options": {"window": None, "feature_map": "hedgehog", "feature_dim": 8}}]},
        "stage_eval": {"blocks": 2},
        "transfer": {"tokens": 32 * 2 * 12, "batch_size": 2, "lr": 0.05, "log_every": 1, "checkpoint_every": 5},
        "recover": {"tokens": 32 * 2 * 6, "batch_size": 2, "lr": 0.001, "kl_weight": 0.5, "log_every": 1,
                    "checkpoint_every": 5, "lr_schedule": "cosine", "warmup_steps": 2},
        "eval": FAST_EVAL,
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, corpus_file):
    root = tmp_path_factory.mktemp("run")
    recipe_path = write_recipe(root / "recipe.yaml", tiny_model_dir, corpus_file, root / "out")
    run = Run(load_recipe(recipe_path))
    summary = run.run()
    return root, recipe_path, run, summary


def test_every_stage_finishes_and_writes_its_folder(finished_run):
    root, _, run, summary = finished_run
    for stage in ("convert", "transfer", "recover", "eval", "export"):
        folder = root / "out" / stage
        assert (folder / "done.json").exists(), stage
        assert (folder / "recipe.yaml").exists(), stage
    assert (root / "out" / "transfer" / "attention.safetensors").exists()
    assert (root / "out" / "recover" / "adapter.safetensors").exists()
    assert (root / "out" / "eval" / "report.md").stat().st_size > 0
    assert summary["transfer"]["tokens"] == 32 * 2 * 12


def test_transfer_loss_goes_down(finished_run):
    root = finished_run[0]
    records = [json.loads(line) for line in (root / "out" / "transfer" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 12
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.7 * first, (first, last)


def test_rerunning_a_finished_stage_is_a_no_op(finished_run):
    root, recipe_path, _, summary = finished_run
    before = (root / "out" / "transfer" / "done.json").read_text()
    again = Run(load_recipe(recipe_path)).run()
    assert (root / "out" / "transfer" / "done.json").read_text() == before
    assert again["recover"] == summary["recover"]


def test_export_reloads_without_reattend_and_matches(finished_run, tmp_path):
    root, _, run, _ = finished_run
    export_dir = root / "out" / "export" / "model"
    files = {p.name for p in export_dir.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_reattend.py", "README.md", "tokenizer.json"} <= files
    student = run.student("recover")
    ids = torch.randint(0, 100, (1, 40))
    with torch.no_grad():
        expected = student(ids).logits
    modules = reload_without_reattend(tmp_path, [(export_dir, True)], ids, expected)
    assert len(modules) == 1 and modules[0].startswith("transformers_modules")


def test_export_loads_natively_after_import_reattend(finished_run):
    from transformers import AutoModelForCausalLM

    root = finished_run[0]
    model = AutoModelForCausalLM.from_pretrained(root / "out" / "export" / "model")
    assert type(model).__module__.startswith("reattend.")


def test_learning_rate_warms_up_then_follows_its_schedule():
    assert [learning_rate(1.0, s, 10, "constant", 4) for s in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = [learning_rate(2.0, s, 10, "cosine", 2) for s in range(10)]
    assert cosine[:3] == [1.0, 2.0, 2.0]
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:]))
    assert cosine[6] == pytest.approx(1.0)  # half-way through the decay
    assert learning_rate(2.0, 10, 10, "cosine", 2) == pytest.approx(0.0, abs=1e-12)


def test_recovery_logs_the_scheduled_learning_rate(finished_run):
    root = finished_run[0]
    records = [json.loads(line) for line in (root / "out" / "recover" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in records]
    assert logged == pytest.approx([learning_rate(0.001, s, 6, "cosine", 2) for s in range(6)])
    assert logged[1] == pytest.approx(0.001) and logged[-1] < 0.2 * 0.001


def test_killed_stage_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, corpus_file):
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, corpus_file, tmp_path / "out",
                               recover={"enabled": False})
    run = Run(load_recipe(recipe_path))
    run.convert()
    # Simulate a kill after the step-5 checkpoint: run a shorter budget, then drop its done marker.
    short = Run(load_recipe(recipe_path, ["transfer.tokens=320", "transfer.checkpoint_every=5"]))
    short.transfer()
    (tmp_path / "out" / "transfer" / "done.json").unlink()
    checkpoint = json.loads((tmp_path / "out" / "transfer" / "checkpoint" / "state.json").read_text())
    assert checkpoint["step"] == 5
    resumed = Run(load_recipe(recipe_path)).transfer()
    assert resumed["tokens"] == 32 * 2 * 12
    records = [json.loads(x) for x in (tmp_path / "out" / "transfer" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 12


def test_non_finite_loss_stops_with_layer_and_step(tmp_path, tiny_model_dir, corpus_file):
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, corpus_file, tmp_path / "out")
    run = Run(load_recipe(recipe_path))
    run.convert()
    student = run.student("convert")
    with torch.no_grad():
        student.model.layers[1].self_attn.feature_map_q.weight.fill_(float("nan"))
    run.student = lambda upto: student
    with pytest.raises(NonFiniteLossError, match=r"layer 1 .* at step 0"):
        run.transfer()
    assert not (tmp_path / "out" / "transfer" / "done.json").exists()


def test_cli_validate_plan_ls(tmp_path, tiny_model_dir, corpus_file, capsys):
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, corpus_file, tmp_path / "out")
    assert main(["validate", str(recipe_path)]) == 0
    assert "recipe OK: llama with 2 layers, 2 converted" in capsys.readouterr().out
    assert main(["plan", str(recipe_path), "convert.rules.0.options.window=8"]) == 0
    out = capsys.readouterr().out
    assert "| 0 | linear | feature_map=hedgehog, feature_dim=8" in out and "window=8" in out
    assert main(["convert", str(recipe_path)]) == 0
    capsys.readouterr()
    assert main(["ls", str(tmp_path / "out")]) == 0
    listing = capsys.readouterr().out
    assert "convert   done" in listing and "transfer  -" in listing
    assert main(["ls", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err


def _launch(args, env_extra=None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_accelerate_launch_cpu_command_runs(tmp_path, tiny_model_dir, corpus_file):
    """The documented command; accelerate's --cpu launcher itself starts one process unless MPI is set up."""
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, corpus_file, tmp_path / "out")
    _launch(["--num_processes", "2", "--cpu", "-m", "reattend", "transfer", str(recipe_path), "transfer.tokens=256"])
    assert json.loads((tmp_path / "out" / "transfer" / "done.json").read_text())["tokens"] == 256


def test_two_process_data_parallel_run_on_cpu(tmp_path, tiny_model_dir, corpus_file):
    """Two real DDP processes (gloo): torch's launcher via accelerate, told to stay on the CPU."""
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, corpus_file, tmp_path / "out")
    _launch(["--multi_gpu", "--num_processes", "2", "-m", "reattend", "run", str(recipe_path),
             "transfer.tokens=256", "recover.tokens=128"], {"ACCELERATE_USE_CPU": "1"})
    done = json.loads((tmp_path / "out" / "transfer" / "done.json").read_text())
    assert done["tokens"] == 256 and done["steps"] == 2  # 2 processes x batch 2 x 32 tokens per step
    assert (tmp_path / "out" / "export" / "model" / "config.json").exists()
