"""Native export of an all-MLA student as stock deepseek_v3, and its refusals."""

import pytest
import torch
from conftest import tiny_teacher
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

from reattend.convert import convert_model
from reattend.export.native_deepseek import export_native_deepseek, native_config

CALIBRATION = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(0))


def _student(arch, **options):
    teacher = tiny_teacher(arch)
    plan = [{"target": "mla", "kv_lora_rank": 10, "qk_rope_head_dim": 4, "freqfold": 2, "latent_norm": True,
             **options}] * teacher.config.num_hidden_layers
    student = convert_model(teacher, plan, calibration=CALIBRATION)
    with torch.no_grad():  # a trained latent norm is not uniform; make sure the export carries it per channel
        for layer in student.model.layers if student.model.layers[0].self_attn.kv_a_layernorm else []:
            layer.self_attn.kv_a_layernorm.weight.mul_(torch.linspace(0.5, 1.5, 10))
    return student


@pytest.mark.parametrize("arch,q_lora_rank,mode", [("llama", None, "identity"), ("mistral", 12, "identity"),
                                                   ("llama", 12, "rms")])
def test_native_deepseek_v3_export_reloads_in_stock_transformers(tmp_path, arch, q_lora_rank, mode):
    student = _student(arch, q_lora_rank=q_lora_rank, latent_norm_mode=mode)
    out = export_native_deepseek(student, None, tmp_path / "native")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no trust_remote_code, no reattend classes
    assert type(reloaded) is DeepseekV3ForCausalLM and reloaded.config.first_k_dense_replace == 2
    assert reloaded.config.q_lora_rank == q_lora_rank
    if mode == "identity":  # vLLM/SGLang take the latent norm's epsilon from rms_norm_eps; transformers uses 1e-6
        assert reloaded.config.rms_norm_eps == 1e-6
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits, rtol=1e-4, atol=1e-4)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(ids[:1, :5], **greedy), student.generate(ids[:1, :5], **greedy))


def test_native_export_refuses_what_deepseek_v3_cannot_express():
    with pytest.raises(ValueError, match="latent_norm: false"):
        native_config(_student("llama", latent_norm=False))
    with pytest.raises(ValueError, match=r"biases in \['q_proj'"):
        native_config(_student("qwen2"))
    with pytest.raises(ValueError, match="'qwen3'"):
        native_config(_student("qwen3"))
    with pytest.raises(ValueError, match="float16 weights cannot hold"):
        native_config(_student("llama").half())
    student = _student("llama")
    student.config.rms_norm_eps = 1e-5
    with pytest.raises(ValueError, match="runs below its epsilon 1e-06, but rms_norm_eps=1e-05"):
        native_config(student)
    student = _student("llama", freqfold=4)  # any freqfold keeps deepseek_v3's frequencies ...
    native_config(student)
    student.model.layers[1].self_attn.rope_freq_index.copy_(torch.tensor([1, 3]))  # ... other ones cannot be served
    with pytest.raises(ValueError, match=r"layer 1's rotary pairs use the teacher frequencies \[1, 3\]"):
        export_native_deepseek(student, None, "/nonexistent/never-written")
