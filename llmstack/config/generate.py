"""What `llmstack generate` reads: one input row (an id, a chat or a completion prompt, per-row sampling overrides)
and the run's default sampling. pydantic checks each row the way recipes are checked, so a malformed row is
quarantined with a reason that names its field (`sampling.temperature: must be >= 0`) instead of failing the run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from llmstack.config.base import Strict


class Sampling(Strict):
    """Sampling settings; in a row's `sampling` object every field is optional and overrides the run's default."""

    temperature: float | None = Field(None, ge=0, le=10, description="0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    max_tokens: StrictInt | None = Field(None, gt=0, description="most tokens generated per output")
    n: StrictInt | None = Field(None, ge=1, le=64, description="outputs per row")
    seed: StrictInt | None = Field(None, ge=0, lt=2**31, description="the row's seed (output j uses seed + j on the "
                                                                       "transformers engine; vLLM seeds the request)")
    stop: list[StrictStr] | None = Field(None, max_length=16, description="stop strings (a string alone is one)")
    ignore_eos: bool | None = Field(None, description="generate exactly max_tokens, past the end-of-turn token "
                                                      "(benchmarks)")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v):
        return [v] if isinstance(v, str) else v


class Message(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr


class InputRow(Strict):
    """One input line: `messages` (a chat, rendered with the model's chat template) or `prompt` (a completion).
    Other columns of a dataset row are ignored; a typo inside `sampling` is an error."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr | StrictInt | None = Field(None, description="unique row id; absent: `line-N` (N: its 1-based line)")
    messages: list[Message] | None = Field(None, min_length=1)
    prompt: StrictStr | None = Field(None, min_length=1)
    sampling: Sampling = Field(default_factory=Sampling)
    metadata: dict | None = Field(None, description="carried to the output record unchanged")

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` (a chat) or `prompt` (a completion)")
        if self.messages is not None and self.messages[-1].role == "assistant":
            raise ValueError("messages: the last message is the assistant's; end with the turn to answer")
        return self
