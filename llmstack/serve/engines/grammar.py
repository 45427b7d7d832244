"""JSON-Schema grammars compiled against the served vocabulary in a child process: within a time budget, stopped
the moment their client leaves, and cached within a count and a byte bound.

xgrammar's token-level compile is native code that holds its thread until it is done (no cancel, no timeout: a
schema that passes schemas.py's cheap checks can still take tens of seconds on a large vocabulary). Run in a thread
of the API process it could only be waited out; run in a child process it can be killed. So each engine asks a
`Grammars` before generating: the hf engine takes the compiled grammar back (serialised by xgrammar itself), the
vLLM engine only learns that the schema compiles in time — vLLM compiles again in its engine core, where its own
cache is bounded by `VLLM_XGRAMMAR_CACHE_MB` (set by that engine). Compiles run in up to `workers` children at once;
a child killed for a timeout or a departed client is replaced on the next compile."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
from collections import OrderedDict
from typing import Any

from llmstack.serve.engines.base import EngineRejected


def _child(conn, info_json: str, cache_bytes: int) -> None:  # pragma: no cover - runs in the child process
    """The compile loop of one child: (mode, key) in, ("ok", serialised grammar or its size) or ("error", why) out."""
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(info_json), cache_limit_bytes=cache_bytes)
    conn.send(("ready", None))
    while True:
        try:
            mode, key = conn.recv()
        except EOFError:
            return
        try:
            g = (compiler.compile_json_schema(key, any_whitespace=False) if key
                 else compiler.compile_builtin_json_grammar())
            conn.send(("ok", g.serialize_json() if mode == "compile" else g.memory_size_bytes))
        except Exception as exc:  # noqa: BLE001 - xgrammar's refusal is the request's 400, with its reason
            conn.send(("error", str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__))


class _Worker:
    def __init__(self, target, info_json: str, cache_bytes: int):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds torch threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, info_json, cache_bytes), daemon=True,
                                name="llmstack-grammar")
        self.proc.start()
        child.close()
        # a child's start (a Python, xgrammar, the vocabulary) is not charged to the first compile's budget
        if not self.conn.poll(120) or self.conn.recv()[0] != "ready":
            self.kill()
            raise EngineRejected("the grammar compiler process did not start")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class Grammars:
    """Compiled grammars for one tokenizer (see the module docstring). `compiled(schema)` returns xgrammar's
    CompiledGrammar, `check(schema)` only raises `EngineRejected` when it does not compile within `budget_s`;
    `schema=None` is the builtin any-JSON grammar (`response_format: json_object`)."""

    def __init__(self, tokenizer, vocab_size: int | None = None, budget_s: float = 20.0, workers: int = 2,
                 kept: int = 64, bytes_kept: int = 256 << 20, child_cache_bytes: int = 64 << 20, child=_child):
        self.child = child  # what the child process runs (tests slow it down: llmstack.testing.slow_grammar_child)
        self.tokenizer, self.vocab_size, self.budget_s = tokenizer, vocab_size, budget_s
        self.kept, self.bytes_kept, self.child_cache_bytes = kept, bytes_kept, child_cache_bytes
        self._info = None
        self._info_json: str | None = None
        self._idle: list[_Worker] = []
        self._workers: list = []  # every child process started and not stopped, busy or idle
        self._slots = asyncio.Semaphore(workers)
        # a thread per slot waits on its child; as many again start or stop children, so a kill never waits
        self._pool = concurrent.futures.ThreadPoolExecutor(3 * workers, thread_name_prefix="llmstack-grammar")
        self._cache: OrderedDict[str, Any] = OrderedDict()  # key -> CompiledGrammar (compile) or its size (check)
        self.killed = 0  # children stopped for a timeout or a departed client (a test and a metric read it)

    def _tokenizer_info(self):
        import xgrammar as xgr

        if self._info is None:
            self._info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size)
            self._info_json = self._info.serialize_json()
        return self._info

    async def compiled(self, schema: Any | None):
        return await self._get(schema, "compile")

    async def check(self, schema: Any | None) -> None:
        await self._get(schema, "check")

    async def _get(self, schema: Any | None, mode: str):
        key = json.dumps(schema, sort_keys=True) if schema is not None else ""
        hit = self._cache.get(key)
        if hit is not None and (mode == "check" or not isinstance(hit, int)):
            self._cache.move_to_end(key)
            return hit
        loop = asyncio.get_running_loop()
        async with self._slots:
            if self._info is None:
                await loop.run_in_executor(self._pool, self._tokenizer_info)
            if self._idle:
                worker = self._idle.pop()
            else:
                worker = await loop.run_in_executor(self._pool, _Worker, self.child, self._info_json,
                                                    self.child_cache_bytes)
                self._workers.append(worker.proc)
            try:
                worker.conn.send((mode, key))
                status, value = await asyncio.wait_for(loop.run_in_executor(self._pool, worker.conn.recv),
                                                       self.budget_s)
            except BaseException as exc:  # timeout, the client leaving (CancelledError), a dead child: stop it
                self.killed += 1
                self._workers.remove(worker.proc)
                await asyncio.shield(loop.run_in_executor(self._pool, worker.kill))
                if isinstance(exc, asyncio.TimeoutError):
                    raise EngineRejected(f"the JSON Schema did not compile for constrained decoding within "
                                         f"{self.budget_s:g} s: use fewer distinct bounds, enums or alternatives") \
                        from None
                if isinstance(exc, EOFError | OSError):
                    raise EngineRejected("the JSON Schema's compile stopped its worker process") from None
                raise
            self._idle.append(worker)
        if status == "error":
            raise EngineRejected(f"the JSON Schema cannot be compiled for constrained decoding: {value}")
        if mode == "compile":
            import xgrammar as xgr

            value = await loop.run_in_executor(self._pool, xgr.CompiledGrammar.deserialize_json, value, self._info)
        self._keep(key, value)
        return value

    def _keep(self, key: str, value: Any) -> None:
        self._cache[key] = value
        size = lambda v: 0 if isinstance(v, int) else v.memory_size_bytes  # noqa: E731 - a check holds no grammar
        while len(self._cache) > 1 and (len(self._cache) > self.kept
                                        or sum(size(v) for v in self._cache.values()) > self.bytes_kept):
            self._cache.popitem(last=False)

    def close(self) -> None:
        for w in self._idle:
            with contextlib.suppress(Exception):
                w.kill()
        self._idle.clear()
        self._workers.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
