"""Reward modelling and GRPO on the tiny model: real TRL RewardTrainer / GRPOTrainer, outcomes that could fail (the
reward model separates chosen from rejected, GRPO raises its mean reward, a crashed run resumes from its checkpoint,
grpo finds the reward stage's model through the manifest)."""

import json

import pytest

from train_data import QA, _save, make_ctx, make_recipe, messages_dataset

MARKER = " Thank you very much!"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlhf")
    # Learnable pairs: chosen = rejected + a marker sentence, so the marker is the only signal.
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a + MARKER}],
             "rejected": [{"role": "assistant", "content": a}]} for q, a in QA * 2]
    return {"prefs": _save(rows, rows[:4], root / "prefs"), "chat": messages_dataset(root / "chat", n=16)}


SCHEMA = {"prefs": "preference", "chat": "messages"}


def train(tmp_path, model, data, stages: list[dict], which: int = -1, run=None):
    from llmstack.pipeline import stage_function

    ds = {s["dataset"]: data[s["dataset"]] for s in stages}
    recipe = make_recipe(model, {k: (SCHEMA[k], p) for k, p in ds.items()}, stages)
    stage = recipe.stages[which]
    ctx = make_ctx(recipe, tmp_path / "runs", stage.id, model, ds)
    return ctx, stage_function(stage.type)(ctx)


# ---- the reward used to show GRPO learns: a tiny random model can raise it within a few steps ----------------------


def byte_token_fraction(prompts, completions, completion_ids, **_):
    """Fraction of completion tokens from the BPE byte alphabet (ids 3..258): ~25% for the random tiny model; special
    tokens (the end of turn) do not count, so the degenerate 'stop at once' completion scores 0."""
    return [sum(3 <= t < 259 for t in ids) / max(len(ids), 1) for ids in completion_ids]


REWARD_ARGS = {"max_steps": 8, "learning_rate": 1e-3, "per_device_train_batch_size": 8, "max_length": 128,
               "report_to": []}
GRPO_ARGS = {"max_steps": 12, "learning_rate": 2e-2, "per_device_train_batch_size": 8, "num_generations": 4,
             "max_completion_length": 16, "report_to": []}
GRPO_STAGE = {"type": "grpo", "dataset": "chat", "rewards": [{"type": "python",
                                                              "function": "test_train_rlhf:byte_token_fraction"}]}


def _untrained_reward_model(tiny_model, out):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    set_seed(7)  # the recipe's seed, which the reward stage seeds its score head with
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def _margin(model_dir, rows):
    from llmstack.train.rewards import scores

    rows = list(rows)
    c = scores(model_dir, [r["prompt"] + r["chosen"] for r in rows])
    r = scores(model_dir, [r["prompt"] + r["rejected"] for r in rows])
    return sum(a - b for a, b in zip(c, r)) / len(rows)


def test_reward_model_learns_the_preference_and_is_not_the_next_policy(tmp_path, tiny_model, data):
    from datasets import load_from_disk
    from transformers import AutoModelForSequenceClassification

    from llmstack.train.rewards import pairwise_accuracy

    ctx, res = train(tmp_path, tiny_model, data, [{"type": "reward", "dataset": "prefs", "args": REWARD_ARGS}])
    folder = res.outputs["reward_model"]
    assert res.model is None  # the policy stays the input model
    assert AutoModelForSequenceClassification.from_pretrained(folder).config.num_labels == 1
    pairs = load_from_disk(str(data["prefs"]))["train"]
    before = _margin(_untrained_reward_model(tiny_model, tmp_path / "untrained"), pairs)
    after = _margin(folder, pairs)
    assert after > before + 1.0, (before, after)
    assert pairwise_accuracy(folder, pairs) == 1.0
    assert res.metrics["val_pairwise_accuracy"] == 1.0 and res.metrics["val_pairs"] == 4
    assert res.metrics["last_loss"] < res.metrics["first_loss"]
    assert (ctx.dir / "section.md").exists() and (ctx.dir / "accuracy.png").exists()


def test_reward_lora_exports_a_merged_classifier(tmp_path, tiny_model, data):
    args = {**REWARD_ARGS, "max_steps": 3}
    _, res = train(tmp_path, tiny_model, data, [{"type": "reward", "dataset": "prefs", "lora": {"r": 8},
                                                "args": args}])
    folder = res.outputs["reward_model"]
    assert (folder / "config.json").exists() and not (folder / "adapter_config.json").exists()
    assert res.metrics["steps"] == 3


def test_grpo_raises_the_mean_reward(tmp_path, tiny_model, data):
    ctx, res = train(tmp_path, tiny_model, data, [{**GRPO_STAGE, "args": GRPO_ARGS}])
    per_step = res.metrics["reward_per_step"]
    assert len(per_step) == 12
    first, last = sum(per_step[:3]) / 3, sum(per_step[-3:]) / 3
    print(f"mean reward first 3 steps {first:.3f} -> last 3 steps {last:.3f}", per_step)
    assert last > first + 0.15, per_step
    assert res.model == ctx.dir / "model" and (res.model / "config.json").exists()
    assert (ctx.dir / "reward.png").exists() and "reward_last" in (ctx.dir / "section.md").read_text()


@pytest.mark.parametrize("kind", ["reward", "grpo"])
def test_crashed_stage_resumes_from_its_checkpoint(tmp_path, tiny_model, data, monkeypatch, kind):
    """Crash after the step-4 checkpoint; the re-run trains only the remaining steps (it did not start over)."""
    import trl

    trainer_cls = trl.RewardTrainer if kind == "reward" else trl.GRPOTrainer
    if kind == "reward":
        stage = {"type": "reward", "dataset": "prefs", "args": {**REWARD_ARGS, "max_steps": 6, "save_steps": 2}}
    else:
        stage = {**GRPO_STAGE, "args": {**GRPO_ARGS, "max_steps": 6, "save_steps": 2}}
    original = trainer_cls.training_step
    calls = {"n": 0}

    def counting(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5 and crash:
            raise RuntimeError("simulated crash")
        return original(self, *a, **kw)

    monkeypatch.setattr(trainer_cls, "training_step", counting)
    crash = True
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path, tiny_model, data, [stage])
    stage_dir = tmp_path / "runs" / "t" / "test" / kind
    assert sorted(p.name for p in stage_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    crash, calls["n"] = False, 0
    _, res = train(tmp_path, tiny_model, data, [stage])
    assert calls["n"] == 2 and res.metrics["steps"] == 6
    history = json.loads((stage_dir / "log_history.json").read_text())
    assert sorted(h["step"] for h in history if "loss" in h) == [1, 2, 3, 4, 5, 6]


def test_grpo_scores_with_the_reward_stage_model_found_in_the_manifest(tmp_path, tiny_model, data):
    from llmstack.pipeline import stage_function
    from llmstack.runs import describe_outputs

    stages = [{"type": "reward", "dataset": "prefs", "args": {**REWARD_ARGS, "max_steps": 2}},
              {"type": "grpo", "dataset": "chat", "rewards": [{"type": "reward_model", "stage": "reward"},
                                                              {"type": "format", "pattern": "Paris", "weight": 0.5}],
               "args": {**GRPO_ARGS, "max_steps": 2}}]
    ds = {"prefs": data["prefs"], "chat": data["chat"]}
    recipe = make_recipe(tiny_model, {k: (SCHEMA[k], p) for k, p in ds.items()}, stages)
    ctx = make_ctx(recipe, tmp_path, "reward", tiny_model, ds)
    rm = stage_function("reward")(ctx)
    ctx.run.record("reward", status="done", outputs=describe_outputs(rm.outputs))  # what the pipeline records
    ctx = make_ctx(recipe, tmp_path, "grpo", tiny_model, ds)
    res = stage_function("grpo")(ctx)
    assert res.metrics["steps"] == 2
    assert "reward_model_last" in res.metrics and "reward_format_match_last" in res.metrics


# ---- verifiers and recipe validation: no training -------------------------------------------------------------------


def test_gsm8k_verifier_compares_final_numbers():
    from llmstack.train.rewards import format_reward, gsm8k_answer

    refs = ["She sold 48/2 = 24 clips.\n#### 72", "#### 1,234", "#### -3", "#### 5"]
    completions = [[{"role": "assistant", "content": "48 + 24 = 72. The answer is 72."}],
                   [{"role": "assistant", "content": "So 1234"}],
                   [{"role": "assistant", "content": "It is 3"}],
                   [{"role": "assistant", "content": "no number here"}]]
    assert gsm8k_answer(None, completions, refs) == [1.0, 1.0, 0.0, 0.0]
    boxed = format_reward(r"<answer>\s*-?\d+\s*</answer>", full=False)
    assert boxed(None, ["x <answer> 4 </answer>", "x 4"]) == [1.0, 0.0]
    assert format_reward(r"\d+", full=True)(None, ["42", "42!"]) == [1.0, 0.0]


def test_grpo_messages_row_splits_into_prompt_and_reference():
    from llmstack.train.rewards import to_prompt

    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "#### 7"}]}
    assert to_prompt(row) == {"prompt": row["messages"][:2], "answer": "#### 7"}


@pytest.mark.parametrize("stage, message", [
    ({"type": "grpo", "dataset": "chat"}, "a grpo stage needs `rewards`"),
    ({"type": "grpo", "dataset": "chat", "rewards": [{"type": "format"}]}, "a `format` reward needs `pattern`"),
    ({"type": "grpo", "dataset": "chat", "rewards": [{"type": "format", "pattern": "("}]}, "not a valid regular"),
    ({"type": "grpo", "dataset": "chat", "rewards": [{"type": "reward_model", "stage": "rm"}]},
     "'rm' is not a reward stage before this one"),
    ({"type": "sft", "dataset": "chat", "rewards": [{"type": "gsm8k_answer"}]},
     "`rewards` belongs to grpo, rloo, online_dpo stages"),
    ({"type": "reward", "dataset": "chat"}, "a reward stage trains on `preference` data"),
    ({"type": "grpo", "dataset": "chat", "rewards": [{"type": "gsm8k_answer"}], "args": {"num_generation": 4}},
     "did you mean"),
])
def test_bad_rlhf_stages_get_actionable_errors(tmp_path, stage, message):
    from llmstack.config.recipe import RecipeError

    with pytest.raises(RecipeError) as info:
        make_recipe(tmp_path, {"chat": ("messages", tmp_path)}, [stage])
    assert any(message in p for p in info.value.problems), info.value.problems
