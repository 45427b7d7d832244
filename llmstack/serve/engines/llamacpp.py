"""llama.cpp behind the Engine protocol (`engine: llamacpp`): a GGUF file — what `llmstack export gguf` writes — served
through llama-cpp-python's bindings, so a laptop without vLLM gets the same guarded API (keys, limits, rails, tool
calls, streaming, audit, metrics) over the runtime people run small models with.

The API renders chat templates itself and hands every engine token ids, so this engine loads the HF tokenizer the
export writes beside the GGUF (the GGUF's own vocabulary has the same ids). One request generates at a time (a lock:
one llama.cpp context), its n choices one after another; a token at a time in a thread, turned into deltas by
detok.py as the transformers engine's are. JSON Schemas (response_format, forced tool calls) become llama.cpp
grammars (llama-cpp-python's JSON-Schema-to-GBNF converter). Logprobs and LoRA adapters are not offered: a request
asking for them is a 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from llmstack.serve.engines.base import Delta, EngineRejected, EngineUnavailable, GenParams, load_tokenizer
from llmstack.serve.engines.detok import stream_deltas

log = logging.getLogger("llmstack.serve")


def gguf_file(model: str | Path) -> Path:
    """The GGUF a `model:` names: the file itself, or a folder holding exactly one (an export of one type)."""
    path = Path(model)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise ValueError(f"{path} holds {len(files)} .gguf files: name the one to serve")
        return files[0]
    if path.suffix != ".gguf" or not path.is_file():
        raise ValueError(f"{path} is not a .gguf file (the llamacpp engine serves `llmstack export gguf` output)")
    return path


class LlamaCppEngine:
    kind = "llamacpp"

    def __init__(self, model: str | Path, served_name: str, max_model_len: int | None = None, seed: int = 0,
                 threads: int | None = None):
        self.path = gguf_file(model)
        self.served_name, self.seed = served_name, seed
        self.threads = threads or os.cpu_count() or 1
        self.tokenizer = load_tokenizer(self.path.parent)
        self.max_model_len = max_model_len or 2048
        self.llm = None
        self.state = "starting"
        self.restarts = 0
        self._lock = asyncio.Lock()
        self._running = 0

    @property
    def names(self) -> list[str]:
        return [self.served_name]

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def running(self) -> int:
        return self._running

    async def start(self) -> None:
        self.llm = await asyncio.to_thread(self._load)
        self._eos = {self.llm.token_eos(), *_generation_eos(self.path.parent),
                     *(t for t in [self.tokenizer.eos_token_id] if t is not None)}
        self.state = "ready"

    def _load(self):
        import llama_cpp

        llm = llama_cpp.Llama(str(self.path), n_ctx=self.max_model_len, n_threads=self.threads, seed=self.seed,
                              verbose=False)
        self.max_model_len = llm.n_ctx()
        log.info("llama.cpp serves %s (context %d, %d threads)", self.path.name, self.max_model_len, self.threads)
        return llm

    def _grammar(self, p: GenParams):
        from llama_cpp import LlamaGrammar

        if p.json_schema is not None:
            try:
                return LlamaGrammar.from_json_schema(json.dumps(p.json_schema), verbose=False)
            except Exception as exc:  # noqa: BLE001 - a schema llama.cpp's converter cannot take is the client's 400
                raise EngineRejected(f"llama.cpp cannot turn this JSON Schema into a grammar: {exc}") from None
        if p.json_object:
            return LlamaGrammar.from_json_schema(json.dumps({"type": "object"}), verbose=False)
        return None

    async def generate(self, request_id: str, prompt_ids: list[int], p: GenParams,
                       model: str) -> AsyncIterator[list[Delta]]:
        if not self.ready:
            raise EngineUnavailable(f"engine is {self.state}")
        if p.logprobs is not None or p.prompt_logprobs is not None:
            raise EngineRejected("the llamacpp engine does not return logprobs: leave out logprobs / echo")
        self._running += 1
        try:
            grammar = await asyncio.to_thread(self._grammar, p)
            async with self._lock:
                for index in range(p.n):
                    async for delta in self._one(prompt_ids, p, index, grammar):
                        yield [delta]
        finally:
            self._running -= 1

    async def _one(self, prompt_ids: list[int], p: GenParams, index: int, grammar) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop_flag = threading.Event()
        eos = self._eos

        def work():
            try:
                self.llm.set_seed((p.seed if p.seed is not None else self.seed) + index)
                made = 0
                greedy = p.temperature <= 0
                for token in self.llm.generate(prompt_ids, temp=0.0 if greedy else p.temperature,
                                               top_p=1.0 if greedy else p.top_p, top_k=1 if greedy else 0, min_p=0.0,
                                               reset=True, grammar=grammar):
                    if p.ignore_eos and token in eos:
                        continue  # a benchmark's fixed length: llama.cpp samples on past the end of a turn
                    loop.call_soon_threadsafe(queue.put_nowait, [token])
                    made += 1
                    if made >= p.max_tokens or stop_flag.is_set() or (token in eos):
                        break
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except BaseException as exc:  # surface it to the awaiting request instead of losing it in the thread
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            async for delta in stream_deltas(queue, self.tokenizer, p, eos, index, stop_flag):
                yield delta
        finally:
            stop_flag.set()  # client went away or we are done: the thread stops after its current token
            await asyncio.to_thread(thread.join)

    async def shutdown(self) -> None:
        self.state = "stopped"
        if self.llm is not None:
            await asyncio.to_thread(self.llm.close)


def _generation_eos(folder: Path) -> list[int]:
    """generation_config.json's eos ids (the end of a turn and the end of text, for chat models), where the export
    copied it."""
    try:
        eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    return [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
