"""The stage kinds over TRL's other trainers — kto, orpo, rloo, online_dpo, distill — on the tiny model: each trains
a few steps with a measured effect that could fail (the loss moves, the preferred answer gains log-probability, the
mean reward rises), its output folder serves through the real app, and its bad inputs are recipe errors that name the
YAML path."""

import pytest

from train_data import (
    QA,
    make_ctx,
    make_recipe,
    messages_dataset,
    preference_dataset,
    served_answer,
    unpaired_dataset,
)

SCHEMA = {"prefs": "preference", "chat": "messages", "kto": "unpaired", "kto_good": "unpaired"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    return {"prefs": preference_dataset(root / "prefs"), "chat": messages_dataset(root / "chat", n=16),
            "kto": unpaired_dataset(root / "kto"), "kto_good": unpaired_dataset(root / "good", undesirable=False)}


def train(tmp_path, model, data, stage: dict):
    from llmstack.pipeline import stage_function

    recipe = make_recipe(model, {stage["dataset"]: (SCHEMA[stage["dataset"]], data[stage["dataset"]])}, [stage])
    ctx = make_ctx(recipe, tmp_path / "runs", recipe.stages[0].id, model, {stage["dataset"]: data[stage["dataset"]]})
    return ctx, stage_function(stage["type"])(ctx)


def fast_args(**kw):
    return {"max_steps": 8, "learning_rate": 1e-3, "per_device_train_batch_size": 4, "max_length": 128,
            "report_to": [], **kw}


def logp(model, tok, prompt, answer) -> float:
    """Sum of the answer's token log-probabilities after the prompt (chat template applied), as TRL scores them."""
    import torch

    p = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + answer, tokenize=False)
    ids = tok(full, return_tensors="pt", add_special_tokens=False).input_ids
    n = len(tok(p, add_special_tokens=False).input_ids)
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    return lp[n - 1:].sum().item()


def margin(folder, rows, good: str, bad: str) -> float:
    """Mean log-probability of `good` answers minus `bad` ones, over rows holding both as message lists."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    return sum(logp(model, tok, r["prompt"], r[good]) - logp(model, tok, r["prompt"], r[bad]) for r in rows) / len(rows)


def assert_serves(res):
    answer = served_answer(res.model)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens > 0


def _pairs(folder):
    from datasets import load_from_disk

    return list(load_from_disk(str(folder))["train"])


# ---- kto ----------------------------------------------------------------------------------------------------------


def test_kto_raises_desirable_over_undesirable_and_serves(tmp_path, tiny_model, data):
    stage = {"type": "kto", "dataset": "kto", "args": fast_args()}
    ctx, res = train(tmp_path, tiny_model, data, stage)
    pairs = _pairs(data["prefs"])  # the same questions, right answer vs a BAD one
    before, after = margin(tiny_model, pairs, "chosen", "rejected"), margin(res.model, pairs, "chosen", "rejected")
    assert after > before + 1.0, (before, after)
    assert res.metrics["last_loss"] < res.metrics["first_loss"], res.metrics
    assert res.metrics["desirable_rows"] == res.metrics["undesirable_rows"] > 0
    assert (ctx.dir / "loss.png").exists()
    assert_serves(res)


def test_kto_without_undesirable_rows_is_a_recipe_error(tmp_path, tiny_model, data):
    from llmstack.config.recipe import RecipeError

    with pytest.raises(RecipeError) as info:
        train(tmp_path, tiny_model, data, {"type": "kto", "dataset": "kto_good", "args": fast_args()})
    (problem,) = info.value.problems
    assert problem.startswith("stages[0].dataset: the curated train split of data.datasets.kto_good has 16 "
                              "desirable and 0 undesirable rows; KTO needs both")
    assert "label: false" in problem and not (tmp_path / "runs" / "t" / "test" / "kto" / "model").exists()


# ---- orpo ---------------------------------------------------------------------------------------------------------


def test_orpo_raises_chosen_over_rejected_and_serves(tmp_path, tiny_model, data):
    stage = {"type": "orpo", "dataset": "prefs", "args": fast_args()}
    ctx, res = train(tmp_path, tiny_model, data, stage)
    pairs = _pairs(data["prefs"])
    before, after = margin(tiny_model, pairs, "chosen", "rejected"), margin(res.model, pairs, "chosen", "rejected")
    assert after > before + 1.0, (before, after)
    assert res.metrics["last_loss"] < res.metrics["first_loss"], res.metrics
    assert_serves(res)


# ---- rloo and online_dpo: grpo's rewards ----------------------------------------------------------------------------

REWARD = [{"type": "python", "function": "test_train_rlhf:byte_token_fraction"}]


def test_rloo_raises_the_mean_reward_and_serves(tmp_path, tiny_model, data):
    # beta 0: no KL term, so no reference model (half the forward passes); advantages normalised as in the grpo test
    args = {"max_steps": 12, "learning_rate": 2e-2, "per_device_train_batch_size": 8, "num_generations": 4,
            "max_completion_length": 16, "beta": 0.0, "normalize_advantages": True, "report_to": []}
    ctx, res = train(tmp_path, tiny_model, data, {"type": "rloo", "dataset": "chat", "rewards": REWARD, "args": args})
    per_step = res.metrics["reward_per_step"]
    assert len(per_step) == 12
    first, last = sum(per_step[:3]) / 3, sum(per_step[-3:]) / 3
    assert last > first + 0.15, per_step
    assert "reward_byte_token_fraction_last" in res.metrics and (ctx.dir / "reward.png").exists()
    assert_serves(res)


def test_llamafactory_kto_demo_curates_to_unpaired_rows_of_both_labels(tmp_path, tiny_model):
    """The issue's KTO data (kto_en_demo.json in the llamafactory 0.9.5 sdist) through the curate stage: `unpaired`
    rows in TRL's format, undesirable rows kept (a `messages` dataset of the same source keeps only the desirable)."""
    from datasets import load_from_disk

    from llmstack.config.data import DatasetSpec
    from llmstack.data.curate import curate_dataset

    source = {"name": "kto_en_demo", "pypi": "llamafactory==0.9.5", "sdist": True,
              "member": "llamafactory-0.9.5/data/kto_en_demo.json", "format": "kto"}
    spec = DatasetSpec.model_validate({"schema": "unpaired", "sources": [source], "decontaminate": {"enabled": False},
                                       "filters": {"languages": None}})
    curate_dataset("kto", spec, tmp_path / "run", tiny_model, seed=7)
    dd = load_from_disk(str(tmp_path / "run" / "kto"))
    rows = list(dd["train"]) + list(dd["validation"])
    assert dd["train"].column_names == ["prompt", "completion", "label"]
    assert all(r["prompt"][-1]["role"] == "user" and r["completion"][0]["role"] == "assistant" for r in rows)
    labels = [r["label"] for r in rows]
    assert sum(labels) > 100 and len(labels) - sum(labels) > 100, (sum(labels), len(labels))


def test_online_dpo_prefers_the_higher_reward_sample_and_serves(tmp_path, tiny_model, data):
    args = {"max_steps": 16, "learning_rate": 2e-2, "per_device_train_batch_size": 8, "max_new_tokens": 16,
            "max_length": 256, "report_to": []}
    ctx, res = train(tmp_path, tiny_model, data, {"type": "online_dpo", "dataset": "chat", "rewards": REWARD,
                                                  "args": args})
    per_step = res.metrics["score_per_step"]
    print("online_dpo scores", per_step, res.metrics.get("rewards_margins_last"))
    assert len(per_step) == 16
    first, last = sum(per_step[:3]) / 3, sum(per_step[-3:]) / 3
    assert last > first + 0.1, per_step
    assert (ctx.dir / "objective_scores.png").exists()
    assert_serves(res)


# ---- distill --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Another tiny model (other random weights) with the same tokenizer: a teacher whose distribution differs."""
    from llmstack.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "model", seed=1)


def divergence(student, teacher, texts) -> float:
    """Mean per-token KL(teacher || student) of the next-token distributions over `texts`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    s, t = (AutoModelForCausalLM.from_pretrained(m).eval() for m in (student, teacher))
    total = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            ls, lt = torch.log_softmax(s(ids).logits, -1), torch.log_softmax(t(ids).logits, -1)
            total += (lt.exp() * (lt - ls)).sum(-1).mean().item()
    return total / len(texts)


def test_distill_moves_the_student_towards_the_teacher_and_serves(tmp_path, tiny_model, teacher, data):
    from transformers import AutoTokenizer

    args = {"max_steps": 10, "learning_rate": 5e-3, "per_device_train_batch_size": 8, "max_completion_length": 16,
            "report_to": []}
    ctx, res = train(tmp_path, tiny_model, data, {"type": "distill", "dataset": "chat", "teacher": str(teacher),
                                                  "args": args})
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                     tokenize=False) for q, a in QA]
    before, after = divergence(tiny_model, teacher, texts), divergence(res.model, teacher, texts)
    losses = [h["loss"] for h in res_history(ctx) if "loss" in h]
    print("distill KL", before, after, "losses", losses)
    assert after < before * 0.8, (before, after)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert res.metrics["teacher"] == str(teacher)
    assert_serves(res)


def res_history(ctx):
    import json

    return json.loads((ctx.dir / "log_history.json").read_text())


@pytest.fixture(scope="module")
def foreign_teacher(tmp_path_factory, teacher):
    """A teacher folder whose tokenizer was trained to another vocabulary (the model weights do not matter)."""
    import shutil

    from llmstack.testing import build_tokenizer

    out = tmp_path_factory.mktemp("foreign") / "model"
    shutil.copytree(teacher, out)
    build_tokenizer(vocab_size=400).save_pretrained(out)  # the default corpus saturates at 548 tokens
    return out


def test_a_teacher_with_another_tokenizer_is_refused_at_stage_start_too(tmp_path, tiny_model, teacher,
                                                                         foreign_teacher, data):
    """The recipe passed (the teacher folder matched then); the folder changed before the stage ran."""
    import shutil

    from llmstack.config.recipe import RecipeError
    from llmstack.pipeline import stage_function

    folder = tmp_path / "teacher"
    shutil.copytree(teacher, folder)
    stage = {"type": "distill", "dataset": "chat", "teacher": str(folder), "args": {"max_steps": 1, "report_to": []}}
    recipe = make_recipe(tiny_model, {"chat": ("messages", data["chat"])}, [stage])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(foreign_teacher / name, folder / name)
    ctx = make_ctx(recipe, tmp_path / "runs", "distill", tiny_model, {"chat": data["chat"]})
    with pytest.raises(RecipeError) as info:
        stage_function("distill")(ctx)
    (problem,) = info.value.problems
    assert problem.startswith(f"stages[0].teacher: the teacher at {folder} has another tokenizer than the student")
    assert not (ctx.dir / "model").exists()


def test_a_teacher_stage_is_found_in_this_run_or_its_manifest(tmp_path, tiny_model, teacher, data):
    """`teacher: big` names an earlier stage: its model from this run (ctx.models), or, when only the distill stage
    runs (`--only distill`), from that stage's manifest entry; a stage that never ran is an error saying so."""
    from llmstack.runs import describe_outputs
    from llmstack.stages.distill import teacher_folder

    stages = [{"type": "sft", "dataset": "chat", "name": "big"},
              {"type": "distill", "dataset": "chat", "teacher": "big"}]
    recipe = make_recipe(tiny_model, {"chat": ("messages", data["chat"])}, stages)
    ctx = make_ctx(recipe, tmp_path / "runs", "distill", tiny_model, {"chat": data["chat"]})
    with pytest.raises(FileNotFoundError, match="no model from stage 'big'.*--only big"):
        teacher_folder(ctx)
    ctx.run.record("big", status="done", outputs=describe_outputs({"model": teacher}))
    assert teacher_folder(ctx) == teacher
    ctx.models["big"] = tmp_path / "from-this-run"
    assert teacher_folder(ctx) == tmp_path / "from-this-run"


# ---- recipe checks: no training -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stages, message", [
    ([{"type": "kto", "dataset": "chat"}], "stages[0].dataset: a kto stage trains on `unpaired` data"),
    ([{"type": "orpo", "dataset": "chat"}], "stages[0].dataset: a orpo stage trains on `preference` data"),
    ([{"type": "rloo", "dataset": "chat"}], "a rloo stage needs `rewards`"),
    ([{"type": "online_dpo", "dataset": "chat"}], "a online_dpo stage needs `rewards`"),
    ([{"type": "kto", "dataset": "kto", "rewards": [{"type": "gsm8k_answer"}]}], "`rewards` belongs to grpo, rloo"),
    ([{"type": "distill", "dataset": "chat"}], "a distill stage needs `teacher`"),
    ([{"type": "sft", "dataset": "chat", "teacher": "base"}], "`teacher` belongs to distill stages"),
    ([{"type": "distill", "dataset": "chat", "teacher": "nope"}],
     "stages[0].teacher: 'nope' is neither a stage before this one (['base']) nor a model folder"),
    ([{"type": "distill", "dataset": "chat", "teacher": "sft"}, {"type": "sft", "dataset": "chat"}],
     "stages[0].teacher: stage 'sft' runs after this one"),
    ([{"type": "orpo", "dataset": "prefs", "args": {"bta": 0.2}}],
     "stages[0].args.bta: not an argument of trl.experimental.orpo.ORPOConfig; did you mean 'beta'?"),
    ([{"type": "kto", "dataset": "kto", "args": {"desirable_weight": "1"}}], "stages[0].args.desirable_weight: "
                                                                              "must be float"),
])
def test_bad_stages_of_the_new_kinds_are_recipe_errors(tmp_path, stages, message):
    from llmstack.config.recipe import RecipeError

    with pytest.raises(RecipeError) as info:
        make_recipe(tmp_path, {k: (SCHEMA[k], tmp_path) for k in ("chat", "prefs", "kto")}, stages)
    assert any(p.startswith(message) or message in p for p in info.value.problems), info.value.problems


def test_a_teacher_folder_with_another_tokenizer_is_a_recipe_error(tmp_path, tiny_model, teacher, foreign_teacher):
    from llmstack.config.recipe import RecipeError

    ds = {"chat": ("messages", tmp_path)}
    make_recipe(tiny_model, ds, [{"type": "distill", "dataset": "chat", "teacher": str(teacher)}])  # same tokenizer
    make_recipe(tiny_model, ds, [{"type": "sft", "dataset": "chat", "name": "big"},
                                 {"type": "distill", "dataset": "chat", "teacher": "big"}])  # an earlier stage
    with pytest.raises(RecipeError) as info:
        make_recipe(tiny_model, ds, [{"type": "distill", "dataset": "chat", "teacher": str(foreign_teacher)}])
    (problem,) = info.value.problems
    assert problem.startswith(f"stages[0].teacher: the teacher at {foreign_teacher} has another tokenizer than "
                              "model.source (its tokenizer.json defines another vocabulary")


def test_cli_validate_of_every_new_kind_prints_only_its_answer(tmp_path):
    """`llmstack validate` checks each kind's args against its TRL class — importing trl.experimental's packages, whose
    trainers pull in TRL's vLLM client — and still prints nothing but its answer."""
    import subprocess
    import sys

    import yaml

    source = {"name": "kto_en_demo", "pypi": "llamafactory==0.9.5", "sdist": True,
              "member": "llamafactory-0.9.5/data/kto_en_demo.json", "format": "kto"}
    reward = [{"type": "format", "pattern": "[A-D]"}]
    recipe = {"name": "kinds", "model": {"source": "smollm2-135m-instruct"}, "data": {"datasets": {
        "fb": {"schema": "unpaired", "sources": [source]},
        "chat": {"schema": "messages", "sources": [source]},
        "prefs": {"schema": "preference", "sources": [{"name": "p", "path": str(tmp_path / "p.jsonl")}]}}},
        "stages": [{"type": "orpo", "dataset": "prefs", "args": {"beta": 0.2}},
                   {"type": "kto", "dataset": "fb", "args": {"desirable_weight": 1.0}},
                   {"type": "rloo", "dataset": "chat", "rewards": reward, "args": {"num_generations": 4}},
                   {"type": "online_dpo", "dataset": "chat", "rewards": reward, "args": {"max_new_tokens": 32}},
                   {"type": "distill", "dataset": "chat", "teacher": "orpo", "args": {"beta": 0.5}}]}
    path = tmp_path / "kinds.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "llmstack", "validate", str(path)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join((proc.stdout + proc.stderr).split())
    assert out == f"{path}: OK — kinds: smollm2-135m-instruct; orpo, kto, rloo, online_dpo, distill", out


def test_llmstack_run_reports_a_one_label_kto_dataset_as_a_recipe_error(tmp_path, tiny_model):
    """End to end: curation keeps the rows (they are valid), the kto stage refuses them before loading the model, and
    `llmstack run` prints the problem the way `llmstack validate` prints one — no traceback."""
    import json
    import subprocess
    import sys

    import yaml

    rows = tmp_path / "thumbs_up.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                     "content": a}], "label": True})
                            + "\n" for q, a in QA))
    recipe = {"name": "kto-one-label", "model": {"source": str(tiny_model)}, "data": {"datasets": {"fb": {
        "schema": "unpaired", "decontaminate": {"enabled": False}, "filters": {"languages": None},
        "sources": [{"name": "thumbs_up", "path": str(rows), "format": "kto"}]}}},
        "stages": [{"type": "kto", "dataset": "fb", "args": {"max_steps": 1}}]}
    path = tmp_path / "kto.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([sys.executable, "-m", "llmstack", "run", str(path), "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert ("stages[0].dataset: the curated train split of data.datasets.fb has 7 desirable and 0 undesirable "
            "rows" in out), out  # 8 rows, 1 held out for validation
    manifest = json.loads(next((tmp_path / "runs").rglob("manifest.json")).read_text())
    assert manifest["stages"]["curate"]["status"] == "done" and manifest["stages"]["kto"]["status"] == "failed"
