"""Evaluate a converted student against its teacher: one call, one report.

``evaluate`` runs every enabled metric of an :class:`EvalConfig` on two in-memory models and writes
``report.md``, ``metrics.json`` and PNG plots into ``out_dir``; ``evaluate_folders`` loads the two models
first (what ``reattend eval --student DIR --teacher ID_OR_DIR`` calls).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import LOCAL_CLOZE_TASK, LOCAL_PPL_TASK, EvalConfig
from .efficiency import evaluate_efficiency
from .fidelity import attention_fidelity
from .generations import side_by_side
from .harness import run_lm_eval, task_manager, write_local_tasks
from .quality import kl_agreement, perplexity_sweep
from .recall import evaluate_recall
from .report import format_summary, write_report

__all__ = ["EvalConfig", "evaluate", "evaluate_folders"]


def _check_texts(texts: dict[str, torch.Tensor], cfg: EvalConfig) -> dict[str, torch.Tensor]:
    needs_text = [name for name in ("perplexity", "kl_agreement", "fidelity") if getattr(cfg, name).enabled]
    if cfg.lm_eval.enabled and {LOCAL_PPL_TASK, LOCAL_CLOZE_TASK} & set(cfg.lm_eval.tasks):
        needs_text.append("lm_eval")
    if needs_text and not texts:
        raise ValueError(f"{', '.join(needs_text)} need held-out texts, and none were given")
    checked = {}
    for name, stream in texts.items():
        if not torch.is_tensor(stream) or stream.dtype != torch.long:
            raise TypeError(f"held-out text {name!r} must be a LongTensor of token ids, got {type(stream).__name__}")
        checked[name] = stream.reshape(-1).cpu()
    # Checked before any metric runs, so a bad setting fails in seconds instead of after the slow metrics.
    if cfg.fidelity.enabled and checked and len(next(iter(checked.values()))) < cfg.fidelity.context_length:
        raise ValueError(
            f"fidelity runs on the first held-out text, which has fewer than fidelity.context_length="
            f"{cfg.fidelity.context_length} tokens"
        )
    return checked


def evaluate(student, teacher, tokenizer, cfg: EvalConfig, out_dir, texts: dict[str, torch.Tensor], *,
             models: dict[str, str] | None = None) -> dict:
    """Compare ``student`` with ``teacher`` (HF causal LMs with the same layer structure).

    ``texts`` maps a held-out text's name to a 1-D stream of token ids; ``models`` optionally names where
    each model came from, for the report. Returns the metrics also written to ``out_dir/metrics.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = _check_texts(texts, cfg)
    progress = cfg.progress
    student.eval()
    teacher.eval()
    torch.manual_seed(cfg.seed)
    metrics: dict = {
        "config": cfg.model_dump(mode="json"),
        "models": models or {},
        "texts": {name: len(stream) for name, stream in texts.items()},
        "timing_s": {},
    }

    def run(name: str, fn):
        start = time.perf_counter()
        metrics[name] = fn()
        metrics["timing_s"][name] = round(time.perf_counter() - start, 2)

    if cfg.perplexity.enabled:
        run("perplexity", lambda: perplexity_sweep(student, teacher, texts, cfg.perplexity, progress=progress))
    if cfg.kl_agreement.enabled:
        run("kl_agreement", lambda: kl_agreement(student, teacher, texts, cfg.kl_agreement, progress=progress))
    if cfg.fidelity.enabled:
        # Attention errors depend little on which text feeds them; the first text keeps this metric quick.
        first = next(iter(texts.values()))
        run("fidelity", lambda: attention_fidelity(student, teacher, first, cfg.fidelity, progress=progress))
    if cfg.lm_eval.enabled:
        run("lm_eval", lambda: _lm_eval(student, teacher, tokenizer, cfg, out_dir, texts))
    if cfg.recall.enabled:
        run("recall", lambda: evaluate_recall(student, teacher, tokenizer, cfg.recall, seed=cfg.seed, progress=progress))
    if cfg.efficiency.enabled:
        run("efficiency", lambda: evaluate_efficiency(student, teacher, tokenizer, cfg.efficiency, seed=cfg.seed, progress=progress))
    if cfg.generations.enabled:
        run("generations", lambda: side_by_side(student, teacher, tokenizer, cfg.generations, progress=progress))

    write_report(metrics, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(format_summary(metrics))
    return metrics


def _lm_eval(student, teacher, tokenizer, cfg: EvalConfig, out_dir: Path, texts) -> dict:
    include = []
    tasks_dir = None
    if {LOCAL_PPL_TASK, LOCAL_CLOZE_TASK} & set(cfg.lm_eval.tasks):
        tasks_dir = write_local_tasks(texts, tokenizer, cfg.lm_eval, out_dir / "lm_eval_tasks", seed=cfg.seed)
        include.append(tasks_dir)
    if cfg.lm_eval.include_path is not None:
        include.append(cfg.lm_eval.include_path)
    manager = task_manager(cfg.lm_eval.tasks, include)
    return {
        "tasks_dir": str(tasks_dir) if tasks_dir else None,
        "teacher": run_lm_eval(teacher, tokenizer, cfg.lm_eval, manager, seed=cfg.seed),
        "student": run_lm_eval(student, tokenizer, cfg.lm_eval, manager, seed=cfg.seed),
    }


def evaluate_folders(student: str, teacher: str, cfg: EvalConfig, out_dir, texts: dict[str, torch.Tensor] | None = None) -> dict:
    """Load an exported student folder and its teacher (hub id, local folder or ``embedded:...``) and
    evaluate them; without ``texts``, the default held-out texts are tokenised with the teacher's tokenizer."""
    from reattend.models.loading import load_teacher

    teacher_model, tokenizer = load_teacher(teacher)
    student_model, _ = load_teacher(student)
    if texts is None:
        from reattend.data import DataConfig, build_splits

        texts = build_splits(DataConfig(), tokenizer).heldout
    return evaluate(student_model, teacher_model, tokenizer, cfg, out_dir, texts,
                    models={"student": str(student), "teacher": str(teacher)})
