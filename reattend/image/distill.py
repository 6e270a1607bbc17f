"""CLEAR distillation: train only the converted attention (q/k/v/out projections, pooling weights) of the student
so it matches the frozen teacher on the teacher's own inputs.

loss = output_loss_weight * MSE(student prediction, teacher prediction)
     + attention_loss_weight * mean over chosen attention modules of MSE(student module output, teacher's)
     + task_loss_weight * diffusion loss against the sample's clean latent
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..distill.loop import peak_memory_mb, resume_from_checkpoint
from ..pipeline import NonFiniteLossError, StageDir
from .attention import trainable_attention_parameters
from .samples import FLOW_FAMILIES, SampleError, SampleStore


def select_attention_layers(names: list[str], spec) -> list[str]:
    """The converted modules the attention loss compares: every k-th (int), listed indices, or all."""
    if spec == "all":
        return list(names)
    if isinstance(spec, int):
        return names[::spec]
    bad = [i for i in spec if not -len(names) <= i < len(names)]
    if bad:
        raise ValueError(f"distill.attention_layers: indices {bad} are out of range; the model has {len(names)} "
                         f"converted attention modules (0..{len(names) - 1})")
    return [names[i] for i in spec]


@contextmanager
def capture_outputs(model, names: list[str]):
    """Record the output tensors of the named modules during the forwards inside the block."""
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {}

    def hook_for(name):
        def hook(module, args, output):
            items = output if isinstance(output, (tuple, list)) else (output,)
            captured[name] = [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def prediction(output) -> torch.Tensor:
    """The tensor a model's users consume: a diffusion transformer's ``sample``, a ViT's logits or last hidden state."""
    for key in ("sample", "logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    return output[0]


def task_loss(family: str, pred: torch.Tensor, kwargs: dict, extras: dict) -> torch.Tensor:
    """Diffusion loss with the target implied by the trajectory point and its clean latent ``reattend.x0``:
    rectified flow (sd3, flux) predicts noise - x0 = (x_t - x0) / sigma; dit/pixart predict the noise
    (x_t - sqrt(a) x0) / sqrt(1 - a), a = alpha_bar, in the first C output channels (the rest is learned variance)."""
    if family == "vit" or "reattend.x0" not in extras:
        raise SampleError("distill.task_loss_weight > 0 needs samples carrying a clean latent (reattend.x0): "
                          "diffusion models with source=pipeline (output_type latent) or synthetic; set it to 0 here")
    x_t, x0 = kwargs["hidden_states"].float(), extras["reattend.x0"].float()
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    if family in FLOW_FAMILIES:
        sigma = kwargs["timestep"].float() / (1000.0 if family == "sd3" else 1.0)
        target = (x_t - x0) / sigma.clamp_min(1e-3).view(shape)
    else:
        if "reattend.alpha_bar" not in extras:
            raise SampleError(f"the {family} task loss needs reattend.alpha_bar in each sample (its noise level)")
        a = extras["reattend.alpha_bar"].float().view(shape)
        target = (x_t - a.sqrt() * x0) / (1 - a).clamp_min(1e-6).sqrt()
    return F.mse_loss(pred[:, : target.shape[1]].float(), target)


def freeze_for_distillation(student) -> dict[str, torch.nn.Parameter]:
    for p in student.parameters():
        p.requires_grad_(False)
    params = trainable_attention_parameters(student)
    if not params:
        raise ValueError("the student has no trainable attention parameters: was it converted (convert stage)?")
    for p in params.values():
        p.requires_grad_(True)
    return params


def batch_indices(step: int, global_batch: int, count: int, seed: int) -> list[int]:
    """Indices of ``step``'s batch: epochs of seeded permutations, so a resumed run sees the same order."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out += order[offset: offset + global_batch - len(out)].tolist()
    return out


def run_distill(stage: StageDir, *, accelerator, student, teacher, family: str, converted: list[str],
                store: SampleStore, train_count: int, cfg, seed: int) -> tuple[dict, dict[str, torch.nn.Parameter]]:
    """Train the student's attention for ``cfg.steps`` steps. A non-finite loss stops with the module and step
    named; the last checkpoint on disk is the last good one, and re-running resumes from it."""
    world, rank = accelerator.num_processes, accelerator.process_index
    layers = select_attention_layers(converted, cfg.attention_layers) if cfg.attention_loss_weight > 0 else []
    params = freeze_for_distillation(student)
    dtype = next(iter(params.values())).dtype
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step = resume_from_checkpoint(stage, params, optimizer, accelerator)
    teacher.to(accelerator.device).eval()
    model, optimizer = accelerator.prepare(student, optimizer)
    model.train()
    global_batch = cfg.batch_size * world
    bar = tqdm(total=cfg.steps, initial=start_step, desc=stage.name, disable=not accelerator.is_main_process)
    last_record, started = {}, time.time()
    try:
        for step in range(start_step, cfg.steps):
            indices = batch_indices(step, global_batch, train_count, seed)
            indices = indices[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            kwargs, extras = store.batch(indices, device=accelerator.device, dtype=dtype)
            with torch.no_grad(), capture_outputs(teacher, layers) as teacher_attn:
                teacher_pred = prediction(teacher(**kwargs))
            with capture_outputs(student, layers) as student_attn:
                student_pred = prediction(model(**kwargs))
            record, loss = {}, student_pred.new_zeros((), dtype=torch.float32)
            if cfg.output_loss_weight > 0:
                out_mse = F.mse_loss(student_pred.float(), teacher_pred.float())
                record["output_mse"] = out_mse.item()
                loss = loss + cfg.output_loss_weight * out_mse
            if layers:
                per_layer = []
                for name in layers:
                    mse = sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student_attn[name], teacher_attn[name]))
                    if not torch.isfinite(mse):
                        _stop(stage, f"attention module {name} loss became {mse.item()}", step)
                    per_layer.append(mse)
                attn_mse = torch.stack(per_layer).mean()
                record["attention_mse"] = attn_mse.item()
                loss = loss + cfg.attention_loss_weight * attn_mse
            if cfg.task_loss_weight > 0:
                task = task_loss(family, student_pred, kwargs, extras)
                record["task"] = task.item()
                loss = loss + cfg.task_loss_weight * task
            if not torch.isfinite(loss):
                _stop(stage, f"loss became {loss.item()} ({', '.join(f'{k}={v:.4g}' for k, v in record.items())})", step)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4g}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                last_record = {"step": done, "loss": loss.item(), **record, "grad_norm": float(grad_norm), "lr": cfg.lr}
                stage.log(last_record)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                accelerator.wait_for_everyone()
                stage.save_checkpoint(dict(params), optimizer, done)
    finally:
        bar.close()
        for p in student.parameters():
            p.requires_grad_(False)
        student.eval()
    elapsed = time.time() - started
    trained = cfg.steps - start_step
    return {
        "steps": cfg.steps,
        "samples_seen": cfg.steps * global_batch,
        "final_loss": last_record.get("loss", math.nan),
        "attention_layers": layers,
        "steps_per_s": round(trained / elapsed, 3) if elapsed > 0 and trained else None,
        "peak_memory_mb": peak_memory_mb(accelerator.device),
    }, params


def _stop(stage: StageDir, what: str, step: int):
    raise NonFiniteLossError(
        f"[{stage.name}] {what} at step {step}. Training stopped; the last good checkpoint is kept in "
        f"{stage.path / 'checkpoint'}. Lower distill.lr or check the samples, then re-run to resume.")

