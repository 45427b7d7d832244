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
from typing import Literal, NamedTuple

from pydantic import Field, model_validator

from llmstack.config.base import Strict
from llmstack.paths import cache_root, llama_cpp_bin, llama_cpp_tools

Scheme = Literal["w4a16", "w8a8"]

class GGUFType(NamedTuple):
    """A GGUF type llama.cpp writes: its llama_ftype (llama.h) and what an importance matrix means to it.

    `imatrix`: "required" where llama.cpp refuses to quantize without one (its tensor_requires_imatrix: the 1-2 bit
    IQ types, iq3_xxs, and q2_k_s), "helps" where its quantizers weight the rounding error by it (the k-quants and the
    other IQ types), None where it is unused (8-bit and 16/32-bit)."""

    ftype: int
    imatrix: Literal["required", "helps"] | None = None


# GGUF types llama.cpp writes, as `llama-quantize` spells them (lower case). f32 / f16 / bf16 are its converter's own
# output types; the rest come from its quantizer (llmstack/quant/gguf.py).
GGUF_TYPES: dict[str, GGUFType] = {
    "f32": GGUFType(0), "f16": GGUFType(1), "bf16": GGUFType(32), "q8_0": GGUFType(7),
    "q6_k": GGUFType(18, "helps"), "q5_k_m": GGUFType(17, "helps"), "q5_k_s": GGUFType(16, "helps"),
    "q5_0": GGUFType(8), "q4_k_m": GGUFType(15, "helps"), "q4_k_s": GGUFType(14, "helps"), "q4_0": GGUFType(2),
    "q3_k_l": GGUFType(13, "helps"), "q3_k_m": GGUFType(12, "helps"), "q3_k_s": GGUFType(11, "helps"),
    "q2_k": GGUFType(10, "helps"), "q2_k_s": GGUFType(21, "required"),
    "iq4_xs": GGUFType(30, "helps"), "iq4_nl": GGUFType(25, "helps"), "iq3_m": GGUFType(27, "helps"),
    "iq3_s": GGUFType(26, "helps"), "iq3_xs": GGUFType(22, "helps"), "iq3_xxs": GGUFType(23, "required"),
    "iq2_m": GGUFType(29, "required"), "iq2_s": GGUFType(28, "required"), "iq2_xs": GGUFType(20, "required"),
    "iq2_xxs": GGUFType(19, "required"), "iq1_m": GGUFType(31, "required"), "iq1_s": GGUFType(24, "required"),
}

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
    gguf_imatrix: Literal["auto", "off"] = Field(
        "auto", description="auto: quantize the `gguf` types an importance matrix helps (k-quants, IQ types) with one "
        "that llama.cpp's llama-imatrix computes on the calibration rows (chat-rendered, as for `method`); the types "
        "that require one (iq1_*, iq2_*, iq3_xxs, q2_k_s) need it. off: plain quantization (those types then cannot "
        "be asked for)")

    @property
    def stage_name(self) -> str:
        return STAGE_NAME[self.scheme]

    @model_validator(mode="after")
    def _checks(self):
        unknown = [t for t in self.gguf if t.lower() not in GGUF_TYPES]
        if unknown:
            raise ValueError(f"gguf: unknown type {', '.join(unknown)}; choose from {', '.join(GGUF_TYPES)}")
        required = [t for t in self.gguf if GGUF_TYPES[t.lower()].imatrix == "required"]
        if required and self.gguf_imatrix == "off":
            raise ValueError(f"gguf_imatrix: off, but llama.cpp quantizes {', '.join(required)} only with an "
                             "importance matrix: set gguf_imatrix: auto or choose another type (iq4_xs, q4_k_m, ...)")
        if self.serve_fallback == self.scheme:
            raise ValueError("serve_fallback is the same scheme as `scheme`; set another scheme or null")
        if self.scheme == "w8a8" and self.method == "awq":
            raise ValueError("awq is a weight-only method: use it with scheme w4a16 (w8a8 takes gptq or rtn)")
        return self


def imatrix_tools_problem(types: list[str]) -> str | None:
    """The `types` that require an importance matrix need llama.cpp's llama-imatrix and llama-quantize, which
    `make gguf` builds into the environment: said at recipe load (and before an export's work), not after training."""
    required = [t.lower() for t in types if GGUF_TYPES[t.lower()].imatrix == "required"]
    missing = [p.name for p in llama_cpp_tools().values() if not p.is_file()]
    if required and missing:
        return (f"llama.cpp quantizes {', '.join(required)} only with an importance matrix, which its llama-imatrix "
                f"computes, and {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not built (in "
                f"{llama_cpp_bin()}): run `make gguf`")
    return None


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
