"""Schemas for serving: the `serve:` block of a recipe / serve/server.yaml, the guard policy (serve/guard.yaml)
and the API key file (serve/keys.yaml). Nothing here imports vLLM or torch, so `llmstack validate` stays fast."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from llmstack.config.base import Strict, format_errors


class Canary(Strict):
    model: str
    percent: float = Field(ge=0, le=100, description="share of this name's traffic sent to the canary")


class Route(Strict):
    primary: str
    canary: Canary | None = None
    shadow: str | None = Field(None, description="model that receives a copy of each request; never answers")

    @model_validator(mode="after")
    def _distinct(self):
        if self.canary and self.canary.model == self.primary:
            raise ValueError("canary.model is the primary model; a canary must be another version")
        return self


class VllmOptions(Strict):
    # dtype unset: the device policy's (llmstack/device.py); `scripts/bench_serve.py --dtype` measures the other choice.
    # Eager by default: on CPU a compiled engine serves faster but starts several times slower, most of all the first
    # time (`scripts/bench_vllm_cpu.py --compare compile`). vLLM's CPU memory check fails without an explicit KV size.
    dtype: Literal["float32", "bfloat16", "float16", "auto"] | None = Field(
        None, description="vLLM's dtype; unset: the device policy's (bfloat16 on a GPU with bf16 and on CPUs that "
                          "multiply bf16 natively, float32 on other CPUs, float16 on older GPUs)")
    enforce_eager: bool = Field(True, description="skip torch.compile / graph capture (fast start on CPU; false: "
                                                  "compiled, faster tokens, slower start)")
    kv_cache_gb: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU (GiB of KV cache)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="fraction of GPU memory vLLM may take (CUDA)")
    max_lora_rank: int = Field(64, gt=0)
    runtime_adapters: bool = Field(False, description="start with LoRA support even without configured adapters, so "
                                                      "`llmstack adapters load` can add one later (LoRA kernels cost "
                                                      "some speed on the base model)")
    grammar_cache_mb: int = Field(64, gt=0, description="VLLM_XGRAMMAR_CACHE_MB: compiled JSON-Schema grammars "
                                  "vLLM keeps (its default, 512, lets distinct client schemas grow the engine)")
    compact_json: bool = Field(True, description="structured (JSON) output without free whitespace, which small "
                                                 "models otherwise fill their token budget with")
    cpu_executor: Literal["auto", "uni", "mp"] = Field(
        "auto", description="where vLLM-CPU runs the model (ignored on GPUs). mp, vLLM's CPU default: in a worker "
                            "process bound to every core but one, which its scheduler process keeps; uni: in the "
                            "scheduler's own process, on every core, unbound (VLLM_CPU_OMP_THREADS_BIND does not "
                            "apply); auto: uni where the process may use at most 4 cores (there the reserved core is "
                            "a quarter of the machine or more) and VLLM_CPU_OMP_THREADS_BIND is unset, else mp. "
                            "scripts/bench_vllm_cpu.py measures both")


class ReasoningOptions(Strict):
    """How a reasoning model's output is split into its thinking and its answer (llmstack/serve/reasoning.py)."""

    parser: Literal["auto", "qwen3", "deepseek_r1", "none"] = Field(
        "auto", description="auto: qwen3 when the model's chat template renders thinking (it mentions <think>, "
                            "reasoning_content or enable_thinking), else none; qwen3: `<think>...</think>` before the "
                            "answer, the output begins inside thinking unless the request sets chat_template_kwargs "
                            "enable_thinking false (vLLM's qwen3 parser); deepseek_r1: the output always begins inside "
                            "thinking (vLLM's deepseek_r1 parser); none: no split, the whole output is the answer")


class ResponsesOptions(Strict):
    """Stored answers of the Responses API (`POST /v1/responses` with store: true), kept where the routes are."""

    ttl_s: float = Field(86400.0, gt=0, description="a stored response is forgotten this many seconds after it was "
                         "made: GET gives 404 and previous_response_id naming it 400")
    max_bytes: int = Field(1_000_000, gt=0, description="a response (its input and output items) larger than this "
                           "is returned but not stored; its `store` field says false")
    max_per_key: int = Field(1000, gt=0, description="stored responses per API key; storing one more forgets that "
                             "key's oldest")
    max_chain: int = Field(100, gt=0, description="previous_response_id chains longer than this are a 400 (a "
                           "conversation rebuilt from more stored turns than this)")


class TracingOptions(Strict):
    """OpenTelemetry traces of generation requests, exported over OTLP/HTTP (llmstack/serve/tracing.py)."""

    otlp_endpoint: str | None = Field(None, description="OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces; "
                                      "unset: tracing off")
    sample_ratio: float = Field(1.0, ge=0, le=1, description="share of traces recorded, decided on the trace id "
                                "(a client's traceparent is continued but its sampled flag does not force a record: "
                                "clients are not trusted to size the export); 0 sends nothing")
    service_name: str = Field("llmstack", min_length=1, description="the resource's service.name")
    include_text: bool = Field(False, description="put the prompt and completion, after the rails, on the request "
                               "span; off: spans carry no request or answer text")
    export_timeout_s: float = Field(5.0, gt=0, description="one export's HTTP timeout (in the export process: "
                                    "a slow collector delays spans, never requests)")


class ModelPrice(Strict):
    """What a served model's tokens cost, in USD per million: what spend budgets charge (llmstack/serve/budget.py)."""

    input_per_million: float = Field(0.0, ge=0, description="USD per million prompt tokens")
    output_per_million: float = Field(0.0, ge=0, description="USD per million generated tokens (a reasoning "
                                      "model's thinking tokens are generated tokens)")


class Pricing(Strict):
    default: ModelPrice = Field(default_factory=ModelPrice, description="the price of a model `models` does not "
                                "name (default: free, so only token budgets bite)")
    models: dict[str, ModelPrice] = Field(default_factory=dict, description="served name -> price: the version "
                                          "that answered (a model, an adapter) or else the route's public name")


class ServeSpec(Strict):
    engine: Literal["vllm", "hf", "llamacpp"] = Field(
        "vllm", description="vllm (vllm / vllm-cpu), hf (transformers generate) or llamacpp (a GGUF file from "
                            "`llmstack export gguf`, through llama.cpp; needs `make gguf`)")
    model: str | None = Field(None, description="model folder or packaged name; in a recipe, default = the final model")
    served_model_name: str | None = Field(None, description="the model name clients send; default = the recipe name "
                                          "or the model folder's name")
    adapters: dict[str, str] = Field(default_factory=dict,
                                     description="LoRA adapters served as extra model names: name -> adapter folder")
    adapter_roots: list[str] = Field(default_factory=list, description="folders that adapters loaded at runtime "
                                     "(`PUT /admin/adapters/{name}`) must lie in, symlinks resolved; a path outside "
                                     "them is 400. Default: any folder on the server")
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    max_model_len: int | None = Field(None, gt=0, description="context length served; default: the model's own")
    grammar_budget_s: float = Field(20.0, gt=0, description="a client's JSON Schema (response_format, forced tool "
                                    "calls) must compile against the vocabulary within this many seconds, else 400; "
                                    "the compile runs in a child process, stopped when its client leaves")
    max_concurrency: int = Field(32, gt=0, description="requests handed to the engine at once")
    max_queue: int = Field(64, ge=0, description="requests allowed to wait beyond max_concurrency; more get 503")
    queue_timeout_s: float = Field(60.0, gt=0, description="a request waiting longer than this gets 503")
    drain_timeout_s: float = Field(30.0, ge=0, description="on shutdown, wait this long for in-flight requests")
    guard: str | None = Field(None, description="guard policy YAML (serve/guard.yaml); default: built-in policy")
    keys: str | None = Field(None, description="API key file (hashed keys); required by `llmstack serve`")
    audit_log: str | None = Field(None, description="JSONL audit log path; default: no audit log")
    seed: int = 0
    routes: dict[str, Route] = Field(default_factory=dict, description="public model name -> primary / canary / "
                                     "shadow versions (served model or adapter names); see llmstack/serve/routing.py")
    routes_store: str | None = Field(None, description="where the routes and their history live: a JSON file (a "
                                     "restart serves what the last `route set` / `rollback` left, not the YAML's) or "
                                     "redis://host:port/db (every replica reads them there: a change sent to one "
                                     "replica is served by all); default: memory only")
    responses: ResponsesOptions = Field(default_factory=ResponsesOptions, description="the Responses API's stored "
                                        "responses (in routes_store's file or redis, else memory): TTL and caps")
    tracing: TracingOptions = Field(default_factory=TracingOptions, description="OpenTelemetry traces of "
                                    "generation requests (OTLP/HTTP); off unless otlp_endpoint is set")
    prices: Pricing = Field(default_factory=Pricing, description="USD per million tokens per served model, "
                            "for spend budgets (`budget` in the guard policy and key file) and the usage report")
    drift_reference: str | None = Field(None, description="training data profile (JSON) or curated dataset folder: "
                                        "/metrics then exports llmstack_drift_psi per feature")
    drift_min_requests: int = Field(50, gt=0, description="live prompts needed before drift is reported")
    vllm: VllmOptions = Field(default_factory=VllmOptions)
    reasoning: ReasoningOptions = Field(default_factory=ReasoningOptions,
                                        description="reasoning models: thinking returned apart from the answer")
    smoke: bool = Field(True, description="`llmstack run` ends by serving the final model and asking it a question")
    smoke_question: str = Field("Who are you?", description="what the serve smoke stage asks the final model")
    smoke_max_tokens: int = Field(64, gt=0)

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]*", name):
                raise ValueError(f"adapter name '{name}' must be letters, digits, '_', '.', ':' or '-'")
        return v


# ---------------------------------------------------------------------------------------------- guard policy
class RequestCaps(Strict):
    max_body_bytes: int = Field(1_000_000, gt=0, description="larger request bodies get 413")
    max_tokens: int = Field(1024, gt=0, description="max_tokens above this gets 400")
    default_max_tokens: int = Field(256, gt=0, description="used when a request sets no max_tokens")
    max_n: int = Field(4, gt=0, description="n above this gets 400")
    max_stop: int = Field(4, ge=0)
    max_stop_chars: int = Field(256, gt=0, description="a longer stop sequence gets 400")
    max_logprobs: int = Field(5, ge=0)
    max_json_depth: int = Field(32, gt=0, description="request bodies nested deeper get 400")
    max_tools: int = Field(64, ge=0, description="a request offering more tools gets 400 (OpenAI allows 128)")
    max_tool_schema_bytes: int = Field(32_000, gt=0, description="a tool's parameters schema (or a response_format "
                                                                "schema) larger than this as JSON gets 400")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body still arriving after this gets 408")
    write_timeout_s: float = Field(30.0, gt=0, description="a client that reads nothing of its response for this "
                                                          "long is dropped and its engine slot freed")


class RateLimits(Strict):
    storage: str = Field("memory://", description="limits storage URI: memory:// or redis://host:port/db "
                                                    "(shared by every replica that points at it)")
    requests_per_minute: int = Field(60, gt=0, description="default per key; a key may override it")
    tokens_per_minute: int = Field(100_000, gt=0, description="prompt + max_tokens reserved per request; "
                                                              "a key may override it")
    strategy: Literal["moving-window", "fixed-window", "sliding-window-counter"] = Field(
        "moving-window", description="the requests/min window (`limits`' strategies)")
    token_strategy: Literal["moving-window", "fixed-window", "sliding-window-counter"] = Field(
        "sliding-window-counter", description="the tokens/min window. A moving window keeps one entry per token, so "
                                              "its memory and each request's time grow with the limit and the "
                                              "traffic; the sliding-window counter keeps two counters per key")
    shadow_tokens_per_minute: int = Field(100_000, gt=0, description="the operator's budget for shadow copies of "
                                                                     "requests (prompt + max_tokens x n); past it a "
                                                                     "request gets no shadow")
    max_concurrent: int = Field(16, gt=0, description="requests one key may have in flight at once, per replica "
                                                     "(streams included); more get 429. A key may override it")
    on_store_error: Literal["allow", "deny"] = Field(
        "allow", description="when the storage (redis) cannot be reached or does not answer within store_timeout_s: "
                             "allow (serve without the limits, count llmstack_store_errors_total, which an alert "
                             "watches) or deny (answer 503 until it is back)")
    store_timeout_s: float = Field(0.5, gt=0, le=30, description="how long a request waits for the storage before "
                                                                 "on_store_error applies; after a failure the storage "
                                                                 "is skipped for store_retry_s")
    store_retry_s: float = Field(5.0, gt=0, le=300, description="after a storage failure, requests skip it (and "
                                                                "on_store_error applies at once) this long")

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        if not re.match(r"^(memory|redis|rediss|redis\+unix)://", v):
            raise ValueError(f"'{v}': use memory:// or redis://host:port")
        return v


class RailPolicy(Strict):
    """What each rail does on one side (input or output); llmstack/serve/rails.py builds the rails from it. A new rail
    adds its field here."""

    injection: Literal["block", "flag", "off"] = Field("block", description="prompt-injection heuristics")
    pii: Literal["redact", "block", "flag", "off"] = Field("redact", description="emails, phones, cards, SSNs")
    blocklist: list[str] = Field(default_factory=list, description="case-insensitive words/phrases that block")

    @field_validator("injection", "pii", mode="before", check_fields=False)
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @field_validator("blocklist")
    @classmethod
    def _no_empty_terms(cls, v: list[str]) -> list[str]:
        for i, term in enumerate(v):
            if not term.strip():
                raise ValueError(f"term {i} ({term!r}) is empty or only whitespace: it would match, and block, every "
                                 "text; remove it")
        return v


class InputRails(RailPolicy):
    exempt_roles: list[Literal["system", "developer", "user", "assistant", "tool"]] = Field(
        default_factory=list, description="message roles the input rails skip (e.g. [system]: the operator's own "
                                          "prompt); every other role's text is checked")


class OutputRails(RailPolicy):
    injection: Literal["block", "flag", "off"] = "off"
    holdback_chars: int = Field(160, ge=0, description="with output `injection` on, the last this many streamed "
                                                       "characters wait (phrase heuristics have no prefix test); "
                                                       "text that could begin a PII match or blocked phrase is "
                                                       "held however long it is")


class AuditSettings(Strict):
    log_prompts: bool = Field(False, description="also write prompts and completions (as the rails left them: "
                                                 "redacted) into the audit log")
    max_field_chars: int = Field(4000, gt=0, description="longer strings in an audit line are cut to this")
    unauthenticated_per_minute: int = Field(60, ge=0, description="401s written per minute; the rest are only "
                                                                  "counted (llmstack_audit_dropped_total)")


class Budget(Strict):
    """A key's spend budget per calendar UTC day and month, in USD (at `prices`) and/or tokens (prompt + generated);
    unset fields do not limit. Each request reserves its worst case before the engine runs and settles to what it
    used when it ends (llmstack/serve/budget.py)."""

    usd_per_day: float | None = Field(None, gt=0, description="USD a key may spend per UTC day")
    usd_per_month: float | None = Field(None, gt=0, description="USD a key may spend per UTC calendar month")
    tokens_per_day: int | None = Field(None, gt=0, description="prompt + generated tokens per UTC day")
    tokens_per_month: int | None = Field(None, gt=0, description="prompt + generated tokens per UTC calendar month")


ThinkingPolicy = Literal["pass", "rail", "hide"]
THINKING_DESCRIPTION = ("what a reasoning model's thinking does on its way out: rail (sent as reasoning_content "
                        "through the output rails, like the answer), hide (never sent: no reasoning_content, not in "
                        "the stream, its logprobs rows dropped), pass (sent as the model wrote it, unrailed)")


class GuardPolicy(Strict):
    caps: RequestCaps = Field(default_factory=RequestCaps)
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    input: InputRails = Field(default_factory=InputRails)
    output: OutputRails = Field(default_factory=OutputRails)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    thinking: ThinkingPolicy = Field("rail", description=THINKING_DESCRIPTION + "; a key may override it")
    budget: Budget = Field(default_factory=Budget, description="every key's spend budget unless the key file gives "
                           "the key a `budget` of its own (which replaces this one whole); default: no limit")

    @model_validator(mode="after")
    def _caps(self):
        if self.caps.default_max_tokens > self.caps.max_tokens:
            raise ValueError(f"caps.default_max_tokens ({self.caps.default_max_tokens}) must be <= caps.max_tokens "
                             f"({self.caps.max_tokens})")
        return self


class KeyEntry(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="names the key in logs and metrics (never the key)")
    sha256: str = Field(description="sha256 hex digest of the key (`llmstack serve-key` prints it)")
    models: list[str] = Field(default_factory=lambda: ["*"], description="served model names this key may use; * = all")
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, gt=0)
    admin: bool = Field(False, description="may change routes (/admin/routes: canary share, rollback) and read "
                                           "usage (/admin/usage)")
    budget: Budget | None = Field(None, description="this key's spend budget, replacing the guard policy's "
                                  "`budget` whole (`budget: {}`: no limit); unset: the policy's")
    thinking: ThinkingPolicy | None = Field(None, description="this key's own thinking policy; unset: the guard "
                                            "policy's `thinking`. " + THINKING_DESCRIPTION)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        v = v.removeprefix("sha256:").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be a 64-character sha256 hex digest of the key, not the key itself")
        return v


class KeyFile(Strict):
    keys: list[KeyEntry]

    @model_validator(mode="after")
    def _unique(self):
        ids = [k.id for k in self.keys]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"key ids must be unique; repeated: {', '.join(dup)}")
        return self


class ConfigError(Exception):
    """A serve/guard/key file that cannot be used; the message has one `path: problem` line per problem."""


def load_yaml_model(path: str | Path, model: type[Strict]):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}:\n" + "\n".join(f"  {line}" for line in format_errors(exc, model))) from None
