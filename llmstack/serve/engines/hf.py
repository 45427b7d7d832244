"""transformers `generate` behind the Engine protocol, for machines without vLLM (and the tests' tiny models), on the
device the device policy picks (llmstack/device.py: the GPU in bf16/fp16 where there is one, else the CPU, float32)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from llmstack.serve.engines.base import Delta, EngineRejected, EngineUnavailable, GenParams, load_tokenizer
from llmstack.serve.engines.detok import stream_deltas

log = logging.getLogger("llmstack.serve")


class HfEngine:
    """transformers `generate`, one request at a time (a lock): the fallback engine and the benchmark's baseline."""

    kind = "hf"

    def __init__(self, model: str | Path, served_name: str, adapters: dict[str, str] | None = None,
                 max_model_len: int | None = None, seed: int = 0, dtype: str = "float32", device: str = "cpu",
                 grammar_budget_s: float = 20.0):
        self.model_path, self.served_name, self.device = str(model), served_name, device
        self.adapters = dict(adapters or {})
        self.max_model_len, self.seed, self.dtype = max_model_len, seed, dtype
        self.tokenizer = load_tokenizer(model)
        self.model = None
        self.state = "starting"
        self.restarts = 0
        self._lock = asyncio.Lock()
        self._running = 0
        self.grammars = None  # JSON-Schema grammars, compiled off the engine lock in killable children (grammar.py)
        self.grammar_budget_s = grammar_budget_s

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
        return model.to(self.device).eval()

    def running(self) -> int:
        return self._running

    async def _compile(self, p: GenParams):
        """The compiled xgrammar grammar that keeps generation inside a JSON Schema (response_format, forced tool
        calls) or any JSON object — xgrammar is vLLM's structured-output backend too, so both engines constrain
        alike. Awaited *before* the request takes the engine lock, in a child process that a timeout or the client
        leaving stops (grammar.py): a slow schema holds up only its own request."""
        if self.grammars is None:
            from llmstack.serve.engines.grammar import Grammars

            self.grammars = Grammars(self.tokenizer, vocab_size=self.model.config.vocab_size,
                                     budget_s=self.grammar_budget_s)
        return await self.grammars.compiled(p.json_schema)

    async def generate(self, request_id: str, prompt_ids: list[int], p: GenParams,
                       model: str) -> AsyncIterator[list[Delta]]:
        if not self.ready:
            raise EngineUnavailable(f"engine is {self.state}")
        self._running += 1
        try:
            grammar = await self._compile(p) if p.json_schema is not None or p.json_object else None
            async with self._lock:
                prompt_rows, cache = None, None
                if p.prompt_logprobs is not None:
                    prompt_rows, cache = await asyncio.to_thread(self._prompt_logprobs, prompt_ids,
                                                                 p.prompt_logprobs, model)
                for index in range(p.n):  # the first choice continues from the scored prompt's cache
                    async for delta in self._one(prompt_ids, p, model, index, grammar, cache if index == 0 else None):
                        if prompt_rows is not None:
                            delta.prompt_logprobs, prompt_rows = prompt_rows, None
                        yield [delta]
        finally:
            self._running -= 1

    def _prompt_logprobs(self, prompt_ids: list[int], k: int, model_name: str) -> tuple[list[dict | None], Any]:
        """(every prompt token's logprob under the model, the KV cache of the prompt but its last token). One forward
        pass over the prompt but its last token gives the logprobs of the tokens after the first; the generation then
        continues from its cache (`_one`), so the prompt is computed once, as vLLM's prefill gives its prompt logprobs
        (`generate` keeps only the last position's logits: scoring through it alone would take a second prefill)."""
        import torch

        if len(prompt_ids) < 2:
            return [None], None
        with self._adapter(model_name), torch.inference_mode():
            out = self.model(torch.tensor([prompt_ids[:-1]], device=self.device), use_cache=True)
        lps = torch.log_softmax(out.logits[0].float(), dim=-1)
        return [None, *(self._lp_row(lp, t, k) for lp, t in zip(lps, prompt_ids[1:]))], out.past_key_values

    def _adapter(self, model_name: str):
        """Select the adapter a model name asks for; the base model's name runs with adapters switched off."""
        if model_name in self.adapters:
            self.model.set_adapter(model_name)
        elif hasattr(self.model, "disable_adapter"):  # a PeftModel, even once its last adapter was unloaded
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter as `name` from now on, without a restart (PEFT's load_adapter). It waits for the
        request in flight (one at a time here), so no answer ever mixes two adapter sets."""
        async with self._lock:
            try:
                await asyncio.to_thread(self._load_adapter, name, path)
            except Exception as exc:  # noqa: BLE001 - a bad folder or a shape mismatch is the admin's 400
                raise EngineRejected(f"cannot load adapter '{name}' from {path}: {type(exc).__name__}: "
                                     f"{str(exc)[:300]}") from None
            self.adapters[name] = str(path)

    def _load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        self._check_adapter(path)  # before PEFT touches a layer: a refused load must change nothing
        if isinstance(self.model, PeftModel):
            try:
                self.model.load_adapter(path, adapter_name=name)
            except Exception:
                if name in self.model.peft_config:  # half-added: drop what PEFT left of it
                    with contextlib.suppress(Exception):
                        self.model.delete_adapter(name)
                raise
        else:
            try:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            except Exception:
                _strip_lora(self.model)  # PEFT injects into the served model in place, then loads: undo the first
                raise
        self.model.eval()

    def _check_adapter(self, path: str) -> None:
        """The adapter fits the served model, or ValueError: a config PEFT reads, a weights file, and every LoRA
        tensor's shape matching the base layer it adapts (PEFT itself injects layers first and fails after)."""
        import torch
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(path)
        folder = Path(path)
        if (folder / "adapter_model.safetensors").is_file():
            from safetensors.torch import load_file

            weights = load_file(str(folder / "adapter_model.safetensors"))
        elif (folder / "adapter_model.bin").is_file():
            weights = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
        else:
            raise ValueError("no adapter weights (adapter_model.safetensors or adapter_model.bin) in the folder")
        if not weights:
            raise ValueError("the adapter's weights file holds no tensors")
        if getattr(config, "peft_type", None) is not None and str(config.peft_type.value) != "LORA":
            raise ValueError(f"only LoRA adapters are served (this one is {config.peft_type.value})")
        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        modules = dict(base.named_modules())
        ranks: dict[str, int] = {}
        for key, tensor in weights.items():
            for part in (".lora_A.", ".lora_B."):
                if part in key:
                    break
            else:
                continue
            module_name = key.split(part)[0].removeprefix("base_model.model.")
            layer = modules.get(module_name)
            if layer is None or not hasattr(layer, "in_features"):
                raise ValueError(f"{key}: the base model has no linear layer {module_name}")
            if tensor.dim() != 2:
                raise ValueError(f"{key}: a {tensor.dim()}-d tensor where LoRA has a matrix")
            if part == ".lora_A." and tensor.shape[1] != layer.in_features:
                raise ValueError(f"{key}: shape {tuple(tensor.shape)} does not fit {module_name} "
                                 f"(in_features {layer.in_features})")
            if part == ".lora_B." and tensor.shape[0] != layer.out_features:
                raise ValueError(f"{key}: shape {tuple(tensor.shape)} does not fit {module_name} "
                                 f"(out_features {layer.out_features})")
            rank = tensor.shape[0] if part == ".lora_A." else tensor.shape[1]
            if ranks.setdefault(module_name, rank) != rank:
                raise ValueError(f"{module_name}: lora_A and lora_B ranks differ")
            if not getattr(config, "rank_pattern", None) and rank != getattr(config, "r", rank):
                raise ValueError(f"{key}: rank {rank}, but the adapter's config says r={config.r}")
        if not ranks:
            raise ValueError("the adapter's weights hold no LoRA matrices")

    async def unload_adapter(self, name: str) -> None:
        async with self._lock:
            if len(self.adapters) == 1:  # the last one: back to the plain model (PEFT's unload drops the LoRA layers)
                self.model = await asyncio.to_thread(self.model.unload)
            else:
                await asyncio.to_thread(self.model.delete_adapter, name)
            del self.adapters[name]

    async def _one(self, prompt_ids: list[int], p: GenParams, model_name: str, index: int,
                   grammar=None, cache=None) -> AsyncIterator[Delta]:
        """One choice, generated in a thread and streamed; `cache`: the KV cache of the prompt but its last token
        (`_prompt_logprobs`), which `generate` then continues from."""
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
                return torch.full((input_ids.shape[0],), stop_flag.is_set(), dtype=torch.bool, device=input_ids.device)

        class Streamer:  # transformers' streamer protocol: put(token ids), end()
            first = True

            def put(self, value):
                if Streamer.first:  # generate() first "puts" the prompt
                    Streamer.first = False
                    return
                loop.call_soon_threadsafe(queue.put_nowait, value.reshape(-1).tolist())  # (.tolist() copies to host)

            def end(self):
                loop.call_soon_threadsafe(queue.put_nowait, None)

        def work():
            try:
                if p.seed is not None:
                    torch.manual_seed(p.seed + index)
                sample = p.temperature > 0
                processors = [RecordLogprobs()]
                if grammar is not None:
                    from xgrammar.contrib.hf import LogitsProcessor as GrammarProcessor

                    processors.insert(0, GrammarProcessor(grammar))  # masked first: logprobs of what could be chosen
                with self._adapter(model_name), torch.inference_mode():
                    self.model.generate(
                        torch.tensor([prompt_ids], device=self.device),
                        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=self.device),
                        max_new_tokens=p.max_tokens, min_new_tokens=p.max_tokens if p.ignore_eos else None,
                        do_sample=sample,
                        temperature=p.temperature if sample else None, top_p=p.top_p if sample else None,
                        top_k=None, streamer=Streamer(), past_key_values=cache,
                        logits_processor=LogitsProcessorList(processors),
                        stopping_criteria=[StopWhenAsked()])
            except BaseException as exc:  # surface it to the awaiting request instead of losing it in the thread
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        eos = set(_eos_ids(self.model.generation_config, self.tokenizer))
        thread = threading.Thread(target=work, daemon=True)
        thread.start()

        def rows(position: int, step: list[int]) -> list[dict]:
            return [self._lp_row(step_logprobs[position + i], t, p.logprobs) for i, t in enumerate(step)]

        try:
            async for delta in stream_deltas(queue, self.tokenizer, p, eos, index, stop_flag, rows):
                yield delta
        finally:
            stop_flag.set()  # client went away or we are done: let the thread finish its step and exit
            await asyncio.to_thread(thread.join)

    def _lp_row(self, lp, token: int, k: int) -> dict:
        top = lp.topk(k) if k else None
        row = {"token": self.tokenizer.decode([token]), "logprob": float(lp[token]), "top": []}
        if top is not None:
            row["top"] = [{"token": self.tokenizer.decode([int(i)]), "logprob": float(v)}
                          for v, i in zip(top.values, top.indices)]
        return row

    async def shutdown(self) -> None:
        self.state = "stopped"
        if self.grammars is not None:
            self.grammars.close()


def _eos_ids(generation_config, tokenizer) -> list[int]:
    eos = generation_config.eos_token_id if generation_config is not None else None
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return eos or [tokenizer.eos_token_id]


def _strip_lora(model) -> None:
    """Put back the base layer of every layer PEFT wrapped in `model` (a failed PeftModel.from_pretrained leaves them
    wrapped, and its random LoRA weights would change every answer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
