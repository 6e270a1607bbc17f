"""Stage 1, attention transfer: train only feature maps and gates so each student layer matches its teacher.

Every converted layer sees the teacher's q/k/v and passes the teacher's output on, so layers train
independently in one forward pass (LoLCATs). Loss per layer: MSE between per-head outputs before o_proj
(x ``mse_scale``), plus optionally the Hedgehog cross-entropy between T x T attention weights.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..convert import student_attention_modules
from ..pipeline import NonFiniteLossError
from .loop import LrSchedule, train


class TransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    tokens: int = Field(2_000_000, ge=0, description="training tokens (LoLCATs used ~20M)")
    batch_size: int = Field(1, ge=1, description="sequences per step per process")
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: LrSchedule = Field("constant", description="constant, or cosine decay to 0 after the warm-up")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from 0 to lr")
    mse_scale: float = Field(1000.0, gt=0)
    xent_weight: float = Field(0.0, ge=0, description="Hedgehog attention cross-entropy (quadratic memory)")
    max_grad_norm: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=0, description="steps between resumable checkpoints; 0 = never")


def trainable_feature_parameters(model) -> dict[str, torch.nn.Parameter]:
    ids = {id(p) for _, module in student_attention_modules(model) for p in module.feature_parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


def run_transfer(stage, *, accelerator, student, train_blocks, cfg: TransferConfig, seed: int) -> dict:
    modules = student_attention_modules(student)
    for p in student.parameters():
        p.requires_grad_(False)
    params = trainable_feature_parameters(student)
    if not params:
        targets = sorted({module.target for _, module in modules})
        raise ValueError(f"transfer: the converted layers ({', '.join(targets)}) have nothing for attention transfer to "
                         "train with these options; set transfer.enabled: false")
    for p in params.values():
        p.requires_grad_(True)
    for _, module in modules:
        module.distill = {"xent": cfg.xent_weight > 0}

    def step_loss(batch):
        student(input_ids=batch, use_cache=False, logits_to_keep=1)
        total, per_layer = 0.0, {}
        for layer_idx, module in modules:
            losses = module.distill.pop("losses")
            layer_loss = cfg.mse_scale * losses["mse"]
            if "xent" in losses:
                layer_loss = layer_loss + cfg.xent_weight * losses["xent"]
            if not torch.isfinite(layer_loss):
                raise NonFiniteLossError(f"[transfer] layer {layer_idx} loss became {layer_loss.item()}")
            per_layer[f"mse/layer{layer_idx}"] = round(losses["mse"].item(), 8)
            total = total + layer_loss
        return total / len(modules), per_layer

    try:
        result = train(stage, accelerator=accelerator, model=student, params=params, step_loss=step_loss,
                       blocks=train_blocks, tokens=cfg.tokens, batch_size=cfg.batch_size, lr=cfg.lr,
                       weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=seed,
                       log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                       lr_schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps)
    finally:
        for _, module in modules:
            module.distill = None
        for p in student.parameters():
            p.requires_grad_(False)
        student.eval()
    return result, params
