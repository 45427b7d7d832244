"""Recipe / serve-file schema for `serve:` — which engine serves which model behind the guarded API."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmstack.schema import Strict


class ServeSpec(Strict):
    engine: Literal["vllm", "hf"] = "vllm"
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    max_model_len: int = Field(2048, gt=0)
    smoke: bool = Field(True, description="`llmstack run` ends by serving the final model and asking it a question")
