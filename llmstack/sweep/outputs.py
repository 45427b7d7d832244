"""What a sweep leaves in its folder (runs/<recipe>/sweep-<study>/), written from the study's storage, so a resumed
or already-finished sweep writes the same files:

    trials.jsonl        one line per trial: number, state, objective value and its 95% interval, values, run folder,
                        stages reused from the base run, the failure reason, where a pruned trial was stopped
    best_recipe.yaml    the recipe with the best trial's values, without its sweep block: `llmstack run` runs it
    importances.json    Optuna's parameter importances (from 2 complete trials on), or why there are none
    objective.png       the objective per trial with its interval, and the best so far
    sweep.md            the section a report includes: trials table, best values, importances, the plot
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from llmstack.config.sweep import apply


def trial_rows(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        # a pruned trial's Optuna value is its last intermediate value (the pruner's metric), not the objective
        value = t.value if t.state.name == "COMPLETE" else None
        rows.append({"number": t.number, "state": t.state.name, "value": value, "ci95": a.get("ci95"),
                     "n": a.get("n"), "params": t.params, "run_dir": a.get("run_dir"), "reused": a.get("adopted"),
                     "wall_s": a.get("wall_s"), "steps": a.get("steps"),
                     "error": a.get("error") or a.get("interrupted") or _pruned_note(a)})
    return rows


def _pruned_note(attrs: dict[str, Any]) -> str | None:
    if attrs.get("pruned_at") is None:
        return None
    return (f"pruned at step {attrs['pruned_at']}: the pruner's metric read {fmt(attrs['last_value'])} at its last "
            f"evaluation (step {attrs['last_step']})")


def best_trial(study):
    """The best complete trial, or None when no trial completed."""
    from optuna.trial import TrialState

    return study.best_trial if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None


def importances(study) -> dict[str, Any]:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {"importances": None, "reason": f"{len(complete)} complete trial(s); importances need at least 2"}
    try:
        import optuna

        return {"importances": optuna.importance.get_param_importances(study), "trials": len(complete)}
    except (RuntimeError, ValueError) as exc:  # e.g. every complete trial has the same values
        return {"importances": None, "reason": f"{type(exc).__name__}: {exc}"}


def plot(rows: list[dict[str, Any]], out: Path, task: str, maximize: bool) -> Path | None:
    """Objective per trial with its 95% interval, and the best so far. Plain matplotlib rather than
    optuna.visualization.matplotlib.plot_optimization_history: that one has no place for the intervals."""
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs, ys = [r["number"] for r in done], [r["value"] for r in done]
    lo = [y - r["ci95"][0] if r["ci95"] else 0 for y, r in zip(ys, done, strict=True)]
    hi = [r["ci95"][1] - y if r["ci95"] else 0 for y, r in zip(ys, done, strict=True)]
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=f"{task} (95% interval)")
    best, so_far = [], None
    for y in ys:
        so_far = y if so_far is None else (max(so_far, y) if maximize else min(so_far, y))
        best.append(so_far)
    ax.step(xs, best, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(task)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict[str, Any]], best, imp: dict[str, Any], objective: Any, chart: Path | None) -> list[str]:
    keys = list(rows[0]["params"]) if rows else []
    lines = [f"## Sweep: {objective.task} on `{objective.stage}` ({objective.direction})", "",
             "| trial | state | " + " | ".join(f"`{k}`" for k in keys) + f" | {objective.task} [95% CI] | note |",
             "|---|---|" + "---|" * len(keys) + "---|---|"]
    for r in rows:
        ci = f" [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r["ci95"] else ""
        value = f"{r['value']:.3f}{ci}" if r["value"] is not None else "—"
        note = (r["error"] or "")[:80].replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['number']} | {r['state']} | " + " | ".join(fmt(r["params"].get(k)) for k in keys)
                     + f" | {value} | {note} |")
    lines.append("")
    if best is not None:
        lines += [f"Best: trial {best.number}, {objective.task} = {best.value:.3f}: "
                  + ", ".join(f"`{k}` = {fmt(v)}" for k, v in best.params.items())
                  + " (written out as `best_recipe.yaml`).", ""]
    else:
        lines += ["No trial completed.", ""]
    if imp["importances"]:
        lines += ["Parameter importances (Optuna): " + ", ".join(f"`{k}` {v:.2f}" for k, v in
                                                                   imp["importances"].items()), ""]
    else:
        lines += [f"Parameter importances: none ({imp['reason']}).", ""]
    if chart:
        lines += [f"![{objective.task} per trial]({chart.name})", ""]
    return lines


def write(study, out: Path, raw: dict[str, Any], objective: Any) -> dict[str, Any]:
    """Write every file of the sweep folder; returns {rows, best, importances, files}."""
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    with open(out / "trials.jsonl", "w") as f:
        f.writelines(json.dumps(r, default=str) + "\n" for r in rows)
    best = best_trial(study)
    files = {"trials": out / "trials.jsonl"}
    if best is not None:
        files["best_recipe"] = out / "best_recipe.yaml"
        files["best_recipe"].write_text(f"# the best trial ({best.number}) of sweep '{study.study_name}': "
                                        f"{objective.task} = {best.value:.4f}\n"
                                        + yaml.safe_dump(apply(raw, best.params), sort_keys=False))
    imp = importances(study)
    files["importances"] = out / "importances.json"
    files["importances"].write_text(json.dumps(imp, indent=2))
    chart = plot(rows, out / "objective.png", objective.task, objective.direction == "maximize")
    if chart:
        files["plot"] = chart
    files["section"] = out / "sweep.md"
    files["section"].write_text("\n".join(markdown(rows, best, imp, objective, chart)))
    return {"rows": rows, "best": best, "importances": imp, "files": files}
