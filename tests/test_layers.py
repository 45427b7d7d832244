"""The layer contracts (pyproject.toml [tool.importlinter]): leaves and config at the bottom, then core, libraries,
stages, the pipeline, the worker, the CLI; scripts/ above the package and off the CLI; no import cycles. Checked by
import-linter over the real import graph (lazy imports inside functions included), so the layout cannot drift back."""

import ast
import re
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


def test_every_script_but_the_docs_generator_is_kept_off_the_cli():
    forbidden = next(c for c in contracts() if c["type"] == "forbidden")
    assert forbidden["forbidden_modules"] == ["llmstack.cli", "llmstack.__main__"]
    scripts = {f"scripts.{p.stem}" for p in (REPO / "scripts").glob("*.py")} - {"scripts.gen_docs"}
    assert set(forbidden["source_modules"]) == scripts


def test_the_layers_are_the_real_floors():
    """Each module sits on the lowest layer its own imports allow: were a module's floor lower than its layer, a new
    import from that layer's neighbours could slip in unnoticed. Leaves (importing nothing of llmstack) are at the
    bottom; every other module imports something from the layer right below its own."""
    import grimp

    layers = [[m.strip() for m in layer.split("|")] for layer in next(
        c for c in contracts() if c["type"] == "layers")["layers"]]
    graph = grimp.build_graph("llmstack", cache_dir=None)
    level = {m: len(layers) - 1 - i for i, layer in enumerate(layers) for m in layer}
    wrong = []
    for module, at in level.items():
        imported = {other for other in level if other != module and graph.direct_import_exists(
            importer=module, imported=other, as_packages=True)}
        floor = 1 + max((level[o] for o in imported), default=-1)
        # the pipeline imports its stages by name (llmstack.config.kinds), so it stands above them without an import
        if floor != at and module != "llmstack.pipeline":
            wrong.append(f"{module} is on layer {at}, its imports put it on {floor}")
    assert not wrong, wrong


def test_every_stage_kind_has_its_own_module():
    from llmstack.config.kinds import STAGE_KINDS

    for kind, entry in STAGE_KINDS.items():
        target = entry.run
        module, func = target.split(":")
        path = REPO / (module.replace(".", "/") + ".py")
        assert module == f"llmstack.stages.{kind}" and path.is_file(), (kind, target)
        tree = ast.parse(path.read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body), f"{path} has no {func}()"


def _command_words(node: ast.AST) -> list[str] | None:
    """The string words of a literal command list/tuple (`[sys.executable, "-m", "llmstack", "serve", ...]`)."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else "" for e in node.elts]
    return None


def _self_launches(source: str) -> list[str]:
    """Commands in `source` that start llmstack's own command line: `-m llmstack` (the CLI's __main__) or
    `-m llmstack.cli...`, written as a command list or as one command string."""
    found = []
    for node in ast.walk(ast.parse(source)):
        words = _command_words(node)
        if words:
            for i, word in enumerate(words[:-1]):
                target = words[i + 1]
                if word == "-m" and (target == "llmstack" or target.startswith("llmstack.cli")):
                    found.append(f"line {node.lineno}: -m {target}")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            text = node.args[0].value
            if re.search(r"-m\s+llmstack(\s|$|\.cli)", text) and ("subprocess" in ast.unparse(node.func)
                                                                    or "system" in ast.unparse(node.func)):
                found.append(f"line {node.lineno}: {text}")
    return found


def test_no_lower_layer_starts_the_command_line():
    """Launching is the pipeline's (llmstack/launchers.py -> `python -m llmstack.worker`) and serving starts through
    the serving layer's entry (`python -m llmstack.serve`): below llmstack/cli, nothing starts `python -m llmstack ...`
    or `-m llmstack.cli...` — the command line is the top layer, and code below it calling up into it is how the
    old launch loop (stage -> cli.launch -> stage, held back by an environment flag) came about."""
    offenders = {}
    for path in sorted((REPO / "llmstack").rglob("*.py")):
        rel = path.relative_to(REPO / "llmstack")
        if rel.parts[0] == "cli" or rel == Path("__main__.py"):
            continue
        hits = _self_launches(path.read_text())
        if hits:
            offenders[str(rel)] = hits
    assert not offenders, offenders


def test_the_self_launch_check_finds_what_it_looks_for():
    assert _self_launches('subprocess.Popen([sys.executable, "-m", "llmstack", "serve", "--config", c])')
    assert _self_launches('cmd = [python, "-m", "llmstack.cli.launch", recipe]')
    assert _self_launches('subprocess.run("python -m llmstack serve --config x", shell=True)')
    assert not _self_launches('subprocess.Popen([sys.executable, "-m", "llmstack.serve", "--config", c])')
    assert not _self_launches('cmd = [python, "-m", "llmstack.worker", recipe]')
