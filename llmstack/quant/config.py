"""Recipe schema for `quantize:` — export the final model in a compressed format vLLM loads natively."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmstack.schema import Strict


class QuantizeSpec(Strict):
    scheme: Literal["w4a16", "w8a8"] = "w4a16"
    method: Literal["gptq", "awq", "rtn"] = "gptq"
    group_size: int = Field(64, gt=0, description="must divide the model's hidden size (SmolLM2: 576 -> 64)")
    calibration_samples: int = Field(16, gt=0)
    calibration_dataset: str | None = Field(None, description="key of data.datasets; default: the last SFT stage's")
