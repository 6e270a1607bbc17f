"""Evaluation metrics on cases with a known answer, and the whole report end to end, on tiny models."""

from __future__ import annotations

import copy
import json
import sys
import types

import pytest
import torch
from pydantic import ValidationError

from test_evaluate_helpers import char_tokenizer, heldout_texts, perturbed, tiny_llama
from reattend.evaluate import EvalConfig, evaluate, evaluate_folders
from reattend.evaluate.config import FidelityConfig, KLAgreementConfig, LMEvalConfig, PerplexityConfig
from reattend.evaluate.efficiency import crossover, measure, tensor_bytes
from reattend.evaluate.fidelity import attention_fidelity
from reattend.evaluate.harness import write_local_tasks
from reattend.evaluate.quality import kl_agreement, make_blocks, perplexity_sweep


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def texts(tokenizer):
    return heldout_texts(tokenizer)


def small_config(**overrides) -> EvalConfig:
    cfg = {
        "perplexity": {"context_lengths": [64, 256], "max_tokens": 512},
        "kl_agreement": {"context_length": 128, "max_tokens": 256},
        "fidelity": {"context_length": 128},
        "lm_eval": {"ppl_docs": 4, "ppl_doc_tokens": 64, "cloze_items": 6,
                    "cloze_context_tokens": 32, "cloze_continuation_tokens": 8},
        "recall": {"lengths": [64, 256]},
        "efficiency": {"context_lengths": [64, 256], "decode_tokens": 4},
        "generations": {"max_new_tokens": 8},
        "progress": False,
    }
    for section, values in overrides.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    return EvalConfig.model_validate(cfg)


def test_config_refuses_unknown_keys_and_normalises_lengths():
    EvalConfig()
    with pytest.raises(ValidationError):
        EvalConfig.model_validate({"perplexity": {"context_length": 512}})
    with pytest.raises(ValidationError):
        EvalConfig.model_validate({"recall": {"tasks": ["needle"]}})
    with pytest.raises(ValidationError):
        EvalConfig.model_validate({"efficiency": {"context_lengths": []}})
    cfg = EvalConfig.model_validate({"perplexity": {"context_lengths": [2048, 512, 512]}})
    assert cfg.perplexity.context_lengths == [512, 2048]


def test_make_blocks():
    stream = torch.arange(100)
    assert make_blocks(stream, 30, 60).tolist() == [list(range(30)), list(range(30, 60))]
    assert make_blocks(stream, 30, 10).shape == (1, 30)
    assert make_blocks(stream, 101, 1000) is None


def test_identical_student_scores_exactly_like_teacher(teacher, texts):
    student = copy.deepcopy(teacher)
    kl = kl_agreement(student, teacher, texts, KLAgreementConfig(context_length=128, max_tokens=256), progress=False)
    for r in kl.values():
        assert r["kl"] == pytest.approx(0.0, abs=1e-7)
        assert r["top1_agreement"] == 1.0
    fid = attention_fidelity(student, teacher, texts["prose"], FidelityConfig(context_length=128), progress=False)
    assert fid["relative_mse"] == [0.0, 0.0]
    ppl = perplexity_sweep(student, teacher, texts, PerplexityConfig(context_lengths=[64, 256], max_tokens=256), progress=False)
    for entry in ppl.values():
        for r in entry["lengths"].values():
            assert r["student"] == pytest.approx(r["teacher"], rel=1e-6)


def test_perturbed_student_diverges(teacher, texts):
    student = perturbed(teacher)
    kl = kl_agreement(student, teacher, texts, KLAgreementConfig(context_length=128, max_tokens=256), progress=False)
    assert all(r["kl"] > 1e-4 and r["top1_agreement"] < 1.0 for r in kl.values())
    fid = attention_fidelity(student, teacher, texts["prose"], FidelityConfig(context_length=128), progress=False)
    assert all(v > 1e-3 for v in fid["relative_mse"])


def test_fidelity_judges_each_layer_on_teacher_inputs(teacher, texts):
    # Only layer 1 changes; layer 0 must read 0 even though the student's own path would differ after it.
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.model.layers[1].self_attn.v_proj.weight.mul_(1.5)
    fid = attention_fidelity(student, teacher, texts["code"], FidelityConfig(context_length=128), progress=False)
    assert fid["relative_mse"][0] == 0.0
    # Scaling V by 1.5 scales the output by 1.5: relative squared error (1.5 - 1)^2 = 0.25.
    assert fid["relative_mse"][1] == pytest.approx(0.25, rel=1e-4)


def test_cache_bytes_read_from_generate(teacher, tokenizer):
    cfg = EvalConfig().efficiency.model_copy(update={"decode_tokens": 3})
    r = measure(teacher, 40, cfg, vocab_size=len(tokenizer), pad_token_id=1, seed=0)
    c = teacher.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert r["cache_tokens"] == 40 + 3
    assert r["cache_bytes"] == per_token * r["cache_tokens"]
    assert r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["peak_memory_bytes"] is not None


def test_tensor_bytes_counts_shared_tensors_once():
    t = torch.zeros(10, dtype=torch.float32)
    state = types.SimpleNamespace(layers=[{"k": t, "v": t}, (torch.zeros(3, dtype=torch.int64),)], me=None)
    state.me = state
    assert tensor_bytes(state) == 40 + 24


def test_crossover():
    assert crossover([1, 2, 4], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]) == pytest.approx(2.0)
    assert crossover([1, 2, 4], [3.0, 3.0, 1.0], [1.0, 2.0, 3.0]) == pytest.approx(2 + 1 / 3 * 2)
    # Below, then above again at the longest length (timing noise, or a real reversal): no crossover.
    assert crossover([1, 2, 4], [3.0, 1.0, 4.0], [2.0, 2.0, 3.0]) is None
    # Dipping below early does not count; the crossing that lasts does.
    assert crossover([1, 2, 4, 8], [1.0, 3.0, 2.0, 1.0], [2.0, 2.0, 2.0, 2.0]) == pytest.approx(4.0)
    assert crossover([1, 2], [0.5, 0.5], [1.0, 1.0]) is None
    assert crossover([1, 2], [2.0, 2.0], [1.0, 1.0]) is None


def test_cloze_task_labels_point_at_the_true_continuation(tokenizer, texts, tmp_path):
    cfg = LMEvalConfig(cloze_items=8, cloze_context_tokens=24, cloze_continuation_tokens=8)
    folder = write_local_tasks(texts, tokenizer, cfg, tmp_path, seed=3)
    items = [json.loads(line) for line in (folder / "reattend_cloze.jsonl").read_text().splitlines()]
    assert len(items) == 8
    full = {name: tokenizer.decode(stream.tolist()) for name, stream in texts.items()}
    for item in items:
        assert len(item["choices"]) == cfg.cloze_choices == len(set(item["choices"]))
        assert item["context"] + item["choices"][item["label"]] in full[item["source"]]
        assert all(choice[0].isspace() for choice in item["choices"])
    assert len({item["label"] for item in items}) > 1


def test_evaluate_end_to_end_writes_report(teacher, tokenizer, texts, tmp_path):
    student = perturbed(teacher)
    metrics = evaluate(student, teacher, tokenizer, small_config(), tmp_path, texts)
    for name in ("report.md", "metrics.json", "perplexity.png", "fidelity.png", "efficiency.png", "recall.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved["timing_s"]) == {"perplexity", "kl_agreement", "fidelity", "lm_eval", "recall", "efficiency", "generations"}
    lm = metrics["lm_eval"]
    for who in ("teacher", "student"):
        assert lm[who]["reattend_cloze"]["samples"] == 6 and 0.0 <= lm[who]["reattend_cloze"]["acc"] <= 1.0
        assert lm[who]["reattend_ppl"]["samples"] == 4 and lm[who]["reattend_ppl"]["byte_perplexity"] > 1.0
    # A random model over ~100 characters is close to uniform: byte perplexity near the vocabulary size.
    assert 30 < lm["teacher"]["reattend_ppl"]["byte_perplexity"] < 300
    assert metrics["kl_agreement"]["prose"]["kl"] > 0
    assert set(metrics["recall"]) == {"mqar", "passkey"}
    assert len(metrics["generations"]) == 3
    report = (tmp_path / "report.md").read_text()
    for heading in ("## Perplexity", "## Logit agreement", "## Per-layer attention fidelity",
                    "## lm-evaluation-harness", "## Long-context recall", "## Efficiency", "## Generations"):
        assert heading in report


def test_lm_eval_runs_a_user_task_from_include_path(teacher, tokenizer, texts, tmp_path):
    write_local_tasks(texts, tokenizer, LMEvalConfig(ppl_docs=2, ppl_doc_tokens=64), tmp_path / "mine", seed=0)
    yaml_file = tmp_path / "mine" / "reattend_ppl.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("task: reattend_ppl", "task: my_ppl"))
    cfg = small_config(
        perplexity={"enabled": False}, kl_agreement={"enabled": False}, fidelity={"enabled": False},
        recall={"enabled": False}, efficiency={"enabled": False}, generations={"enabled": False},
        lm_eval={"tasks": ["my_ppl"], "include_path": str(tmp_path / "mine")},
    )
    metrics = evaluate(copy.deepcopy(teacher), teacher, tokenizer, cfg, tmp_path / "out", texts)
    lm = metrics["lm_eval"]
    assert lm["tasks_dir"] is None
    assert lm["student"]["my_ppl"]["word_perplexity"] == pytest.approx(lm["teacher"]["my_ppl"]["word_perplexity"])


def test_evaluate_refuses_missing_or_short_texts_before_running(teacher, tokenizer, texts, tmp_path):
    with pytest.raises(ValueError, match="held-out texts"):
        evaluate(teacher, teacher, tokenizer, small_config(), tmp_path, {})
    with pytest.raises(ValueError, match="fidelity.context_length=4096"):
        evaluate(teacher, teacher, tokenizer, small_config(fidelity={"context_length": 4096}), tmp_path, texts)
    with pytest.raises(TypeError, match="LongTensor"):
        evaluate(teacher, teacher, tokenizer, small_config(), tmp_path, {"x": [1, 2, 3]})
    assert not (tmp_path / "metrics.json").exists()


def test_evaluate_folders_loads_both_and_builds_default_texts(teacher, tokenizer, texts, tmp_path, monkeypatch):
    loaded = []

    def load_teacher(source):
        loaded.append(source)
        return (teacher if source == "teacher-id" else perturbed(teacher)), tokenizer

    def build_splits(data_config, tok):
        assert tok is tokenizer
        return types.SimpleNamespace(heldout=texts)

    monkeypatch.setitem(sys.modules, "reattend.models.loading", types.SimpleNamespace(load_teacher=load_teacher))
    monkeypatch.setitem(sys.modules, "reattend.data", types.SimpleNamespace(DataConfig=dict, build_splits=build_splits))
    cfg = small_config(lm_eval={"enabled": False}, efficiency={"enabled": False}, recall={"enabled": False})
    metrics = evaluate_folders("student-dir", "teacher-id", cfg, tmp_path)
    assert sorted(loaded) == ["student-dir", "teacher-id"]
    assert metrics["models"] == {"student": "student-dir", "teacher": "teacher-id"}
    assert "`student-dir`" in (tmp_path / "report.md").read_text()
