"""The mla target (TransMLA): exact rewrite, RoRoPE, BKV-PCA, latent-cache decoding, generate(), rank errors."""

import pytest
import torch
from conftest import ARCHS, logits_in_pieces, tiny_teacher

from reattend.convert import changed_tensors, convert_model, student_attention_modules
from reattend.convert.mla import MlaOptions, freqfold_candidates
from reattend.convert.rules import Rule
from reattend.convert.transmla import LayerGeometry, collect_moments, load_factors, untruncated
from reattend.models.adapters import layer_shapes
from reattend.modeling.mla_attention import LATENT_NORM_EPS, MlaAttention

CALIBRATION = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))


def _plan(teacher, **options):
    return [{"target": "mla", **options}] * teacher.config.num_hidden_layers


def _width(teacher):
    shape = layer_shapes(teacher.config)[0]
    return shape.num_kv_heads * shape.head_dim, shape.head_dim


def _untruncated_students(teacher):
    """Students whose every key channel keeps RoPE: step 1 alone, then with the RoRoPE rotation."""
    L, _ = _width(teacher)
    student = convert_model(teacher, _plan(teacher, kv_lora_rank=L, qk_rope_head_dim=L), initialise=False)
    layers = list(range(teacher.config.num_hidden_layers))
    moments = collect_moments(teacher, layers, CALIBRATION, progress=False)
    shape = layer_shapes(teacher.config)[0]
    geo = LayerGeometry(shape.num_heads, shape.num_kv_heads, shape.head_dim)
    for pca in (False, True):
        for i in layers:
            factors, freqs = untruncated(moments[i]["kv"], geo, pca=pca)
            load_factors(student.model.layers[i].self_attn, teacher.model.layers[i].self_attn, factors, freqs,
                         identity_norm=False)
        yield pca, student


@pytest.mark.parametrize("arch", ARCHS)
def test_untruncated_rewrites_reproduce_the_teacher_exactly(arch):
    teacher = tiny_teacher(arch).double()
    ids = torch.randint(0, 128, (2, 21))
    with torch.no_grad():
        expected = teacher(ids).logits
        for pca, student in _untruncated_students(teacher):
            torch.testing.assert_close(student(ids).logits, expected, rtol=0, atol=1e-10)
            # with the rotation, rope queries mix heads (else the second case would repeat step 1)
            mixed = (student.model.layers[0].self_attn.q_rope_map[0].abs() > 1e-6).sum().item()
            assert (mixed > _width(teacher)[1]) == pca


def _exact_k_norms(model, arch):
    """The k_norm in float64 without epsilon: float32 statistics and the epsilon would blur the collinearity."""
    gain = (lambda n: 1.0 + n.weight) if arch == "gemma3_text" else (lambda n: n.weight)
    for layer in model.model.layers:
        k_norm = getattr(layer.self_attn, "k_norm", None)
        if k_norm is not None:
            k_norm.forward = lambda x, n=k_norm: x * x.pow(2).mean(-1, keepdim=True).clamp_min(1e-300).rsqrt() * gain(n)
    return model


def _collinear_keys(teacher):
    """Make every KV head's key a signed multiple of head 0's, so one channel per frequency holds all the energy."""
    _, d = _width(teacher)
    with torch.no_grad():
        for layer in teacher.model.layers:
            w = layer.self_attn.k_proj.weight
            for h in range(1, w.shape[0] // d):
                w[h * d:(h + 1) * d] = (-0.5) ** h * w[:d]
            if layer.self_attn.k_proj.bias is not None:
                b = layer.self_attn.k_proj.bias
                for h in range(1, b.shape[0] // d):
                    b[h * d:(h + 1) * d] = (-0.5) ** h * b[:d]
    return teacher


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_conversion_is_near_exact(arch):
    teacher = _exact_k_norms(_collinear_keys(tiny_teacher(arch).double()), arch)
    L, d = _width(teacher)
    student = convert_model(teacher, _plan(teacher, kv_lora_rank=2 * L - d, qk_rope_head_dim=d, freqfold=1),
                            calibration=CALIBRATION)
    _exact_k_norms(student, arch)
    ids = torch.randint(0, 128, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=0, atol=1e-8)
    assert "model.layers.0.self_attn.kv_b_proj.weight" in student.state_dict()


def _truncated(arch, **extra):
    teacher = tiny_teacher(arch)
    L, d = _width(teacher)
    options = {"kv_lora_rank": L // 2, "qk_rope_head_dim": d // 2, "freqfold": 2, **extra}
    return teacher, convert_model(teacher, _plan(teacher, **options), calibration=CALIBRATION)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_then_decode_equals_full_forward(arch):
    # Qwen2 and Gemma 3 also take the low-rank query path (q_a -> RMSNorm -> q_b; with a bias on Qwen2)
    teacher, student = _truncated(arch, latent_norm=True, q_lora_rank=12 if arch in ("qwen2", "gemma3_text") else None)
    ids = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        full = student(ids).logits
        pieces, _ = logits_in_pieces(student, ids, range(7, 18))  # single tokens, then a 2-token chunk
        torch.testing.assert_close(pieces, full, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(full, teacher(ids).logits, atol=1e-3), "rank r < 2L - d_rope must change the model"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_identity_mode_latent_norm_leaves_the_conversion_unchanged(arch):
    # Qwen3 also takes the low-rank query path, whose q_a_layernorm follows the same mode.
    teacher, with_norm = _truncated(arch, latent_norm=True, q_lora_rank=12 if arch == "qwen3" else None)
    assert with_norm.config.rms_norm_eps == LATENT_NORM_EPS
    plain = {**with_norm.config.attention_plan[0], "latent_norm": False}
    without_norm = convert_model(teacher, _plan(teacher, **plain), calibration=CALIBRATION)
    modules = [m for _, m in student_attention_modules(with_norm)]
    assert not any(m.phased_in_by_recovery for m in modules)
    norms = [norm for m in modules for norm in m.latent_norms()]
    assert len(norms) == len(modules) * (2 if arch == "qwen3" else 1)
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        for norm in norms:  # the scaled latent sits far below the epsilon (a real norm, in its linear range)
            assert float(norm.input_scale) < 1e-3
        torch.testing.assert_close(with_norm(ids).logits, without_norm(ids).logits, rtol=1e-4, atol=1e-4)
        for norm in norms:  # ...while a plain input scale shows the same module normalising
            norm.input_scale.fill_(1.0)
        assert not torch.allclose(with_norm(ids).logits, without_norm(ids).logits, atol=1e-2)


def test_latent_norm_warmup_blends_the_norm_in_from_the_identity():
    teacher, with_norm = _truncated("llama", latent_norm=True, latent_norm_mode="rms", latent_norm_warmup=0.5)
    without_norm = convert_model(teacher, _plan(teacher, **{**with_norm.config.attention_plan[0], "latent_norm": False}),
                                 calibration=CALIBRATION)
    modules = [m for _, m in student_attention_modules(with_norm)]
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        normed = with_norm(ids).logits  # a converted or loaded layer is the plain norm
        for m in modules:
            m.set_training_progress(0.0)
        torch.testing.assert_close(with_norm(ids).logits, without_norm(ids).logits, rtol=1e-5, atol=1e-5)
        for m in modules:
            m.set_training_progress(0.25)
        assert {norm.blend for m in modules for norm in m.latent_norms()} == {0.5}
        for m in modules:
            m.set_training_progress(0.5)
        torch.testing.assert_close(with_norm(ids).logits, normed)


def test_absorbed_attention_equals_decompressed():
    teacher, student = _truncated("qwen2")
    attn = student.model.layers[1].self_attn
    x = torch.randn(2, 9, teacher.config.hidden_size)
    position_ids = torch.arange(9).expand(2, 9)
    rope = student.model.rotary_emb(x, position_ids)
    with torch.no_grad():
        q_nope, q_rope = attn.queries(x)
        c, k_rope = attn.latent(x)
        q_rope, k_rope = attn._rope(rope, q_rope, k_rope)
        mask = torch.ones(9, 9, dtype=torch.bool).tril()
        dense = attn.decompressed(q_nope, q_rope, c, k_rope, mask)
        torch.testing.assert_close(attn.absorbed(q_nope, q_rope, c, k_rope, mask), dense, rtol=1e-5, atol=1e-5)
    assert attn.absorbed_is_cheaper(1, 512) and not attn.absorbed_is_cheaper(512, 512)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_generate_caches_only_the_latent_and_rope_key(arch):
    teacher, student = _truncated(arch)
    ids = torch.randint(0, 128, (1, 9))
    out = student.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    L, d = _width(teacher)
    for layer in out.past_key_values.layers:
        tokens = layer.keys.shape[-2]
        per_token = (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size() // tokens
        assert per_token == (L // 2 + d // 2) * 4
    with torch.no_grad():
        manual = ids
        for _ in range(8):
            manual = torch.cat([manual, student(manual).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out.sequences, manual)


def test_rebuilding_from_saved_tensors_skips_calibration():
    teacher, student = _truncated("llama", freqfold="search")
    saved = changed_tensors(student, teacher)
    assert not any(".k_proj." in k or ".v_proj." in k for k in saved)
    rebuilt = convert_model(teacher, student.config.attention_plan, initialise=False)
    rebuilt.load_state_dict(saved, strict=False)
    ids = torch.randint(0, 128, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, student(ids).logits, rtol=0, atol=0)
    assert all(isinstance(m, MlaAttention) for _, m in student_attention_modules(rebuilt))


def test_conversion_needs_calibration():
    teacher = tiny_teacher("llama")
    with pytest.raises(ValueError, match="calibration"):
        convert_model(teacher, _plan(teacher, kv_lora_rank=8, qk_rope_head_dim=4, freqfold=2))


def test_ranks_that_do_not_fit_are_clear_errors():
    shape = layer_shapes(tiny_teacher("llama").config)[0]  # 2 KV heads of 8: L = 16
    with pytest.raises(ValueError, match=r"kv_lora_rank=29 exceeds .* = 28"):
        MlaOptions(kv_lora_rank=29, qk_rope_head_dim=4).check_layer(shape, 0)
    with pytest.raises(ValueError, match="qk_rope_head_dim=16 is larger than the teacher's head_dim=8"):
        MlaOptions(kv_lora_rank=8, qk_rope_head_dim=16).check_layer(shape, 0)
    with pytest.raises(ValueError, match=r"freqfold=1 does not fit .* choose one of \[2, 4\]"):
        MlaOptions(kv_lora_rank=8, qk_rope_head_dim=4, freqfold=1).check_layer(shape, 0)
    with pytest.raises(ValueError, match="qk_rope_head_dim=5: must be even"):
        Rule(target="mla", options={"kv_lora_rank": 8, "qk_rope_head_dim": 5})
    assert freqfold_candidates(64, 32) == [2, 4, 8, 16, 32]
    assert MlaOptions(kv_lora_rank=8, qk_rope_head_dim=4).state_bytes(shape, 2) == (0, 24)


@pytest.mark.parametrize("mode", ["identity", "rms"])
def test_mla_recipe_plans_converts_recovers_and_exports_natively(tmp_path, tiny_model_dir, corpus_file, capsys, mode):
    from test_pipeline import write_recipe
    from transformers import AutoModelForCausalLM

    from reattend.cli import main
    from reattend.recipe import load_recipe
    from reattend.runner import Run

    options = {"kv_lora_rank": 12, "qk_rope_head_dim": 4, "latent_norm": True, "latent_norm_mode": mode,
               "calibration_sequences": 8, "calibration_length": 16}
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, corpus_file, tmp_path / "out",
                               convert={"rules": [{"layers": "all", "target": "mla", "options": options}]},
                               transfer={"enabled": False}, recover={"method": "attention", "tokens": 32 * 2 * 3},
                               export={"native": True})
    assert main(["plan", str(recipe_path)]) == 0
    # tiny Llama: 2 KV heads x head_dim 8 in float32 -> 2*2*8*4 = 128 bytes/token; MLA keeps (12 + 4) * 4 = 64.
    # Nothing is trainable by transfer (the column reads 0): MLA has no transfer stage.
    table = capsys.readouterr().out
    assert "| 0 | +" in table and "| 128 | 64 | 0 |" in table
    assert main(["validate", str(recipe_path), "transfer.enabled=true"]) == 2
    assert "convert.rules.0 uses target 'mla', which has no attention-transfer stage" in capsys.readouterr().err
    assert main(["validate", str(recipe_path), "convert.rules.0.options.kv_lora_rank=40"]) == 2
    assert "kv_lora_rank=40 exceeds 2*H_kv*head_dim - qk_rope_head_dim = 2*2*8 - 4 = 28" in capsys.readouterr().err
    run = Run(load_recipe(recipe_path))
    run.run(stages=("convert", "transfer", "recover", "export"))
    recovered = run.student("recover")  # rebuilt from saved tensors, no calibration
    assert run.summary()["recover"]["tokens"] == 192
    # an identity-mode latent norm is exact at conversion, so recovery starts from "perplexity"; an rms-mode one is
    # phased in during recovery, so conversion also reports the model recovery starts from
    converted = run.summary()["convert"]
    if mode == "identity":
        assert "perplexity_at_recovery_start" not in converted
    else:
        assert set(converted["perplexity_at_recovery_start"]) == set(converted["perplexity"])
    native = AutoModelForCausalLM.from_pretrained(run.summary()["export"]["native_dir"]).eval()
    assert native.config.model_type == "deepseek_v3"
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(native(ids).logits, recovered(ids).logits, rtol=1e-4, atol=1e-4)
        converted = run.student("convert")
        assert not torch.allclose(converted(ids).logits, recovered(ids).logits), "recovery should train attention"
