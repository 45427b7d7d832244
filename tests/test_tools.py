"""llmstack.tools: the tool template renders plain chats exactly as SmolLM2's own template and tool conversations in the
Hermes format; what it renders parses back (transformers' parser, and vLLM's hermes parser agrees); forced-call
schemas and call checks say what is wrong."""

import json

import pytest

from llmstack import tools as T

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]

CALL_TEXTS = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [{"name": "get_weather", "arguments": {"city": "Paris"}}]),
    (('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>\n'
     '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'),
     "Let me check.", [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}},
                       {"name": "now", "arguments": {}}]),
    ('plain answer, no call', "plain answer, no call", []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\n</tool_call>', None, None),  # broken JSON
    ('text <tool_call> and nothing after', None, None),
]


@pytest.fixture(scope="module")
def tok(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2))


def test_plain_chats_render_exactly_as_smollm2s_own_template(tok):
    template = T.template_for(tok)
    assert template != tok.chat_template and "You are a helpful AI assistant named SmolLM" in template
    convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
             [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4\nDone."}, {"role": "user", "content": "and 3+3?"}]]
    for conv in convs:
        for gen in (False, True):
            assert (tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, chat_template=template)
                    == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen))


def test_tool_conversation_renders_specs_calls_and_results_and_parses_back(tok):
    template = T.template_for(tok)
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    conv = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
            {"role": "tool", "content": '{"temp_c": 21}'}]
    text = tok.apply_chat_template(conv, tools=TOOLS, tokenize=False, add_generation_prompt=True,
                                   chat_template=template)
    assert '"name": "get_weather"' in text.split("<tools>\n")[1].split("\n</tools>")[0]
    assert "<tool_response>\n{\"temp_c\": 21}\n</tool_response>" in text
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert T.parse_calls(turn) == (None, [call])
    # the training template's generation markers cover the assistant's call (assistant-only loss trains on it)
    out = tok.apply_chat_template(conv[:2], tools=TOOLS, tokenize=True, return_dict=True, chat_template=template,
                                  return_assistant_tokens_mask=True)
    trained = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in trained and "Weather in Paris" not in trained


def test_a_template_with_tool_support_is_kept():
    class Tok:
        chat_template = T.tool_template("Custom.")

    assert T.template_for(Tok) == Tok.chat_template
    assert "Custom." in Tok.chat_template and "You are Qwen" not in Tok.chat_template


@pytest.mark.parametrize("text,content,calls", CALL_TEXTS)
def test_parse_calls(text, content, calls):
    got_content, got_calls = T.parse_calls(text)
    if calls is None:  # does not parse: all content, no call
        assert (got_content, got_calls) == (text, [])
    else:
        assert (got_content, got_calls) == (content, calls)


@pytest.mark.parametrize("text,content,calls", CALL_TEXTS)
def test_vllms_hermes_parser_reads_the_same_calls(text, content, calls, tok):
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

    info = Hermes2ProToolParser(tok).extract_tool_calls(text, request=None)
    ours = T.parse_calls(text)[1]
    theirs = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in info.tool_calls]
    if calls is None and "<tool_call>" in text and "</tool_call>" not in text:
        # vLLM reads an unclosed block to the end of text; it is not JSON either, so neither finds a call
        assert theirs == [] and ours == []
    else:
        assert theirs == ours


def test_streamed_split_gives_the_same_calls_whatever_the_chunking():
    text = CALL_TEXTS[1][0] + "\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}"  # the last one never closes
    for size in (1, 3, 7, len(text)):
        s, events = T.CallSplitter(), []
        for i in range(0, len(text), size):
            events += s.feed(text[i:i + size])
        events += s.feed("", final=True)
        content = "".join(v for k, v in events if k == "content")
        assert [v for k, v in events if k == "call"] == CALL_TEXTS[1][2]
        assert content.startswith("Let me check.") and content.rstrip().endswith('"arguments": {}}')
        assert '"get_weather"' not in content and content.count("<tool_call>") == 1  # only the unclosed block


def test_a_partial_open_tag_is_held_back_until_decided():
    s = T.CallSplitter()
    assert s.feed("answer <tool") == [("content", "answer ")]
    assert s.feed("box is here") == [("content", "<toolbox is here")]
    assert s.feed("", final=True) == []


def test_call_schema_and_forced_parse():
    from jsonschema import Draft202012Validator

    named = T.call_schema(TOOLS, name="get_weather")
    Draft202012Validator.check_schema(named)
    v = Draft202012Validator(named)
    assert v.is_valid({"name": "get_weather", "arguments": {"city": "Rome"}})
    assert not v.is_valid({"name": "now", "arguments": {}})
    assert not v.is_valid({"name": "get_weather", "arguments": {"town": "Rome"}})
    many = Draft202012Validator(T.call_schema(TOOLS, many=True))
    assert many.is_valid([{"name": "now", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "x"}}])
    assert not many.is_valid([])
    assert T.parse_forced('{"name": "now", "arguments": {}}', many=False) == [{"name": "now", "arguments": {}}]
    assert T.parse_forced('[{"name": "now", "arguments": {}}]', many=True) == [{"name": "now", "arguments": {}}]
    assert T.parse_forced('{"name": "now", "argu', many=False) is None


def test_check_call_says_what_is_wrong():
    T.check_call({"name": "get_weather", "arguments": {"city": "Rome", "days": 3}}, TOOLS)
    with pytest.raises(T.ToolCallError, match="'delete_all', which is not one of its tools"):
        T.check_call({"name": "delete_all", "arguments": {}}, TOOLS)
    with pytest.raises(T.ToolCallError, match="at days: 'three' is not of type 'integer'"):
        T.check_call({"name": "get_weather", "arguments": {"city": "Rome", "days": "three"}}, TOOLS)
    with pytest.raises(T.ToolCallError, match="'city' is a required property"):
        T.check_call({"name": "get_weather", "arguments": {}}, TOOLS)
    assert T.arguments_object('{"a": 1}') == {"a": 1} and T.arguments_object("") == {}
    with pytest.raises(T.ToolCallError, match="not valid JSON"):
        T.arguments_object('{"a": ')
    with pytest.raises(T.ToolCallError, match="must be a JSON object"):
        T.arguments_object("[1, 2]")
