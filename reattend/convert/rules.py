"""Per-layer targeting: the first rule whose layer selection matches a layer decides its target."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .linear import LinearOptions
from .local import LocalOptions
from .mla import MlaOptions
from .moh import MohOptions

# target name -> options schema (a pydantic model with ``state_bytes(shape, dtype_bytes)``); ``keep`` takes none.
# A new target registers its options here and its attention module in ``modeling_reattend.ATTENTION_TARGETS``.
TARGET_OPTIONS: dict[str, type[BaseModel]] = {"linear": LinearOptions, "local": LocalOptions, "mla": MlaOptions, "moh": MohOptions}
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_layer_selection(selection: Any) -> list[tuple[int, int]]:
    """``all`` | int | ``"a-b"`` (inclusive) | list of those -> list of inclusive (start, end) ranges."""
    items = selection if isinstance(selection, list) else [selection]
    ranges = []
    for item in items:
        if item == "all":
            ranges.append((0, 10**9))
        elif isinstance(item, int) and not isinstance(item, bool):
            if item < 0:
                raise ValueError(f"layers: {item} is negative; layer indices start at 0")
            ranges.append((item, item))
        elif isinstance(item, str) and (m := _RANGE.match(item)):
            start, end = int(m.group(1)), int(m.group(2))
            if start > end:
                raise ValueError(f"layers: range {item!r} runs backwards; write it as '{end}-{start}'")
            ranges.append((start, end))
        elif isinstance(item, str) and item.strip().isdigit():
            ranges.append((int(item), int(item)))
        else:
            raise ValueError(f"layers: {item!r} is not a layer index, an inclusive range like '0-11', or 'all'")
    return ranges


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: int | str | list[int | str] = "all"
    target: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("target")
    @classmethod
    def _target(cls, value):
        if value != "keep" and value not in TARGET_OPTIONS:
            raise ValueError(f"target {value!r} is unknown; choose one of {['keep', *TARGET_OPTIONS]}")
        return value

    @field_validator("layers")
    @classmethod
    def _layers(cls, value):
        parse_layer_selection(value)
        return value

    @model_validator(mode="after")
    def _options(self):
        schema = TARGET_OPTIONS.get(self.target)
        if schema is None:
            if self.options:
                raise ValueError(f"target 'keep' takes no options, got {sorted(self.options)}")
        else:
            try:
                self.options = schema(**self.options).model_dump()
            except ValidationError as err:
                problems = []
                for e in err.errors():
                    where = ".".join(str(p) for p in ("options", *e["loc"]))
                    what = "unknown key for this target" if e["type"] == "extra_forbidden" else e["msg"]
                    problems.append(f"{where}: {what} (got {e.get('input')!r})")
                raise ValueError("; ".join(problems)) from None
        return self

    def matches(self, layer_idx: int) -> bool:
        return any(start <= layer_idx <= end for start, end in parse_layer_selection(self.layers))

    def max_layer(self) -> int:
        return max(end for _, end in parse_layer_selection(self.layers))


def resolve_plan(rules: list[Rule], num_layers: int) -> list[dict]:
    """One ``{"target": ..., **options}`` entry per layer; layers no rule matches are kept."""
    for i, rule in enumerate(rules):
        if rule.max_layer() != 10**9 and rule.max_layer() >= num_layers:
            raise ValueError(
                f"convert.rules[{i}].layers: {rule.layers!r} reaches layer {rule.max_layer()}, "
                f"but the model has {num_layers} layers (0-{num_layers - 1})"
            )
    plan = []
    for layer_idx in range(num_layers):
        rule = next((r for r in rules if r.matches(layer_idx)), None)
        plan.append({"target": "keep"} if rule is None or rule.target == "keep" else {"target": rule.target, **rule.options})
    return plan
