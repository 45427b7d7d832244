"""The tool_calls eval task: items are held-out glaive conversations with a reference call; an answer scores on the
function name, exact arguments and schema validity; any "answer one item" callable can be scored (the live-server
path plugs in there); the in-process answerer renders with the tool template and parses with llmstack.tools."""

import json

import pytest

from llmstack.eval import tool_calls as TC

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                                         "days": {"type": "integer"}},
                                          "required": ["city"]}}}
ITEM = {"id": "x", "messages": [{"role": "user", "content": "Weather in Paris for 3 days?"}], "tools": [WEATHER],
        "call": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}


@pytest.mark.parametrize("calls, want", [
    ([{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}],
     {"name_acc": 1, "args_exact": 1, "schema_valid": 1, "called": 1}),
    ([{"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}],  # JSON text, as the API sends it
     {"name_acc": 1, "args_exact": 1, "schema_valid": 1, "called": 1}),
    ([{"name": "get_weather", "arguments": {"city": "Paris"}}],
     {"name_acc": 1, "args_exact": 0, "schema_valid": 1, "called": 1}),
    ([{"name": "get_weather", "arguments": {"city": "Paris", "days": "three"}}],
     {"name_acc": 1, "args_exact": 0, "schema_valid": 0, "called": 1}),
    ([{"name": "get_weather", "arguments": '{"city": "Par'}], {"name_acc": 1, "args_exact": 0, "schema_valid": 0,
                                                               "called": 1}),
    ([{"name": "rm_rf", "arguments": {}}], {"name_acc": 0, "args_exact": 0, "schema_valid": 0, "called": 1}),
    ([], {"name_acc": 0, "args_exact": 0, "schema_valid": 0, "called": 0}),
])
def test_score_answer(calls, want):
    assert TC.score_answer(ITEM, {"content": None, "calls": calls}) == {k: float(v) for k, v in want.items()}


def test_score_takes_any_answerer_and_reports_like_every_task(tmp_path):
    items = [ITEM, {**ITEM, "id": "y"}]
    answers = iter([{"calls": [ITEM["call"]]}, {"content": "I cannot.", "calls": []}])
    res = TC.score(items, lambda messages, tools: next(answers), tmp_path / "s" / "tool_calls.jsonl")
    assert res["score"] == 0.5 and res["metric"] == "name_acc" and res["n"] == 2 and res["items"] == [1.0, 0.0]
    assert res["all"]["schema_valid_of_called"] == 1.0 and res["all"]["called"] == 0.5
    logged = [json.loads(line) for line in (tmp_path / "s" / "tool_calls.jsonl").read_text().splitlines()]
    assert [x["doc"]["id"] for x in logged] == ["x", "y"]


def test_items_from_glaive_take_the_prefix_before_the_first_call_and_skip_bad_or_short_rows():
    long_q = "I would like to know the weather in Paris for the next three days because I am travelling there soon."
    rows = [{"conversations": [{"from": "human", "value": long_q},
                               {"from": "function_call", "value": json.dumps(
                                   {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}})},
                               {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "Sunny."}],
             "tools": json.dumps([WEATHER["function"]])},
            {"conversations": [{"from": "human", "value": "Paris weather?"},  # too short to be held out
                               {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                              "arguments": {"city": "Paris"}})}],
             "tools": json.dumps([WEATHER["function"]])},
            {"conversations": [{"from": "human", "value": long_q},  # its reference call fails its own schema
                               {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                              "arguments": {"days": 3}})}],
             "tools": json.dumps([WEATHER["function"]])},
            {"conversations": [{"from": "human", "value": long_q}, {"from": "gpt", "value": "No call."}],
             "tools": "[]"}]
    items = TC.items_from_glaive(rows)
    assert [it["id"] for it in items] == ["glaive-0"]
    assert items[0]["messages"] == [{"role": "user", "content": long_q}] and items[0]["tools"] == [WEATHER]
    assert items[0]["call"] == {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}
    assert TC.item_text(items[0]).endswith("get_weather\n\nParis")  # as curation flattens the training row


def test_hf_answerer_renders_tools_and_parses_what_it_generates(tiny_model):
    answer, warm = TC.hf_answerer(tiny_model, max_new_tokens=8)
    warm([ITEM])
    got = answer(ITEM["messages"], ITEM["tools"])
    assert set(got) == {"content", "calls", "text"} and isinstance(got["calls"], list)
    assert TC.score_answer(ITEM, got)["called"] in (0.0, 1.0)


def test_the_server_backend_is_refused_until_the_api_takes_tools():
    from llmstack.eval.run import Target

    with pytest.raises(ValueError, match="cannot be scored through a server yet"):
        TC.evaluate_target(Target(backend="server", base_url="http://127.0.0.1:1"), n=1)


def test_held_out_items_come_from_the_pinned_sdist():
    items = TC.read_items()
    assert len(items) == TC.ITEMS and len({it["id"] for it in items}) == TC.ITEMS
    for it in items:
        TC.T.check_call(it["call"], it["tools"])
        assert it["messages"][-1]["role"] == "user"
