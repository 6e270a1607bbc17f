"""Per-layer attention fidelity: each student attention module on exactly the teacher's inputs.

A hook on every teacher attention module receives the arguments the teacher's decoder layer passed it
(hidden states, rotary embeddings, mask, ...) and its output; the hook runs the student's module of the same
layer on those arguments, without a cache, and accumulates the error. Layers are therefore judged
independently: an error in layer 3 does not leak into the inputs of layer 4.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import FidelityConfig
from .quality import make_blocks, model_device


def attention_modules(model) -> list:
    return [layer.self_attn for layer in model.model.layers]


@torch.no_grad()
def attention_fidelity(student, teacher, stream: torch.Tensor, cfg: FidelityConfig, *, progress: bool) -> dict:
    """{"relative_mse": [per layer ||s - t||^2 / ||t||^2 summed over blocks], "tokens": n}."""
    teacher_attn, student_attn = attention_modules(teacher), attention_modules(student)
    if len(teacher_attn) != len(student_attn):
        raise ValueError(f"student has {len(student_attn)} layers, teacher {len(teacher_attn)}: fidelity compares layer by layer")
    blocks = make_blocks(stream, cfg.context_length, cfg.num_blocks * cfg.context_length)
    if blocks is None:
        raise ValueError(f"fidelity needs a text of at least {cfg.context_length} tokens")
    error = [0.0] * len(teacher_attn)
    energy = [0.0] * len(teacher_attn)
    student_device = model_device(student)

    def make_hook(idx: int):
        def hook(module, args, kwargs, output):
            args = _to(args, student_device)
            kwargs = {k: _to(v, student_device) for k, v in kwargs.items()}
            kwargs.update(past_key_values=None, use_cache=False)
            target = output[0].float()
            got = student_attn[idx](*args, **kwargs)[0].float().to(target.device)
            error[idx] += (got - target).pow(2).sum().item()
            energy[idx] += target.pow(2).sum().item()

        return hook

    handles = [m.register_forward_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(teacher_attn)]
    try:
        for block in tqdm(blocks, desc="fidelity", disable=not progress):
            teacher(input_ids=block.unsqueeze(0).to(model_device(teacher)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {"relative_mse": [e / max(t, 1e-30) for e, t in zip(error, energy)], "tokens": int(blocks.numel())}


def _to(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value
