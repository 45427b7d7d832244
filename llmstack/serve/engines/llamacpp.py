"""llama.cpp behind the Engine protocol (`engine: llamacpp`): a GGUF file — what `llmstack export gguf` writes — served
through llama-cpp-python's bindings, so a laptop without vLLM gets the same guarded API (keys, limits, rails, tool
calls, streaming, audit, metrics) over the runtime people run small models with.

The API renders chat templates itself and hands every engine token ids, so this engine loads the HF tokenizer the
export writes beside the GGUF (the GGUF's own vocabulary has the same ids). One request generates at a time (a lock:
one llama.cpp context), its n choices one after another; a token at a time in a thread, turned into deltas by
detok.py as the transformers engine's are. JSON Schemas (response_format, forced tool calls) become llama.cpp
grammars (llama-cpp-python's JSON-Schema-to-GBNF converter). LoRA adapters are not offered (merge them first).

Logprobs come from llama.cpp's own logits: the context keeps every evaluated position's logits (`logits_all`), so a
generated token's row is the logits it was sampled from, and `prompt_logprobs` (`echo`, how lm-eval scores choices
through a server) are the prompt's rows after one prefill — which generation then reuses from llama.cpp's prefix cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

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
        # The llama.cpp context is one: every thread that touches it holds this. The asyncio lock above orders the
        # requests, but a request cancelled while it waits for its thread to stop releases that lock early; this
        # one makes the next request's thread wait for the last one's, so two never run in the context at once.
        self._context = threading.Lock()
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

        # logits_all: llama.cpp computes the output head at every prompt position, not only the last (prefill does
        # the vocabulary projection once per prompt token; decoding is one token a step either way), and
        # llama-cpp-python keeps them in an n_ctx x vocabulary float32 array (2048 x 49152 x 4 bytes = 384 MiB for
        # SmolLM2). That is the price of logprobs and of scoring choices (`echo`) on this engine.
        llm = llama_cpp.Llama(str(self.path), n_ctx=self.max_model_len, n_threads=self.threads, seed=self.seed,
                              logits_all=True, verbose=False)
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
        self._running += 1
        try:
            grammar = await asyncio.to_thread(self._grammar, p)
            async with self._lock:
                prompt_rows = None
                if p.prompt_logprobs is not None:
                    prompt_rows = await asyncio.to_thread(self._prompt_logprobs, prompt_ids, p.prompt_logprobs)
                for index in range(p.n):
                    async for delta in self._one(prompt_ids, p, index, grammar):
                        if prompt_rows is not None:
                            delta.prompt_logprobs, prompt_rows = prompt_rows, None
                        yield [delta]
        finally:
            self._running -= 1

    def _prompt_logprobs(self, prompt_ids: list[int], k: int) -> list[dict | None]:
        """Every prompt token's logprob: one prefill from scratch, row i of the logits predicting token i + 1."""
        with self._context:
            self.llm.reset()
            self.llm.eval(prompt_ids)
            logits = self.llm.scores[:len(prompt_ids) - 1].copy()
        return [None, *(self._lp_row(row, t, k) for row, t in zip(logits, prompt_ids[1:]))]

    def _lp_row(self, logits: np.ndarray, token: int, k: int) -> dict:
        """The API's logprob row of `token` under one position's logits, with the top k (the transformers engine's
        shape). log-softmax in float64 by hand: numpy has none, and torch is not needed for one vector."""
        z = logits.astype(np.float64)
        lp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
        row = {"token": self.tokenizer.decode([token]), "logprob": float(lp[token]), "top": []}
        if k:
            top = np.argpartition(-lp, k - 1)[:k]
            row["top"] = [{"token": self.tokenizer.decode([int(i)]), "logprob": float(lp[i])}
                          for i in top[np.argsort(-lp[top])]]
        return row

    async def _one(self, prompt_ids: list[int], p: GenParams, index: int, grammar) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop_flag = threading.Event()
        eos = self._eos
        rows: list[dict] = []  # with p.logprobs: one per token sent, made in the thread before the token is queued

        def work():
            with self._context:
                run()

        def run():
            try:
                self.llm.set_seed((p.seed if p.seed is not None else self.seed) + index)
                made = 0
                greedy = p.temperature <= 0
                for token in self.llm.generate(prompt_ids, temp=0.0 if greedy else p.temperature,
                                               top_p=1.0 if greedy else p.top_p, top_k=1 if greedy else 0, min_p=0.0,
                                               reset=True, grammar=grammar):
                    if p.ignore_eos and token in eos:
                        continue  # a benchmark's fixed length: llama.cpp samples on past the end of a turn
                    if p.logprobs is not None:  # the logits the token was sampled from: the last evaluated position
                        rows.append(self._lp_row(self.llm.scores[self.llm.n_tokens - 1], token, p.logprobs))
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
            async for delta in stream_deltas(queue, self.tokenizer, p, eos, index, stop_flag,
                                             lambda position, step: rows[position:position + len(step)]):
                yield delta
        finally:
            stop_flag.set()  # client went away or we are done: the thread stops after its current token
            await asyncio.to_thread(thread.join)

    async def shutdown(self) -> None:
        self.state = "stopped"
        if self.llm is not None:
            await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._context:
            self.llm.close()


def _generation_eos(folder: Path) -> list[int]:
    """generation_config.json's eos ids (the end of a turn and the end of text, for chat models), where the export
    copied it."""
    try:
        eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    return [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
