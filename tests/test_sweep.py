"""`llmstack sweep`: an Optuna study over a tiny recipe's SFT learning rate and LoRA rank, in a real SQLite storage.
Trials are real recipe runs that reuse the base run's curation; a killed sweep resumes; a crashing trial fails with
its reason and the sweep goes on; a bad space or objective is a path-named recipe error before any trial; an
unreachable storage is a one-line error; on a local Ray cluster trials run in parallel. With a median pruner on the
sft stage's eval_loss, the trial that trails is pruned at the evaluation judged, before its eval stage, in this
process and on Ray; a pruner on a stage that does not evaluate is a path-named recipe error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import yaml
from optuna.trial import TrialState

from llmstack.config.recipe import RecipeError, load_recipe
from llmstack.sweep import outputs
from llmstack.sweep.study import make_plan, optimize

REPO = Path(__file__).resolve().parent.parent
SPACE = {"stages[sft].args.learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}, "stages[0].lora.r": {"choice": [2, 4]}}


def write_recipe(d: Path, tiny_model: Path, space: dict | None = None, n_trials: int = 3, **sweep) -> Path:
    """A tiny recipe: curate six local rows, one SFT step with LoRA, eval identity on the SFT model; its sweep."""
    rows = d / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Question {i} about item {i * 7}?",
                                        "output": f"Answer {i}: a short reply about item {i}."}) + "\n"
                            for i in range(6)))
    path = d / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 1, "model": {"source": str(tiny_model)},
        "data": {"cards_dir": None, "datasets": {"sft": {"schema": "messages", "sources": [{"name": "rows",
                                                                                             "path": str(rows)}]}}},
        "stages": [{"type": "sft", "dataset": "sft", "lora": {"r": 4, "alpha": 8},
                    "args": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64,
                             "learning_rate": 1.0e-3}}],
        "eval": {"suite": "smoke", "limit": 2, "tasks": ["identity"], "stages": ["sft"]},
        "sweep": {"space": space or SPACE, "objective": {"stage": "sft", "task": "identity"}, "n_trials": n_trials,
                  **sweep}}, sort_keys=False))
    return path


def sweep_cli(recipe: Path, runs: Path, *extra: str, **kw) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "llmstack", "sweep", str(recipe), "--runs-dir", str(runs), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"}  # one error, one line
    if kw.get("background"):
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=recipe.parent)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=recipe.parent)


def study_of(runs: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs / 'tiny' / f'sweep-{name}.db'}")


def test_three_trials_reuse_the_base_runs_curation_and_write_a_runnable_best_recipe(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model, enqueue=[{"stages[sft].args.learning_rate": 1.0e-3,
                                                          "stages[0].lora.r": 4}])
    plan = make_plan(recipe, tmp_path / "runs")
    study = optimize(plan)
    done = outputs.write(study, plan.dir, plan.raw, plan.recipe.sweep.objective)

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[0].params == {"stages[sft].args.learning_rate": 1.0e-3, "stages[0].lora.r": 4}  # enqueued first
    assert len({t.params["stages[sft].args.learning_rate"] for t in trials}) == 3  # TPE sampled the others
    base = tmp_path / "runs" / "tiny" / "sweep-tiny-base"
    base_manifest = json.loads((base / "manifest.json").read_text())["stages"]
    assert base_manifest["curate"]["status"] == "done" and "sft" not in base_manifest  # shared stages only
    for t in trials:
        run = Path(t.user_attrs["run_dir"])
        full = json.loads((run / "manifest.json").read_text())
        manifest = full["stages"]
        # curation ran once: each trial adopted the base run's entry, its dataset is the base run's folder
        assert t.user_attrs["adopted"] == ["model", "curate"]
        assert manifest["curate"]["reused_from"] == str(base)
        assert manifest["curate"]["result"]["datasets"]["sft"].startswith(str(base / "curate"))
        assert not (run / "curate").exists()
        report = (run / "report.md").read_text()  # the trial's report says so, with curation's section from the base
        assert "| curate | done (reused from `sweep-tiny-base`) |" in report
        assert (base / "curate" / "section.md").read_text().strip() in report
        assert manifest["sft"]["status"] == "done" and manifest["eval"]["status"] == "done"
        # the trial ran its own values, and its score is the eval stage's, interval beside it
        trial_recipe = load_recipe(full["recipe"]["path"])
        assert trial_recipe.stages[0].lora.r == t.params["stages[0].lora.r"] and trial_recipe.sweep is None
        assert trial_recipe.stages[0].args["learning_rate"] == t.params["stages[sft].args.learning_rate"]
        assert t.value == manifest["eval"]["metrics"]["sft"]["identity"]
        scores = json.loads((run / "eval" / "scores.json").read_text())["sft"]["identity"]
        assert t.user_attrs["ci95"] == scores["ci95"] and t.user_attrs["n"] == 2
        # no pruner: nothing reported during training; the eval's score of each model is kept as `steps`
        assert t.intermediate_values == {} and t.user_attrs["steps"] == {"sft": t.value}
    # curation's wall clock is spent once: the trials' manifests carry the base run's own entry
    assert {json.loads((Path(t.user_attrs["run_dir"]) / "manifest.json").read_text())["stages"]["curate"]["started"]
            for t in trials} == {base_manifest["curate"]["started"]}

    best = load_recipe(done["files"]["best_recipe"])
    bt = study.best_trial
    assert best.sweep is None and best.stages[0].lora.r == bt.params["stages[0].lora.r"]
    assert best.stages[0].args["learning_rate"] == bt.params["stages[sft].args.learning_rate"]
    lines = [json.loads(x) for x in (plan.dir / "trials.jsonl").read_text().splitlines()]
    assert [r["state"] for r in lines] == ["COMPLETE"] * 3 and lines[1]["reused"] == ["model", "curate"]
    imp = json.loads((plan.dir / "importances.json").read_text())
    assert set(imp["importances"]) == set(SPACE) and imp["trials"] == 3
    assert (plan.dir / "objective.png").stat().st_size > 1000
    assert "## Sweep: identity on `sft` (maximize)" in (plan.dir / "sweep.md").read_text()


def test_a_killed_sweep_resumes_and_asks_the_interrupted_trial_again(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model)
    runs = tmp_path / "runs"
    proc = sweep_cli(recipe, runs, background=True)
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if not (runs / "tiny" / "sweep-tiny.db").exists():
                continue
            try:
                trials = study_of(runs).get_trials()
            except (KeyError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
                continue  # the sweep is still creating its study (this reader and it both stamp a new schema)
            if TrialState.COMPLETE in [t.state for t in trials] and trials[-1].state == TrialState.RUNNING \
                    and len(trials[-1].params) == len(SPACE):
                break  # a trial has finished and the next one has its values and runs: kill the sweep now
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = study_of(runs).get_trials()
    assert killed[-1].state == TrialState.RUNNING and len(killed) < 3
    assert all(t.state == TrialState.COMPLETE for t in killed[:-1])

    out = sweep_cli(recipe, runs)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = study_of(runs).get_trials()
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1  # the interrupted one:
    interrupted = trials[len(killed) - 1]  # failed, not counted, and its values asked again first
    assert interrupted.state == TrialState.FAIL and "interrupted" in interrupted.user_attrs
    assert trials[len(killed)].params == interrupted.params and len(trials) == 4
    lines = [json.loads(x) for x in (runs / "tiny" / "sweep-tiny" / "trials.jsonl").read_text().splitlines()]
    assert [r["state"] for r in lines] == [t.state.name for t in trials]
    assert "was left running by a stopped sweep" in out.stdout + out.stderr


def test_a_crashing_trial_fails_with_its_reason_and_the_sweep_goes_on(tmp_path, tiny_model):
    key = "stages[sft].lora.target_modules"
    recipe = write_recipe(tmp_path, tiny_model, {key: {"choice": ["all-linear", "no_such_proj"]}}, n_trials=2,
                          enqueue=[{key: "no_such_proj"}, {key: "all-linear"}])
    study = optimize(make_plan(recipe, tmp_path / "runs"))
    bad, good = study.get_trials()
    assert bad.state == TrialState.FAIL and "no_such_proj" in bad.user_attrs["error"]
    assert good.state == TrialState.COMPLETE and good.params == {key: "all-linear"} and good.value is not None


def test_no_trial_starts_once_the_time_budget_is_spent(tmp_path, tiny_model):
    plan = make_plan(write_recipe(tmp_path, tiny_model), tmp_path / "runs", timeout_s=1e-6)
    study = optimize(plan)
    assert study.get_trials() == [] and plan.storage_url.endswith("runs/tiny/sweep-tiny.db")
    assert not (tmp_path / "runs" / "tiny" / "sweep-tiny-base").exists()  # not even the shared stages ran
    done = outputs.write(study, plan.dir, plan.raw, plan.recipe.sweep.objective)
    assert done["best"] is None and "best_recipe" not in done["files"]
    assert "No trial completed." in (plan.dir / "sweep.md").read_text()
    assert json.loads((plan.dir / "importances.json").read_text())["reason"].startswith("0 complete trial(s)")


@pytest.mark.parametrize("space, objective, problem", [
    ({"stages[sft].lorra.r": {"choice": [2]}}, None,
     "sweep.space.stages[sft].lorra.r = 2: stages[0].lorra: unknown key; did you mean 'lora'?"),
    ({"stages[0].lora.r": {"uniform": [1.5, 4.5]}}, None,
     "sweep.space.stages[0].lora.r = 1.5: stages[0].lora.r: Input should be a valid integer"),
    ({"stages[dpo].args.beta": {"uniform": [0.1, 0.2]}}, None,
     "sweep.space.stages[dpo].args.beta: 'stages[dpo].args.beta': no stage 'dpo' (stages: sft)"),
    ({"stages[0].lora.r": {"loguniform": ["a", "b"]}}, None,
     "sweep.space.stages[0].lora.r.loguniform[0]: Input should be a valid number"),
    ({"stages[0].lora.r": {"int": [8, 2]}}, None, "sweep.space.stages[0].lora.r: int: [8, 2]: low must be below"),
    (None, {"stage": "sft", "task": "arc_easy"},
     "sweep.objective.task: 'arc_easy' is not among the tasks eval scores (identity)"),
    (None, {"stage": "base", "task": "identity"}, "sweep.objective.stage: 'base' is not evaluated (eval.stages: sft)"),
    (SPACE | {"enqueue": None}, None, "sweep.enqueue[0].stages[0].lora.r: 8 is outside its space ({'choice': [2, 4]"),
])
def test_a_bad_space_or_objective_is_a_path_named_error_before_any_trial(tmp_path, tiny_model, space, objective,
                                                                         problem):
    enqueue = [{"stages[sft].args.learning_rate": 1.0e-3, "stages[0].lora.r": 8}] if "enqueue" in (space or {}) else []
    recipe = write_recipe(tmp_path, tiny_model, {k: v for k, v in (space or SPACE).items() if k != "enqueue"},
                          enqueue=enqueue)
    if objective:
        raw = yaml.safe_load(recipe.read_text())
        raw["sweep"]["objective"] = objective
        recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def test_paths_name_stages_by_id_and_reach_data_mix_weights(tmp_path, tiny_model):
    from llmstack.config.sweep import apply, resolve

    space = {"stages[sft].lora.alpha": {"int": [4, 16], "step": 4}, "data.datasets.sft.sources[0].weight": {
        "uniform": [0.5, 2.0]}}
    recipe = write_recipe(tmp_path, tiny_model, space)
    raw = yaml.safe_load(recipe.read_text())
    assert load_recipe(recipe).sweep.space["stages[sft].lora.alpha"].int_ == (4, 16)
    assert resolve("stages[sft].lora.alpha", raw) == ["stages", 0, "lora", "alpha"]
    doc = apply(raw, {"stages[sft].lora.alpha": 12, "data.datasets.sft.sources[0].weight": 1.5})
    assert "sweep" not in doc and doc["stages"][0]["lora"] == {"r": 4, "alpha": 12}
    assert doc["data"]["datasets"]["sft"]["sources"][0]["weight"] == 1.5
    assert raw["stages"][0]["lora"]["alpha"] == 8  # the recipe document itself is left as it was


def _open_at_once(url: str, barrier, results) -> None:
    from llmstack.sweep.study import create_or_load

    barrier.wait()
    try:
        create_or_load(url, "race", "minimize")
        results.put("opened")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def test_processes_creating_one_new_storage_at_once_all_open_it(tmp_path):
    """Six processes open the same new SQLite storage at the same instant, as the sweep driver and a dashboard (or the
    resume test's poller) may: optuna creates the schema table by table, so the ones that come second hit `table ...
    already exists` or the version stamp's UNIQUE constraint. Each opens the storage and the one study."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # optuna already imported here: the six start at once
    for attempt in range(3):
        url = f"sqlite:///{tmp_path}/race-{attempt}.db"
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(url, barrier, results)) for _ in range(6)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(30)
        assert outcomes == ["opened"] * 6, outcomes
        assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["race"]


def test_the_cli_stops_a_bad_sweep_or_storage_with_one_line_and_exit_2(tmp_path, tiny_model):
    runs = tmp_path / "runs"
    out = sweep_cli(write_recipe(tmp_path, tiny_model, {"stages[0].lorra.r": {"choice": [2]}}), runs)
    assert out.returncode == 2 and "sweep.space.stages[0].lorra.r = 2: stages[0].lorra: unknown key" in out.stdout
    assert not runs.exists()  # no storage, no trial

    recipe = write_recipe(tmp_path, tiny_model)
    for url, says in [(f"sqlite:///{tmp_path}/no/such/dir/s.db", "OperationalError"),
                      ("postgresql://127.0.0.1:1/x", "")]:
        out = sweep_cli(recipe, runs, "--storage", url)
        text = out.stdout + out.stderr
        assert out.returncode == 2 and "Traceback" not in text, text
        assert f"--storage {url}: cannot open the Optuna storage" in text and says in text
    assert not (runs / "tiny" / "sweep-tiny-base").exists()  # nothing ran


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray", reason="ray is not installed (requirements/ray.lock; `make test` installs it)")
    from llmstack.testing import local_ray_cluster

    with local_ray_cluster(2, str(REPO)) as (address, _):
        yield address


@pytest.mark.slow  # a Ray head, two workers importing torch, two trials: 1 to 2 minutes on 2 busy cores
def test_trials_run_in_parallel_as_ray_tasks_sharing_one_study(ray_cluster, tmp_path, tiny_model):
    runs = tmp_path / "runs"
    out = sweep_cli(write_recipe(tmp_path, tiny_model, n_trials=2, ray={"address": ray_cluster, "parallel": 2}), runs)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials = study_of(runs).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    # two Ray worker processes ran them, both in flight at once (the second was asked for before either was told),
    # each reusing the driver's base run. The runs' own clock windows are not compared: on two busy cores a cold worker
    # can still be importing torch when the other's tiny trial has already finished.
    assert len({t.user_attrs["pid"] for t in trials}) == 2
    assert max(t.datetime_start for t in trials) < min(t.datetime_complete for t in trials)
    assert all(t.user_attrs["adopted"] == ["model", "curate"] for t in trials)


def test_the_sweep_driver_imports_no_torch():
    """The driver plans, asks Optuna and reads the trials' pruning channel; torch and transformers (seconds to import)
    are the trials' business, so a sweep the CLI refuses is refused at once."""
    code = ("import sys; import llmstack.sweep.study, llmstack.sweep.pruning, llmstack.cli.sweep; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_no_ray_cluster_at_the_address_is_a_one_line_error(tmp_path, tiny_model):
    pytest.importorskip("ray", reason="ray is not installed (requirements/ray.lock; `make test` installs it)")
    from llmstack.testing import free_port

    port = free_port()
    out = sweep_cli(write_recipe(tmp_path, tiny_model), tmp_path / "runs", "--ray", f"127.0.0.1:{port}")
    assert out.returncode == 2 and "Traceback" not in out.stdout + out.stderr
    assert f"--ray '127.0.0.1:{port}': no Ray cluster there" in out.stderr
    assert not (tmp_path / "runs" / "tiny" / "sweep-tiny-base").exists()  # refused before any stage ran


def evaluating(recipe: Path, eval_steps: int = 1, max_steps: int = 8) -> Path:
    """The tiny recipe's sft stage evaluating on the validation split every `eval_steps` (what a pruner watches)."""
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "glass", "ocean", "candle", "forest",
             "silver"]
    (recipe.parent / "rows.jsonl").write_text("".join(  # distinct rows: the near-duplicate filter keeps them all
        json.dumps({"instruction": f"What is a {w}?", "output": f"A {w} is a {w}; every {w} is one."}) + "\n"
        for w in words))
    raw = yaml.safe_load(recipe.read_text())
    raw["data"]["datasets"]["sft"]["validation_fraction"] = 0.25
    raw["stages"][0]["args"] |= {"eval_strategy": "steps", "eval_steps": eval_steps, "max_steps": max_steps,
                                 "per_device_eval_batch_size": 2, "save_strategy": "no"}
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    return recipe


@pytest.mark.parametrize("pruner, args, problem", [
    ({"kind": "median", "stage": "dpo"}, {}, "sweep.pruner.stage: no training stage 'dpo' (stages: sft)"),
    ({"kind": "median", "stage": "sft"}, {"eval_strategy": "no"},
     "sweep.pruner.stage: 'sft' does not evaluate while it trains"),
    ({"kind": "median", "stage": "sft"}, {"eval_strategy": "steps"},
     "sweep.pruner.stage: 'sft' does not evaluate while it trains (args.eval_strategy: steps, args.eval_steps: None)"),
    ({"kind": "median"}, {}, "sweep.pruner: stage: give the id of the training stage"),
    ({"kind": "median", "stage": "sft", "percentile": 25}, {}, "sweep.pruner: percentile: only for kind: percentile"),
    ({"kind": "median", "stage": "sft", "metric": "eval_mean_token_accuracy"}, {},
     "sweep.pruner: direction: 'eval_mean_token_accuracy' is not a loss"),
    ({"kind": "medain", "stage": "sft"}, {}, "sweep.pruner.kind: "),
])
def test_a_pruner_on_a_stage_that_does_not_evaluate_is_a_path_named_error(tmp_path, tiny_model, pruner, args,
                                                                          problem):
    recipe = write_recipe(tmp_path, tiny_model, pruner=pruner)
    raw = yaml.safe_load(recipe.read_text())
    raw["stages"][0]["args"] |= args
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems
    if "does not evaluate" in problem:
        assert "set stages[sft].args.eval_strategy: steps and eval_steps: N" in info.value.problems[0]


def test_a_pruner_on_a_stage_every_trial_shares_is_refused_before_any_stage_runs(tmp_path, tiny_model):
    from llmstack.sweep.study import SweepError

    recipe = evaluating(write_recipe(tmp_path, tiny_model, {"eval.limit": {"choice": [1, 2]}},
                                     pruner={"kind": "median", "stage": "sft"}))
    with pytest.raises(SweepError, match="sweep.pruner.stage: 'sft' is the same in every trial"):
        optimize(make_plan(recipe, tmp_path / "runs"))
    assert not (tmp_path / "runs" / "tiny" / "sweep-tiny-base").exists()


def test_the_watched_stage_stops_at_the_evaluation_after_the_prune_marker(tmp_path, tiny_model):
    from llmstack.pipeline import run_recipe
    from llmstack.runs import Run

    recipe_path = evaluating(write_recipe(tmp_path, tiny_model), eval_steps=2, max_steps=6)
    recipe = load_recipe(recipe_path)
    run = Run.open(tmp_path / "runs", "tiny", "trial")
    (run.dir / "pruning.json").write_text(json.dumps({"stage": "sft", "metric": "eval_loss"}))
    run.stage_dir("sft").joinpath("PRUNE").write_text("{}")  # the driver's verdict, already there,
    run.stage_dir("sft").joinpath("intermediate.read").write_text("1000000")  # and what it read (no 10 s wait for it)
    with pytest.raises(Exception, match="pruned by the sweep at step 2 \\(eval_loss"):
        run_recipe(recipe, recipe_path, tmp_path / "runs", run_id="trial")
    manifest = json.loads((run.dir / "manifest.json").read_text())["stages"]
    assert manifest["sft"]["status"] == "failed" and manifest["sft"]["error"].startswith("TrialPruned")
    assert "eval" not in manifest or manifest["eval"]["status"] != "done"
    lines = [json.loads(x) for x in (run.dir / "sft" / "intermediate.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2] and lines[0]["value"] > 0  # the first evaluation, then it stopped

    # a run whose pruning request names another stage trains its sft stage to the end, writing nothing
    other = Run.open(tmp_path / "runs", "tiny", "other")
    (other.dir / "pruning.json").write_text(json.dumps({"stage": "dpo", "metric": "eval_loss"}))
    run_recipe(recipe, recipe_path, tmp_path / "runs", run_id="other", only=["model", "curate", "sft"])
    assert json.loads(other.manifest_path.read_text())["stages"]["sft"]["status"] == "done"
    assert not (other.dir / "sft" / "intermediate.jsonl").exists()


def test_a_stage_waits_for_the_driver_to_read_its_metric_and_no_longer(tmp_path, monkeypatch):
    """At an evaluation rank 0 waits until the driver has read intermediate.jsonl up to what it appended; a driver
    that does not answer delays the stage by ACK_S at most (its verdict then counts at a later evaluation)."""
    from llmstack.train import pruning_callback

    monkeypatch.setattr(pruning_callback, "ACK_S", 0.5)
    callback = pruning_callback.PruningCallback(tmp_path, "eval_loss")
    t0 = time.monotonic()
    callback._await_driver(120)  # no driver at all
    assert 0.5 <= time.monotonic() - t0 < 3
    (tmp_path / "intermediate.read").write_text("80")  # read, but not up to this line yet
    t0 = time.monotonic()
    callback._await_driver(120)
    assert 0.5 <= time.monotonic() - t0 < 3
    (tmp_path / "intermediate.read").write_text("120")
    t0 = time.monotonic()
    callback._await_driver(120)
    assert time.monotonic() - t0 < 0.4


LR = "stages[sft].args.learning_rate"


def pruned_sweep(tmp_path: Path, tiny_model: Path, **sweep) -> Path:
    """Four trials of the evaluating tiny recipe under a median pruner; the second's rate is far too small."""
    return evaluating(write_recipe(
        tmp_path, tiny_model, {LR: {"loguniform": [1.0e-6, 1.0e-1]}}, n_trials=4,
        pruner={"kind": "median", "stage": "sft", "n_startup_trials": 1},
        # a random tiny model: its eval_loss falls faster the larger the rate in this range; 1e-6 barely moves it
        enqueue=[{LR: 1.0e-2}, {LR: 1.0e-6}, {LR: 2.0e-2}, {LR: 4.0e-2}], **sweep), eval_steps=1, max_steps=3)


def check_pruned(trials: list) -> None:
    """The trial with the tiny rate was pruned at its first evaluation, before its eval stage; the others completed."""
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE,
                                         TrialState.COMPLETE]
    bad = trials[1]
    run = Path(bad.user_attrs["run_dir"])
    lines = [json.loads(x) for x in (run / "sft" / "intermediate.jsonl").read_text().splitlines()]
    # the pruner saw its eval_loss (sign as logged: the objective maximizes, eval_loss is minimized: negated)
    assert lines and {x["step"]: -x["value"] for x in lines} == pytest.approx(bad.intermediate_values)
    # judged at its first evaluation, and stopped there: the stage waits for the driver's verdict on each value
    assert bad.user_attrs["pruned_at"] == lines[-1]["step"] == 1
    manifest = json.loads((run / "manifest.json").read_text())["stages"]
    assert manifest["sft"]["status"] == "failed" and "eval" not in manifest  # it never reached its eval stage
    assert (run / "sft" / "PRUNE").exists()
    good = trials[0]
    assert len(good.intermediate_values) == 3 and good.value is not None


def test_a_median_pruner_stops_the_trial_whose_eval_loss_trails_and_the_others_complete(tmp_path, tiny_model):
    plan = make_plan(pruned_sweep(tmp_path, tiny_model), tmp_path / "runs")
    study = optimize(plan)
    check_pruned(study_of(tmp_path / "runs").get_trials())
    done = outputs.write(study, plan.dir, plan.raw, plan.recipe.sweep.objective)
    row = done["rows"][1]
    assert row["state"] == "PRUNED" and row["value"] is None and row["error"].startswith("pruned at step")
    assert "| 1 | PRUNED |" in (plan.dir / "sweep.md").read_text()


@pytest.mark.slow  # a Ray head, two workers importing torch, four trials one after another
def test_a_trial_on_ray_is_pruned_through_the_shared_runs_folder(ray_cluster, tmp_path, tiny_model):
    runs = tmp_path / "runs"
    out = sweep_cli(pruned_sweep(tmp_path, tiny_model, ray={"address": ray_cluster, "parallel": 1}), runs)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    check_pruned(study_of(runs).get_trials())  # the driver read the Ray task's values from the runs folder


@pytest.mark.parametrize("spec, cls, attrs", [
    ({}, "NopPruner", {}),
    ({"kind": "median", "stage": "sft", "n_warmup_steps": 4}, "MedianPruner",
     {"_n_startup_trials": 5, "_n_warmup_steps": 4}),
    ({"kind": "percentile", "stage": "sft", "percentile": 25, "n_startup_trials": 2}, "PercentilePruner",
     {"_percentile": 25, "_n_startup_trials": 2}),
    ({"kind": "hyperband", "stage": "sft", "n_warmup_steps": 4, "reduction_factor": 2}, "HyperbandPruner",
     {"_min_resource": 4, "_reduction_factor": 2}),
    ({"kind": "successive_halving", "stage": "sft"}, "SuccessiveHalvingPruner",
     {"_min_resource": None, "_reduction_factor": 3}),
])
def test_each_pruner_kind_is_its_optuna_pruner_with_the_recipes_settings(spec, cls, attrs):
    from llmstack.config.sweep import PrunerSpec
    from llmstack.sweep.pruning import make_pruner

    pruner = make_pruner(PrunerSpec.model_validate(spec))
    assert type(pruner).__name__ == cls
    assert {k: getattr(pruner, k) for k in attrs} == attrs
