"""The ``local`` target: sliding-window + sink attention, its mask, prefill/decode cache and transfer protocol."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, logits_in_pieces, tiny_teacher
from transformers import DynamicCache

from reattend.convert import convert_model
from reattend.convert.rules import Rule
from reattend.modeling.local_attention import (
    LocalAttention,
    SinkSlidingWindowLayer,
    local_attention,
    local_mask,
)


def brute_force_mask(T: int, window: int, sinks: int) -> torch.Tensor:
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            mask[i, j] = j <= i and (i - j < window or j < sinks)
    return mask


def plan(n_layers: int, **options) -> list[dict]:
    return [{"target": "local", **options}] * n_layers


@pytest.mark.parametrize("window,sinks", [(1, 0), (3, 0), (5, 2), (40, 3)])
def test_mask_matches_brute_force(window, sinks):
    pos = torch.arange(37)
    assert torch.equal(local_mask(pos, pos, window, sinks), brute_force_mask(37, window, sinks))


@pytest.mark.parametrize("T,window,sinks", [(150, 7, 0), (150, 7, 3), (130, 64, 4), (200, 100, 1), (65, 2, 70)])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_prefill_equals_dense_masked_attention(T, window, sinks, backend):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, 2, T, 8), torch.randn(2, 2, T, 8)
    mask = brute_force_mask(T, window, sinks)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=mask, scale=0.3)
    got = local_attention(q, k, v, window=window, sinks=sinks, scale=0.3, backend=backend)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prefill_gradients_match_dense():
    torch.manual_seed(0)
    T, window, sinks = 90, 9, 2
    leaves = [torch.randn(1, 2, T, 8, requires_grad=True) for _ in range(3)]
    local_attention(*leaves, window=window, sinks=sinks, scale=0.5, backend="sdpa").pow(2).sum().backward()
    got = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    F.scaled_dot_product_attention(*leaves, attn_mask=brute_force_mask(T, window, sinks), scale=0.5).pow(2).sum().backward()
    for g, x in zip(got, leaves):
        torch.testing.assert_close(g, x.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_window_covering_the_sequence_equals_teacher(arch):
    teacher = tiny_teacher(arch)
    student = convert_model(teacher, plan(teacher.config.num_hidden_layers, window=24, sinks=2))
    ids = torch.randint(0, 128, (2, 12))  # shorter than every window, the Gemma 3 teacher's own (16) included
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, atol=1e-6, rtol=1e-5)


def test_small_window_changes_the_output():
    teacher = tiny_teacher("llama")
    student = convert_model(teacher, plan(2, window=3, sinks=0))
    ids = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        diff = (student(ids).logits - teacher(ids).logits).abs()
    assert diff[:, :3].max() < 1e-5 and diff[:, 3:].max() > 1e-3


@pytest.mark.parametrize("arch,window,sinks", [("llama", 5, 0), ("qwen3", 4, 3), ("gemma3_text", 6, 2)])
def test_prefill_plus_decode_equals_full_forward(arch, window, sinks):
    teacher = tiny_teacher(arch)
    n = teacher.config.num_hidden_layers
    student = convert_model(teacher, [{"target": "keep"}] + plan(n - 1, window=window, sinks=sinks))
    ids = torch.randint(0, 128, (2, 23))
    with torch.no_grad():
        full = student(ids).logits
        # prefill, several tokens at once, then single tokens
        steps, cache = logits_in_pieces(student, ids, [9, *range(12, ids.shape[1])], DynamicCache(config=student.config))
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)
    for idx in range(1, n):
        layer = cache.layers[idx]
        assert isinstance(layer, SinkSlidingWindowLayer)
        assert layer.keys.shape[-2] == window - 1 and layer.get_seq_length() == ids.shape[1]
        assert (layer.sink_keys.shape[-2] if sinks else 0) == sinks
    assert not isinstance(cache.layers[0], SinkSlidingWindowLayer)  # the kept layer keeps the teacher's cache


def test_generate_matches_greedy_full_forward():
    teacher = tiny_teacher("qwen2")
    student = convert_model(teacher, plan(2, window=4, sinks=1))
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        out = student.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        seq = ids
        for _ in range(10):
            seq = torch.cat([seq, student(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_transfer_trains_projections_against_a_frozen_teacher():
    teacher = tiny_teacher("llama")
    student = convert_model(teacher, plan(2, window=3, sinks=1))
    module = student.model.layers[1].self_attn
    assert isinstance(module, LocalAttention)
    assert {id(p) for p in module.feature_parameters()} == {
        id(p) for proj in (module.q_proj, module.k_proj, module.v_proj) for p in proj.parameters()}
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        reference = teacher(ids).logits
    for layer in student.model.layers:
        layer.self_attn.distill = {}
    for p in module.feature_parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        module.q_proj.weight.mul_(0.5)  # as if training had moved it: the passed-on output must stay the teacher's
    logits = student(ids).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    loss = module.distill["losses"]["mse"]
    assert loss > 0
    loss.backward()
    assert module.q_proj.weight.grad.abs().sum() > 0 and module.v_proj.weight.grad.abs().sum() > 0


def test_options_validation_and_state_bytes():
    rule = Rule(target="local", options={"window": 64, "sinks": 4})
    assert rule.options == {"window": 64, "sinks": 4}
    with pytest.raises(ValueError, match="options.window"):
        Rule(target="local", options={"window": 0})
    with pytest.raises(ValueError, match="unknown key"):
        Rule(target="local", options={"feature_map": "hedgehog"})
    from reattend.convert.local import LocalOptions
    from reattend.models.adapters import LayerShape

    fixed, per_token = LocalOptions(window=64, sinks=4).state_bytes(LayerShape(9, 3, 64, 576, None), 2)
    assert (fixed, per_token) == (67 * 2 * 3 * 64 * 2, 0)


def test_window_is_capped_by_a_sliding_teacher_layer():
    teacher = tiny_teacher("gemma3_text")  # layers 0, 1 slide with window 16; layer 2 is global
    student = convert_model(teacher, plan(3, window=100, sinks=0))
    assert [layer.self_attn.window for layer in student.model.layers] == [16, 16, 100]


def test_transfer_steps_reduce_the_layer_error():
    """A few optimiser steps on the distill loss bring the windowed layers' outputs closer to the teacher's."""
    teacher = tiny_teacher("llama")
    student = convert_model(teacher, plan(2, window=4, sinks=0))
    modules = [layer.self_attn for layer in student.model.layers]
    for p in student.parameters():
        p.requires_grad_(False)
    params = [p for m in modules for p in m.feature_parameters()]
    for p in params:
        p.requires_grad_(True)
    for m in modules:
        m.distill = {}
    optimizer = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    batch = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        student(input_ids=batch, use_cache=False)
        loss = sum(m.distill.pop("losses")["mse"] for m in modules)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.5 * losses[0], losses
