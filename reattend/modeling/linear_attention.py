"""Linear attention and the sliding-window + linear hybrid (LoLCATs), as a drop-in attention module.

The module takes over the teacher attention's projections (q/k/v/o, optional q/k norms) unchanged and adds
feature maps and a per-head mixing gate. It has the same forward signature as transformers' attention
modules, so decoder layers call it as they called the teacher.

Decode cache: transformers' ``LinearAttentionAndSlidingWindowAttentionLayer`` holds the last ``window - 1``
raw keys/values and, as recurrent states, the linear state (slot 0) and the sink keys/values (slots 1, 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import LinearAttentionAndSlidingWindowAttentionLayer

from .attention_backend import hybrid_attention, hybrid_decode_step, linear_attention
from .feature_maps import FEATURE_MAPS
from .linear_attention_ops import fold_into_state, hybrid_attention_weights, quadratic_linear_weights

SINK_KEYS, SINK_VALUES, LINEAR_STATE = 1, 2, 0
# A pure linear layer still keeps a one-token window so the cache can report its sequence length.
_PURE_LINEAR_CACHE_WINDOW = 2


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def project_qkv(hidden_states, position_embeddings, projections, q_norm, k_norm, head_dim: int):
    """Heads-first q, k (normed as the teacher does, RoPE applied) and v of a teacher-style attention layer."""
    q_proj, k_proj, v_proj = projections
    shape = (*hidden_states.shape[:-1], -1, head_dim)
    q, k = q_proj(hidden_states).view(shape), k_proj(hidden_states).view(shape)
    v = v_proj(hidden_states).view(shape).transpose(1, 2)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    cos, sin = position_embeddings
    q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, v


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def teacher_attention(q, k, v, *, scale: float, window: int | None) -> torch.Tensor:
    """The teacher's causal softmax attention (optionally sliding-window) on the same q/k/v, via SDPA."""
    T = q.shape[-2]
    if window is None or window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    i = torch.arange(T, device=q.device).view(T, 1)
    j = torch.arange(T, device=q.device).view(1, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < window), scale=scale)


class LinearAttention(nn.Module):
    """Pure linear attention (``window`` None) or the sliding-window hybrid with a shared normaliser."""

    target = "linear"

    def __init__(self, teacher: nn.Module, *, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 feature_map: str = "hedgehog", feature_dim: int = 64, tie_qk: bool = False,
                 window: int | None = 64, sinks: int = 0, affine: bool = False, gamma_init: float = 0.1,
                 teacher_window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scaling = teacher.scaling
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = teacher.q_proj, teacher.k_proj, teacher.v_proj, teacher.o_proj
        self.q_norm = getattr(teacher, "q_norm", None)
        self.k_norm = getattr(teacher, "k_norm", None)
        self.window, self.sinks, self.affine = window, sinks, affine
        self.teacher_window = teacher_window
        feature_cls = FEATURE_MAPS[feature_map]
        self.feature_map_q = feature_cls(num_heads, head_dim, feature_dim)
        self.feature_map_k = self.feature_map_q if tie_qk else feature_cls(num_heads, head_dim, feature_dim)
        self.gamma_logit = nn.Parameter(torch.full((num_heads,), math.log(gamma_init / (1.0 - gamma_init))))
        self.distill: dict | None = None

    @classmethod
    def from_teacher(cls, teacher: nn.Module, config, layer_idx: int, **options) -> "LinearAttention":
        if getattr(teacher, "attn_logit_softcapping", None):
            raise ValueError(f"layer {layer_idx}: attention logit soft-capping is not supported by the linear target")
        teacher_window = getattr(teacher, "sliding_window", getattr(config, "sliding_window", None))
        return cls(teacher, layer_idx=layer_idx, num_heads=config.num_attention_heads,
                   num_kv_heads=config.num_key_value_heads, head_dim=teacher.head_dim,
                   teacher_window=teacher_window, **options)

    @property
    def gamma(self) -> torch.Tensor:
        return torch.sigmoid(self.gamma_logit)

    def feature_parameters(self):
        """The parameters attention transfer trains: feature maps and the mixing gate."""
        seen = {id(p): p for m in (self.feature_map_q, self.feature_map_k) for p in m.parameters()}
        return [*seen.values(), self.gamma_logit]

    def _project(self, hidden_states, position_embeddings):
        return project_qkv(hidden_states, position_embeddings, (self.q_proj, self.k_proj, self.v_proj),
                           self.q_norm, self.k_norm, self.head_dim)

    def _student(self, q, k, v):
        """Whole-sequence student attention on per-query-head q/k/v (no cache)."""
        qf, kf = self.feature_map_q(q), self.feature_map_k(k)
        if self.window is None:
            return linear_attention(qf, kf, v)[0]
        return hybrid_attention(q, k, v, qf, kf, self.gamma, window=self.window, sinks=self.sinks,
                                        scale=self.scaling, affine=self.affine)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        q, k_kv, v_kv = self._project(hidden_states, position_embeddings)
        groups = self.num_heads // self.num_kv_heads
        if self.distill is not None:
            out = self._distill_forward(q, repeat_kv(k_kv, groups), repeat_kv(v_kv, groups))
        elif past_key_values is None:
            out = self._student(q, repeat_kv(k_kv, groups), repeat_kv(v_kv, groups))
        else:
            out = self._cached_forward(q, k_kv, v_kv, past_key_values)
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out), None

    def _distill_forward(self, q, k, v):
        """Attention transfer: train the student on the teacher's q/k/v, pass the teacher's output on."""
        with torch.no_grad():
            q, k, v = q.detach(), k.detach(), v.detach()
            target = teacher_attention(q, k, v, scale=self.scaling, window=self.teacher_window)
        if self.distill.get("compute_loss", True):
            student = self._student(q, k, v)
            losses = {"mse": F.mse_loss(student.float(), target.float())}
            if self.distill.get("xent", False):
                losses["xent"] = self._attention_xent(q, k)
            self.distill["losses"] = losses
        return target

    def _attention_xent(self, q, k):
        """Hedgehog loss: cross-entropy between teacher and student T x T attention weights."""
        T = q.shape[-2]
        scores = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * self.scaling
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        teacher = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        qf, kf = self.feature_map_q(q), self.feature_map_k(k)
        if self.window is None:
            student = quadratic_linear_weights(qf, kf)
        else:
            student = hybrid_attention_weights(q, k, qf, kf, self.gamma, window=self.window, sinks=self.sinks,
                                               scale=self.scaling, affine=self.affine)
        return -(teacher * torch.log(student.clamp_min(1e-12))).sum(dim=-1).mean()

    def _cache_layer(self, cache):
        while len(cache.layers) <= self.layer_idx:
            cache.layers.append(None)
        layer = cache.layers[self.layer_idx]
        if not isinstance(layer, LinearAttentionAndSlidingWindowAttentionLayer):
            window = self.window if self.window is not None else _PURE_LINEAR_CACHE_WINDOW
            layer = LinearAttentionAndSlidingWindowAttentionLayer(sliding_window=window, number_of_states=3)
            cache.layers[self.layer_idx] = layer
        return layer

    def _cached_forward(self, q, k_kv, v_kv, cache):
        layer = self._cache_layer(cache)
        groups = self.num_heads // self.num_kv_heads
        if self.window is None:
            layer.update(k_kv, v_kv)
            k, v = repeat_kv(k_kv, groups), repeat_kv(v_kv, groups)
            state = layer.recurrent_states[LINEAR_STATE]
            out, state = linear_attention(self.feature_map_q(q), self.feature_map_k(k), v,
                                                  initial_state=state, output_final_state=True)
            _set_state(layer, LINEAR_STATE, state)
            return out
        if layer.get_seq_length() == 0:
            return self._prefill(q, k_kv, v_kv, layer)
        return torch.cat([self._decode_one(q[:, :, t:t + 1], k_kv[:, :, t:t + 1], v_kv[:, :, t:t + 1], layer)
                          for t in range(q.shape[-2])], dim=2)

    def _prefill(self, q, k_kv, v_kv, layer):
        groups = self.num_heads // self.num_kv_heads
        k, v = repeat_kv(k_kv, groups), repeat_kv(v_kv, groups)
        out = self._student(q, k, v)
        layer.update(k_kv, v_kv)
        T = q.shape[-2]
        end = max(T - (self.window - 1), 0)
        start = min(self.sinks, end)
        state = fold_into_state(None, self.feature_map_k(k[:, :, start:end]), v[:, :, start:end])
        _set_state(layer, LINEAR_STATE, state)
        if self.sinks:
            _set_state(layer, SINK_KEYS, k_kv[:, :, : self.sinks])
            _set_state(layer, SINK_VALUES, v_kv[:, :, : self.sinks])
        return out

    def _decode_one(self, q, k_new, v_new, layer):
        groups = self.num_heads // self.num_kv_heads
        keys, values = layer.update(k_new, v_new)
        seen = layer.get_seq_length()
        first = seen - keys.shape[-2]  # position of keys[:, :, 0]
        if self.sinks and seen <= self.sinks:
            _set_state(layer, SINK_KEYS, _append(layer.recurrent_states[SINK_KEYS], k_new))
            _set_state(layer, SINK_VALUES, _append(layer.recurrent_states[SINK_VALUES], v_new))
        soft_k, soft_v = keys, values
        outside = min(self.sinks, first)
        if outside > 0:
            soft_k = torch.cat([layer.recurrent_states[SINK_KEYS][:, :, :outside], keys], dim=2)
            soft_v = torch.cat([layer.recurrent_states[SINK_VALUES][:, :, :outside], values], dim=2)
        leaving = max(keys.shape[-2] - (self.window - 1), 0)
        skip = min(max(self.sinks - first, 0), leaving)  # sinks never enter the linear state
        k_leave = repeat_kv(keys[:, :, skip:leaving], groups)
        v_leave = repeat_kv(values[:, :, skip:leaving], groups)
        out, state = hybrid_decode_step(
            q, self.feature_map_q(q), repeat_kv(soft_k, groups), repeat_kv(soft_v, groups),
            layer.recurrent_states[LINEAR_STATE], self.gamma, scale=self.scaling, affine=self.affine,
            k_feat_leaving=self.feature_map_k(k_leave), v_leaving=v_leave,
        )
        _set_state(layer, LINEAR_STATE, state)
        return out


def _append(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=2)


def _set_state(layer, idx: int, value: torch.Tensor | None) -> None:
    """Store a recurrent-state slot whose shape may change (sinks grow; a state may start empty)."""
    if value is None:
        return
    layer.recurrent_states[idx] = value
    layer.is_recurrent_states_initialized[idx] = True
    layer.has_previous_state[idx] = True
