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


def _calculating(right: bool):
    """A fixed policy for the calculator environment: compute the gold number (or a wrong one) with one calculator
    call, then answer with the tool's result — what a model that learnt the tool would do."""
    from llmstack.eval.answers import final_number

    golds = {}

    def generate(messages, specs):
        assert [s["function"]["name"] for s in specs] == ["calculator"]
        if messages[-1]["role"] == "tool":
            return "The answer is " + messages[-1]["content"].rsplit("=", 1)[-1].strip()
        gold = golds[messages[-1]["content"]]
        expression = f"{gold} * 2 / 2" if right else f"{gold} + 1"
        return '<tool_call>\n' + json.dumps({"name": "calculator", "arguments": {"expression": expression}}) + \
            '\n</tool_call>'

    def remember(rows):
        golds.update({r["messages"][0]["content"]: final_number(r["messages"][1]["content"]) for r in rows})
        return generate

    return remember


def test_calculator_episodes_score_the_final_number():
    from llmstack.eval.environments.calculator import Calculator
    from llmstack.eval.task_data import ensure_prepared

    ensure_prepared()
    rows = agent.read_items("agent_calculator")[:5]
    assert len(agent.read_items("agent_calculator")) == 50
    assert all(r["id"].startswith("agent_calculator-") for r in rows)
    good = agent.score(rows, Calculator, _calculating(True)(rows))
    assert good["score"] == 1.0 and good["all"]["tool_calls"] == 1.0 and good["all"]["turns"] == 2.0
    bad = agent.score(rows, Calculator, _calculating(False)(rows))
    assert bad["score"] == 0.0 and bad["all"]["invalid_calls"] == 0


def test_agent_episodes_through_a_live_server_with_the_official_client(tiny_model, tmp_path):
    """The server path: the official openai client sends the environment's tools, the server decodes a forced call
    on the first turn, the loop runs it and sends the history back (assistant tool_calls + tool turns with their
    tool_call_id) — the server must accept every turn."""
    from llmstack.eval.run import Target, evaluate
    from llmstack.serve.engines import HfEngine
    from llmstack.serve.local import serve_engine

    with serve_engine(HfEngine(tiny_model, "tiny"), "hf") as server:
        target = Target(backend="server", base_url=server.base_url, served_name=server.served_name,
                        api_key=server.api_key, tool_choice="required")
        res = evaluate(target, "agent", tasks=["agent", "agent_calculator"], limit=3, samples_dir=tmp_path)
    for task in ("agent", "agent_calculator"):
        assert res[task]["n"] == 3 and res[task]["ci95"] is not None
        episodes = [json.loads(line) for line in (tmp_path / f"{task}.jsonl").read_text().splitlines()]
        assert all(e["tool_calls"] >= 1 and e["turns"] >= 2 and e["refused"] == [] for e in episodes), episodes
