"""The model registry: named models, numbered versions, and movable aliases (`prod`, `canary`).

Each version points at a run's manifest — so its data card, eval scores, quantization and hashes stay one click away —
and at the model folder of the stage it was registered from, and carries the run's model card (MODEL_CARD.md, built from
the run folder when its report has not written one). Aliases move by promotion; every move is kept in the
alias's history, so `rollback` puts the previous holder back in one command.

Two stores keep the same entries, chosen by where the registry lives (`--store` or $LLMSTACK_REGISTRY):
  - a JSON file (the embedded default, ~/.cache/llmstack/registry/registry.json), written atomically under a file
    lock so two `llmstack registry` commands cannot lose each other's writes;
  - an MLflow tracking/registry server (`mlflow://HOST:PORT`, llmstack/registry/mlflow_store.py), for teams.
The rules — what a version records, which version may be promoted, how rollback works — live here, once. A store only
keeps, per model, {"versions": [record, ...], "aliases": {alias: version}, "history": {alias: [{version, until}]}}:
`entry(name)` reads one, `add_version` appends a record, and `edit(name)` yields an entry whose alias changes it saves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock

from llmstack.registry.base import MLFLOW_SCHEMES, RegistryError
from llmstack.registry.card import CARD_FILE, write_run_card
from llmstack.runs import now, sha256_file


class Store(Protocol):
    def models(self) -> dict[str, Any]: ...
    def entry(self, name: str) -> dict[str, Any] | None: ...
    def add_version(self, name: str, record: dict[str, Any]) -> int: ...
    def edit(self, name: str) -> Any: ...  # a context manager yielding the entry (None: no such model)


def default_path() -> Path:
    from llmstack.paths import cache_root

    return cache_root() / "registry" / "registry.json"


@dataclass
class Registry:
    store: Store

    @classmethod
    def open(cls, where: str | Path | None = None) -> Registry:
        """`where`: a JSON file path or mlflow://HOST:PORT (default: $LLMSTACK_REGISTRY, else the file in the cache)."""
        where = str(where or os.environ.get("LLMSTACK_REGISTRY") or default_path())
        if where.startswith(MLFLOW_SCHEMES):
            from llmstack.registry.mlflow_store import (
                MlflowStore,  # mlflow's client is imported only by those who use it
            )

            return cls(MlflowStore(where))
        return cls(FileStore.open(where))

    # ------------------------------------------------------------------------------------------------ reading
    def models(self) -> dict[str, Any]:
        return self.store.models()

    def get(self, ref: str) -> dict[str, Any]:
        """A version by `name`, `name:3` or `name@prod` (plain `name` = its latest version)."""
        name, version = _parse_ref(ref)
        entry = self.store.entry(name)
        if entry is None:
            raise RegistryError(f"no model named '{name}' in the registry ({self.store})")
        if isinstance(version, str):
            if version not in entry["aliases"]:
                known = ", ".join(entry["aliases"]) or "none"
                raise RegistryError(f"{name} has no alias '{version}' (aliases: {known})")
            version = entry["aliases"][version]
        version = version or entry["versions"][-1]["version"]
        for v in entry["versions"]:
            if v["version"] == version:
                return {"name": name, **v, "aliases": [a for a, n in entry["aliases"].items() if n == version]}
        raise RegistryError(f"{name} has no version {version}")

    # ------------------------------------------------------------------------------------------------ writing
    def register(self, run_dir: str | Path, name: str | None = None, stage: str | None = None) -> dict[str, Any]:
        """Add a run's model as the next version of `name` (default: the recipe's name)."""
        run_dir = Path(run_dir).resolve()
        manifest_path = run_dir / "manifest.json"
        if not manifest_path.exists():
            raise RegistryError(f"{run_dir} has no manifest.json: register a run folder (runs/<recipe>/<run-id>)")
        manifest = json.loads(manifest_path.read_text())
        stages = manifest["stages"]
        producers = [s for s, e in stages.items() if e.get("status") == "done" and (e.get("result") or {}).get("model")]
        if not producers:
            raise RegistryError(f"{run_dir}: no finished stage produced a model")
        stage = stage or producers[-1]
        if stage not in producers:
            raise RegistryError(f"stage '{stage}' produced no model in this run (choose from {', '.join(producers)})")
        eval_entry = stages.get("eval", {})
        record = {
            "run_dir": str(run_dir), "manifest": str(manifest_path), "manifest_sha256": sha256_file(manifest_path),
            "stage": stage, "model_path": stages[stage]["result"]["model"],
            "model_sha256": stages[stage].get("outputs", {}).get("model", {}).get("sha256"),
            "recipe_sha256": manifest.get("recipe", {}).get("sha256"), "git_sha": manifest.get("git_sha"),
            "eval": (eval_entry.get("metrics") or {}).get(_eval_key(stage)),
            "eval_status": eval_entry.get("status", "not run"),
            "quantization": {s: e.get("metrics", {}).get("serve") for s, e in stages.items() if s in ("int4", "int8")},
            "registered": now(),
        }
        card = run_dir / CARD_FILE
        if not card.exists():  # a run from before model cards, or one whose report stage has not run
            write_run_card(run_dir)
        record.update(model_card=str(card), model_card_sha256=sha256_file(card))
        name = name or Path(manifest.get("recipe", {}).get("path", run_dir.parent.name)).stem
        version = self.store.add_version(name, record)
        return self.get(f"{name}:{version}")

    def promote(self, ref: str, alias: str, require_gates: bool = False) -> dict[str, Any]:
        """Point `alias` at a version. With require_gates, the version's run must have passed its eval gates."""
        target = self.get(ref)
        if require_gates and target["eval_status"] != "done":
            raise RegistryError(
                f"{target['name']}:{target['version']} cannot become '{alias}': its run's eval "
                f"{'failed its gates' if target['eval_status'] == 'failed' else 'has not run'} "
                f"(status: {target['eval_status']})")
        with self.store.edit(target["name"]) as entry:
            previous = entry["aliases"].get(alias)
            if previous == target["version"]:
                return target
            entry["history"].setdefault(alias, []).append({"version": previous, "until": now()})
            entry["aliases"][alias] = target["version"]
        return self.get(f"{target['name']}@{alias}")

    def rollback(self, name: str, alias: str) -> dict[str, Any]:
        """Move `alias` back to the version it pointed at before its last promotion."""
        with self.store.edit(name) as entry:
            if entry is None or not entry["history"].get(alias):
                raise RegistryError(f"nothing to roll back: {name}@{alias} has no earlier version")
            prev = entry["history"][alias].pop()["version"]
            if prev is None:
                entry["aliases"].pop(alias, None)
            else:
                entry["aliases"][alias] = prev
        return self.get(f"{name}@{alias}") if prev is not None else {"name": name, "version": None}


@dataclass
class FileStore:
    """The embedded store: every model in one JSON file."""

    path: Path

    @classmethod
    def open(cls, path: str | Path) -> FileStore:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        return cls(p)

    def __str__(self) -> str:
        return str(self.path)

    def _read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.exists() else {"models": {}}

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        with FileLock(str(self.path) + ".lock", timeout=30):
            data = self._read()
            yield data
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2))
            tmp.replace(self.path)

    def models(self) -> dict[str, Any]:
        return self._read()["models"]

    def entry(self, name: str) -> dict[str, Any] | None:
        return self.models().get(name)

    def add_version(self, name: str, record: dict[str, Any]) -> int:
        with self._locked() as data:
            entry = data["models"].setdefault(name, {"versions": [], "aliases": {}, "history": {}})
            version = (entry["versions"][-1]["version"] + 1) if entry["versions"] else 1
            entry["versions"].append({**record, "version": version})
        return version

    @contextmanager
    def edit(self, name: str) -> Iterator[dict[str, Any] | None]:
        with self._locked() as data:
            yield data["models"].get(name)


def _eval_key(stage: str) -> str:
    return "base" if stage == "model" else stage


def _parse_ref(ref: str) -> tuple[str, int | str | None]:
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias
    if ":" in ref:
        name, version = ref.split(":", 1)
        if not version.isdigit():
            raise RegistryError(f"'{ref}': a version is a number (name:3), an alias uses @ (name@prod)")
        return name, int(version)
    return ref, None
