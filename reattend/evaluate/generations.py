"""Greedy completions of a few prompts by student and teacher, for a side-by-side read."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import GenerationsConfig
from .quality import model_device


@torch.no_grad()
def complete(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    encoded = tokenizer(prompt, return_tensors="pt")
    ids = encoded["input_ids"].to(model_device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
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
