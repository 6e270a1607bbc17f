"""Recall tasks and their scorer, checked with stand-in models whose answers are right or wrong by design."""

from __future__ import annotations

import random
import types

import pytest
import torch

from reattend.evaluate.config import RecallConfig
from reattend.evaluate.recall import (
    RecallSample,
    build_mqar,
    build_passkey,
    evaluate_recall,
    recall_accuracy,
    score_sample,
)
from test_evaluate_helpers import char_tokenizer


class _StubLM(torch.nn.Module):
    """Answers with one-hot logits from ``predict``; honours ``logits_to_keep`` as HF models do."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def predict(self, ids: list[int], position: int) -> int:
        raise NotImplementedError

    def forward(self, input_ids, logits_to_keep: int = 0, **kwargs):
        ids = input_ids[0].tolist()
        positions = range(len(ids) - logits_to_keep if logits_to_keep else 0, len(ids))
        logits = torch.zeros(1, len(positions), self.vocab_size)
        for row, position in enumerate(positions):
            logits[0, row, self.predict(ids, position)] = 1.0
        return types.SimpleNamespace(logits=logits)


class InductionCopier(_StubLM):
    """An idealised induction head: find the longest earlier match of the text ending here (looking back at
    most ``window`` tokens) and predict the token that followed it. Solves both tasks when the needed fact is
    within its window, fails beyond it: a stand-in for a teacher and for a windowed student."""

    def __init__(self, vocab_size: int, window: int | None = None, longest: int = 12):
        super().__init__(vocab_size)
        self.window, self.longest = window, longest

    def predict(self, ids, position):
        text = "".join(map(chr, ids[: position + 1]))
        lo = 0 if self.window is None else max(0, position - self.window)
        for n in range(min(self.longest, position), 0, -1):
            found = text.rfind(text[-n:], lo, position)
            if found >= 0:
                return ord(text[found + n])
        return 0


class Scripted(_StubLM):
    """Predicts the true next token except at the listed positions."""

    def __init__(self, vocab_size: int, truth: list[int], wrong_at: set[int]):
        super().__init__(vocab_size)
        self.truth, self.wrong_at = truth, wrong_at

    def predict(self, ids, position):
        right = self.truth[position + 1] if position + 1 < len(self.truth) else 0
        return (right + 1) % self.vocab_size if position in self.wrong_at else right


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def test_scorer_counts_an_answer_only_when_every_token_is_right():
    truth = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    sample = RecallSample(ids=truth, answers=[(3, 5), (6, 8), (8, 10)])
    assert score_sample(Scripted(16, truth, wrong_at=set()), sample) == [True, True, True]
    # Position 6 predicts token 7, the second token of the second answer; position 1 lies before every answer.
    assert score_sample(Scripted(16, truth, wrong_at={6, 1}), sample) == [True, False, True]
    assert score_sample(Scripted(16, truth, wrong_at={2, 9}), sample) == [False, True, True]
    assert recall_accuracy(Scripted(16, truth, wrong_at={2, 9}), [sample, sample]) == pytest.approx(2 / 3)


def test_samples_hold_their_answers_at_the_marked_spans(tokenizer):
    rng = random.Random(0)
    mqar = build_mqar(tokenizer, 400, num_queries=5, rng=rng)
    text = tokenizer.decode(mqar.ids)
    assert len(mqar.answers) == 5 and 300 < len(mqar.ids) <= 400
    for start, end in mqar.answers:
        value = tokenizer.decode(mqar.ids[start:end])
        key = tokenizer.decode(mqar.ids[:start]).rsplit("code ", 1)[1]
        assert f"code {key}{value}\n" in text.split("Now recall them.")[0]
    passkey = build_passkey(tokenizer, 400, depth=0.0, rng=rng)
    (start, end), = passkey.answers
    key = tokenizer.decode(passkey.ids[start:end]).strip()
    assert key.isdigit() and len(key) == 5 and end == len(passkey.ids)
    assert tokenizer.decode(passkey.ids).index(f"The pass key is {key}.") < 200
    assert 350 < len(passkey.ids) <= 400


def test_copying_teacher_solves_recall_and_windowed_student_fails_at_length(tokenizer):
    cfg = RecallConfig(lengths=[96, 600], mqar_samples=2, mqar_queries=4, passkey_samples=3)
    teacher = InductionCopier(len(tokenizer))
    student = InductionCopier(len(tokenizer), window=128)
    results = evaluate_recall(student, teacher, tokenizer, cfg, seed=0, progress=False)
    for task in ("mqar", "passkey"):
        assert results[task][96]["teacher"] == 1.0 and results[task][96]["student"] == 1.0
        assert results[task][600]["teacher"] == 1.0
    # Pass keys at depth 0 and 0.5 of a 600-token text lie beyond a 128-token window; the one at the end does not.
    assert results["passkey"][600]["student"] == pytest.approx(1 / 3)
    assert results["mqar"][600]["student"] < 0.5
    assert results["mqar"][600]["queries"] == 8
