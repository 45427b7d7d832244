"""The thinking-budget curve (`eval.thinking_budgets`): each stage's generation tasks scored with its thinking capped at
each budget (llmstack/eval/thinking.py generates), as a table of score [95% CI] and tokens spent per budget, and a
plot of score against budget with one line per stage and task.

Budget 0 is `off` (the template's empty thinking block). A stage whose chat template has no thinking answers the same
at every budget, so it is scored once and its rows say so.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from llmstack.config.eval_suites import Suite
from llmstack.eval.run import Target, evaluate
from llmstack.eval.tasks import get_task


def mode(budget: int) -> str:
    """The eval.thinking mode a budget is scored in."""
    return "off" if budget == 0 else f"budget:{budget}"


def generation_tasks(suite: Suite, tasks: list[str] | None) -> list[str]:
    """The tasks of a suite (or of `tasks`) whose answers lm-eval generates: the ones thinking changes."""
    names = [t.name for t in suite.tasks if tasks is None or t.name in tasks]
    return [n for n in names if not get_task(n).scores_choices() and get_task(n).in_process is None]


def curve(target: Target, suite: Suite, budgets: list[int], main: dict[str, Any], limit: int | None,
          identity_name: str, samples_dir: Path, tasks: list[str] | None = None) -> dict[int, dict[str, Any]]:
    """{budget: {task: result}} for one target. `main`: its scores in the eval's own mode, which a budget scored the
    same way reuses (and which tells whether its template thinks at all)."""
    names = generation_tasks(suite, tasks)
    if not names:
        return {}
    thinks = any((main.get(t, {}).get("thinking") or {}).get("template_thinks") for t in names)
    out: dict[int, dict[str, Any]] = {}
    for b in budgets:
        if not thinks or mode(b) == target.thinking:  # the same evaluation as the main one
            out[b] = {t: main[t] for t in names}
            continue
        out[b] = evaluate(replace(target, thinking=mode(b)), suite, limit=limit, identity_name=identity_name,
                          samples_dir=samples_dir / f"budget-{b}", tasks=names)
    return out


def spent_markdown(scores: dict[str, dict[str, Any]], thinking: str) -> list[str]:
    """The report's tokens table: what each stage's generation tasks spent per item in the eval's thinking mode."""
    rows = [(stage, task, r) for stage, res in scores.items() for task, r in res.items() if r.get("tokens")]
    if not rows:
        return []
    lines = [f"Tokens generated per item (mean), thinking `{thinking}`; scores are of the answer alone:", "",
             "| stage | task | template thinks | thinking tokens | answer tokens | total |",
             "|---|---|---|---|---|---|"]
    for stage, task, r in rows:
        tok, thinks = r["tokens"], (r.get("thinking") or {}).get("template_thinks")
        lines.append(f"| {stage} | {task} | {'yes' if thinks else 'no (every mode the same)'} | "
                     f"{tok['thinking_mean']} | {tok['answer_mean']} | {tok['total_mean']} |")
    return lines + [""]


def markdown(curves: dict[str, dict[int, dict[str, Any]]], main: dict[str, dict[str, Any]] | None = None,
             thinking: str = "on") -> list[str]:
    """The report's table: one row per stage, task and budget, after the row of the eval's own mode (`main`: the
    stages' scores in it) for comparison."""
    lines = ["## Thinking budget", "",
             "Generation tasks scored with thinking capped at each budget (tokens; 0 = `off`, an empty thinking "
             f"block) and in the eval's own mode (`{thinking}`), on the answer alone; tokens are means per item.", "",
             "| stage | task | thinking | score [95% CI] | thinking tokens | answer tokens |",
             "|---|---|---|---|---|---|"]
    notes = []
    for stage, per_budget in curves.items():
        rows = [(f"`{thinking}`", t, r) for t, r in (main or {}).get(stage, {}).items()
                if any(t in res for res in per_budget.values())]
        rows += [(str(budget), t, r) for budget, results in per_budget.items() for t, r in results.items()]
        for label, task, r in rows:
            v, ci, tok = r.get("score"), r.get("ci95"), r.get("tokens") or {}
            cell = "–" if v is None else f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
            lines.append(f"| {stage} | {task} | {label} | {cell} | {tok.get('thinking_mean', '–')} | "
                         f"{tok.get('answer_mean', '–')} |")
            if not (r.get("thinking") or {}).get("template_thinks") and stage not in notes:
                notes.append(stage)
    lines.append("")
    for stage in notes:
        lines += [f"`{stage}`'s chat template has no thinking: on, off and every budget are the same evaluation "
                  "(scored once).", ""]
    return lines


def plot(curves: dict[str, dict[int, dict[str, Any]]], path: Path) -> Path:
    """Score against thinking budget, one line (with its 95% interval) per stage and task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    tasks = list(dict.fromkeys(t for per in curves.values() for res in per.values() for t in res))
    for stage, per_budget in curves.items():
        budgets = sorted(per_budget)
        for task in tasks:
            rows = [(b, per_budget[b][task]) for b in budgets if task in per_budget[b]]
            vals = [r.get("score") or 0.0 for _, r in rows]
            cis = [r.get("ci95") or [v, v] for (_, r), v in zip(rows, vals)]
            errors = [[max(0.0, v - lo) for v, (lo, _) in zip(vals, cis)],
                      [max(0.0, hi - v) for v, (_, hi) in zip(vals, cis)]]
            label = stage if len(tasks) == 1 else f"{stage} {task}"
            ax.errorbar([b for b, _ in rows], vals, yerr=errors, marker="o", capsize=3, label=label)
    ax.set_xlabel("thinking budget (tokens)")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.set_title("score vs thinking budget" + (f" ({tasks[0]})" if len(tasks) == 1 else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
