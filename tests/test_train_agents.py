"""Agent stages: grpo with tools and environments (TRL's multi-turn rollouts) under llmstack's per-episode guard.
Bad Python in a recipe is a recipe error naming its YAML path; a tool that raises, hangs, prints, returns 10 MB or a
non-JSON value ends its episode with a counted reason and the run finishes."""

import pytest

from train_data import _save, make_ctx, make_recipe

ACT = "agent_probe_tools"


# ---- recipe errors ---------------------------------------------------------------------------------------------------


def _stage_error(tmp_path, tiny_model, **agent) -> str:
    from llmstack.config.recipe import RecipeError

    stage = {"type": "grpo", "dataset": "chat", "rewards": [{"type": "gsm8k_answer"}], **agent}
    with pytest.raises(RecipeError) as err:
        make_recipe(tiny_model, {"chat": ("messages", tmp_path)}, [stage])
    return str(err.value)


@pytest.mark.parametrize(("agent", "path", "says"), [
    ({"tools": ["no_such_module_xyz:f"]}, "tools", "does not import"),
    ({"tools": [f"{ACT}:add", f"{ACT}:no_docstring"]}, "tools", "tools[1]"),
    ({"tools": [f"{ACT}:no_hints"]}, "tools", "type hints"),
    ({"tools": [f"{ACT}:missing"]}, "tools", "has no 'missing'"),
    ({"environment": f"{ACT}:NoReset"}, "environment", "no `reset`"),
    ({"environment": f"{ACT}:add"}, "environment", "not a class"),
])
def test_bad_tool_python_is_a_recipe_error_naming_its_path(tmp_path, tiny_model, agent, path, says):
    msg = _stage_error(tmp_path, tiny_model, **agent)
    assert f"stages[0].{path}:" in msg and says in msg, msg


def test_tools_belong_to_grpo_and_limits_need_tools(tmp_path, tiny_model):
    from llmstack.config.recipe import RecipeError

    with pytest.raises(RecipeError, match="belong to grpo"):
        make_recipe(tiny_model, {"chat": ("messages", tmp_path)},
                    [{"type": "sft", "dataset": "chat", "tools": [f"{ACT}:add"]}])
    assert "tool_limits` applies" in _stage_error(tmp_path, tiny_model, tool_limits={"max_turns": 2})
    recipe = make_recipe(tiny_model, {"chat": ("messages", tmp_path)},
                         [{"type": "grpo", "dataset": "chat", "environment": f"{ACT}:Misbehaving"}])
    assert recipe.stages[0].tool_limits.max_turns == 4  # an environment with get_reward needs no `rewards`


# ---- the guard, directly ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "reason"), [("raise", "raised"), ("hang", "timeout"), ("huge", "output_too_large"),
                                              ("print", "printed"), ("garbage", "bad_output")])
def test_a_misbehaving_tool_ends_the_episode_with_its_reason(mode, reason, capsys):
    from llmstack.config.agents import ToolLimits
    from llmstack.train.agents import ToolFailure, build_environment

    env_cls = build_environment([f"{ACT}:add"], f"{ACT}:Misbehaving", ToolLimits(tool_timeout_s=0.5))
    env = env_cls()
    env.reset(answer=mode)
    assert env.add(a=2, b=3) == "5"
    with pytest.raises(ToolFailure, match=reason):
        env.act()
    with pytest.raises(ToolFailure, match="episode ended"):  # nothing runs after the failure
        env.add(a=1, b=1)
    assert env.get_reward() == 0.0
    assert env_cls.failures.summary()[reason] == 1 and sum(env_cls.failures.values()) == 1
    assert "debug output" not in capsys.readouterr().out
    env.reset(answer="ok")  # the next episode starts clean
    assert env.act() == "done" and env.get_reward() == 1.0


def test_max_tool_calls_ends_the_episode():
    from llmstack.config.agents import ToolLimits
    from llmstack.train.agents import ToolFailure, build_environment

    env = build_environment([f"{ACT}:add"], None, ToolLimits(max_tool_calls=2))()
    env.reset()
    env.add(a=1, b=1), env.add(a=1, b=2)
    with pytest.raises(ToolFailure, match="max_tool_calls"):
        env.add(a=1, b=3)
    assert type(env).failures["max_tool_calls"] == 1


# ---- GRPO rollouts through TRL, with tools that misbehave -----------------------------------------------------------

MODES = ["raise", "hang", "huge", "print", "garbage", "ok", "ok", "ok"]
CALL = '<tool_call>\n{"name": "act", "arguments": {}}\n</tool_call>'


@pytest.fixture(scope="module")
def caller_model(tiny_model, tmp_path_factory):
    """The tiny model taught (a short plain-torch fit on one rendered completion) to answer every task with a call of
    the environment's `act` tool, so GRPO's rollouts call tools; the random tiny model never would."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import get_json_schema

    from agent_probe_tools import Misbehaving
    from llmstack import tools

    out = tmp_path_factory.mktemp("caller") / "model"
    shutil.copytree(tiny_model, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = tools.template_for(tok)
    spec = [get_json_schema(Misbehaving().act)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(out)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    call = tok(CALL + "<|im_end|>", add_special_tokens=False).input_ids
    rows = []
    for i in range(len(MODES)):
        prompt = tok.apply_chat_template([{"role": "user", "content": f"Task {i}: do it."}], tools=spec,
                                         add_generation_prompt=True, tokenize=False)
        p = tok(prompt, add_special_tokens=False).input_ids
        rows.append((p + call, [-100] * len(p) + call))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for _, r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    # Full-batch steps (all tasks in one padded batch) until every task's call is memorised (about 80 here). Not a
    # step per task: the tasks trained first in each pass drifted, and which one the model then miswrote
    # (`{name":`) depended on the CPU's kernels.
    for _ in range(300):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
        losses = per_token.sum(1) / (labels[:, 1:] != -100).sum(1)  # each task's mean loss over its call
        losses.mean().backward()
        opt.step()
        opt.zero_grad()
        losses = losses.tolist()
        if max(losses) < 0.02:
            break
    assert max(losses) < 0.02, losses
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_grpo_episodes_with_misbehaving_tools_are_counted_and_the_run_finishes(tmp_path, caller_model):
    from llmstack.pipeline import stage_function

    rows = [{"messages": [{"role": "user", "content": f"Task {i}: do it."}, {"role": "assistant", "content": mode}]}
            for i, mode in enumerate(MODES)]
    data = _save(rows, rows[:2], tmp_path / "tasks")
    stage = {"type": "grpo", "dataset": "tasks", "environment": f"{ACT}:Misbehaving",
             "tool_limits": {"tool_timeout_s": 1, "max_turns": 2, "max_tool_output_chars": 1000},
             # near-greedy sampling: the taught call is the model's likeliest answer, but at temperature 1 a tiny
             # model strays from it in some episodes, and which ones depends on the CPU's kernels (AVX2 or AVX-512)
             "args": {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 2, "temperature": 0.1,
                      "max_completion_length": 48, "learning_rate": 1e-5, "report_to": [], "shuffle_dataset": False}}
    recipe = make_recipe(caller_model, {"tasks": ("messages", data)}, [stage])
    ctx = make_ctx(recipe, tmp_path / "runs", "grpo", caller_model, {"tasks": data})
    res = stage_function("grpo")(ctx)
    failures = res.metrics["episode_failures"]
    print(failures, res.metrics.get("tool_calls_per_episode_last"), res.metrics["reward_per_step"])
    assert res.metrics["steps"] == 2 and (res.model / "config.json").exists()
    # each bad mode is 2 episodes (num_generations) per step of 4 prompts: every reason the batch holds is counted
    for reason in ("raised", "timeout", "output_too_large", "printed", "bad_output"):
        assert failures[reason] >= 1, failures
    assert max(res.metrics["reward_per_step"]) > 0  # the `ok` episodes answered and the environment scored them


# ---- shipped environments -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["llmstack.eval.environments.calculator:Calculator",
                                  "llmstack.eval.environments.lookup:Lookup"])
def test_shipped_environments_pass_the_recipe_checks(spec):
    from llmstack.config.agents import check_environment

    assert check_environment(spec) == spec


def test_calculator_answers_arithmetic_and_counts_invalid_calls():
    from llmstack.eval.environments.calculator import Calculator

    env = Calculator()
    env.reset(answer="She pays 3 * 4 = 12 dollars.\n#### 12")
    assert env.gold == 12
    assert env.calculator(expression="3 * 4") == "3 * 4 = 12"
    assert env.calculator(expression="__import__('os')").startswith("error:")
    assert (env.calls, env.invalid) == (2, 1)


def test_lookup_search_finds_each_answer_and_held_out_is_disjoint():
    from llmstack.eval.environments.lookup import Lookup, problems, search_corpus

    train, held = problems("train"), problems("held_out")
    assert len(held) == 6 and not {r["messages"][0]["content"] for r in train} & {
        r["messages"][0]["content"] for r in held}
    for row in train + held:
        question, gold = row["messages"][0]["content"], row["messages"][1]["content"]
        hits = " ".join(body for _, body in search_corpus(question))
        assert gold.lower() in hits.lower(), (question, gold)
    env = Lookup()
    env.reset(answer="Otto Fenn")
    assert env.get_reward() == 0.0
    assert env.search(query='"NEAR( AND') != "no results"  # FTS5 query syntax is read as plain words, no error
    assert env.search(query="!!! ???") == "no results" and env.invalid == 1
    env.search(query="who built the Dunmere clock")
    assert env.get_reward() == 1.0


def test_the_agent_recipe_loads_with_the_calculator_environment():
    from conftest import REPO
    from llmstack.config.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "agent.yaml", check_trainer=False)
    sft, grpo = recipe.stages
    assert (sft.type, grpo.type) == ("sft", "grpo")
    assert grpo.environment == "llmstack.eval.environments.calculator:Calculator"
    assert grpo.tool_limits.max_turns == 3 and [r.type for r in grpo.rewards] == ["gsm8k_answer"]
    assert recipe.eval.stages == ["base", "sft", "grpo"]
