"""2-D local (CLEAR) conversion of image-token transformers: tiny random DiT, PixArt, SD3, FLUX, ViT and DeiT."""

import copy
import json

import pytest
import torch

from reattend.image import (
    FAMILIES,
    convert_image_model,
    detect_family,
    local_2d_settings,
    trainable_attention_parameters,
)
from reattend.modeling import local_2d

diffusers = pytest.importorskip("diffusers")

HEADS, HEAD_DIM = 2, 8


def tiny(name: str, seed: int = 0):
    """(model, inputs) for a tiny random model of the named kind; image grids 8x8 (DiT: square only) or 8x6."""
    torch.manual_seed(seed)
    B = 2
    if name == "dit":
        model = diffusers.DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                                num_layers=2, sample_size=16, patch_size=2, norm_num_groups=4)
        inputs = dict(hidden_states=torch.randn(B, 4, 16, 16), timestep=torch.tensor([10, 500]),
                      class_labels=torch.tensor([1, 3]))
    elif name == "pixart":
        model = diffusers.PixArtTransformer2DModel(
            num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, num_layers=2,
            cross_attention_dim=HEADS * HEAD_DIM, sample_size=16, patch_size=2, caption_channels=12,
            norm_num_groups=4, use_additional_conditions=False, interpolation_scale=1)
        inputs = dict(hidden_states=torch.randn(B, 4, 16, 12), encoder_hidden_states=torch.randn(B, 5, 12),
                      timestep=torch.tensor([10, 500]))
    elif name == "sd3":
        model = diffusers.SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
            num_attention_heads=HEADS, joint_attention_dim=12, caption_projection_dim=HEADS * HEAD_DIM,
            pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16, dual_attention_layers=(0,),
            qk_norm="rms_norm")
        inputs = dict(hidden_states=torch.randn(B, 4, 16, 12), encoder_hidden_states=torch.randn(B, 5, 12),
                      pooled_projections=torch.randn(B, 10), timestep=torch.tensor([10, 500]))
    elif name == "flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=HEADS, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(4, 6, 6))
        h, w, text = 8, 6, 5
        y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        img_ids = torch.stack([torch.zeros(h * w), y.reshape(-1).float(), x.reshape(-1).float()], dim=-1)
        inputs = dict(hidden_states=torch.randn(B, h * w, 8), encoder_hidden_states=torch.randn(B, text, 12),
                      pooled_projections=torch.randn(B, 10), timestep=torch.tensor([0.2, 0.7]), img_ids=img_ids,
                      txt_ids=torch.zeros(text, 3))
    elif name in ("vit", "deit"):
        import transformers

        kind = {"vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
                "deit": (transformers.DeiTConfig, transformers.DeiTModel)}[name]
        config = kind[0](hidden_size=HEADS * HEAD_DIM, num_hidden_layers=2, num_attention_heads=HEADS,
                         intermediate_size=32, image_size=16, patch_size=2, num_channels=3, num_labels=3)
        model = kind[1](config)
        inputs = dict(pixel_values=torch.randn(B, 3, 16, 12), interpolate_pos_encoding=True)
    else:
        raise ValueError(name)
    return model.eval(), inputs


KINDS = ["dit", "pixart", "sd3", "flux", "vit", "deit"]
FAMILY_OF = {"deit": "vit"}


def output(model, inputs):
    """The sample (diffusers), or the last hidden state of the encoder (ViT/DeiT; for the classifier, its encoder
    called directly)."""
    if hasattr(model, "base_model"):
        return model.base_model(**inputs).last_hidden_state
    return model(**inputs).sample


def converted(kind, **options):
    teacher, inputs = tiny(kind)
    student = copy.deepcopy(teacher)
    names = convert_image_model(student, **options)
    return teacher, student, inputs, names


@pytest.mark.parametrize("kind", KINDS)
def test_detect_family(kind):
    model, _ = tiny(kind)
    assert detect_family(model) == FAMILY_OF.get(kind, kind) in FAMILIES


def test_detect_family_rejects_other_models():
    with pytest.raises(ValueError, match="Linear is not supported.*FluxTransformer2DModel.*ViTModel"):
        detect_family(torch.nn.Linear(2, 2))


EXPECTED_NAMES = {
    "dit": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "pixart": ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"],
    "sd3": ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"],
    "flux": ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
    "vit": ["vit.layers.0.attention", "vit.layers.1.attention"],
    "deit": ["layers.0.attention", "layers.1.attention"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_radius_covering_the_grid_reproduces_the_teacher(kind):
    # radius 10.7 > the 8x8 grid's diagonal (9.9): every pair is kept, so the student is the teacher
    teacher, student, inputs, names = converted(kind, radius=10.7)
    assert names == EXPECTED_NAMES[kind]
    assert all(n in dict(student.named_modules()) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(output(student, inputs), output(teacher, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_small_radius_and_pooling_change_the_output(kind):
    teacher, student, inputs, _ = converted(kind, radius=1.5, tile=2)
    pooled = copy.deepcopy(teacher)
    convert_image_model(pooled, radius=1.5, pool=2)
    with torch.no_grad():
        reference, local, local_pooled = (output(m, inputs) for m in (teacher, student, pooled))
    assert (local - reference).abs().max() > 1e-3
    assert (local_pooled - local).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["pixart", "sd3", "flux", "vit"])
def test_converted_model_fast_path_matches_dense_reference(kind, monkeypatch):
    # The default CPU path (tiles) against the dense-mask reference, through a whole model, forward and backward.
    _, student, inputs, _ = converted(kind, radius=2.5, pool=2, tile=2)
    params = trainable_attention_parameters(student)
    results = []
    for path in ("tiles", "dense"):
        monkeypatch.setitem(local_2d._PATH_FOR_BACKEND, "reference", path)
        out = output(student, inputs)
        grads = torch.autograd.grad(out.square().mean(), list(params.values()))
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["dit", "sd3", "flux", "vit"])
def test_teacher_state_dict_loads_into_a_converted_model(kind):
    teacher, student, inputs, _ = converted(kind, radius=2.5)
    assert set(student.state_dict()) == set(teacher.state_dict())
    student.load_state_dict(teacher.state_dict(), strict=True)
    _, pooled, _, names = converted(kind, radius=2.5, pool=2)
    missing, unexpected = pooled.load_state_dict(teacher.state_dict(), strict=False)
    new = {f"{names[0]}{'.local_2d' if kind == 'vit' else '.processor'}.pool_{kv}" for kv in ("key", "value")}
    assert new <= set(missing) and not unexpected
    assert all(k.endswith(("pool_key", "pool_value")) for k in missing)
    # the new weights start as a uniform average over each d x d block
    assert torch.equal(pooled.get_submodule(names[0]).state_dict()[sorted(new)[0].split(names[0] + ".")[1]],
                       torch.full((HEADS, 2, 2), 0.25))


def test_trainable_attention_parameters_sd3():
    teacher, student, _, names = converted("sd3", radius=2.5, pool=2, layers=[0])
    params = trainable_attention_parameters(student)
    assert names == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2"]
    named = dict(student.named_parameters())
    assert all(named[n] is p for n, p in params.items())
    expected = {f"transformer_blocks.0.attn.{m}.{w}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                               "add_k_proj", "add_v_proj", "to_add_out")
                for w in ("weight", "bias")}
    expected |= {f"transformer_blocks.0.attn2.{m}.{w}" for m in ("to_q", "to_k", "to_v", "to_out.0")
                 for w in ("weight", "bias")}
    expected |= {f"transformer_blocks.0.attn.{m}.weight" for m in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")}
    expected |= {f"transformer_blocks.0.attn2.{m}.weight" for m in ("norm_q", "norm_k")}
    expected |= {f"transformer_blocks.0.{a}.processor.pool_{kv}" for a in ("attn", "attn2") for kv in ("key", "value")}
    assert set(params) == expected
    assert trainable_attention_parameters(teacher) == {}


@pytest.mark.parametrize("kind", ["flux", "vit"])
def test_trainable_attention_parameters_flux_and_vit(kind):
    _, student, inputs, names = converted(kind, radius=2.5, pool=2)
    params = trainable_attention_parameters(student)
    if kind == "flux":
        double = {f"transformer_blocks.0.attn.{m}.{w}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                                 "add_k_proj", "add_v_proj", "to_add_out")
                  for w in ("weight", "bias")}
        single = {f"single_transformer_blocks.0.attn.{m}.{w}" for m in ("to_q", "to_k", "to_v")
                  for w in ("weight", "bias")}
        norms = {f"{b}.attn.{m}.weight" for b in ("transformer_blocks.0", "single_transformer_blocks.0")
                 for m in ("norm_q", "norm_k")} | {f"transformer_blocks.0.attn.norm_added_{c}.weight" for c in "qk"}
        pools = {f"{n}.processor.pool_{kv}" for n in names for kv in ("key", "value")}
        assert set(params) == double | single | norms | pools
    else:
        assert set(params) == {f"vit.layers.{i}.attention.{m}" for i in range(2)
                               for m in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                                         "v_proj.weight", "v_proj.bias", "o_proj.weight", "o_proj.bias",
                                         "local_2d.pool_key", "local_2d.pool_value")}
    # every trainable parameter, the pooling weights included, gets a gradient
    output(student, inputs).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_settings_are_json_and_reapply_on_a_fresh_teacher():
    teacher, student, inputs, _ = converted("flux", radius=2.5, pool=2, tile=2, layers=[1])
    assert local_2d_settings(teacher) is None
    settings = local_2d_settings(student)
    assert settings == {"family": "flux", "radius": 2.5, "pool": 2, "tile": 2, "layers": [1]}
    settings = json.loads(json.dumps(settings))
    with torch.no_grad():
        for p in trainable_attention_parameters(student).values():
            p.add_(0.01 * torch.randn_like(p))
    reloaded = copy.deepcopy(teacher)
    options = {k: v for k, v in settings.items() if k != "family"}
    convert_image_model(reloaded, **options)
    reloaded.load_state_dict(student.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(output(reloaded, inputs), output(student, inputs))
    # a deep copy records its own grid: the copy of the pre-hook writes to the copy's processors
    clone = copy.deepcopy(student)
    with torch.no_grad():
        torch.testing.assert_close(output(clone, inputs), output(student, inputs))


def test_bad_options_raise_with_field_value_and_fix():
    model, inputs = tiny("pixart")
    with pytest.raises(ValueError, match=r"radius=0: must be a positive.*radius=8"):
        convert_image_model(copy.deepcopy(model), radius=0)
    with pytest.raises(ValueError, match=r"radius=-1"):
        convert_image_model(copy.deepcopy(model), radius=-1)
    with pytest.raises(ValueError, match=r"layers=\[0, 5\]: block index 5 out of range for 2 blocks; use indices 0..1"):
        convert_image_model(copy.deepcopy(model), radius=2, layers=[0, 5])
    for layers in ("first", None, 1):
        with pytest.raises(ValueError, match=rf"layers={layers!r}: must be 'all' or a list of block indices"):
            convert_image_model(copy.deepcopy(model), radius=2, layers=layers)
    with pytest.raises(ValueError, match=r"pool=0: must be a positive integer"):
        convert_image_model(copy.deepcopy(model), radius=2, pool=0)
    once = copy.deepcopy(model)
    convert_image_model(once, radius=2, layers=[1])
    with pytest.raises(ValueError, match="already converted"):
        convert_image_model(once, radius=2)
    # the 8x6 grid is only known at forward time
    student = copy.deepcopy(model)
    convert_image_model(student, radius=2, pool=4)
    with pytest.raises(ValueError, match=r"pool=4 does not divide the 8x6 token grid"):
        output(student, inputs)


def test_only_selected_blocks_change_and_cross_attention_stays():
    teacher, student, inputs, names = converted("pixart", radius=1.5, layers=[1])
    assert names == ["transformer_blocks.1.attn1"]
    assert type(student.transformer_blocks[0].attn1.processor) is type(teacher.transformer_blocks[0].attn1.processor)
    assert type(student.transformer_blocks[1].attn2.processor) is type(teacher.transformer_blocks[1].attn2.processor)
    captured = {}
    for m in (teacher, student):
        m.transformer_blocks[0].register_forward_hook(lambda mod, a, out, m=m: captured.__setitem__(id(m), out))
    with torch.no_grad():
        final = [output(m, inputs) for m in (teacher, student)]
    torch.testing.assert_close(captured[id(student)], captured[id(teacher)])
    assert (final[0] - final[1]).abs().max() > 1e-3


def test_flux_grid_comes_from_img_ids():
    _, student, inputs, _ = converted("flux", radius=1.5)
    with torch.no_grad():
        output(student, inputs)
    assert student.transformer_blocks[0].attn.processor.grid() == (8, 6)
    shuffled = dict(inputs, img_ids=inputs["img_ids"].flip(0))
    with pytest.raises(ValueError, match="img_ids do not form one raster-ordered image grid"):
        output(student, shuffled)
