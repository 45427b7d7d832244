"""From a server YAML to a running app: load the server config, the guard policy and the key file, and build the
engine and the guarded API (`llmstack serve` runs the result under uvicorn)."""

from __future__ import annotations

import logging
from pathlib import Path

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llmstack.config.serve import ConfigError, GuardPolicy, KeyFile, ServeSpec, load_yaml_model
from llmstack.serve.guard import hash_key

log = logging.getLogger("llmstack.serve")


def load_spec(config: Path | None, **overrides) -> ServeSpec:
    spec = load_yaml_model(config, ServeSpec) if config else ServeSpec()
    base = config.parent if config else Path(".")
    data = spec.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    spec = ServeSpec.model_validate(data)
    if config:  # file paths inside a server YAML are relative to that YAML
        for name in ("guard", "keys", "audit_log", "routes_store"):
            value = getattr(spec, name)
            if value and name not in {k for k, v in overrides.items() if v is not None} \
                    and not Path(value).is_absolute() and "://" not in value:
                setattr(spec, name, str(base / value))
    return spec


def build_from_spec(spec: ServeSpec, model_path: Path | None = None, engine=None):
    """(app, engine) for a spec: resolves the model, reads guard + keys. Raises ConfigError for unusable input.
    `engine`: one already built, in place of the spec's (scripts/bench_serve.py serves a fixed-cost stand-in)."""
    from llmstack.models import ModelSourceError, resolve
    from llmstack.serve.app import build_app
    from llmstack.serve.engines import make_engine

    if model_path is None:
        if not spec.model:
            raise ConfigError("no model to serve: pass --model (a model folder or packaged name) or set `model:`")
        if spec.engine == "llamacpp":  # a .gguf file (or an export folder holding one), not an HF model to resolve
            from llmstack.serve.engines.llamacpp import gguf_file

            try:
                model_path = gguf_file(spec.model)
            except ValueError as exc:
                raise ConfigError(f"model: {exc}") from None
        else:
            try:
                model_path = resolve(spec.model)
            except ModelSourceError as exc:
                raise ConfigError(str(exc)) from None
    if spec.engine == "llamacpp" and spec.adapters:
        raise ConfigError("adapters: the llamacpp engine serves one GGUF file; merge the adapter (lora.merge: true) "
                          "and export that, or serve adapters with engine vllm or hf")
    for name, path in spec.adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"adapters.{name}: {path} has no adapter_config.json (not a PEFT LoRA adapter folder)")
    if not spec.keys:
        raise ConfigError("no API keys: pass --keys serve/keys.yaml (make a key with `llmstack serve-key NAME`)")
    keys = load_yaml_model(spec.keys, KeyFile)
    check_example_key(keys, spec.host)
    policy = load_yaml_model(spec.guard, GuardPolicy) if spec.guard else GuardPolicy()
    name = spec.served_model_name or (Path(model_path).stem if spec.engine == "llamacpp" else Path(model_path).name)
    engine = engine or make_engine(spec, model_path, name)
    return build_app(engine, spec, policy, keys), engine


EXAMPLE_KEY = "sk-llmstack-example-do-not-use"  # published in serve/keys.example.yaml: anyone can read it
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def check_example_key(keys: KeyFile, host: str) -> None:
    """The shipped example key is public: serving it on anything but loopback would open the API to everyone."""
    published = hash_key(EXAMPLE_KEY)
    if host not in LOOPBACK and any(k.sha256 == published for k in keys.keys):
        raise ConfigError(f"the key file holds the published example key ({EXAMPLE_KEY}) and the server would listen "
                          f"on {host}: anyone could use it. Make your own key (`llmstack serve-key NAME`) and remove "
                          "the example entry, or bind to 127.0.0.1")


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol on httptools (llhttp: the C parser, which costs a fraction of h11's pure-Python
    framing per streamed chunk) with the limits uvicorn leaves out:

    - a deadline on request headers: uvicorn times out idle keep-alive connections but not a client that sends its
      headers a byte at a time (slowloris), which would hold a connection forever. The request line and headers must
      be complete within `header_timeout` of the connection opening (or of the previous response, on a kept-alive
      connection);
    - at most `max_header_bytes` of request line and headers, or a 400 and the connection closes. Counted twice over:
      the URL and each header as the parser hands them over (exact), and every read that ends with the headers still
      incomplete (httptools keeps a header's partial name or value in memory until it ends, however long: this stops
      one that never ends, holding at most one read past the cap). Bodies have their own cap and deadline
      (caps.max_body_bytes, caps.body_timeout_s)."""

    header_timeout = 10.0
    max_header_bytes = 64 * 1024

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_bytes = 0  # of the current request's URL and headers, as parsed
        self._unparsed_reads: int | None = 0  # bytes of reads its headers did not end in; None once they ended
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        in_headers = self._unparsed_reads is not None
        super().data_received(data)
        if in_headers and self._unparsed_reads is not None and not self.transport.is_closing():
            self._unparsed_reads += len(data)
            if self._unparsed_reads > self.max_header_bytes:
                self.send_400_response(f"Request headers longer than {self.max_header_bytes} bytes.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._unparsed_reads is None:  # a next request on the connection (pipelined or kept alive)
            self._unparsed_reads = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.max_header_bytes:  # the parser stops; uvicorn answers 400 and closes
            raise ValueError("request headers too long")

    def on_headers_complete(self) -> None:
        self._unparsed_reads = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def connection_lost(self, exc) -> None:
        self._header_deadline.cancel()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        in_request = self.cycle is not None and not self.cycle.response_complete
        if not in_request and not self.transport.is_closing():
            self.transport.close()


def run_server(app, spec: ServeSpec) -> None:
    """uvicorn with the guard's transport settings: the header deadline above, a 5 s keep-alive, 64 KiB of headers at
    most, and graceful drain on SIGTERM/SIGINT (stop accepting, wait up to drain_timeout_s for requests in flight,
    streams included, then stop the engine)."""
    import uvicorn

    uvicorn.run(app, host=spec.host, port=spec.port, log_level="info", http=GuardedHttpProtocol,
                timeout_keep_alive=5, timeout_graceful_shutdown=int(spec.drain_timeout_s) or None)
