"""A finished recipe run as a benchmark record: what each stage cost (wall seconds, and the training stages' own
figures: steps, tokens/s, losses, rewards, episode failures) and what its eval stage measured, where the recipe has
one (every model's score per task, with its 95% interval, item count and the task's other readings). Ratios: each
evaluated model's score over the base model's on each task (where the base scored above zero) and the run's wall
time over its goal (`--goal-min`).

Run it after `llmstack run RECIPE` (or on a sweep trial's run folder); it reads the run's manifest and its eval
stage's scores.json, and runs nothing itself:

    .venv/bin/python scripts/bench_recipe.py runs/agent/default --goal-min 25
    .venv/bin/python scripts/bench_recipe.py runs/agent/default --note "ran beside other work: wall times not quiet"

Record: `recipe-<recipe name>` (scripts/benchrecord.py). The load average the record carries is the one when this
script ran, not during the run: say in --note whether the box was quiet while the recipe ran.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import benchrecord

# the training stages' metrics worth keeping beside the wall time (the rest is in the run folder)
STAGE_FIGURES = ("steps", "tokens_per_s", "train_loss", "first_loss", "last_loss", "reward_first", "reward_last",
                 "rewards_margins_first", "rewards_margins_last", "episode_failures", "tool_calls_per_episode_last")


def stages(manifest: dict) -> list[dict]:
    rows = []
    for name, entry in manifest["stages"].items():
        metrics = entry.get("metrics") or {}
        rows.append({"stage": name, "kind": entry.get("kind"), "status": entry.get("status"),
                     "wall_s": entry.get("wall_s"), "reused_from": entry.get("reused_from"),
                     **{k: metrics[k] for k in STAGE_FIGURES if k in metrics}})
    return rows


def scores(manifest: dict) -> dict[str, dict[str, dict]]:
    """{model: {task: {score, metric, n, ci95, all}}} from the eval stage's scores.json; {} for a recipe without one
    (its record has the stages' costs and training figures only)."""
    if "eval" not in manifest["stages"]:
        print("the recipe has no eval stage: the record holds its stages' costs and training figures")
        return {}
    entry = manifest["stages"]["eval"]
    if entry.get("status") != "done":
        raise SystemExit(f"the run's eval stage has not finished (status: {entry.get('status', 'not run')})")
    path = Path(entry["outputs"]["scores"]["path"])
    keep = ("score", "metric", "n", "ci95", "all")
    return {model: {task: {k: r[k] for k in keep if k in r} for task, r in tasks.items()}
            for model, tasks in json.loads(path.read_text()).items() if isinstance(tasks, dict)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a finished run's folder (holds manifest.json)")
    ap.add_argument("--goal-min", type=float, default=None, help="the recipe's wall-time goal in minutes")
    ap.add_argument("--note", default=None, help="what the record should say about the run (e.g. the box's load)")
    benchrecord.add_argument(ap)
    args = ap.parse_args()

    manifest = json.loads((args.run_dir / "manifest.json").read_text())
    # the recipe's name: the run folder is runs/<name>/<run id> (a sweep's trials too, whose recipe files are named
    # after the trial)
    recipe = args.run_dir.resolve().parent.name
    rows = stages(manifest)
    evals = scores(manifest)
    wall = sum(r["wall_s"] or 0 for r in rows if not r["reused_from"])
    ratios, goals = {}, {}
    base = evals.get("base", {})
    for model, tasks in evals.items():
        for task, r in tasks.items():
            print(f"{model:>8} {task:<18} {r['score']:.3f}  95% CI {r.get('ci95')}  n={r.get('n')}")
            if model != "base" and (base.get(task) or {}).get("score"):
                ratios[f"{model}_vs_base_{task}"] = r["score"] / base[task]["score"]
    if args.goal_min:
        ratios["wall_vs_goal"] = wall / (args.goal_min * 60)
        goals["wall_vs_goal"] = "<= 1.00x"
    print(f"wall time {wall / 60:.1f} min over {len(rows)} stages")
    benchrecord.write(f"recipe-{recipe}", settings={"recipe": manifest["recipe"], "run_dir": str(args.run_dir),
                                                    "git_sha_of_run": manifest.get("git_sha"),
                                                    "host": manifest.get("host")},
                      figures={"stages": rows, "eval": evals, "wall_min": round(wall / 60, 2)},
                      ratios=ratios, goals=goals, notes=args.note, results=args.results_dir)


if __name__ == "__main__":
    main()
