"""Choose between fused Triton kernels and the plain-PyTorch reference for linear/hybrid attention.

``backend`` (argument) or the ``REATTEND_KERNELS`` environment variable: ``auto`` (default: Triton for
CUDA tensors when triton imports, the reference otherwise), ``triton`` or ``reference``. ``triton`` on CPU
tensors only works under ``TRITON_INTERPRET=1`` (how CI tests the kernels).

Variable-length batches: pass ``cu_seqlens`` (``N + 1`` cumulative offsets of sequences packed along T with
batch size 1); each sequence attends only to itself and has its own initial/final state ``(N, H, F, d + 1)``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from .linear_attention_ops import (
    chunked_hybrid_attention,
    chunked_linear_attention,
    fold_into_state,
    hybrid_attention_step,
)
from .linear_attention_ops import hedgehog_features as reference_hedgehog_features

BACKENDS = ("auto", "triton", "reference")


def resolve_backend(tensor: torch.Tensor, backend: str | None = None) -> str:
    choice = backend or os.environ.get("REATTEND_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"REATTEND_KERNELS/backend={choice!r} is not one of {BACKENDS}")
    if choice == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "reference"
    return choice


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernels():
    # Imported on first use so that TRITON_INTERPRET, read when the kernels are decorated, can be set first.
    # The `from .module import name` form matters: transformers' remote-code loader copies only sibling files
    # named that way, so an exported checkpoint would otherwise lack the kernels.
    from .linear_attention_triton import (
        triton_hedgehog_features,
        triton_hybrid_attention,
        triton_hybrid_decode_step,
        triton_linear_attention,
    )

    return SimpleNamespace(
        triton_hedgehog_features=triton_hedgehog_features,
        triton_hybrid_attention=triton_hybrid_attention,
        triton_hybrid_decode_step=triton_hybrid_decode_step,
        triton_linear_attention=triton_linear_attention,
    )


def _segments(cu_seqlens: torch.Tensor):
    bounds = cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def varlen_linear_attention(q_feat, k_feat, v, cu_seqlens, initial_state=None, output_final_state=False):
    """Reference for packed variable-length batches: the chunked reference on each sequence in turn."""
    outs, finals = [], []
    for n, (a, b) in enumerate(_segments(cu_seqlens)):
        h0 = None if initial_state is None else initial_state[n : n + 1]
        out, final = chunked_linear_attention(
            q_feat[:, :, a:b], k_feat[:, :, a:b], v[:, :, a:b], initial_state=h0, output_final_state=output_final_state
        )
        outs.append(out)
        finals.append(final)
    return torch.cat(outs, dim=2), torch.cat(finals, dim=0) if output_final_state else None


def varlen_hybrid_attention(q, k, v, q_feat, k_feat, gamma, cu_seqlens, **kwargs):
    """Reference for packed variable-length batches: the chunked hybrid reference on each sequence in turn."""
    outs = [
        chunked_hybrid_attention(*(x[:, :, a:b] for x in (q, k, v, q_feat, k_feat)), gamma, **kwargs)
        for a, b in _segments(cu_seqlens)
    ]
    return torch.cat(outs, dim=2)


def linear_attention(q_feat, k_feat, v, initial_state=None, output_final_state=False, *, backend=None, cu_seqlens=None):
    """Causal linear attention; returns ``(output, final_state or None)``."""
    if resolve_backend(v, backend) == "triton":
        return _kernels().triton_linear_attention(
            q_feat, k_feat, v, initial_state, output_final_state, cu_seqlens=cu_seqlens
        )
    if cu_seqlens is not None:
        return varlen_linear_attention(q_feat, k_feat, v, cu_seqlens, initial_state, output_final_state)
    return chunked_linear_attention(
        q_feat, k_feat, v, initial_state=initial_state, output_final_state=output_final_state
    )


def hybrid_attention(
    q, k, v, q_feat, k_feat, gamma, *, window, sinks=0, scale, affine=False, backend=None, cu_seqlens=None
):
    """Sliding-window softmax + linear attention with one normaliser, over a whole sequence."""
    kwargs = dict(window=window, sinks=sinks, scale=scale, affine=affine)
    if resolve_backend(v, backend) == "triton":
        return _kernels().triton_hybrid_attention(q, k, v, q_feat, k_feat, gamma, cu_seqlens=cu_seqlens, **kwargs)
    if cu_seqlens is not None:
        return varlen_hybrid_attention(q, k, v, q_feat, k_feat, gamma, cu_seqlens, **kwargs)
    return chunked_hybrid_attention(q, k, v, q_feat, k_feat, gamma, **kwargs)


def hybrid_decode_step(
    q, q_feat, k, v, state, gamma, *, scale, affine=False, k_feat_leaving=None, v_leaving=None, backend=None
):
    """Attend one query over softmax keys ``k``/``v`` and ``state``; then fold the keys leaving the window.

    Returns ``(output, new_state)``. The fused decode kernel has no backward, so a call that needs gradients
    (any input requiring grad while grad mode is on) takes the reference path.
    """
    inputs = (q, q_feat, k, v, state, gamma, k_feat_leaving, v_leaving)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    if resolve_backend(v, backend) == "triton" and not needs_grad:
        return _kernels().triton_hybrid_decode_step(
            q, q_feat, k, v, state, gamma, scale=scale, affine=affine,
            k_feat_leaving=k_feat_leaving, v_leaving=v_leaving,
        )
    out = hybrid_attention_step(q, q_feat, k, v, state, gamma, scale=scale, affine=affine)
    if k_feat_leaving is not None and k_feat_leaving.shape[-2] > 0:
        state = fold_into_state(state, k_feat_leaving, v_leaving)
    return out, state


def hedgehog_features(x, weight, bias, *, backend=None):
    """Hedgehog feature map ``[softmax(x W_h + b_h) || softmax(-(x W_h + b_h))]``: (B, H, T, d) -> (B, H, T, 2f)."""
    if resolve_backend(x, backend) == "triton":
        return _kernels().triton_hedgehog_features(x, weight, bias)
    return reference_hedgehog_features(x, weight, bias)
