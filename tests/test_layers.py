"""The layer contract (pyproject.toml [tool.importlinter]): config at the bottom, then libraries, then stages, then the
pipeline, then the CLI; no import cycles. Checked by import-linter over the real import graph (lazy imports inside
functions included), so the layout cannot drift back."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_linter_contracts_hold():
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"Contracts: {len(contracts())} kept, 0 broken." in proc.stdout


def test_contracts_list_no_exceptions_and_cover_every_top_level_module():
    layers = next(c for c in contracts() if c["type"] == "layers")
    assert not any("ignore_imports" in c for c in contracts())
    named = {m.strip() for layer in layers["layers"] for m in layer.split("|")}
    package = REPO / "llmstack"
    present = {f"llmstack.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    present |= {f"llmstack.{p.parent.name}" for p in package.glob("*/__init__.py")}
    assert present == named, f"not in a layer: {sorted(present - named)}; named but missing: {sorted(named - present)}"


def test_every_stage_kind_has_its_own_module():
    from llmstack.pipeline import STAGES

    for kind, target in STAGES.items():
        module, func = target.split(":")
        path = REPO / (module.replace(".", "/") + ".py")
        assert module == f"llmstack.stages.{kind}" and path.is_file(), (kind, target)
        tree = ast.parse(path.read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body), f"{path} has no {func}()"
