"""Pipeline stage `eval`: score every stage named in eval.stages with lm-eval over the recipe's suite, compare them,
chart them, report INT4 recovery, then apply the gates (a failed gate fails the run). The scoring itself is
llmstack/eval/run.py, the comparison llmstack/eval/compare.py.

A GGUF export (`quantize.gguf`) is named `gguf-<type>` in eval.stages and scored through llama.cpp: the file is served
by our own API with the llamacpp engine on a loopback port of this process (llmstack/serve/local.py) and lm-eval
scores it through the `server` backend — the same requests, chat template and prompt logprobs a user of the export
gets. Its recovery vs the 16-bit model is reported like INT4's."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmstack.config.eval_suites import load_suite
from llmstack.device import policy
from llmstack.eval import budget as budgets
from llmstack.eval import judge as judging
from llmstack.eval import release
from llmstack.eval import robustness as robust
from llmstack.eval.compare import EvalGateError, bar_chart, gate_verdicts, markdown_table
from llmstack.eval.run import Target, evaluate, resolve_folder
from llmstack.eval.stats import items_needed, paired_bootstrap
from llmstack.eval.tasks import get_task
from llmstack.stage import StageContext, StageResult

log = logging.getLogger("llmstack")


GGUF_PREFIX = "gguf-"


def _gguf_file(ctx, name: str) -> Path:
    """eval.stages' `gguf-<type>`: the quantize stage's GGUF of that type (<stage>/gguf/<name>-<TYPE>.gguf)."""
    quant = ctx.models.get("int4") or ctx.models.get("int8") or ctx.models.get("quantize")
    kind = name.removeprefix(GGUF_PREFIX)
    files = sorted((Path(quant).parent / "gguf").glob(f"*-{kind.upper()}.gguf")) if quant else []
    if len(files) != 1:
        raise ValueError(f"eval.stages names '{name}', but the quantize stage wrote no {kind} GGUF: add {kind} to "
                         f"quantize.gguf")
    return files[0]


@contextlib.contextmanager
def _target(ctx, spec, name: str, served: dict[str, Path], backend: str) -> Iterator[Target]:
    """What scores stage `name`: its folder in-process, or for a GGUF the llamacpp engine behind our API for as long
    as the block runs."""
    if not name.startswith(GGUF_PREFIX):
        model, adapter = resolve_folder(served.get(name) or _stage_model(ctx, name))
        yield Target(model=model, adapter=adapter, backend=backend, batch_size=spec.batch_size,
                     tool_choice=spec.tool_choice, thinking=spec.thinking,
                     dtype=None if spec.dtype == "auto" else spec.dtype)
        return
    if spec.thinking != "on" or spec.thinking_budgets:
        raise ValueError(f"eval.stages: '{name}' is scored through a server, which renders its template with "
                         "thinking as the model has it: leave eval.thinking at `on` and eval.thinking_budgets unset "
                         "to evaluate a GGUF export")
    from llmstack.serve.local import gguf_target

    with gguf_target(_gguf_file(ctx, name), _gguf_context(ctx), spec.tool_choice) as target:
        yield target


def _gguf_context(ctx) -> int:
    """The context the GGUF is scored with: the 16-bit reference's as lm-eval's hf backend resolves it (so long
    prompts are cut the same way on both), at most GGUF_CONTEXT."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig, AutoTokenizer

    from llmstack.serve.local import GGUF_CONTEXT

    model, _ = resolve_folder(_stage_model(ctx, _reference(ctx)))
    length = resolve_max_length(AutoConfig.from_pretrained(str(model)), AutoTokenizer.from_pretrained(str(model)))
    return min(length, GGUF_CONTEXT)


def _reference(ctx) -> str:
    """The stage a quantized model was made from: the last trained one (a reward model does not answer), or base."""
    trained = [s.id for s in ctx.recipe.stages if s.type not in ("reward",)]
    return trained[-1] if trained else "base"


def _stage_model(ctx, name: str) -> Path:
    models = ctx.models
    if name == "int4":
        folder = models.get("int4") or models.get("quantize")
    else:
        folder = models.get(name)
    if folder is None:
        raise ValueError(f"eval.stages names '{name}', but no model was produced under that name "
                         f"(have: {', '.join(models) or 'none'})")
    return Path(folder)


def _served_instead(ctx, stages: list[str]) -> tuple[dict[str, Path], str | None]:
    """({name: folder}, why) for an export the serve stage will serve in place of a quantized model evaluated here:
    where the recipe serves with vLLM and this machine has no vLLM kernel for that model (INT4 on an x86 CPU without
    AVX-512), vLLM serves the quantize stage's fallback export (W8A8). It is scored too, as `served-<scheme>` after
    the rest, so the release gates (`min` judges the last model) decide on what is actually served."""
    recipe, run_ = getattr(ctx, "recipe", None), getattr(ctx, "run", None)
    if not (recipe and recipe.serve and recipe.serve.engine == "vllm" and not recipe.serve.model and run_):
        return {}, None
    from llmstack.stages.serve import serving_target

    for name in stages:
        if name in ("int4", "int8"):
            folder = _stage_model(ctx, name)
            served, _, _, why = serving_target("vllm", folder, run_.manifest)
            if served != folder:
                label = f"served-{served.name}"
                return {label: served}, (f"`{label}` is what vLLM serves for `{name}` on this machine ({why}); "
                                         "transformers scores it with its int8 weights but unquantized activations "
                                         "(vLLM quantizes them per token), so its score can read a little high.")
    return {}, None


def run(ctx: StageContext) -> StageResult:
    spec = ctx.spec
    suite = load_suite(spec.suite)
    backend = policy().eval_backend if spec.backend == "auto" else spec.backend
    if spec.judge and spec.judge.dataset and spec.judge.dataset not in ctx.datasets:  # before any model loads
        raise ValueError(f"eval.judge.dataset: no curated dataset '{spec.judge.dataset}' in this run "
                         f"(have: {', '.join(ctx.datasets) or 'none'})")
    scores: dict[str, dict[str, Any]] = {}
    rob: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[int, dict[str, Any]]] = {}
    served, served_why = _served_instead(ctx, spec.stages)
    for name in (n for n in spec.stages if n.startswith(GGUF_PREFIX)):  # before any model loads
        _gguf_file(ctx, name)
    for name in [*spec.stages, *served]:
        with _target(ctx, spec, name, served, backend) as target:
            log.info("eval %s on suite %s (%s)", name, suite.name, target.backend)
            scores[name] = evaluate(target, suite, limit=spec.limit, identity_name=spec.identity_name,
                                    samples_dir=ctx.dir / "samples" / name, tasks=spec.tasks)
            if spec.thinking_budgets:
                log.info("eval %s at thinking budgets %s", name, spec.thinking_budgets)
                curves[name] = budgets.curve(target, suite, spec.thinking_budgets, scores[name], spec.limit,
                                             spec.identity_name, ctx.dir / "samples" / name, tasks=spec.tasks)
            if spec.robustness:
                r = spec.robustness
                rob[name] = robust.robustness(target, suite, r.perturbations, seed=r.seed, limit=spec.limit,
                                              tasks=r.tasks or spec.tasks, identity_name=spec.identity_name,
                                              clean=scores[name], samples_dir=ctx.dir / "samples" / f"{name}-perturbed")
    (ctx.dir / "scores.json").write_text(json.dumps(scores, indent=2))
    if rob:
        (ctx.dir / "robustness.json").write_text(json.dumps(rob, indent=2))
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        (ctx.dir / "thinking_budget.json").write_text(json.dumps(curves, indent=2))
    chart = bar_chart(scores, ctx.dir / "eval.png", title=f"suite {suite.name}")
    judged = _judge(ctx, spec, backend) if spec.judge else None
    verdicts = gate_verdicts(scores, spec.gates)
    problems = [v["message"] for v in verdicts if v["verdict"] == "fail"]
    undecided = [v["message"] for v in verdicts if v["verdict"] == "undecided"]
    recovery = quantization_recovery(ctx, scores)
    gguf_recovery = {n: r for n in scores if n.startswith(GGUF_PREFIX) and (r := quantization_recovery(ctx, scores, n))}
    section = release.section(scores, verdicts, _has_gates(spec.gates), recovery, rob, judged)
    section += [f"## Evaluation (suite `{suite.name}`, backend `{backend}`)", "", markdown_table(scores), "",
                f"![eval scores per stage]({chart.name})", ""] + ([served_why, ""] if served_why else [])
    section += budgets.spent_markdown(scores, spec.thinking)
    if curves:
        budget_chart = budgets.plot(curves, ctx.dir / "thinking_budget.png")
        section += budgets.markdown(curves, scores, spec.thinking) + [
            f"![score vs thinking budget]({budget_chart.name})", ""]
    for rec in [*([recovery] if recovery else []), *gguf_recovery.values()]:
        section += _recovery_table(rec)
    for name, r in rob.items():
        section += [f"Robustness of `{name}` (seed {spec.robustness.seed}): clean vs perturbed on the same items; "
                    "consistency = the same answer on both:", "", *robust.markdown_table(r), ""]
    if judged:
        section += judging.markdown(judged) + ["Raw verdicts: `judge.jsonl`.", ""]
    for task in scores[spec.stages[-1]]:  # what a task adds to the report from its logged samples (identity's answers)
        if (report := get_task(task).report) is not None:
            section += report(ctx.dir / "samples", spec.stages)
    gate_lines = [f"- FAILED {p}" for p in problems] + [f"- UNDECIDED {u}" for u in undecided]
    if not gate_lines:
        gate_lines = ["- all gates passed" if _has_gates(spec.gates) else "- no gates configured"]
    section += ["", "Gates:", *gate_lines, ""]
    (ctx.dir / "section.md").write_text("\n".join(section))
    if problems:
        raise EvalGateError("eval gate failed: " + "; ".join(problems))
    metrics = {stage: {t: r["score"] for t, r in res.items()} for stage, res in scores.items()}
    if undecided:
        metrics["gates_undecided"] = undecided
    if recovery:
        metrics["recovery"] = recovery
    if gguf_recovery:
        metrics["recovery_gguf"] = gguf_recovery
    outputs = {"scores": ctx.dir / "scores.json", "chart": chart}
    if rob:
        outputs["robustness"] = ctx.dir / "robustness.json"
    if curves:
        outputs["thinking_budget"] = ctx.dir / "thinking_budget.json"
        metrics["thinking_budget"] = {stage: {b: {t: r["score"] for t, r in res.items()} for b, res in per.items()}
                                      for stage, per in curves.items()}
    if judged:
        outputs["judge"] = ctx.dir / "judge.jsonl"
        metrics["judge"] = judged
    return StageResult(outputs=outputs, metrics=metrics)


def _judge(ctx, spec, backend: str) -> dict[str, Any]:
    """Both stages answer the judge's prompt set (greedy, chat template), then the judge compares them pairwise."""
    import os

    from llmstack.paths import SUITES_DIR

    j = spec.judge
    a, b = j.a or spec.stages[-1], j.b or spec.stages[0]
    key = None
    if j.api_key_env:
        key = os.environ.get(j.api_key_env)
        if not key:
            raise ValueError(f"eval.judge.api_key_env names {j.api_key_env}, which is not set: export it with the "
                             "judge's API key (or drop api_key_env for a judge without keys)")
    if j.dataset:
        prompts = judging.held_out_prompts(ctx.datasets[j.dataset], j.limit)
    else:
        prompts = judging.read_prompts(Path(j.prompts) if j.prompts else SUITES_DIR / "data" / "judge_prompts.jsonl",
                                       j.limit)
    answers = {}
    for name in (a, b):
        model, adapter = resolve_folder(_stage_model(ctx, name))
        log.info("judge: %s answers %d prompts", name, len(prompts))
        answers[name] = judging.generate_answers(Target(model=model, adapter=adapter, backend=backend,
                                                        batch_size=spec.batch_size), prompts, j.max_tokens)
    log.info("judge: %s at %s compares %s with %s", j.model, j.base_url, a, b)
    result = judging.compare(prompts, answers[a], answers[b],
                             judging.openai_judge(j.base_url, j.model, key, max_tokens=j.judge_max_tokens),
                             names=(a, b), raw_path=ctx.dir / "judge.jsonl")
    (ctx.dir / "judge.json").write_text(json.dumps(result.summary, indent=2))
    return result.summary


def quantization_recovery(ctx, scores: dict[str, dict[str, Any]], quant: str | None = None) -> dict[str, Any] | None:
    """Quality recovery of the quantized model (`quant`: by default the INT4/INT8 stage; or a `gguf-<type>`): its
    score / the score of the model it was made from, per task and averaged over tasks whose reference score is above
    zero (a ratio to zero says nothing)."""
    quant = quant or next((s for s in ("int4", "int8") if s in scores), None)
    if quant is None:
        return None
    source = _reference(ctx)
    if source not in scores:
        return None
    per_task, paired, needed = {}, {}, {}
    for task, res in scores[quant].items():
        ref = scores[source].get(task, {}).get("score")
        if ref and res.get("score") is not None:
            per_task[task] = round(res["score"] / ref, 4)
        a, b = scores[source].get(task, {}).get("items"), res.get("items")
        if a and b and len(a) == len(b):  # the same items, in the same order: the difference is paired
            paired[task] = [round(x, 4) for x in paired_bootstrap(a, b)]
            if sum(a):  # recovery is a ratio to the reference's score: nothing to decide when that is 0
                needed[task] = {k: (round(v, 4) if isinstance(v, float) else v)
                                for k, v in items_needed(a, b, threshold=0.95).items()}
    mean = round(sum(per_task.values()) / len(per_task), 4) if per_task else None
    return {"quantized": quant, "reference": source, "per_task": per_task, "mean": mean,
            "paired_difference": paired, "items_needed": needed}


def _recovery_table(rec: dict[str, Any]) -> list[str]:
    lines = [f"Quality recovery of `{rec['quantized']}` vs `{rec['reference']}` (quantized score / unquantized), and "
             "the paired difference on the same items (quantized - unquantized, 95% bootstrap interval; an interval "
             "that contains 0 means these items cannot tell the two apart):", "",
             "| task | recovery | paired difference [95% CI] |", "|---|---|---|"]
    paired = rec.get("paired_difference", {})
    for t, v in rec["per_task"].items():
        d = paired.get(t)
        lines.append(f"| {t} | {v:.1%} | " + (f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "n/a") + " |")
    lines += [f"| **mean** | **{rec['mean']:.1%}** | |" if rec["mean"] is not None else "| mean | n/a | |", ""]
    return lines


def _has_gates(gates) -> bool:
    return bool(gates.min) or gates.max_regression is not None
