"""`llmstack serve`: the guarded OpenAI-compatible API under uvicorn in this process; `llmstack serve-key`: make a key
and print the line for the key file.

uvicorn handles SIGTERM/SIGINT gracefully: it stops accepting connections, waits up to `drain_timeout_s` for the
requests in flight (streams included) and only then runs the app's shutdown, which stops the engine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from llmstack.cli.common import console, fail
from llmstack.config.serve import ConfigError, ServeSpec


def serve(
    config: Annotated[Path | None, typer.Option(help="server YAML, e.g. serve/server.yaml")] = None,
    model: Annotated[str | None, typer.Option(help="model folder or packaged name (overrides the YAML)")] = None,
    engine: Annotated[str | None, typer.Option(help="vllm, hf or llamacpp (a GGUF file)")] = None,
    name: Annotated[str | None, typer.Option(help="the model name clients send")] = None,
    keys: Annotated[str | None, typer.Option(help="API key file (hashed keys)")] = None,
    guard: Annotated[str | None, typer.Option(help="guard policy YAML")] = None,
    audit_log: Annotated[str | None, typer.Option(help="JSONL audit log")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    max_model_len: Annotated[int | None, typer.Option()] = None,
):
    """Serve a model behind the guarded OpenAI-compatible API (vLLM engine by default)."""
    from pydantic import ValidationError

    from llmstack.config.base import format_errors
    from llmstack.serve.server import build_from_spec, load_spec, run_server

    try:
        spec = load_spec(config, model=model, engine=engine, served_model_name=name, keys=keys, guard=guard,
                         audit_log=audit_log, host=host, port=port, max_model_len=max_model_len)
        app, _ = build_from_spec(spec)
    except ConfigError as exc:
        fail(exc, code=2)
    except ValidationError as exc:
        for line in format_errors(exc, ServeSpec):
            console.print(f"[bold red]error:[/] {line}")
        raise typer.Exit(2) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_server(app, spec)


def serve_key(
    key_id: Annotated[str, typer.Argument(help="a name for the key (shows in logs and metrics)")],
    models: Annotated[str, typer.Option(help="comma-separated model names this key may use, * for all")] = "*",
    rpm: Annotated[int | None, typer.Option(help="requests per minute for this key")] = None,
    tpm: Annotated[int | None, typer.Option(help="tokens per minute for this key")] = None,
):
    """Make a new API key: prints the key once (give it to the client) and the hashed entry for the key file."""
    import yaml

    from llmstack.config.serve import KeyEntry
    from llmstack.serve.guard import hash_key, new_key

    key = new_key()
    entry = KeyEntry(id=key_id, sha256=hash_key(key), models=[m.strip() for m in models.split(",") if m.strip()],
                     requests_per_minute=rpm, tokens_per_minute=tpm)
    typer.echo(f"# key for '{key_id}' (shown once; the file stores only its hash):\n# {key}\n"
               "# append the entry below under `keys:` in your key file (serve/keys.yaml)")
    typer.echo(yaml.safe_dump([entry.model_dump(exclude_none=True)], sort_keys=False).rstrip())
