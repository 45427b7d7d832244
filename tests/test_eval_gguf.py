"""The eval stage scores GGUF exports (`gguf-<type>` in eval.stages) through llama.cpp behind our own API: an f32
export of the `small_random` model scores what transformers scores on the same items (multiple choice by prompt
logprobs, a generation task by llama.cpp's greedy answers), and a q4_k_m export gets a row and a recovery vs the
16-bit model with its paired interval in the report. A recipe naming a GGUF that quantize does not write is refused
at validation; `llmstack eval --backend llamacpp` scores a GGUF file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from llmstack.config.eval import EvalSpec
from llmstack.quant.gguf import converter_dir

pytestmark = pytest.mark.skipif(not (converter_dir() / "convert_hf_to_gguf.py").is_file(),
                                reason="needs llama.cpp's converter and llama-cpp-python: run `make gguf`")


@pytest.fixture(scope="module")
def quant_dir(small_random, tmp_path_factory):
    """What the quantize stage leaves: <stage>/w4a16 (its INT4 model, unused here) and <stage>/gguf/."""
    from llmstack.quant.gguf import export_gguf

    stage = tmp_path_factory.mktemp("int4")
    export_gguf(small_random, stage / "gguf", ["f32", "q4_k_m"], name="small")
    return stage


def test_the_eval_stage_scores_gguf_exports_with_recovery(small_random, quant_dir, tmp_path):
    from llmstack.stages.eval import run

    d = tmp_path / "eval"
    d.mkdir()
    spec = EvalSpec(suite="smoke", stages=["base", "gguf-f32", "gguf-q4_k_m"], limit=8,
                    tasks=["arc_easy", "identity"])
    ctx = SimpleNamespace(dir=d, spec=spec, models={"base": small_random, "int4": quant_dir / "w4a16"}, model=None,
                          datasets={}, name="eval", recipe=SimpleNamespace(stages=[], serve=None), run=None)
    result = run(ctx)
    scores = json.loads((d / "scores.json").read_text())
    for task in ("arc_easy", "identity"):
        # f32 through llama.cpp: the same choice on every item as transformers (prompt logprobs within float noise),
        # and the same greedy answers to the identity questions
        assert scores["gguf-f32"][task]["n"] == scores["base"][task]["n"] >= 4  # identity: the smoke suite has 4
        assert scores["gguf-f32"][task]["answers"] == scores["base"][task]["answers"]
    rec = result.metrics["recovery_gguf"]
    assert set(rec) == {"gguf-f32", "gguf-q4_k_m"} and rec["gguf-f32"]["reference"] == "base"
    assert rec["gguf-f32"]["paired_difference"]["arc_easy"] == [0.0, 0.0, 0.0]
    assert "arc_easy" in rec["gguf-q4_k_m"]["paired_difference"]
    section = (d / "section.md").read_text()
    table = section.split("Quality recovery of `gguf-q4_k_m` vs `base`")[1]
    assert "| arc_easy |" in table and "[95% CI]" in table
    assert "gguf-q4_k_m" in section.split("## Evaluation")[1]  # a column of the scores table


def test_a_recipe_may_name_only_the_gguf_types_quantize_writes():
    from llmstack.config.recipe import RecipeError, parse_recipe

    raw = {"name": "t", "model": {"source": "x"}, "quantize": {"method": "rtn", "gguf": ["q4_k_m"]},
           "eval": {"suite": "smoke", "stages": ["base", "int4", "gguf-q4_k_m"]}}
    parse_recipe(raw, check_trainer=False)
    raw["eval"]["stages"] = ["base", "gguf-q8_0"]
    with pytest.raises(RecipeError) as err:
        parse_recipe(raw, check_trainer=False)
    assert any("eval.stages[1]: 'gguf-q8_0' is not a stage of this recipe" in p and "gguf-q4_k_m" in p
               for p in err.value.problems)


def test_a_gguf_stage_must_be_written_by_quantize(small_random, tmp_path):
    from llmstack.stages.eval import run

    spec = EvalSpec(suite="smoke", stages=["base", "gguf-q8_0"], limit=1, tasks=["identity"])
    ctx = SimpleNamespace(dir=tmp_path, spec=spec, models={"base": small_random}, model=None, datasets={},
                          name="eval", recipe=SimpleNamespace(stages=[], serve=None), run=None)
    with pytest.raises(ValueError, match="add q8_0 to quantize.gguf"):
        run(ctx)


def test_cli_backend_llamacpp_scores_a_gguf_file(quant_dir, small_random):
    from typer.testing import CliRunner

    from llmstack.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--backend", "llamacpp", "--model", str(quant_dir / "gguf" / "small-F32.gguf"),
                              "--suite", "smoke", "--limit", "2", "--tasks", "arc_easy"])
    assert res.exit_code == 0, res.output
    assert "arc_easy" in res.output and "small-F32.gguf" in res.output
    res = runner.invoke(app, ["eval", "--backend", "llamacpp", "--model", str(small_random)])
    assert res.exit_code == 1 and "holds 0 .gguf files" in res.output and "Traceback" not in res.output
