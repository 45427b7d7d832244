"""The registry kept in an MLflow tracking/registry server (`--store mlflow://HOST:PORT`), through MLflow's own client.

What lands where, so the MLflow UI shows it without llmstack:
  - register: one MLflow run per registration in the experiment `llmstack/<name>`, holding the run's manifest.json, its
    model card (MODEL_CARD.md) and data cards as artifacts (under `llmstack/`) and its eval scores as metrics
    (`eval.<task>`); then a model version whose source is that artifact folder (`runs:/<run id>/llmstack`) and whose
    tags carry the version record (stage, model_path, hashes, eval_status, …; dicts as JSON). The weights stay where
    the run wrote them (`model_path`): llmstack registers them, it does not upload gigabytes.
  - aliases: MLflow's registered-model aliases, so `models:/<name>@prod` resolves in any MLflow tool.
  - alias history: MLflow keeps none (setting an alias forgets the old holder), and rollback needs it. It is a
    registered-model tag per alias, `llmstack.alias_history.<alias>` (a JSON list, newest last): the history belongs to
    the model's alias, not to any one version, and one tag write keeps each promotion a single update.
MLflow has no transactions across calls: two people promoting the same alias at once end with the last writer's
choice, as with MLflow's own alias API. The file store is the one with a lock.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from llmstack.registry.base import MLFLOW_SCHEMES, RegistryError

# The client retries a failing request for minutes by default (it is built to ride out rate limiting); a registry
# command against a server that is down should say so in seconds. Either stays the user's to set.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
# The CLI's stdout is its answer (`registry show` prints JSON); MLflow would print a run URL into it.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

ARTIFACTS = "llmstack"
TAG = "llmstack."
HISTORY_TAG = "llmstack.alias_history."
MARK_TAG = "llmstack.registry"  # on the registered models llmstack keeps; a team's server holds other models too


def tracking_uri(where: str) -> str:
    """mlflow://HOST:PORT -> http://HOST:PORT; mlflow+https://HOST -> https://HOST."""
    scheme = "https://" if where.startswith(MLFLOW_SCHEMES[1]) else "http://"
    rest = where.split("://", 1)[1]
    if not rest.strip("/"):
        raise RegistryError(f"'{where}': say where the MLflow server is, e.g. mlflow://127.0.0.1:5000")
    return scheme + rest


class MlflowStore:
    def __init__(self, where: str):
        self.uri = tracking_uri(where)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def __str__(self) -> str:
        return f"MLflow at {self.uri}"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except MlflowException as exc:
            # the client wraps a refused connection in a page-long message; its cause is what a user needs
            if isinstance(exc.__context__, requests.exceptions.ConnectionError):
                raise RegistryError(f"{self}: cannot connect (is the server running? `make mlflow-server` starts "
                                    f"one on 127.0.0.1:5000)") from exc
            raise RegistryError(f"{self}: {exc.message.splitlines()[0]}") from exc

    # ------------------------------------------------------------------------------------------------ reading
    def models(self) -> dict[str, Any]:
        out, token = {}, None
        with self._errors():
            while True:
                page = self.client.search_registered_models(f"tags.`{MARK_TAG}` = 'true'", page_token=token)
                out.update({m.name: self._entry(m) for m in page})
                token = page.token
                if not token:
                    return out

    def entry(self, name: str) -> dict[str, Any] | None:
        with self._errors():
            try:
                model = self.client.get_registered_model(name)
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise
            return self._entry(model)

    def _entry(self, model) -> dict[str, Any]:
        versions = self.client.search_model_versions(f"name = '{model.name}'")
        return {
            "versions": sorted((_record(v) for v in versions), key=lambda r: r["version"]),
            "aliases": {alias: int(v) for alias, v in model.aliases.items()},
            "history": {k[len(HISTORY_TAG):]: json.loads(v) for k, v in model.tags.items()
                        if k.startswith(HISTORY_TAG)},
        }

    # ------------------------------------------------------------------------------------------------ writing
    def add_version(self, name: str, record: dict[str, Any]) -> int:
        run_dir = Path(record["run_dir"])
        with self._errors():
            experiment = self.client.get_experiment_by_name(f"llmstack/{name}")
            experiment_id = (experiment.experiment_id if experiment
                             else self.client.create_experiment(f"llmstack/{name}"))
            run_id = self.client.create_run(experiment_id, run_name=f"{run_dir.parent.name}/{run_dir.name}").info.run_id
            self.client.log_artifact(run_id, record["manifest"], ARTIFACTS)
            if record.get("model_card"):
                self.client.log_artifact(run_id, record["model_card"], ARTIFACTS)
            cards = run_dir / "curate" / "cards"
            if cards.is_dir():
                self.client.log_artifacts(run_id, str(cards), f"{ARTIFACTS}/data_cards")
            scores = {k: v for k, v in (record["eval"] or {}).items() if isinstance(v, (int, float))}
            if scores:
                self.client.log_batch(run_id, metrics=[Metric(f"eval.{k}", float(v), 0, 0) for k, v in scores.items()])
            self.client.set_terminated(run_id)
            try:
                self.client.create_registered_model(name, tags={MARK_TAG: "true"})
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                self.client.set_registered_model_tag(name, MARK_TAG, "true")
            tags = {TAG + k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items() if v is not None}
            version = self.client.create_model_version(name, f"runs:/{run_id}/{ARTIFACTS}", run_id=run_id, tags=tags,
                                                       await_creation_for=0)
        return int(version.version)

    @contextmanager
    def edit(self, name: str) -> Iterator[dict[str, Any] | None]:
        entry = self.entry(name)
        before = copy.deepcopy(entry)
        yield entry
        if entry is None:
            return
        with self._errors():
            # aliases first: if MLflow refuses one (e.g. 'latest' is reserved), no history is written for it
            for alias in before["aliases"].keys() - entry["aliases"].keys():
                self.client.delete_registered_model_alias(name, alias)
            for alias, version in entry["aliases"].items():
                if before["aliases"].get(alias) != version:
                    self.client.set_registered_model_alias(name, alias, str(version))
            for alias, history in entry["history"].items():
                if before["history"].get(alias) != history:
                    self.client.set_registered_model_tag(name, HISTORY_TAG + alias, json.dumps(history))


def _record(version) -> dict[str, Any]:
    """The version record back from its tags (only dicts and lists were stored as JSON), plus where MLflow keeps it.
    A version someone registered without llmstack has no record: its eval status is unknown, so gates refuse it."""
    record = {k[len(TAG):]: json.loads(v) if v[:1] in "{[" else v for k, v in version.tags.items() if k.startswith(TAG)}
    return {"stage": "", "run_dir": "", "eval": None, "eval_status": "unknown", **record,
            "version": int(version.version), "source": version.source, "mlflow_run_id": version.run_id}
