"""Turn a teacher model into a student: same weights, attention layers swapped per the plan."""

from __future__ import annotations

import torch

from ..models.adapters import converted_classes


def convert_model(teacher, plan: list[dict], *, calibration: torch.Tensor | None = None, initialise: bool = True):
    """Build the converted model for ``teacher`` (left untouched) with the per-layer ``plan``.

    A target whose options class has ``initialise(student, teacher, layer_indices, plan, calibration)`` sets its
    layers from the teacher and ``calibration`` (training token blocks); ``initialise=False`` builds only the
    skeleton, for loading a stage's saved tensors. A module may name teacher submodules it folds away in
    ``replaced_teacher_modules``; their weights may go unused. A target's ``config_changes(entries)`` may change
    the student's config (mla's identity-mode latent norms set ``rms_norm_eps``)."""
    from .rules import TARGET_OPTIONS

    config_cls, model_cls = converted_classes(teacher.config)
    base = teacher.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        base.pop(key, None)
    for target in dict.fromkeys(entry["target"] for entry in plan):
        changes = getattr(TARGET_OPTIONS.get(target), "config_changes", None)
        if changes is not None:
            base.update(changes([entry for entry in plan if entry["target"] == target]))
    config = config_cls(**base, attention_plan=plan)
    config.architectures = [model_cls.__name__]
    student = model_cls(config).to(next(teacher.parameters()).device)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    new = set(student_only_names(student, teacher))
    replaced = tuple(f"model.layers.{i}.self_attn.{name}." for i, module in student_attention_modules(student)
                     for name in getattr(module, "replaced_teacher_modules", ()))
    unexpected = [key for key in unexpected if not key.startswith(replaced)]
    if unexpected or set(missing) - new:
        raise RuntimeError(f"conversion lost teacher weights: missing={sorted(set(missing) - new)} unexpected={unexpected}")
    student.to(next(teacher.parameters()).dtype)
    if teacher.config.tie_word_embeddings:
        student.tie_weights()
    student.eval()
    for target in dict.fromkeys(entry["target"] for entry in plan):
        hook = getattr(TARGET_OPTIONS.get(target), "initialise", None)
        if initialise and hook is not None:
            hook(student, teacher, [i for i, e in enumerate(plan) if e["target"] == target], plan, calibration)
    return student


def student_only_names(student, teacher) -> list[str]:
    teacher_keys = set(teacher.state_dict())
    return [name for name in student.state_dict() if name not in teacher_keys]


def changed_tensors(student, teacher) -> dict[str, torch.Tensor]:
    """The student's tensors that are new or differ from the teacher's: all a stage needs to save to rebuild it."""
    teacher_state = teacher.state_dict()
    changed = {}
    for name, tensor in student.state_dict().items():
        old = teacher_state.get(name)
        if old is None or old.shape != tensor.shape or not torch.equal(old.to(tensor.dtype), tensor):
            changed[name] = tensor.detach().clone()
    return changed


def student_attention_modules(model):
    """(layer index, module) of every converted attention layer."""
    from ..modeling.modeling_reattend import ATTENTION_TARGETS

    targets = tuple(ATTENTION_TARGETS.values())
    return [(i, layer.self_attn) for i, layer in enumerate(model.model.layers) if isinstance(layer.self_attn, targets)]
