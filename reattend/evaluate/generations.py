"""Greedy completions of a few prompts by student and teacher, for a side-by-side read."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import GenerationsConfig
from .quality import model_device


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


@torch.no_grad()
def greedy_generate(model, ids: torch.Tensor, max_new_tokens: int, pad_token_id: int, **kwargs):
    """``generate()`` without sampling on one unpadded prompt (``ids`` on the model's device)."""
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        **kwargs,
    )


def complete(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model_device(model))
    out = greedy_generate(model, ids, max_new_tokens, pad_id_of(tokenizer))
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def side_by_side(student, teacher, tokenizer, cfg: GenerationsConfig, *, progress: bool) -> list[dict]:
    return [
        {
            "prompt": prompt,
            "teacher": complete(teacher, tokenizer, prompt, cfg.max_new_tokens),
            "student": complete(student, tokenizer, prompt, cfg.max_new_tokens),
        }
        for prompt in tqdm(cfg.prompts, desc="generations", disable=not progress)
    ]
