"""The pipeline and the run manifest: stages run once, are reused while their inputs are unchanged, re-run on change
or on --from, and everything lands in manifest.json and report.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmstack.config.recipe import load_recipe
from llmstack.pipeline import run_recipe
from llmstack.stage import StageResult

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def recipe_file(tmp_path, tiny_model):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "seed": 1, "model": {"source": str(tiny_model)}}))
    return path


def _run(path, runs, **kw):
    return run_recipe(load_recipe(path), path, runs, **kw)


def test_run_records_manifest_and_report(recipe_file, tmp_path, tiny_model):
    run = _run(recipe_file, tmp_path / "runs")
    m = json.loads((run.dir / "manifest.json").read_text())
    assert run.dir == tmp_path / "runs" / "tiny" / "default"
    assert m["recipe"]["sha256"] and m["seed"] == 1 and m["versions"]["torch"].startswith("2.13")
    assert list(m["stages"]) == ["model", "report"]
    model = m["stages"]["model"]
    assert model["status"] == "done" and model["result"]["model"] == str(tiny_model)
    assert len(model["outputs"]["model"]["sha256"]) == 64 and model["wall_s"] >= 0
    report = (run.dir / "report.md").read_text()
    assert "| model | done |" in report and model["outputs"]["model"]["sha256"][:16] in report


def test_rerun_reuses_unchanged_stage_and_reruns_on_change(recipe_file, tmp_path):
    runs = tmp_path / "runs"
    first = _run(recipe_file, runs).manifest["stages"]["model"]["started"]
    again = _run(recipe_file, runs).manifest["stages"]["model"]
    assert again["started"] == first and again["status"] == "done"  # reused, not re-run

    raw = yaml.safe_load(recipe_file.read_text())
    raw["seed"] = 2  # the seed is upstream of every stage
    recipe_file.write_text(yaml.safe_dump(raw))
    changed = _run(recipe_file, runs).manifest["stages"]["model"]
    assert changed["fingerprint"] != again["fingerprint"]


def test_from_forces_rerun(recipe_file, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    fp = _run(recipe_file, runs).manifest["stages"]["model"]
    calls = []
    import llmstack.stages.model

    real = llmstack.stages.model.run
    monkeypatch.setattr(llmstack.stages.model, "run", lambda ctx: calls.append(ctx.name) or real(ctx))
    _run(recipe_file, runs)
    assert calls == []
    _run(recipe_file, runs, force_from="model")
    assert calls == ["model"]
    assert _run(recipe_file, runs).manifest["stages"]["model"]["fingerprint"] == fp["fingerprint"]


def test_unknown_stage_name_is_an_error(recipe_file, tmp_path):
    with pytest.raises(ValueError, match="no stage named 'sftt'"):
        _run(recipe_file, tmp_path / "runs", force_from="sftt")


def test_failed_stage_is_recorded(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump({"name": "broken", "model": {"source": str(tmp_path / "not-a-model")}}))
    (tmp_path / "not-a-model").mkdir()
    from llmstack.models import ModelSourceError

    with pytest.raises(ModelSourceError, match="no config.json"):
        _run(path, tmp_path / "runs")
    m = json.loads((tmp_path / "runs" / "broken" / "default" / "manifest.json").read_text())
    assert m["stages"]["model"]["status"] == "failed" and "no config.json" in m["stages"]["model"]["error"]


def test_cli_run_prints_stage_table(recipe_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmstack", "run", str(recipe_file), "--runs-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "model" in proc.stdout and "done" in proc.stdout
    assert (tmp_path / "tiny" / "default" / "report.md").exists()


def test_cli_run_bad_model_source_is_clear(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "model": {"source": "org/some-model"}}))
    proc = subprocess.run([sys.executable, "-m", "llmstack", "run", str(path), "--runs-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert "HF_HUB_OFFLINE=1" in proc.stderr and "Traceback" not in proc.stderr


# ---- stage kinds: one registry (llmstack/config/kinds.py) -----------------------------------------------------------

def test_every_list_of_stage_kinds_derives_from_the_registry():
    """The pipeline's functions, the recipe's `type:` values, the dataset schema each trains on and TRL's config class
    for its `args` all come from the one StageKind entry per kind."""
    import importlib

    import trl
    from pydantic import ValidationError

    from llmstack.config.kinds import STAGE_KINDS, training_kinds
    from llmstack.config.train import StageSpec
    from llmstack.config.trainer_args import trl_config_class
    from llmstack.pipeline import stage_function

    assert training_kinds() == ["cpt", "sft", "dpo", "reward", "grpo", "kto", "orpo", "rloo", "online_dpo", "distill"]
    assert StageSpec.model_json_schema()["properties"]["type"]["enum"] == training_kinds()
    with pytest.raises(ValidationError, match=r"Input should be 'cpt', 'sft', .* 'online_dpo' or 'distill'"):
        StageSpec(type="sftt", dataset="chat")
    for name, kind in STAGE_KINDS.items():
        module, func = kind.run.split(":")
        assert stage_function(name) is getattr(importlib.import_module(module), func)
        if kind.spec:
            module, cls = kind.spec.split(":")
            assert hasattr(importlib.import_module(module), cls), kind.spec
        if kind.training and kind.experimental:
            module, cls = kind.trl_config.split(":")
            assert module.startswith("trl.experimental.")
            assert trl_config_class(name) is getattr(importlib.import_module(module), cls)
        elif kind.training:
            assert trl_config_class(name) is getattr(trl, kind.trl_config)
    assert {k: v.dataset_schema for k, v in STAGE_KINDS.items() if v.training} == {
        "cpt": "text", "sft": "messages", "dpo": "preference", "reward": "preference", "grpo": "messages",
        "kto": "unpaired", "orpo": "preference", "rloo": "messages", "online_dpo": "messages", "distill": "messages"}


SCRATCH_STAGE = '''
from llmstack.stage import StageResult


def run(ctx):
    (ctx.dir / "seen.txt").write_text(f"{ctx.model}|{ctx.datasets['chat']}|{ctx.spec.args['max_steps']}")
    return StageResult(outputs={"seen": ctx.dir / "seen.txt"}, metrics={"rows": 3})
'''


def test_a_new_stage_kind_is_one_module_and_one_entry(tmp_path, tiny_model, monkeypatch):
    """A scratch kind: its module (here written to tmp_path) and its StageKind entry are all it takes for a recipe
    to validate with it (dataset schema and TRL args checked), the pipeline to plan it, run it and record it."""
    from llmstack.config.kinds import STAGE_KINDS, StageKind
    from llmstack.config.recipe import RecipeError, parse_recipe
    from llmstack.pipeline import plan
    from llmstack.stage import StageResult

    (tmp_path / "scratch_kind.py").write_text(SCRATCH_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(STAGE_KINDS, "scratch", StageKind("scratch", "scratch_kind:run",
                                                          "llmstack.config.train:StageSpec",
                                                          dataset_schema="messages", trl_config="SFTConfig"))
    (tmp_path / "chat.jsonl").write_text("")
    raw = {"name": "scratch", "model": {"source": str(tiny_model)},
           "data": {"datasets": {"chat": {"schema": "messages", "sources": [{"name": "c", "path": "chat.jsonl"}]},
                                 "text": {"schema": "text", "sources": [{"name": "t", "path": "chat.jsonl"}]}}},
           "stages": [{"type": "scratch", "dataset": "chat", "args": {"max_steps": 2}}]}
    recipe = parse_recipe(raw, check_trainer=True)
    assert [(s.name, s.kind) for s in plan(recipe)] == [("model", "model"), ("curate", "curate"),
                                                        ("scratch", "scratch"), ("report", "report")]
    wrong = {**raw, "stages": [{"type": "scratch", "dataset": "text", "args": {"max_stepz": 2}}]}
    with pytest.raises(RecipeError) as info:
        parse_recipe(wrong, check_trainer=True)
    assert any("a scratch stage trains on `messages` data" in p for p in info.value.problems), info.value.problems
    assert any("max_stepz" in p and "trl.SFTConfig" in p for p in info.value.problems), info.value.problems

    import llmstack.stages.curate  # curation itself is not what this test is about

    monkeypatch.setattr(llmstack.stages.curate, "run", lambda ctx: StageResult(datasets={"chat": tmp_path / "c"}))
    path = tmp_path / "scratch.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = run_recipe(recipe, path, tmp_path / "runs")
    entry = run.manifest["stages"]["scratch"]
    assert entry["status"] == "done" and entry["kind"] == "scratch" and entry["metrics"] == {"rows": 3}
    assert (run.dir / "scratch" / "seen.txt").read_text() == f"{tiny_model}|{tmp_path / 'c'}|2"


def test_a_stage_module_is_imported_only_by_the_process_that_runs_it(tmp_path, tiny_model, monkeypatch):
    """A stage module imports its stack (torch, transformers, peft: seconds). Planning finds every kind's module
    without importing it; a run that reuses the stage, or stops before it, never imports it; a kind whose module is
    missing stops the run before any stage starts."""
    import sys

    from llmstack.config.kinds import STAGE_KINDS, StageKind
    from llmstack.config.recipe import parse_recipe
    from llmstack.pipeline import StageUnavailable

    (tmp_path / "lazy_kind.py").write_text(SCRATCH_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for kind, module in (("lazy", "lazy_kind"), ("gone", "no_such_kind_module")):
        monkeypatch.setitem(STAGE_KINDS, kind, StageKind(kind, f"{module}:run", "llmstack.config.train:StageSpec",
                                                         dataset_schema="messages", trl_config="SFTConfig"))
    import llmstack.stages.curate

    monkeypatch.setattr(llmstack.stages.curate, "run", lambda ctx: StageResult(datasets={"chat": tmp_path / "c"}))
    (tmp_path / "chat.jsonl").write_text("")
    raw = {"name": "lazy", "model": {"source": str(tiny_model)},
           "data": {"datasets": {"chat": {"schema": "messages", "sources": [{"name": "c", "path": "chat.jsonl"}]}}},
           "stages": [{"type": "lazy", "dataset": "chat", "args": {"max_steps": 2}}]}
    path = tmp_path / "lazy.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = parse_recipe(raw)

    monkeypatch.delitem(sys.modules, "lazy_kind", raising=False)
    run_recipe(recipe, path, tmp_path / "runs", only=["model", "curate"])  # what `llmstack curate` runs
    assert "lazy_kind" not in sys.modules
    run = run_recipe(recipe, path, tmp_path / "runs")
    assert "lazy_kind" in sys.modules and run.manifest["stages"]["lazy"]["status"] == "done"
    del sys.modules["lazy_kind"]
    again = run_recipe(recipe, path, tmp_path / "runs")
    assert "lazy_kind" not in sys.modules  # reused: its module was never imported
    assert again.manifest["stages"]["lazy"]["started"] == run.manifest["stages"]["lazy"]["started"]

    gone = {**raw, "name": "gone", "stages": [{"type": "gone", "dataset": "chat", "args": {"max_steps": 2}}]}
    with pytest.raises(StageUnavailable, match="stage.s. gone are not implemented"):
        run_recipe(parse_recipe(gone), path, tmp_path / "runs")
    assert not (tmp_path / "runs" / "gone").exists()  # refused before the first stage


def test_the_launch_handoff_carries_the_whole_stage_result(tmp_path):
    """What a launched stage's rank 0 leaves for the pipeline is the StageResult the stage returned, all of it."""
    from llmstack.launchers import read_handoff, write_handoff
    from llmstack.stage import StageResult

    result = StageResult(outputs={"reward_model": tmp_path / "model"}, metrics={"steps": 3, "probe": [{"q": "a"}]},
                         model=None, datasets={"d": tmp_path / "d"})
    write_handoff(tmp_path, result)
    assert read_handoff(tmp_path) == result
    result.model = tmp_path / "model"
    write_handoff(tmp_path, result)
    assert read_handoff(tmp_path) == result


def test_a_stage_whose_earlier_stage_has_not_run_says_what_to_run_first(recipe_file, tmp_path):
    """`--only` a later stage and a launched stage (stage_context) give the same one answer."""
    from llmstack.pipeline import stage_context
    from llmstack.runs import Run

    runs = tmp_path / "runs"
    with pytest.raises(ValueError) as only:
        _run(recipe_file, runs, only=["report"])
    with pytest.raises(ValueError) as launched:
        stage_context(load_recipe(recipe_file), recipe_file, Run.open(runs, "tiny", "default"), "report")
    assert str(only.value) == str(launched.value) == (
        f"stage 'model' (before 'report') has not finished in {runs / 'tiny' / 'default'}; run it first: "
        f"`llmstack run {recipe_file}` (or `--only model`); the stages after it read its outputs from the run manifest")
