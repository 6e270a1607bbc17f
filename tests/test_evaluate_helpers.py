"""Offline tiny models and a character-level tokenizer for the evaluation tests."""

from __future__ import annotations

import copy
import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PROSE = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
)
CODE = "def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog 1234 times.\n"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of printable ASCII, plus <unk> and <eos>; decoding concatenates."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=4096, eos_token_id=1, pad_token_id=1, bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def perturbed(model, scale: float = 0.05, seed: int = 1):
    """A copy of ``model`` with noise on the attention projections of every layer."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in other.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj):
                proj.weight.add_(scale * torch.randn(proj.weight.shape, generator=generator))
    return other


def heldout_texts(tokenizer, tokens: int = 1500) -> dict[str, torch.Tensor]:
    def stream(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer.encode(text * (tokens // len(text) + 1), add_special_tokens=False)[:tokens])

    return {"prose": stream(PROSE), "code": stream(CODE)}
