"""Recipe schema and `llmstack validate`: every shipped recipe validates; broken ones get path-named errors, exit 2."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from llmstack.config.recipe import RecipeError, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

GOOD = {
    "name": "t",
    "model": {"source": "smollm2-135m-instruct"},
    "data": {"datasets": {
        "chat": {"schema": "messages", "sources": [{"name": "a", "path": "a.jsonl", "format": "alpaca"}]},
        "prefs": {"schema": "preference", "sources": [{"name": "p", "path": "p.json"}]},
    }},
    "stages": [
        {"type": "sft", "dataset": "chat", "lora": {"r": 8}, "args": {"learning_rate": 1e-4, "max_steps": 3}},
        {"type": "dpo", "dataset": "prefs", "args": {"beta": 0.1}},
    ],
    "eval": {"suite": "smoke", "stages": ["base", "sft", "dpo"]},
}


@pytest.fixture(autouse=True)
def fresh_check_cache(tmp_path, monkeypatch):
    """Each test checks trainer arguments with TRL itself, not with answers remembered by an earlier run (the CLI runs
    here inherit it)."""
    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path / "cache"))


def problems_of(raw, check_trainer=False) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, check_trainer=check_trainer)
    return info.value.problems


def with_changes(**changes):
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        target = raw
        *parents, last = dotted.split("__")
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return raw


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)  # includes TRL's own checks of every stage's args
    assert recipe.name


def test_good_recipe_parses_with_trl_checks():
    recipe = parse_recipe(GOOD, check_trainer=True)
    assert [s.id for s in recipe.stages] == ["sft", "dpo"]
    assert recipe.stages[0].lora.r == 8


def test_unknown_key_names_path_and_suggests():
    raw = with_changes()
    raw["stages"][0]["lorra"] = {"r": 8}
    assert problems_of(raw) == ["stages[0].lorra: unknown key; did you mean 'lora'?"]


def test_unknown_nested_key_inside_dict_of_models():
    raw = with_changes()
    raw["data"]["datasets"]["chat"]["sources"][0]["licence"] = "MIT"
    assert problems_of(raw) == ["data.datasets.chat.sources[0].licence: unknown key; did you mean 'license'?"]


def test_wrong_type_and_bound():
    probs = problems_of(with_changes(stages__0__lora__r=0, seed="abc"))
    assert "stages[0].lora.r: must be > 0" in probs
    assert any(p.startswith("seed: ") for p in probs)


def test_missing_model():
    assert problems_of(with_changes(model=KeyError)) == ["model: required key is missing"]


def test_stage_needs_dataset_the_recipe_lacks():
    probs = problems_of(with_changes(stages__1__dataset="nope"))
    assert len(probs) == 1
    assert probs[0].startswith("stages[1].dataset: 'nope' is not defined under data.datasets")


def test_stage_dataset_schema_mismatch():
    probs = problems_of(with_changes(stages__1__dataset="chat"))
    assert probs == ["stages[1].dataset: a dpo stage trains on `preference` data, but data.datasets.chat.schema "
                     "is `messages`"]


def test_all_problems_reported_at_once():
    raw = with_changes(stages__0__lora__r=-1, stages__1__dataset="nope")
    raw["eval"]["stages"] = ["base", "ghost"]
    # Pydantic errors come first; cross-field checks need a schema-valid recipe, so fix the schema error and recheck.
    assert problems_of(raw) == ["stages[0].lora.r: must be > 0"]
    raw["stages"][0]["lora"]["r"] = 4
    probs = problems_of(raw)
    assert len(probs) == 2 and probs[1].startswith("eval.stages[1]: 'ghost'")


def test_trl_args_checked_by_trl():
    raw = with_changes()
    raw["stages"][0]["args"]["max_seq_length"] = 512  # renamed to max_length in TRL 1.x
    raw["stages"][1]["args"]["output_dir"] = "/tmp/x"
    probs = problems_of(raw, check_trainer=True)
    assert "stages[0].args.max_seq_length: not an argument of trl.SFTConfig; did you mean 'max_length'?" in probs
    assert any(p.startswith("stages[1].args.output_dir: set by llmstack") for p in probs)


def test_trl_post_init_errors_surface():
    raw = with_changes()
    raw["stages"][1]["args"] = {"lr_scheduler_type": "no_such_schedule"}
    probs = problems_of(raw, check_trainer=True)
    assert len(probs) == 1 and probs[0].startswith("stages[1].args: trl.DPOConfig rejected these arguments")


def test_trl_arg_types_checked_before_any_model_loads():
    """TRL's config classes do not check types: `max_steps: "ten"` would construct and fail (or not) much later."""
    raw = with_changes()
    raw["stages"][0]["args"] = {"max_steps": "ten", "learning_rate": "5e-4", "per_device_train_batch_size": 2.5,
                                "report_to": "none", "max_length": None}
    probs = problems_of(raw, check_trainer=True)
    assert "stages[0].args.max_steps: must be int, got 'ten'" in probs
    assert ("stages[0].args.learning_rate: must be float, got '5e-4' (YAML reads 5e-4 as text: write it with a dot, "
            "e.g. 5.0e-4)") in probs
    assert "stages[0].args.per_device_train_batch_size: must be int, got 2.5" in probs
    assert len(probs) == 3  # report_to (str) and max_length (int or null) are fine


def test_group_size_must_divide_the_local_models_sizes(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 576, "intermediate_size": 1536}')
    raw = with_changes(model__source=str(model), quantize={"scheme": "w4a16", "group_size": 128})
    assert problems_of(raw) == [f"quantize.group_size: 128 does not divide the model's hidden_size 576 (read from "
                                f"{model / 'config.json'}); use 64"]
    parse_recipe(with_changes(model__source=str(model), quantize={"scheme": "w4a16", "group_size": 64}))
    # w8a8 has no groups; a hub id cannot be read offline and is not guessed at
    parse_recipe(with_changes(model__source=str(model),
                              quantize={"scheme": "w8a8", "group_size": 128, "serve_fallback": None}))
    parse_recipe(with_changes(model__source="org/not-here", quantize={"scheme": "w4a16", "group_size": 100}))


def test_gguf_types_that_require_an_importance_matrix_are_checked_at_load(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMSTACK_LLAMA_CPP_BIN", str(tmp_path))  # the llama.cpp tools not built
    raw = with_changes(quantize={"gguf": ["q4_k_m", "iq2_xs"]})
    assert problems_of(raw) == [
        f"quantize.gguf: llama.cpp quantizes iq2_xs only with an importance matrix, which its llama-imatrix computes, "
        f"and llama-imatrix and llama-quantize are not built (in {tmp_path}): run `make gguf`"]
    assert problems_of(with_changes(quantize={"gguf": ["iq1_m"], "gguf_imatrix": "off"})) == [
        "quantize: gguf_imatrix: off, but llama.cpp quantizes iq1_m only with an importance matrix: set gguf_imatrix: "
        "auto or choose another type (iq4_xs, q4_k_m, ...)"]
    # the types it only helps go without it when the tools are missing
    parse_recipe(with_changes(quantize={"gguf": ["q4_k_m", "iq4_xs"]}))


def test_validate_is_torch_free():
    code = ("import sys; from llmstack.config.recipe import load_recipe; "
            "load_recipe('recipes/quickstart.yaml', check_trainer=False); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'vllm', 'datatrove') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_trls_answer_is_remembered_per_arguments_packages_and_environment(tmp_path, monkeypatch):
    """A stage's args checked once are answered again without TRL (whose import takes seconds); other arguments, an
    ACCELERATE_* variable TrainingArguments reads, or a torn cache file are checked afresh, and arguments JSON cannot
    spell exactly are never remembered."""
    import datetime

    from llmstack.config import trainer_args

    calls = []
    check = trainer_args._check
    monkeypatch.setattr(trainer_args, "_check", lambda kind, args: calls.append(kind) or check(kind, args))
    bad = {"lr_scheduler_type": "no_such_schedule"}
    first = trainer_args.check_trainer_args("dpo", bad)
    assert len(first) == 1 and first[0][1].startswith("trl.DPOConfig rejected these arguments") and calls == ["dpo"]
    assert trainer_args.check_trainer_args("dpo", bad) == first and calls == ["dpo"]
    assert trainer_args.check_trainer_args("dpo", {"beta": 0.2}) == [] and len(calls) == 2
    assert trainer_args.check_trainer_args("sft", bad)[0][1].startswith("trl.SFTConfig rejected") and len(calls) == 3
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert trainer_args.check_trainer_args("dpo", bad) == first and len(calls) == 4
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    remembered = tmp_path / "cache" / "trainer-checks" / f"{trainer_args.cache_key('dpo', bad)}.json"
    remembered.write_text('[["", "tor')
    assert trainer_args.check_trainer_args("dpo", bad) == first and len(calls) == 5
    assert trainer_args.check_trainer_args("dpo", bad) == first and len(calls) == 5  # rewritten whole
    dated = {"run_name": datetime.date(2026, 1, 1)}
    assert trainer_args.cache_key("dpo", dated) is None and trainer_args.cache_key("dpo", {1: 2}) is None
    trainer_args.check_trainer_args("dpo", dated)
    trainer_args.check_trainer_args("dpo", dated)
    assert len(calls) == 7

    # and a fresh process answers a recipe checked before without importing trl at all
    parse_recipe(yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text()))
    code = ("import sys; from llmstack.config.recipe import load_recipe; load_recipe('recipes/quickstart.yaml'); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_lora_and_qlora_exclusive():
    probs = problems_of(with_changes(stages__0__qlora={"r": 4}))
    assert probs == ["stages[0]: set either `lora` or `qlora`, not both (qlora is LoRA on a 4-bit base)"]


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "llmstack", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_validate_broken_recipe_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        name: bad
        model: {source: smollm2-135m-instruct}
        stages:
          - {type: sft, dataset: missing, lora: {r: 0}}
    """))
    proc = _cli("validate", str(bad), "--fast")
    assert proc.returncode == 2
    assert "stages[0].lora.r: must be > 0" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_validate_yaml_syntax_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {source: a\n")
    proc = _cli("validate", str(bad), "--fast")
    assert proc.returncode == 2 and "not valid YAML" in proc.stdout and "Traceback" not in proc.stderr


def test_cli_validate_good_recipe_prints_only_its_answer():
    proc = _cli("validate", "recipes/quickstart.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # third-party import noise (bitsandbytes' "Failed to load CPU gemm_4bit_forward ...") stays out of the answer
    out = " ".join((proc.stdout + proc.stderr).split())
    assert out == "recipes/quickstart.yaml: OK — quickstart: smollm2-135m-instruct; cpt, sft, dpo", out


def test_docs_recipe_example_validates():
    """The annotated recipe in docs/recipes.md is a real recipe: it must keep validating as the schema changes."""
    text = (REPO / "docs" / "recipes.md").read_text()
    start = text.index("```yaml\nname:") + len("```yaml\n")
    raw = yaml.safe_load(text[start:text.index("```", start)])
    recipe = parse_recipe(raw, check_trainer=True)
    assert [s.id for s in recipe.stages] == ["sft"] and recipe.quantize.scheme == "w4a16"
