"""Runs a recipe: plans its stages in order, skips the ones whose inputs are unchanged, records everything.

Order: model -> curate -> training stages (as listed) -> quantize -> eval -> serve -> report.
A stage is a plain function `run(ctx: StageContext) -> StageResult` in its own module under llmstack/stages/, found
through its registry entry (llmstack/config/kinds.py) by import string, so planning a recipe never imports torch,
and a stage's module (with its stack) is imported only by the process that runs it: a reused stage costs nothing.
Fingerprints chain: each stage's fingerprint hashes its own config (and, for curate, the contents of its local source
files) and the fingerprint of the stage before it, so changing anything upstream re-runs everything downstream.

The pipeline also decides where each stage runs (llmstack/launchers.py: here, or under `accelerate launch` for a
stage with `launch:`) and is the one place that records a stage in the run manifest (`run_stage`).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.config.data import DataConfig
from llmstack.config.kinds import stage_kind
from llmstack.config.recipe import Recipe, recipe_sha256
from llmstack.data.sources import local_inputs_sha256
from llmstack.launchers import InProcess, Launcher, launcher_for
from llmstack.runs import Run, describe_outputs, sha256_json
from llmstack.stage import StageContext, StageResult

log = logging.getLogger("llmstack")


@dataclass
class PlannedStage:
    name: str
    kind: str
    spec: Any


def plan(recipe: Recipe) -> list[PlannedStage]:
    steps = [PlannedStage("model", "model", recipe.model)]
    if recipe.data.datasets:
        steps.append(PlannedStage("curate", "curate", recipe.data))
    steps += [PlannedStage(s.id, s.type, s) for s in recipe.stages]
    if recipe.quantize:
        steps.append(PlannedStage(recipe.quantize.stage_name, "quantize", recipe.quantize))
    if recipe.eval:
        steps.append(PlannedStage("eval", "eval", recipe.eval))
    if recipe.serve and recipe.serve.smoke:
        steps.append(PlannedStage("serve", "serve", recipe.serve))
    steps.append(PlannedStage("report", "report", None))
    return steps


def stage_function(kind: str) -> Callable[[StageContext], StageResult] | None:
    """The kind's `run` function, or None when its module is not in this version (reported at plan time)."""
    module_name, func = stage_kind(kind).run.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    return getattr(module, func)


def stage_available(kind: str) -> bool:
    """Whether the kind's module is in this version, found without importing it: a stage module imports its stack
    (torch, transformers, peft: seconds), which only the process that runs the stage should pay, not a pipeline
    that reuses it, launches it on other processes or stops before it."""
    module_name = stage_kind(kind).run.split(":")[0]
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        return False


def _deferred(kind: str) -> Callable[[StageContext], StageResult]:
    """The kind's run function, imported when it is called (see stage_available): a launcher that runs the stage
    elsewhere never calls it."""
    def run(ctx: StageContext) -> StageResult:
        return stage_function(kind)(ctx)
    return run


class StageUnavailable(Exception):
    pass


def _spec_json(spec: Any) -> Any:
    if isinstance(spec, DataConfig):  # where curation runs (local, ray, slurm) does not change what it makes
        return spec.model_dump(mode="json", by_alias=True, exclude={"executor"})
    return spec.model_dump(mode="json", by_alias=True) if hasattr(spec, "model_dump") else spec


def _input_hashes(step: PlannedStage) -> dict[str, Any]:
    """Contents of the files a stage reads that its config only names by path (curate's local sources): editing
    such a file re-runs the stage and everything after it."""
    if step.kind != "curate":
        return {}
    return {"inputs": local_inputs_sha256(step.spec)}


def fingerprints(recipe: Recipe, steps: list[PlannedStage] | None = None) -> dict[str, str]:
    """Every stage's fingerprint, in plan order: a hash of its config (and curate's input files) chained to the
    stage before it. The one chain: `llmstack run` and the launched worker (llmstack/worker.py) both use it, so a
    stage recorded by either counts as fresh for the other."""
    out, upstream = {}, sha256_json({"seed": recipe.seed})
    for step in steps or plan(recipe):
        upstream = out[step.name] = sha256_json({"kind": step.kind, "spec": _spec_json(step.spec),
                                                 "upstream": upstream, **_input_hashes(step)})
    return out


def run_earlier_first(run: Run, recipe_path: Path, earlier: str, stage: str) -> ValueError:
    """The one answer to "a stage needs an earlier one that has not finished" (`--only`, a launched stage)."""
    return ValueError(f"stage '{earlier}' (before '{stage}') has not finished in {run.dir}; run it first: "
                      f"`llmstack run {recipe_path}` (or `--only {earlier}`); the stages after it read its outputs "
                      "from the run manifest")


def stage_context(recipe: Recipe, recipe_path: Path, run: Run, stage: str) -> StageContext:
    """The StageContext the pipeline would build for `stage`, from the manifest's finished earlier stages (what a
    launched process on each rank uses: it does not re-run or re-check the earlier stages)."""
    steps = plan(recipe)
    models: dict[str, Path] = {}
    datasets: dict[str, Path] = {}
    current = None
    for step in steps:
        if step.name == stage:
            return StageContext(recipe=recipe, recipe_path=recipe_path, run=run, name=stage,
                                dir=run.stage_dir(stage), spec=step.spec, model=current, models=models,
                                datasets=datasets)
        entry = run.entry(step.name) or {}
        if entry.get("status") != "done":
            raise run_earlier_first(run, recipe_path, step.name, stage)
        result = entry.get("result") or {}
        if result.get("model"):
            current = Path(result["model"])
            models["base" if step.name == "model" else step.name] = current
        datasets.update({k: Path(v) for k, v in (result.get("datasets") or {}).items()})
    raise ValueError(f"no stage named '{stage}' in {recipe_path} (stages: {', '.join(s.name for s in steps)})")


def run_stage(run: Run, step: PlannedStage, ctx: StageContext, fingerprint: str,
              launcher: Launcher | None = None) -> StageResult:
    """Run one stage through its launcher and record it in the manifest: running, then done (with its metrics, hashed
    outputs and result) or failed. The one manifest recorder: `llmstack run` and the launched worker's rank 0 both
    record through here."""
    fn = _deferred(step.kind)
    log.info("stage %-8s running", step.name)
    run.record(step.name, kind=step.kind, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"),
               fingerprint=fingerprint)
    t0 = time.perf_counter()
    try:
        result = (launcher or InProcess()).run(ctx, fn)
    except BaseException as exc:
        run.record(step.name, status="failed", error=f"{type(exc).__name__}: {exc}",
                   wall_s=round(time.perf_counter() - t0, 2))
        raise
    wall = round(time.perf_counter() - t0, 2)
    run.record(step.name, status="done", wall_s=wall, metrics=result.metrics, outputs=describe_outputs(result.outputs),
               result={"model": str(result.model) if result.model else None,
                       "datasets": {k: str(v) for k, v in result.datasets.items()}})
    log.info("stage %-8s done in %.1f s", step.name, wall)
    return result


def run_through(recipe: Recipe, recipe_path: Path, runs_root: Path, run_id: str, stage: str,
                including: bool = True) -> Run:
    """Run (or reuse) every stage before `stage`, and `stage` itself when `including`, all in this process: what a
    launch of `stage` needs first, as its ranks read the earlier stages' outputs from the manifest."""
    names = [s.name for s in plan(recipe)]
    return run_recipe(recipe, recipe_path, runs_root, run_id=run_id,
                      only=names[: names.index(stage) + int(including)], in_process=True)


def run_recipe(recipe: Recipe, recipe_path: Path, runs_root: Path, run_id: str = "default",
               force_from: str | None = None, only: list[str] | None = None,
               skip_unavailable: bool = False, in_process: bool = False) -> Run:
    """Run (or resume) a recipe. `only` runs just those stages (their inputs must exist from an earlier run).
    in_process: run every stage here, `launch:` or not (this process is the launched one, llmstack/worker.py)."""
    steps = plan(recipe)
    names = [s.name for s in steps]
    for wanted in [force_from, *(only or [])]:
        if wanted and wanted not in names:
            raise ValueError(f"no stage named '{wanted}' in this recipe (stages: {', '.join(names)})")
    available = {s.kind: stage_available(s.kind) for s in steps}
    # With `only`, stages after the last requested one are neither run nor required (`llmstack curate` runs
    # model + curate of a recipe whose training stages have not run yet).
    last = max(names.index(n) for n in only) if only else len(steps)
    missing = [s.name for i, s in enumerate(steps) if not available[s.kind] and i <= last]
    if missing and not skip_unavailable:
        raise StageUnavailable(
            f"stage(s) {', '.join(missing)} are not implemented in this version of llmstack; "
            f"remove them from the recipe or pass --skip-unavailable")

    run = Run.open(runs_root, recipe.name, run_id)
    run.start(recipe_path, recipe_sha256(recipe_path), recipe.seed)
    if force_from:
        run.forget_from(names, force_from)

    current_model: Path | None = None
    models: dict[str, Path] = {}
    datasets: dict[str, Path] = {}
    chain = fingerprints(recipe, steps)
    for i, step in enumerate(steps):
        fingerprint = chain[step.name]
        if i > last and step.kind != "report":
            continue
        if not available[step.kind]:
            log.warning("stage %-8s not available in this version: skipped", step.name)
            run.record(step.name, status="unavailable")
            continue
        wanted = only is None or step.name in only
        if (not wanted or run.is_fresh(step.name, fingerprint)) and step.kind != "report":
            entry = run.entry(step.name)
            if entry and entry.get("status") == "done":
                log.info("stage %-8s unchanged: reusing %s", step.name, run.dir / step.name)
                result = entry.get("result", {})
                if result.get("model"):
                    current_model = Path(result["model"])
                    models["base" if step.name == "model" else step.name] = current_model
                datasets.update({k: Path(v) for k, v in result.get("datasets", {}).items()})
                continue
            if not wanted:
                raise run_earlier_first(run, recipe_path, step.name, next(n for n in only if names.index(n) > i))
        ctx = StageContext(recipe=recipe, recipe_path=recipe_path, run=run, name=step.name,
                           dir=run.stage_dir(step.name), spec=step.spec, model=current_model, models=dict(models),
                           datasets=dict(datasets))
        result = run_stage(run, step, ctx, fingerprint, InProcess() if in_process else launcher_for(step.spec))
        if result.model:
            current_model = result.model
            models["base" if step.name == "model" else step.name] = result.model
        datasets.update(result.datasets)
    return run
