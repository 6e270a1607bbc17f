"""Runs an image recipe's stages in order: convert -> samples -> distill -> eval -> export.

As in the language-model runner (reattend/runner.py), each stage writes ``<output_dir>/<stage>/`` and reads what
earlier stages left on disk, a finished stage is a no-op, and a killed distillation resumes from its checkpoint.
The teacher is the loaded model, frozen; students are rebuilt from it plus the tensors the stages saved.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from functools import cached_property
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..modeling.local_2d import grid_positions, kept_fraction
from ..pipeline import StageDir
from ..recipe import RecipeError
from .attention import convert_image_model, detect_family, local_2d_settings, trainable_attention_parameters
from .distill import prediction, run_distill
from .export import export_image_student, model_class
from .recipe import ImageRecipe, load_image_recipe, resolved
from .samples import (
    SampleStore,
    build_samples,
    check_inputs,
    collate,
    latents_file_samples,
    pipeline_samples,
    synthetic_sample,
    token_grid,
)

STAGES = ("convert", "samples", "distill", "eval", "export")
ADDED_FILE = "added.safetensors"
ATTENTION_FILE = "attention.safetensors"


def load_base_model(cfg, dtype: str, seed: int):
    """The teacher: a diffusers/transformers model from a hub id or folder, or random weights from a config."""
    torch_dtype = getattr(torch, dtype)
    if cfg.random_config is not None:
        kwargs = dict(cfg.random_config)
        cls, library = model_class(kwargs.pop("class"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if library == "diffusers":
                model = cls.from_config(kwargs)
            else:
                model = cls(cls.config_class(**kwargs))
        return model if torch_dtype == torch.float32 else model.to(torch_dtype)
    name = cfg.class_name or _class_from_config(cfg.path, cfg.subfolder)
    cls, library = model_class(name)
    options = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
    options["torch_dtype" if library == "diffusers" else "dtype"] = torch_dtype
    return cls.from_pretrained(cfg.path, **options)


def _class_from_config(path: str, subfolder: str | None) -> str:
    local = Path(path) / (subfolder or "") / "config.json"
    if local.exists():
        config_file = local
    elif Path(path).exists():
        raise FileNotFoundError(f"model.path {path!r} is a folder without {local.relative_to(path)}; point "
                                "model.subfolder at the model inside it (e.g. transformer)")
    else:
        from huggingface_hub import hf_hub_download

        config_file = hf_hub_download(path, "config.json", subfolder=subfolder)
    config = json.loads(Path(config_file).read_text())
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if not name:
        raise ValueError(f"{config_file} names no model class; set model.class (e.g. PixArtTransformer2DModel)")
    return name


class ImageRun:
    def __init__(self, recipe: ImageRecipe, accelerator: Accelerator | None = None):
        self.recipe = recipe
        self.accelerator = accelerator or Accelerator()
        self.resolved = resolved(recipe)
        set_seed(recipe.seed)

    def stage(self, name: str) -> StageDir:
        return StageDir(self.recipe.output_dir, name, is_main=self.accelerator.is_main_process)

    @cached_property
    def teacher(self):
        model = load_base_model(self.recipe.model, self.recipe.dtype, self.recipe.seed)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.to(self.accelerator.device).eval()

    @cached_property
    def family(self) -> str:
        family = detect_family(self.teacher)
        if self.recipe.model.family not in (None, family):
            raise RecipeError(f"model.family: the recipe says {self.recipe.model.family!r} but the model "
                              f"({type(self.teacher).__name__}) is {family!r}; remove model.family or fix it")
        return family

    def _convert(self, model) -> list[str]:
        c = self.recipe.convert
        return convert_image_model(model, radius=c.radius, pool=c.pool, tile=c.tile, layers=c.layers)

    def student(self, upto: str = "distill"):
        """The teacher converted, with the tensors of the finished stages up to ``upto`` loaded."""
        student = copy.deepcopy(self.teacher)
        converted = self._convert(student)
        for name in ("convert", "distill")[: 1 + (upto == "distill")]:
            stage = self.stage(name)
            file = ADDED_FILE if name == "convert" else ATTENTION_FILE
            tensors = stage.load_tensors(file) if stage.done else None
            if tensors:
                student.load_state_dict(tensors, strict=False)
        return student.eval(), converted

    @cached_property
    def store(self) -> SampleStore:
        return SampleStore(self.stage("samples").path)

    def _require(self, name: str) -> None:
        if not self.stage(name).done:
            getattr(self, {"eval": "evaluate"}.get(name, name))()

    # Stages
    def convert(self) -> dict:
        stage = self.stage("convert")
        if stage.done:
            return stage.result()
        stage.begin(self.resolved)
        family = self.family
        student = copy.deepcopy(self.teacher)
        converted = self._convert(student)
        teacher_keys = set(self.teacher.state_dict())
        added = {k: v for k, v in student.state_dict().items() if k not in teacher_keys}
        stage.save_tensors(ADDED_FILE, added)
        if stage.is_main:
            (stage.path / "converted.json").write_text(json.dumps(converted, indent=2))
        trainable = trainable_attention_parameters(student)
        return stage.finish({"family": family, "converted_modules": len(converted),
                             "settings": local_2d_settings(student),
                             "trainable_parameters": sum(p.numel() for p in trainable.values()),
                             "added_parameters": sum(v.numel() for v in added.values())})

    def samples(self) -> dict:
        stage = self.stage("samples")
        if stage.done:
            return stage.result()
        if not self.accelerator.is_main_process:
            return {}
        stage.begin(self.resolved)
        cfg, family = self.recipe.samples, self.family
        total = cfg.count + cfg.heldout

        def checked(items):
            first = True
            for sample, static in items:
                if first:
                    check_inputs(self.teacher, family, collate([(sample, static)])[0], where=f"samples ({cfg.source})")
                    first = False
                yield sample, static

        if cfg.source == "synthetic":
            def source(start):
                i = start
                while True:
                    # one generator per index: a resumed run draws the same samples as an uninterrupted one
                    gen = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + i)
                    yield synthetic_sample(self.teacher, family, cfg, gen)
                    i += 1
        elif cfg.source == "latents":
            items = latents_file_samples(cfg.path)
            if len(items) < total:
                raise RecipeError(f"samples.path {cfg.path!r} holds {len(items)} samples but samples.count + "
                                  f"samples.heldout = {total}; lower them or supply more")

            def source(start):
                return iter(items[start:])
        else:
            pipe = self._pipeline()

            def source(start):
                return pipeline_samples(pipe, family, cfg, needed=total - start, seed=self.recipe.seed + 7919 * start)

        written = build_samples(stage.path, lambda start: checked(source(start)), total=total,
                                shard_size=cfg.shard_size, progress=self.accelerator.is_main_process)
        kwargs, _ = SampleStore(stage.path).batch([0])
        h, w, text = token_grid(self.teacher, family, kwargs)
        return stage.finish({"source": cfg.source, "count": cfg.count, "heldout": cfg.heldout, "written": written,
                             "grid": [h, w], "global_tokens": text})

    def _pipeline(self):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(self.recipe.pipeline, transformer=self.teacher,
                                                 torch_dtype=getattr(torch, self.recipe.dtype))
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.accelerator.device)

    def distill(self) -> dict:
        stage = self.stage("distill")
        if stage.done:
            return stage.result()
        self._require("convert")
        self._require("samples")
        stage.begin(self.resolved)
        student, converted = self.student("convert")
        result, params = run_distill(stage, accelerator=self.accelerator, student=student, teacher=self.teacher,
                                     family=self.family, converted=converted, store=self.store,
                                     train_count=self.recipe.samples.count, cfg=self.recipe.distill,
                                     seed=self.recipe.seed)
        stage.save_tensors(ATTENTION_FILE, params)
        return stage.finish(result)

    def evaluate(self) -> dict:
        stage = self.stage("eval")
        if stage.done:
            return stage.result()
        self._require("distill")
        if not self.accelerator.is_main_process:
            return {}
        stage.begin(self.resolved)
        cfg = self.recipe.eval
        count, heldout = self.recipe.samples.count, self.recipe.samples.heldout
        dtype = next(self.teacher.parameters()).dtype
        end = count + heldout
        batches = [list(range(i, min(i + cfg.batch_size, end))) for i in range(count, end, cfg.batch_size)]
        device = self.accelerator.device
        errors = {}
        with torch.no_grad():
            inputs = [self.store.batch(indices, device=device, dtype=dtype)[0] for indices in batches]
            references = [prediction(self.teacher(**kwargs)).float() for kwargs in inputs]
            teacher_ms = _median_forward_ms(self.teacher, inputs[0], cfg.warmup, cfg.repeats)
            # one student in memory at a time: for the large families a third copy of the weights does not fit
            for label, upto in (("converted", "convert"), ("student", "distill")):
                model, _ = self.student(upto)
                acc = _errors()
                for kwargs, reference in zip(inputs, references):
                    _accumulate(acc, prediction(model(**kwargs)).float(), reference)
                errors[label] = acc
                if label == "student":
                    student_ms = _median_forward_ms(model, inputs[0], cfg.warmup, cfg.repeats)
                del model
        timing_kwargs = inputs[0]
        h, w, text = token_grid(self.teacher, self.family, timing_kwargs)
        kept = kept_fraction(grid_positions(h, w), self.recipe.convert.radius)
        metrics = {
            "heldout_samples": heldout,
            "converted": _finish(errors["converted"]),
            "student": _finish(errors["student"]),
            "teacher_forward_ms": round(teacher_ms, 3),
            "student_forward_ms": round(student_ms, 3),
            "speedup": round(teacher_ms / student_ms, 3) if student_ms > 0 else None,
            "timing_batch": len(batches[0]),
            "grid": [h, w],
            "global_tokens": text,
            "image_pairs_kept": round(kept, 4),
            "device": str(device),
        }
        if stage.is_main:
            (stage.path / "report.md").write_text(format_table(metrics) + "\n")
        return stage.finish(metrics)

    def export(self) -> dict:
        stage = self.stage("export")
        if stage.done:
            return stage.result()
        self._require("distill")
        if not self.accelerator.is_main_process or not self.recipe.export.enabled:
            return {}
        stage.begin(self.resolved)
        student, _ = self.student("distill")
        out = Path(self.recipe.export.dir or stage.path / "model")
        export_image_student(student, out, base_model=self.recipe.model.describe(), recipe=self.resolved,
                             metrics=self.summary(), max_shard_size=self.recipe.export.max_shard_size,
                             dtype=self.recipe.export.dtype)
        return stage.finish({"dir": str(out)})

    def run(self, stages: tuple[str, ...] = STAGES) -> dict:
        for name in stages:
            getattr(self, {"eval": "evaluate"}.get(name, name))()
            self.accelerator.wait_for_everyone()
        summary = self.summary()
        if self.accelerator.is_main_process:
            print(format_table(summary.get("eval")) if "eval" in summary else _stages_line(summary))
        return summary

    def summary(self) -> dict:
        return {name: self.stage(name).result() for name in STAGES if self.stage(name).done}


def _errors() -> dict:
    return {"sq": 0.0, "ref_sq": 0.0, "n": 0}


def _accumulate(acc: dict, pred: torch.Tensor, reference: torch.Tensor) -> None:
    acc["sq"] += (pred - reference).pow(2).sum().item()
    acc["ref_sq"] += reference.pow(2).sum().item()
    acc["n"] += reference.numel()


def _finish(acc: dict) -> dict:
    return {"mse": acc["sq"] / acc["n"], "relative_error": (acc["sq"] / acc["ref_sq"]) ** 0.5 if acc["ref_sq"] else None}


def _median_forward_ms(model, kwargs: dict, warmup: int, repeats: int) -> float:
    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        model(**kwargs)
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        model(**kwargs)
        sync()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def format_table(metrics: dict | None) -> str:
    if not metrics:
        return "no evaluation yet"
    c, s = metrics["converted"], metrics["student"]
    rows = [
        "| model | prediction MSE | relative error | forward ms | speed-up |",
        "|---|---|---|---|---|",
        f"| teacher | 0 | 0 | {metrics['teacher_forward_ms']:.2f} | 1.00x |",
        f"| converted, before distillation | {c['mse']:.4g} | {c['relative_error']:.4f} | - | - |",
        f"| student (distilled) | {s['mse']:.4g} | {s['relative_error']:.4f} | {metrics['student_forward_ms']:.2f} | "
        f"{metrics['speedup']:.2f}x |",
        "",
        f"{metrics['heldout_samples']} held-out samples; token grid {metrics['grid'][0]}x{metrics['grid'][1]} "
        f"(+{metrics['global_tokens']} global); {100 * metrics['image_pairs_kept']:.1f}% of image token pairs kept; "
        f"timed on {metrics['device']}, batch {metrics['timing_batch']}, median of repeats",
    ]
    return "\n".join(rows)


def _stages_line(summary: dict) -> str:
    return "finished stages: " + (", ".join(summary) or "none")


def validate_image(recipe: ImageRecipe) -> str:
    r, c, d = recipe, recipe.convert, recipe.distill
    lines = [f"recipe OK (kind: image): {r.model.describe()}" + (f" [{r.model.family}]" if r.model.family else ""),
             f"  convert: radius {c.radius}, pool {c.pool}, tile {c.tile}, layers {c.layers}",
             f"  samples: {r.samples.source}, {r.samples.count} + {r.samples.heldout} held out",
             f"  distill: {d.steps} steps x batch {d.batch_size}, lr {d.lr}, weights output {d.output_loss_weight} / "
             f"attention {d.attention_loss_weight} (layers {d.attention_layers}) / task {d.task_loss_weight}",
             f"  stages: {' -> '.join(STAGES)} in {r.output_dir}"]
    return "\n".join(lines)


def dispatch(verb: str, path: str, overrides: list[str]) -> int:
    """The CLI verbs for ``kind: image`` recipes."""
    recipe = load_image_recipe(path, overrides)
    if verb == "validate":
        print(validate_image(recipe))
        return 0
    if verb in ("transfer", "recover", "plan"):
        raise RecipeError(f"`reattend {verb}` is for language-model recipes; an image recipe has the stages "
                          f"{', '.join(STAGES)} (`reattend run`, `convert`, `eval`, `export`)")
    run = ImageRun(recipe)
    if verb == "run":
        run.run()
    else:
        stages = STAGES[: STAGES.index(verb) + 1]
        run.run(tuple(s for s in stages if s == verb or not run.stage(s).done))
    return 0

