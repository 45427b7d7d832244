"""The eval suite files (eval_suites/suites/*.yaml) as the recipe sees them: names, their tasks and item counts.

Reading these small YAML files here, at the bottom layer, lets `llmstack validate` catch a suite or task typo before
any model loads. What a task *is* (its data, metric, scorer) is the eval registry's (llmstack/eval/tasks.py); its
items are llmstack/eval/task_data.py's; running a suite is llmstack/eval/run.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from llmstack.paths import SUITES_DIR


class EvalDataError(Exception):
    pass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    n: int | None  # items (a prefix of the prepared data); None = all
    chat: bool  # apply the model's chat template (the same for every backend)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[TaskSpec, ...]


def suite_names() -> list[str]:
    return sorted(p.stem for p in (SUITES_DIR / "suites").glob("*.yaml"))


def load_suite(name: str) -> Suite:
    path = SUITES_DIR / "suites" / f"{name}.yaml"
    if not path.is_file():
        raise EvalDataError(f"no eval suite '{name}' (suites: {', '.join(suite_names())})")
    raw = yaml.safe_load(path.read_text())
    chat_default = bool(raw.get("chat", False))
    tasks = []
    for task, opts in raw["tasks"].items():
        opts = opts if isinstance(opts, dict) else {"n": opts}
        if not (SUITES_DIR / "tasks" / f"{task}.yaml").is_file():
            raise EvalDataError(f"suite {name}: task '{task}' has no eval_suites/tasks/{task}.yaml")
        tasks.append(TaskSpec(task, opts.get("n"), bool(opts.get("chat", chat_default))))
    return Suite(name, raw.get("description", ""), tuple(tasks))
