"""Anthropic's Messages API (POST /v1/messages) through the guard, with the official `anthropic` client: answers and
streams in Anthropic's shapes, the client's own tool loop, stop sequences on the real transformers engine, bad requests
as Anthropic-shaped 4xx, keys (x-api-key and Bearer), input rails on every text the request carries and output rails
on generated text and tool_use input, the audit line. The model's words are scripted (ScriptedEngine) where a shape is
tested; the prompts it was sent show what the model saw."""

from __future__ import annotations

import json
import time

import anthropic
import pytest
from fastapi.testclient import TestClient

from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
from llmstack.serve.app import build_app
from llmstack.serve.engines import HfEngine
from llmstack.serve.guard import hash_key
from llmstack.testing import ScriptedEngine

KEY, OTHER = "sk-llmstack-messages-test", "sk-llmstack-messages-other"
KEYS = KeyFile.model_validate({"keys": [{"id": "dev", "sha256": hash_key(KEY), "models": ["*"]},
                                        {"id": "narrow", "sha256": hash_key(OTHER), "models": ["other"]}]})
WEATHER = {"name": "get_weather", "description": "Current weather for a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CLOCK = {"name": "now", "description": "The time", "input_schema": {"type": "object", "properties": {}}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]
TWO_CALLS = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')


def scripted(tokenizer, text, tmp_path=None):
    engine = ScriptedEngine(tokenizer, text, chunk=3, max_model_len=4096)
    policy = GuardPolicy.model_validate({"input": {"blocklist": ["forbidden-word"]},
                                         "output": {"blocklist": ["forbidden-word"]}})
    app = build_app(engine, ServeSpec(engine="hf"), policy, KEYS,
                    audit_path=str(tmp_path / "audit.jsonl") if tmp_path else None)
    return engine, TestClient(app)


def client_for(c: TestClient, key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key, base_url="http://testserver", http_client=c, max_retries=0)


def events(c: TestClient, body: dict) -> list[tuple[str, dict]]:
    """The raw server-sent events of a streamed call: (event name, data)."""
    r = c.post("/v1/messages", headers={"x-api-key": KEY}, json={**body, "stream": True})
    assert r.status_code == 200
    out = []
    for block in r.text.strip().split("\n\n"):
        name, data = block.split("\n", 1)
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


# ------------------------------------------------------------------------------------------------ shapes
def test_text_answer_in_anthropic_shape_with_the_system_prompt_rendered_and_audited(tokenizer, tmp_path):
    engine, c = scripted(tokenizer, "Sunny and 21 C.", tmp_path)
    with c:
        r = client_for(c).messages.create(model="tiny", max_tokens=64, system="You are terse.", messages=ASK,
                                          metadata={"user_id": "u-1"})
        assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_") and r.model == "tiny"
        assert [b.type for b in r.content] == ["text"] and r.content[0].text == "Sunny and 21 C."
        assert r.stop_reason == "end_turn" and r.stop_sequence is None
        assert r.usage.input_tokens == len(engine.prompts[-1]) and r.usage.output_tokens > 0
        prompt = tokenizer.decode(engine.prompts[-1])
        assert prompt.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
        assert "<|im_start|>user\nWhat's the weather in Paris?<|im_end|>\n<|im_start|>assistant\n" in prompt
        # system as text blocks, user content as text blocks: the same prompt
        client_for(c).messages.create(model="tiny", max_tokens=64, system=[{"type": "text", "text": "You are "},
                                                                           {"type": "text", "text": "terse."}],
                                      messages=[{"role": "user", "content": [
                                          {"type": "text", "text": "What's the weather "},
                                          {"type": "text", "text": "in Paris?"}]}])
        assert engine.prompts[-1] == engine.prompts[-2]
        c.app.state.ref["server"].audit.flush()
    line = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[0])
    assert line["route"] == "/v1/messages" and line["status"] == 200 and line["key_id"] == "dev"
    assert line["request_id"] == r.id.replace("_", "-", 1) and line["prompt_tokens"] == r.usage.input_tokens


def test_streams_follow_anthropics_event_sequence(tokenizer):
    _, c = scripted(tokenizer, "Sunny and 21 C.")
    with c:
        client = client_for(c)
        with client.messages.stream(model="tiny", max_tokens=64, messages=ASK) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        assert text == "Sunny and 21 C." and final.content[0].text == text and final.stop_reason == "end_turn"
        assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
        raw = list(client.messages.create(model="tiny", max_tokens=64, messages=ASK, stream=True))
        kinds = [e.type for e in raw]
        assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
        assert kinds[1:-2] == ["content_block_start", *["content_block_delta"] * (len(kinds) - 5),
                               "content_block_stop"]
        assert "".join(e.delta.text for e in raw if e.type == "content_block_delta") == text
        assert raw[-2].delta.stop_reason == "end_turn"
        names = [name for name, _ in events(c, {"model": "tiny", "max_tokens": 64, "messages": ASK})]
        assert names[:2] == ["message_start", "ping"]


def test_a_client_that_hangs_up_mid_stream_aborts_it_and_frees_its_places(tokenizer, tmp_path):
    engine = ScriptedEngine(tokenizer, "slow answer " * 200, chunk=4, delay=0.02, max_model_len=4096)
    app = build_app(engine, ServeSpec(engine="hf"), GuardPolicy(), KEYS, audit_path=str(tmp_path / "audit.jsonl"))
    with TestClient(app) as c:
        body = {"model": "tiny", "max_tokens": 500, "messages": ASK, "stream": True}
        with c.stream("POST", "/v1/messages", json=body, headers={"x-api-key": KEY}) as s:
            assert next(s.iter_lines()) == "event: message_start"
        srv = app.state.ref["server"]
        deadline = time.time() + 10
        while srv.in_flight_by_key.get("dev", 0) and time.time() < deadline:
            time.sleep(0.05)
        assert srv.in_flight_by_key.get("dev", 0) == 0 and srv.waiting == 0
        srv.audit.flush()
    line = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert line["status"] == 499 and "client_disconnected" in line["guard"] and line["route"] == "/v1/messages"


def test_the_clients_tool_loop(tokenizer):
    engine, c = scripted(tokenizer, [TWO_CALLS, "It is 21 C in Paris at noon."])
    with c:
        client = client_for(c)
        r = client.messages.create(model="tiny", max_tokens=200, messages=ASK, tools=[WEATHER, CLOCK])
        assert r.stop_reason == "tool_use" and [b.type for b in r.content] == ["text", "tool_use", "tool_use"]
        assert r.content[0].text == "Let me look."
        assert (r.content[1].name, r.content[1].input) == ("get_weather", {"city": "Paris"})
        assert "get_weather" in tokenizer.decode(engine.prompts[-1])  # the tools were shown to the model
        results = {"get_weather": "21 C", "now": "12:00"}
        history = [*ASK, {"role": "assistant", "content": r.content}, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": b.id, "content": [{"type": "text", "text": results[b.name]}]}
            for b in r.content if b.type == "tool_use"]}]
        r2 = client.messages.create(model="tiny", max_tokens=200, messages=history, tools=[WEATHER, CLOCK])
        assert r2.content[0].text == "It is 21 C in Paris at noon." and r2.stop_reason == "end_turn"
        prompt = tokenizer.decode(engine.prompts[-1])
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
        assert "<tool_response>\n21 C\n</tool_response>\n<tool_response>\n12:00\n</tool_response>" in prompt


def test_streamed_tool_use_and_tool_choice(tokenizer):
    engine, c = scripted(tokenizer, TWO_CALLS)
    with c:
        client = client_for(c)
        with client.messages.stream(model="tiny", max_tokens=200, messages=ASK, tools=[WEATHER, CLOCK]) as s:
            final = s.get_final_message()
        assert final.stop_reason == "tool_use" and [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
        assert final.content[1].input == {"city": "Paris"} and final.content[2].input == {}
        raw = events(c, {"model": "tiny", "max_tokens": 200, "messages": ASK, "tools": [WEATHER, CLOCK]})
        starts = [d["content_block"] for name, d in raw if name == "content_block_start"]
        assert [b["type"] for b in starts] == ["text", "tool_use", "tool_use"] and starts[1]["input"] == {}
        assert any(d["delta"]["type"] == "input_json_delta" for n, d in raw if n == "content_block_delta")
        # disable_parallel_tool_use: the first call only
        r = client.messages.create(model="tiny", max_tokens=200, messages=ASK, tools=[WEATHER, CLOCK],
                                   tool_choice={"type": "auto", "disable_parallel_tool_use": True})
        assert [b.name for b in r.content if b.type == "tool_use"] == ["get_weather"]
        # tool_choice none: the tools are not shown to the model, and its text stays text
        r = client.messages.create(model="tiny", max_tokens=200, messages=ASK, tools=[WEATHER],
                                   tool_choice={"type": "none"})
        assert "get_weather" not in tokenizer.decode(engine.prompts[-1]) and r.stop_reason == "end_turn"
        with pytest.raises(anthropic.BadRequestError, match="missing"):
            client.messages.create(model="tiny", max_tokens=20, messages=ASK, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "missing"})


@pytest.fixture(scope="module")
def hf(tiny_model):
    app = build_app(HfEngine(tiny_model, "tiny", max_model_len=2048), ServeSpec(engine="hf", max_model_len=2048),
                    GuardPolicy(), KEYS)
    with TestClient(app) as c:
        yield client_for(c)


def test_stop_sequences_end_the_answer_on_the_real_engine(hf):
    # this client no longer sends sampling parameters itself (anthropic 2.x): extra_body carries them
    ask = {"model": "tiny", "max_tokens": 24, "messages": ASK, "extra_body": {"temperature": 0}}
    full = hf.messages.create(**ask)
    text = full.content[0].text
    assert full.stop_reason == "max_tokens" and len(text) > 4  # a random model runs to max_tokens
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = hf.messages.create(**ask, stop_sequences=["never in this text \x00", stop])
    assert "".join(b.text for b in cut.content) == text[:text.index(stop)]
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert cut.usage.output_tokens < full.usage.output_tokens
    with hf.messages.stream(**ask, stop_sequences=[stop]) as s:
        streamed = s.get_final_message()
    assert "".join(b.text for b in streamed.content) == text[:text.index(stop)]
    assert (streamed.stop_reason, streamed.stop_sequence) == ("stop_sequence", stop)
    # a stop string that never comes: the answer runs to max_tokens
    assert hf.messages.create(**ask, stop_sequences=["zzz"]).stop_reason == "max_tokens"


SET_UNIT = {"name": "set_unit", "description": "Set the unit", "input_schema": {
    "type": "object", "properties": {"unit": {"enum": ["C", "F"]}, "loud": {"type": "boolean"}},
    "required": ["unit", "loud"], "additionalProperties": False}}


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "set_unit"},
                                    {"type": "any", "disable_parallel_tool_use": True}])
def test_a_forced_tool_use_follows_its_input_schema_on_the_real_engine(hf, choice):
    """tool_choice tool / any is a forced call decoded under the tool's input_schema: a random model still returns a
    tool_use whose input matches it, JSON and streamed."""
    ask = {"model": "tiny", "max_tokens": 200, "messages": ASK, "tools": [SET_UNIT], "tool_choice": choice,
           "extra_body": {"temperature": 0}}
    r = hf.messages.create(**ask)
    assert r.stop_reason == "tool_use" and [b.type for b in r.content] == ["tool_use"]
    assert r.content[0].name == "set_unit" and r.content[0].input["unit"] in ("C", "F")
    assert isinstance(r.content[0].input["loud"], bool)
    with hf.messages.stream(**ask) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input["unit"] in ("C", "F")


def test_output_config_format_is_structured_output_on_the_real_engine(hf):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    r = hf.messages.create(model="tiny", max_tokens=60, messages=ASK, extra_body={"temperature": 0},
                           output_config={"format": {"type": "json_schema", "schema": schema}})
    assert json.loads(r.content[0].text)["answer"] in ("yes", "no") and r.stop_reason == "end_turn"


# -------------------------------------------------------------------------------------------- bad requests
BAD = {
    "no max_tokens": ({"max_tokens": None}, "max_tokens: Field required"),
    "a bad role": ({"messages": [{"role": "system", "content": "hi"}]}, "messages.0.role"),
    "no content blocks": ({"messages": [{"role": "user", "content": []}]}, "messages[0].content is an empty list"),
    "an image block": ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
                       "content block type 'image' is not supported"),
    "tool_result answering no call": ({"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_x", "content": "42"}]}]}, "no earlier assistant message made"),
    "tool_use in a user turn": ({"messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "now", "input": {}}]}]}, "only appear in assistant messages"),
    "a prefilled assistant turn": ({"messages": [*ASK, {"role": "assistant", "content": "It is"}]},
                                   "prefilled assistant turn"),
    "top_k": ({"top_k": 5}, "top_k is not supported"),
    "temperature over 1": ({"temperature": 1.5}, "temperature"),
    "a server tool": ({"tools": [{"type": "web_search_20250305", "name": "web_search", "input_schema": {}}]},
                      "tools.0.type"),
    "thinking on a model that does not think": ({"thinking": {"type": "enabled", "budget_tokens": 10}},
                                                "does not think"),
    "a bad input_schema": ({"tools": [{"name": "f", "input_schema": {"type": 5}}]},
                           "tools[0].input_schema is not a valid JSON Schema"),
    "a bad output format": ({"output_config": {"format": {"type": "json_schema", "schema": {"type": 5}}}},
                            "output_config.format.schema is not a valid JSON Schema"),
    "nested too deep": ({"metadata": json.loads("[" * 200 + "]" * 200)}, "nested too deeply"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_requests_get_anthropic_shaped_400s(tokenizer, case):
    body, needle = BAD[case]
    _, c = scripted(tokenizer, "ok")
    with c:
        sent = {k: v for k, v in {"model": "tiny", "max_tokens": 20, "messages": ASK, **body}.items() if v is not None}
        r = c.post("/v1/messages", headers={"x-api-key": KEY}, json=sent)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert needle in r.json()["error"]["message"]


def test_keys_sizes_and_routes_get_anthropics_errors_and_openai_routes_keep_theirs(tokenizer):
    _, c = scripted(tokenizer, "ok")
    with c:
        with pytest.raises(anthropic.AuthenticationError) as e:
            client_for(c, "sk-wrong").messages.create(model="tiny", max_tokens=5, messages=ASK)
        assert e.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.PermissionDeniedError) as e:  # a key the model is not allowed to
            client_for(c, OTHER).messages.create(model="tiny", max_tokens=5, messages=ASK)
        assert e.value.body["error"]["type"] == "permission_error"
        with pytest.raises(anthropic.NotFoundError):
            client_for(c).messages.create(model="nope", max_tokens=5, messages=ASK)
        r = c.post("/v1/messages", headers={"Authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"},
                   json={"model": "tiny", "max_tokens": 5, "messages": ASK})
        assert r.status_code == 200 and r.json()["type"] == "message"
        huge = {"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
        r = c.post("/v1/messages", headers={"x-api-key": KEY}, json=huge)
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
        r = c.get("/v1/messages", headers={"x-api-key": KEY})
        assert r.status_code == 405 and r.json()["type"] == "error"
        r = c.post("/v1/messages/count_tokens", headers={"x-api-key": KEY}, json={})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        r = c.post("/v1/messages", headers={"x-api-key": KEY}, content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/chat/completions", headers={"x-api-key": "sk-wrong"}, json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape
        assert c.get("/v1/models", headers={"x-api-key": KEY}).json()["object"] == "list"


def test_limits_are_charged_as_on_every_route_and_refused_as_rate_limit_errors(tokenizer):
    policy = GuardPolicy.model_validate({"rate_limits": {"requests_per_minute": 2}})
    app = build_app(ScriptedEngine(tokenizer, "ok"), ServeSpec(engine="hf"), policy, KEYS)
    with TestClient(app) as c:
        client = client_for(c)
        with pytest.raises(anthropic.BadRequestError):  # a refused request is charged too
            client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "bot", "content": "x"}])
        client.messages.create(model="tiny", max_tokens=5, messages=ASK)
        with pytest.raises(anthropic.RateLimitError) as e:
            client.messages.create(model="tiny", max_tokens=5, messages=ASK)
        assert e.value.body["error"]["type"] == "rate_limit_error" and int(e.value.response.headers["retry-after"]) > 0


# ---------------------------------------------------------------------------------------------------- rails
def test_input_rails_see_system_text_tool_results_and_earlier_tool_use_input(tokenizer):
    engine, c = scripted(tokenizer, "ok")
    with c:
        client = client_for(c)
        history = [{"role": "user", "content": "mail bob@corp.example.com"},
                   {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                      "input": {"city": "near ann@corp.example.com"}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                                 "content": "call 555-123-4567"}]}]
        client.messages.create(model="tiny", max_tokens=5, system="owner: eve@corp.example.com", messages=history,
                               tools=[WEATHER])
        prompt = tokenizer.decode(engine.prompts[-1])
        assert not any(a in prompt for a in ("bob@", "ann@", "eve@", "555-123"))
        assert '"city": "near <EMAIL>"' in prompt and "Error: call <PHONE>" in prompt
        for where in ({"system": "a forbidden-word"},
                      {"messages": [*history[:2], {"role": "user", "content": [
                          {"type": "tool_result", "tool_use_id": "toolu_1", "content": "forbidden-word"}]}]}):
            with pytest.raises(anthropic.BadRequestError, match="blocked"):
                client.messages.create(**{"model": "tiny", "max_tokens": 5, "messages": ASK, **where})


def test_output_rails_redact_generated_text_and_tool_use_input(tokenizer):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "write to bob@corp.example.com"}}\n</tool_call>'
    _, c = scripted(tokenizer, "Ask bob@corp.example.com. " + call)
    with c:
        client = client_for(c)
        r = client.messages.create(model="tiny", max_tokens=200, messages=ASK, tools=[WEATHER])
        assert r.content[0].text == "Ask <EMAIL>." and r.content[1].input == {"city": "write to <EMAIL>"}
        with client.messages.stream(model="tiny", max_tokens=200, messages=ASK, tools=[WEATHER]) as s:
            final = s.get_final_message()
        assert final.content[0].text.strip() == "Ask <EMAIL>."  # streamed text keeps the space before the call
        assert final.content[1].input == {"city": "write to <EMAIL>"}
    _, c = scripted(tokenizer, "This is the forbidden-word.")
    with c:
        client = client_for(c)
        r = client.messages.create(model="tiny", max_tokens=50, messages=ASK)
        assert r.stop_reason == "refusal" and r.content == []
        with pytest.raises(anthropic.APIStatusError, match="invalid_request_error"):
            list(client.messages.create(model="tiny", max_tokens=50, messages=ASK, stream=True))


# ------------------------------------------------------------------------------------------------ thinking
THOUGHT = "Let me think, and mail jane.doe@example.com"
THINKING_KEYS = KeyFile.model_validate({"keys": [{"id": "dev", "sha256": hash_key(KEY)},
                                                 {"id": "hidden", "sha256": hash_key(OTHER), "thinking": "hide"}]})


def test_thinking_comes_back_as_thinking_blocks_as_the_guard_lets_it_out(tiny_thinking_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_thinking_model)
    engine = ScriptedEngine(tok, f"{THOUGHT}\n</think>\n\nIt is 4.", chunk=4, max_model_len=4096)
    with TestClient(build_app(engine, ServeSpec(engine="hf"), GuardPolicy(), THINKING_KEYS)) as c:
        client = client_for(c)
        r = client.messages.create(model="tiny", max_tokens=100, messages=ASK)
        assert [b.type for b in r.content] == ["thinking", "text"] and r.content[1].text == "It is 4."
        assert r.content[0].thinking == "Let me think, and mail <EMAIL>"  # the server's policy: rail
        with client.messages.stream(model="tiny", max_tokens=100, messages=ASK,
                                    thinking={"type": "enabled", "budget_tokens": 60}) as s:
            final = s.get_final_message()
        assert [b.type for b in final.content] == ["thinking", "text"]
        assert final.content[0].thinking == r.content[0].thinking and final.content[1].text == "It is 4."
        # display omitted, or a key whose policy hides thinking: no thinking block, streamed or not
        omitted = client.messages.create(model="tiny", max_tokens=100, messages=ASK,
                                         thinking={"type": "adaptive", "display": "omitted"})
        hidden = client_for(c, OTHER).messages.create(model="tiny", max_tokens=100, messages=ASK)
        with client_for(c, OTHER).messages.stream(model="tiny", max_tokens=100, messages=ASK) as s:
            hidden_stream = s.get_final_message()
        for m in (omitted, hidden, hidden_stream):
            assert [b.type for b in m.content] == ["text"] and m.content[0].text == "It is 4."
        # disabled: the template renders the empty thinking block, the model answers at once
        client.messages.create(model="tiny", max_tokens=100, messages=ASK, thinking={"type": "disabled"})
        assert tok.decode(engine.prompts[-1]).endswith("<think>\n\n</think>\n\n")
        with pytest.raises(anthropic.BadRequestError, match="less than max_tokens"):
            client.messages.create(model="tiny", max_tokens=100, messages=ASK,
                                   thinking={"type": "enabled", "budget_tokens": 100})
