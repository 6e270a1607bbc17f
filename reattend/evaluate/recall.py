"""Long-context recall: synthetic multi-query associative recall (MQAR) and passkey retrieval.

Short benchmarks never reach the part of a converted attention that summarises old tokens (the linear
state beyond a sliding window, a low-rank latent), so recall is measured at increasing lengths.

A sample is one token sequence that already holds the right answers, plus the token spans of those answers.
An answer counts as recalled when, at every one of its tokens, the model's most likely next token is that
token. Under causal attention this is exactly "greedy decoding from the prompt reproduces the answer", but
all queries of a sample are scored in one forward pass.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .config import RecallConfig
from .quality import model_device

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"


@dataclass
class RecallSample:
    ids: list[int]
    # [start, end) token spans of the answers inside ``ids``.
    answers: list[tuple[int, int]] = field(default_factory=list)


class _Builder:
    """Concatenates separately tokenised pieces, so answer spans are known without offset mapping."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.answers: list[tuple[int, int]] = []

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def add(self, text: str, *, answer: bool = False) -> None:
        piece = self.encode(text)
        if answer:
            self.answers.append((len(self.ids), len(self.ids) + len(piece)))
        self.ids.extend(piece)

    def sample(self) -> RecallSample:
        return RecallSample(ids=list(self.ids), answers=list(self.answers))


def build_mqar(tokenizer, length: int, num_queries: int, rng: random.Random) -> RecallSample:
    """Key-value pairs ("code xqz: 4821") filling about ``length`` tokens, then queries of some of the keys.

    The number of pairs grows with the length, as in Zoology's MQAR: a longer context must hold more facts.
    """
    builder = _Builder(tokenizer)
    builder.add("Remember each code.\n")
    pair_tokens = len(builder.encode("code abc: 1234\n"))
    footer = "Now recall them.\n"
    footer_tokens = len(builder.encode(footer))
    keys: list[str] = []
    pairs: dict[str, int] = {}
    while True:
        queries = min(num_queries, len(keys) + 1)
        if keys and len(builder.ids) + pair_tokens * (1 + queries) + footer_tokens > length:
            break
        key = "".join(rng.choices(string.ascii_lowercase, k=3))
        if key in pairs:
            continue
        pairs[key] = rng.randint(1000, 9999)
        keys.append(key)
        builder.add(f"code {key}: {pairs[key]}\n")
    builder.add(footer)
    for key in rng.sample(keys, min(num_queries, len(keys))):
        builder.add(f"code {key}:")
        builder.add(f" {pairs[key]}", answer=True)
        builder.add("\n")
    return builder.sample()


def build_passkey(tokenizer, length: int, depth: float, rng: random.Random) -> RecallSample:
    """A 5-digit pass key hidden at relative ``depth`` (0 = start, 1 = end) of filler text of about
    ``length`` tokens, asked for at the end."""
    key = rng.randint(10000, 99999)
    intro = "There is a pass key hidden in the following text. Find it and remember it.\n"
    needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
    question = "What is the pass key? The pass key is"
    builder = _Builder(tokenizer)
    fixed = sum(len(builder.encode(t)) for t in (intro, needle, question, f" {key}"))
    fillers = max(0, (length - fixed) // len(builder.encode(FILLER)))
    at = round(depth * fillers)
    builder.add(intro)
    for i in range(fillers + 1):
        if i == at:
            builder.add(needle)
        if i < fillers:
            builder.add(FILLER)
    builder.add(question)
    builder.add(f" {key}", answer=True)
    return builder.sample()


@torch.no_grad()
def score_sample(model, sample: RecallSample) -> list[bool]:
    """For each answer span: is the greedy prediction right at every one of its tokens?"""
    first = min(start for start, _ in sample.answers)
    # Only positions from the one before the first answer onwards are needed: skip the rest of the logits.
    keep = len(sample.ids) - first + 1
    ids = torch.tensor([sample.ids], device=model_device(model))
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[0, -keep:]
    offset = len(sample.ids) - keep
    predicted = logits.argmax(-1).cpu()
    target = ids[0].cpu()
    return [
        bool((predicted[start - 1 - offset : end - 1 - offset] == target[start:end]).all())
        for start, end in sample.answers
    ]


def recall_accuracy(model, samples: list[RecallSample]) -> float:
    hits = [hit for sample in samples for hit in score_sample(model, sample)]
    return sum(hits) / len(hits)


def build_samples(tokenizer, task: str, length: int, cfg: RecallConfig, rng: random.Random) -> list[RecallSample]:
    if task == "mqar":
        return [build_mqar(tokenizer, length, cfg.mqar_queries, rng) for _ in range(cfg.mqar_samples)]
    n = cfg.passkey_samples
    depths = [i / (n - 1) for i in range(n)] if n > 1 else [0.5]
    return [build_passkey(tokenizer, length, depth, rng) for depth in depths]


def evaluate_recall(student, teacher, tokenizer, cfg: RecallConfig, *, seed: int, progress: bool) -> dict:
    """{task: {length: {"teacher": acc, "student": acc, "queries": n, "tokens": mean sample length}}};
    both models answer the same samples."""
    results: dict = {}
    jobs = [(task, length) for task in cfg.tasks for length in cfg.lengths]
    for task, length in tqdm(jobs, desc="recall", disable=not progress):
        samples = build_samples(tokenizer, task, length, cfg, random.Random(f"{seed}-{task}-{length}"))
        results.setdefault(task, {})[length] = {
            "teacher": recall_accuracy(teacher, samples),
            "student": recall_accuracy(student, samples),
            "queries": sum(len(s.answers) for s in samples),
            "tokens": sum(len(s.ids) for s in samples) / len(samples),
        }
    return results
