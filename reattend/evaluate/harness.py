"""lm-evaluation-harness on the in-memory models, with two small tasks written from the held-out texts.

The local tasks need no download, so the harness path runs offline and in CI:
- ``reattend_ppl``: rolling log-likelihood of held-out passages (word/byte perplexity, bits per byte);
- ``reattend_cloze``: pick the true continuation of a held-out passage among continuations of the same
  length taken from elsewhere in the same text (accuracy; chance is 1 / choices).
They are written as JSONL plus task YAMLs into a folder of the output directory, which doubles as a record
of exactly what was scored. Any other task name is looked up by lm-eval as usual (its catalogue, or the
user's ``include_path``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import yaml

from .config import LOCAL_CLOZE_TASK, LOCAL_PPL_TASK, LMEvalConfig

# Word-start search gives up after this many tokens and cuts mid-word rather than loop over a text
# with no whitespace tokens.
_WORD_START_SEARCH = 16
# A very repetitive text may not have enough distinct continuations; such an item is dropped.
_DISTRACTOR_TRIES = 50


def _task_yaml(task: str, data_file: Path, body: dict) -> dict:
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        **body,
        "metadata": {"version": 1.0},
    }


class _TextSampler:
    def __init__(self, stream: torch.Tensor, tokenizer):
        self.stream = stream.reshape(-1).tolist()
        self.tokenizer = tokenizer

    def decode(self, start: int, stop: int) -> str:
        return self.tokenizer.decode(self.stream[start:stop])

    def word_start(self, pos: int, limit: int) -> int:
        """First position at or after ``pos`` (and below ``limit``) whose token begins with whitespace, so
        every choice of a cloze item starts the same way and none is told apart by a split word."""
        for candidate in range(pos, min(pos + _WORD_START_SEARCH, limit)):
            text = self.tokenizer.decode([self.stream[candidate]])
            if text[:1].isspace():
                return candidate
        return pos


def _ppl_docs(samplers: dict[str, _TextSampler], cfg: LMEvalConfig) -> list[dict]:
    docs = []
    names = list(samplers)
    for i in range(cfg.ppl_docs):
        name = names[i % len(names)]
        sampler = samplers[name]
        slots = len(sampler.stream) // cfg.ppl_doc_tokens
        if slots == 0:
            continue
        # Spread a text's documents evenly over it instead of taking its first pages only.
        per_text = -(-cfg.ppl_docs // len(names))
        slot = (i // len(names)) * slots // per_text
        start = slot * cfg.ppl_doc_tokens
        docs.append({"text": sampler.decode(start, start + cfg.ppl_doc_tokens), "source": name})
    return docs


def _cloze_items(samplers: dict[str, _TextSampler], cfg: LMEvalConfig, rng: random.Random) -> list[dict]:
    ctx, cont = cfg.cloze_context_tokens, cfg.cloze_continuation_tokens
    usable = {n: s for n, s in samplers.items() if len(s.stream) >= (ctx + cont) * cfg.cloze_choices * 2}
    items = []
    names = list(usable)
    for i in range(cfg.cloze_items if names else 0):
        name = names[i % len(names)]
        sampler = usable[name]
        limit = len(sampler.stream) - cont
        split = sampler.word_start(rng.randrange(ctx, limit), limit)
        choices = [sampler.decode(split, split + cont)]
        tries = 0
        while len(choices) < cfg.cloze_choices and tries < _DISTRACTOR_TRIES * cfg.cloze_choices:
            tries += 1
            other = sampler.word_start(rng.randrange(0, limit), limit)
            text = sampler.decode(other, other + cont)
            # A distractor overlapping the true continuation would also be a correct answer.
            if abs(other - split) >= cont and text not in choices:
                choices.append(text)
        if len(choices) < cfg.cloze_choices:
            continue
        order = list(range(len(choices)))
        rng.shuffle(order)
        items.append({
            "context": sampler.decode(split - ctx, split),
            "choices": [choices[j] for j in order],
            "label": order.index(0),
            "source": name,
        })
    return items


def write_local_tasks(texts: dict[str, torch.Tensor], tokenizer, cfg: LMEvalConfig, folder: Path, *, seed: int) -> Path:
    """Write the local tasks' data and YAMLs into ``folder`` (an lm-eval include path) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    samplers = {name: _TextSampler(stream, tokenizer) for name, stream in texts.items()}
    ppl_docs = _ppl_docs(samplers, cfg)
    cloze = _cloze_items(samplers, cfg, random.Random(seed))
    if not ppl_docs or not cloze:
        raise ValueError(
            f"held-out texts too short for the local lm-eval tasks: need {cfg.ppl_doc_tokens} tokens for "
            f"perplexity documents and {2 * cfg.cloze_choices * (cfg.cloze_context_tokens + cfg.cloze_continuation_tokens)} "
            "for cloze items in at least one text"
        )
    tasks = {
        LOCAL_PPL_TASK: (ppl_docs, {
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        }),
        LOCAL_CLOZE_TASK: (cloze, {
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_target": "label",
            "doc_to_choice": "choices",
            # Continuations carry their own leading whitespace (they start at a word start).
            "target_delimiter": "",
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
            ],
        }),
    }
    for task, (rows, body) in tasks.items():
        data_file = (folder / f"{task}.jsonl").resolve()
        data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(_task_yaml(task, data_file, body), sort_keys=False))
    return folder


def task_manager(tasks: list[str], include_paths: list[Path]):
    """A TaskManager that knows ``tasks``. Indexing lm-eval's own catalogue takes seconds (thousands of
    YAMLs), so it is only added when a task is not found under the include paths."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(task in manager.all_tasks for task in tasks):
        return manager
    manager = TaskManager(include_path=paths)
    missing = [task for task in tasks if task not in manager.all_tasks]
    if missing:
        raise ValueError(
            f"lm-eval does not know the task(s) {missing}; local tasks are {[LOCAL_PPL_TASK, LOCAL_CLOZE_TASK]}, "
            "others need lm-eval's catalogue or YAMLs under lm_eval.include_path"
        )
    return manager


def _flatten(task_metrics: dict) -> dict:
    """{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ..., "sample_len": 6} -> {"acc": 0.5, "acc_stderr": 0.1}
    (the sample count is reported by ``run_lm_eval`` separately)."""
    flat = {}
    for key, value in task_metrics.items():
        if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
            continue
        metric, _, filter_name = key.partition(",")
        flat[metric if filter_name in ("", "none") else key] = value
    return flat


def run_lm_eval(model, tokenizer, cfg: LMEvalConfig, manager, *, seed: int) -> dict:
    """{task: {metric: value, "samples": documents scored}} for one model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=cfg.batch_size)
    out = simple_evaluate(
        model=lm,
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return {
        task: {**_flatten(metrics), "samples": out["n-samples"][task]["effective"]}
        for task, metrics in out["results"].items()
    }
