"""The robustness suite: seeded perturbations (pure), and clean vs perturbed scores through lm-eval on the tiny model,
in-process and through the live llmstack server."""

import json

import pytest
from typer.testing import CliRunner

from llmstack.eval.perturb import DISTRACTORS, KINDS, perturb_doc, perturb_rows
from llmstack.eval.robustness import compare, robustness
from llmstack.eval.run import Target, evaluate
from llmstack.eval.task_data import read_task
from test_eval_run import tiny_server  # noqa: F401  (the module-scoped live server fixture)

DOC = {"id": "q1", "question": "Which gas do plants absorb from the atmosphere during photosynthesis?",
       "choices": ["oxygen", "carbon dioxide", "nitrogen", "helium"], "gold": 1}


def test_perturbations_are_seeded_and_change_only_what_they_say():
    for kind in KINDS:
        a, b = perturb_doc(DOC, kind, seed=0), perturb_doc(DOC, kind, seed=0)
        assert a == b and a != DOC, kind  # deterministic, and it does change the item
        assert a["id"] == DOC["id"]
    assert perturb_doc(DOC, "typos", seed=1) != perturb_doc(DOC, "typos", seed=0)
    typo = perturb_doc(DOC, "typos")["question"]
    assert sorted(typo) == sorted(DOC["question"]) and len(typo.split()) == len(DOC["question"].split())
    assert perturb_doc(DOC, "casing")["question"].lower() == DOC["question"].lower()
    assert perturb_doc(DOC, "whitespace")["question"].split() == DOC["question"].split()
    prefixed = perturb_doc(DOC, "prefix")["question"]
    assert prefixed.endswith(DOC["question"]) and any(prefixed.startswith(d) for d in DISTRACTORS)
    shuffled = perturb_doc(DOC, "shuffle")
    assert shuffled["question"] == DOC["question"] and shuffled["choices"] != DOC["choices"]
    assert shuffled["choices"][shuffled["gold"]] == "carbon dioxide"
    assert [DOC["choices"][p] for p in shuffled["perm"]] == shuffled["choices"]
    # items without choices are left alone by shuffle; unknown kinds are refused
    assert perturb_rows([{"id": "r", "prompt": "hi"}], "shuffle") == [{"id": "r", "prompt": "hi"}]
    with pytest.raises(ValueError, match="unknown perturbation 'emoji'"):
        perturb_doc(DOC, "emoji")


def test_compare_on_planted_items():
    clean = {"score": 0.75, "items": [1.0, 1.0, 1.0, 0.0], "answers": [0, 1, 2, 3]}
    pert = {"score": 0.25, "items": [1.0, 0.0, 0.0, 0.0], "answers": [0, 2, 3, 3], "ci95": [0.05, 0.7]}
    r = compare(clean, pert)
    assert r["n"] == 4 and r["clean"] == 0.75 and r["perturbed"] == 0.25
    assert r["delta"][0] == -0.5 and r["delta"][1] <= -0.5 <= r["delta"][2]
    assert r["consistency"] == 0.5  # items 0 and 3 kept their answer
    lo, hi = r["consistency_ci95"]
    assert lo < 0.5 < hi


@pytest.fixture(scope="module")
def rob(tiny_model, tmp_path_factory):
    samples = tmp_path_factory.mktemp("rob")
    return robustness(Target(model=tiny_model, dtype="float32"), "smoke", kinds=["shuffle", "typos", "prefix"],
                      tasks=["arc_easy", "winogrande", "refusal"], samples_dir=samples), samples


def test_robustness_through_lm_eval_in_process(rob):
    result, samples = rob
    # winogrande has no question text or options list to perturb; shuffle applies to multiple choice only
    assert set(result) == {"arc_easy", "refusal"}
    assert set(result["arc_easy"]) == {"shuffle", "typos", "prefix"} and set(result["refusal"]) == {"typos", "prefix"}
    for kinds in result.values():
        for r in kinds.values():
            assert 0 <= r["consistency"] <= 1 and r["consistency_ci95"][0] <= r["consistency"]
    # lm-eval scores each option on its own after the same prompt: order cannot matter, so a shuffled item must get
    # the same option (mapped back through `perm`) and the same score — a check that the mapping is right
    assert result["arc_easy"]["shuffle"]["consistency"] == 1.0
    assert result["arc_easy"]["shuffle"]["perturbed"] == result["arc_easy"]["shuffle"]["clean"]
    # the model really read perturbed text: the logged docs are the seeded perturbations of the clean items
    logged = [json.loads(x)["doc"] for x in (samples / "typos" / "arc_easy.jsonl").read_text().splitlines()]
    clean = read_task("arc_easy")[:8]
    assert logged == perturb_rows(clean, "typos") and logged != clean
    shuffled = [json.loads(x) for x in (samples / "shuffle" / "arc_easy.jsonl").read_text().splitlines()]
    assert all(s["doc"]["choices"] != c["choices"] for s, c in zip(shuffled, clean))


def test_robustness_is_deterministic_and_passes_through_the_server(tiny_model, tiny_server, rob):  # noqa: F811
    result, _ = rob
    served = robustness(Target(model=tiny_model, backend="server", base_url=tiny_server, served_name="tiny",
                               api_key="sk-eval-tiny"), "smoke", kinds=["typos", "prefix"],
                        tasks=["arc_easy", "refusal"])
    for task in ("arc_easy", "refusal"):
        for kind in ("typos", "prefix"):
            a, b = result[task][kind], served[task][kind]
            # the same perturbed items, the same answers (within the stated one-item parity tolerance)
            assert a["n"] == b["n"] and abs(a["perturbed"] - b["perturbed"]) <= 1 / a["n"] + 1e-9, (task, kind)


def test_perturbed_answers_follow_the_scores(tiny_model):
    """Per-item answers are what the score is computed from: on arc_easy (acc) an item is right iff its answer,
    in the clean item's order, is the clean gold."""
    res = evaluate(Target(model=tiny_model), "smoke", tasks=["arc_easy"], perturb="shuffle")["arc_easy"]
    gold = [d["gold"] for d in read_task("arc_easy")[:8]]
    assert res["items"] == [float(a == g) for a, g in zip(res["answers"], gold)]


def test_cli_robustness_table_and_bad_kind(tiny_model, tmp_path):
    from llmstack.cli import app

    runner = CliRunner()
    out = tmp_path / "s.json"
    res = runner.invoke(app, ["eval", "--model", f"tiny={tiny_model}", "--suite", "smoke", "--limit", "2",
                              "--tasks", "arc_easy", "--robustness", "casing,whitespace", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "robustness" in res.output and "casing" in res.output and "whitespace" in res.output
    assert set(json.loads(out.read_text())["robustness"]["tiny"]["arc_easy"]) == {"casing", "whitespace"}
    res = runner.invoke(app, ["eval", "--model", str(tiny_model), "--robustness", "emoji"])
    assert res.exit_code == 1 and "unknown perturbation(s) emoji" in res.output


def test_pipeline_stage_writes_robustness(tiny_model, tmp_path):
    from types import SimpleNamespace

    from llmstack.config.eval import EvalSpec
    from llmstack.stages.eval import run

    spec = EvalSpec(suite="smoke", stages=["base"], limit=2, tasks=["arc_easy", "refusal"],
                    robustness={"perturbations": ["prefix"], "tasks": ["refusal"]})
    d = tmp_path / "eval"
    d.mkdir()
    result = run(SimpleNamespace(dir=d, spec=spec, models={"base": tiny_model}, model=None, datasets={}, name="eval"))
    rob = json.loads((d / "robustness.json").read_text())
    assert set(rob["base"]) == {"refusal"} and set(rob["base"]["refusal"]) == {"prefix"}
    assert result.outputs["robustness"] == d / "robustness.json"
    assert "Robustness of `base` (seed 0)" in (d / "section.md").read_text()
    with pytest.raises(ValueError, match="robustness.tasks: 'gsm8k' is not among the tasks evaluated"):
        EvalSpec(suite="smoke", tasks=["arc_easy"], robustness={"tasks": ["gsm8k"]})
