"""The engines behind the API, one module each behind one protocol (base.py): vLLM (vllm.py) and transformers
`generate` (hf.py)."""

from __future__ import annotations

from pathlib import Path

from llmstack.serve.engines.base import (Delta, Engine, EngineRejected, EngineUnavailable, GenParams,  # noqa: F401
                                         load_tokenizer)
from llmstack.serve.engines.hf import HfEngine
from llmstack.serve.engines.vllm import VllmEngine


def make_engine(spec, model: str | Path, served_name: str):
    """The engine a ServeSpec asks for (not started: `await engine.start()`)."""
    if spec.engine == "vllm":
        return VllmEngine(model, served_name, spec.adapters, spec.max_model_len, spec.seed, spec.vllm)
    return HfEngine(model, served_name, spec.adapters, spec.max_model_len, spec.seed,
                    dtype=spec.vllm.dtype)
