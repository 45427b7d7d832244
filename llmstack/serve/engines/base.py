"""What every engine is to the API: the `Engine` protocol, the generation parameters it takes, the deltas it yields,
and the two errors the API turns into 503 and 400. Engines take token ids (the API renders chat templates itself, so
every engine sees the same prompt tokens) and yield per-choice deltas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class EngineUnavailable(Exception):
    """The engine is starting, restarting or stopped: the API answers 503 with Retry-After."""


class EngineRejected(ValueError):
    """The engine cannot do what the request asks (an engine-side validation error): the API answers 400."""


@dataclass
class GenParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; k: the chosen token's logprob plus the top k
    prompt_logprobs: int | None = None  # the same for every prompt token (`echo`: scoring a text, as lm-eval does)
    json_schema: dict | None = None
    json_object: bool = False
    ignore_eos: bool = False


@dataclass
class Delta:
    index: int  # which of the n choices
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None  # per token: {"token", "logprob", "top": [{"token", "logprob"}]}
    finish_reason: str | None = None
    stop_reason: str | None = None  # the stop string that ended the choice, if one did (vLLM's CompletionOutput's)
    # Once per request, on its first delta: one row per prompt token (as `logprobs`); the first is None, since
    # nothing comes before it to predict it.
    prompt_logprobs: list[dict | None] | None = None


def vllm_dtype(options) -> str:
    """The dtype vLLM computes in: the server's `vllm.dtype` if set, else the device policy's for a 16-bit model
    (bfloat16 on a bf16 GPU and on x86 CPUs with AVX-512, float32 on AVX2-only CPUs, float16 on older GPUs)."""
    if options.dtype:
        return options.dtype
    from llmstack.device import policy

    return policy().serve_dtype(None)[1]


def load_tokenizer(model: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


class Engine(Protocol):
    """The interface the API uses; VllmEngine (vllm.py) and HfEngine (hf.py) implement it, and so does the scripted
    engine of llmstack.testing."""

    kind: str
    names: list[str]  # served model names: the base model first, then LoRA adapters
    tokenizer: Any
    max_model_len: int
    restarts: int
    state: str  # starting | ready | restarting | stopped

    @property
    def ready(self) -> bool: ...
    async def start(self) -> None: ...
    def generate(self, request_id: str, prompt_ids: list[int], p: GenParams, model_name: str
                 ) -> AsyncIterator[list[Delta]]: ...
    def running(self) -> int: ...
    async def shutdown(self) -> None: ...
