"""The training loop both distillation stages share: Accelerate, clipping, checkpoints, resume, NaN stop."""

from __future__ import annotations

import math
import resource
import time
from typing import Callable, Literal

import torch
from tqdm.auto import tqdm

from ..data import iterate_batches
from ..pipeline import NonFiniteLossError, StageDir

LrSchedule = Literal["constant", "cosine"]


def learning_rate(peak: float, step: int, total_steps: int, schedule: LrSchedule, warmup_steps: int) -> float:
    """The rate for 0-based ``step``: linear warm-up over ``warmup_steps``, then constant or cosine decay to 0.
    A function of the step alone, so a resumed run continues the same curve without scheduler state."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(
    stage: StageDir,
    *,
    accelerator,
    model,
    params: dict[str, torch.nn.Parameter],
    step_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict]],
    blocks: torch.Tensor,
    tokens: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_grad_norm: float,
    seed: int,
    log_every: int,
    checkpoint_every: int,
    on_step: Callable[[int, int], None] | None = None,
    lr_schedule: LrSchedule = "constant",
    warmup_steps: int = 0,
) -> dict:
    """Train ``params`` on ``tokens`` tokens of ``blocks``; ``step_loss(batch)`` returns (loss, scalars to log).

    ``step_loss`` may raise ``NonFiniteLossError`` itself (naming a layer); a non-finite total loss is caught here.
    Either way the last checkpoint on disk is the last good one. ``on_step(step, total_steps)`` runs before each
    step's forward (schedules that depend on training progress; a resumed run calls it from its resumed step).
    The learning rate follows ``learning_rate(lr, step, total_steps, lr_schedule, warmup_steps)``.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    start_step = resume_from_checkpoint(stage, params, optimizer, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    global_batch = batch_size * world
    total_steps = max(1, tokens // (global_batch * blocks.shape[1]))
    seen_tokens, last_record, started = start_step * global_batch * blocks.shape[1], {}, time.time()
    bar = tqdm(total=total_steps, initial=start_step, desc=stage.name, disable=not accelerator.is_main_process)
    step = start_step
    for step, batch in iterate_batches(blocks, global_batch, tokens, seed=seed, start_step=start_step):
        local = batch[rank * batch_size : (rank + 1) * batch_size].to(accelerator.device)
        if on_step is not None:
            on_step(step, total_steps)
        step_lr = learning_rate(lr, step, total_steps, lr_schedule, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        try:
            loss, record = step_loss(local)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"[{stage.name}] loss became {loss.item()}")
        except NonFiniteLossError as err:
            raise NonFiniteLossError(
                f"{err} at step {step}. Training stopped; the last good checkpoint is kept in {stage.path / 'checkpoint'}. "
                "Lower the learning rate or check the data, then re-run to resume."
            ) from None
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(list(params.values()), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen_tokens += global_batch * blocks.shape[1]
        done_steps = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4g}")
        if done_steps % log_every == 0 or done_steps == total_steps:
            last_record = {"step": done_steps, "tokens": seen_tokens, "loss": loss.item(),
                           "grad_norm": float(grad_norm), "lr": step_lr, **record}
            stage.log(last_record)
        if checkpoint_every and done_steps % checkpoint_every == 0:
            accelerator.wait_for_everyone()
            stage.save_checkpoint({k: v for k, v in params.items()}, optimizer, done_steps)
    bar.close()
    elapsed = time.time() - started
    trained = seen_tokens - start_step * global_batch * blocks.shape[1]
    return {
        "tokens": seen_tokens,
        "steps": step + 1 if total_steps else 0,
        "final_loss": last_record.get("loss", math.nan),
        "tokens_per_s": round(trained / elapsed, 1) if elapsed > 0 else None,
        "peak_memory_mb": peak_memory_mb(accelerator.device),
    }


def resume_from_checkpoint(stage: StageDir, params: dict[str, torch.nn.Parameter], optimizer, accelerator) -> int:
    """Load the stage's last checkpoint, if any, into ``params`` and ``optimizer``; the step to resume from."""
    resumed = stage.load_checkpoint()
    if resumed is None:
        return 0
    tensors, optimizer_state, state = resumed
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    optimizer.load_state_dict(optimizer_state)
    accelerator.print(f"[{stage.name}] resuming from step {state['step']}")
    return state["step"]


def peak_memory_mb(device) -> float:
    """Peak GPU memory on CUDA, else the process's peak resident set size (Linux reports KiB)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
