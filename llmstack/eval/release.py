"""The run report's "Release decision": one place that says whether the model a run produced can ship, and on what
evidence — every gate with its 95% interval and verdict, INT4 recovery and the items it would take to decide it,
robustness and bias/safety changes against the base model, and the judge's win rate when one is configured."""

from __future__ import annotations

from typing import Any

from llmstack.eval.tasks import safety_readings


def overall(verdicts: list[dict[str, Any]], has_gates: bool) -> str:
    kinds = {v["verdict"] for v in verdicts}
    if "fail" in kinds:
        return "BLOCKED: a gate failed"
    if "undecided" in kinds:
        return "UNDECIDED: a gate cannot be decided on these items (more items are needed)"
    return "PASS: every gate passed" if has_gates else "NO GATES: nothing decides this release (set eval.gates)"


def _fmt(v: float | None, signed: bool = False) -> str:
    return "–" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


def section(scores: dict[str, dict[str, Any]], verdicts: list[dict[str, Any]], has_gates: bool,
            recovery: dict[str, Any] | None = None, robustness: dict[str, dict[str, Any]] | None = None,
            judge: dict[str, Any] | None = None, base: str = "base") -> list[str]:
    stages = list(scores)
    shipped = stages[-1]
    lines = ["## Release decision", "", f"**{overall(verdicts, has_gates)}** (model evaluated last: `{shipped}`)", ""]
    if verdicts:
        lines += ["| gate | stage | task | n | value [95% CI] | verdict |", "|---|---|---|---|---|---|"]
        for v in verdicts:
            ci = v.get("interval")
            signed = v.get("gate", "").startswith("max_regression")
            value = _fmt(v.get("value"), signed) + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci and signed else
                                                     f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
            lines.append(f"| {v.get('gate', '')} | {v.get('stage', '')} | {v.get('task', '')} | {v.get('n', '')} | "
                         f"{value} | {v['verdict'].upper()} |")
        lines.append("")
    if recovery and recovery.get("items_needed"):
        lines += [f"INT4 recovery (`{recovery['quantized']}` / `{recovery['reference']}`) and the items a paired 95% "
                  "interval needs to decide whether recovery >= 95%:", "",
                  "| task | recovery | n now | n needed |", "|---|---|---|---|"]
        for task, need in recovery["items_needed"].items():
            rec = need.get("recovery")
            n = need.get("n")
            lines.append(f"| {task} | {'–' if rec is None else f'{rec:.1%}'} | {need['n_now']} | "
                         + ("undecidable (exactly at 95%)" if n is None else
                            f"{n}" + (" (enough)" if n <= need["n_now"] else "")) + " |")
        lines.append("")
    if robustness:
        lines += _robustness_vs_base(robustness, base)
    safety = _safety_vs_base(scores, base)
    if safety:
        lines += safety
    if judge:
        lines += [f"Judge: `{judge['a']}` vs `{judge['b']}` win rate **{judge['win_rate']:.3f}** "
                  f"[95% CI {judge['ci95'][0]:.2f}, {judge['ci95'][1]:.2f}] on {judge['n_prompts']} prompts "
                  f"(both orders; 0.5 = no difference; position consistency {judge['position_consistency']:.2f}).", ""]
    return lines


def _robustness_vs_base(rob: dict[str, dict[str, Any]], base: str) -> list[str]:
    """Per stage: the mean change under perturbation and the mean consistency over every task and perturbation,
    and both against the base model's (negative = less robust than base)."""
    summary = {}
    for stage, per_task in rob.items():
        changes = [r["delta"][0] for kinds in per_task.values() for r in kinds.values() if r.get("delta")]
        cons = [r["consistency"] for kinds in per_task.values() for r in kinds.values()
                if r.get("consistency") is not None]
        summary[stage] = (sum(changes) / len(changes) if changes else None, sum(cons) / len(cons) if cons else None)
    ref = summary.get(base)
    lines = ["Robustness (mean over tasks and perturbations):", "",
             "| stage | score change under perturbation | consistency | vs base: change | vs base: consistency |",
             "|---|---|---|---|---|"]
    for stage, (chg, con) in summary.items():
        d_chg = None if not ref or chg is None or ref[0] is None or stage == base else chg - ref[0]
        d_con = None if not ref or con is None or ref[1] is None or stage == base else con - ref[1]
        lines.append(f"| {stage} | {_fmt(chg, True)} | {_fmt(con)} | {_fmt(d_chg, True)} | {_fmt(d_con, True)} |")
    return lines + [""]


def _safety_vs_base(scores: dict[str, dict[str, Any]], base: str) -> list[str]:
    rows = []
    for task, (key, label, better) in safety_readings():  # each safety task's readings (llmstack/eval/tasks.py)
        values = {s: scores[s].get(task, {}).get("all", {}).get(key) for s in scores}
        if all(v is None for v in values.values()):
            continue
        ref = values.get(base)
        cells = []
        for s, v in values.items():
            delta = "" if s == base or v is None or ref is None else f" ({v - ref:+.3f})"
            cells.append(_fmt(v) + delta)
        rows.append(f"| {label} | {'→ 0' if better == 'zero' else 'higher'} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["Bias and safety (change vs base in brackets):", "",
            "| reading | better | " + " | ".join(scores) + " |", "|---|---|" + "---|" * len(scores), *rows, ""]
