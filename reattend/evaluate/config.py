"""What ``reattend eval`` measures, and how much of it.

Defaults are sized so that the whole evaluation of SmolLM2-135M (student and teacher) finishes in a few
minutes on two CPU cores; every metric can be switched off or scaled up from a recipe or ``key=value``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

LOCAL_PPL_TASK = "reattend_ppl"
LOCAL_CLOZE_TASK = "reattend_cloze"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True


def _sorted_lengths(lengths: list[int]) -> list[int]:
    if not lengths:
        raise ValueError("give at least one context length")
    if min(lengths) < 2:
        raise ValueError(f"context lengths must be at least 2 tokens, got {lengths}")
    return sorted(set(lengths))


class PerplexityConfig(_Section):
    """Perplexity of student and teacher on each held-out text, at each context length."""

    context_lengths: list[int] = Field(default_factory=lambda: [512, 2048])
    # Tokens scored per text and length: max_tokens // length blocks (at least one) of `length` tokens.
    max_tokens: PositiveInt = 1024
    batch_size: PositiveInt = 1

    _check_lengths = field_validator("context_lengths")(_sorted_lengths)


class KLAgreementConfig(_Section):
    """Token-level KL(teacher || student) and top-1 agreement of next-token predictions."""

    context_length: PositiveInt = 512
    max_tokens: PositiveInt = 512


class FidelityConfig(_Section):
    """Per-layer relative MSE of each student attention output vs the teacher's, on the teacher's inputs."""

    context_length: PositiveInt = 512
    num_blocks: PositiveInt = 1


class LMEvalConfig(_Section):
    """lm-evaluation-harness tasks run through its Python API on the in-memory models.

    The two default tasks are written at eval time from the held-out texts (no download): a rolling
    log-likelihood task and a cloze multiple-choice task. Any other task name works where lm-eval can
    find it (its own catalogue with internet access, or YAMLs under ``include_path``).
    """

    tasks: list[str] = Field(default_factory=lambda: [LOCAL_PPL_TASK, LOCAL_CLOZE_TASK])
    include_path: Path | None = None
    limit: PositiveInt | float | None = None
    num_fewshot: int | None = None
    # lm-eval pads batches on the right, which causal attention never sees from earlier positions.
    batch_size: PositiveInt = 4
    # Size of the local tasks.
    ppl_docs: PositiveInt = 8
    ppl_doc_tokens: PositiveInt = 256
    cloze_items: PositiveInt = 16
    cloze_context_tokens: PositiveInt = 64
    cloze_continuation_tokens: PositiveInt = 12
    cloze_choices: int = Field(default=4, ge=2)

    @field_validator("tasks")
    @classmethod
    def _some_tasks(cls, tasks: list[str]) -> list[str]:
        if not tasks:
            raise ValueError("give at least one lm-eval task, or set enabled: false")
        return tasks

    @field_validator("limit")
    @classmethod
    def _positive_limit(cls, limit):
        if limit is not None and limit <= 0:
            raise ValueError("limit must be positive (a count, or a fraction below 1)")
        return limit


class RecallConfig(_Section):
    """Long-context recall: multi-query associative recall (MQAR) and passkey retrieval."""

    tasks: list[str] = Field(default_factory=lambda: ["mqar", "passkey"])
    lengths: list[int] = Field(default_factory=lambda: [256, 512, 1024])
    mqar_samples: PositiveInt = 2
    mqar_queries: PositiveInt = 8
    passkey_samples: PositiveInt = 3

    _check_lengths = field_validator("lengths")(_sorted_lengths)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = sorted(set(tasks) - {"mqar", "passkey"})
        if unknown or not tasks:
            raise ValueError(f"recall tasks are 'mqar' and 'passkey', got {tasks}")
        return tasks


class EfficiencyConfig(_Section):
    """Prefill time, decode speed, peak memory and cache size over context lengths."""

    context_lengths: list[int] = Field(default_factory=lambda: [256, 512, 1024, 2048])
    decode_tokens: PositiveInt = 16
    # Timings keep the fastest of `repeats` runs: the least disturbed by other processes.
    repeats: PositiveInt = 1

    _check_lengths = field_validator("context_lengths")(_sorted_lengths)


class GenerationsConfig(_Section):
    """A few greedy completions from student and teacher, shown side by side."""

    prompts: list[str] = Field(
        default_factory=lambda: [
            "The capital of France is",
            "def fibonacci(n):\n",
            "In the beginning God created",
        ]
    )
    max_new_tokens: PositiveInt = 24


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    perplexity: PerplexityConfig = Field(default_factory=PerplexityConfig)
    kl_agreement: KLAgreementConfig = Field(default_factory=KLAgreementConfig)
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)
    lm_eval: LMEvalConfig = Field(default_factory=LMEvalConfig)
    recall: RecallConfig = Field(default_factory=RecallConfig)
    efficiency: EfficiencyConfig = Field(default_factory=EfficiencyConfig)
    generations: GenerationsConfig = Field(default_factory=GenerationsConfig)
    seed: int = 0
    progress: bool = True
