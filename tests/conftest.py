"""Shared fixtures: tiny random models of every supported architecture and a small local corpus."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

# Triton reads TRITON_INTERPRET when triton.language is first imported (transformers imports it), so it is
# set here, before anything else: without a GPU the kernel tests run in the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

# Tests share two cores with nothing else; one thread per process keeps subprocess tests from oversubscribing.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CORPUS = (
    "In the beginning the engineers wrote a small tool. The tool took a model and made its attention cheaper. "
    "Linear attention keeps a running state; a sliding window keeps the last few keys exactly. "
    "Each layer learned to copy its teacher, and the student grew close to the teacher again. "
)

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


def tiny_config(arch: str):
    if arch == "llama":
        return LlamaConfig(**TINY, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**TINY)
    if arch == "qwen3":
        return Qwen3Config(**TINY, head_dim=8)
    if arch == "mistral":
        return MistralConfig(**TINY, sliding_window=None)
    if arch == "gemma3_text":
        return Gemma3TextConfig(**{**TINY, "num_hidden_layers": 3}, head_dim=8, query_pre_attn_scalar=8,
                                sliding_window=16, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3_text"]


def tiny_teacher(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random init gives near-uniform attention; sharper queries make window/linear differences visible.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model


def build_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60])
    tok.train_from_iterator([CORPUS] * 4, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a real (small) BPE tokenizer, saved as an ordinary HF folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    config = tiny_config("llama")
    config.vocab_size = max(len(tokenizer), 64)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [f"{i}. {CORPUS}" for i in range(60)]
    path.write_text("\n".join(lines))
    return path


def logits_in_pieces(model, ids, starts, cache=None):
    """Feed ``ids`` through ``model`` in pieces beginning at ``starts`` (the first piece at 0), carrying one cache.

    Returns the concatenated logits, to compare with one full forward, and the cache."""
    bounds = [0, *starts, ids.shape[1]]
    pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
        out = model(ids[:, lo:hi], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1), cache


def reload_without_reattend(tmp_path, folders, ids, expected_logits) -> list[str]:
    """Load each ``(folder, trust_remote_code)`` in a fresh interpreter where reattend cannot be imported; check its
    logits on ``ids`` and that it generates. Returns the module of each loaded model class."""
    torch.save({"ids": ids, "logits": expected_logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["reattend"] = None  # reattend must not be importable here
        import torch
        from transformers import AutoModelForCausalLM
        data = torch.load({str(tmp_path / "expected.pt")!r})
        for folder, remote in {[(str(folder), remote) for folder, remote in folders]!r}:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
            with torch.no_grad():
                torch.testing.assert_close(model(data["ids"]).logits, data["logits"], rtol=1e-5, atol=1e-5)
            out = model.generate(data["ids"][:, :8], max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert out.shape == (1, 13)
            print("RELOAD-OK", type(model).__module__)
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [line.split()[1] for line in result.stdout.splitlines() if line.startswith("RELOAD-OK")]
