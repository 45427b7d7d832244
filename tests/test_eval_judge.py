"""The pairwise judge: verdict parsing, swapping and aggregation on planted judges with known outcomes, then the whole
path with the tiny model behind a live `llmstack serve` as the judge (its verdicts mean nothing; the plumbing does)."""

import json

import pytest
from typer.testing import CliRunner

from llmstack.eval.judge import compare, parse_verdict, read_prompts

PROMPTS = ["p0", "p1", "p2", "p3"]
GOOD = ["GOOD answer 0", "GOOD answer 1", "GOOD answer 2", "GOOD answer 3"]
BAD = ["bad answer 0", "bad answer 1", "bad answer 2", "bad answer 3"]


def _shown(messages):
    """(first answer, second answer) as the judge saw them."""
    text = messages[-1]["content"]
    return text.split("[Answer A]\n")[1].split("\n\n")[0], text.split("[Answer B]\n")[1].split("\n\n")[0]


def prefers_good(messages):
    first, second = _shown(messages)
    return "A" if "GOOD" in first else "B" if "GOOD" in second else "tie"


def test_parse_verdict():
    assert [parse_verdict(t) for t in ("A", "B.", "Tie", "[[B]]", "Answer A is better", "tie: both fine")] == \
        ["A", "B", "tie", "B", "A", "tie"]
    assert parse_verdict("a nice answer") is None and parse_verdict("") is None


def test_swapping_cancels_a_position_biased_judge():
    always_first = compare(PROMPTS, GOOD, BAD, lambda m: "A", names=("sft", "base")).summary
    # it always picks whichever answer is shown first: each stage wins once per prompt -> exactly 0.5, and the
    # two orders never agree
    assert always_first["win_rate"] == 0.5 and always_first["ci95"] == [0.5, 0.5]
    assert always_first["position_consistency"] == 0.0 and always_first["first_position_rate"] == 1.0
    assert (always_first["wins"], always_first["ties"], always_first["losses"]) == (4, 0, 4)


def test_a_content_judge_and_raw_verdicts(tmp_path):
    res = compare(PROMPTS, GOOD, BAD, prefers_good, names=("sft", "base"), raw_path=tmp_path / "judge.jsonl")
    s = res.summary
    assert s["win_rate"] == 1.0 and s["position_consistency"] == 1.0 and s["first_position_rate"] == 0.5
    assert (s["wins"], s["ties"], s["losses"], s["judgements"]) == (8, 0, 0, 8)
    rows = [json.loads(x) for x in (tmp_path / "judge.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for first, second in zip(rows[::2], rows[1::2]):  # each prompt twice, answers swapped the second time
        assert first["id"] == second["id"] and first["order"] == "sft first" and second["order"] == "base first"
        assert (first["answer_A"], first["answer_B"]) == (second["answer_B"], second["answer_A"])
        assert (first["verdict"], second["verdict"]) == ("A", "B") and first["winner"] == second["winner"] == "sft"
    # reversed roles: the same judge, the other stage judged
    assert compare(PROMPTS, BAD, GOOD, prefers_good).summary["win_rate"] == 0.0


def test_ties_unparsable_replies_and_a_mixed_record():
    tie = compare(PROMPTS, GOOD, BAD, lambda m: "Tie.").summary
    assert tie["win_rate"] == 0.5 and tie["ties"] == 8 and tie["unparsed"] == 0
    noise = compare(PROMPTS, GOOD, BAD, lambda m: "hmm").summary
    assert noise["win_rate"] == 0.5 and noise["unparsed"] == 8 and noise["first_position_rate"] is None
    # a wins 15 prompts clearly, loses 5: 0.75, and 20 prompts leave a wide interval around it
    prompts = [f"p{i}" for i in range(20)]
    a = ["GOOD" if i < 15 else "bad" for i in range(20)]
    b = ["bad" if i < 15 else "GOOD" for i in range(20)]
    s = compare(prompts, a, b, prefers_good).summary
    assert s["win_rate"] == 0.75 and s["ci95"][0] < 0.75 < s["ci95"][1] and s["ci95"][1] - s["ci95"][0] > 0.2
    with pytest.raises(ValueError, match="one answer per prompt"):
        compare(PROMPTS, GOOD[:3], BAD, prefers_good)


def test_read_prompts_takes_prompt_or_last_user_turn(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "x"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                      {"role": "user", "content": "second"}]}) + "\n")
    assert read_prompts(f) == ["x", "second"] and read_prompts(f, limit=1) == ["x"]
    f.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="needs 'prompt' or 'messages'"):
        read_prompts(f)


@pytest.fixture(scope="module")
def judge_server(tiny_model, tmp_path_factory):
    """The tiny model behind a real `llmstack serve` process, as the judge."""
    import subprocess
    import sys

    import yaml

    from llmstack.serve.guard import hash_key
    from llmstack.testing import free_port, wait_http

    d = tmp_path_factory.mktemp("judge_server")
    port = free_port()
    (d / "keys.yaml").write_text(yaml.safe_dump({"keys": [{"id": "judge", "sha256": hash_key("sk-judge-tiny"),
                                                          "models": ["*"]}]}))
    (d / "server.yaml").write_text(yaml.safe_dump({"engine": "hf", "model": str(tiny_model),
                                                   "served_model_name": "tiny-judge", "port": port,
                                                   "keys": "keys.yaml"}))
    proc = subprocess.Popen([sys.executable, "-m", "llmstack", "serve", "--config", str(d / "server.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _short_prompts(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Say hi.", "Name a colour.", "Count to 3.")))
    return f


def test_cli_judge_against_a_live_server(tiny_model, tiny_loras, judge_server, tmp_path, monkeypatch):
    from llmstack.cli import app

    monkeypatch.setenv("TINY_JUDGE_KEY", "sk-judge-tiny")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["eval", "judge", "--a", f"lora={tiny_loras[0]}", "--b", f"base={tiny_model}",
                                   "--judge-url", judge_server, "--judge-model", "tiny-judge",
                                   "--judge-key-env", "TINY_JUDGE_KEY", "--prompts", str(_short_prompts(tmp_path)),
                                   "--max-tokens", "6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "win rate of `lora`" in res.output
    rows = [json.loads(x) for x in (out / "judge.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and [r["order"] for r in rows] == ["lora first", "base first"] * 3
    for first, second in zip(rows[::2], rows[1::2]):
        assert (first["answer_A"], first["answer_B"]) == (second["answer_B"], second["answer_A"])
        assert isinstance(first["reply"], str)  # the judge's raw reply, kept whatever it says
    s = json.loads((out / "judge.json").read_text())
    assert s["wins"] + s["ties"] + s["losses"] == 6 and 0.0 <= s["win_rate"] <= 1.0
    # a wrong key is reported in one line
    res = CliRunner().invoke(app, ["eval", "judge", "--a", str(tiny_model), "--b", str(tiny_model),
                                   "--judge-url", judge_server, "--judge-model", "tiny-judge",
                                   "--prompts", str(_short_prompts(tmp_path)), "--max-tokens", "2",
                                   "--out", str(out)])
    assert res.exit_code == 1 and "401" in res.output and "Traceback" not in res.output


def _chat_dataset(folder):
    """A curated `messages` dataset as the curate stage saves it: train + held-out validation rows."""
    from datasets import Dataset, DatasetDict

    def rows(qs):
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]} for q in qs]

    DatasetDict({"train": Dataset.from_list(rows(["trained on"])),
                 "validation": Dataset.from_list(rows(["Say hi.", "Name a colour.", "Count to 3."]))}
                ).save_to_disk(str(folder))
    return folder


def test_pipeline_stage_judges_two_stages_on_held_out_rows(tiny_model, tiny_loras, judge_server, tmp_path,
                                                          monkeypatch):
    from types import SimpleNamespace

    from llmstack.config.eval import EvalSpec
    from llmstack.stages.eval import run

    monkeypatch.setenv("TINY_JUDGE_KEY", "sk-judge-tiny")
    spec = EvalSpec(suite="smoke", stages=["base", "sft"], limit=1, tasks=["arc_easy"],
                    judge={"base_url": judge_server, "model": "tiny-judge", "api_key_env": "TINY_JUDGE_KEY",
                           "dataset": "chat", "limit": 2, "max_tokens": 6})
    d = tmp_path / "eval"
    d.mkdir()
    ctx = SimpleNamespace(dir=d, spec=spec, models={"base": tiny_model, "sft": tiny_loras[0]}, model=None,
                          datasets={"chat": _chat_dataset(tmp_path / "chat")}, name="eval")
    result = run(ctx)
    assert result.metrics["judge"]["a"] == "sft" and result.metrics["judge"]["b"] == "base"
    assert result.metrics["judge"]["judgements"] == 4
    rows = [json.loads(x) for x in (d / "judge.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Say hi.", "Say hi.", "Name a colour.", "Name a colour."]  # held-out only
    assert "win rate of `sft`" in (d / "section.md").read_text()
    with pytest.raises(ValueError, match="judge: compares two stages"):
        EvalSpec(stages=["base"], judge={"base_url": "http://x", "model": "m"})
    with pytest.raises(ValueError, match="judge.a: 'dpo' is not in eval.stages"):
        EvalSpec(stages=["base", "sft"], judge={"base_url": "http://x", "model": "m", "a": "dpo"})
    with pytest.raises(ValueError, match="not both"):
        EvalSpec(stages=["base", "sft"], judge={"base_url": "http://x", "model": "m", "prompts": "p", "dataset": "d"})
    ctx.datasets = {}
    with pytest.raises(ValueError, match="eval.judge.dataset: no curated dataset 'chat'"):
        run(ctx)
