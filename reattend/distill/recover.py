"""Stage 2, recovery: LoRA (peft) on the attention projections, next-token and/or KL-to-teacher loss."""

from __future__ import annotations

from typing import Literal

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..convert import student_attention_modules
from .head_usage_plot import write_head_usage_plot
from .loop import LrSchedule, train
from .losses import kl_to_teacher, next_token_loss
from .transfer import trainable_feature_parameters


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                               description="module-name suffixes or a regex, as peft's target_modules")


class RecoverConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    method: Literal["lora", "attention"] = Field(
        "lora", description="lora: LoRA on lora.targets; attention: full fine-tuning of every converted attention layer")
    tokens: int = Field(2_000_000, ge=0)
    batch_size: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: LrSchedule = Field("constant", description="constant, or cosine decay to 0 after the warm-up")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from 0 to lr")
    lora: LoraOptions = Field(default_factory=LoraOptions)
    ce_weight: float = Field(1.0, ge=0)
    kl_weight: float = Field(0.0, ge=0, description="KL(teacher || student) on logits; keeps general behaviour")
    kl_temperature: float = Field(1.0, gt=0)
    train_feature_maps: bool = False
    max_grad_norm: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=0)

    @model_validator(mode="after")
    def _some_loss(self):
        if self.ce_weight == 0 and self.kl_weight == 0:
            raise ValueError("recover: ce_weight and kl_weight are both 0; set at least one above 0")
        return self


def lora_config(cfg: RecoverConfig) -> LoraConfig:
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.targets, bias="none")


def run_recover(stage, *, accelerator, student, teacher, train_blocks, cfg: RecoverConfig, seed: int):
    """Train LoRA (and optionally the feature maps); returns (result, adapter tensors, feature tensors, merged model)."""
    for p in student.parameters():
        p.requires_grad_(False)
    features = trainable_feature_parameters(student) if cfg.train_feature_maps else {}
    if cfg.method == "attention":
        ids = {id(p) for _, module in student_attention_modules(student) for p in module.parameters()}
        features = {name: p for name, p in student.named_parameters() if id(p) in ids}
    peft_model = student if cfg.method == "attention" else get_peft_model(student, lora_config(cfg))
    for p in features.values():
        p.requires_grad_(True)
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    use_teacher = cfg.kl_weight > 0
    # Targets with an auxiliary loss (moh's load balance, already weighted by its option) expose it after a forward.
    aux_modules = [(i, m) for i, m in student_attention_modules(student) if hasattr(m, "auxiliary_loss")]
    # Targets with a schedule over recovery (mla phases its latent norms in) are told how far training has got.
    scheduled = [m for _, m in student_attention_modules(student) if hasattr(m, "set_training_progress")]

    def on_step(step, total_steps):
        for module in scheduled:
            module.set_training_progress(step / total_steps)

    def step_loss(batch):
        logits = peft_model(input_ids=batch, use_cache=False).logits
        record, loss = {}, 0.0
        if cfg.ce_weight > 0:
            ce = next_token_loss(logits, batch)
            record["ce"] = ce.item()
            loss = loss + cfg.ce_weight * ce
        if use_teacher:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch, use_cache=False).logits
            kl = kl_to_teacher(logits, teacher_logits, cfg.kl_temperature)
            record["kl"] = kl.item()
            loss = loss + cfg.kl_weight * kl
        for layer_idx, module in aux_modules:
            aux = module.auxiliary_loss()
            if aux is not None:
                record[f"aux/layer{layer_idx}"] = round(aux.item(), 6)
                loss = loss + aux
            if getattr(module, "head_usage", None) is not None:
                record[f"head_usage/layer{layer_idx}"] = [round(u, 4) for u in module.head_usage.tolist()]
        return loss, record

    result = train(stage, accelerator=accelerator, model=peft_model, params=params, step_loss=step_loss,
                   blocks=train_blocks, tokens=cfg.tokens, batch_size=cfg.batch_size, lr=cfg.lr,
                   weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=seed,
                   log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, on_step=on_step,
                   lr_schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps)
    for module in scheduled:
        module.set_training_progress(1.0)
    if stage.is_main:
        # MoH layers logged their routing; a picture of it beside the metrics (nothing for other targets).
        write_head_usage_plot(stage.path)
    peft_model = accelerator.unwrap_model(peft_model)
    feature_tensors = {name: p.detach().clone() for name, p in features.items()}
    if cfg.method == "attention":
        return result, {}, feature_tensors, _frozen(peft_model)
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return result, adapter, feature_tensors, _frozen(peft_model.merge_and_unload())


def _frozen(model):
    """The trained model, frozen and in eval mode, for the stage's closing perplexity."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def apply_adapter(student, cfg: RecoverConfig, adapter: dict[str, torch.Tensor]):
    """Re-apply a saved LoRA adapter to a fresh student and merge it (used when resuming later stages)."""
    peft_model = get_peft_model(student, lora_config(cfg))
    set_peft_model_state_dict(peft_model, adapter)
    return peft_model.merge_and_unload().eval()
