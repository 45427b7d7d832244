"""Recipe schema for `quantize:` — export the final model in a compressed-tensors format that vLLM loads natively.

    quantize:
      scheme: w4a16          # weight-only INT4, group-wise (the format vLLM serves on CUDA)
      method: gptq           # gptq | awq | rtn (round-to-nearest: no calibration, seconds)
      group_size: 64         # must divide the hidden size (SmolLM2: 576 -> 64)
      serve_fallback: w8a8   # also export this scheme when the serving engine has no kernel for `scheme`
      gguf: [q4_k_m]         # also GGUF files for llama.cpp / Ollama (llama.cpp's converter: llmstack/quant/gguf.py)

The stage runs llm-compressor in its own environment (.venv-quant; see llmstack/quant/export.py for why).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from llmstack.config.base import Strict
from llmstack.paths import cache_root

Scheme = Literal["w4a16", "w8a8"]

# GGUF types llama.cpp writes (as `llama-quantize` spells them, lower case) -> llama_ftype (llama.h). f32 / f16 / bf16
# are its converter's own output types; the rest come from llama_model_quantize (llmstack/quant/gguf.py).
GGUF_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q5_k_s": 16,
                              "q5_0": 8, "q4_k_m": 15, "q4_k_s": 14, "q4_0": 2, "q3_k_m": 12, "q2_k": 10}

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
    gguf: list[str] = Field(default_factory=list, description="also export GGUF files of these types with llama.cpp's "
                            "own converter and quantizer, each with an Ollama Modelfile (q4_k_m, q8_0, f16, ...); "
                            "needs `make gguf`")

    @property
    def stage_name(self) -> str:
        return STAGE_NAME[self.scheme]

    @model_validator(mode="after")
    def _checks(self):
        unknown = [t for t in self.gguf if t.lower() not in GGUF_TYPES]
        if unknown:
            raise ValueError(f"gguf: unknown type {', '.join(unknown)}; choose from {', '.join(GGUF_TYPES)}")
        if self.serve_fallback == self.scheme:
            raise ValueError("serve_fallback is the same scheme as `scheme`; set another scheme or null")
        if self.scheme == "w8a8" and self.method == "awq":
            raise ValueError("awq is a weight-only method: use it with scheme w4a16 (w8a8 takes gptq or rtn)")
        return self


def model_config_json(source: str) -> Path | None:
    """The config.json of a model source when it is on this machine without loading anything: a local folder, or a
    packaged model already fetched into the cache. None for a hub id or a model not fetched yet."""
    for folder in (Path(source).expanduser(), cache_root() / "models" / source):
        if (folder / "config.json").is_file():
            return folder / "config.json"
    return None


def group_size_problem(spec: QuantizeSpec, source: str) -> str | None:
    """W4A16 quantizes each Linear's input dimension in groups: the group size must divide the hidden size (q/k/v,
    gate/up) and the intermediate size (down_proj). Checked from the model's config.json when it is local or fetched."""
    if spec.scheme != "w4a16":
        return None
    path = model_config_json(source)
    if path is None:
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    for key in ("hidden_size", "intermediate_size"):
        size = config.get(key)
        if isinstance(size, int) and size % spec.group_size:
            divisors = [g for g in (256, 128, 64, 32, 16) if size % g == 0 and
                        all(not isinstance(config.get(k), int) or config[k] % g == 0
                            for k in ("hidden_size", "intermediate_size"))]
            fix = f"use {divisors[0]}" if divisors else "choose a group size that divides it"
            return (f"{spec.group_size} does not divide the model's {key} {size} (read from {path}); {fix}")
    return None
