"""``validate`` and ``plan``: check a recipe against the model's config and show what conversion will do,
on the meta device (no weights are loaded)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .convert.rules import TARGET_OPTIONS, resolve_plan
from .models.adapters import converted_classes, layer_shapes
from .models.loading import resolve_model_dir
from .recipe import Recipe, RecipeError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_config(recipe: Recipe):
    try:
        return AutoConfig.from_pretrained(resolve_model_dir(recipe.model))
    except OSError as err:
        raise RecipeError(f"model: cannot read the config of {recipe.model!r}: {err}") from None


def checked_plan(recipe: Recipe, config) -> list[dict]:
    try:
        converted_classes(config)
        plan = resolve_plan(recipe.convert.rules, config.num_hidden_layers)
        # Targets whose options depend on the layer's shape (e.g. an MLA rank) check it here, before any weights.
        for idx, (entry, shape) in enumerate(zip(plan, layer_shapes(config))):
            schema = TARGET_OPTIONS.get(entry["target"])
            if hasattr(schema, "check_layer"):
                schema(**{k: v for k, v in entry.items() if k != "target"}).check_layer(shape, idx)
        return plan
    except ValueError as err:
        raise RecipeError(str(err)) from None


def validate(recipe: Recipe) -> str:
    config = model_config(recipe)
    plan = checked_plan(recipe, config)
    converted = sum(e["target"] != "keep" for e in plan)
    return (f"recipe OK: {config.model_type} with {config.num_hidden_layers} layers, "
            f"{converted} converted; output_dir {recipe.output_dir}")


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan_table(recipe: Recipe) -> str:
    config = model_config(recipe)
    plan = checked_plan(recipe, config)
    config_cls, model_cls = converted_classes(config)
    base = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(config)
        student = model_cls(config_cls(**base, attention_plan=plan))
    dtype_bytes = DTYPE_BYTES[recipe.dtype]
    rows = ["| layer | target | options | trainable (transfer) | param delta | KV bytes/token before | after | fixed state bytes |",
            "|---|---|---|---|---|---|---|---|"]
    totals = [0, 0, 0, 0, 0]
    for idx, (entry, shape) in enumerate(zip(plan, layer_shapes(config))):
        before = shape.kv_bytes_per_token(dtype_bytes)
        t_attn, s_attn = teacher.model.layers[idx].self_attn, student.model.layers[idx].self_attn
        delta = _count(s_attn) - _count(t_attn)
        if entry["target"] == "keep":
            trainable, after, fixed, options = 0, before, 0, ""
        else:
            opts = TARGET_OPTIONS[entry["target"]](**{k: v for k, v in entry.items() if k != "target"})
            trainable = sum(p.numel() for p in s_attn.feature_parameters()) if getattr(opts, "supports_transfer", True) else 0
            fixed, after = opts.state_bytes(shape, dtype_bytes)
            options = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "target")
        for i, value in enumerate((trainable, delta, before, after, fixed)):
            totals[i] += value
        rows.append(f"| {idx} | {entry['target']} | {options} | {trainable:,} | {delta:+,} | {before:,} | {after:,} | {fixed:,} |")
    rows.append(f"| all | | | {totals[0]:,} | {totals[1]:+,} | {totals[2]:,} | {totals[3]:,} | {totals[4]:,} |")
    return "\n".join(rows) + (
        "\n\nKV bytes/token: cache that grows with every token. Fixed state: per sequence, independent of length "
        "(linear state in float32 + the softmax window and sink tokens). Trainable (transfer): parameters attention "
        "transfer trains; 0 for targets without a transfer stage (mla: recovery trains the new projections)."
    )
