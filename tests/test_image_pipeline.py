"""The CLEAR pipeline for image-token transformers on tiny random models: recipe, samples, distillation, eval,
export and reload, resume, CLI."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from reattend.cli import main
from reattend.image.distill import prediction, select_attention_layers
from reattend.image.export import load_image_student
from reattend.image.recipe import image_recipe_from_dict, load_image_recipe
from reattend.image.run import ImageRun
from reattend.image.samples import SampleError, SampleStore, build_samples, pipeline_samples
from reattend.pipeline import NonFiniteLossError
from reattend.recipe import RecipeError

TINY_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "pixart-clear.yaml"
TINY_VIT = {"class": "ViTForImageClassification", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "image_size": 24, "patch_size": 4, "num_labels": 5}


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: a second thread buys nothing and, on a busy machine, slows each step many times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pixart(tmp_path, *overrides):
    return load_image_recipe(TINY_RECIPE, [f"output_dir={tmp_path / 'run'}", *overrides])


def logged_losses(run) -> list[float]:
    lines = (run.stage("distill").path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def assert_loss_went_down(run):
    losses = logged_losses(run)
    assert len(losses) >= 4
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses


def assert_reload_equal(run):
    folder = Path(run.stage("export").result()["dir"])
    reloaded = load_image_student(folder)
    student, _ = run.student("distill")
    kwargs, _ = run.store.batch([run.recipe.samples.count, run.recipe.samples.count + 1])
    with torch.no_grad():
        expected, got = prediction(student(**kwargs)), prediction(reloaded(**kwargs))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    return folder, reloaded


def test_pixart_distill_export_reload_and_resume(tmp_path, capsys):
    # pool=2 adds trainable pooling weights: they must be trained, saved by save_pretrained and reloaded
    run = ImageRun(tiny_pixart(tmp_path, "convert.pool=2", "distill.steps=30", "eval.repeats=2"))
    summary = run.run()
    table = capsys.readouterr().out
    assert "| student (distilled) |" in table and "speed-up" in table
    assert_loss_went_down(run)
    assert summary["eval"]["student"]["relative_error"] < summary["eval"]["converted"]["relative_error"]
    assert summary["samples"]["grid"] == [8, 8]

    folder, reloaded = assert_reload_equal(run)
    assert json.loads((folder / "reattend_local_2d.json").read_text())["settings"]["pool"] == 2
    assert (folder / "README.md").exists() and list(folder.glob("*.safetensors"))
    pool = {k: v for k, v in reloaded.state_dict().items() if "pool_" in k}
    assert pool, "pooling weights missing after reload"
    initial = run.stage("convert").load_tensors("added.safetensors")
    assert any(not torch.equal(v, initial[k]) for k, v in pool.items()), "pooling weights were not trained"

    # every stage finished: a second run loads nothing and changes nothing
    stamps = {name: (run.stage(name).path / "done.json").stat().st_mtime_ns for name in summary}
    again = ImageRun(run.recipe)
    assert again.run() == summary
    assert "teacher" not in again.__dict__
    assert {name: (again.stage(name).path / "done.json").stat().st_mtime_ns for name in summary} == stamps


def test_vit_distill_export_reload(tmp_path):
    recipe = image_recipe_from_dict({
        "kind": "image", "model": {"random_config": TINY_VIT}, "output_dir": str(tmp_path / "vit"),
        "convert": {"radius": 2.0, "pool": 2}, "samples": {"source": "synthetic", "count": 32, "heldout": 4},
        "distill": {"steps": 30, "lr": 3e-3, "batch_size": 4, "attention_layers": "all", "log_every": 5},
        "eval": {"repeats": 1}})
    run = ImageRun(recipe)
    with torch.no_grad():  # random init attends almost uniformly; sharper queries make the window matter
        for name, p in run.teacher.named_parameters():
            if "q_proj.weight" in name:
                p.mul_(6.0)
    summary = run.run()
    assert run.family == "vit"
    assert_loss_went_down(run)
    assert summary["eval"]["grid"] == [6, 6] and summary["eval"]["global_tokens"] == 1
    assert_reload_equal(run)


def test_distill_resumes_from_checkpoint(tmp_path):
    full = ImageRun(tiny_pixart(tmp_path / "a", "distill.steps=10", "distill.checkpoint_every=5"))
    full.run(("convert", "samples", "distill"))
    expected = full.stage("distill").load_tensors("attention.safetensors")

    # the same run killed after its step-5 checkpoint: re-running trains steps 6-10 only and ends the same
    killed = ImageRun(tiny_pixart(tmp_path / "b", "distill.steps=5", "distill.checkpoint_every=5"))
    killed.run(("convert", "samples", "distill"))
    for name in ("done.json", "attention.safetensors"):
        (killed.stage("distill").path / name).unlink()
    resumed = ImageRun(tiny_pixart(tmp_path / "b", "distill.steps=10", "distill.checkpoint_every=5"))
    resumed.run(("distill",))
    got = resumed.stage("distill").load_tensors("attention.safetensors")
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_names_step_and_keeps_checkpoint(tmp_path):
    run = ImageRun(tiny_pixart(tmp_path, "distill.steps=4", "distill.lr=1e30", "distill.checkpoint_every=1",
                               "distill.max_grad_norm=1e30", "distill.attention_layers=1"))
    with pytest.raises(NonFiniteLossError, match=r"attention module transformer_blocks\.\d+\.attn1 loss became nan "
                                                  r"at step \d+\. Training stopped; the last good checkpoint is kept"):
        run.run(("convert", "samples", "distill"))
    state = json.loads((run.stage("distill").path / "checkpoint" / "state.json").read_text())
    assert state["step"] >= 1 and not run.stage("distill").done


@pytest.mark.parametrize("change, message", [
    ({"convert": {"radius": 2, "window": 3}}, "convert.window: unknown key"),
    ({"convert": {"radius": -1}}, "convert.radius: Input should be greater than 0 (got -1)"),
    ({"model": {"random_config": {"num_layers": 2}}}, "needs a `class` key"),
    ({"samples": {"source": "latents"}}, "samples.source=latents needs samples.path"),
    ({"distill": {"attention_layers": 0}}, "every k-th converted module"),
    ({"samples": {"count": 8}}, "samples.source: required field is missing"),
])
def test_recipe_errors_name_field_value_and_fix(tmp_path, change, message):
    raw = yaml.safe_load(TINY_RECIPE.read_text())
    for section, value in change.items():
        raw[section] = value
    with pytest.raises(RecipeError) as err:
        image_recipe_from_dict(raw, source="tiny.yaml")
    assert message in str(err.value) and "tiny.yaml" in str(err.value)


def test_latents_source_and_shape_errors(tmp_path):
    donor = ImageRun(tiny_pixart(tmp_path / "donor", "samples.count=6", "samples.heldout=2"))
    donor.samples()
    kwargs, extras = donor.store.batch(list(range(8)))
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, tmp_path / "inputs.safetensors", metadata={"static": json.dumps(
        {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}})})
    run = ImageRun(tiny_pixart(tmp_path, "samples.source=latents", f"samples.path={tmp_path / 'inputs.safetensors'}",
                               "samples.count=6", "samples.heldout=2", "distill.steps=2"))
    run.run(("convert", "samples", "distill"))
    assert len(SampleStore(run.stage("samples").path)) == 8

    tensors["hidden_states"] = tensors["hidden_states"][:, :3].contiguous()
    save_file(tensors, tmp_path / "bad.safetensors")
    bad = ImageRun(tiny_pixart(tmp_path / "bad", "samples.source=latents", f"samples.path={tmp_path / 'bad.safetensors'}",
                               "samples.count=6", "samples.heldout=2"))
    with pytest.raises(SampleError, match=r"hidden_states has shape \(1, 3, 16, 16\), expected \(batch, 4, height"):
        bad.samples()


class FakePipeline:
    """What a diffusers pipeline does to its transformer: classifier-free guidance doubles the batch, the timestep
    is expanded to it, hidden_states is passed positionally; with output_type=latent the clean latents come back."""

    def __init__(self, transformer, text_tokens=5):
        self.transformer, self.device, self.text_tokens = transformer, torch.device("cpu"), text_tokens
        self.scheduler = type("Scheduler", (), {"alphas_cumprod": torch.linspace(0.9999, 0.01, 1000)})()

    def __call__(self, prompt, num_inference_steps, generator, output_type, height, width):
        cfg = self.transformer.config
        latents = torch.randn(len(prompt), cfg.in_channels, height // 8, width // 8, generator=generator)
        text = torch.randn(2 * len(prompt), self.text_tokens, cfg.caption_channels, generator=generator)
        for t in torch.linspace(999, 0, num_inference_steps).long():
            out = self.transformer(torch.cat([latents, latents]), encoder_hidden_states=text, timestep=t.expand(2 * len(prompt)),
                                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
            latents = latents - 0.1 * out[: len(prompt), : cfg.in_channels]
        return type("Output", (), {"images": latents})()


def test_pipeline_source_records_teacher_calls(tmp_path):
    run = ImageRun(tiny_pixart(tmp_path, "samples.steps=4", "samples.per_image=2", "samples.batch_size=2",
                               "samples.height=128", "samples.width=128"))
    cfg = run.recipe.samples.model_copy(update={"prompts": ["a cat", "a dog", "a boat"]})
    pipe = FakePipeline(run.teacher)
    written = build_samples(tmp_path / "samples", lambda start: pipeline_samples(pipe, "pixart", cfg, needed=10 - start, seed=0),
                            total=10, shard_size=4, progress=False)
    store = SampleStore(tmp_path / "samples")
    assert written == len(store) == 10
    kwargs, extras = store.batch([0, 9])
    assert kwargs["hidden_states"].shape == (2, 4, 16, 16) and kwargs["timestep"].shape == (2,)
    assert kwargs["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    assert extras["reattend.x0"].shape == (2, 4, 16, 16) and extras["reattend.alpha_bar"].shape == (2,)
    with torch.no_grad():
        run.teacher(**kwargs)  # recorded inputs replay as they were given


def test_task_loss_uses_the_clean_latent(tmp_path):
    run = ImageRun(tiny_pixart(tmp_path, "distill.steps=2", "distill.log_every=1", "distill.task_loss_weight=1.0"))
    run.run(("convert", "samples", "distill"))
    records = [json.loads(line) for line in (run.stage("distill").path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["task"] > 0 for r in records)

    vit = image_recipe_from_dict({
        "kind": "image", "model": {"random_config": TINY_VIT}, "output_dir": str(tmp_path / "vit"),
        "convert": {"radius": 2.0},
        "samples": {"source": "synthetic", "count": 2, "heldout": 1, "height": 32, "width": 32},
        "distill": {"steps": 1, "task_loss_weight": 1.0}})
    with pytest.raises(SampleError, match="task_loss_weight > 0 needs samples carrying a clean latent"):
        ImageRun(vit).run(("convert", "samples", "distill"))


def test_teacher_from_a_pipeline_folder(tmp_path):
    # a diffusers pipeline folder: the class comes from transformer/config.json, the weights from from_pretrained
    tiny = tiny_pixart(tmp_path / "random")
    ImageRun(tiny).teacher.save_pretrained(tmp_path / "pipe" / "transformer")
    raw = {**tiny.model_dump(by_alias=True), "output_dir": str(tmp_path / "run")}
    raw["model"] = {"path": str(tmp_path / "pipe"), "subfolder": "transformer", "family": "pixart"}
    run = ImageRun(image_recipe_from_dict(raw))
    assert run.convert()["converted_modules"] == 4
    reference = ImageRun(tiny).teacher.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in run.teacher.state_dict().items())

    raw["model"] = {"path": str(tmp_path / "pipe"), "subfolder": "transformer", "family": "sd3"}
    with pytest.raises(RecipeError, match="model.family: the recipe says 'sd3' but the model .* is 'pixart'"):
        ImageRun(image_recipe_from_dict(raw)).family
    raw["model"] = {"path": str(tmp_path / "pipe"), "family": "vit"}
    with pytest.raises(FileNotFoundError, match="point model.subfolder at the model inside it"):
        ImageRun(image_recipe_from_dict(raw)).teacher


def test_attention_layer_selection():
    names = [f"m{i}" for i in range(10)]
    assert select_attention_layers(names, 4) == ["m0", "m4", "m8"]
    assert select_attention_layers(names, [1, -1]) == ["m1", "m9"]
    with pytest.raises(ValueError, match="out of range; the model has 10"):
        select_attention_layers(names, [12])


def test_cli_validate_and_run_tiny_recipe(tmp_path, capsys):
    assert main(["validate", str(TINY_RECIPE)]) == 0
    assert "recipe OK (kind: image)" in capsys.readouterr().out
    assert main(["run", str(TINY_RECIPE), f"output_dir={tmp_path / 'cli'}", "distill.steps=6", "eval.repeats=1"]) == 0
    out = capsys.readouterr().out
    assert "| teacher | 0 | 0 |" in out and (tmp_path / "cli" / "export" / "model" / "reattend_local_2d.json").exists()
    assert main(["transfer", str(TINY_RECIPE)]) == 2
    assert "language-model recipes" in capsys.readouterr().err
    assert main(["validate", str(TINY_RECIPE), "convert.radius=0"]) == 2
    assert "convert.radius" in capsys.readouterr().err


TINY_FAMILIES = {
    "dit": {"class": "DiTTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
            "num_layers": 2, "sample_size": 8, "patch_size": 1, "norm_num_groups": 4},
    "sd3": {"class": "SD3Transformer2DModel", "sample_size": 8, "patch_size": 1, "in_channels": 4, "num_layers": 2,
            "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 12,
            "caption_projection_dim": 16, "pooled_projection_dim": 10, "out_channels": 4, "pos_embed_max_size": 8,
            "dual_attention_layers": [0], "qk_norm": "rms_norm"},
    "flux": {"class": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 8, "num_layers": 1,
             "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 12,
             "pooled_projection_dim": 10, "axes_dims_rope": [4, 6, 6]},
}


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_each_diffusion_family_distils_exports_and_reloads(tmp_path, family):
    pixels = 128 if family == "flux" else 64  # an 8x8 token grid: VAE /8, FLUX also packs 2x2 latents per token
    recipe = image_recipe_from_dict({
        "kind": "image", "model": {"random_config": TINY_FAMILIES[family]}, "output_dir": str(tmp_path / family),
        "convert": {"radius": 2.0}, "samples": {"source": "synthetic", "count": 16, "heldout": 2, "text_tokens": 4,
                                                "height": pixels, "width": pixels},
        "distill": {"steps": 12, "lr": 3e-3, "batch_size": 2, "attention_layers": "all", "log_every": 3},
        "eval": {"repeats": 1}})
    run = ImageRun(recipe)
    with torch.no_grad():  # random init attends almost uniformly; sharper queries make the window matter
        for name, p in run.teacher.named_parameters():
            if name.endswith("to_q.weight"):
                p.mul_(6.0)
    summary = run.run()
    assert run.family == family and summary["samples"]["grid"] == [8, 8]
    assert_loss_went_down(run)
    assert_reload_equal(run)
