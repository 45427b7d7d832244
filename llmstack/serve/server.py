"""`llmstack serve`: load the server config, the guard policy and the key file, build the engine and run the guarded
API under uvicorn in this process. Also `llmstack serve-key`, which makes a key and prints the line for the key file.

uvicorn handles SIGTERM/SIGINT gracefully: it stops accepting connections, waits up to `drain_timeout_s` for the
requests in flight (streams included) and only then runs the app's shutdown, which stops the engine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmstack.serve.config import ConfigError, GuardPolicy, KeyFile, ServeSpec, load_yaml_model

log = logging.getLogger("llmstack.serve")


def load_spec(config: Path | None, **overrides) -> ServeSpec:
    spec = load_yaml_model(config, ServeSpec) if config else ServeSpec()
    base = config.parent if config else Path(".")
    data = spec.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    spec = ServeSpec.model_validate(data)
    if config:  # file paths inside a server YAML are relative to that YAML
        for name in ("guard", "keys", "audit_log"):
            value = getattr(spec, name)
            if value and name not in {k for k, v in overrides.items() if v is not None} \
                    and not Path(value).is_absolute():
                setattr(spec, name, str(base / value))
    return spec


def build_from_spec(spec: ServeSpec, model_path: Path | None = None):
    """(app, engine) for a spec: resolves the model, reads guard + keys. Raises ConfigError for unusable input."""
    from llmstack.models import ModelSourceError, resolve
    from llmstack.serve.api import build_app
    from llmstack.serve.engine import make_engine

    if model_path is None:
        if not spec.model:
            raise ConfigError("no model to serve: pass --model (a model folder or packaged name) or set `model:`")
        try:
            model_path = resolve(spec.model)
        except ModelSourceError as exc:
            raise ConfigError(str(exc)) from None
    for name, path in spec.adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"adapters.{name}: {path} has no adapter_config.json (not a PEFT LoRA adapter folder)")
    if not spec.keys:
        raise ConfigError("no API keys: pass --keys serve/keys.yaml (make a key with `llmstack serve-key NAME`)")
    keys = load_yaml_model(spec.keys, KeyFile)
    policy = load_yaml_model(spec.guard, GuardPolicy) if spec.guard else GuardPolicy()
    name = spec.served_model_name or Path(model_path).name
    engine = make_engine(spec, model_path, name)
    return build_app(engine, spec, policy, keys), engine


def serve(
    config: Annotated[Optional[Path], typer.Option(help="server YAML, e.g. serve/server.yaml")] = None,
    model: Annotated[Optional[str], typer.Option(help="model folder or packaged name (overrides the YAML)")] = None,
    engine: Annotated[Optional[str], typer.Option(help="vllm or hf")] = None,
    name: Annotated[Optional[str], typer.Option(help="the model name clients send")] = None,
    keys: Annotated[Optional[str], typer.Option(help="API key file (hashed keys)")] = None,
    guard: Annotated[Optional[str], typer.Option(help="guard policy YAML")] = None,
    audit_log: Annotated[Optional[str], typer.Option(help="JSONL audit log")] = None,
    host: Annotated[Optional[str], typer.Option()] = None,
    port: Annotated[Optional[int], typer.Option()] = None,
    max_model_len: Annotated[Optional[int], typer.Option()] = None,
):
    """Serve a model behind the guarded OpenAI-compatible API (vLLM engine by default)."""
    import uvicorn
    from pydantic import ValidationError
    from rich.console import Console

    from llmstack.schema import format_errors

    console = Console(stderr=True)
    try:
        spec = load_spec(config, model=model, engine=engine, served_model_name=name, keys=keys, guard=guard,
                         audit_log=audit_log, host=host, port=port, max_model_len=max_model_len)
        app, _ = build_from_spec(spec)
    except ConfigError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2)
    except ValidationError as exc:
        for line in format_errors(exc, ServeSpec):
            console.print(f"[bold red]error:[/] {line}")
        raise typer.Exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(app, host=spec.host, port=spec.port, log_level="info",
                timeout_graceful_shutdown=int(spec.drain_timeout_s) or None)


def serve_key(
    key_id: Annotated[str, typer.Argument(help="a name for the key (shows in logs and metrics)")],
    models: Annotated[str, typer.Option(help="comma-separated model names this key may use, * for all")] = "*",
    rpm: Annotated[Optional[int], typer.Option(help="requests per minute for this key")] = None,
    tpm: Annotated[Optional[int], typer.Option(help="tokens per minute for this key")] = None,
):
    """Make a new API key: prints the key once (give it to the client) and the hashed entry for the key file."""
    import yaml

    from llmstack.serve.config import KeyEntry
    from llmstack.serve.guard import hash_key, new_key

    key = new_key()
    entry = KeyEntry(id=key_id, sha256=hash_key(key), models=[m.strip() for m in models.split(",") if m.strip()],
                     requests_per_minute=rpm, tokens_per_minute=tpm)
    typer.echo(f"# key for '{key_id}' (shown once; the file stores only its hash):\n# {key}\n"
               "# append the entry below under `keys:` in your key file (serve/keys.yaml)")
    typer.echo(yaml.safe_dump([entry.model_dump(exclude_none=True)], sort_keys=False).rstrip())
