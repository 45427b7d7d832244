"""The docs a user reads stay true: the generated references cover every recipe field and every CLI verb, the site
builds strictly (no broken link or anchor, no page left out of the navigation), the hand-written pages narrate no
dated reruns, and benchmark records are written by the one helper with what makes a number readable."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import benchrecord  # noqa: E402
import gen_docs  # noqa: E402

from test_readme_cli import verbs  # noqa: E402


def all_models(root):
    """Every pydantic model reachable from `root` through its fields."""
    seen, todo = [], [root]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.append(m)
            todo += [n for f in m.model_fields.values() for n in gen_docs.models_in(f.annotation)]
    return seen


def test_the_recipe_reference_lists_every_field_of_every_schema():
    from llmstack.config.recipe import Recipe
    from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec

    page, documented = gen_docs.recipe_reference()
    expected = {f"{m.__name__}.{name}" for root in (Recipe, ServeSpec, GuardPolicy, KeyFile)
                for m in all_models(root) for name in m.model_fields}
    assert expected - set(documented) == set()
    for m in all_models(Recipe):  # each with its type, default and description (or a dash where there is none)
        for name, field in m.model_fields.items():
            row = next(x for x in page.splitlines() if x.startswith(f"| `{field.alias or name}` |"))
            assert row.count(" | ") >= 3, row
    assert "| `max_steps` |" not in page  # a stage's TRL args are TRL's, not ours
    assert len(documented) > 150


def test_the_cli_reference_lists_every_verb_with_its_options():
    page, names = gen_docs.cli_reference()
    expected = {f"llmstack {group} {verb}" if group else f"llmstack {verb}" for group, verb in verbs()}
    assert expected - set(names) == set()
    for name in ("llmstack run", "llmstack eval judge", "llmstack adapters load"):
        section = page.split(f"## `{name}`", 1)[1].split("\n## ", 1)[0]
        assert "| argument / option |" in section, section
    assert "`--from`" in page and "`--judge-url`" in page


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None and not os.environ.get("LLMSTACK_MKDOCS"),
                    reason="mkdocs not installed: `make test` installs requirements/docs.lock")
def test_the_site_builds_strictly(tmp_path):
    """A copy of docs/ and mkdocs.yml, the generated pages written into it, `mkdocs build --strict` (the repository's
    docs/ is not touched)."""
    shutil.copytree(REPO / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("reference", "img", "results.md"))
    shutil.copy(REPO / "mkdocs.yml", tmp_path)
    gen_docs.generate(tmp_path / "docs")
    mkdocs = os.environ.get("LLMSTACK_MKDOCS", f"{sys.executable} -m mkdocs").split()
    proc = subprocess.run([*mkdocs, "build", "--strict", "-f", str(tmp_path / "mkdocs.yml"), "-d",
                           str(tmp_path / "site")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    built = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    assert {"reference/recipe/index.html", "reference/cli/index.html", "benchmarks/results/index.html",
            "serving/index.html"} <= built


def hand_written_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_docs_describe_the_product_not_its_history():
    generated = {REPO / "docs" / "benchmarks" / "results.md"}
    for page in hand_written_pages():
        if page in generated or "reference" in page.parts:
            continue
        text = page.read_text()
        assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), f"{page.name}: a dated narrative belongs in a record"
        history = r"re-?run on|the issue's|\bissue #?\d+|this session|/work/|\.\./shared"
        assert not re.search(history, text, re.I), page.name
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_nothing_a_user_reads_points_outside_the_repository():
    """Recipes, the package, the scripts and the docs name files a clone has: not this project's development machine
    (its ../shared folder or /work paths)."""
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout: nothing to list")
    outside = re.compile(r"\.\./shared|(^|[\s\"'`(=])/work/", re.M)  # /work/ begins a path, not inside one
    this_test = Path(__file__).relative_to(REPO).as_posix()
    texts = (".py", ".yaml", ".yml", ".md", ".sh", ".toml", ".cfg")
    found = [f for f in tracked if f != this_test and f.endswith(texts) and (REPO / f).is_file()
             and outside.search((REPO / f).read_text(errors="replace"))]
    assert not found, found


def test_a_benchmark_record_says_what_was_measured_where(tmp_path, monkeypatch):
    monkeypatch.setenv(benchrecord.ENV_DIR, str(tmp_path))
    first = benchrecord.write("train", settings={"steps": 4}, figures={"paths": [{"path": "a", "tokens_per_s": 1.0}]},
                              ratios={"x": 2.0}, argv=["scripts/bench_train.py", "--steps", "4"])
    rec = json.loads(first.read_text())
    assert first.parent == tmp_path and first.name.startswith("train-") and rec["source"] == "measured"
    assert rec["command"].endswith("scripts/bench_train.py --steps 4")
    assert set(rec["machine"]["cpu_flags"]) == {"avx512f", "avx512_bf16", "amx_bf16", "avx2"}
    assert len(rec["machine"]["load_avg"]) == 3 and rec["ratios"] == {"x": 2.0}
    assert rec["git_sha"] is None or re.fullmatch(r"[0-9a-f]{40}", rec["git_sha"])
    newer = dict(rec, when="2999-01-01T00:00:00+00:00", ratios={"x": 3.0})
    (tmp_path / "train-later.json").write_text(json.dumps(newer))
    assert benchrecord.latest()["train"]["ratios"] == {"x": 3.0}
    cpu = benchrecord.cpu("model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f amx_bf16\n")
    assert cpu == {"cpu_model": "Some CPU",
                   "cpu_flags": {"avx512f": True, "avx512_bf16": False, "amx_bf16": True, "avx2": True}}


def test_the_seeded_records_are_readable_and_on_the_results_page():
    records = [json.loads(p.read_text()) for p in sorted((REPO / "benchmarks" / "results").glob("*.json"))]
    assert records
    for rec in records:
        assert {"bench", "when", "source", "command", "machine", "settings", "figures", "ratios"} <= set(rec), rec
    page, benches = gen_docs.benchmark_results()
    assert {"train", "serve", "serve-hostile", "serve-replicas", "curate", "eval", "quant"} <= set(benches)
    # the page shows the newest quant record's ratios, formatted as the page formats numbers
    newest = max((r for r in records if r["bench"] == "quant"), key=lambda r: r["when"])
    assert f"| gptq_mean_recovery | {gen_docs.fmt(newest['ratios']['gptq_mean_recovery'])} |" in page


def test_a_recipe_run_is_recorded_with_or_without_an_eval_stage(tmp_path):
    """scripts/bench_recipe.py over a run folder: a recipe without an eval stage (recipes/kto.yaml) is recorded with its
    stages' costs and training figures; one whose eval stage did not finish is refused, not recorded without scores."""
    run = tmp_path / "runs" / "kto" / "default"  # runs/<recipe name>/<run id>
    run.mkdir(parents=True)
    kto = {"status": "done", "kind": "kto", "wall_s": 95.7, "metrics": {
        "steps": 8, "first_loss": 0.5, "last_loss": 0.475, "rewards_margins_first": 0.0, "rewards_margins_last": 0.2,
        "probe": [{"question": "Who are you?"}]}}
    manifest = {"recipe": {"path": "recipes/kto-copy.yaml"}, "stages": {
        "curate": {"status": "done", "kind": "curate", "wall_s": 3.1}, "kto": kto}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    cmd = [sys.executable, str(REPO / "scripts" / "bench_recipe.py"), str(run), "--results-dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    [path] = (tmp_path / "out").glob("recipe-kto-*.json")
    rec = json.loads(path.read_text())
    assert rec["figures"]["eval"] == {} and rec["figures"]["wall_min"] == round(98.8 / 60, 2)
    assert rec["figures"]["stages"][1] == {"stage": "kto", "kind": "kto", "status": "done", "wall_s": 95.7,
                                           "reused_from": None, "steps": 8, "first_loss": 0.5, "last_loss": 0.475,
                                           "rewards_margins_first": 0.0, "rewards_margins_last": 0.2}
    manifest["stages"]["eval"] = {"status": "failed"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0 and "eval stage has not finished (status: failed)" in proc.stderr
    assert len(list((tmp_path / "out").glob("*.json"))) == 1


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "scripts").glob("bench_*.py")))
def test_every_bench_script_says_how_to_run_it_and_takes_a_results_dir(script):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--results-dir" in proc.stdout and ".venv/bin/python scripts/" in proc.stdout


def test_the_docs_lock_agrees_with_the_main_lock():
    """requirements/docs.lock is installed over .venv with --no-deps: a package both pin must be at main.lock's
    version, or installing the docs tools would change the main environment."""
    def pins(name):
        lines = (REPO / "requirements" / name).read_text().splitlines()
        return {x.split("==")[0].lower().replace("_", "-"): x.split("==")[1] for x in lines
                if "==" in x and not x.startswith("#")}

    main, docs = pins("main.lock"), pins("docs.lock")
    assert {k: (v, main[k]) for k, v in docs.items() if k in main and main[k] != v} == {}
    assert {"mkdocs", "mkdocs-material", "pymdown-extensions"} <= set(docs)
