"""Local attention (CLEAR's 1-D causal analogue): each query sees the last W tokens and the first S "sink" tokens.

Query i sees key j when ``j <= i and (i - j < W or j < S)``. The module keeps the teacher's projections and adds
nothing, so a converted layer has exactly the teacher's parameters; attention transfer trains q/k/v projections
so the windowed softmax reproduces the teacher's full attention output.

Prefill never builds a T x T mask: the reference path splits the queries into chunks of ``max(W, 64)`` and gives
each chunk only the keys it can see (its window and the sinks), so time and memory grow as T * (W + S). On CUDA
the same mask runs as a FlexAttention block mask (compiled; blocks outside the window are skipped).

Decode cache: ``SinkSlidingWindowLayer``, transformers' ``DynamicSlidingWindowLayer`` (the last W - 1 keys/values)
plus the first S keys/values, so a layer holds at most W - 1 + S entries however long the sequence grows.

Like the linear target, the module computes its own mask from positions and does not apply padding masks: batch
sequences of equal length or pad on the right (left padding would let queries see pad tokens).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.masking_utils import and_masks, causal_mask_function, or_masks, sliding_window_overlay

from .attention_backend import resolve_backend
from .linear_attention import project_qkv, teacher_attention

_MIN_CHUNK = 64
_LOCAL_BACKENDS = {"triton": "flex", "reference": "sdpa"}


def sink_overlay(sinks: int):
    """Mask function (transformers' signature) marking the first ``sinks`` key positions visible."""

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx < sinks

    return inner_mask


def local_mask_function(window: int, sinks: int = 0):
    """``(batch, head, q_idx, kv_idx) -> bool`` for absolute positions; usable as a FlexAttention ``mask_mod``."""
    visible = or_masks(sliding_window_overlay(window), sink_overlay(sinks)) if sinks else sliding_window_overlay(window)
    return and_masks(causal_mask_function, visible)


def local_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, sinks: int = 0) -> torch.Tensor:
    """Boolean ``(len(q_pos), len(k_pos))`` mask for queries and keys at the given absolute positions."""
    zero = q_pos.new_zeros(())
    return local_mask_function(window, sinks)(zero, zero, q_pos.view(-1, 1), k_pos.view(1, -1))


def local_attention(q, k, v, *, window: int, sinks: int = 0, scale: float, backend: str | None = None) -> torch.Tensor:
    """Causal local attention over a whole sequence starting at position 0.

    q: (B, H, T, D); k, v: (B, H_kv, T, D) with H a multiple of H_kv. Returns (B, H, T, D).
    """
    T = q.shape[-2]
    if window >= T:  # the window covers every earlier token: plain causal attention, as the teacher computes it
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    # REATTEND_KERNELS as for the other kernels: ``triton`` is FlexAttention (compiled to a Triton kernel on GPUs; on
    # CPU it runs unfused, for tests), ``reference`` the chunked SDPA path.
    if (backend or _LOCAL_BACKENDS[resolve_backend(q)]) == "flex":
        return _flex_local_attention(q, k, v, window=window, sinks=sinks, scale=scale)
    return _chunked_local_attention(q, k, v, window=window, sinks=sinks, scale=scale)


def _chunked_local_attention(q, k, v, *, window: int, sinks: int, scale: float) -> torch.Tensor:
    """Queries in chunks of C; chunk c attends to keys [cC - W + 1, cC + C) and, before that range, the sinks."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    C = max(window, _MIN_CHUNK)
    n = -(-T // C)
    span = C + window - 1
    pad_end = n * C - T
    q_blocks = F.pad(q, (0, 0, 0, pad_end)).view(B, H, n, C, D)
    # Left padding of W - 1 lets every chunk take the same-sized key span; padded keys are masked (negative position).
    k_blocks = F.pad(k, (0, 0, window - 1, pad_end)).unfold(2, span, C).transpose(-1, -2)  # (B, H_kv, n, span, D)
    v_blocks = F.pad(v, (0, 0, window - 1, pad_end)).unfold(2, span, C).transpose(-1, -2)
    q_pos = torch.arange(n * C, device=q.device).view(n, C, 1)
    k_pos = (torch.arange(n, device=q.device).view(n, 1) * C - (window - 1)
             + torch.arange(span, device=q.device).view(1, span)).view(n, 1, span)
    zero = q_pos.new_zeros(())
    mask = local_mask_function(window)(zero, zero, q_pos, k_pos) & (k_pos >= 0)  # (n, C, span)
    if sinks:
        S = min(sinks, T)
        sink_pos = torch.arange(S, device=q.device).view(1, 1, S)
        # A sink still inside the window is already in the window span; count it once.
        sink_mask = (sink_pos <= q_pos) & (q_pos - sink_pos >= window)
        mask = torch.cat([sink_mask.expand(n, C, S), mask], dim=-1)
        k_blocks = torch.cat([k[:, :, None, :S].expand(B, H_kv, n, S, D), k_blocks], dim=-2)
        v_blocks = torch.cat([v[:, :, None, :S].expand(B, H_kv, n, S, D), v_blocks], dim=-2)
    # Fold chunks into the batch so SDPA's grouped-query broadcast (heads at dim -3) applies.
    out = F.scaled_dot_product_attention(
        q_blocks.transpose(1, 2).reshape(B * n, H, C, D),
        k_blocks.transpose(1, 2).reshape(B * n, H_kv, -1, D),
        v_blocks.transpose(1, 2).reshape(B * n, H_kv, -1, D),
        attn_mask=mask.unsqueeze(1).repeat(B, 1, 1, 1), scale=scale, enable_gqa=True)
    return out.view(B, n, H, C, D).transpose(1, 2).reshape(B, H, n * C, D)[:, :, :T]


_compiled_flex = None


def _flex_local_attention(q, k, v, *, window: int, sinks: int, scale: float) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    T = q.shape[-2]
    block_mask = create_block_mask(local_mask_function(window, sinks), None, None, T, T, device=q.device)
    if q.is_cuda:
        # Compiled once per process: FlexAttention fuses and skips the masked-out blocks only when compiled.
        _compiled_flex = _compiled_flex or torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


class SinkSlidingWindowLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window cache layer that also keeps the first ``sinks`` keys/values."""

    def __init__(self, sliding_window: int, sinks: int = 0, **kwargs):
        super().__init__(sliding_window=sliding_window, **kwargs)
        self.sinks = sinks
        self.sink_keys = self.sink_values = None

    def update(self, key_states, value_states, *args, **kwargs):
        missing = self.sinks - self.cumulative_length
        if missing > 0:
            new_k, new_v = key_states[:, :, :missing], value_states[:, :, :missing]
            self.sink_keys = new_k if self.sink_keys is None else torch.cat([self.sink_keys, new_k], dim=-2)
            self.sink_values = new_v if self.sink_values is None else torch.cat([self.sink_values, new_v], dim=-2)
        return super().update(key_states, value_states, *args, **kwargs)

    def sink_states(self, before: int):
        """The sink keys/values at positions below ``before`` (those the window part no longer holds)."""
        count = min(self.sinks, before)
        if count == 0 or self.sink_keys is None:
            return None, None
        return self.sink_keys[:, :, :count], self.sink_values[:, :, :count]

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.sink_keys is not None:
            self.sink_keys = self.sink_keys[:, :, : self.cumulative_length]
            self.sink_values = self.sink_values[:, :, : self.cumulative_length]

    def reset(self) -> None:
        super().reset()
        self.sink_keys = self.sink_values = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.sink_keys is not None:
            self.sink_keys = self.sink_keys.repeat_interleave(repeats, dim=0)
            self.sink_values = self.sink_values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.sink_keys is not None:
            self.sink_keys, self.sink_values = self.sink_keys[indices], self.sink_values[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.sink_keys is not None:
            self.sink_keys = self.sink_keys.index_select(0, beam_idx.to(self.sink_keys.device))
            self.sink_values = self.sink_values.index_select(0, beam_idx.to(self.sink_values.device))


class LocalAttention(nn.Module):
    """Causal sliding-window attention with sinks, on the teacher's own projections."""

    target = "local"

    def __init__(self, teacher: nn.Module, *, layer_idx: int, head_dim: int, window: int = 256, sinks: int = 0,
                 teacher_window: int | None = None):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim
        self.scaling = teacher.scaling
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = teacher.q_proj, teacher.k_proj, teacher.v_proj, teacher.o_proj
        self.q_norm = getattr(teacher, "q_norm", None)
        self.k_norm = getattr(teacher, "k_norm", None)
        # A layer the teacher already ran with a window (Gemma 3 local layers, Mistral) never looks further than it did.
        self.window = min(window, teacher_window) if teacher_window else window
        self.sinks = sinks
        self.teacher_window = teacher_window
        self._distill: dict | None = None

    @classmethod
    def from_teacher(cls, teacher: nn.Module, config, layer_idx: int, **options) -> "LocalAttention":
        if getattr(teacher, "attn_logit_softcapping", None):
            raise ValueError(f"layer {layer_idx}: attention logit soft-capping is not supported by the local target")
        teacher_window = getattr(teacher, "sliding_window", None)
        return cls(teacher, layer_idx=layer_idx, head_dim=teacher.head_dim, teacher_window=teacher_window, **options)

    def feature_parameters(self):
        """What attention transfer trains: the q/k/v projections (the layer adds no parameters of its own)."""
        return [p for proj in (self.q_proj, self.k_proj, self.v_proj) for p in proj.parameters()]

    @property
    def distill(self) -> dict | None:
        return self._distill

    @distill.setter
    def distill(self, value: dict | None) -> None:
        # Transfer trains the projections the teacher's output is computed from, so the teacher's projections are
        # copied when distillation starts (before a resumed run loads its checkpoint into the trained ones).
        if value is not None and "teacher_projections" not in value:
            frozen = [copy.deepcopy(p).requires_grad_(False) for p in (self.q_proj, self.k_proj, self.v_proj)]
            value["teacher_projections"] = frozen
        self._distill = value

    def _project(self, hidden_states, position_embeddings, projections=None):
        return project_qkv(hidden_states, position_embeddings, projections or (self.q_proj, self.k_proj, self.v_proj),
                           self.q_norm, self.k_norm, self.head_dim)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        q, k, v = self._project(hidden_states, position_embeddings)
        if self.distill is not None:
            out = self._distill_forward(hidden_states, position_embeddings, q, k, v)
        elif past_key_values is None:
            out = local_attention(q, k, v, window=self.window, sinks=self.sinks, scale=self.scaling)
        else:
            out = self._cached_forward(q, k, v, past_key_values)
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(out), None

    def _distill_forward(self, hidden_states, position_embeddings, q, k, v):
        """Attention transfer: the local output on the trainable projections vs the teacher's; the teacher's goes on."""
        with torch.no_grad():
            tq, tk, tv = self._project(hidden_states, position_embeddings, self.distill["teacher_projections"])
            groups = tq.shape[1] // tk.shape[1]
            target = teacher_attention(tq, tk.repeat_interleave(groups, 1), tv.repeat_interleave(groups, 1),
                                       scale=self.scaling, window=self.teacher_window)
        if self.distill.get("compute_loss", True):
            student = local_attention(q, k, v, window=self.window, sinks=self.sinks, scale=self.scaling)
            self.distill["losses"] = {"mse": F.mse_loss(student.float(), target.float())}
        return target

    def _cache_layer(self, cache) -> SinkSlidingWindowLayer:
        while len(cache.layers) <= self.layer_idx:
            cache.layers.append(None)
        layer = cache.layers[self.layer_idx]
        if not isinstance(layer, SinkSlidingWindowLayer):
            layer = SinkSlidingWindowLayer(sliding_window=self.window, sinks=self.sinks)
            cache.layers[self.layer_idx] = layer
        return layer

    def _cached_forward(self, q, k_new, v_new, cache):
        layer = self._cache_layer(cache)
        if layer.get_seq_length() == 0:
            layer.update(k_new, v_new)
            return local_attention(q, k_new, v_new, window=self.window, sinks=self.sinks, scale=self.scaling)
        # Later steps: the cache returns its last W - 1 keys plus the new ones; add the sinks that fell out of them.
        keys, values = layer.update(k_new, v_new)
        seen = layer.get_seq_length()
        first = seen - keys.shape[-2]
        sink_k, sink_v = layer.sink_states(first)
        k_pos = torch.arange(first, seen, device=q.device)
        if sink_k is not None:
            keys, values = torch.cat([sink_k, keys], dim=-2), torch.cat([sink_v, values], dim=-2)
            k_pos = torch.cat([torch.arange(sink_k.shape[-2], device=q.device), k_pos])
        q_pos = torch.arange(seen - q.shape[-2], seen, device=q.device)
        mask = local_mask(q_pos, k_pos, self.window, self.sinks)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)
