"""Token-level quality: perplexity over context lengths, and how closely the student tracks the teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import KLAgreementConfig, PerplexityConfig
from .perplexity import perplexity


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def make_blocks(stream: torch.Tensor, length: int, max_tokens: int) -> torch.Tensor | None:
    """Consecutive non-overlapping blocks of ``length`` tokens from the start of ``stream``: as many as
    ``max_tokens`` allows (at least one). None when the stream is shorter than one block."""
    stream = stream.reshape(-1)
    available = len(stream) // length
    if available == 0:
        return None
    count = min(available, max(1, max_tokens // length))
    return stream[: count * length].view(count, length)


def perplexity_sweep(student, teacher, texts: dict[str, torch.Tensor], cfg: PerplexityConfig, *, progress: bool) -> dict:
    """{text: {length: {"teacher": ppl, "student": ppl, "tokens": n}}}; lengths longer than a text are listed
    under "skipped" so the report can say why a point is missing."""
    results: dict = {}
    jobs = [(name, length) for name in texts for length in cfg.context_lengths]
    for name, length in tqdm(jobs, desc="perplexity", disable=not progress):
        blocks = make_blocks(texts[name], length, cfg.max_tokens)
        entry = results.setdefault(name, {"lengths": {}, "skipped": []})
        if blocks is None:
            entry["skipped"].append(length)
            continue
        entry["lengths"][length] = {
            "tokens": int(blocks[:, 1:].numel()),
            "teacher": perplexity(teacher, blocks, batch_size=cfg.batch_size, progress=progress, desc=f"teacher {name}@{length}"),
            "student": perplexity(student, blocks, batch_size=cfg.batch_size, progress=progress, desc=f"student {name}@{length}"),
        }
    return results


@torch.no_grad()
def kl_agreement(student, teacher, texts: dict[str, torch.Tensor], cfg: KLAgreementConfig, *, progress: bool) -> dict:
    """Per text: mean over predicted tokens of KL(teacher || student) in nats, and the fraction of positions
    where both models' most likely next token is the same."""
    results = {}
    for name, stream in texts.items():
        blocks = make_blocks(stream, cfg.context_length, cfg.max_tokens)
        if blocks is None:
            results[name] = {"skipped": f"text shorter than {cfg.context_length} tokens"}
            continue
        kl_sum, agree, count = 0.0, 0, 0
        for block in tqdm(blocks, desc=f"kl/agreement {name}", disable=not progress, leave=False):
            ids = block.unsqueeze(0)
            t_logp = F.log_softmax(teacher(input_ids=ids.to(model_device(teacher)), use_cache=False).logits.float(), -1)
            s_logp = F.log_softmax(student(input_ids=ids.to(model_device(student)), use_cache=False).logits.float(), -1)
            s_logp = s_logp.to(t_logp.device)
            # The last position predicts a token outside the block; score the same positions as perplexity.
            t_logp, s_logp = t_logp[0, :-1], s_logp[0, :-1]
            kl_sum += F.kl_div(s_logp, t_logp, log_target=True, reduction="sum").item()
            agree += (t_logp.argmax(-1) == s_logp.argmax(-1)).sum().item()
            count += t_logp.shape[0]
        results[name] = {"kl": kl_sum / count, "top1_agreement": agree / count, "tokens": count}
    return results
