"""The tool_calls eval task: items are held-out glaive conversations with a reference call; an answer scores on the
function name, exact arguments and schema validity; any "answer one item" callable can be scored: in-process (the
tool template, llmstack.tools' parser; `required` constrained by xgrammar) or a live server with the official client."""

import json

import pytest

from llmstack.eval import tool_calls as TC
from tests.test_eval_run import tiny_server  # noqa: F401 - the live server fixture

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


# A random model wanders inside free strings; an enum and a boolean end, so forced calls finish within the budget.
UNIT = {"type": "function", "function": {"name": "set_unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["C", "F"]}, "loud": {"type": "boolean"}},
    "required": ["unit", "loud"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
                                                                      "additionalProperties": False}}}
FORCED = {"id": "f", "messages": [{"role": "user", "content": "Switch to Fahrenheit, loudly."}],
          "tools": [UNIT, NOW], "call": {"name": "set_unit", "arguments": {"unit": "F", "loud": True}}}


def test_required_in_process_forces_a_schema_valid_call_from_an_untrained_model(tiny_model):
    answer, warm = TC.hf_answerer(tiny_model, max_new_tokens=60, tool_choice="required")
    warm([FORCED, {**FORCED, "id": "g", "tools": [UNIT]}])  # one batch, a grammar per row
    for tools in ([UNIT, NOW], [UNIT]):
        got = answer(FORCED["messages"], tools)
        s = TC.score_answer({**FORCED, "tools": tools}, got)
        assert s["called"] == 1.0 and s["schema_valid"] == 1.0, got


def test_live_server_scoring_with_the_official_client(tiny_server):  # noqa: F811 - the imported fixture
    """The server backend: the official client against a live llmstack server, auto and required; a forced call is
    constrained by the server, so even the tiny random model's call is schema-valid."""
    from llmstack.eval.run import Target

    target = Target(backend="server", base_url=tiny_server, served_name="tiny", api_key="sk-eval-tiny",
                    tool_choice="required")
    res = TC.score([FORCED], TC.server_answerer(target, max_new_tokens=60))
    assert res["n"] == 1 and res["all"]["called"] == 1.0 and res["all"]["schema_valid"] == 1.0
    auto = TC.server_answerer(Target(backend="server", base_url=tiny_server, served_name="tiny",
                                     api_key="sk-eval-tiny"), max_new_tokens=8)(FORCED["messages"], FORCED["tools"])
    assert set(auto) >= {"content", "calls"} and all(c["name"] in ("set_unit", "now") for c in auto["calls"])
    bad = TC.server_answerer(target)(FORCED["messages"], [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "no-such-type"}}}])  # refused by the server: an item without a call
    assert bad["calls"] == [] and "not a valid JSON Schema" in bad["error"]
    with pytest.raises(ValueError, match="tool_choice must be auto or required"):
        TC.evaluate_target(Target(backend="server", base_url=tiny_server, tool_choice="any"), n=1)


def test_held_out_items_come_from_the_pinned_sdist():
    items = TC.read_items()
    assert len(items) == TC.ITEMS and len({it["id"] for it in items}) == TC.ITEMS
    for it in items:
        TC.T.check_call(it["call"], it["tools"])
        assert it["messages"][-1]["role"] == "user"
