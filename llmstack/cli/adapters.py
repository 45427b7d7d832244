"""`llmstack adapters …`: add or remove a LoRA adapter on a running server, as a served model name, without a
restart (needs an admin key; the server records each change in its audit log with the key's id).

    llmstack adapters list
    llmstack adapters load support-v2 runs/support/20261201-0930/sft/model # a folder on the server's machine
    llmstack adapters load support-v2 support@prod                         # a registry ref (name, name:3, name@alias)
    llmstack adapters unload support-v2
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmstack.cli.common import Base, KeyEnv, admin_call, fail

adapters_app = typer.Typer(no_args_is_help=True, help="LoRA adapters of a running server, loaded at runtime "
                                                      "(admin key).")


def adapter_folder(source: str, registry: str | None) -> str:
    """A local adapter folder as given, else a registry ref resolved to the folder its version points at."""
    folder = Path(source).expanduser()
    if not folder.exists():
        from llmstack.registry import Registry, RegistryError

        try:
            entry = Registry.open(registry).get(source)
        except RegistryError as exc:
            fail(f"{source} is neither a folder nor a model in the registry: {exc}", code=2)
        folder = Path(entry.get("adapter_path") or entry["model_path"])
    if not (folder / "adapter_config.json").is_file():
        fail(f"{folder} is not a LoRA adapter folder (no adapter_config.json); a merged model is served as a model of "
             "its own (`llmstack serve`), not loaded as an adapter", code=2)
    return str(folder.resolve())


@adapters_app.command("list")
def list_(api_base: Base = "http://127.0.0.1:8000", api_key_env: KeyEnv = "LLMSTACK_ADMIN_KEY"):
    """Print the base model and the adapters it serves."""
    print(json.dumps(admin_call("GET", f"{api_base}/admin/adapters", api_key_env), indent=2))


@adapters_app.command()
def load(name: Annotated[str, typer.Argument(help="the model name clients will ask for")],
         source: Annotated[str, typer.Argument(help="adapter folder, or a registry ref (name, name:3, name@alias)")],
         registry: Annotated[str | None, typer.Option(help="registry (file or mlflow://); default "
                                                              "$LLMSTACK_REGISTRY")] = None,
         api_base: Base = "http://127.0.0.1:8000", api_key_env: KeyEnv = "LLMSTACK_ADMIN_KEY"):
    """Serve an adapter as NAME from now on. The folder must be readable by the server (same machine or shared
    storage)."""
    body = {"path": adapter_folder(source, registry)}
    print(json.dumps(admin_call("PUT", f"{api_base}/admin/adapters/{name}", api_key_env, body), indent=2))


@adapters_app.command()
def unload(name: Annotated[str, typer.Argument(help="the adapter's served name")],
           api_base: Base = "http://127.0.0.1:8000", api_key_env: KeyEnv = "LLMSTACK_ADMIN_KEY"):
    """Stop serving an adapter (refused while a route still sends traffic to it)."""
    print(json.dumps(admin_call("DELETE", f"{api_base}/admin/adapters/{name}", api_key_env), indent=2))
