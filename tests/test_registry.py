"""The model registry: versions point at real run manifests; aliases promote, respect gates, and roll back."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmstack.config.recipe import load_recipe
from llmstack.pipeline import run_recipe
from llmstack.registry import Registry, RegistryError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Two real runs of a recipe (different seeds), each with its manifest."""
    d = tmp_path_factory.mktemp("reg")
    out = []
    for seed in (1, 2):
        path = d / "tiny.yaml"
        path.write_text(yaml.safe_dump({"name": "tiny", "seed": seed, "model": {"source": str(tiny_model)}}))
        out.append(run_recipe(load_recipe(path), path, d / "runs", run_id=f"s{seed}").dir)
    return out


def test_register_promote_rollback(runs, tmp_path, tiny_model):
    reg = Registry.open(tmp_path / "registry.json")
    v1 = reg.register(runs[0], name="tiny")
    v2 = reg.register(runs[1], name="tiny")
    assert (v1["version"], v2["version"]) == (1, 2)
    assert v1["model_path"] == str(tiny_model) and v1["stage"] == "model" and len(v1["manifest_sha256"]) == 64
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert v1["recipe_sha256"] == manifest["recipe"]["sha256"]

    assert reg.promote("tiny:1", "prod")["version"] == 1
    assert reg.promote("tiny:2", "prod")["version"] == 2
    assert reg.promote("tiny:2", "canary")["aliases"] == ["prod", "canary"]
    assert reg.get("tiny@prod")["version"] == 2 and reg.get("tiny")["version"] == 2
    assert reg.rollback("tiny", "prod")["version"] == 1
    assert reg.get("tiny@prod")["version"] == 1
    assert reg.rollback("tiny", "prod") == {"name": "tiny", "version": None}  # back to before the first promotion
    with pytest.raises(RegistryError, match="no alias 'prod'"):
        reg.get("tiny@prod")
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback("tiny", "prod")


def test_promotion_can_require_eval_gates(runs, tmp_path):
    reg = Registry.open(tmp_path / "registry.json")
    reg.register(runs[0], name="tiny")
    with pytest.raises(RegistryError, match="eval has not run"):
        reg.promote("tiny:1", "prod", require_gates=True)
    assert reg.promote("tiny:1", "prod")["version"] == 1  # without the requirement it is the operator's call

    # a run whose eval stage failed its gates (as the eval stage records it) is refused
    failed = tmp_path / "failed-run"
    failed.mkdir()
    m = json.loads((runs[1] / "manifest.json").read_text())
    m["stages"]["eval"] = {"status": "failed", "error": "EvalGateError: base: arc_easy = 0.2 is below the gate"}
    (failed / "manifest.json").write_text(json.dumps(m))
    reg.register(failed, name="tiny")
    with pytest.raises(RegistryError, match="failed its gates"):
        reg.promote("tiny:2", "prod", require_gates=True)


def test_bad_input_is_clear(runs, tmp_path):
    reg = Registry.open(tmp_path / "registry.json")
    with pytest.raises(RegistryError, match="no manifest.json"):
        reg.register(tmp_path)
    with pytest.raises(RegistryError, match="produced no model"):
        reg.register(runs[0], stage="report")
    with pytest.raises(RegistryError, match="no model named 'ghost'"):
        reg.get("ghost@prod")
    with pytest.raises(RegistryError, match="a version is a number"):
        reg.get("tiny:prod")


def test_cli_round_trip(runs, tmp_path):
    store = str(tmp_path / "r.json")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llmstack", "registry", *args, "--store", store],
                              capture_output=True, text=True, cwd=REPO)

    assert cli("register", str(runs[0]), "--name", "tiny").stdout.startswith("tiny:1")
    assert cli("promote", "tiny:1", "--alias", "prod").stdout.strip() == "tiny@prod -> version 1"
    shown = json.loads(cli("show", "tiny@prod").stdout)
    assert shown["version"] == 1 and shown["aliases"] == ["prod"]
    listing = cli("list").stdout
    assert "tiny" in listing and "prod" in listing
    bad = cli("promote", "tiny:9")
    assert bad.returncode == 1 and "no version 9" in bad.stderr and "Traceback" not in bad.stderr
