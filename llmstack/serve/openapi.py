"""The OpenAPI document of the guarded API (`/openapi.json`, shown by `/docs`): every route's request body, its 200
answer (and the server-sent event stream of the generation routes), the errors the guard answers in the route's own
error shape (OpenAI's; Anthropic's on /v1/messages), and the two ways to present a key (bearer, x-api-key).

The routes take their bodies as raw `Request`s: each endpoint reads and parses its body itself, after the guard has
counted the request and capped the body's size, time and depth (admission.py). So FastAPI must never validate a body
first, and the document describes the bodies instead of declaring them: FastAPI's own document gives the paths,
methods and path parameters, and `document` adds the rest from OPERATIONS (one entry per route) and the pydantic wire
models (protocol*.py) through pydantic's JSON Schema generator. A route missing from OPERATIONS fails the document
(tests/test_serve_openapi.py), so a new route cannot go undocumented."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from llmstack import __version__
from llmstack.config.serve import Route
from llmstack.serve import protocol_answers as answers
from llmstack.serve.protocol import AdapterLoad, ChatRequest, CompletionRequest
from llmstack.serve.protocol_messages import MessagesRequest
from llmstack.serve.protocol_responses import ResponsesRequest

# What each status means on this server, whichever route answers it.
ERRORS = {
    400: "The body is not a valid request (not JSON, a field out of range, a cap exceeded, text an input rail "
         "refuses, a prompt longer than the context); `param` names the field.",
    401: "Missing or invalid API key.",
    403: "This key may not do this (a model outside its allowlist; an admin route without an admin key).",
    404: "No such model for this key, or no such stored response / adapter.",
    405: "The path exists but not with this method; `Allow` lists the methods it takes.",
    408: "The request body did not arrive within the server's body timeout.",
    409: "The change conflicts with the current state (a name already served, nothing to roll back, in use).",
    413: "The request body is larger than the server's cap.",
    429: "A rate limit of this key (requests or tokens per minute, or requests in flight); retry after `Retry-After`.",
    503: "The engine, a shared store or the queue is not available now; retry after `Retry-After`.",
}
HEADERS = {  # the headers an error carries (405's Allow always: RFC 9110)
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    405: {"Allow": {"description": "the methods this path takes", "required": True, "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}},
}
GATE = (401, 405, 413)  # the key gate's answers on every keyed path, and the router's 405
GENERATION = (*GATE, 400, 403, 404, 408, 429, 503)  # serving.py's path: limits, body, model, caps, rails, queue
ADMIN = (*GATE, 400, 403, 503)


@dataclass(frozen=True)
class Operation:
    """One route as the document describes it."""

    id: str  # the operationId (OpenAI's own where the route is OpenAI's)
    summary: str
    errors: tuple[int, ...] = GATE
    body: type[BaseModel] | None = None  # the request body's wire model
    answer: type[BaseModel] | None = None  # the 200's JSON; None with `media`: a body of that media type
    media: str = "application/json"
    stream: bool = False  # with `stream: true` the 200 is a text/event-stream
    anthropic: bool = False  # errors in Anthropic's shape
    public: bool = False  # no key needed
    tags: tuple[str, ...] = ()
    examples: dict = field(default_factory=dict)  # name -> (summary, body); "{model}": a model this server serves
    links: dict = field(default_factory=dict)  # OpenAPI links of the 200 (to the operations its answer feeds)


_HELLO = [{"role": "user", "content": "Say hello in five words."}]
_WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
_RESPONSE_ID = {"response_id": "$response.body#/id"}
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("get", "/health"): Operation("health", "Liveness (no key)", errors=(405,), answer=answers.Health, public=True),
    ("get", "/ready"): Operation("ready", "Readiness: the engine serves", errors=(*GATE, 503), answer=answers.Ready),
    ("get", "/metrics"): Operation("metrics", "Prometheus metrics", media="text/plain"),
    ("get", "/v1/models"): Operation("listModels", "The models this key may use", answer=answers.ModelList,
                                     tags=("OpenAI",)),
    ("get", "/v1/monitor/profile"): Operation("trafficProfile", "Binned features of the traffic served (drift)",
                                              answer=answers.TrafficProfile),
    ("post", "/v1/chat/completions"): Operation(
        "createChatCompletion", "Chat completion (OpenAI)", GENERATION, ChatRequest, answers.ChatCompletion,
        stream=True, tags=("OpenAI",), examples={
            "hello": ("A short answer", {"model": "{model}", "messages": _HELLO, "max_tokens": 16}),
            "stream": ("Streamed (server-sent events)", {"model": "{model}", "messages": _HELLO, "max_tokens": 16,
                                                        "stream": True, "stream_options": {"include_usage": True}}),
            "tools": ("A function tool", {"model": "{model}", "max_tokens": 32,
                                          "messages": [{"role": "user", "content": "Weather in Paris?"}],
                                          "tools": [{"type": "function", "function": {
                                              "name": "get_weather", "parameters": _WEATHER}}]}),
            "json": ("JSON under a schema", {"model": "{model}", "messages": _HELLO, "max_tokens": 32,
                                             "response_format": {"type": "json_schema", "json_schema": {
                                                 "name": "greeting", "schema": {"type": "object", "properties": {
                                                     "greeting": {"type": "string"}}}}}})}),
    ("post", "/v1/completions"): Operation(
        "createCompletion", "Text completion (OpenAI, legacy)", GENERATION, CompletionRequest, answers.Completion,
        stream=True, tags=("OpenAI",),
        examples={"hello": ("A short completion", {"model": "{model}", "prompt": "Once upon a time",
                                                   "max_tokens": 16})}),
    ("post", "/v1/responses"): Operation(
        "createResponse", "Responses API (OpenAI)", GENERATION, ResponsesRequest, answers.Response, stream=True,
        tags=("OpenAI",), links={"getResponse": _RESPONSE_ID, "deleteResponse": _RESPONSE_ID},
        examples={"hello": ("A short answer", {"model": "{model}", "input": "Say hello in five words.",
                                               "max_output_tokens": 16})}),
    ("get", "/v1/responses/{response_id}"): Operation(
        "getResponse", "A stored response of this key", (*GATE, 404, 429, 503), answer=answers.Response,
        tags=("OpenAI",)),
    ("delete", "/v1/responses/{response_id}"): Operation(
        "deleteResponse", "Delete a stored response of this key", (*GATE, 404, 429, 503),
        answer=answers.ResponseDeleted, tags=("OpenAI",)),
    ("post", "/v1/messages"): Operation(
        "createMessage", "Messages API (Anthropic)", GENERATION, MessagesRequest, answers.AnthropicMessage,
        stream=True, anthropic=True, tags=("Anthropic",),
        examples={"hello": ("A short answer", {"model": "{model}", "max_tokens": 16, "messages": _HELLO})}),
    ("get", "/admin/routes"): Operation("listRoutes", "Routes: canary and shadow (admin key)", (*GATE, 403),
                                        answer=answers.Routes, tags=("admin",)),
    ("put", "/admin/routes/{name}"): Operation("setRoute", "Set a route (admin key)", ADMIN, Route, answers.Routes,
                                               tags=("admin",)),
    ("post", "/admin/routes/{name}/rollback"): Operation(
        "rollbackRoute", "Roll a route back to its previous version (admin key)", (*ADMIN, 409),
        answer=answers.Routes, tags=("admin",)),
    ("get", "/admin/usage"): Operation("getUsage", "Spend-budget usage per key, model and UTC day (admin key)", ADMIN,
                                       answer=answers.UsageReport, tags=("admin",)),
    ("get", "/admin/adapters"): Operation("listAdapters", "LoRA adapters loaded at runtime (admin key)",
                                          (*GATE, 403), answer=answers.Adapters, tags=("admin",)),
    ("put", "/admin/adapters/{name}"): Operation(
        "loadAdapter", "Load a LoRA adapter from a folder on the server (admin key)", (*ADMIN, 408, 409),
        AdapterLoad, answers.Adapters, tags=("admin",)),
    ("delete", "/admin/adapters/{name}"): Operation(
        "unloadAdapter", "Unload a runtime LoRA adapter (admin key)", (*ADMIN, 404, 409), answer=answers.Adapters,
        tags=("admin",)),
}
SSE_EVENT = {  # one server-sent event of a stream (`stream: true`), each `data` a JSON object of the API's own shape
    "type": "object", "required": ["data"],
    "properties": {"event": {"type": "string", "description": "the event type (Responses and Messages events)"},
                   "data": {"type": "string", "description": "a JSON object (a chunk, or a typed event); chat and "
                                                             "completions end with `[DONE]`"}}}
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer <key>` (OpenAI clients)"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
               "description": "`x-api-key: <key>` (Anthropic clients)"},
}
DESCRIPTION = ("An OpenAI- and Anthropic-compatible API behind llmstack's guard: API keys, rate limits, body caps, "
               "input and output rails, audit. Every error is OpenAI-shaped (`{\"error\": {message, type, param, "
               "code}}`) except on /v1/messages, where it is Anthropic's (`{\"type\": \"error\", \"error\": {type, "
               "message}}`).")


def install(app: FastAPI, model: str) -> None:
    """Make `app.openapi()` return this document (built once); `model` is what the examples ask for."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, model)
        return app.openapi_schema
    app.openapi = openapi


class _WireSchema(GenerateJsonSchema):
    """pydantic's JSON Schema without a tagged union's `unsupported` member: the catch-all that only turns an unknown
    item type into a 400 that names the choices (protocol_responses.py)."""

    def tagged_union_schema(self, schema):
        choices = {tag: choice for tag, choice in schema["choices"].items() if tag != "unsupported"}
        return super().tagged_union_schema({**schema, "choices": choices})


def _any_of(node):
    """`oneOf` as `anyOf`: a union the server tries member by member accepts a value that more than one member
    matches (an input item with no `type` is a message), which `oneOf` would forbid."""
    if isinstance(node, dict):
        return {("anyOf" if k == "oneOf" else k): _any_of(v) for k, v in node.items()
                if not (k == "discriminator" and "oneOf" in node)}
    if isinstance(node, list):
        return [_any_of(v) for v in node]
    return node


def _components() -> tuple[dict, dict, dict]:
    """The request models' and answers' JSON Schemas as components: (refs of the requests, refs of the answers,
    every schema by name)."""
    requests = {op.body for op in OPERATIONS.values() if op.body}
    replies = {op.answer for op in OPERATIONS.values() if op.answer} | {answers.OpenAIError, answers.AnthropicError}
    keys = [(m, "validation") for m in sorted(requests, key=lambda m: m.__name__)]
    keys += [(m, "serialization") for m in sorted(replies, key=lambda m: m.__name__)]
    refs, defs = models_json_schema(keys, ref_template="#/components/schemas/{model}", schema_generator=_WireSchema)
    by_model = {m: ref for (m, _), ref in refs.items()}
    defs = _any_of(defs.get("$defs", {}))
    # the catch-all's own schema (_WireSchema) is still defined, though nothing refers to it: left out
    used = json.dumps([defs, list(refs.values())])
    defs = {name: d for name, d in defs.items() if f'schemas/{name}"' in used}
    return ({m: by_model[m] for m in requests}, {m: by_model[m] for m in replies}, defs)


def _fill(example, model: str):
    if isinstance(example, dict):
        return {k: _fill(v, model) for k, v in example.items()}
    if isinstance(example, list):
        return [_fill(v, model) for v in example]
    return model if example == "{model}" else example


def document(app: FastAPI, model: str) -> dict:
    """The OpenAPI 3.1 document of `app`'s routes (see the module docstring)."""
    doc = get_openapi(title="llmstack", version=__version__, description=DESCRIPTION, routes=app.routes)
    body_refs, answer_refs, schemas = _components()
    doc["components"] = {"schemas": schemas, "securitySchemes": SECURITY_SCHEMES}
    doc["security"] = [{"bearer": []}, {"apiKey": []}]
    missing = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            spec = OPERATIONS.get((method, path))
            if spec is None:
                missing.append(f"{method.upper()} {path}")
                continue
            _describe(op, spec, body_refs, answer_refs, model)
    if missing:
        raise LookupError(f"routes with no entry in llmstack.serve.openapi.OPERATIONS: {', '.join(missing)}")
    return doc


def _describe(op: dict, spec: Operation, body_refs: dict, answer_refs: dict, model: str) -> None:
    """FastAPI's operation `op` (path and parameters) completed from its OPERATIONS entry `spec`."""
    op.update(operationId=spec.id, summary=spec.summary)
    if spec.tags:
        op["tags"] = list(spec.tags)
    if spec.public:
        op["security"] = []
    if spec.body is not None:
        media = {"schema": body_refs[spec.body]}
        if spec.examples:
            media["examples"] = {name: {"summary": summary, "value": _fill(value, model)}
                                 for name, (summary, value) in spec.examples.items()}
        op["requestBody"] = {"required": True, "content": {"application/json": media}}
    if spec.answer is not None:
        content = {"application/json": {"schema": answer_refs[spec.answer]}}
    else:
        content = {spec.media: {"schema": {"type": "string"}}}
    if spec.stream:
        content["text/event-stream"] = {"schema": SSE_EVENT}
    ok = {"description": "OK", "content": content}
    if spec.links:
        ok["links"] = {target: {"operationId": target, "parameters": params}
                       for target, params in spec.links.items()}
    error = answer_refs[answers.AnthropicError if spec.anthropic else answers.OpenAIError]
    responses = {"200": ok}
    for status in sorted(spec.errors):
        responses[str(status)] = {"description": ERRORS[status], "content": {"application/json": {"schema": error}}}
        if status in HEADERS:
            responses[str(status)]["headers"] = HEADERS[status]
    op["responses"] = responses  # FastAPI's own 422 goes: a body or parameter this server refuses is a 400
