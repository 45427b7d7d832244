"""The model card: built from a real run folder, it parses back with huggingface_hub the way the Hub parses it, says
"not recorded" for what a run did not measure, travels with the final model, and is attached to registry versions."""

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from typer.testing import CliRunner

from llmstack.config.recipe import RecipeError, load_recipe
from llmstack.pipeline import run_recipe
from llmstack.registry import Registry
from llmstack.registry.card import CARD_FILE

CARD = {"intended_use": "Answering questions about the llmstack test fixtures.",
        "out_of_scope": "Anything a person relies on.", "limitations": ["Trained on six rows."],
        "language": ["en"], "license": "apache-2.0"}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """A run that curates, tunes one SFT step and evaluates, and a bare one (base model, no eval, no card block)."""
    d = tmp_path_factory.mktemp("card")
    rows = d / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Question {i} about item {i * 7}?",
                                        "output": f"Answer {i}: a short prose reply about item {i}."}) + "\n"
                            for i in range(6)))
    full = d / "full.yaml"
    full.write_text(yaml.safe_dump({
        "name": "tiny", "seed": 1, "model": {"source": str(tiny_model)},
        "data": {"cards_dir": str(d / "cards"),
                 "datasets": {"sft": {"schema": "messages",
                                      "sources": [{"name": "rows", "path": str(rows), "license": "CC0-1.0"}]}}},
        "stages": [{"type": "sft", "dataset": "sft", "lora": {"r": 4, "alpha": 8},
                    "args": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 64}}],
        "eval": {"suite": "smoke", "limit": 2, "tasks": ["identity"], "stages": ["base", "sft"]},
        "card": CARD}))
    bare = d / "bare.yaml"
    bare.write_text(yaml.safe_dump({"name": "bare", "seed": 1, "model": {"source": str(tiny_model)}}))
    return {"full": run_recipe(load_recipe(full), full, d / "runs", run_id="full").dir,
            "bare": run_recipe(load_recipe(bare), bare, d / "runs", run_id="bare").dir}


def test_card_of_a_full_run_parses_back_with_its_facts(runs):
    run = runs["full"]
    card = ModelCard.load(run / CARD_FILE, ignore_metadata_errors=False)
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert meta["datasets"] == ["rows"] and meta["dataset_licenses"] == {"rows": "CC0-1.0"}
    assert "sft" in meta["tags"]
    # model-index: the last evaluated model's score with its interval, the same numbers as the eval stage's file
    scores = json.loads((run / "eval" / "scores.json").read_text())
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "tiny" and [r.dataset_type for r in results] == ["identity"]
    assert results[0].metric_value == scores["sft"]["identity"]["score"]
    assert results[0].metric_args == {"stage": "sft", "n": 2, "ci95": scores["sft"]["identity"]["ci95"]}

    text = card.text
    assert CARD["intended_use"] in text and CARD["out_of_scope"] in text and "- Trained on six rows." in text
    data_card = json.loads((run / "curate" / "cards" / "sft.json").read_text())
    kept, quarantined = data_card["sources"][0]["rows_kept"], data_card["counts"]["dropped"]
    assert f"| sft | messages | rows | path | CC0-1.0 | 6 | {kept} |" in text  # the data card's source row
    assert f"| sft | {data_card['counts']['train']} | {data_card['counts']['validation']} | {quarantined} |" in text
    steps = json.loads((run / "manifest.json").read_text())["stages"]["sft"]["metrics"]["steps"]
    assert steps == 1 and "| sft | sft | done | 1 |" in text
    assert "| base | 0.000 [" in text and "(n=2)" in text
    assert "## Release decision" in text and "NO GATES" in text  # the eval stage's own decision
    assert "Quantization recovery: not recorded" in text
    # the final model's folder carries the same card, so it travels with the weights
    assert (run / "sft" / "model" / CARD_FILE).read_text() == (run / CARD_FILE).read_text()


def test_card_of_a_run_without_eval_invents_nothing(runs):
    card = ModelCard.load(runs["bare"] / CARD_FILE, ignore_metadata_errors=False)
    meta = card.data.to_dict()
    assert "model-index" not in meta and "datasets" not in meta and "language" not in meta
    text = card.text
    assert "## Evaluation\n\n_not recorded_ (this run has no eval stage)." in text
    assert "## Release decision\n\n_not recorded_" in text
    assert "_not recorded_ (set `card.intended_use` in the recipe)" in text
    assert "_not recorded_ (this run curated no dataset)" in text
    assert "0.000 [" not in text and "%" not in text.split("## Training procedure")[1]


def test_registry_versions_carry_the_card(runs, tmp_path):
    reg = Registry.open(tmp_path / "registry.json")
    v = reg.register(runs["full"], name="tiny")
    assert Path(v["model_card"]) == runs["full"] / CARD_FILE and len(v["model_card_sha256"]) == 64
    # a run folder without a card (a run from before model cards) gets one built at registration
    (runs["bare"] / CARD_FILE).unlink()
    v = reg.register(runs["bare"], name="bare")
    assert "## Intended use" in Path(v["model_card"]).read_text()


def test_card_verb_rebuilds_and_bad_card_block_is_named(runs, tmp_path):
    from llmstack.cli import app

    run = runs["full"]
    (run / CARD_FILE).unlink()
    res = CliRunner().invoke(app, ["card", str(run)])
    assert res.exit_code == 0, res.output
    assert CARD["intended_use"] in (run / CARD_FILE).read_text()  # the recorded recipe, unchanged, gave the block
    res = CliRunner().invoke(app, ["card", str(tmp_path)])
    assert res.exit_code == 1 and "no manifest.json" in " ".join(res.output.split())

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "b", "model": {"source": "x"}, "card": {"intended": "x"}}))
    with pytest.raises(RecipeError) as err:
        load_recipe(bad, check_trainer=False)
    assert any(p.startswith("card.intended") for p in err.value.problems)


def test_the_card_beside_the_weights_does_not_change_the_folders_hash(tmp_path):
    from llmstack.runs import sha256_path

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    before = sha256_path(tmp_path)
    (tmp_path / "MODEL_CARD.md").write_text("# card\n")
    assert sha256_path(tmp_path) == before  # fingerprints and the manifest's hash stay as the stage left them
    (tmp_path / "extra.json").write_text("{}")
    assert sha256_path(tmp_path) != before
