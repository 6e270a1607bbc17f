"""Options of the ``local`` target: causal sliding-window attention with optional always-visible sink tokens."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LocalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: int = Field(256, ge=1, description="W: a query sees itself and the W - 1 tokens before it")
    sinks: int = Field(0, ge=0, description="S: the first S tokens of the sequence stay visible to every query")

    def state_bytes(self, shape, dtype_bytes: int) -> tuple[int, int]:
        """(fixed bytes per layer per sequence, bytes per token): the decode cache holds W - 1 + S keys/values."""
        return (self.window - 1 + self.sinks) * shape.kv_bytes_per_token(dtype_bytes), 0
