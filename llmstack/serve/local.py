"""The guarded API on a loopback port in a thread of this process, for a caller that needs a model behind the OpenAI
API for a while — the eval stage scoring a GGUF export through the llamacpp engine (lm-eval's `local-completions`
and `local-chat-completions` talk HTTP, so the model must be served; our own app is the faithful way, since it is
what a user of the export runs).

The server accepts one random key and nothing else, on 127.0.0.1 only. The rails are off and the limits out of the
way: an evaluation measures the model, and a rail that redacts an email in a prompt or refuses an item would change
what is scored.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmstack.eval.run import Target
from llmstack.serve.readiness import wait_ready

# The most context a GGUF is scored with: the suites' longest prompts (5-shot MMLU, gsm8k) fit; llama.cpp keeps this
# many rows of logits for prompt logprobs (llmstack/serve/engines/llamacpp.py), so not a long model's whole context.
GGUF_CONTEXT = 4096


@dataclass
class LocalServer:
    base_url: str  # http://127.0.0.1:PORT
    served_name: str
    api_key: str


@contextlib.contextmanager
def serve_gguf(gguf: str | Path, max_model_len: int = 2048, startup_s: float = 300) -> Iterator[LocalServer]:
    """Serve one GGUF file (engine: llamacpp) until the block ends."""
    from llmstack.serve.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(gguf, Path(gguf).stem, max_model_len=max_model_len)
    with serve_engine(engine, "llamacpp", startup_s) as server:
        yield server


@contextlib.contextmanager
def gguf_target(gguf: str | Path, max_length: int = GGUF_CONTEXT, tool_choice: str = "auto") -> Iterator[Target]:
    """The eval target of a GGUF file: served as above for as long as the block runs, scored through lm-eval's
    `server` backend. The export's folder holds the HF tokenizer (token ids for loglikelihood tasks) but no
    config.json, so the context lm-eval cuts prompts to is given: pass the 16-bit model's, so both are cut alike.
    One request at a time: llama.cpp answers one after another, and queued requests would only wait in the API."""
    with serve_gguf(gguf, max_model_len=max_length) as server:
        yield Target(model=Path(gguf).parent, backend="server", base_url=server.base_url,
                     served_name=server.served_name, api_key=server.api_key, max_length=max_length,
                     tool_choice=tool_choice, concurrency=1)


@contextlib.contextmanager
def serve_engine(engine, kind: str, startup_s: float = 300) -> Iterator[LocalServer]:
    import uvicorn

    from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
    from llmstack.serve.app import build_app
    from llmstack.serve.guard import hash_key

    key = "sk-llmstack-local-" + secrets.token_hex(16)
    keys = KeyFile.model_validate({"keys": [{"id": "local", "sha256": hash_key(key)}]})
    policy = GuardPolicy.model_validate({
        "input": {"injection": "off", "pii": "off"}, "output": {"injection": "off", "pii": "off"},
        "caps": {"max_tokens": 32_768, "max_body_bytes": 64_000_000, "max_logprobs": 20},
        "rate_limits": {"requests_per_minute": 1_000_000, "tokens_per_minute": 1_000_000_000, "max_concurrent": 64}})
    app = build_app(engine, ServeSpec(engine=kind), policy, keys)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        outcome = wait_ready(f"{base}/ready", headers={"Authorization": f"Bearer {key}"}, timeout=startup_s,
                             gone=lambda: not thread.is_alive())
        if outcome == "gone":
            raise RuntimeError(f"the local {kind} server stopped while starting (see the log above)")
        if outcome == "timeout":
            raise TimeoutError(f"the local {kind} server was not ready within {startup_s:.0f} s")
        yield LocalServer(base_url=base, served_name=engine.names[0], api_key=key)
    finally:
        server.should_exit = True
        thread.join(60)
