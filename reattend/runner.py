"""Runs a recipe's stages in order: convert -> transfer -> recover -> eval -> export (-> push).

Each stage reads the previous stages' outputs from disk, so any stage can run alone, a finished stage is
skipped, and a killed training stage resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from functools import cached_property
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .convert import changed_tensors, convert_model, student_attention_modules
from .convert.rules import resolve_plan
from .data import build_splits, pack_blocks
from .distill.recover import apply_adapter, run_recover
from .distill.transfer import run_transfer
from .evaluate.perplexity import perplexity
from .models.adapters import check_supported
from .models.loading import load_teacher
from .pipeline import STAGES, StageDir
from .recipe import Recipe, resolved

ATTENTION_FILE = "attention.safetensors"
ADAPTER_FILE = "adapter.safetensors"


class Run:
    def __init__(self, recipe: Recipe, accelerator: Accelerator | None = None):
        self.recipe = recipe
        self.accelerator = accelerator or Accelerator()
        self.resolved = resolved(recipe)
        set_seed(recipe.seed)

    def stage(self, name: str) -> StageDir:
        return StageDir(self.recipe.output_dir, name, is_main=self.accelerator.is_main_process)

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    @cached_property
    def _teacher_and_tokenizer(self):
        model, tokenizer = load_teacher(self.recipe.model, dtype=self.recipe.dtype)
        check_supported(model.config)
        model.to(self.accelerator.device)
        for p in model.parameters():
            p.requires_grad_(False)
        return model, tokenizer

    @property
    def teacher(self):
        return self._teacher_and_tokenizer[0]

    @property
    def tokenizer(self):
        return self._teacher_and_tokenizer[1]

    @cached_property
    def splits(self):
        return build_splits(self.recipe.data, self.tokenizer)

    @cached_property
    def plan(self) -> list[dict]:
        return resolve_plan(self.recipe.convert.rules, self.teacher.config.num_hidden_layers)

    @cached_property
    def heldout_blocks(self) -> dict[str, torch.Tensor]:
        cfg = self.recipe.stage_eval
        return {name: pack_blocks(stream, self.recipe.data.block_size)[: cfg.blocks]
                for name, stream in self.splits.heldout.items()}

    def heldout_perplexity(self, model, label: str) -> dict[str, float]:
        return {name: round(perplexity(model, blocks, batch_size=self.recipe.stage_eval.batch_size,
                                       desc=f"perplexity {label} {name}", progress=self.accelerator.is_main_process), 3)
                for name, blocks in self.heldout_blocks.items()}

    # Students as of a finished stage, rebuilt from the teacher and the saved deltas.
    def student(self, upto: str):
        student = convert_model(self.teacher, self.plan, initialise=False)  # the saved tensors hold what init made
        # Oldest first: a later stage may save only what it trained (recover), the rest comes from earlier ones.
        order = ("convert", "transfer", "recover")
        for name in order[: order.index(upto) + 1]:
            tensors = self.stage(name).load_tensors(ATTENTION_FILE)
            if tensors is not None and self.stage(name).done:
                student.load_state_dict(tensors, strict=False)
        if upto == "recover" and self.stage("recover").done:
            adapter = self.stage("recover").load_tensors(ADAPTER_FILE)
            if adapter:  # empty after full fine-tuning (recover.method: attention)
                student = apply_adapter(student, self.recipe.recover, adapter)
        return student

    def latest_student_stage(self) -> str:
        for name in ("recover", "transfer", "convert"):
            if self.stage(name).done:
                return name
        raise RuntimeError(f"no converted model in {self.recipe.output_dir}: run `reattend convert` first")

    # Stages
    def convert(self) -> dict:
        stage = self.stage("convert")
        if stage.done:
            return stage.result()
        stage.begin(self.resolved)
        started = time.perf_counter()
        student = convert_model(self.teacher, self.plan, calibration=self.splits.train)
        conversion_s = round(time.perf_counter() - started, 1)
        stage.save_tensors(ATTENTION_FILE, changed_tensors(student, self.teacher))
        if stage.is_main:
            (stage.path / "plan.json").write_text(json.dumps(self.plan, indent=2))
        metrics = {"teacher_perplexity": self.heldout_perplexity(self.teacher, "teacher"),
                   "perplexity": self.heldout_perplexity(student, "converted"),
                   "converted_layers": sum(e["target"] != "keep" for e in self.plan), "conversion_s": conversion_s}
        # Layers that recovery phases in (mla's latent norms) start training from a different model than the
        # converted one: measure that one too, since it is what recovery has to improve.
        phased = [m for _, m in student_attention_modules(student) if getattr(m, "phased_in_by_recovery", False)]
        if phased:
            for module in phased:
                module.set_training_progress(0.0)
            metrics["perplexity_at_recovery_start"] = self.heldout_perplexity(student, "at recovery start")
            for module in phased:
                module.set_training_progress(1.0)
        return stage.finish(metrics)

    def transfer(self) -> dict:
        stage = self.stage("transfer")
        if stage.done:
            return stage.result()
        if not self.recipe.transfer.enabled:
            return {"stage": "transfer", "skipped": True}
        self._require("convert")
        stage.begin(self.resolved)
        student = self.student("convert")
        result, params = run_transfer(stage, accelerator=self.accelerator, student=student,
                                      train_blocks=self.splits.train, cfg=self.recipe.transfer, seed=self.recipe.seed)
        student = self.accelerator.unwrap_model(student)
        stage.save_tensors(ATTENTION_FILE, changed_tensors(student, self.teacher))
        return stage.finish({**result, "perplexity": self.heldout_perplexity(student, "after transfer")})

    def recover(self) -> dict:
        stage = self.stage("recover")
        if stage.done:
            return stage.result()
        if not self.recipe.recover.enabled:
            return {"stage": "recover", "skipped": True}
        self._require("convert")
        stage.begin(self.resolved)
        student = self.student("transfer")
        result, adapter, features, merged = run_recover(
            stage, accelerator=self.accelerator, student=student, teacher=self.teacher,
            train_blocks=self.splits.train, cfg=self.recipe.recover, seed=self.recipe.seed)
        stage.save_tensors(ADAPTER_FILE, adapter)
        if features:
            stage.save_tensors(ATTENTION_FILE, features)
        return stage.finish({**result, "perplexity": self.heldout_perplexity(merged, "after recovery")})

    def evaluate(self) -> dict:
        from .evaluate import evaluate

        stage = self.stage("eval")
        if stage.done:
            return stage.result()
        if not self.accelerator.is_main_process:
            return {}
        stage.begin(self.resolved)
        student = self.student(self.latest_student_stage())
        metrics = evaluate(student, self.teacher, self.tokenizer, self.recipe.eval, stage.path, self.splits.heldout)
        return stage.finish({"summary_file": str(stage.path / "report.md"), **_headline(metrics)})

    def export(self) -> dict:
        from .export.checkpoint import export_model

        stage = self.stage("export")
        if stage.done:
            return stage.result()
        if not self.accelerator.is_main_process or not self.recipe.export.enabled:
            return {}
        stage.begin(self.resolved)
        student = self.student(self.latest_student_stage())
        out = Path(self.recipe.export.dir or stage.path / "model")
        if self.recipe.export.native:
            if any(entry["target"] == "mla" for entry in self.plan):
                from .export.native_deepseek import export_native_deepseek as export_native, native_config
            else:
                from .export.native_local import export_native_local as export_native, native_config

            native_config(student)  # refuse an inexpressible plan before anything is written
        export_model(student, self.tokenizer, out, recipe=self.resolved, metrics=self.summary(),
                     max_shard_size=self.recipe.export.max_shard_size, dtype=self.recipe.export.dtype)
        result = {"dir": str(out)}
        if self.recipe.export.native:
            native = export_native(student, self.tokenizer, out.with_name(out.name + "-native"),
                                   max_shard_size=self.recipe.export.max_shard_size)
            result["native_dir"] = str(native)
        return stage.finish(result)

    def push(self) -> dict:
        from .export.push import push_folder

        if not self.recipe.push.repo_id or not self.accelerator.is_main_process:
            return {}
        self._require("export")
        url = push_folder(self.stage("export").result()["dir"], self.recipe.push.repo_id, private=self.recipe.push.private)
        return {"stage": "push", "url": url}

    def _require(self, name: str) -> None:
        if not self.stage(name).done:
            getattr(self, {"eval": "evaluate"}.get(name, name))()

    def run(self, stages: tuple[str, ...] = STAGES) -> dict:
        for name in stages:
            getattr(self, {"eval": "evaluate"}.get(name, name))()
            self.accelerator.wait_for_everyone()
        if "export" in stages:
            self.push()
        summary = self.summary()
        if self.accelerator.is_main_process:
            print(format_summary(summary))
        return summary

    def summary(self) -> dict:
        out = {}
        for name in ("convert", "transfer", "recover", "eval", "export"):
            stage = self.stage(name)
            if stage.done:
                out[name] = stage.result()
        return out


def _headline(metrics: dict) -> dict:
    """The few eval numbers worth repeating in the run summary (the report has everything)."""
    keep = {}
    for key in ("perplexity", "kl_agreement"):
        if key in metrics:
            keep[key] = metrics[key]
    return keep


def format_summary(summary: dict) -> str:
    convert = summary.get("convert")
    if not convert:
        return "nothing has run yet"
    texts = list(convert["teacher_perplexity"])
    header = "| model | " + " | ".join(f"ppl {t}" for t in texts) + " | ratio | tokens | wall time |"
    rows = [header, "|" + "---|" * (len(texts) + 4)]

    def row(label, ppl, tokens, wall):
        first = texts[0]
        ratio = f"{ppl[first] / convert['teacher_perplexity'][first]:.3f}" if ppl else ""
        cells = " | ".join(f"{ppl[t]:.2f}" for t in texts)
        return f"| {label} | {cells} | {ratio} | {tokens} | {wall} |"

    rows.append(row("teacher", convert["teacher_perplexity"], "-", "-"))
    rows.append(row("student after conversion", convert["perplexity"], 0, f"{convert['wall_time_s']:.0f} s"))
    for name, label in (("transfer", "student after transfer"), ("recover", "student after recovery")):
        result = summary.get(name)
        if result and "perplexity" in result:
            rows.append(row(label, result["perplexity"], f"{result['tokens']:,}", f"{result['wall_time_s']:.0f} s"))
    return "\n".join(rows)
