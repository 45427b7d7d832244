"""Recipe schema for `sweep:` — a hyperparameter search over the recipe's own fields (`llmstack sweep`), and the YAML
paths it addresses them by.

    sweep:
      space:                                   # recipe field (its YAML path) -> the values to search
        stages[sft].args.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
        stages[sft].lora.r: {choice: [8, 16, 32]}
      objective: {stage: sft, task: identity, direction: maximize}
      n_trials: 4
      enqueue: [{stages[sft].args.learning_rate: 5.0e-4, stages[sft].lora.r: 16}]   # tried first: the shipped values
      pruner: {kind: median, stage: sft, n_startup_trials: 1}   # stop a trial whose sft eval_loss trails the others

The pruner judges a trial on the evaluations its training stage makes while it trains (`eval_strategy: steps`), not
on the objective, which exists only once the trial's eval stage has run (llmstack/sweep/pruning.py).

A path is the one `llmstack validate` prints for a problem (`stages[1].lora.r`); a stage may also be named by its id
(`stages[sft]`). Whether a path and its values make a valid recipe is checked against the recipe itself
(llmstack/config/recipe.py), before any trial runs.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from llmstack.config.base import Strict

_PART = re.compile(r"([^.\[\]]+)|\[([^\[\]]+)\]")


class ItemId(str):
    """A list item named in brackets by id rather than index (`stages[sft]`)."""


def parse_path(path: str) -> list[str | int]:
    """`stages[1].lora.r` -> ['stages', 1, 'lora', 'r']; `stages[sft]` keeps 'sft' as a stage id (a string in a list
    position). Raises ValueError for a path that is not of this form."""
    parts: list[str | int] = []
    pos = 0
    for m in _PART.finditer(path):
        sep = path[pos:m.start()]
        if sep not in ("", ".") or (sep == "." and m.group(2)) or (not sep and parts and m.group(1)):
            raise ValueError(f"'{path}' is not a YAML path like stages[1].args.learning_rate")
        key, index = m.group(1), m.group(2)
        parts.append(key if key is not None else (int(index) if index.lstrip("-").isdigit() else ItemId(index)))
        pos = m.end()
    if pos != len(path) or not parts or not isinstance(parts[0], str):
        raise ValueError(f"'{path}' is not a YAML path like stages[1].args.learning_rate")
    return parts


def format_path(parts: list[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, (int, ItemId)) else ("." if i else "") + p for i, p in enumerate(parts))


def set_at(raw: dict[str, Any], parts: list[str | int], value: Any) -> None:
    """Set `value` at `parts` in a parsed recipe document (in place). A mapping on the way that is absent (a stage
    without `lora:`) is created, so the recipe's own validation judges the key; a list index must exist. Raises
    KeyError naming the first part that does not."""
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or not -len(node) <= part < len(node):
                raise KeyError(f"{format_path(parts[:i + 1])}: no such list item "
                               f"({len(node) if isinstance(node, list) else 0} there)")
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise KeyError(f"{format_path(parts[:i + 1])}: not a mapping")
        if node.get(part) is None:
            if isinstance(nxt, int):
                raise KeyError(f"{format_path(parts[:i + 1])}: no such list")
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or not -len(node) <= last < len(node):
            raise KeyError(f"{format_path(parts)}: no such list item")
    elif not isinstance(node, dict):
        raise KeyError(f"{format_path(parts[:-1])}: not a mapping")
    node[last] = value


class ParamSpec(Strict):
    """One searched field: exactly one of loguniform, uniform, int, choice."""

    loguniform: tuple[float, float] | None = Field(None, description="[low, high], both > 0: a float sampled on a "
                                                   "log scale (learning rates)")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]: a float sampled on a linear scale")
    int_: tuple[int, int] | None = Field(None, alias="int", description="[low, high]: an integer, both ends included "
                                         "(with `step`, and `log` for a log scale)")
    choice: list[Any] | None = Field(None, min_length=1, description="the values to choose from (numbers, strings, "
                                     "booleans)")
    step: float | None = Field(None, gt=0, description="uniform / int only: sample on this grid")
    log: bool = Field(False, description="int only: sample on a log scale")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("loguniform", "uniform", "int_", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform: [low, high], uniform: [low, high], int: [low, high], "
                             f"choice: [values] (got {', '.join(g.rstrip('_') for g in given) or 'none'})")
        kind = given[0]
        bounds = getattr(self, kind)
        if kind != "choice" and not bounds[0] < bounds[1]:
            raise ValueError(f"{kind.rstrip('_')}: [{bounds[0]}, {bounds[1]}]: low must be below high")
        if kind == "loguniform" and bounds[0] <= 0:
            raise ValueError(f"loguniform: [{bounds[0]}, {bounds[1]}]: a log scale needs low > 0 (use uniform)")
        if kind == "choice" and any(not isinstance(v, (bool, int, float, str)) and v is not None for v in bounds):
            raise ValueError("choice: values are numbers, strings, booleans or null (Optuna stores them as such)")
        if self.step is not None and kind not in ("uniform", "int_"):
            raise ValueError("step: only for uniform or int")
        if self.log and kind != "int_":
            raise ValueError("log: only for int (loguniform is the float on a log scale)")
        return self

    def admits(self, value: Any) -> bool:
        """Whether `value` is one this field's search could sample (an enqueued trial's must be)."""
        if self.choice is not None:
            return value in self.choice
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        low, high = self.loguniform or self.uniform or self.int_
        return low <= value <= high and (self.int_ is None or float(value).is_integer())

    def probes(self) -> list[Any]:
        """Values the recipe is checked with before the sweep starts: both ends of a range, every choice."""
        if self.choice is not None:
            return list(self.choice)
        return list(self.loguniform or self.uniform or self.int_)

    def suggest(self, trial: Any, name: str) -> Any:
        """This field's value for an Optuna trial (its suggest_* call)."""
        if self.choice is not None:
            return trial.suggest_categorical(name, self.choice)
        if self.int_ is not None:
            return trial.suggest_int(name, *self.int_, step=int(self.step or 1), log=self.log)
        if self.loguniform is not None:
            return trial.suggest_float(name, *self.loguniform, log=True)
        return trial.suggest_float(name, *self.uniform, step=self.step)


class ObjectiveSpec(Strict):
    stage: str = Field(description="a model the recipe's eval scores (one of eval.stages), e.g. sft")
    task: str = Field(description="one of the tasks eval scores, e.g. identity; its primary metric is the objective")
    direction: Literal["maximize", "minimize"] = "maximize"


class PrunerSpec(Strict):
    """Stop a trial early on its training stage's evaluations (its `eval_loss` every `eval_steps`)."""

    kind: Literal["none", "median", "percentile", "hyperband", "successive_halving"] = Field(
        "none", description="the Optuna pruner (optuna.pruners.MedianPruner, PercentilePruner, HyperbandPruner, "
        "SuccessiveHalvingPruner); none: every trial runs to its eval")
    stage: str | None = Field(None, description="the id of the training stage whose evaluations judge a trial (e.g. "
                              "sft); it needs args.eval_strategy: steps and args.eval_steps")
    metric: str = Field("eval_loss", description="the logged evaluation metric reported to the pruner (eval_loss, or "
                        "another eval_* value the stage's trainer logs)")
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="whether a lower or higher metric is better; default minimize for a *loss metric "
        "(required for any other). Reported to Optuna negated when it differs from the objective's direction")
    n_startup_trials: int | None = Field(None, ge=0, description="median / percentile: prune nothing until this "
                                         "many trials have completed (default 5)")
    n_warmup_steps: int = Field(0, ge=0, description="prune no trial before this training step (hyperband / "
                                "successive_halving: their minimum resource, in steps)")
    percentile: float | None = Field(None, gt=0, lt=100, description="percentile only: prune a trial whose best "
                                     "value so far is worse than this percentile of the completed trials' at the "
                                     "same step (50: the median)")
    reduction_factor: int | None = Field(None, ge=2, description="hyperband / successive_halving: keep 1 in this "
                                         "many trials at each rung (default 3)")

    @model_validator(mode="after")
    def _fields_of_kind(self):
        problems = []
        if self.kind != "none" and not self.stage:
            problems.append("stage: give the id of the training stage whose evaluations judge a trial (e.g. sft)")
        if self.percentile is not None and self.kind != "percentile":
            problems.append("percentile: only for kind: percentile")
        if self.kind == "percentile" and self.percentile is None:
            problems.append("percentile: kind percentile needs it (e.g. 25: prune below the best quarter)")
        if self.n_startup_trials is not None and self.kind not in ("median", "percentile"):
            problems.append("n_startup_trials: only for kind median or percentile")
        if self.reduction_factor is not None and self.kind not in ("hyperband", "successive_halving"):
            problems.append("reduction_factor: only for kind hyperband or successive_halving")
        if self.kind != "none" and self.metric_direction is None:
            problems.append(f"direction: '{self.metric}' is not a loss; say whether it is minimize or maximize")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def metric_direction(self) -> str | None:
        return self.direction or ("minimize" if self.metric.endswith("loss") else None)


class SweepRaySpec(Strict):
    address: str = Field("auto", description="a running Ray cluster: auto (the one this machine belongs to) or "
                         "HOST:PORT of its head")
    parallel: int = Field(2, gt=0, description="trials running at once, each a Ray task")


class SweepSpec(Strict):
    space: dict[str, ParamSpec] = Field(min_length=1, description="recipe field, by its YAML path (stages[1].lora.r "
                                        "or stages[sft].lora.r; data.datasets.sft.sources[1].weight), -> the values "
                                        "searched")
    objective: ObjectiveSpec = Field(description="the eval score each trial is judged by")
    n_trials: int = Field(10, gt=0, description="trials that finish (complete or fail with a reason); a trial cut "
                          "off by a killed sweep is not counted and is asked again on resume")
    timeout_s: float | None = Field(None, gt=0, description="start no new trial after this many seconds")
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="trials tried first, in order, as "
                                          "{path: value} for every searched path (e.g. the recipe's own values)")
    study: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                              description="the Optuna study's name (None: the recipe's name)")
    ray: SweepRaySpec | None = Field(None, description="run trials in parallel as Ray tasks on a running cluster")
    pruner: PrunerSpec = Field(default_factory=PrunerSpec, description="stop trials early on their training "
                               "stage's evaluations (kind: none, the default, runs every trial to its eval)")

    def enqueue_problems(self) -> list[str]:
        """`sweep.enqueue[i]...: problem` lines: an enqueued trial gives each searched path a value its space admits."""
        problems = []
        for i, params in enumerate(self.enqueue):
            missing, extra = set(self.space) - set(params), set(params) - set(self.space)
            if missing or extra:
                problems.append(f"sweep.enqueue[{i}]: give a value for every path of `space` and nothing else "
                                f"(missing: {sorted(missing) or 'none'}; not in space: {sorted(extra) or 'none'})")
                continue
            for path, value in params.items():
                if not self.space[path].admits(value):
                    space = self.space[path].model_dump(by_alias=True, exclude_defaults=True)
                    problems.append(f"sweep.enqueue[{i}].{path}: {value!r} is outside its space ({space})")
        return problems


def resolve(path: str, raw: dict[str, Any]) -> list[str | int]:
    """A space path as list parts, a stage named by id (`stages[sft]`: its `name`, else its `type`) turned into its
    index. Raises ValueError (bad form, unknown stage id) or KeyError (see set_at)."""
    parts = parse_path(path)
    for i, part in enumerate(parts):
        if not isinstance(part, ItemId):
            continue
        if parts[:i] != ["stages"]:
            raise ValueError(f"'{path}': only stages can be named by id ([{part}]); give a list index elsewhere")
        ids = [s.get("name") or s.get("type") for s in raw.get("stages") or [] if isinstance(s, dict)]
        if part not in ids:
            raise ValueError(f"'{path}': no stage '{part}' (stages: {', '.join(map(str, ids)) or 'none'})")
        parts[i] = ids.index(str(part))
    return parts


def apply(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The recipe document with `values` ({space path: value}) set at their paths and without its `sweep:` block:
    what a trial runs, and what best_recipe.yaml holds."""
    import copy

    out = copy.deepcopy({k: v for k, v in raw.items() if k != "sweep"})
    for path, value in values.items():
        set_at(out, resolve(path, raw), value)
    return out
