"""The Responses API (`/v1/responses`) through the guarded path, with the official `openai` client: a response object
and typed stream events in OpenAI's shapes, a function-tool round trip over previous_response_id, stored responses
(retrieve, delete, another key's 404, TTL, chain loops), the same rails and audit as chat, and the OpenAI Agents SDK's
own tool loop against a live server. The engine's words are scripted (ScriptedEngine) with the tiny model's
tokenizer, so the prompts the engine was sent can be read back."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from fastapi.testclient import TestClient

from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
from llmstack.serve.app import build_app
from llmstack.serve.guard import hash_key
from llmstack.testing import ScriptedEngine

KEY, OTHER = "sk-llmstack-resp-test", "sk-llmstack-resp-other"
KEYS = KeyFile.model_validate({"keys": [{"id": "dev", "sha256": hash_key(KEY), "models": ["*"]},
                                        {"id": "other", "sha256": hash_key(OTHER), "models": ["*"]}]})
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def scripted(tokenizer, text, tmp_path=None, spec: dict | None = None):
    engine = ScriptedEngine(tokenizer, text, chunk=3, max_model_len=4096)
    audit = str(tmp_path / "audit.jsonl") if tmp_path else None
    pol = GuardPolicy.model_validate({"input": {"blocklist": ["forbidden-word"]},
                                      "output": {"blocklist": ["forbidden-word"]}})
    app = build_app(engine, ServeSpec(engine="hf", **(spec or {})), pol, KEYS, audit_path=audit)
    return engine, TestClient(app)


def client_for(c: TestClient, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url="http://testserver/v1", http_client=c, max_retries=0)


def post(c: TestClient, body: dict, key: str = KEY):
    return c.post("/v1/responses", headers={"Authorization": f"Bearer {key}"}, json={"model": "tiny", **body})


# ------------------------------------------------------------------------------------------------- shapes
def test_create_non_streamed_is_a_response_object(tokenizer):
    engine, c = scripted(tokenizer, "Hello there.")
    with c:
        client = client_for(c)
        r = client.responses.create(model="tiny", input="Say hi", instructions="Be brief.", max_output_tokens=40)
        assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
        assert r.output_text == "Hello there." and r.output[0].type == "message"
        assert r.output[0].content[0].type == "output_text"
        assert r.usage.input_tokens == len(engine.prompts[-1]) and r.usage.output_tokens > 0
        assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
        assert r.instructions == "Be brief." and r.max_output_tokens == 40
        prompt = tokenizer.decode(engine.prompts[-1])
        assert prompt.index("Be brief.") < prompt.index("Say hi")  # instructions first, as a system turn
        # message items with input_text parts, and a developer message
        r = client.responses.create(model="tiny", input=[
            {"role": "developer", "content": "Rule one."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Part A. "},
                                                            {"type": "input_text", "text": "Part B."}]}])
        assert r.output_text == "Hello there."
        assert "Part A. Part B." in tokenizer.decode(engine.prompts[-1])


def test_length_cut_is_incomplete(tokenizer):
    _, c = scripted(tokenizer, None)
    with c:
        r = client_for(c).responses.create(model="tiny", input="go", max_output_tokens=3)
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert r.usage.output_tokens == 3


def test_streamed_events_accumulate_in_the_clients_stream(tokenizer):
    _, c = scripted(tokenizer, "Streaming works fine.")
    with c:
        client = client_for(c)
        events = list(client.responses.create(model="tiny", input="hi", stream=True))
        kinds = [e.type for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
        for k in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
                  "response.content_part.done", "response.output_item.done"):
            assert k in kinds
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Streaming works fine."
        final = events[-1].response
        assert final.output_text == "Streaming works fine." and final.usage.output_tokens > 0
        with client.responses.stream(model="tiny", input="hi") as stream:
            text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
            done = stream.get_final_response()
        assert text == done.output_text == "Streaming works fine."
        assert client.responses.retrieve(done.id).output_text == "Streaming works fine."  # streamed ones are stored


# ------------------------------------------------------------------------------------------ tool round trip
def test_function_tool_round_trip_over_previous_response_id(tokenizer):
    engine, c = scripted(tokenizer, [f"Let me check.\n{CALL}", "It is sunny in Paris.", CALL])
    with c:
        client = client_for(c)
        r1 = client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER])
        calls = [o for o in r1.output if o.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {
            "city": "Paris"}
        assert r1.output[0].type == "message" and r1.output_text == "Let me check."
        r2 = client.responses.create(model="tiny", previous_response_id=r1.id, tools=[WEATHER], input=[
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"sky": "sunny"}'}])
        assert r2.output_text == "It is sunny in Paris." and r2.previous_response_id == r1.id
        prompt = tokenizer.decode(engine.prompts[-1])  # the whole conversation was rebuilt from the store
        assert "Weather in Paris?" in prompt and '"city": "Paris"' in prompt and '{"sky": "sunny"}' in prompt
        # streamed: the call comes as function_call item events
        events = list(client.responses.create(model="tiny", input="Weather?", tools=[WEATHER], stream=True,
                                              tool_choice="auto"))
        kinds = [e.type for e in events]
        assert kinds[-1] == "response.completed"
        done = next(e for e in events if e.type == "response.function_call_arguments.done")
        assert json.loads(done.arguments) == {"city": "Paris"}


# ------------------------------------------------------------------------------------------ stored responses
def test_retrieve_delete_and_other_keys_get_404(tokenizer):
    _, c = scripted(tokenizer, "Stored.")
    with c:
        client, other = client_for(c), client_for(c, OTHER)
        r = client.responses.create(model="tiny", input="hi")
        assert client.responses.retrieve(r.id).output_text == "Stored."
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(r.id)  # the same 404 as an id that never was
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(r.id)
        with pytest.raises(openai.BadRequestError):  # nor can another key continue its conversation
            other.responses.create(model="tiny", input="more", previous_response_id=r.id)
        missing = c.get("/v1/responses/resp_nope", headers={"Authorization": f"Bearer {KEY}"})
        foreign = c.get(f"/v1/responses/{r.id}", headers={"Authorization": f"Bearer {OTHER}"})
        assert missing.status_code == foreign.status_code == 404
        assert missing.json()["error"]["message"].replace("resp_nope", r.id) == foreign.json()["error"]["message"]
        client.responses.delete(r.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(r.id)
        unstored = client.responses.create(model="tiny", input="hi", store=False)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(unstored.id)


@pytest.mark.parametrize("where", ["file", "memory"])
def test_ttl_per_key_cap_and_size_cap(tokenizer, tmp_path, where):
    routes = str(tmp_path / "routes.json")  # a file store: the responses go beside the routes file
    spec = {"responses": {"ttl_s": 60, "max_per_key": 2, "max_bytes": 2500}}
    _, c = scripted(tokenizer, "Stored.", spec={**spec, "routes_store": routes} if where == "file" else spec)
    with c:
        client = client_for(c)
        store = c.app.state.ref["server"].responses
        theirs = client_for(c, OTHER).responses.create(model="tiny", input="mine").id
        ids = [client.responses.create(model="tiny", input=f"hi {i}").id for i in range(3)]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[0])  # the key's oldest went first
        assert client_for(c, OTHER).responses.retrieve(theirs).id == theirs  # another key's cap is its own
        assert client.responses.retrieve(ids[2]).output_text == "Stored."
        assert (tmp_path / "routes.json.responses.json").is_file() == (where == "file")
        big = client.responses.create(model="tiny", input="x" * 2000)
        assert big.store is False  # returned, not stored
        store.clock = lambda: 1e12  # long after: expired
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(ids[2])


def test_chain_loop_and_too_long_chain_are_400(tokenizer):
    _, c = scripted(tokenizer, "ok", spec={"responses": {"max_chain": 50}})
    with c:
        client = client_for(c)
        store = c.app.state.ref["server"].responses
        msg = [{"type": "message", "role": "user", "content": "x"}]
        store.put({"id": "resp_a", "owner": "dev", "previous_response_id": "resp_b", "items": msg, "response": {}})
        store.put({"id": "resp_b", "owner": "dev", "previous_response_id": "resp_a", "items": msg, "response": {}})
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="tiny", input="more", previous_response_id="resp_a")
        assert err.value.body["code"] == "previous_response_chain_invalid"
        store.options.max_per_key = 20_000
        for i in range(10_000):
            store.backend.memory[f"resp_{i}"] = {"id": f"resp_{i}", "owner": "dev", "items": msg,
                                                 "previous_response_id": f"resp_{i - 1}" if i else None,
                                                 "created_at": 0, "expires_at": 1e18}
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="tiny", input="more", previous_response_id="resp_9999")
        assert err.value.body["code"] == "previous_response_chain_too_long"


# -------------------------------------------------------------------------------------------- rails, audit
def test_input_rails_on_every_input_text(tokenizer):
    engine, c = scripted(tokenizer, "ok")
    with c:
        for body, param in [({"input": "the forbidden-word"}, "input"),
                            ({"input": "hi", "instructions": "say forbidden-word"}, "instructions"),
                            ({"input": [{"type": "function_call", "call_id": "c1", "name": "get_weather",
                                         "arguments": "{}"},
                                        {"type": "function_call_output", "call_id": "c1",
                                         "output": "forbidden-word"}], "tools": [WEATHER]}, "input[1].output"),
                            ({"input": [{"role": "user", "content": "hi"},
                                        {"type": "function_call", "call_id": "c1", "name": "get_weather",
                                         "arguments": '{"city": "forbidden-word"}'}], "tools": [WEATHER]},
                             "input[1].arguments")]:
            r = post(c, body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "input_blocklist", r.text
            assert r.json()["error"]["param"] == param  # the Responses field, not the chat message it became
        part = {"type": "input_text", "text": "mail bob@corp.example.com"}
        r = post(c, {"input": [{"role": "user", "content": [part]}]})
        assert r.status_code == 200
        assert "bob@corp.example.com" not in tokenizer.decode(engine.prompts[-1])


def test_output_rails_on_text_and_arguments_streamed_too(tokenizer, tmp_path):
    leak = ('Write to bob@corp.example.com.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "mail bob@corp.example.com"}}\n</tool_call>')
    _, c = scripted(tokenizer, leak, tmp_path)
    with c:
        client = client_for(c)
        r = client.responses.create(model="tiny", input="hi", tools=[WEATHER])
        call = next(o for o in r.output if o.type == "function_call")
        assert "bob@" not in r.model_dump_json() and json.loads(call.arguments) == {"city": "mail <EMAIL>"}
        events = list(client.responses.create(model="tiny", input="hi", tools=[WEATHER], stream=True))
        assert "bob@" not in json.dumps([e.model_dump() for e in events])
        assert "<EMAIL>" in events[-1].response.output_text
        c.app.state.ref["server"].audit.flush()
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    served = [x for x in lines if x["route"] == "/v1/responses" and x.get("status") == 200 and "prompt_tokens" in x]
    assert len(served) == 2 and served[1]["stream"] and served[0]["request_id"] == "resp-" + r.id[5:]
    assert all(x["tool_calls"] == ["get_weather"] for x in served)


def test_output_rail_block_mid_stream_is_a_failed_event(tokenizer):
    _, c = scripted(tokenizer, "this says forbidden-word here")
    with c:
        client = client_for(c)
        events = list(client.responses.create(model="tiny", input="hi", stream=True))
        assert [e.type for e in events][-2:] == ["error", "response.failed"]
        assert events[-1].response.status == "failed" and "forbidden-word" not in json.dumps(
            [e.model_dump() for e in events])
        r = client.responses.create(model="tiny", input="hi")
        assert r.status == "incomplete" and r.incomplete_details.reason == "content_filter" and r.output_text == ""


def test_bad_requests_are_4xx_in_openais_shape(tokenizer):
    _, c = scripted(tokenizer, "ok")
    with c:
        for body in [{"input": []}, {"input": [{"type": "web_search_call"}]}, {"input": 5},
                     {"input": "x", "tools": [{"type": "web_search"}]}, {"input": "x", "text": {"format": {
                         "type": "json_schema", "name": "a"}}}, {"input": "x", "previous_response_id": "resp_x"},
                     {"input": [{"type": "reasoning"}]}, {"input": "x", "temperature": 9},
                     {"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]}]:
            r = post(c, body)
            assert 400 <= r.status_code < 500 and set(r.json()["error"]) == {"message", "type", "param", "code"}, body
        call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "[1]"}
        for body, param in [({"input": ["hi", call]}, None),
                            ({"input": [{"role": "user", "content": "hi"}, call], "tools": [WEATHER]},
                             "input[1].arguments"),
                            ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
                             "tool_choice"),
                            ({"input": "x", "tools": [WEATHER, WEATHER]}, "tools[1].name"),
                            ({"input": [{"type": "function_call_output", "call_id": "never", "output": "x"}]},
                             "input[0].call_id"),
                            ({"input": "x", "max_output_tokens": 10**6}, "max_output_tokens"),
                            ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a",
                                                                "schema": {"type": 5}}}}, "text.format")]:
            r = post(c, body)
            assert r.status_code == 400, r.text
            if param:  # chat's checks, naming the Responses field
                assert r.json()["error"]["param"] == param, r.text
        r = c.post("/v1/responses", headers={"Authorization": "Bearer sk-wrong"}, json={"model": "tiny", "input": "x"})
        assert r.status_code == 401
        r = c.delete("/v1/responses/resp_x", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"


# ----------------------------------------------------------------------------------- the OpenAI Agents SDK
def test_agents_sdk_runs_its_function_tool_loop_against_a_live_server(tokenizer):
    """The Agents SDK's own loop (OpenAIResponsesModel): call 1 answers with a tool call, the SDK runs the tool and
    sends its output back, call 2 answers with the final text."""
    import agents
    from openai import AsyncOpenAI

    from test_serve_attack import live

    agents.set_tracing_disabled(True)
    ran = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather for a city."""
        ran.append(city)
        return f"sunny in {city}"

    engine, _ = scripted(tokenizer, [CALL, "It is sunny in Paris."])
    app = build_app(engine, ServeSpec(engine="hf"), GuardPolicy(), KEYS)
    with live(app) as port:
        client = AsyncOpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        agent = agents.Agent(name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
                             model=agents.OpenAIResponsesModel(model="tiny", openai_client=client))
        result = asyncio.run(agents.Runner.run(agent, "Weather in Paris?"))
    assert ran == ["Paris"] and result.final_output == "It is sunny in Paris."
    assert len(engine.prompts) == 2
    second = tokenizer.decode(engine.prompts[1])
    assert "sunny in Paris" in second and "Answer with the weather tool." in second  # the tool's output went back

    async def streamed(agent):  # the SDK's streamed run reads our typed events
        run = agents.Runner.run_streamed(agent, "Weather in Oslo?")
        kinds = [e.type async for e in run.stream_events()]
        return run.final_output, kinds

    engine, _ = scripted(tokenizer, [CALL.replace("Paris", "Oslo"), "It is sunny in Oslo."])
    with live(build_app(engine, ServeSpec(engine="hf"), GuardPolicy(), KEYS)) as port:
        client = AsyncOpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        agent = agents.Agent(name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
                             model=agents.OpenAIResponsesModel(model="tiny", openai_client=client))
        final, kinds = asyncio.run(streamed(agent))
    assert ran == ["Paris", "Oslo"] and final == "It is sunny in Oslo." and "raw_response_event" in kinds


def test_redis_store_is_shared_by_replicas_and_keeps_owner_ttl_and_caps(tokenizer, redis_url):
    """Two replicas on one redis: a response made on one is read, continued and deleted on the other; owners, the
    per-key cap and the TTL hold there too."""
    spec = {"routes_store": redis_url, "responses": {"max_per_key": 2}}
    engine, a = scripted(tokenizer, "From the store.", spec=spec)
    _, b = scripted(tokenizer, "From the store.", spec=spec)
    with a, b:
        ca, cb = client_for(a), client_for(b)
        first = ca.responses.create(model="tiny", input="Remember: blue.")
        assert cb.responses.retrieve(first.id).output_text == "From the store."
        with pytest.raises(openai.NotFoundError):
            client_for(b, OTHER).responses.retrieve(first.id)
        cb.responses.create(model="tiny", input="more", previous_response_id=first.id)
        ca.responses.create(model="tiny", input="again")
        with pytest.raises(openai.NotFoundError):
            ca.responses.retrieve(first.id)  # the third of this key's responses evicted the first
        last = cb.responses.create(model="tiny", input="last")
        ca.responses.delete(last.id)  # the client returns nothing; the next GET says it is gone
        with pytest.raises(openai.NotFoundError):
            cb.responses.retrieve(last.id)
        kept = ca.responses.create(model="tiny", input="kept")
        b.app.state.ref["server"].responses.clock = lambda: 1e12
        with pytest.raises(openai.NotFoundError):
            cb.responses.retrieve(kept.id)


# ---------------------------------------------------------------------------------------- reasoning models
def test_a_reasoning_models_thinking_is_a_reasoning_item_under_the_policy(smollm2):
    """The thinking the guard's policy lets out (rail: PII redacted) as a `reasoning` output item, JSON and streamed;
    under `hide` there is none; usage counts reasoning tokens."""
    from transformers import AutoTokenizer

    from llmstack.train import thinking

    tok = AutoTokenizer.from_pretrained(smollm2)
    tok.chat_template = thinking.chat_template(tok)
    engine = ScriptedEngine(tok, "Think of bob@corp.example.com\n</think>\n\nIt is 4.", chunk=4, max_model_len=4096)
    for policy, shown in (("rail", "Think of <EMAIL>"), ("hide", None)):
        pol = GuardPolicy.model_validate({"thinking": policy})
        with TestClient(build_app(engine, ServeSpec(engine="hf"), pol, KEYS)) as c:
            client = client_for(c)
            r = client.responses.create(model="tiny", input="2+2?", reasoning={"effort": "high"})
            items = [o for o in r.output if o.type == "reasoning"]
            assert r.output_text == "It is 4." and r.usage.output_tokens_details.reasoning_tokens > 0
            assert [i.content[0].text.strip() for i in items] == ([shown] if shown else [])
            events = list(client.responses.create(model="tiny", input="2+2?", stream=True))
            text = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
            assert (text.strip() or None) == shown and "bob@" not in json.dumps([e.model_dump() for e in events])
            assert events[-1].type == "response.completed" and events[-1].response.output_text == "It is 4."


def test_a_client_that_hangs_up_mid_stream_frees_its_places(tokenizer, tmp_path):
    """The Responses stream wraps chat's: closing it closes chat's, so the engine request is aborted, the key's place
    and the engine slot are freed, the audit line says 499, and nothing is stored."""
    import time

    engine = ScriptedEngine(tokenizer, "slow answer " * 200, chunk=4, delay=0.02)
    app = build_app(engine, ServeSpec(engine="hf"), GuardPolicy(), KEYS, audit_path=str(tmp_path / "audit.jsonl"))
    with TestClient(app) as c:
        srv = app.state.ref["server"]
        with c.stream("POST", "/v1/responses", json={"model": "tiny", "input": "hi", "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}) as s:
            lines = s.iter_lines()
            while "response.output_text.delta" not in next(lines):
                pass
        deadline = time.time() + 10
        while (srv.in_flight_by_key.get("dev") or srv.waiting) and time.time() < deadline:
            time.sleep(0.05)
        assert not srv.in_flight_by_key.get("dev") and srv.slots._value == ServeSpec().max_concurrency
        srv.audit.flush()
        assert srv.responses.backend.memory == {}
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["status"] for e in lines] == [499] and "client_disconnected" in lines[0]["guard"]
