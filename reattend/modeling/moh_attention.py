"""Mixture-of-head attention (MoH) converted from a pretrained softmax attention layer.

The first ``shared_heads`` query heads are always on; each token also picks ``top_k`` of the remaining
(routed) heads. The layer keeps the teacher's projections and its KV cache unchanged (every KV head is
still cached: MoH saves compute, not memory) and computes only the heads a token selected.

Routers:
- ``qnorm`` (no parameters, as MoH-LLaMA3): score of routed head h = ||q_h|| of the raw q projection (before
  any q-norm and RoPE), standardised across the routed heads of the token.
- ``learned``: the same standardised score plus a linear router ``W_r x`` (zero-initialised, so it starts
  from qnorm's choices), per-head logits ``W_s x`` for the shared heads and a 2-way group weighting
  ``softmax(W_h x)``, all zero-initialised.

Gates: ``hard`` gates are 1 for an active head with a straight-through gradient (value 1, gradient of the
soft gate), so the converted model starts with the teacher's output distribution; ``soft`` gates are the
paper's weighted sum ``alpha_1 softmax(W_s x)_i`` / ``alpha_2 softmax(W_r x)_i``, scaled by 2 x (heads in the
group) so that the zero-initialised router gives every head the gate 1 (the constant is what a from-scratch
model folds into W_O). Soft gates need the learned router: qnorm has no parameters to learn gate values.
Either way, with every head active the initialised layer computes exactly the teacher's attention.

Head choices depend only on the token's own hidden state and have no noise, so they are deterministic and
prefill, decode and a full forward agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moh_ops import dense_attention, masked_dense_moh, moh_output, rotate, sparse_moh


# Below this many new tokens (decode steps) all heads are computed and masked: a step is bound by reading the KV
# cache, which every KV head's active query heads need anyway, and per-head gathering costs more than it saves.
SPARSE_FROM_TOKENS = 16


def _standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, unbiased=False, keepdim=True) + eps)


class MohAttention(nn.Module):
    target = "moh"

    def __init__(self, teacher: nn.Module, *, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 hidden_size: int, shared_heads: int, top_k: int, router: str = "qnorm", gate: str = "hard",
                 balance_weight: float = 0.01, teacher_window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.shared, self.top_k = shared_heads, top_k
        self.routed = num_heads - shared_heads
        self.router, self.gate, self.balance_weight = router, gate, balance_weight
        self.scaling = teacher.scaling
        self.window = teacher_window
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = teacher.q_proj, teacher.k_proj, teacher.v_proj, teacher.o_proj
        self.q_norm = getattr(teacher, "q_norm", None)
        self.k_norm = getattr(teacher, "k_norm", None)
        if router == "learned":
            self.routed_router = nn.Linear(hidden_size, self.routed, bias=False)
            self.shared_router = nn.Linear(hidden_size, shared_heads, bias=False)
            self.group_router = nn.Linear(hidden_size, 2, bias=False)
            for linear in (self.routed_router, self.shared_router, self.group_router):
                nn.init.zeros_(linear.weight)
        # "sparse" computes only active heads; "dense" is the masked reference (all heads, then gates).
        self.path = "sparse"
        self.distill: dict | None = None
        # Set by the last forward: the load-balance loss (when grad is on) and the fraction of tokens per routed head.
        self.balance_loss: torch.Tensor | None = None
        self.head_usage: torch.Tensor | None = None

    @classmethod
    def from_teacher(cls, teacher: nn.Module, config, layer_idx: int, **options) -> "MohAttention":
        if getattr(teacher, "attn_logit_softcapping", None):
            raise ValueError(f"layer {layer_idx}: attention logit soft-capping is not supported by the moh target")
        if not getattr(teacher, "is_causal", True):
            raise ValueError(f"layer {layer_idx}: bidirectional attention is not supported by the moh target")
        heads = config.num_attention_heads
        shared = options.pop("shared_heads")
        top_k = options.pop("top_k")
        shared = heads // 2 if shared is None else shared
        if shared > heads:
            raise ValueError(f"layer {layer_idx}: options.shared_heads={shared} exceeds the layer's {heads} heads; "
                             f"set shared_heads to at most {heads}")
        routed = heads - shared
        top_k = (routed + 1) // 2 if top_k is None else top_k
        if top_k > routed:
            raise ValueError(f"layer {layer_idx}: options.top_k={top_k} exceeds the {routed} routed heads "
                             f"({heads} heads - shared_heads {shared}); set top_k to at most {routed} or lower shared_heads")
        if routed and top_k == 0:
            raise ValueError(f"layer {layer_idx}: options.top_k=0 with {routed} routed heads leaves them unused; "
                             f"set top_k >= 1 or shared_heads={heads}")
        teacher_window = getattr(teacher, "sliding_window", getattr(config, "sliding_window", None))
        return cls(teacher, layer_idx=layer_idx, num_heads=heads, num_kv_heads=config.num_key_value_heads,
                   head_dim=teacher.head_dim, hidden_size=config.hidden_size, shared_heads=shared, top_k=top_k,
                   teacher_window=teacher_window, **options)

    def feature_parameters(self):
        """What the router warm-up (attention transfer) trains: the learned router; qnorm has none."""
        if self.router != "learned":
            return []
        return [*self.routed_router.parameters(), *self.shared_router.parameters(), *self.group_router.parameters()]

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The weighted load-balance loss of the last forward (None when it ran without grad)."""
        return None if self.balance_loss is None else self.balance_weight * self.balance_loss

    def route(self, hidden_states: torch.Tensor, q_raw: torch.Tensor):
        """Per token: gates (B, T, H) (0 for unselected heads) and the routed-head selection (B, T, R) bool.

        Also records the load-balance loss sum_i f_i P_i (f_i: fraction of tokens selecting routed head i,
        P_i: mean routing probability) and the head usage f.
        """
        B, T = hidden_states.shape[:2]
        one = torch.ones(B, T, 1, dtype=torch.float32, device=hidden_states.device)
        learned = self.router == "learned"
        if learned and self.shared and self.routed:
            alpha = 2 * torch.softmax(self.group_router(hidden_states).float(), dim=-1)
        else:
            alpha = one.expand(B, T, 2)
        if self.shared:
            if learned:
                p_shared = alpha[..., :1] * self.shared * torch.softmax(self.shared_router(hidden_states).float(), -1)
            else:
                p_shared = one.expand(B, T, self.shared)
        if self.routed:
            prior = _standardise(q_raw[:, :, self.shared:].float().norm(dim=-1))
            learned_logits = self.routed_router(hidden_states).float() if learned else None
            logits = prior if learned_logits is None else prior + learned_logits
            probs = torch.softmax(logits, dim=-1)
            index = logits.topk(self.top_k, dim=-1).indices
            selected = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, index, True)
            # Gate values come from the learned logits alone (uniform at init -> exactly 1); qnorm's from its scores.
            p_routed = alpha[..., 1:] * self.routed * (probs if learned_logits is None else torch.softmax(learned_logits, -1))
            usage = selected.float().mean(dim=(0, 1))
            self.head_usage = usage.detach()
            self.balance_loss = (usage * probs.mean(dim=(0, 1))).sum() if torch.is_grad_enabled() else None
        else:
            selected = torch.zeros(B, T, 0, dtype=torch.bool, device=hidden_states.device)
            self.head_usage, self.balance_loss = None, None
        soft = torch.cat(([p_shared] if self.shared else []) + ([p_routed] if self.routed else []), dim=-1)
        active = torch.cat([torch.ones(B, T, self.shared, dtype=torch.bool, device=selected.device), selected], dim=-1)
        if self.gate == "hard":
            # (soft - soft) is exactly 0, so the forward value is exactly 1; the gradient is the soft gate's.
            soft = (soft - soft.detach()) + 1.0
        return soft * active, selected

    def _project(self, hidden_states, position_embeddings):
        """q_raw (B, T, H, d) for routing; heads-first q (normed, *not yet rotated*: the sparse path rotates only
        the rows it computes), k (rotated, as cached) and v."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q_raw = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q = q_raw
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        return q_raw, q.transpose(1, 2), rotate(k.transpose(1, 2), cos[:, None], sin[:, None]), v

    def attend(self, q, k, v, gates, selected, attention_mask=None, rope=None) -> torch.Tensor:
        """Gated multi-head output after o_proj, (B, T, D), by ``self.path`` (short steps always masked-dense).

        ``rope``: ``(cos, sin)`` when ``q`` is not yet rotated (as ``_project`` returns it).
        """
        B, H, T, d = q.shape
        if self.path == "dense" or T < SPARSE_FROM_TOKENS:
            if rope is not None:
                q = rotate(q, rope[0][:, None], rope[1][:, None])
            heads = masked_dense_moh(q, k, v, gates, scale=self.scaling, window=self.window, attention_mask=attention_mask)
            return self.o_proj(heads.reshape(B, T, H * d))
        shared_out, routed = sparse_moh(q, k, v, selected, shared=self.shared, scale=self.scaling,
                                        window=self.window, attention_mask=attention_mask, rope=rope)
        if self.gate == "hard" and not (torch.is_grad_enabled() and gates.requires_grad):
            gates = None  # every active gate is exactly 1 and no gradient is wanted
        return moh_output(shared_out, routed, gates, self.o_proj, shape=(B, T, H), head_dim=d)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        q_raw, q, k, v = self._project(hidden_states, position_embeddings)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if self.distill is not None:
            return self._distill_forward(hidden_states, q_raw, q, k, v, attention_mask, position_embeddings), None
        gates, selected = self.route(hidden_states, q_raw)
        return self.attend(q, k, v, gates.to(q.dtype), selected, attention_mask, rope=position_embeddings), None

    def _distill_forward(self, hidden_states, q_raw, q, k, v, attention_mask, rope):
        """Router warm-up: match the teacher's layer output (all heads); pass the teacher's output on."""
        B, H, T, d = q.shape
        q, k, v, q_raw = q.detach(), k.detach(), v.detach(), q_raw.detach()
        with torch.no_grad():
            rotated = rotate(q, rope[0][:, None], rope[1][:, None])
            target = self.o_proj(dense_attention(rotated, k, v, scale=self.scaling, window=self.window,
                                                 attention_mask=attention_mask).transpose(1, 2).reshape(B, T, H * d))
        if self.distill.get("compute_loss", True):
            gates, selected = self.route(hidden_states.detach(), q_raw)
            student = self.attend(q, k, v, gates.to(q.dtype), selected, attention_mask, rope=rope)
            self.distill["losses"] = {"mse": F.mse_loss(student.float(), target.float())}
        return target
