"""Multi-head latent attention (DeepSeek-style MLA) converted from a GQA/MHA teacher layer (TransMLA).

Per token the layer caches only a latent c (``kv_lora_rank`` values) and one shared RoPE key (``qk_rope_head_dim``
values), in the model's ordinary cache (keys slot = c, values slot = RoPE key, one "head"), as stock deepseek_v3
does; sliding-window layers of the teacher keep their window through the cache layer and mask they already get.

Per head h: q_nope_h = q_h (the teacher query, after its q_norm), q_rope_h = q_rope_map_h q_h; k_nope_h and v_h
come from c through ``kv_b_proj`` (per head: head_dim key rows, then head_dim value rows). Attention runs either
decompressed (expand K/V from c, ordinary attention) or absorbed (q_lat_h = W_UK_h^T q_nope_h, MQA over [c; k_rope]
with value c, then W_UV_h), whichever needs fewer FLOPs for the query and key lengths at hand: decode is absorbed.

Teachers with a k_norm (Qwen3, Gemma 3) normalise keys per head before RoPE, which no single matrix can express,
so such layers keep k_proj/k_norm/v_proj and ``kv_a_proj_with_mqa`` reads [k_norm(k); v]; others read the hidden
state directly and k_proj/v_proj are gone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


# deepseek_v3's kv_a_layernorm epsilon: transformers hard-codes it, vLLM and SGLang read config.rms_norm_eps, so a
# latent norm that runs below its epsilon ("identity" mode) needs both to be this value.
LATENT_NORM_EPS = 1e-6


class LatentRMSNorm(nn.Module):
    """RMSNorm computed as deepseek_v3's ``kv_a_layernorm`` (float32 statistics, weight applied after casting back),
    on the input times ``input_scale`` (a buffer; the native export folds it into the projection before the norm).

    With a tiny ``input_scale`` the statistics stay far below ``eps`` and the norm is the linear map
    x * input_scale * weight / sqrt(eps) ("identity" mode). ``blend`` < 1 mixes the input back in,
    ``x + blend * (norm(x) - x)``, only while recovery phases a normalising norm in (it is not saved: a loaded or
    exported layer is always the plain norm)."""

    def __init__(self, size: int, eps: float = LATENT_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))
        self.variance_epsilon = eps
        self.blend = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        # float32 before scaling: the scaled latent of identity mode underflows in float16
        scaled = x.float() * self.input_scale.float()
        normed = scaled * torch.rsqrt(scaled.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        normed = self.weight * normed.to(dtype)
        return normed if self.blend >= 1 else torch.lerp(x, normed, self.blend)

    @torch.no_grad()
    def initialise(self, rms: float, *, identity: bool, headroom: float) -> None:
        """Start from inputs of root-mean-square ``rms``. Identity mode scales them to sqrt(headroom * eps), where
        the norm is linear to a relative 1/2 * headroom * (token energy / mean energy), and undoes the scale with
        the weight; otherwise the weight is ``rms``, so a typical input keeps its size."""
        if identity:
            self.input_scale.fill_(math.sqrt(headroom * self.variance_epsilon) / rms)
            self.weight.fill_(rms / math.sqrt(headroom))
        else:
            self.weight.fill_(rms)


class MlaAttention(nn.Module):
    target = "mla"

    def __init__(self, teacher: nn.Module, *, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 kv_lora_rank: int, qk_rope_head_dim: int, latent_norm: bool = False, q_lora_rank: int | None = None,
                 latent_norm_warmup: float = 0.0):
        super().__init__()
        self.latent_norm_warmup = latent_norm_warmup
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, qk_rope_head_dim
        self.scaling = teacher.scaling
        self.o_proj = teacher.o_proj
        self.q_lora_rank = q_lora_rank
        self.q_norm = getattr(teacher, "q_norm", None)
        self.k_norm = getattr(teacher, "k_norm", None)
        weight = teacher.q_proj.weight
        hidden = weight.shape[1]
        if self.k_norm is not None:
            self.k_proj, self.v_proj = teacher.k_proj, teacher.v_proj
            down_in, down_bias = 2 * num_kv_heads * head_dim, False
            self.replaced_teacher_modules: tuple[str, ...] = ()
        else:
            down_in, down_bias = hidden, teacher.k_proj.bias is not None or teacher.v_proj.bias is not None
            self.replaced_teacher_modules = ("k_proj", "v_proj")
        factory = {"device": weight.device, "dtype": weight.dtype}
        if q_lora_rank is None:
            self.q_proj = teacher.q_proj
        else:  # low-rank queries, as deepseek_v3: q_b(RMSNorm(q_a(x)))
            self.q_a_proj = nn.Linear(hidden, q_lora_rank, bias=teacher.q_proj.bias is not None, **factory)
            self.q_a_layernorm = LatentRMSNorm(q_lora_rank).to(**factory)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * head_dim, bias=False, **factory)
            self.replaced_teacher_modules += ("q_proj",)
        self.kv_a_proj_with_mqa = nn.Linear(down_in, kv_lora_rank + qk_rope_head_dim, bias=down_bias, **factory)
        self.kv_a_layernorm = LatentRMSNorm(kv_lora_rank).to(**factory) if latent_norm else None
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * 2 * head_dim, bias=False, **factory)
        self.q_rope_map = nn.Parameter(torch.zeros(num_heads, qk_rope_head_dim, head_dim, **factory))
        # Which of the teacher's RoPE frequencies each kept rotary pair uses (an index into its cos/sin).
        self.register_buffer("rope_freq_index", torch.zeros(qk_rope_head_dim // 2, dtype=torch.long,
                                                            device=weight.device))
        self.distill: dict | None = None

    @classmethod
    def from_teacher(cls, teacher: nn.Module, config, layer_idx: int, *, kv_lora_rank: int, qk_rope_head_dim: int = 64,
                     latent_norm: bool = False, q_lora_rank: int | None = None, latent_norm_warmup: float = 0.0,
                     latent_norm_mode: str = "identity", **conversion_options) -> "MlaAttention":
        """The layer skeleton; ``conversion_options`` (freqfold, balance_kv, calibration_*) only steer conversion.
        Identity-mode latent norms are exact from the start, so there is nothing to phase in."""
        if getattr(teacher, "attn_logit_softcapping", None):
            raise ValueError(f"layer {layer_idx}: attention logit soft-capping is not supported by the mla target")
        return cls(teacher, layer_idx=layer_idx, num_heads=config.num_attention_heads,
                   num_kv_heads=config.num_key_value_heads, head_dim=teacher.head_dim, kv_lora_rank=kv_lora_rank,
                   qk_rope_head_dim=qk_rope_head_dim, latent_norm=latent_norm, q_lora_rank=q_lora_rank,
                   latent_norm_warmup=0.0 if latent_norm_mode == "identity" else latent_norm_warmup)

    def latent_norms(self) -> list[LatentRMSNorm]:
        return [m for m in (self.kv_a_layernorm, getattr(self, "q_a_layernorm", None)) if m is not None]

    @property
    def phased_in_by_recovery(self) -> bool:
        return self.latent_norm_warmup > 0 and bool(self.latent_norms())

    def set_training_progress(self, fraction: float) -> None:
        """Called by recovery before each step (``fraction`` of it done, 1.0 after). The latent norms are not in
        the teacher and a fresh one costs most of the conversion's quality (every token's latent rescaled to one
        norm), so they are blended in from the identity over the first ``latent_norm_warmup`` of recovery."""
        blend = 1.0 if self.latent_norm_warmup <= 0 else min(1.0, fraction / self.latent_norm_warmup)
        for norm in self.latent_norms():
            norm.blend = blend

    def feature_parameters(self):
        """The parameters conversion created (down/up projections, rope query map, latent norms)."""
        modules = [self.kv_a_proj_with_mqa, self.kv_b_proj] + ([self.kv_a_layernorm] if self.kv_a_layernorm else [])
        if self.q_lora_rank is not None:
            modules += [self.q_a_proj, self.q_a_layernorm, self.q_b_proj]
        return [p for m in modules for p in m.parameters()] + [self.q_rope_map]

    # Projections
    def latent(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, k_rope before RoPE), shaped [B, 1, T, r] and [B, 1, T, d_rope]."""
        B, T, _ = hidden_states.shape
        kv_in = hidden_states
        if self.k_norm is not None:
            k = self.k_norm(self.k_proj(hidden_states).view(B, T, -1, self.head_dim)).flatten(-2)
            kv_in = torch.cat([k, self.v_proj(hidden_states)], dim=-1)
        c, k_rope = self.kv_a_proj_with_mqa(kv_in).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        if self.kv_a_layernorm is not None:
            c = self.kv_a_layernorm(c)
        return c.unsqueeze(1), k_rope.unsqueeze(1)

    def queries(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_nope, q_rope before RoPE), shaped [B, H, T, d] and [B, H, T, d_rope]."""
        B, T, _ = hidden_states.shape
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)
        return q, torch.einsum("bhtd,hrd->bhtr", q, self.q_rope_map)

    def _rope(self, position_embeddings, q_rope, k_rope):
        cos, sin = position_embeddings
        idx = self.rope_freq_index
        cos = torch.cat([cos[..., idx], cos[..., idx]], dim=-1).unsqueeze(1)
        sin = torch.cat([sin[..., idx], sin[..., idx]], dim=-1).unsqueeze(1)
        return (q_rope * cos + rotate_half(q_rope) * sin).to(q_rope.dtype), \
            (k_rope * cos + rotate_half(k_rope) * sin).to(k_rope.dtype)

    def _up_weight(self) -> torch.Tensor:
        """kv_b_proj's effective weight as [H, 2d, r]. An adapter (peft LoRA) wraps the Linear and adds its own
        delta in forward, so then the weight is read by projecting the identity."""
        if isinstance(self.kv_b_proj, nn.Linear):
            w = self.kv_b_proj.weight
        else:
            eye = torch.eye(self.kv_lora_rank, device=self.q_rope_map.device, dtype=self.q_rope_map.dtype)
            w = self.kv_b_proj(eye).T
        return w.view(self.num_heads, 2 * self.head_dim, self.kv_lora_rank)

    # Attention
    def decompressed(self, q_nope, q_rope, c, k_rope, mask):
        B, _, S, _ = c.shape
        kv = self.kv_b_proj(c.squeeze(1)).view(B, S, self.num_heads, 2 * self.head_dim).transpose(1, 2)
        k_nope, v = kv.split(self.head_dim, dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)

    def absorbed(self, q_nope, q_rope, c, k_rope, mask):
        w = self._up_weight()
        w_uk, w_uv = w[:, : self.head_dim], w[:, self.head_dim:]
        q = torch.cat([torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk), q_rope], dim=-1)
        k = torch.cat([c, k_rope], dim=-1).expand(-1, self.num_heads, -1, -1)
        o_latent = F.scaled_dot_product_attention(q, k, c.expand(-1, self.num_heads, -1, -1), attn_mask=mask,
                                                  scale=self.scaling)
        return torch.einsum("bhtr,hdr->bhtd", o_latent, w_uv)

    def absorbed_is_cheaper(self, q_len: int, kv_len: int) -> bool:
        H, d, r, dr = self.num_heads, self.head_dim, self.kv_lora_rank, self.rope_dim
        decompressed = kv_len * r * H * 2 * d + q_len * kv_len * H * (2 * d + dr)
        absorbed = 2 * q_len * H * d * r + q_len * kv_len * H * (2 * r + dr)
        return absorbed < decompressed

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        if self.distill is not None:
            raise RuntimeError(f"layer {self.layer_idx}: the mla target has no attention-transfer stage (its teacher "
                               "keys are folded away); set transfer.enabled: false and recover instead")
        q_nope, q_rope = self.queries(hidden_states)
        c, k_rope = self.latent(hidden_states)
        q_rope, k_rope = self._rope(position_embeddings, q_rope, k_rope)
        if past_key_values is not None:
            c, k_rope = past_key_values.update(c, k_rope, self.layer_idx)
        mask = _causal_mask(attention_mask, q_nope.shape[-2], c.shape[-2], q_nope.device)
        attend = self.absorbed if self.absorbed_is_cheaper(q_nope.shape[-2], c.shape[-2]) else self.decompressed
        out = attend(q_nope, q_rope, c, k_rope, mask)
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out), None


def _causal_mask(attention_mask, q_len: int, kv_len: int, device):
    """The layer's mask as SDPA takes it. transformers passes None when plain causal attention is meant."""
    if attention_mask is not None:
        return attention_mask[:, :, :, :kv_len]
    if q_len == 1:
        return None
    i = torch.arange(q_len, device=device).view(q_len, 1) + (kv_len - q_len)
    return torch.arange(kv_len, device=device).view(1, kv_len) <= i
