"""The params shared by the stages that sample a model's answers on vLLM engines and check them
(``evaluate``, ``hard_prompts``): the answer format, how prompts become chat turns, the engines."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.stage import KEYED_WHEN_SET
from stages.common.checkers import FormatSpec
from stages.common.engine import EngineSpec


class ScoringParams(BaseModel):
    """The answer format the checkers want, the chat template settings and the engine spec."""

    model_config = ConfigDict(extra="forbid")
    format: FormatSpec = Field(default_factory=FormatSpec)
    chat_template: str | None = None
    system_prompt: str | None = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, json_schema_extra=KEYED_WHEN_SET,
                                                 description="variables for the chat template, e.g. "
                                                             "{enable_thinking: true} for Qwen3")
    engine: EngineSpec = Field(default_factory=EngineSpec)
