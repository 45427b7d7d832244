"""The streamed reasoning split, piece by piece: `ThinkSplit` gives the same thinking, answer and offsets however its
text is cut into deltas (the closing tag split at every place, one character at a time, the newlines around it held
until they are known); and through the real app (the real SmolLM2 tokenizer with llmstack's reasoning template, a
ScriptedEngine that says its text one character per delta) every thinking policy streams exactly what the JSON
answer holds, with the same token counts and logprobs, and no event without text."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
from llmstack.serve.app import build_app
from llmstack.serve.guard import hash_key
from llmstack.serve.reasoning import ThinkSplit
from llmstack.testing import ScriptedEngine

# (opens, raw output, thinking, answer)
CASES = [
    (True, "Two and two.\n</think>\n\nIt is 4.", "Two and two.", "It is 4."),
    (True, "\n<think>\nA model that opens its own block.\n</think>\n\nYes.", "A model that opens its own block.",
     "Yes."),
    (True, "a < b and </thin k> is not the tag\n\n\n</think>\n\n\nDone.</think>",
     "a < b and </thin k> is not the tag", "Done.</think>"),  # a second tag is answer text
    (True, "Line one.\n\nLine two.\n", "Line one.\n\nLine two.", ""),  # a length cut: all thinking
    (True, "x</think>y", "x", "y"),
    (True, "</think>\n\nAt once.", "", "At once."),
    (False, "\n\nNo thinking here, </think> is text.", None, "No thinking here, </think> is text."),
]


def split_all(opens: bool, pieces: list[str]) -> tuple:
    s = ThinkSplit(opens)
    streamed = [s.feed(p) for p in pieces] + [s.feed("", final=True)]
    reasoning = "".join(r for r, _ in streamed)
    content = "".join(c for _, c in streamed)
    assert (reasoning, content) == (s.reasoning, s.content)  # what feed returned adds up to what it kept
    return reasoning, content, s.reasoning_start, s.content_start, s.closed_at


@pytest.mark.parametrize(("opens", "raw", "thinking", "answer"), CASES)
def test_the_split_is_the_same_however_the_text_is_cut(opens, raw, thinking, answer):
    whole = split_all(opens, [raw])
    assert whole[:2] == (thinking or "", answer)
    if whole[2] is not None:  # both parts are slices of the raw output
        assert raw[whole[2]:].startswith(thinking)
    if answer:
        assert raw[whole[3]:] == answer
    assert split_all(opens, list(raw)) == whole  # one character per delta: `</think>` arriving char by char
    for k in range(len(raw) + 1):  # the tag (and the newlines around it) split at every place
        assert split_all(opens, [raw[:k], raw[k:]]) == whole, k
        for m in range(k, min(k + 9, len(raw)) + 1):
            assert split_all(opens, [raw[:k], raw[k:m], raw[m:]]) == whole, (k, m)


THINKING = "Mail jane.doe@example.com about 2 < 3\n\nthen sum"
ANSWER = "It is 4."
KEYS = {"rail": "sk-r", "hide": "sk-h", "pass": "sk-p"}


@pytest.fixture(scope="module")
def app(smollm2):
    from transformers import AutoTokenizer

    from llmstack.train import thinking

    tok = AutoTokenizer.from_pretrained(smollm2)
    tok.chat_template = thinking.chat_template(tok)
    engine = ScriptedEngine(tok, f"{THINKING}\n</think>\n\n{ANSWER}", chunk=1, max_model_len=4096)
    keys = KeyFile.model_validate({"keys": [{"id": p, "sha256": hash_key(k), "thinking": p} for p, k in KEYS.items()]})
    policy = GuardPolicy.model_validate({"rate_limits": {"requests_per_minute": 100_000,
                                                         "tokens_per_minute": 10_000_000}})
    with TestClient(build_app(engine, ServeSpec(engine="hf"), policy, keys)) as c:
        yield c


def ask(c: TestClient, policy: str, stream: bool):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "2+2?"}], "logprobs": True, "top_logprobs": 1,
            "stream": stream, "stream_options": {"include_usage": True} if stream else None}
    r = c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS[policy]}"})
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()
    return [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]


@pytest.mark.parametrize("policy", ["rail", "hide", "pass"])
def test_one_character_per_delta_streams_what_the_json_answer_holds(app, policy):
    whole = ask(app, policy, False)
    msg = whole["choices"][0]["message"]
    chunks = ask(app, policy, True)
    deltas = [ch["choices"][0] for ch in chunks if ch["choices"]]
    reasoning = "".join(d["delta"].get("reasoning_content", "") for d in deltas)
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    want = {"rail": THINKING.replace("jane.doe@example.com", "<EMAIL>"), "hide": "", "pass": THINKING}[policy]
    assert (reasoning, content) == (want, ANSWER) == (msg.get("reasoning_content", ""), msg["content"])
    assert chunks[-1]["usage"] == whole["usage"]  # reasoning_tokens counted alike, one token per character
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(f"{THINKING}\n</think>")
    rows = [row["token"] for d in deltas if d["logprobs"] for row in d["logprobs"]["content"]]
    assert rows == [row["token"] for row in whole["choices"][0]["logprobs"]["content"]]
    if policy == "pass":
        assert "jane" in reasoning
    else:  # nor in a logprobs row
        assert "jane" not in json.dumps(chunks)
    # every event but the opening role and the closing finish carries text or logprobs rows
    assert all(d["delta"].get("content") or d["delta"].get("reasoning_content") or d["logprobs"]
               for d in deltas[1:-1])
    assert deltas[-1]["finish_reason"] == "stop" and deltas[0]["delta"] == {"role": "assistant", "content": ""}
