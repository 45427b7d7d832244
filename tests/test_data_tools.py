"""Tool-call conversations in curation: glaive's sharegpt form and OpenAI-shaped rows become OpenAI-shaped `messages`
rows with `tools`; calls to undeclared functions, arguments that are not JSON or that the declared schema rejects, and
results that answer no call are quarantined with that reason; the saved dataset keeps arguments as objects; the card
counts tools, calls and argument validity."""

import json

import datasets
import pytest

from llmstack.config.data import DatasetSpec
from llmstack.data import curate as C
from llmstack.data.formats import BadRow, to_row

WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                          "required": ["city"]}}
TOOLS_TEXT = json.dumps([WEATHER])  # glaive writes the tools as a JSON string
SPEC = [{"type": "function", "function": WEATHER}]


def glaive(call: str, question: str = "What is the weather in Paris this week, and should I bring an umbrella?",
           tools: str = TOOLS_TEXT) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "function_call", "value": call},
                              {"from": "observation", "value": '{"temp_c": 21, "rain": true}'},
                              {"from": "gpt", "value": "It is 21 degrees with rain: take an umbrella."}],
            "tools": tools}


GOOD_CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "days": 7}})


def test_glaive_sharegpt_row_becomes_openai_shaped_messages_with_tools():
    row = to_row(glaive(GOOD_CALL), "auto", "messages", {})
    assert row["tools"] == [{"type": "function", "function": WEATHER}]
    user, call, result, answer = row["messages"]
    assert call == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather",
                                                           "arguments": {"city": "Paris", "days": 7}}}]}
    assert result == {"role": "tool", "content": '{"temp_c": 21, "rain": true}', "tool_call_id": "call_0"}
    assert answer["role"] == "assistant" and user["role"] == "user"
    # a list in a function_call turn is parallel calls; each result answers the next open call
    two = glaive(json.dumps([json.loads(GOOD_CALL), {"name": "get_weather", "arguments": {"city": "Oslo"}}]))
    two["conversations"].insert(3, {"from": "observation", "value": "{}"})
    msgs = to_row(two, "sharegpt", "messages", {})["messages"]
    assert [c["id"] for c in msgs[1]["tool_calls"]] == ["call_0", "call_1"]
    assert [m["tool_call_id"] for m in msgs if m["role"] == "tool"] == ["call_0", "call_1"]


def test_openai_row_with_json_text_arguments_keeps_its_ids_and_gets_objects():
    rec = {"tools": SPEC, "messages": [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}
    row = to_row(rec, "auto", "messages", {})
    assert row["messages"][1]["tool_calls"][0] == {"id": "call_abc", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Rome"}}}
    assert row["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_abc"}
    bad = json.loads(json.dumps(rec))
    bad["messages"][2]["tool_call_id"] = "call_zzz"
    with pytest.raises(BadRow, match="tool result for call 'call_zzz', which was not made"):
        to_row(bad, "messages", "messages", {})


@pytest.mark.parametrize("rec, reason", [
    (glaive(json.dumps({"name": "delete_files", "arguments": {}})),
     "tool call: unknown function: conversations\\[1\\] calls 'delete_files', which is not one of its tools"),
    (glaive('{"name": "get_weather", "arguments": {"city": "Par'), "tool call: arguments are not valid JSON"),
    (glaive(json.dumps({"name": "get_weather", "arguments": '{"city": '})), "tool call: arguments are not valid JSON"),
    (glaive(json.dumps({"name": "get_weather", "arguments": {"days": 2}})),
     "tool call: arguments do not match the schema: .*'city' is a required property"),
    (glaive(json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "days": "seven"}})),
     "tool call: arguments do not match the schema: .* at days: 'seven' is not of type 'integer'"),
    (glaive(GOOD_CALL, tools="[{broken"), "malformed tools: `tools` is not valid JSON"),
    (glaive(GOOD_CALL, tools=json.dumps([{**WEATHER, "parameters": {"type": "objekt"}}])),
     "malformed tools: parameters of 'get_weather' are not a valid JSON Schema"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "{}"},
                        {"from": "gpt", "value": "ok"}], "tools": TOOLS_TEXT},
     "tool result that answers no call"),
])
def test_bad_tool_rows_are_quarantined_with_the_reason(rec, reason):
    with pytest.raises(BadRow, match=reason):
        to_row(rec, "auto", "messages", {})


def test_curation_saves_objects_quarantines_bad_calls_and_cards_the_tools(tiny_model, tmp_path):
    questions = ["What is the weather in {} over the next few days, should I pack a coat?",
                 "Could you look up the forecast for {} because I am flying there tomorrow morning?",
                 "I am planning a picnic in {}: is it going to rain at all this weekend?"]
    cities = ["Paris", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo"]
    rows = [glaive(json.dumps({"name": "get_weather", "arguments": {"city": c}}), q.format(c))
            for q in questions for c in cities]
    rows.append({"conversations": [{"from": "human", "value": "Tell me a joke about the weather forecast please."},
                                   {"from": "gpt", "value": "Why did the cloud stay home? It was feeling under the "
                                                            "weather."}], "tools": TOOLS_TEXT})  # no call: kept
    rows.append(glaive(json.dumps({"name": "launch_rocket", "arguments": {}}), "Launch the rocket now please."))
    rows.append(glaive(json.dumps({"name": "get_weather", "arguments": {"town": "Rome"}}), "Weather in Rome?"))
    src = tmp_path / "glaive.json"
    src.write_text(json.dumps(rows))
    spec = DatasetSpec.model_validate({"schema": "messages", "validation_fraction": 0.1,
                                       "sources": [{"name": "glaive", "path": str(src), "format": "sharegpt"}]})
    card = C.curate_dataset("tools", spec, tmp_path / "run", tiny_model, seed=1)
    assert card["counts"]["kept"] == 19 and card["counts"]["rows_in"] == 21
    dropped = card["dropped"]["read"]
    assert sum(n for r, n in dropped.items() if r.startswith("tool call: unknown function")) == 1
    assert sum(n for r, n in dropped.items() if r.startswith("tool call: arguments do not match the schema")) == 1
    t = card["tools"]
    assert t["rows"] == 19 and t["rows_with_calls"] == 18 and t["calls"] == 18 == t["arguments_valid"]
    assert t["calls_per_row"] == {"0": 1, "1": 18} and t["tools_per_row"] == {"1": 19}
    assert t["rows_quarantined"] == {"unknown_function": 1, "arguments_not_json": 0, "arguments_off_schema": 1,
                                     "malformed_tools": 0}
    md = (tmp_path / "run" / "cards" / "tools.md").read_text()
    assert "## Tool calls (kept rows)" in md and "18/18 valid" in md

    dd = datasets.load_from_disk(str(tmp_path / "run" / "tools"))
    assert dd["train"].column_names == ["messages", "tools"]
    row = next(r for r in dd["train"] if len(r["messages"]) == 4)
    assert row["tools"] == SPEC
    call = row["messages"][1]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and isinstance(call["arguments"], dict) and set(call["arguments"]) == {"city"}
    plain = next(r for split in dd.values() for r in split if len(r["messages"]) == 2)
    assert "tool_calls" not in plain["messages"][1]  # no keys widened in with nulls
