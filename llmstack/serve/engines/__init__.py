"""The engines behind the API, one module each behind one protocol (base.py): vLLM (vllm.py), transformers
`generate` (hf.py) and llama.cpp (llamacpp.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from llmstack.serve.engines.base import (  # noqa: F401
    Delta,
    Engine,
    EngineRejected,
    EngineUnavailable,
    GenParams,
    load_tokenizer,
    vllm_dtype,
)
from llmstack.serve.engines.hf import HfEngine
from llmstack.serve.engines.vllm import VllmEngine

log = logging.getLogger("llmstack.serve")


def make_engine(spec, model: str | Path, served_name: str):
    """The engine a ServeSpec asks for (not started: `await engine.start()`)."""
    if spec.engine == "vllm":
        return VllmEngine(model, served_name, spec.adapters, spec.max_model_len, spec.seed, spec.vllm,
                          grammar_budget_s=spec.grammar_budget_s)
    if spec.engine == "llamacpp":
        from llmstack.serve.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(model, served_name, spec.max_model_len, spec.seed)
    # vllm.dtype is chosen for vLLM's kernels (unset: the policy's). The device policy places the transformers engine:
    # on the GPU in the card's 16-bit dtype, on a CPU in bf16 where it is native, else float32 (emulated: 4x slower).
    from llmstack.device import policy

    requested = vllm_dtype(spec.vllm)
    device, dtype = policy().hf_engine(requested)
    if dtype != requested:
        log.info("the transformers engine computes in %s on the %s (vllm.dtype %s is for vLLM)", dtype, device,
                 requested)
    return HfEngine(model, served_name, spec.adapters, spec.max_model_len, spec.seed, dtype=dtype, device=device,
                    grammar_budget_s=spec.grammar_budget_s)
