"""Comparing the stages a run evaluated: the gates' verdicts (and the error a failed gate raises), the score table and
the bar chart of the eval section. The scores come from llmstack/eval/run.py's `evaluate`, one dict per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmstack.eval.stats import paired_bootstrap


class EvalGateError(ValueError):
    """A gate failed. A ValueError so the CLI prints it as a one-line error."""


def gate_verdicts(scores: dict[str, dict[str, Any]], gates, base: str = "base") -> list[dict[str, str]]:
    """One verdict per gate and task: {"verdict": pass | fail | undecided, "message", "gate", "stage", "task",
    "value" (the score; for max_regression the change vs base), "interval" (its 95% interval, or the paired change's
    at `level`; None when unknown), "n"}. `min` judges the last stage
    evaluated (the model the recipe ships: an intermediate stage like cpt need not know its name yet) by its score, and
    says so when the score's 95% interval still straddles the threshold (too few items to be sure either way).
    `max_regression` judges every stage against `base`, paired on the same items: a drop fails only when the whole
    95% interval of the paired difference lies beyond the allowed drop; a larger point drop whose interval still
    reaches the allowed range is `undecided` (reported, not failed). Without per-item scores, the point estimates
    decide."""
    verdicts = []
    last = list(scores)[-1]
    for task, threshold in gates.min.items():
        res = scores[last].get(task, {})
        got, ci = res.get("score"), res.get("ci95")
        if got is None:
            verdicts.append({"verdict": "fail",
                             "message": f"{last}: gate min.{task} = {threshold}: task was not scored"})
            continue
        verdict = "fail" if got < threshold else "pass"
        message = (f"{last}: {task} = {got:.4f} is below the gate min.{task} = {threshold}" if verdict == "fail" else
                   f"{last}: {task} = {got:.4f} meets min.{task} = {threshold}")
        if ci and ci[0] < threshold <= ci[1]:
            message += (f" (but its 95% interval [{ci[0]:.2f}, {ci[1]:.2f}] on {res.get('n')} items straddles the "
                        f"threshold: more items are needed to be sure)")
        verdicts.append({"verdict": verdict, "message": message, "gate": f"min.{task} >= {threshold}",
                         "stage": last, "task": task, "value": got, "interval": ci, "n": res.get("n")})
    if gates.max_regression is not None and base in scores:
        allowed = gates.max_regression
        for stage in scores:
            if stage == base:
                continue
            for task, res in scores[stage].items():
                ref = scores[base].get(task, {})
                if ref.get("score") is None or res.get("score") is None:
                    continue
                drop = ref["score"] - res["score"]
                a, b = ref.get("items"), res.get("items")
                where, significant = "", drop > allowed + 1e-12  # without items: the point estimates decide
                interval = None
                if a and b and len(a) == len(b):
                    _, lo, hi = paired_bootstrap(a, b, level=gates.level)
                    interval = [round(lo, 4), round(hi, 4)]
                    where = (f" (paired on {len(a)} items, {gates.level:.0%} interval of the change "
                             f"[{lo:+.3f}, {hi:+.3f}])")
                    significant = hi < -allowed - 1e-12
                if significant:
                    verdict, message = "fail", (f"{stage}: {task} = {res['score']:.4f} dropped {drop:.4f} from base "
                                                f"{ref['score']:.4f}, more than max_regression = {allowed}{where}")
                elif drop > allowed + 1e-12:
                    verdict, message = "undecided", (f"{stage}: {task} dropped {drop:.4f} from base, more than "
                                                     f"max_regression = {allowed}, but not significantly{where}: more "
                                                     "items are needed to decide")
                else:
                    verdict, message = "pass", f"{stage}: {task} within max_regression{where}"
                verdicts.append({"verdict": verdict, "message": message, "gate": f"max_regression {allowed}",
                                 "stage": stage, "task": task, "value": res["score"] - ref["score"],
                                 "interval": interval,
                                 "n": len(a) if interval else res.get("n")})
    return verdicts


def check_gates(scores: dict[str, dict[str, Any]], gates, base: str = "base") -> list[str]:
    """The failed gates' messages (see gate_verdicts)."""
    return [v["message"] for v in gate_verdicts(scores, gates, base) if v["verdict"] == "fail"]


def markdown_table(scores: dict[str, dict[str, Any]]) -> str:
    stages = list(scores)
    tasks = list(dict.fromkeys(t for s in stages for t in scores[s]))
    lines = ["| task | metric | n | " + " | ".join(stages) + " |", "|---|---|---|" + "---|" * len(stages)]
    for task in tasks:
        first = next(scores[s][task] for s in stages if task in scores[s])
        cells = []
        for s in stages:
            r = scores[s].get(task, {})
            v, ci = r.get("score"), r.get("ci95")
            cells.append("–" if v is None else f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        lines.append(f"| {task} | {first['metric'].replace(',none', '')} | {first['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(scores: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(scores)
    tasks = list(dict.fromkeys(t for s in stages for t in scores[s]))
    width = 0.8 / max(len(stages), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks) + 2), 4))
    for i, stage in enumerate(stages):
        vals = [scores[stage].get(t, {}).get("score") or 0.0 for t in tasks]
        cis = [scores[stage].get(t, {}).get("ci95") or [v, v] for t, v in zip(tasks, vals)]
        errors = [[max(0.0, v - lo) for v, (lo, _) in zip(vals, cis)],
                  [max(0.0, hi - v) for v, (_, hi) in zip(vals, cis)]]
        ax.bar([x + i * width for x in range(len(tasks))], vals, width, label=stage, yerr=errors, capsize=2)
    ax.set_xticks([x + width * (len(stages) - 1) / 2 for x in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
