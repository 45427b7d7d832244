"""SFT on thinking (reasoning) traces: the reasoning template's labels checked token by token through TRL's own
tokenisation (SFTTrainer's dataset preparation, with the real SmolLM2 tokenizer), the serving/training prefix
property, thinking with tool calls, the recipe's `thinking` field, and a short real sft run that saves the template."""

import json

import pytest
import yaml

from test_train_stages import SMOLLM2_TEMPLATE, plain_template_model  # noqa: F401 - the fixture
from train_data import make_ctx, make_recipe

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
EARLIER_THINKING = "EARLIER_SECRET the user greets me, so I greet back"
LAST_THINKING = "Two plus two: count 2, then 3, 4. So 4."
CONVERSATION = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi, how can I help?", "reasoning_content": EARLIER_THINKING},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4.", "reasoning_content": "\n" + LAST_THINKING + "\n"},
]
LAST_TURN = f"<think>\n{LAST_THINKING}\n</think>\n\nIt is 4.<|im_end|>"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# The shape of LLaMA-Factory's reason_tool_use_demo rows: reasoning + call, result, reasoning + answer
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "reasoning_content": "I need the weather tool for Oslo.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "SECRET_RESULT 4C"},
    {"role": "assistant", "content": "It is 4C in Oslo.", "reasoning_content": "The tool says 4C."},
]


@pytest.fixture(scope="module")
def tok(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def template(tok):
    from llmstack.train import thinking

    return thinking.chat_template(tok)


def prepared(smollm2, tok, template, rows, tmp_path, features=None):
    """The rows as SFTTrainer's own dataset preparation tokenises them for the sft stage (assistant-only loss)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from llmstack.train import thinking

    tok.chat_template = template
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, assistant_only_loss=True, packing=False,
                     max_length=2048, report_to=[])
    with thinking.trl_stop_probe_quiet():
        trainer = SFTTrainer(model=str(smollm2), args=args, processing_class=tok,
                             train_dataset=Dataset.from_list(rows, features=features))
    return trainer.train_dataset


def test_labels_cover_exactly_the_last_turns_thinking_answer_and_end_token(smollm2, tok, template, tmp_path):
    row = prepared(smollm2, tok, template, [{"messages": CONVERSATION}], tmp_path)[0]
    ids, labels = row["input_ids"], row["labels"]
    text = tok.decode(ids)
    assert EARLIER_THINKING not in text  # earlier thinking never reaches the model
    assert "<|im_start|>assistant\nHi, how can I help?<|im_end|>" in text  # earlier answer rendered as history
    assert text.startswith(f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n")  # the model's own system line
    trained = [i for i, label in enumerate(labels) if label != -100]
    assert trained == list(range(trained[0], trained[-1] + 1))  # one span: the earlier answer is not trained
    assert [labels[i] for i in trained] == [ids[i] for i in trained]
    assert tok.decode(ids[trained[0]:trained[-1] + 1]) == LAST_TURN
    assert tok.decode(ids[:trained[0]]).endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert ids[trained[-1]] == tok.convert_tokens_to_ids("<|im_end|>")  # the model learns to stop
    assert tok.decode(ids[trained[-1] + 1:]) == "\n"  # only the never-generated newline after it is left out


def test_serving_prompt_is_a_prefix_of_the_trained_rendering(tok, template):
    def render(msgs, **kw):
        return tok.apply_chat_template(msgs, tokenize=False, chat_template=template, **kw)

    full = render(CONVERSATION)
    prompt = render(CONVERSATION[:-1], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n") and full.startswith(prompt)
    assert tok(full).input_ids[:len(tok(prompt).input_ids)] == tok(prompt).input_ids
    # enable_thinking: false closes an empty block, which is how a turn without thinking is trained
    no_think = render(CONVERSATION[:-1], add_generation_prompt=True, enable_thinking=False)
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    plain_last = CONVERSATION[:-1] + [{"role": "assistant", "content": "It is 4."}]
    assert render(plain_last).startswith(no_think) and render(plain_last).endswith("</think>\n\nIt is 4.<|im_end|>\n")
    # the history before the trained turn renders as the model's own template renders it
    assert render(CONVERSATION[:3]) == tok.apply_chat_template(CONVERSATION[:3], tokenize=False,
                                                               chat_template=SMOLLM2_TEMPLATE)


def test_thinking_with_tools_renders_thinking_before_the_call_and_trains_both_turns(smollm2, tok, template,
                                                                                   tmp_path):
    from trl.chat_template_utils import is_chat_template_prefix_preserving, qwen3_chat_template

    from llmstack import tools as T
    from llmstack.data.curate import features

    rendered = tok.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER], tokenize=False, chat_template=template)
    # the system turn is the tool template's (llmstack.tools), with the model's own line
    tool_only = tok.apply_chat_template(TOOL_CONVERSATION[:1], tools=[WEATHER], tokenize=False,
                                        chat_template=T.tool_template(SMOLLM2_SYSTEM))
    assert rendered.startswith(tool_only)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    turn = f"<|im_start|>assistant\n<think>\nI need the weather tool for Oslo.\n</think>\n\n{call}<|im_end|>\n"
    assert turn + "<|im_start|>user\n<tool_response>\nSECRET_RESULT 4C\n</tool_response><|im_end|>\n" in rendered
    assert rendered.endswith(
        "<|im_start|>assistant\n<think>\nThe tool says 4C.\n</think>\n\nIt is 4C in Oslo.<|im_end|>\n")
    assert T.parse_calls(call)[1] == [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    # appending a tool result never re-renders the call (Qwen3's own template drops an empty <think> block there)
    tok.chat_template = qwen3_chat_template
    assert not is_chat_template_prefix_preserving(tok)
    tok.chat_template = template
    assert is_chat_template_prefix_preserving(tok)
    # through TRL's preparation of a curated tool dataset (Json messages + tools): both turns of the answer train
    row = prepared(smollm2, tok, template, [{"messages": TOOL_CONVERSATION, "tools": [WEATHER]}], tmp_path,
                   features=features("messages", tools=True))[0]
    trained = tok.decode([t for t in row["labels"] if t != -100])
    assert trained == (f"<think>\nI need the weather tool for Oslo.\n</think>\n\n{call}<|im_end|>"
                       "<think>\nThe tool says 4C.\n</think>\n\nIt is 4C in Oslo.<|im_end|>")


def test_trls_stop_token_warning_is_dropped_only_for_the_trained_turn_it_cannot_see(smollm2, tok, template,
                                                                                   tmp_path, caplog):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    from llmstack.train import thinking

    # TRL probes [user, assistant, user]: that assistant turn is history here, so its mask is empty
    assert not is_chat_template_stop_token_trained(tok, chat_template=template)
    tok.chat_template = template
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, assistant_only_loss=True, packing=False,
                     report_to=[])
    rows = Dataset.from_list([{"messages": CONVERSATION}])

    def warned() -> bool:
        return any(thinking._TRL_STOP_PROBE in r.getMessage() for r in caplog.records)

    with caplog.at_level("WARNING"):
        SFTTrainer(model=str(smollm2), args=args, processing_class=tok, train_dataset=rows)
        assert warned()  # without the filter TRL warns (the labels test shows <|im_end|> is trained)
        caplog.clear()
        with thinking.trl_stop_probe_quiet():
            SFTTrainer(model=str(smollm2), args=args, processing_class=tok, train_dataset=rows)
        assert not warned()


def test_thinking_setting_and_detection():
    from datasets import Dataset, Features, Json, List

    from llmstack.data.curate import features
    from llmstack.train import thinking

    with_thinking = Dataset.from_list([{"messages": CONVERSATION}])
    without = Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": "Hello", "reasoning_content": " "}]}])
    assert thinking.has_thinking(with_thinking) and not thinking.has_thinking(without)
    as_json = Dataset.from_list([{"messages": CONVERSATION}], features=Features({"messages": List(Json())}))
    assert thinking.has_thinking(as_json)  # messages kept as JSON values (as curation keeps tool rows)
    assert not thinking.has_thinking(Dataset.from_list([{"messages": CONVERSATION[:1]}],
                                                       features=features("messages")))
    assert thinking.wanted("auto", with_thinking) and not thinking.wanted("auto", without)
    assert thinking.wanted("on", without) and not thinking.wanted("off", with_thinking)


def test_a_non_chatml_template_is_a_clear_error(tok):
    from llmstack.train import thinking

    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(thinking.ThinkingTemplateError, match="thinking: off"):
        thinking.chat_template(tok)


def test_recipe_thinking_field_names_its_yaml_path(tmp_path):
    from llmstack.config.recipe import RecipeError, parse_recipe

    def recipe(stage_yaml: str):
        stage = yaml.safe_load(stage_yaml)  # as a recipe file is read: a bare `on` is YAML's true
        return {"name": "t", "model": {"source": "org/model"},
                "data": {"datasets": {"d": {"schema": "messages", "sources": [{"name": "d", "path": str(tmp_path)}]}}},
                "stages": [stage]}

    assert parse_recipe(recipe("{type: sft, dataset: d, thinking: on}"), check_trainer=False).stages[0].thinking == "on"
    assert parse_recipe(recipe("{type: sft, dataset: d, thinking: off}"), check_trainer=False).stages[0].thinking == \
        "off"
    assert parse_recipe(recipe("{type: sft, dataset: d}"), check_trainer=False).stages[0].thinking == "auto"
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe("{type: sft, dataset: d, thinking: maybe}"), check_trainer=False)
    assert any(p.startswith("stages[0].thinking:") and "'auto', 'on' or 'off'" in p for p in info.value.problems)
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe("{type: dpo, dataset: d, thinking: on}"), check_trainer=False)
    assert any(p.startswith("stages[0]") and "belongs to sft stages" in p for p in info.value.problems)


def test_sft_stage_trains_on_thinking_rows_and_saves_the_template(tmp_path, plain_template_model):  # noqa: F811
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from llmstack.pipeline import stage_function
    from llmstack.train import thinking

    rows = [{"messages": [{"role": "user", "content": f"What is {a}+{a}?"},
                          {"role": "assistant", "content": f"It is {2 * a}.",
                           "reasoning_content": f"Doubling {a} gives {2 * a}."}]} for a in range(8)]
    data = tmp_path / "thinking"
    DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows[:2])}).save_to_disk(str(data))
    stage = {"type": "sft", "dataset": "thinking", "args": {"max_steps": 6, "learning_rate": 3e-3, "max_length": 256,
                                                            "per_device_train_batch_size": 4, "report_to": []}}
    recipe = make_recipe(plain_template_model, {"thinking": ("messages", data)}, [stage])
    assert recipe.stages[0].thinking == "auto"
    ctx = make_ctx(recipe, tmp_path / "runs", recipe.stages[0].id, plain_template_model, {"thinking": data})
    res = stage_function("sft")(ctx)
    losses = [h["loss"] for h in json.loads((ctx.dir / "log_history.json").read_text()) if "loss" in h]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    saved = AutoTokenizer.from_pretrained(res.model)
    original = AutoTokenizer.from_pretrained(plain_template_model)
    assert saved.chat_template == thinking.chat_template(original)  # what was trained is what is served
    prompt = saved.apply_chat_template(rows[0]["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 0+0?<|im_end|>\n" \
                     "<|im_start|>assistant\n<think>\n"
