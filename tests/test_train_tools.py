"""SFT on tool-call conversations (curation's `messages` + `tools` columns): the stage trains with the tool template
(TRL's SFTTrainer passes each row's `tools` to apply_chat_template), assistant-only loss covers the calls and nothing
the model does not write (tool specs, the user's question, tool results), and the saved model carries the template
that renders tools, so serving it renders them as training did."""

import json

import pytest

from llmstack import tools as T
from test_train_stages import plain_template_model  # noqa: F401 - the fixture: the tiny model with SmolLM2's template
from train_data import make_ctx, make_recipe

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CITIES = ["Paris", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo", "Quito", "Perth"]


def tool_rows():
    rows = []
    for city in CITIES * 3:
        msgs = [{"role": "user", "content": f"Weather in {city}?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function", "function": {
                    "name": "get_weather", "arguments": {"city": city}}}]},
                {"role": "tool", "content": "SECRET_RESULT 21C", "tool_call_id": "call_0"},
                {"role": "assistant", "content": f"It is 21C in {city}."}]
        rows.append({"messages": msgs, "tools": [WEATHER]})
    return rows


@pytest.fixture(scope="module")
def tool_data(tmp_path_factory):
    """Saved as the curate stage saves tool datasets (each message and spec a `Json` value)."""
    from datasets import Dataset, DatasetDict

    from llmstack.data.curate import features

    rows = tool_rows()
    feats = features("messages", tools=True)
    path = tmp_path_factory.mktemp("tools") / "ds"
    DatasetDict({"train": Dataset.from_list(rows, features=feats),
                 "validation": Dataset.from_list(rows[:2], features=feats)}).save_to_disk(str(path))
    return path


def test_assistant_only_loss_trains_the_calls_and_not_specs_questions_or_results(
        tmp_path, plain_template_model, tool_data):  # noqa: F811 - the imported fixture
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from llmstack.train.templates import tool_chat_template

    tok = AutoTokenizer.from_pretrained(plain_template_model)
    tok.chat_template = tool_chat_template(tok, assistant_only_loss=True)
    ds = load_from_disk(str(tool_data))["train"]
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, assistant_only_loss=True, packing=False,
                     max_length=2048, report_to=[])
    trainer = SFTTrainer(model=str(plain_template_model), args=args, train_dataset=ds, processing_class=tok)
    row = trainer.train_dataset[0]
    text = tok.decode(row["input_ids"])
    assert '"name": "get_weather", "description": "Weather for a city"' in text  # the row's tools reached the template
    trained = tok.decode([t for t in row["labels"] if t != -100])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in trained
    assert "It is 21C in Paris." in trained
    for never in ("Weather in Paris?", "SECRET_RESULT", "Weather for a city", "</tools>"):
        assert never not in trained


def test_sft_stage_on_tools_learns_and_saves_the_tool_template(tmp_path, plain_template_model,  # noqa: F811
                                                               tool_data):
    from transformers import AutoTokenizer

    from llmstack.pipeline import stage_function

    stage = {"type": "sft", "dataset": "tools", "args": {"max_steps": 8, "learning_rate": 3e-3, "max_length": 2048,
                                                         "per_device_train_batch_size": 4, "report_to": []}}
    recipe = make_recipe(plain_template_model, {"tools": ("messages", tool_data)}, [stage])
    ctx = make_ctx(recipe, tmp_path / "runs", recipe.stages[0].id, plain_template_model, {"tools": tool_data})
    res = stage_function("sft")(ctx)
    losses = [h["loss"] for h in json.loads((ctx.dir / "log_history.json").read_text()) if "loss" in h]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    saved = AutoTokenizer.from_pretrained(res.model)
    assert T.supports_tools(saved.chat_template)
    assert saved.chat_template == T.tool_template(SMOLLM2_SYSTEM)
    # plain chats still render as the model's own template did
    conv = [{"role": "user", "content": "Hi"}]
    original = AutoTokenizer.from_pretrained(plain_template_model)
    assert saved.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def test_a_template_that_cannot_render_tools_is_a_clear_error(tiny_model):
    from transformers import AutoTokenizer

    from llmstack.train.templates import ChatTemplateError, tool_chat_template

    tok = AutoTokenizer.from_pretrained(tiny_model)
    # renders `tools`/`tool_calls` words (passes the textual check) but drops the calls: TRL's render check catches it
    tok.chat_template = ("{# tools tool_calls #}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}")
    with pytest.raises(ChatTemplateError, match="does not render them"):
        tool_chat_template(tok, assistant_only_loss=True)
