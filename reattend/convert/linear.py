"""Options of the ``linear`` target (LoLCATs / Hedgehog linear attention, optional sliding-window hybrid)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..modeling.feature_maps import FEATURE_MAPS


class LinearOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    feature_map: Literal[tuple(FEATURE_MAPS)] = "hedgehog"  # type: ignore[valid-type]
    feature_dim: int = Field(64, ge=1, description="f: the map outputs 2f features for hedgehog/exp, f for t2r")
    tie_qk: bool = False
    window: int | None = Field(64, description="softmax window (query included); null = pure linear attention")
    sinks: int = Field(0, ge=0, description="first tokens always attended by the exact softmax part")
    affine: bool = Field(False, description="weight the linear terms by 1 - gamma")
    gamma_init: float = Field(0.1, gt=0.0, lt=1.0, description="initial window weight gamma per head")

    @model_validator(mode="after")
    def _check(self):
        if self.window is not None and self.window < 2:
            raise ValueError(f"window={self.window}: must be >= 2 (or null for pure linear attention)")
        if self.window is None and self.sinks:
            raise ValueError("sinks need the hybrid: set a window, or sinks: 0 for pure linear attention")
        return self

    def state_bytes(self, shape, dtype_bytes: int) -> tuple[int, int]:
        """(fixed bytes per layer per sequence, bytes per token) of this layer's decode cache."""
        features = FEATURE_MAPS[self.feature_map].output_dim(shape.head_dim, self.feature_dim)
        state = shape.num_heads * features * (shape.head_dim + 1) * 4
        window_tokens = (self.window - 1 if self.window else 1) + self.sinks
        return state + window_tokens * shape.kv_bytes_per_token(dtype_bytes), 0
