"""The agent eval: held-out problems run as episodes of the tool loop through a real environment (lookup: SQLite FTS5
search), scored on success with its Wilson interval, tool calls, invalid calls and turns."""

import json

from llmstack.eval import agent
from llmstack.eval.environments.lookup import Lookup, problems


def _searcher(query_from_question: bool):
    """A fixed policy in the model's text format: search (with the question, or with nonsense), then answer."""

    def generate(messages, specs):
        assert [s["function"]["name"] for s in specs] == ["search"]
        if messages[-1]["role"] == "tool":
            return "The answer is in the result."
        query = messages[-1]["content"] if query_from_question else "zzqx"
        return '<tool_call>\n' + json.dumps({"name": "search", "arguments": {"query": query}}) + '\n</tool_call>'

    return generate


def test_an_agent_that_searches_succeeds_and_one_that_does_not_fails(tmp_path):
    rows = problems("held_out")
    good = agent.score(rows, Lookup, _searcher(True), samples=tmp_path / "agent.jsonl")
    assert good["score"] == 1.0 and good["n"] == 6 and good["ci95"][0] > 0.5
    assert good["all"]["tool_calls"] == 1.0 and good["all"]["turns"] == 2.0 and good["all"]["invalid_calls"] == 0
    assert len((tmp_path / "agent.jsonl").read_text().splitlines()) == 6
    bad = agent.score(rows, Lookup, _searcher(False))
    assert bad["score"] == 0.0 and bad["all"]["invalid_calls"] == 1.0 and bad["ci95"][1] < 0.5


def test_a_broken_call_is_an_invalid_call_not_a_crash():
    def generate(messages, specs):
        if messages[-1]["role"] == "tool":
            return "I give up."
        return '<tool_call>\n{"name": "search", "arguments": {"q": 1}}\n</tool_call>'

    res = agent.score(problems("held_out")[:2], Lookup, generate)
    assert res["all"]["invalid_calls"] == 1.0 and res["score"] == 0.0


def test_the_agent_suite_runs_the_tiny_model_through_the_evaluation(tiny_model, tmp_path):
    from llmstack.eval.run import Target, evaluate

    res = evaluate(Target(model=tiny_model), "agent", limit=2, samples_dir=tmp_path)["agent"]
    assert res["metric"] == "success" and res["n"] == 2 and res["ci95"] is not None
    assert 1 <= res["all"]["turns"] <= agent.MAX_TURNS and (tmp_path / "agent.jsonl").exists()
