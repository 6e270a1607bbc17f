"""Export an all-MLA student as a stock ``deepseek_v3`` checkpoint (no remote code, no reattend needed to load).

deepseek_v3 can express the student exactly when every layer is MLA with one ``kv_lora_rank`` and
``qk_rope_head_dim``, the MLP is a dense gated MLP (``first_k_dense_replace`` = number of layers), the latent
passes through an RMSNorm (``kv_a_layernorm`` always runs in stock deepseek_v3, so the student must have been
converted and trained with ``latent_norm: true``; an identity-mode norm's input scale is folded into the rows of
``kv_a_proj_with_mqa``/``q_a_proj`` that feed it), and nothing has a bias or a q/k norm. Anything else is refused
with the reason, before any file is written.

Mapping: q_proj (or q_b_proj, with low-rank queries) rows per head become [q_h (qk_nope_head_dim = head_dim); q_rope_map_h q_h (qk_rope_head_dim)],
times scaling_student / scaling_deepseek (deepseek_v3 scales by (nope + rope)^-1/2); kv_a_proj_with_mqa,
kv_a_layernorm, kv_b_proj (per head: no-RoPE key rows then value rows, v_head_dim = head_dim), o_proj, norms, MLP
and embeddings keep their names. RoPE: non-interleaved (rotate_half, as the student), and the rotary pair p of the
student must use the teacher frequency p * head_dim / qk_rope_head_dim (conversion assigns exactly these, for any
freqfold), which is what deepseek_v3 computes for a rotary width of qk_rope_head_dim; this is checked numerically
against the stock rotary embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from ..convert import student_attention_modules
from ..modeling.mla_attention import MlaAttention
from .checkpoint import save_stock_checkpoint

LLAMA_LIKE = ("llama", "mistral", "qwen2")
FALLBACK = "export in reattend's format only (export.native: false)"


def native_config(student) -> DeepseekV3Config:
    """The deepseek_v3 config for ``student``, or a ValueError saying what stock deepseek_v3 cannot express."""
    config = student.config
    base_type = config.model_type.removeprefix("reattend_")
    if base_type not in LLAMA_LIKE:
        raise ValueError(f"export.native: a {base_type!r} model cannot become deepseek_v3 (its decoder layers differ "
                         f"from deepseek_v3's; supported: {', '.join(LLAMA_LIKE)}); {FALLBACK}")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ValueError(f"export.native: sliding_window={config.sliding_window} has no deepseek_v3 equivalent; {FALLBACK}")
    if getattr(config, "mlp_bias", False):
        raise ValueError(f"export.native: mlp_bias=True has no deepseek_v3 equivalent; {FALLBACK}")
    modules = dict(student_attention_modules(student))
    layers = range(config.num_hidden_layers)
    not_mla = [i for i in layers if not isinstance(modules.get(i), MlaAttention)]
    if not_mla:
        raise ValueError(f"export.native: deepseek_v3 has MLA in every layer, but layers {not_mla} are not mla; "
                         f"convert every layer with target mla, or {FALLBACK}")
    shapes = {(m.kv_lora_rank, m.rope_dim, m.q_lora_rank) for m in modules.values()}
    if len(shapes) > 1:
        raise ValueError(f"export.native: deepseek_v3 has one kv_lora_rank/qk_rope_head_dim/q_lora_rank for all "
                         f"layers, the plan "
                         f"uses {sorted(shapes)}; use one rule for every layer, or {FALLBACK}")
    for i, m in modules.items():
        if m.kv_a_layernorm is None:
            raise ValueError(f"export.native: layer {i} has no latent RMSNorm (latent_norm: false), but stock "
                             "deepseek_v3 always applies kv_a_layernorm (served without it, TransMLA models output "
                             "gibberish); convert with options latent_norm: true and recover, or " + FALLBACK)
        for norm in (n for n in m.latent_norms() if float(n.input_scale) != 1.0):  # identity-mode norms
            if norm.variance_epsilon != config.rms_norm_eps:
                raise ValueError(f"export.native: layer {i}'s latent norm runs below its epsilon "
                                 f"{norm.variance_epsilon}, but rms_norm_eps={config.rms_norm_eps}, where vLLM/SGLang "
                                 "read that epsilon from; keep the rms_norm_eps conversion set, or " + FALLBACK)
            if next(student.parameters()).dtype == torch.float16:
                raise ValueError(f"export.native: layer {i}'s identity-mode latent norm scales the latent to "
                                 f"~{float(norm.input_scale):.1e} of its size, which float16 weights cannot hold; "
                                 "use bfloat16 or float32 (the recipe's dtype), or " + FALLBACK)
        if m.q_norm is not None or m.k_norm is not None:
            raise ValueError(f"export.native: layer {i} has q/k norms, which deepseek_v3 lacks; {FALLBACK}")
        query = "q_proj" if m.q_lora_rank is None else "q_a_proj"
        biased = [name for name in (query, "kv_a_proj_with_mqa", "o_proj") if getattr(m, name).bias is not None]
        if biased:
            raise ValueError(f"export.native: layer {i} has biases in {biased} (e.g. Qwen2's q/k/v bias); stock "
                             "deepseek_v3's q_proj takes no bias and its attention_bias adds one to every projection, "
                             f"so the query bias cannot be kept; {FALLBACK}")
    m = modules[0]
    return DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=m.num_heads,
        # K/V come out of kv_b_proj per query head already, so no head sharing on top.
        num_key_value_heads=m.num_heads,
        kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_lora_rank, qk_rope_head_dim=m.rope_dim, qk_nope_head_dim=m.head_dim,
        v_head_dim=m.head_dim, first_k_dense_replace=config.num_hidden_layers, n_routed_experts=1,
        num_experts_per_tok=1, n_group=1, topk_group=1, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, rope_parameters=dict(config.rope_parameters),
        rope_interleave=False, attention_bias=False, attention_dropout=0.0, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )


@torch.no_grad()
def native_model(student) -> DeepseekV3ForCausalLM:
    """A stock DeepseekV3ForCausalLM holding the student's weights (float32 during the mapping)."""
    config = native_config(student)
    dtype = next(student.parameters()).dtype
    native = DeepseekV3ForCausalLM(config).float()
    modules = dict(student_attention_modules(student))
    student_inv_freq = student.model.rotary_emb.inv_freq.cpu().float()
    for i, m in modules.items():
        wanted = student_inv_freq[m.rope_freq_index.cpu()]
        if not torch.allclose(native.model.rotary_emb.inv_freq.float(), wanted, rtol=1e-6, atol=0) or \
                native.model.rotary_emb.attention_scaling != student.model.rotary_emb.attention_scaling:
            raise ValueError(f"export.native: layer {i}'s rotary pairs use the teacher frequencies "
                             f"{m.rope_freq_index.tolist()}, which deepseek_v3's RoPE of width {m.rope_dim} does not "
                             f"reproduce (a TransMLA conversion uses every {m.head_dim // m.rope_dim}th); {FALLBACK}")
    state = {name: t.float().cpu() for name, t in student.state_dict().items()
             if ".self_attn." not in name and name in native.state_dict()}
    for i, m in modules.items():
        prefix = f"model.layers.{i}.self_attn."
        factor = m.scaling / native.model.layers[i].self_attn.scaling
        query = "q_proj" if m.q_lora_rank is None else "q_b_proj"
        w_q = getattr(m, query).weight.float().cpu().view(m.num_heads, m.head_dim, -1)
        w_rope = torch.einsum("hrd,hdk->hrk", m.q_rope_map.float().cpu(), w_q)
        state[prefix + query + ".weight"] = factor * torch.cat([w_q, w_rope], dim=1).flatten(0, 1)
        low_rank_query = ("q_a_layernorm.weight",) if m.q_lora_rank else ()
        for name in low_rank_query + ("kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"):
            state[prefix + name] = m.state_dict()[name].float().cpu()
        # deepseek_v3's norms have no input scale: it goes into the rows feeding them (the latent, not the rope key)
        w_kv = m.kv_a_proj_with_mqa.weight.float().cpu().clone()
        w_kv[: m.kv_lora_rank] *= m.kv_a_layernorm.input_scale.float().cpu()
        state[prefix + "kv_a_proj_with_mqa.weight"] = w_kv
        if m.q_lora_rank:
            state[prefix + "q_a_proj.weight"] = m.q_a_proj.weight.float().cpu() * m.q_a_layernorm.input_scale.float().cpu()
    native.load_state_dict(state, strict=True)
    return native.to(dtype).eval()


def export_native_deepseek(student, tokenizer, out_dir: str | Path, *, max_shard_size: str = "2GB") -> Path:
    """Write the deepseek_v3 checkpoint to ``out_dir`` (via a temporary folder renamed into place)."""
    return save_stock_checkpoint(native_model(student), tokenizer, Path(out_dir), max_shard_size=max_shard_size)
