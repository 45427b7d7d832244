"""The OpenAPI document of the guarded API (llmstack/serve/openapi.py), and a peer fuzzer held to it: schemathesis runs
against a real uvicorn server (the scripted engine over the tiny model's tokenizer) with its default checks — no
5xx, every status code, content type, header and body as documented, schema-invalid bodies refused, 405s with
`Allow` — over every route. The document's own promises (request bodies, the guard's 4xx, the error shapes, the
examples /docs tries) are asserted directly."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import schemathesis
from fastapi.testclient import TestClient

from test_serve_attack import ADMIN, ALICE, live, make_app

H = {"Authorization": f"Bearer {ALICE}"}
GENERATION = {"/v1/chat/completions": "ChatRequest", "/v1/completions": "CompletionRequest",
              "/v1/responses": "ResponsesRequest", "/v1/messages": "MessagesRequest"}
GUARD_ERRORS = {"400", "401", "403", "404", "405", "408", "413", "429", "503"}


@pytest.fixture(scope="module")
def app(tokenizer):
    return make_app(tokenizer)


@pytest.fixture(scope="module")
def doc(app) -> dict:
    with TestClient(app) as client:
        r = client.get("/openapi.json", headers=H)
    assert r.status_code == 200
    return r.json()


def test_generation_routes_have_bodies_answers_and_the_guards_errors(doc):
    for path, model in GENERATION.items():
        op = doc["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]
        assert op["requestBody"]["required"] and body["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert set(op["responses"]) == {"200"} | GUARD_ERRORS, path
        ok = op["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}, path
        error = "AnthropicError" if path == "/v1/messages" else "OpenAIError"
        for status in GUARD_ERRORS:
            assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(error)
        assert op["responses"]["405"]["headers"]["Allow"]["required"]
    schemas = doc["components"]["schemas"]
    chat = schemas["ChatRequest"]
    assert {"model", "messages"} <= set(chat["required"]) and "tools" in chat["properties"]
    assert schemas["MessagesRequest"]["properties"]["max_tokens"]["type"] == "integer"
    assert set(schemas["OpenAIErrorDetail"]["required"]) == {"message", "type", "param", "code"}


def test_the_document_is_valid_openapi_3_1(doc):
    assert doc["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema


def test_every_route_is_documented_with_security_and_no_422(app, doc):
    routes = {(m.lower(), r.path) for r in app.routes if getattr(r, "include_in_schema", False)
              for m in r.methods - {"HEAD"}}
    documented = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert documented == routes
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert doc["components"]["securitySchemes"]["apiKey"]["name"] == "x-api-key"
    assert doc["paths"]["/health"]["get"]["security"] == []
    ops = [op for item in doc["paths"].values() for op in item.values()]
    assert len({op["operationId"] for op in ops}) == len(ops)
    assert not [op["operationId"] for op in ops if "422" in op["responses"]]  # a refused body is a 400 here
    assert all("401" in op["responses"] for op in ops if op.get("security") != [])
    admin = doc["paths"]["/admin/adapters/{name}"]["put"]
    assert admin["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("AdapterLoad")
    assert {"400", "403", "409"} <= set(admin["responses"])


def test_a_route_missing_from_the_registry_fails_the_document(tokenizer):
    app = make_app(tokenizer)

    @app.get("/v1/undocumented")
    async def undocumented():
        return {}
    with pytest.raises(LookupError, match="GET /v1/undocumented"):
        app.openapi()


def test_docs_page_embeds_the_spec_with_examples_that_work(app, doc):
    examples = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert {"hello", "stream", "tools", "json"} <= set(examples)
    with TestClient(app) as client:
        page = client.get("/docs", headers=H)
        assert page.status_code == 200 and '"createChatCompletion"' in page.text
        for name, example in examples.items():
            r = client.post("/v1/chat/completions", headers=H, json=example["value"])
            assert r.status_code == 200, (name, r.text)
            if example["value"].get("stream"):
                assert r.headers["content-type"].startswith("text/event-stream")


def test_405_names_every_method_of_the_path_in_the_routes_error_shape(app):
    with TestClient(app) as client:
        r = client.put("/v1/chat/completions", headers=H, json={})
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = client.post("/v1/responses/resp_1", headers=H)
        assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
        r = client.head("/v1/models", headers=H)  # HEAD is not served: listed nowhere
        assert r.status_code == 405 and r.headers["allow"] == "GET"
        r = client.get("/v1/messages", headers=H)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json()["type"] == "error"  # Anthropic's shape on Anthropic's route


@pytest.mark.parametrize("path,field,value", [
    ("/v1/chat/completions", "stream", 0), ("/v1/chat/completions", "temperature", False),
    ("/v1/chat/completions", "max_tokens", "8"), ("/v1/completions", "echo", "true"),
    ("/v1/responses", "parallel_tool_calls", 1), ("/v1/messages", "stream", "false")])
def test_wire_types_are_jsons_as_documented_not_coerced(app, path, field, value):
    body = {"/v1/completions": {"model": "tiny", "prompt": "hi", "max_tokens": 4},
            "/v1/responses": {"model": "tiny", "input": "hi"}}.get(
        path, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    with TestClient(app) as client:
        r = client.post(path, headers=H, json={**body, field: value})
        assert r.status_code == 400, r.text
        assert field in json.dumps(r.json())
        # a whole number written as a float is an integer, as JSON Schema reads it
        assert client.post(path, headers=H, json={**body, "max_tokens": 4.0}).status_code == 200


# The checks are schemathesis's defaults, but one: positive_data_acceptance wants a 2xx for every body the schema
# allows, and this server refuses some such bodies on purpose with a 400 no JSON Schema can state — the guard
# policy's caps (max_tokens, n, stops), rules across fields (tool_choice "required" needs tools; a tool result must
# answer an earlier call), text an input rail refuses, a prompt longer than the context, a route naming a model that
# is not served, an engine that cannot load adapters.
FUZZ_CONFIG = """
[checks.positive_data_acceptance]
enabled = false
"""


def test_schemathesis_finds_nothing_on_a_live_server(app, doc, tmp_path):
    (tmp_path / "schemathesis.toml").write_text(FUZZ_CONFIG)
    cli = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()"]  # this interpreter's
    with live(app) as port:
        run = subprocess.run(
            [*cli, "--config-file", str(tmp_path / "schemathesis.toml"), "run",
             f"http://127.0.0.1:{port}/openapi.json", "-H", f"Authorization: Bearer {ADMIN}",
             "--max-examples", "5", "--seed", "29", "--workers", "1", "--generation-database", "none",
             "--no-color"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-12000:]
    operations = sum(len(item) for item in doc["paths"].values())
    assert f"Tested: {operations}" in out, out[-4000:]  # every operation
    cases = re.search(r"(\d+) generated, (\d+) passed", out)
    assert cases and cases[1] == cases[2] and int(cases[1]) > 20 * operations, out[-4000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert f"✅ {phase}" in out, out[-4000:]
