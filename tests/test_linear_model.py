"""Converted models of every supported architecture: exactness, cache-based decoding, generate()."""

import pytest
import torch
from conftest import ARCHS, logits_in_pieces, tiny_teacher

from reattend.convert import convert_model, student_attention_modules
from reattend.modeling.linear_attention import LinearAttention, teacher_attention

PLANS = {
    "pure_linear": lambda n: [{"target": "linear", "window": None, "feature_map": "hedgehog", "feature_dim": 8}] * n,
    "hybrid": lambda n: [{"target": "linear", "window": 4, "feature_map": "hedgehog", "feature_dim": 8}] * n,
    "hybrid_sinks": lambda n: [{"target": "linear", "window": 3, "sinks": 2, "feature_map": "t2r", "feature_dim": 8}] * n,
    "mixed": lambda n: [{"target": "keep"}] + [{"target": "linear", "window": 5, "sinks": 1, "feature_map": "hedgehog_fla",
                                                "feature_dim": 8, "affine": True}] * (n - 1),
}


def _randomise_feature_maps(student, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in student_attention_modules(student):
            for p in module.feature_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", ARCHS)
def test_window_covering_the_sequence_reproduces_the_teacher(arch):
    teacher = tiny_teacher(arch)
    n = teacher.config.num_hidden_layers
    student = convert_model(teacher, [{"target": "linear", "window": 64, "feature_dim": 8}] * n)
    _randomise_feature_maps(student)
    ids = torch.randint(0, 128, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("plan", list(PLANS))
def test_prefill_then_token_by_token_decode_equals_full_forward(arch, plan):
    teacher = tiny_teacher(arch)
    student = convert_model(teacher, PLANS[plan](teacher.config.num_hidden_layers))
    _randomise_feature_maps(student)
    ids = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        full = student(ids).logits
        pieces, _ = logits_in_pieces(student, ids, range(7, 19))
        torch.testing.assert_close(pieces, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full, teacher(ids).logits, atol=1e-3), "the conversion should change the model"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_uses_the_linear_cache(arch):
    teacher = tiny_teacher(arch)
    student = convert_model(teacher, PLANS["hybrid_sinks"](teacher.config.num_hidden_layers))
    ids = torch.randint(0, 128, (1, 9))
    out = student.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape == (1, 21)
    layer = out.past_key_values.layers[0]
    # window 3 keeps 2 raw keys; sinks and the linear state are separate fixed-size slots
    assert layer.keys.shape[-2] == 2
    assert layer.recurrent_states[1].shape[-2] == 2
    with torch.no_grad():
        manual = ids
        for _ in range(12):
            manual = torch.cat([manual, student(manual).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out.sequences, manual)


def test_distill_mode_passes_the_teacher_output_and_records_losses():
    teacher = tiny_teacher("llama")
    student = convert_model(teacher, PLANS["hybrid"](2))
    modules = student_attention_modules(student)
    for _, m in modules:
        m.distill = {"xent": True}
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)
    for _, m in modules:
        assert set(m.distill["losses"]) == {"mse", "xent"}
        assert m.distill["losses"]["mse"] > 0


def test_teacher_attention_honours_the_teacher_window():
    q, k, v = (torch.randn(1, 2, 10, 4) for _ in range(3))
    local = teacher_attention(q, k, v, scale=0.5, window=3)
    i, j = torch.arange(10).view(10, 1), torch.arange(10).view(1, 10)
    mask = (j <= i) & (i - j < 3)
    s = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(local, torch.softmax(s, -1) @ v)


def test_softcapped_teacher_is_refused():
    teacher = tiny_teacher("gemma3_text")
    teacher.model.layers[0].self_attn.attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match="soft-capping"):
        LinearAttention.from_teacher(teacher.model.layers[0].self_attn, teacher.config, 0)
