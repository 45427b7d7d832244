"""The sweep's Optuna study: where it is stored, how a killed sweep resumes, the base run every trial shares, and the
ask/tell loop that hands trials to this process or to Ray tasks.

Storage: an Optuna RDB storage, a SQLite file beside the recipe's runs by default (`runs/<recipe>/sweep-<study>.db`;
`optuna-dashboard` reads it) or any SQLAlchemy URL a team shares (postgresql://…, with its driver installed).
Only this process, the driver, writes to it: it asks Optuna for each trial's values, runs the trial (here, or as a
Ray task that returns plain data) and tells Optuna the result. So one SQLite file is safe even with trials running
in parallel on a cluster, and neither a journal storage nor a database reachable from every node is needed.

Resume: `load_if_exists`. A trial a killed sweep left RUNNING is marked FAIL (user attr `interrupted`) and its values
are asked again; it does not count toward n_trials. Only one sweep of a study may run at a time.

Pruning (`sweep.pruner`): the objective exists only once a trial's eval stage has run, so the pruner judges a trial
on what its watched training stage measures while it trains: its evaluation metric (eval_loss) every eval_steps.
The trial's stage writes each value into its folder, the driver reports them to Optuna (`trial.report(value, step)`,
step = training step) and writes a PRUNE marker when the pruner says so; the stage, which waits for the driver to
have read each value, stops at the evaluation judged and the trial is told PRUNED (llmstack/sweep/pruning.py,
llmstack/train/pruning.py). Pruned trials count toward n_trials. The objective task's score of every model the eval
scores is kept as the `steps` user attr.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.config.recipe import Recipe, parse_recipe
from llmstack.config.sweep import apply
from llmstack.pipeline import fingerprints, plan, run_recipe
from llmstack.sweep.pruning import POLL_S, Watch, make_pruner, request, watching
from llmstack.sweep.trial import run_trial

log = logging.getLogger("llmstack")

INTERRUPTED = "interrupted"


class SweepError(Exception):
    """A sweep that cannot start (storage out of reach, no Ray cluster, a shared stage that fails)."""


@dataclass
class SweepPlan:
    recipe: Recipe
    raw: dict[str, Any]
    recipe_path: Path
    runs_root: Path
    study_name: str
    storage_url: str
    n_trials: int
    timeout_s: float | None
    ray_address: str | None
    parallel: int

    @property
    def dir(self) -> Path:
        """The sweep's own folder: trial recipes, trials.jsonl, best_recipe.yaml, importances, plot."""
        return self.runs_root / self.recipe.name / f"sweep-{self.study_name}"

    def run_id(self, label: str) -> str:
        return f"sweep-{self.study_name}-{label}"


def make_plan(recipe_path: Path, runs_root: Path, n_trials: int | None = None, timeout_s: float | None = None,
              storage: str | None = None, study: str | None = None, ray_address: str | None = None) -> SweepPlan:
    """The sweep of the recipe at `recipe_path` (validated, its sweep block checked: RecipeError), with the CLI's
    overrides of its sweep block."""
    import yaml

    from llmstack.config.recipe import RecipeError, load_recipe

    recipe = load_recipe(recipe_path)
    if recipe.sweep is None:
        raise RecipeError(recipe_path, ["sweep: this recipe has no `sweep:` block (space, objective, n_trials); "
                                        "see recipes/sweep.yaml"])
    sweep = recipe.sweep
    name = study or sweep.study or recipe.name
    runs_root = runs_root.resolve()  # trials may run in other processes, from another directory
    ray = sweep.ray
    return SweepPlan(recipe=recipe, raw=yaml.safe_load(Path(recipe_path).read_text()), recipe_path=Path(recipe_path),
                     runs_root=runs_root, study_name=name,
                     storage_url=storage or default_storage(runs_root, recipe.name, name),
                     n_trials=n_trials or sweep.n_trials, timeout_s=timeout_s or sweep.timeout_s,
                     ray_address=ray_address or (ray.address if ray else None),
                     parallel=ray.parallel if ray else 2)


def default_storage(runs_root: Path, recipe_name: str, study: str) -> str:
    """sqlite:///<runs>/<recipe>/sweep-<study>.db (its folder is made here: it is the recipe's runs folder)."""
    path = (runs_root / recipe_name / f"sweep-{study}.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _schema_race(exc: Exception) -> bool:
    """Another process opening the same new storage at the same moment (a reader such as the dashboard): optuna
    creates the schema table by table, then stamps its version, and whichever process comes second finds a table
    (`table ... already exists`) or the stamp (a UNIQUE constraint) already there. Opening again finds the schema."""
    from sqlalchemy.exc import IntegrityError, OperationalError  # optuna's RDB storage is SQLAlchemy's

    return isinstance(exc, IntegrityError) or (isinstance(exc, OperationalError) and "already exists" in str(exc))


def create_or_load(url: str, name: str, direction: str, attempts: int = 5):
    """(storage, study) at `url`: the study created, or loaded to resume. A new storage that another process is
    creating too is opened again (`_schema_race`) up to `attempts` times."""
    import optuna

    # a 60 s busy timeout: the dashboard may read the file while the driver writes it
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(1, attempts + 1):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            return storage, optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                                direction=direction)
        except Exception as exc:
            if attempt == attempts or not _schema_race(exc):
                raise
            time.sleep(0.05 * attempt)


def open_study(p: SweepPlan):
    """The study in its storage (created, or loaded to resume), with a TPE sampler seeded from the recipe's seed and
    the recipe's pruner."""
    import optuna

    try:
        storage, study = create_or_load(p.storage_url, p.study_name, p.recipe.sweep.objective.direction)
    except Exception as exc:  # SQLAlchemy's OperationalError, a missing DB driver (ModuleNotFoundError), a bad URL
        raise SweepError(f"--storage {p.storage_url}: cannot open the Optuna storage ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]}). Give a URL SQLAlchemy can reach (sqlite:///path/in/an/"
                         "existing/dir.db, or postgresql://… with its driver installed)") from None
    # Seeded from the recipe, offset by the trials already stored: a resumed sweep does not replay the first one's
    # random start. TPE models the space after n_startup_trials random ones: at most half of a small sweep.
    sampler = optuna.samplers.TPESampler(seed=p.recipe.seed + len(study.trials),
                                         n_startup_trials=max(1, min(10, p.n_trials // 2)))
    return optuna.load_study(study_name=p.study_name, storage=storage, sampler=sampler,
                             pruner=make_pruner(p.recipe.sweep.pruner)), storage


def recover(study, storage, enqueue: list[dict[str, Any]]) -> int:
    """Mark the trials a killed sweep left RUNNING as FAIL (`interrupted`) and ask their values again; on a new
    study, enqueue the given trials first. Returns how many were interrupted."""
    from optuna.trial import TrialState

    if not study.trials:
        for params in enqueue:
            study.enqueue_trial(params)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in running:
        # t._trial_id: the storage's id of a trial this process did not ask for (Optuna has no public handle)
        storage.set_trial_user_attr(t._trial_id, INTERRUPTED, "the sweep was stopped while this trial ran; its "
                                    "values were asked again")
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params)
        log.warning("trial %d was left running by a stopped sweep: marked failed, its values asked again", t.number)
    return len(running)


def finished(study) -> int:
    """Trials that count toward n_trials: complete, pruned, or failed with a reason of their own (not interrupted)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and INTERRUPTED not in t.user_attrs))


def shared_stages(p: SweepPlan) -> list[str]:
    """The stages no searched value changes (the model, curation, stages before the first searched one), found by
    fingerprint, comparing the recipe with every probe value of every path."""
    names = [s.name for s in plan(p.recipe)]
    base = fingerprints(p.recipe)
    first = len(names) - 1  # the report always runs
    for key, param in p.recipe.sweep.space.items():
        for value in param.probes():
            other = fingerprints(parse_recipe(apply(p.raw, {key: value}), check_trainer=False))
            first = min([first] + [i for i, n in enumerate(names) if other.get(n) != base.get(n)])
    return names[:first]


def base_run(p: SweepPlan) -> Path | None:
    """Run, once, the stages every trial shares; trials adopt them from this run instead of re-running them. None
    when the first stage already changes. A pruner watching a shared stage would judge no trial: refused first."""
    shared = shared_stages(p)
    pruner = p.recipe.sweep.pruner
    if pruner.kind != "none" and pruner.stage in shared:
        raise SweepError(f"sweep.pruner.stage: '{pruner.stage}' is the same in every trial (no searched value changes "
                         "it), so it runs once, before the trials, and would judge none; watch a stage that a "
                         "searched value changes")
    if not shared:
        return None
    log.info("sweep: shared stages %s run once, in %s", ", ".join(shared), p.run_id("base"))
    try:
        return run_recipe(p.recipe, p.recipe_path, p.runs_root, run_id=p.run_id("base"), only=shared).dir
    except Exception as exc:
        raise SweepError(f"the stages every trial shares ({', '.join(shared)}) failed: "
                         f"{type(exc).__name__}: {exc}") from None


def optimize(p: SweepPlan) -> Any:
    """Run the sweep until n_trials have finished or timeout_s has passed (no trial starts after it; running ones
    finish); returns the study."""
    from optuna.trial import TrialState

    deadline = time.monotonic() + p.timeout_s if p.timeout_s else None  # the budget includes the base run
    study, storage = open_study(p)
    recover(study, storage, p.recipe.sweep.enqueue)
    if finished(study) >= p.n_trials:
        log.info("sweep: %d trials already finished in %s", finished(study), p.storage_url)
        return study
    if deadline is not None and time.monotonic() >= deadline:
        return study
    pool = _RayPool(p) if p.ray_address else _LocalPool()  # a cluster out of reach fails before any stage runs
    try:
        donors = [str(d)] if (d := base_run(p)) else []
    except SweepError:
        pool.close()
        raise
    pending: dict[Any, Any] = {}
    watches: dict[Any, Watch | None] = {}
    sweep = p.recipe.sweep
    pruning = request(sweep.pruner)
    negate = sweep.pruner.metric_direction != sweep.objective.direction
    try:
        while True:
            in_time = deadline is None or time.monotonic() < deadline
            while in_time and len(pending) < pool.parallel and finished(study) + len(pending) < p.n_trials:
                trial = study.ask()
                values = {k: spec.suggest(trial, k) for k, spec in p.recipe.sweep.space.items()}
                run_id = p.run_id(f"t{trial.number}")
                args = (p.raw, values, str(p.runs_root), run_id, str(p.dir / "trials" / f"{run_id}.yaml"), donors,
                        os.getcwd(), pruning)
                watch = Watch(trial, p.runs_root / p.recipe.name / run_id / pruning["stage"], negate) \
                    if pruning else None
                handle = pool.submit(args, watch)
                pending[handle], watches[handle] = trial, watch
            if not pending:
                return study
            handle, outcome = pool.next_done(list(pending), [w for w in watches.values() if w])
            trial, watch = pending.pop(handle), watches.pop(handle)
            for attr in ("run_dir", "ci95", "n", "adopted", "wall_s", "pid"):
                trial.set_user_attr(attr, outcome[attr])
            if outcome["error"] and watch is not None and watch.pruned_at is not None:
                # the stage stopped on the marker (or a crash came after it): pruned, not failed
                for attr, value in watch.attrs().items():
                    trial.set_user_attr(attr, value)
                study.tell(trial, state=TrialState.PRUNED)
                log.info("trial %d: pruned at step %d", trial.number, watch.pruned_at)
                continue
            if outcome["error"]:
                trial.set_user_attr("error", outcome["error"])
                study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d failed: %s", trial.number, outcome["error"])
                continue
            trial.set_user_attr("steps", dict(outcome["steps"]))
            study.tell(trial, outcome["value"])
            log.info("trial %d: %s = %.4f", trial.number, p.recipe.sweep.objective.task, outcome["value"])
    finally:
        pool.close()


class _LocalPool:
    """Trials one after another in this process; a trial's intermediate values are read on a thread while it runs."""

    parallel = 1

    def __init__(self):
        self._done: dict[int, dict[str, Any]] = {}

    def submit(self, args: tuple, watch: Watch | None) -> int:
        handle = len(self._done)
        with watching(watch):
            self._done[handle] = run_trial(*args)
        return handle

    def next_done(self, handles: list[int], watches: list[Watch]) -> tuple[int, dict[str, Any]]:
        return handles[0], self._done.pop(handles[0])

    def close(self) -> None:
        pass


class _RayPool:
    """Trials as Ray tasks (one CPU each) on a running cluster, `parallel` at a time. The workers import llmstack and
    read and write the runs folder: install it on every node and keep the runs folder on a filesystem they share (as
    curation on Ray does, llmstack/data/executors.py)."""

    def __init__(self, p: SweepPlan):
        try:
            import ray
        except ImportError:
            raise SweepError("--ray needs ray: pip install -r requirements/ray.lock (or `pip install llmstack[ray]`)"
                             ) from None

        from llmstack.cluster import ray_unreachable

        self.parallel = p.parallel
        self._joined = not ray.is_initialized()
        if self._joined:
            problem = ray_unreachable(p.ray_address)
            if problem:
                raise SweepError(f"--ray '{p.ray_address}': {problem}")
            try:
                ray.init(address=p.ray_address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError) as exc:
                raise SweepError(f"--ray '{p.ray_address}': no Ray cluster there ({exc}). Start one (`ray start "
                                 "--head` on the head node) or fix the address") from None
        self._task = ray.remote(num_cpus=1, max_retries=0)(run_trial)

    def submit(self, args: tuple, watch: Watch | None):
        return self._task.remote(*args)

    def next_done(self, handles: list, watches: list[Watch]) -> tuple[Any, dict[str, Any]]:
        """The next trial to finish; the running trials' intermediate values are read while waiting for it."""
        import ray

        done: list = []
        while not done:
            done, _ = ray.wait(handles, num_returns=1, timeout=POLL_S if watches else None)
            for watch in watches:
                watch.poll()
        try:
            return done[0], ray.get(done[0])
        except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory): the trial failed
            return done[0], {"run_dir": None, "ci95": None, "n": None, "adopted": [], "wall_s": None, "pid": None,
                             "steps": [], "value": None, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}

    def close(self) -> None:
        import ray

        if self._joined:
            ray.shutdown()
