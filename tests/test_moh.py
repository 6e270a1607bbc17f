"""The moh target: exactness at init, top-k gating vs an independent masked reference, the straight-through
gradient, the load-balance loss, sparse vs masked-dense computation, decoding, export, options."""

import json
import math

import pytest
import torch
from conftest import ARCHS, logits_in_pieces, tiny_teacher
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from reattend.convert import convert_model, student_attention_modules
from reattend.convert.rules import Rule, resolve_plan
from reattend.export.checkpoint import export_model
from reattend.modeling.moh_attention import MohAttention


def moh_plan(n, **options):
    entry = Rule(target="moh", options=options).model_dump()["options"]
    return [{"target": "moh", **entry}] * n


def _randomise_routers(student, seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in student_attention_modules(student):
            for p in module.feature_parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))


def _capture_attention_inputs(model, ids, layer=0):
    """The kwargs a converted layer receives in a full forward (hidden states, rotary embeddings, mask)."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)
        if args:
            seen["hidden_states"] = args[0]

    handle = model.model.layers[layer].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return {k: seen[k] for k in ("hidden_states", "position_embeddings", "attention_mask")}


SEQ = 24  # longer than gemma3's test window (16), so its sliding layers are exercised


ALL_ACTIVE = [dict(shared_heads=1, top_k=3), dict(shared_heads=2, top_k=2, router="learned", gate="soft")]


@pytest.mark.parametrize("arch,options", [(arch, ALL_ACTIVE[0]) for arch in ARCHS]
                         + [(arch, ALL_ACTIVE[1]) for arch in ("llama", "gemma3_text")])
def test_all_heads_active_reproduces_the_teacher(arch, options):
    teacher = tiny_teacher(arch)
    student = convert_model(teacher, moh_plan(teacher.config.num_hidden_layers, **options))
    ids = torch.randint(0, 128, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)


def _reference_layer(module, hidden_states, position_embeddings, top_k, window):
    """Masked dense MoH written independently: every head by explicit softmax, top-k of ||q|| kept, gates 1."""
    B, T, _ = hidden_states.shape
    H, d, shared = module.num_heads, module.head_dim, module.shared
    q_raw = module.q_proj(hidden_states).view(B, T, H, d)
    k = module.k_proj(hidden_states).view(B, T, -1, d)
    v = module.v_proj(hidden_states).view(B, T, -1, d).transpose(1, 2)
    q = q_raw
    if module.q_norm is not None:
        q, k = module.q_norm(q), module.k_norm(k)
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)
    groups = H // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    i, j = torch.arange(T).view(T, 1), torch.arange(T).view(1, T)
    allowed = (j <= i) if window is None else (j <= i) & (i - j < window)
    scores = (q @ k.transpose(-1, -2) * module.scaling).masked_fill(~allowed, float("-inf"))
    heads = (torch.softmax(scores, -1) @ v).transpose(1, 2)  # (B, T, H, d)
    norms = q_raw[:, :, shared:].norm(dim=-1)
    keep = torch.zeros(B, T, H, dtype=torch.bool)
    keep[:, :, :shared] = True
    keep[:, :, shared:] = torch.zeros_like(norms, dtype=torch.bool).scatter(-1, norms.topk(top_k, -1).indices, True)
    return module.o_proj((heads * keep[..., None]).reshape(B, T, H * d))


@pytest.mark.parametrize("arch,shared,top_k", [(arch, 1, 1) for arch in ARCHS] + [("llama", 0, 2), ("qwen2", 2, 1)])
def test_top_k_gating_equals_a_masked_dense_reference(arch, shared, top_k):
    teacher = tiny_teacher(arch)
    n = teacher.config.num_hidden_layers
    student = convert_model(teacher, moh_plan(n, shared_heads=shared, top_k=top_k))
    ids = torch.randint(0, 128, (2, SEQ))
    for layer in range(n):
        inputs = _capture_attention_inputs(student, ids, layer)
        module = student.model.layers[layer].self_attn
        with torch.no_grad():
            out, _ = module(**inputs)
            ref = _reference_layer(module, inputs["hidden_states"], inputs["position_embeddings"], top_k, module.window)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(student(ids).logits, teacher(ids).logits, atol=1e-3), "k < routed must change the model"


def _module_and_inputs(arch, seed=0, **options):
    teacher = tiny_teacher(arch, seed=seed)
    student = convert_model(teacher, moh_plan(teacher.config.num_hidden_layers, **options))
    _randomise_routers(student)
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    inputs = _capture_attention_inputs(student, ids, layer=teacher.config.num_hidden_layers - 1)
    return student.model.layers[-1].self_attn, inputs


def _output_and_grads(module, inputs, path):
    module.zero_grad(set_to_none=True)
    module.path = path
    hidden = inputs["hidden_states"].clone().requires_grad_(True)
    out, _ = module(**{**inputs, "hidden_states": hidden})
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return out.detach(), hidden.grad.clone(), grads


SPARSE_OPTIONS = [dict(shared_heads=1, top_k=2), dict(shared_heads=2, top_k=1, router="learned"),
                  dict(shared_heads=1, top_k=1, router="learned", gate="soft")]


@pytest.mark.parametrize("arch,options", [("llama", options) for options in SPARSE_OPTIONS]
                         + [("gemma3_text", SPARSE_OPTIONS[0]), ("qwen3", SPARSE_OPTIONS[2])])
def test_sparse_path_equals_masked_dense_outputs_and_gradients(arch, options):
    module, inputs = _module_and_inputs(arch, **options)
    module.train()
    sparse = _output_and_grads(module, inputs, "sparse")
    dense = _output_and_grads(module, inputs, "dense")
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse[1], dense[1], rtol=1e-4, atol=1e-5)
    assert sparse[2].keys() == dense[2].keys() and "q_proj.weight" in sparse[2]
    for name in sparse[2]:
        torch.testing.assert_close(sparse[2][name], dense[2][name], rtol=1e-4, atol=1e-5, msg=name)


def test_sparse_output_projection_through_a_lora_wrapper_matches():
    from peft import LoraConfig, get_peft_model

    teacher = tiny_teacher("llama")
    student = convert_model(teacher, moh_plan(2, shared_heads=1, top_k=2))
    peft_model = get_peft_model(student, LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    ids = torch.randint(0, 128, (1, SEQ))
    module = peft_model.base_model.model.model.layers[0].self_attn
    inputs = _capture_attention_inputs(peft_model.base_model.model, ids)
    with torch.no_grad():
        module.path = "sparse"
        sparse, _ = module(**inputs)
        module.path = "dense"
        dense, _ = module(**inputs)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_hard_gates_are_one_but_pass_gradients_to_the_router():
    module, inputs = _module_and_inputs("llama", shared_heads=2, top_k=1, router="learned")
    gates, selected = module.route(inputs["hidden_states"], module.q_proj(inputs["hidden_states"]).view(2, SEQ, 4, -1))
    active = torch.cat([torch.ones(2, SEQ, 2, dtype=torch.bool), selected], dim=-1)
    assert torch.equal(gates.detach(), active.float()), "hard gates are exactly 0/1 in the forward pass"
    module.train()
    _, _, grads = _output_and_grads(module, inputs, "sparse")
    for name in ("routed_router.weight", "shared_router.weight", "group_router.weight"):
        assert grads[name].abs().sum() > 0, name


def test_qnorm_router_passes_the_straight_through_gradient_to_the_queries():
    module, inputs = _module_and_inputs("llama", shared_heads=1, top_k=2)
    q_raw = module.q_proj(inputs["hidden_states"]).view(2, SEQ, 4, -1).detach().requires_grad_(True)
    gates, _ = module.route(inputs["hidden_states"], q_raw)
    (gates * torch.randn(gates.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert q_raw.grad[:, :, 1:].abs().sum() > 0, "routed heads' queries get the router's gradient"
    assert q_raw.grad[:, :, 0].abs().sum() == 0, "the shared head is not routed"


def test_load_balance_loss_matches_a_hand_computed_value():
    module, inputs = _module_and_inputs("llama", shared_heads=2, top_k=1)
    # Routed head norms per token: [3, 1] -> head 0, [1, 2] -> head 1, [5, 1] -> head 0. Standardised scores are
    # [1, -1], [-1, 1], [1, -1], so the routing probabilities are [p, 1-p], [1-p, p], [p, 1-p] with p = sigmoid(2).
    q_raw = torch.zeros(1, 3, 4, module.head_dim)
    for t, (a, b) in enumerate([(3.0, 1.0), (1.0, 2.0), (5.0, 1.0)]):
        q_raw[0, t, 2, 0], q_raw[0, t, 3, 0] = a, b
    module.route(inputs["hidden_states"][:1, :3], q_raw)
    p = 1 / (1 + math.exp(-2))
    f = [2 / 3, 1 / 3]
    P = [(2 * p + (1 - p)) / 3, (2 * (1 - p) + p) / 3]
    expected = f[0] * P[0] + f[1] * P[1]  # = 0.5423...
    assert module.balance_loss.item() == pytest.approx(expected, rel=1e-5)
    assert module.auxiliary_loss().item() == pytest.approx(0.01 * expected, rel=1e-5)
    assert module.head_usage.tolist() == pytest.approx(f)


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_then_decode_equals_full_forward(arch):
    teacher = tiny_teacher(arch)
    student = convert_model(teacher, moh_plan(teacher.config.num_hidden_layers, shared_heads=1, top_k=1,
                                              router="learned", gate="soft"))
    _randomise_routers(student)
    ids = torch.randint(0, 128, (2, SEQ))
    with torch.no_grad():
        full = student(ids).logits
        # short prefill (masked-dense path), a 16-token chunk on the sparse path with cache offsets, then decode steps
        pieces, _ = logits_in_pieces(student, ids, [4, *range(20, SEQ)])
    torch.testing.assert_close(pieces, full, rtol=1e-5, atol=1e-5)


def test_generate_is_deterministic_and_matches_greedy_forward():
    teacher = tiny_teacher("qwen2")
    student = convert_model(teacher, moh_plan(2, shared_heads=2, top_k=1))
    ids = torch.randint(0, 128, (1, 9))
    first = student.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    second = student.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(first, second) and first.shape == (1, 15)
    with torch.no_grad():
        manual = ids
        for _ in range(6):
            manual = torch.cat([manual, student(manual).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(first, manual)


def test_export_reloads_with_equal_logits(tmp_path):
    teacher = tiny_teacher("qwen3")
    plan = [{"target": "keep"}] + moh_plan(1, shared_heads=1, top_k=2, router="learned", gate="soft")
    student = convert_model(teacher, plan)
    _randomise_routers(student)
    out = export_model(student, None, tmp_path / "model")
    assert json.loads((out / "config.json").read_text())["attention_plan"] == plan
    assert {"moh_attention.py", "moh_ops.py"} <= {p.name for p in out.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(reloaded.model.layers[1].self_attn, MohAttention)
    ids = torch.randint(0, 128, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits)


@pytest.mark.parametrize("options,message", [
    (dict(shared_heads=5), "options.shared_heads=5 exceeds the layer's 4 heads"),
    (dict(shared_heads=2, top_k=3), "options.top_k=3 exceeds the 2 routed heads"),
    (dict(shared_heads=2, top_k=0), "options.top_k=0 with 2 routed heads"),
])
def test_options_that_do_not_fit_the_layer_are_refused(options, message):
    teacher = tiny_teacher("llama")
    with pytest.raises(ValueError, match=message):
        convert_model(teacher, resolve_plan([Rule(target="moh", options=options)], 2))


def test_soft_gates_need_the_learned_router():
    with pytest.raises(ValueError, match="gate='soft' needs router='learned'"):
        Rule(target="moh", options={"gate": "soft"})
    with pytest.raises(ValueError, match="unknown key"):
        Rule(target="moh", options={"topk": 2})


def test_defaults_use_half_the_heads_as_shared_and_half_the_rest_routed():
    student = convert_model(tiny_teacher("llama"), moh_plan(2))
    module = student.model.layers[0].self_attn
    assert (module.shared, module.routed, module.top_k) == (2, 2, 1)


def test_pipeline_warms_up_the_router_and_recovers_with_the_balance_loss(tmp_path, tiny_model_dir, corpus_file):
    import yaml

    from reattend.recipe import load_recipe
    from reattend.runner import Run

    recipe = {
        "model": str(tiny_model_dir), "seed": 0, "output_dir": str(tmp_path / "out"),
        "data": {"source": {"kind": "text", "path": str(corpus_file)}, "block_size": 32, "heldout_fraction": 0.2,
                 "extra_eval": []},
        "convert": {"rules": [{"layers": "all", "target": "moh",
                               "options": {"shared_heads": 1, "top_k": 2, "router": "learned", "balance_weight": 0.5}}]},
        "stage_eval": {"blocks": 2},
        "transfer": {"tokens": 32 * 2 * 4, "batch_size": 2, "lr": 0.05, "log_every": 1, "checkpoint_every": 0},
        "recover": {"tokens": 32 * 2 * 3, "batch_size": 2, "lr": 0.001, "train_feature_maps": True, "log_every": 1,
                    "checkpoint_every": 0},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = Run(load_recipe(tmp_path / "recipe.yaml"))
    run.run(stages=("convert", "transfer", "recover"))
    transfer = [json.loads(x) for x in (tmp_path / "out" / "transfer" / "metrics.jsonl").read_text().splitlines()]
    assert len(transfer) == 4 and all(r["mse/layer0"] > 0 for r in transfer)
    recover = [json.loads(x) for x in (tmp_path / "out" / "recover" / "metrics.jsonl").read_text().splitlines()]
    assert len(recover) == 3
    for record in recover:
        usage = record["head_usage/layer1"]
        assert len(usage) == 3 and sum(usage) == pytest.approx(2.0, abs=1e-3), "each token uses top_k=2 of the 3 routed heads"
        assert record["aux/layer0"] > 0
    assert (tmp_path / "out" / "recover" / "head_usage.png").stat().st_size > 0
    assert not (tmp_path / "out" / "transfer" / "head_usage.png").exists()
    # the warmed-up router is what later stages rebuild
    before = convert_model(run.teacher, run.plan).model.layers[0].self_attn.routed_router.weight
    after = run.student("recover").model.layers[0].self_attn.routed_router.weight
    assert not torch.equal(before, after)


def test_head_usage_plot_averages_the_logged_records(tmp_path):
    from reattend.distill.head_usage_plot import mean_head_usage, write_head_usage_plot

    assert write_head_usage_plot(tmp_path) is None, "no metrics.jsonl: nothing to plot"
    records = [{"step": 1, "loss": 2.0},
               {"step": 2, "head_usage/layer3": [0.5, 0.5, 1.0], "head_usage/layer1": [1.0, 0.0]},
               {"step": 3, "head_usage/layer3": [0.25, 0.75, 1.0], "head_usage/layer1": [0.0, 1.0]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert mean_head_usage(tmp_path / "metrics.jsonl") == {1: [0.5, 0.5], 3: [0.375, 0.625, 1.0]}
    path = write_head_usage_plot(tmp_path)
    assert path == tmp_path / "head_usage.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_transfer_with_the_parameter_free_router_says_to_skip_it(tmp_path, tiny_model_dir, corpus_file):
    from reattend.recipe import recipe_from_dict
    from reattend.runner import Run

    run = Run(recipe_from_dict({
        "model": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
        "data": {"source": {"kind": "text", "path": str(corpus_file)}, "block_size": 32, "extra_eval": []},
        "convert": {"rules": [{"target": "moh", "options": {"shared_heads": 1, "top_k": 2, "router": "qnorm"}}]},
        "stage_eval": {"blocks": 1}, "transfer": {"tokens": 64}}))
    with pytest.raises(ValueError, match=r"\(moh\) have nothing for attention transfer to train.*transfer.enabled: false"):
        run.transfer()
