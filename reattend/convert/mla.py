"""Options of the ``mla`` target (TransMLA: GQA/MHA -> multi-head latent attention with a decoupled RoPE key)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MlaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # The teacher's keys are folded into the latent, so there is no per-layer teacher output to match inside the
    # layer: MLA recovers by fine-tuning (recover.method) instead.
    supports_transfer: ClassVar[bool] = False

    kv_lora_rank: int = Field(..., ge=1, description="r: latent width cached per token (with qk_rope_head_dim)")
    qk_rope_head_dim: int = Field(64, ge=2, description="d_rope: width of the shared key that keeps RoPE")
    freqfold: int | Literal["search"] = Field(
        "search", description="adjacent RoPE frequencies pooled into one PCA (RoRoPE); 'search' picks the "
                              "candidate with the lowest calibration perplexity")
    balance_kv: bool = Field(True, description="scale K_nope to V's norm before the joint PCA (BKV-PCA)")
    q_lora_rank: int | None = Field(None, ge=1, description="low-rank queries q_b(RMSNorm(q_a(x))) by PCA; null keeps "
                                                           "the teacher's q_proj")
    latent_norm: bool = Field(False, description="RMSNorm on the latent (and on low-rank queries), as stock "
                                                 "deepseek_v3 always applies (needed for the native export)")
    latent_norm_mode: Literal["identity", "rms"] = Field(
        "identity", description="identity: the latent is scaled far below the norm's epsilon, where the norm is a "
                                "fixed linear map, so conversion stays exact (sets the model's rms_norm_eps to 1e-6; the "
                                "native export then runs in bfloat16/float32, not float16); rms: a normalising norm, "
                                "blended in over latent_norm_warmup of recovery")
    latent_norm_warmup: float = Field(0.5, ge=0, le=1, description="rms mode: fraction of recovery over which the "
                                      "latent norms are blended in from the identity; 0 = full norm from the first step")
    calibration_sequences: int = Field(128, ge=1, description="calibration blocks taken from the training text")
    calibration_length: int = Field(256, ge=8, description="tokens per calibration block")

    @model_validator(mode="after")
    def _check(self):
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim}: must be even (RoPE rotates pairs)")
        if isinstance(self.freqfold, int) and self.freqfold < 1:
            raise ValueError(f"freqfold={self.freqfold}: must be >= 1 or 'search'")
        return self

    def check_layer(self, shape, layer_idx: int) -> None:
        """Refuse ranks that do not fit the teacher layer ``shape`` (a ``LayerShape``)."""
        d, h_kv = shape.head_dim, shape.num_kv_heads
        where = f"layer {layer_idx} (mla)"
        if self.qk_rope_head_dim > d:
            raise ValueError(f"{where}: qk_rope_head_dim={self.qk_rope_head_dim} is larger than the teacher's "
                             f"head_dim={d}; choose an even value <= {d}")
        if (d // 2) % (self.qk_rope_head_dim // 2):
            fits = [2 * k for k in range(1, d // 2 + 1) if (d // 2) % k == 0]
            raise ValueError(f"{where}: qk_rope_head_dim={self.qk_rope_head_dim} must divide head_dim={d} so each "
                             f"rotary pair keeps one of the teacher's frequencies; choose one of {fits}")
        limit = 2 * h_kv * d - self.qk_rope_head_dim
        if self.kv_lora_rank > limit:
            raise ValueError(f"{where}: kv_lora_rank={self.kv_lora_rank} exceeds 2*H_kv*head_dim - qk_rope_head_dim "
                             f"= 2*{h_kv}*{d} - {self.qk_rope_head_dim} = {limit}; choose kv_lora_rank <= {limit}")
        if self.q_lora_rank is not None and self.q_lora_rank > min(shape.hidden_size, shape.num_heads * d):
            raise ValueError(f"{where}: q_lora_rank={self.q_lora_rank} exceeds min(hidden_size, H*head_dim) = "
                             f"{min(shape.hidden_size, shape.num_heads * d)}; choose a smaller value or null")
        if isinstance(self.freqfold, int):
            valid = freqfold_candidates(d, self.qk_rope_head_dim)
            if self.freqfold not in valid:
                raise ValueError(f"{where}: freqfold={self.freqfold} does not fit head_dim={d} with "
                                 f"qk_rope_head_dim={self.qk_rope_head_dim}; choose one of {valid} or 'search'")

    @staticmethod
    def config_changes(entries: list[dict]) -> dict:
        """Identity-mode latent norms run below their epsilon, so their output scales with 1/sqrt(eps): the model's
        rms_norm_eps becomes deepseek_v3's latent-norm epsilon, which vLLM/SGLang take from it (transformers
        hard-codes it). For the decoder norms that change is negligible (perplexity to 4 digits on SmolLM2)."""
        from ..modeling.mla_attention import LATENT_NORM_EPS

        identity = any(e.get("latent_norm") and e.get("latent_norm_mode", "identity") == "identity" for e in entries)
        return {"rms_norm_eps": LATENT_NORM_EPS} if identity else {}

    @staticmethod
    def initialise(student, teacher, layer_indices: list[int], plan: list[dict], calibration) -> None:
        """Conversion hook (``convert_model``): TransMLA from calibration moments."""
        from .transmla import initialise_layers

        initialise_layers(student, teacher, layer_indices, plan, calibration)

    def state_bytes(self, shape, dtype_bytes: int) -> tuple[int, int]:
        """(fixed bytes per layer per sequence, bytes per token): the latent and the RoPE key, per token."""
        return 0, (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes


def freqfold_candidates(head_dim: int, rope_dim: int) -> list[int]:
    """Fold sizes f that split the head_dim/2 frequencies into groups keeping a whole number of rotary pairs each:
    f divides head_dim/2 and (rope_dim/2) / (head_dim/2 / f) is a positive integer."""
    pairs, kept = head_dim // 2, rope_dim // 2
    return [f for f in range(1, pairs + 1) if pairs % f == 0 and kept % (pairs // f) == 0]

