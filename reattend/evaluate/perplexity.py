"""Perplexity of a causal LM on packed token blocks."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, *, batch_size: int = 1, progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean next-token loss) over every predicted token of ``blocks`` (LongTensor[N, L])."""
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, disable=not progress, leave=False):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_loss / max(total_tokens, 1))
