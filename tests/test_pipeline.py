"""The pipeline and the run manifest: stages run once, are reused while their inputs are unchanged, re-run on change
or on --from, and everything lands in manifest.json and report.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmstack.pipeline import run_recipe
from llmstack.config.recipe import load_recipe

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
                          capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert "HF_HUB_OFFLINE=1" in proc.stderr and "Traceback" not in proc.stderr
