"""Evaluating reasoning models (llmstack/eval/thinking.py, budget.py): `eval.thinking` / `eval.thinking_budgets`
validation, scoring on the answer alone, budget:N closing the thinking, the tokens spent, the report's budget table,
and the grpo stage's rewards reading the answer alone.

The scripted cases run lm-eval's real `hf` model class, tasks, filters and metrics with the real SmolLM2 tokenizer and
llmstack's reasoning template; only the network's next tokens are scripted (`_model_generate`), so a test can put a
wrong number in the thinking and the right one in the answer. The budget curve also runs end to end on the tiny model.
"""

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmstack.config.eval import EvalSpec, parse_thinking

WRONG = "999999"


def test_thinking_modes_validate():
    assert [parse_thinking(v) for v in ("on", "off", "budget:64", " Budget:0 ")] == [None, 0, 64, 0]
    assert EvalSpec(thinking="budget:64").thinking == "budget:64"
    for bad in ("budget:x", "budget", "maybe", "budget:-3"):
        with pytest.raises(ValidationError, match=r"thinking[\s\S]*write on .* off .* or budget:N"):
            EvalSpec(thinking=bad)
    assert EvalSpec(thinking_budgets=[256, 0, 64]).thinking_budgets == [0, 64, 256]
    for bad in ([0, 0], [-1, 64]):
        with pytest.raises(ValidationError, match="thinking_budgets[\\s\\S]*distinct token counts >= 0"):
            EvalSpec(thinking_budgets=bad)


def test_recipe_error_names_the_yaml_path(tmp_path):
    import yaml

    from llmstack.config.recipe import RecipeError, load_recipe

    recipe = yaml.safe_load(Path("recipes/reasoning.yaml").read_text())
    recipe["eval"]["thinking"] = "budget:lots"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"eval\.thinking.*budget:N"):
        load_recipe(path, check_trainer=False)


# ---------------------------------------------------------------- scripted generation through lm-eval


@pytest.fixture(scope="module")
def reasoning_tokenizer(smollm2, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer carrying llmstack's reasoning template, as an sft stage on thinking rows saves it."""
    from transformers import AutoTokenizer

    from llmstack.train import thinking

    tok = AutoTokenizer.from_pretrained(smollm2)
    tok.chat_template = thinking.chat_template(tok)
    folder = tmp_path_factory.mktemp("reasoning-tok")
    tok.save_pretrained(folder)
    return folder


def scripted(tokenizer_dir: Path, tiny_model: Path, budget, think: str = f"Maybe it is {WRONG}.\n"):
    """lm-eval's `hf` model (llmstack's thinking mix-in) whose next tokens are scripted: after an open `<think>` it
    thinks `think` (repeated up to the token limit), after a closed block it answers `#### <the item's answer>`.
    Every prompt and token limit it was given is kept in `.calls`."""
    import torch
    from lm_eval.api.registry import get_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmstack.eval.task_data import read_task
    from llmstack.eval.thinking import with_thinking

    answers = {row["question"]: row["target"] for row in read_task("gsm8k")}
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    class Scripted(get_model("hf")):
        calls: list

        def _model_generate(self, context, max_length, stop, **kwargs):
            rows = []
            for ids in context.tolist():
                prompt = tok.decode(ids, skip_special_tokens=False)
                limit = max_length - context.shape[1]
                self.calls.append((prompt, limit))
                if prompt.endswith("<think>\n"):
                    out = tok(think * limit, add_special_tokens=False)["input_ids"][:limit]
                else:
                    question = next(q for q in answers if q in prompt)
                    out = tok(f"#### {answers[question]}", add_special_tokens=False)["input_ids"]
                    out = (out + [tok.convert_tokens_to_ids("<|im_end|>")])[:limit]
                rows.append(ids + out + [tok.pad_token_id] * (limit - len(out)))
            return torch.tensor(rows)

    model = AutoModelForCausalLM.from_pretrained(tiny_model)  # the scripted tokens never read its weights
    lm = with_thinking(Scripted, {"pretrained": model, "tokenizer": str(tokenizer_dir), "device": "cpu",
                                  "batch_size": 2}, budget)
    lm.calls = []
    return lm


def run_scripted(lm, tmp_path, mode: str):
    from llmstack.eval.run import Target, evaluate

    return evaluate(Target(thinking=mode), "reasoning", limit=2, samples_dir=tmp_path / mode, lm=lm)["gsm8k_chat"]


def test_thinking_is_stripped_before_scoring(reasoning_tokenizer, tiny_model, tmp_path):
    """The thinking states a wrong number, the answer the right one: scored correct, on every item, and the wrong
    number never reaches the scorer (nor the logged answer); tokens are counted for both parts."""
    lm = scripted(reasoning_tokenizer, tiny_model, parse_thinking("on"))
    result = run_scripted(lm, tmp_path, "on")
    assert result["score"] == 1.0 and result["items"] == [1.0, 1.0]
    assert result["all"]["exact_match,strict-match"] == 1.0
    assert not any(WRONG in str(a) for a in result["answers"])
    assert result["thinking"] == {"mode": "on", "template_thinks": True}
    # `on` thinks up to the task's own max_gen_toks (256), then the block is closed for the answer
    thinking_calls = [(p, n) for p, n in lm.calls if p.endswith("<think>\n")]
    assert len(thinking_calls) == 2 and all(n == 256 for _, n in thinking_calls)
    tokens = result["tokens"]
    assert tokens["thinking"] == [256, 256] or all(250 <= t <= 257 for t in tokens["thinking"])
    assert all(1 <= a <= 6 for a in tokens["answer"]) and tokens["total_mean"] > tokens["thinking_mean"]


def test_budget_closes_the_thinking(reasoning_tokenizer, tiny_model, tmp_path):
    """budget:N: the thinking pass may generate N tokens and is stopped there; the answer pass's prompt is the
    thinking pass's prompt + the thinking + '\\n</think>\\n\\n', and the tokens spent thinking are N."""
    lm = scripted(reasoning_tokenizer, tiny_model, parse_thinking("budget:5"), think="step ")
    result = run_scripted(lm, tmp_path, "budget:5")
    firsts = [(p, n) for p, n in lm.calls if p.endswith("<think>\n")]
    seconds = [p for p, _ in lm.calls if not p.endswith("<think>\n")]
    assert len(firsts) == 2 and {n for _, n in firsts} == {5}
    for prompt, _ in firsts:
        follow = next(p for p in seconds if p.startswith(prompt))
        thought = follow[len(prompt):]
        assert re.fullmatch(r"step( step){4}\n</think>\n\n", thought), thought
    assert result["tokens"]["thinking"] == [5, 5] and result["score"] == 1.0


def test_off_renders_an_empty_block(reasoning_tokenizer, tiny_model, tmp_path):
    """off (= budget:0): one pass, the prompt ends with the template's own empty block, no thinking tokens."""
    lm = scripted(reasoning_tokenizer, tiny_model, parse_thinking("off"))
    result = run_scripted(lm, tmp_path, "off")
    assert len(lm.calls) == 2 and all(p.endswith("<think>\n\n</think>\n\n") for p, _ in lm.calls)
    assert result["tokens"]["thinking"] == [0, 0] and result["score"] == 1.0


# ---------------------------------------------------------------- the budget curve, end to end on the tiny model


def test_budget_curve_and_report(tiny_model, tmp_path):
    """eval.thinking_budgets on a model whose template thinks, and on one whose template does not: the report's
    table has one row per stage and budget with the tokens spent, the plot is written, and the template without
    thinking is scored once and said to be."""
    import shutil

    from transformers import AutoTokenizer

    from llmstack.config.eval_suites import load_suite
    from llmstack.eval import budget
    from llmstack.eval.run import Target, evaluate
    from llmstack.train import thinking

    thinker = tmp_path / "thinker"
    shutil.copytree(tiny_model, thinker)
    tok = AutoTokenizer.from_pretrained(thinker)
    tok.chat_template = thinking.chat_template(tok)
    tok.save_pretrained(thinker)
    suite = load_suite("reasoning")
    curves, mains = {}, {}
    for name, folder in (("plain", tiny_model), ("thinker", thinker)):
        target = Target(model=folder, thinking="budget:4", batch_size=2)
        mains[name] = evaluate(target, suite, limit=2, samples_dir=tmp_path / name)
        curves[name] = budget.curve(target, suite, [0, 4], mains[name], limit=2, identity_name="llmstack",
                                    samples_dir=tmp_path / name)
    assert curves["plain"][0]["gsm8k_chat"] is curves["plain"][4]["gsm8k_chat"]  # scored once
    assert curves["thinker"][0]["gsm8k_chat"]["tokens"]["thinking"] == [0, 0]
    assert all(3 <= t <= 5 for t in curves["thinker"][4]["gsm8k_chat"]["tokens"]["thinking"])
    assert curves["thinker"][4]["gsm8k_chat"] is mains["thinker"]["gsm8k_chat"]  # the eval's own mode: reused
    lines = budget.markdown(curves, mains, "budget:4")
    rows = [line for line in lines if line.startswith(("| thinker | gsm8k_chat |", "| plain | gsm8k_chat |"))]
    assert len(rows) == 6 and "## Thinking budget" in lines
    assert [r.split(" | ")[2] for r in rows[3:]] == ["`budget:4`", "0", "4"]
    assert any("`plain`'s chat template has no thinking" in line for line in lines)
    assert not any("`thinker`'s chat template has no thinking" in line for line in lines)
    png = budget.plot(curves, tmp_path / "thinking_budget.png")
    assert png.stat().st_size > 1000


# ---------------------------------------------------------------- grpo: rewards read the answer


def test_grpo_rewards_read_the_answer_not_the_thinking(reasoning_tokenizer):
    """With the reasoning template, the grpo stage has TRL parse each completion (Qwen3's response template): the
    gsm8k reward and the format reward see the answer; a thinking that never closed has no answer."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import parse_response

    from llmstack.train import rewards, thinking

    tok = AutoTokenizer.from_pretrained(reasoning_tokenizer)
    assert thinking.parse_completions(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "6*7?"}], tokenize=False, add_generation_prompt=True)
    prefix = tok(prompt, add_special_tokens=False)["input_ids"]

    def completion(text):
        return [parse_response(tok, tok(text, add_special_tokens=False)["input_ids"], prefix=prefix)]

    right = completion(f"6*7 is not {WRONG}... it is 42.\n</think>\n\n#### 42<|im_end|>")
    wrong = completion("It is 42.\n</think>\n\n#### 41<|im_end|>")
    unclosed = completion("It is 42, so #### 42")
    got = rewards.gsm8k_answer(None, [right, wrong, unclosed], ["#### 42"] * 3)
    assert got == [1.0, 0.0, 0.0]
    fmt = rewards.format_reward(r"#### *-?[\d,.]+\s*$", full=False)
    assert fmt(None, [right, unclosed]) == [1.0, 0.0]
    plain = AutoTokenizer.from_pretrained(reasoning_tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert not thinking.parse_completions(plain)


def test_an_adapter_is_evaluated_with_the_template_it_trained_with(tiny_model, tmp_path):
    """A LoRA stage saves its tokenizer (with the reasoning template) beside the adapter; eval renders with that one,
    not the base model's template, so the adapter's thinking is what gets evaluated."""
    from transformers import AutoTokenizer

    from conftest import make_lora
    from llmstack.eval.run import Target, evaluate
    from llmstack.train import thinking

    adapter = make_lora(tiny_model, tmp_path / "adapter", seed=3)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = thinking.chat_template(tok)
    tok.save_pretrained(adapter)
    result = evaluate(Target(model=tiny_model, adapter=adapter, thinking="budget:2", batch_size=1), "reasoning",
                      limit=1)["gsm8k_chat"]
    assert result["thinking"]["template_thinks"] and 1 <= result["tokens"]["thinking"][0] <= 3
