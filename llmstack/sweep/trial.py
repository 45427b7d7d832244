"""One sweep trial: the sampled values set at their YAML paths in the recipe, the recipe validated again (pydantic, the
same checks as `llmstack validate`), and run by the pipeline under the trial's own run id. Stages upstream of the
first changed one are adopted from the sweep's base run (runs.adopt_fresh), so curation runs once per sweep. The
trial's score is the objective task's score of the objective stage in the eval stage's metrics, with its interval
from the eval stage's scores.json.

`run_trial` never raises: a trial that fails (a value training rejects, out of memory, a crash) comes back with its
reason, and the sweep records it as failed and goes on. It is a plain function of plain arguments, so it runs the
same in this process or as a Ray task on another node.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("llmstack")


@dataclass
class TrialOutcome:
    run_dir: str
    value: float | None = None
    ci95: list[float] | None = None
    n: int | None = None
    # the objective task's score of every model eval scored, in eval.stages order (the trial's `steps` user attr)
    steps: list[tuple[str, float]] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    error: str | None = None
    wall_s: float = 0.0
    pid: int = field(default_factory=os.getpid)  # the process that ran it (a Ray worker's, on a cluster)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def objective_score(manifest: dict[str, Any], stage: str, task: str,
                    eval_stages: list[str]) -> tuple[float, list[float] | None, int | None, list[tuple[str, float]]]:
    """(score, 95% interval, items, per-stage scores) of `task` on `stage` from a finished run's manifest."""
    entry = manifest["stages"].get("eval") or {}
    if entry.get("status") != "done":
        raise RuntimeError(f"the eval stage did not finish (status: {entry.get('status', 'not run')})")
    metrics = entry.get("metrics") or {}
    score = (metrics.get(stage) or {}).get(task)
    if score is None:
        raise RuntimeError(f"eval recorded no '{task}' score for '{stage}'")
    scores_file = (entry.get("outputs") or {}).get("scores", {}).get("path")
    detail = json.loads(Path(scores_file).read_text()).get(stage, {}).get(task, {}) if scores_file else {}
    steps = [(s, float(metrics[s][task])) for s in eval_stages if (metrics.get(s) or {}).get(task) is not None]
    return float(score), detail.get("ci95"), detail.get("n"), steps


def run_trial(raw: dict[str, Any], values: dict[str, Any], runs_root: str, run_id: str, recipe_file: str,
              donors: list[str], cwd: str | None = None, pruning: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one trial; returns TrialOutcome.to_dict() (plain data: it crosses a Ray task boundary). `recipe_file`:
    where the trial's recipe is written (the run manifest records it, `llmstack run` can re-run it). `cwd`: the
    directory the recipe's relative paths are read from (a Ray worker starts elsewhere). `pruning`: the sweep
    pruner's {stage, metric}, written to the run folder as pruning.json for the watched stage to find
    (llmstack/train/pruning.py)."""
    from llmstack.config.recipe import RecipeError, load_recipe
    from llmstack.config.sweep import apply
    from llmstack.pipeline import fingerprints, run_recipe
    from llmstack.runs import Run, adopt_fresh
    from llmstack.train.pruning import MARKER, REQUEST

    if cwd:
        os.chdir(cwd)
    t0 = time.perf_counter()
    outcome = TrialOutcome(run_dir=str(Path(runs_root) / str(raw.get("name")) / run_id))
    try:
        path = Path(recipe_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(apply(raw, values), sort_keys=False))
        recipe = load_recipe(path)
        outcome.adopted = adopt_fresh(Run.open(runs_root, recipe.name, run_id), [Path(d) for d in donors],
                                      fingerprints(recipe))
        if pruning:
            (Path(outcome.run_dir) / REQUEST).write_text(json.dumps(pruning))
        log.info("trial %s: %s (reusing %s)", run_id, values, ", ".join(outcome.adopted) or "nothing")
        run = run_recipe(recipe, path, Path(runs_root), run_id=run_id)
        sweep = raw["sweep"]["objective"]
        outcome.value, outcome.ci95, outcome.n, outcome.steps = objective_score(
            run.manifest, sweep["stage"], sweep["task"], recipe.eval.stages)
    except RecipeError as exc:
        outcome.error = f"RecipeError: {'; '.join(exc.problems)}"
    except Exception as exc:  # the trial failed (or its pruner stopped it); the sweep records why and goes on
        outcome.error = f"{type(exc).__name__}: {exc}"
        if pruning and (Path(outcome.run_dir) / pruning["stage"] / MARKER).exists():
            log.info("trial %s: stopped by the sweep's pruner (%s)", run_id, outcome.error)
        else:
            log.warning("trial %s failed: %s\n%s", run_id, outcome.error, traceback.format_exc(limit=3))
    outcome.wall_s = round(time.perf_counter() - t0, 2)
    return outcome.to_dict()
