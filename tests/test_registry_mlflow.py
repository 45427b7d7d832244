"""The registry in a real MLflow server (started here on 127.0.0.1 from .venv-mlflow, sqlite in tmp): register, gate-
checked promotion, aliases and rollback through the CLI, each checked against what the MLflow server itself reports."""

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from llmstack.cli import app
from llmstack.config.recipe import load_recipe
from llmstack.pipeline import run_recipe
from llmstack.registry import Registry, RegistryError
from llmstack.testing import stop_process_group

REPO = Path(__file__).resolve().parent.parent
MLFLOW = REPO / ".venv-mlflow" / "bin" / "mlflow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Starts the server; `store` waits for it, so the runs below are built while it migrates its database."""
    if not MLFLOW.exists():
        pytest.skip(f"no MLflow server environment at {MLFLOW.parent.parent}: `make test` builds it")
    d = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(d / "server.log", "w")
    # the GenAI job runner would add seven worker processes that a model registry never uses
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d}/mlflow.db", "--artifacts-destination", str(d / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    yield SimpleNamespace(proc=proc, port=port, log=d / "server.log")
    stop_process_group(proc, timeout=20)  # its own session: the uvicorn worker goes with it
    log.close()


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Two real runs (curate with a data card, eval on the tiny model): one passes its gate, one fails it."""
    d = tmp_path_factory.mktemp("runs")
    rows = d / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Question {i} about item {i * 7}?",
                                        "output": f"Answer {i}: a short prose reply about item {i}."}) + "\n"
                            for i in range(6)))
    out = {}
    for label, gate in (("pass", 0.0), ("fail", 0.5)):
        path = d / f"{label}.yaml"
        path.write_text(yaml.safe_dump({
            "name": "tiny", "seed": 1, "model": {"source": str(tiny_model)},
            "data": {"cards_dir": str(d / "cards"),  # not the repo's data_cards/
                     "datasets": {"sft": {"schema": "messages", "sources": [{"name": "rows", "path": str(rows)}]}}},
            "eval": {"suite": "smoke", "limit": 1, "tasks": ["identity"], "gates": {"min": {"identity": gate}}}}))
        try:
            run_recipe(load_recipe(path), path, d / "runs", run_id=label)
        except Exception as exc:  # the failing gate stops the pipeline; the manifest records it
            assert label == "fail" and "below the gate" in str(exc)
        out[label] = d / "runs" / "tiny" / label
    return out


@pytest.fixture(scope="module")
def store(server, runs):
    deadline = time.monotonic() + 150
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=2)
            return f"mlflow://127.0.0.1:{server.port}"
        except OSError:
            if server.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the MLflow server did not come up:\n" + server.log.read_text()[-3000:])
            time.sleep(0.5)


@pytest.fixture(scope="module")
def mlflow_client(store):
    from mlflow import MlflowClient

    uri = store.replace("mlflow://", "http://")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def cli(store, *args):
    res = CliRunner().invoke(app, ["registry", *args, "--store", store])
    assert "Traceback" not in res.output
    return SimpleNamespace(code=res.exit_code, out=res.stdout, err=" ".join(res.stderr.split()))


def test_register_gates_aliases_rollback_as_mlflow_sees_them(store, runs, mlflow_client, tmp_path):
    assert cli(store, "register", str(runs["pass"]), "--name", "tiny").out.startswith("tiny:1 ")
    assert cli(store, "register", str(runs["fail"]), "--name", "tiny").out.startswith("tiny:2 ")

    # the version points at an MLflow run that holds the manifest and the data card, byte for byte
    v1 = mlflow_client.get_model_version("tiny", "1")
    assert v1.source == f"runs:/{v1.run_id}/llmstack"
    fetched = Path(mlflow_client.download_artifacts(v1.run_id, "llmstack", str(tmp_path)))
    assert (fetched / "manifest.json").read_bytes() == (runs["pass"] / "manifest.json").read_bytes()
    assert (fetched / "data_cards" / "sft.json").read_bytes() == \
        (runs["pass"] / "curate" / "cards" / "sft.json").read_bytes()
    manifest = json.loads((runs["pass"] / "manifest.json").read_text())
    scores = manifest["stages"]["eval"]["metrics"]["base"]
    assert mlflow_client.get_run(v1.run_id).data.metrics == {f"eval.{k}": v for k, v in scores.items()}
    assert json.loads(v1.tags["llmstack.eval"]) == scores and v1.tags["llmstack.eval_status"] == "done"
    assert v1.tags["llmstack.model_sha256"] == manifest["stages"]["model"]["outputs"]["model"]["sha256"]
    assert mlflow_client.get_model_version("tiny", "2").tags["llmstack.eval_status"] == "failed"
    # each version carries its run's model card; the gate-failing run stopped before its report, so registering it
    # built the card, and the card says the release is blocked
    assert (fetched / "MODEL_CARD.md").read_bytes() == (runs["pass"] / "MODEL_CARD.md").read_bytes()
    v2 = mlflow_client.get_model_version("tiny", "2")
    card2 = Path(mlflow_client.download_artifacts(v2.run_id, "llmstack/MODEL_CARD.md", str(tmp_path / "v2")))
    assert "**BLOCKED: a gate failed**" in card2.read_text()

    # a gate-failing version is refused and nothing moves on the server; the passing one is promoted
    bad = cli(store, "promote", "tiny:2", "--alias", "prod", "--require-gates")
    assert bad.code == 1 and "tiny:2 cannot become 'prod': its run's eval failed its gates" in bad.err
    assert mlflow_client.get_registered_model("tiny").aliases == {}
    assert cli(store, "promote", "tiny:1", "--alias", "prod", "--require-gates").out.strip() == "tiny@prod -> version 1"
    assert mlflow_client.get_model_version_by_alias("tiny", "prod").version == "1"

    # without the requirement it is the operator's call; aliases are MLflow's own
    assert cli(store, "promote", "tiny:2", "--alias", "prod").out.strip() == "tiny@prod -> version 2"
    assert cli(store, "promote", "tiny:2", "--alias", "canary").code == 0
    assert mlflow_client.get_registered_model("tiny").aliases == {"prod": "2", "canary": "2"}
    history = json.loads(mlflow_client.get_registered_model("tiny").tags["llmstack.alias_history.prod"])
    assert [h["version"] for h in history] == [None, 1]

    # rollback walks the alias back through its history, then removes it, then says there is nothing left
    assert cli(store, "rollback", "tiny", "--alias", "prod").out.strip() == "tiny@prod -> version 1"
    assert mlflow_client.get_model_version_by_alias("tiny", "prod").version == "1"
    assert cli(store, "rollback", "tiny", "--alias", "prod").out.strip() == "tiny@prod removed"
    assert mlflow_client.get_registered_model("tiny").aliases == {"canary": "2"}
    empty = cli(store, "rollback", "tiny", "--alias", "prod")
    assert empty.code == 1 and "nothing to roll back: tiny@prod has no earlier version" in empty.err

    shown = json.loads(cli(store, "show", "tiny@canary").out)
    assert (shown["version"], shown["aliases"], shown["run_dir"]) == (2, ["canary"], str(runs["fail"].resolve()))
    assert shown["source"] == f"runs:/{shown['mlflow_run_id']}/llmstack"
    assert "tiny" in cli(store, "list").out


def test_models_registered_without_llmstack(store, runs, mlflow_client):
    """A team's server holds other models: `list` leaves them out, and gates refuse versions llmstack did not record."""
    run = mlflow_client.create_run(mlflow_client.create_experiment("elsewhere"))
    mlflow_client.create_registered_model("other")
    mlflow_client.create_model_version("other", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    reg = Registry.open(store)
    assert "other" not in reg.models()
    with pytest.raises(RegistryError, match=r"other:1 cannot become 'prod'.*status: unknown"):
        reg.promote("other:1", "prod", require_gates=True)
    reg.register(runs["pass"], name="other")  # llmstack may add versions to it; from then on it is listed
    assert [v["version"] for v in reg.models()["other"]["versions"]] == [1, 2]


def test_bad_store_addresses_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = cli(f"mlflow://127.0.0.1:{_free_port()}", "list")
    assert down.code == 1 and "cannot connect (is the server running?" in down.err
    empty = cli("mlflow://", "show", "tiny")
    assert empty.code == 1 and "say where the MLflow server is" in empty.err
