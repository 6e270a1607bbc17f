"""Options of the ``moh`` target (mixture-of-head attention: shared heads + top-k routed heads per token)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MohOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shared_heads: int | None = Field(None, ge=0, description="heads every token uses; null = half of the heads")
    top_k: int | None = Field(None, ge=0, description="routed heads each token selects; null = half of the routed heads")
    router: Literal["qnorm", "learned"] = Field("qnorm", description="qnorm: ||q_h|| scores, no parameters; learned: "
                                                "qnorm prior + linear routers and group weighting")
    gate: Literal["hard", "soft"] = Field("hard", description="hard: 0/1 with a straight-through gradient; soft: weighted sum")
    balance_weight: float = Field(0.01, ge=0, description="weight of the load-balance loss during recovery")

    @model_validator(mode="after")
    def _check(self):
        if self.gate == "soft" and self.router == "qnorm":
            raise ValueError("gate='soft' needs router='learned' (the qnorm router has no parameters to learn gate "
                             "values); set router: learned or gate: hard")
        return self

    def state_bytes(self, shape, dtype_bytes: int) -> tuple[int, int]:
        """(fixed bytes, bytes per token): MoH caches every KV head, so the KV cache is the teacher's."""
        return 0, shape.kv_bytes_per_token(dtype_bytes)
