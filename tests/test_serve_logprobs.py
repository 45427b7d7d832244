"""Prompt logprobs on /v1/completions (`echo` + `logprobs`, OpenAI's legacy scoring call that lm-eval's
local-completions makes for multiple-choice tasks), on the transformers engine with the tiny model (seconds):
the numbers equal a plain forward pass, the shape is what lm-eval parses, the guard still applies, and bad
combinations get an OpenAI-style 400. The vLLM engine's side is in test_serve_vllm.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
from llmstack.serve.app import build_app
from llmstack.serve.engines import HfEngine
from llmstack.serve.guard import hash_key

KEY = "sk-llmstack-echo-test"
H = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Question: What is the capital of France?\nAnswer: Paris"


@pytest.fixture(scope="module")
def engine(tiny_model):
    return HfEngine(tiny_model, "tiny", max_model_len=256)


@pytest.fixture(scope="module")
def client(engine):
    keys = KeyFile.model_validate({"keys": [{"id": "t", "sha256": hash_key(KEY), "models": ["*"]}]})
    policy = GuardPolicy.model_validate({"caps": {"max_logprobs": 3}, "input": {"blocklist": ["forbidden-word"]},
                                         "rate_limits": {"requests_per_minute": 10_000}})
    app = build_app(engine, ServeSpec(engine="hf"), policy, keys)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The prompt's token ids and each token's logprob (from the second on) under one transformers forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = tok(PROMPT)["input_ids"]
    with torch.inference_mode():
        lps = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], dim=-1)
    return ids, [float(lps[i, t]) for i, t in enumerate(ids[1:])], tok


def _score(client, **over):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    return client.post("/v1/completions", headers=H, json={**body, **over})


def test_echo_returns_the_prompt_logprobs_of_a_forward_pass(client, reference):
    ids, want, tok = reference
    r = _score(client)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    # what lm-eval reads: one entry per prompt token plus the generated one, the first null
    assert len(lp["token_logprobs"]) == len(ids) + 1 and len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:-1] == pytest.approx(want, abs=1e-4)
    assert all(len(top) == 1 and max(top.values()) >= got - 1e-6
               for top, got in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
    # the text is the prompt and then the completion; tokens and offsets line up with it
    assert choice["text"].startswith(PROMPT) and "".join(lp["tokens"][:len(ids)]) == PROMPT
    assert lp["text_offset"][len(ids)] == len(PROMPT)
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}

    # lm-eval's own parser on our answer: the continuation " Paris" scored after "...Answer:"
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    ctxlen = len(tok("Question: What is the capital of France?\nAnswer:")["input_ids"])
    [(ll, _)] = LocalCompletionsAPI.parse_logprobs(r.json(), ctxlens=[ctxlen])
    assert ll == pytest.approx(sum(want[ctxlen - 1:]), abs=1e-4)


def test_each_prompt_token_passes_through_the_model_once(client, engine, reference):
    """Scoring computes the prompt once: the logprobs come from a forward pass over the prompt but its last token, and
    the generation continues from that pass's KV cache (its first step runs on the last token alone) — the answer
    the same as without echo."""
    ids, want, _ = reference
    lengths = []

    def count(module, args, kwargs):
        lengths.append((kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[-1])

    hook = engine.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        scored = _score(client, max_tokens=2, ignore_eos=True)
    finally:
        hook.remove()
    assert scored.status_code == 200, scored.text
    assert lengths == [len(ids) - 1, 1, 1], lengths  # the prompt but its last token, then one token a step
    assert scored.json()["choices"][0]["logprobs"]["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
    plain = _score(client, max_tokens=2, ignore_eos=True, echo=False, logprobs=None)
    assert scored.json()["choices"][0]["text"] == PROMPT + plain.json()["choices"][0]["text"]


def test_echo_with_max_tokens_0_scores_the_prompt_only(client, reference):
    ids, want, _ = reference
    r = _score(client, max_tokens=0, logprobs=3)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == PROMPT and r.json()["usage"]["completion_tokens"] == 0
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    # 3 alternatives each (fewer where two tokens decode to the same text, e.g. partial UTF-8 bytes: the key is text)
    assert all(1 <= len(top) <= 3 for top in choice["logprobs"]["top_logprobs"][1:])
    assert max(len(top) for top in choice["logprobs"]["top_logprobs"][1:]) == 3
    # echo without logprobs: the prompt comes back, no numbers
    r = _score(client, max_tokens=0, logprobs=None)
    assert r.json()["choices"][0]["text"] == PROMPT and r.json()["choices"][0]["logprobs"] is None


def test_token_id_prompts_are_scored_as_given(client, reference):
    ids, want, _ = reference
    for prompt in (ids, [ids]):  # a list of ids, and a batch of one (what lm-eval sends with tokenized requests)
        r = _score(client, prompt=prompt, max_tokens=0)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
        assert r.json()["usage"]["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("over, param, words", [
    ({"max_tokens": 0, "echo": False}, "max_tokens", "only allowed with echo"),
    ({"stream": True}, "echo", "not supported with stream"),
    ({"logprobs": 4}, "logprobs", "at most 3"),
    ({"logprobs": -1}, "logprobs", "greater than or equal to 0"),
    ({"max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
    ({"prompt": [5, 10 ** 6]}, "prompt", "token ids"),
    ({"prompt": [[5, 6], [7]]}, "prompt", "one prompt per request"),
    ({"prompt": PROMPT + " forbidden-word"}, "prompt", "input guard"),
])
def test_bad_combinations_get_an_openai_style_400(client, over, param, words):
    r = _score(client, **over)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"


def test_scoring_goes_through_the_key_gate(client):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 0, "echo": True,
                                             "logprobs": 1})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_stop_string_split_across_tokens_is_not_leaked(client):
    """Found by the eval parity check: a stop string that arrives in two tokens ("\\n" then "\\n" for "\\n\\n") must
    not leave its first half in the answer, streamed or not (OpenAI and vLLM return the text before the stop)."""
    import json

    body = {"model": "tiny", "prompt": "Who are you?", "max_tokens": 12, "temperature": 0, "logprobs": 0}
    free = client.post("/v1/completions", headers=H, json=body).json()["choices"][0]
    tokens = free["logprobs"]["tokens"]
    k = next(i for i in range(1, len(tokens)) if tokens[i - 1] and tokens[i])  # a boundary between two texts
    stop = tokens[k - 1][-1] + tokens[k][0]  # two characters, one from each side of that boundary
    want = free["text"][:free["text"].find(stop)]
    r = client.post("/v1/completions", headers=H, json={**body, "stop": [stop]}).json()["choices"][0]
    assert (r["text"], r["finish_reason"]) == (want, "stop")
    with client.stream("POST", "/v1/completions", headers=H, json={**body, "stop": [stop], "stream": True}) as s:
        frames = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    assert "".join(f["choices"][0]["text"] for f in frames) == want


def test_an_end_of_turn_token_is_a_generated_token_with_its_logprob(client, reference):
    """Found by the SmolLM2 parity check: when the one generated token is the end of the turn, it must still be
    counted and scored (as vLLM does), or lm-eval, which drops the last row as the generated one, loses a prompt
    token's logprob instead. The tiny random model repeats the last token, so a prompt ending in <|im_end|> ends."""
    _, _, tok = reference
    ids = tok("Hello<|im_end|>")["input_ids"]
    r = _score(client, prompt=ids).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
    assert len(choice["logprobs"]["token_logprobs"]) == len(ids) + 1
    assert choice["logprobs"]["tokens"][-1] == "<|im_end|>" and choice["text"] == tok.decode(ids)
