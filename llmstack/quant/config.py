"""Recipe schema for `quantize:` — export the final model in a compressed-tensors format that vLLM loads natively.

    quantize:
      scheme: w4a16          # weight-only INT4, group-wise (the format vLLM serves on CUDA)
      method: gptq           # gptq | awq | rtn (round-to-nearest: no calibration, seconds)
      group_size: 64         # must divide the hidden size (SmolLM2: 576 -> 64)
      serve_fallback: w8a8   # also export this scheme when the serving engine has no kernel for `scheme`

The stage runs llm-compressor in its own environment (.venv-quant; see llmstack/quant/run.py for why).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmstack.schema import Strict

Scheme = Literal["w4a16", "w8a8"]

# The stage's name in the run (runs/<recipe>/<run>/<name>/) and in eval.stages.
STAGE_NAME: dict[str, str] = {"w4a16": "int4", "w8a8": "int8"}


class QuantizeSpec(Strict):
    scheme: Scheme = "w4a16"
    method: Literal["gptq", "awq", "rtn"] = "gptq"
    group_size: int = Field(64, gt=0, description="must divide the model's hidden size (SmolLM2: 576 -> 64)")
    calibration_samples: int = Field(16, gt=0, description="chat-rendered rows from the calibration dataset")
    calibration_dataset: str | None = Field(None, description="key of data.datasets; default: the last sft stage's")
    max_calibration_length: int = Field(512, gt=0, description="tokens per calibration sample")
    serve_fallback: Scheme | None = Field(
        "w8a8", description="export this scheme too when the serving engine lacks a kernel for `scheme` (null: never)")

    @property
    def stage_name(self) -> str:
        return STAGE_NAME[self.scheme]

    @model_validator(mode="after")
    def _checks(self):
        if self.serve_fallback == self.scheme:
            raise ValueError("serve_fallback is the same scheme as `scheme`; set another scheme or null")
        if self.scheme == "w8a8" and self.method == "awq":
            raise ValueError("awq is a weight-only method: use it with scheme w4a16 (w8a8 takes gptq or rtn)")
        return self
