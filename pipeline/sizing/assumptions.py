"""The ``estimate:`` block of a pipeline config (``distill plan --estimate``'s stated
assumptions): a schema only, so the config loader checks it without the estimator."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StageAssumptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: int | None = Field(None, ge=0, description="prompts the stage sees, when its input is not committed")
    expected_completion_tokens: float | None = Field(None, gt=0, description="mean completion tokens per sample")
    expected_prompt_tokens: float | None = Field(None, ge=0)
    samples_per_prompt: float | None = Field(None, gt=0)
    train_examples: int | None = Field(None, ge=0)


class EstimateSpec(StageAssumptions):
    """The ``estimate:`` block of a pipeline config: stated assumptions (each should say its
    source in a comment). The top-level figures apply to every stage that has no entry of its
    own under ``stages`` (a stage's entry overrides them field by field). ``samples_per_prompt``
    applies to adaptive sampling only (fixed sampling takes ``n`` samples)."""
    expected_prompt_tokens: float | None = Field(256, ge=0)
    keep_fraction: float = Field(1.0, gt=0, le=1, description="share of generated samples that reach training")
    mfu: float = Field(0.4, gt=0, le=1, description="model FLOPs utilisation of training")
    gpu: str | None = Field(None, description="GPU type for stages that name none (a key of gpus.yaml)")
    stages: dict[str, StageAssumptions] = Field(default_factory=dict)

    def for_stage(self, name: str, base: str = "") -> StageAssumptions:
        own = self.stages.get(name) or self.stages.get(base) or StageAssumptions()
        merged = {k: getattr(own, k) if getattr(own, k) is not None else getattr(self, k)
                  for k in StageAssumptions.model_fields}
        return StageAssumptions(**merged)
