"""`llmstack registry …`: list, register, show, promote and roll back model versions (llmstack/registry/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmstack.cli.common import fail
from llmstack.registry import Registry, RegistryError

registry_app = typer.Typer(no_args_is_help=True, help="Model registry: versions and aliases (prod, canary).")
StoreOpt = Annotated[str | None, typer.Option(
    "--store", help="a registry file, or an MLflow server as mlflow://HOST:PORT (mlflow+https://HOST for TLS); "
                    "default $LLMSTACK_REGISTRY, else ~/.cache/llmstack/registry/registry.json")]
@registry_app.command("list")
def list_(store: StoreOpt = None):
    """Every model, its versions, where each points, and which aliases it holds."""
    table = Table()
    for col in ("model", "version", "aliases", "stage", "eval", "run"):
        table.add_column(col)
    try:
        models = Registry.open(store).models()
    except RegistryError as exc:
        fail(exc)
    for name, entry in models.items():
        holders = {}
        for alias, v in entry["aliases"].items():
            holders.setdefault(v, []).append(alias)
        for v in entry["versions"]:
            scores = ", ".join(f"{k} {s:.3f}" for k, s in (v.get("eval") or {}).items() if s is not None)
            table.add_row(name, str(v["version"]), ",".join(holders.get(v["version"], [])), v["stage"],
                          scores or v["eval_status"], v["run_dir"])
    Console().print(table)


@registry_app.command()
def register(run_dir: Annotated[Path, typer.Argument(help="a run folder, e.g. runs/quickstart/default")],
             name: Annotated[str | None, typer.Option(help="model name (default: the recipe's name)")] = None,
             stage: Annotated[str | None, typer.Option(help="stage whose model to register (default: last)")] = None,
             store: StoreOpt = None):
    """Register a run's model as the next version of a named model."""
    try:
        v = Registry.open(store).register(run_dir, name=name, stage=stage)
    except RegistryError as exc:
        fail(exc)
    print(f"{v['name']}:{v['version']}  ({v['stage']} of {v['run_dir']})")


@registry_app.command()
def show(ref: Annotated[str, typer.Argument(help="name, name:VERSION or name@ALIAS")], store: StoreOpt = None):
    """Everything recorded for one version, as JSON."""
    try:
        print(json.dumps(Registry.open(store).get(ref), indent=2))
    except RegistryError as exc:
        fail(exc)


@registry_app.command()
def promote(ref: Annotated[str, typer.Argument(help="name:VERSION (or name@ALIAS) to promote")],
            alias: Annotated[str, typer.Option(help="alias to point at it")] = "prod",
            require_gates: Annotated[bool, typer.Option(help="refuse unless the run passed its eval gates")] = False,
            store: StoreOpt = None):
    """Point an alias (prod, canary, …) at a version."""
    try:
        v = Registry.open(store).promote(ref, alias, require_gates=require_gates)
    except RegistryError as exc:
        fail(exc)
    print(f"{v['name']}@{alias} -> version {v['version']}")


@registry_app.command()
def rollback(name: Annotated[str, typer.Argument(help="model name")],
             alias: Annotated[str, typer.Option(help="alias to move back")] = "prod", store: StoreOpt = None):
    """Move an alias back to the version it held before its last promotion."""
    try:
        v = Registry.open(store).rollback(name, alias)
    except RegistryError as exc:
        fail(exc)
    print(f"{name}@{alias} -> version {v['version']}" if v["version"] else f"{name}@{alias} removed")
