"""The recipe: one YAML file that drives a model's whole life. Schema, loading, and validation a user can act on.

Each block's schema has its own module in this package (data.py, train.py, eval.py, quant.py, serve.py);
this module composes them and adds the checks that span blocks (a stage's dataset exists and has the right schema,
eval names stages that exist). `load_recipe` raises `RecipeError` whose `.problems` are lines like
`stages[1].lora.r: must be > 0`; nothing here loads a model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from llmstack.config.base import Strict, format_errors
from llmstack.config.card import CardSpec
from llmstack.config.data import DataConfig
from llmstack.config.eval import EvalSpec
from llmstack.config.eval_suites import load_suite
from llmstack.config.kinds import stage_kind
from llmstack.config.quant import QuantizeSpec, group_size_problem, imatrix_tools_problem
from llmstack.config.serve import ServeSpec
from llmstack.config.sweep import SweepSpec, apply
from llmstack.config.teacher import teacher_problem
from llmstack.config.train import StageSpec
from llmstack.config.trainer_args import check_trainer_args


class ModelSpec(Strict):
    source: str = Field(description="packaged name (see `llmstack models list`), a local HF folder, or a hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the dtype training stages load the model's weights in. auto: the device policy's "
        "(a CPU with AVX512-BF16/AMX trains LoRA on a bfloat16 base with float32 adapters and full-parameter "
        "stages on float32 weights under bf16 autocast; other CPUs float32; CUDA float32 weights under bf16/fp16 "
        "autocast). Merged and saved models are written in float32 under auto, else in this dtype")
    revision: str | None = None


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="names the run folder runs/<name>/")
    seed: int = 42
    model: ModelSpec
    data: DataConfig = Field(default_factory=DataConfig)
    stages: list[StageSpec] = Field(default_factory=list)
    eval: EvalSpec | None = None
    quantize: QuantizeSpec | None = None
    serve: ServeSpec | None = None
    card: CardSpec | None = Field(None, description="what the model card says that a run cannot measure: intended "
                                  "and out-of-scope use, known limitations (MODEL_CARD.md, written by the report)")
    sweep: SweepSpec | None = Field(None, description="a hyperparameter search over this recipe's fields "
                                    "(`llmstack sweep`); `llmstack run` ignores it")


class RecipeError(Exception):
    """A recipe that cannot run. `problems` holds one `yaml.path: message` line per problem."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


def _cross_checks(recipe: Recipe) -> list[str]:
    problems = []
    datasets = recipe.data.datasets
    seen: set[str] = set()
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}]"
        if stage.id in seen or stage.id in ("base", "int4", "int8", "model", "curate", "eval", "serve", "report"):
            problems.append(f"{where}.name: stage name '{stage.id}' is taken; give this stage a unique `name`")
        for k, reward in enumerate(stage.rewards):
            # an online stage finds the reward model in the manifest entry of that stage, so it must run earlier
            earlier = [s.id for s in recipe.stages[:i] if s.type == "reward"]
            if reward.type == "reward_model" and reward.stage not in earlier:
                problems.append(f"{where}.rewards[{k}].stage: '{reward.stage}' is not a reward stage before this one "
                                f"(reward stages before it: {earlier or 'none'})")
        if stage.teacher:
            policies = [s.id for s in recipe.stages if s.type != "reward"]
            problem = teacher_problem(stage.teacher, ["base", *(s for s in policies if s in seen)],
                                      [s for s in policies if s not in seen and s != stage.id], recipe.model.source)
            if problem:
                problems.append(f"{where}.teacher: {problem}")
        seen.add(stage.id)
        if stage.dataset not in datasets:
            have = ", ".join(datasets) or "none"
            problems.append(
                f"{where}.dataset: '{stage.dataset}' is not defined under data.datasets (defined: {have}); "
                f"add it there or point the stage at one of those"
            )
        else:
            want = stage_kind(stage.type).dataset_schema
            got = datasets[stage.dataset].schema_
            if got != want:
                problems.append(
                    f"{where}.dataset: a {stage.type} stage trains on `{want}` data, but data.datasets."
                    f"{stage.dataset}.schema is `{got}`"
                )
    if recipe.eval:
        policies = [s.id for s in recipe.stages if s.type != "reward"]  # a reward model scores, it does not answer
        allowed = ["base", *policies] + ([recipe.quantize.stage_name] if recipe.quantize else [])
        allowed += [f"gguf-{t.lower()}" for t in (recipe.quantize.gguf if recipe.quantize else [])]
        for j, name in enumerate(recipe.eval.stages):
            if name not in allowed:
                problems.append(f"eval.stages[{j}]: '{name}' is not a stage of this recipe (choose from {allowed})")
    if recipe.quantize:
        problem = group_size_problem(recipe.quantize, recipe.model.source)
        if problem:
            problems.append(f"quantize.group_size: {problem}")
        problem = imatrix_tools_problem(recipe.quantize.gguf)
        if problem:
            problems.append(f"quantize.gguf: {problem}")
    if recipe.quantize and recipe.quantize.calibration_dataset:
        if recipe.quantize.calibration_dataset not in datasets:
            problems.append(f"quantize.calibration_dataset: '{recipe.quantize.calibration_dataset}' "
                            "is not in data.datasets")
    return problems


def _trainer_arg_checks(recipe: Recipe) -> list[str]:
    problems = []
    for i, stage in enumerate(recipe.stages):
        for key, msg in check_trainer_args(stage.type, stage.args):
            problems.append(f"stages[{i}].args{'.' + key if key else ''}: {msg}")
    return problems


def parse_recipe(raw: Any, path: str | Path = "<recipe>", check_trainer: bool = True) -> Recipe:
    """Validate an already-parsed YAML document. `check_trainer=False` skips the (slow-importing) TRL checks."""
    if not isinstance(raw, dict):
        raise RecipeError(path, [f"<root>: a recipe is a YAML mapping, got {type(raw).__name__}"])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(path, format_errors(exc, Recipe)) from None
    problems = _cross_checks(recipe)
    if check_trainer:
        problems += _trainer_arg_checks(recipe)
    if problems:
        raise RecipeError(path, problems)
    if recipe.sweep:
        problems = _sweep_problems(raw, recipe, check_trainer)
        if problems:
            raise RecipeError(path, problems)
    return recipe


def _sweep_problems(raw: dict[str, Any], recipe: Recipe, check_trainer: bool) -> list[str]:
    """A sweep whose every searched value makes a valid recipe (both ends of a range, each choice), and whose
    objective is a score the recipe's eval produces: checked here, so a bad space fails before any trial runs."""
    sweep = recipe.sweep
    problems = sweep.enqueue_problems()
    for key, param in sweep.space.items():
        for value in param.probes():
            try:
                parse_recipe(apply(raw, {key: value}), check_trainer=check_trainer)
            except (ValueError, KeyError) as exc:
                problems.append(f"sweep.space.{key}: {exc.args[0] if exc.args else exc}")
                break
            except RecipeError as exc:
                problems += [f"sweep.space.{key} = {value!r}: {p}" for p in exc.problems]
                break
    problems += _pruner_problems(recipe)
    objective = sweep.objective
    if recipe.eval is None:
        problems.append("sweep.objective: the recipe has no `eval:` block, so no trial would be scored; add one "
                        f"that evaluates '{objective.stage}'")
        return problems
    if objective.stage not in recipe.eval.stages:
        problems.append(f"sweep.objective.stage: '{objective.stage}' is not evaluated (eval.stages: "
                        f"{', '.join(recipe.eval.stages)}); add it there or choose one of those")
    tasks = recipe.eval.tasks or [t.name for t in load_suite(recipe.eval.suite).tasks]
    if objective.task not in tasks:
        problems.append(f"sweep.objective.task: '{objective.task}' is not among the tasks eval scores "
                        f"({', '.join(tasks)}); add it to eval.tasks or choose one of those")
    return problems


def _pruner_problems(recipe: Recipe) -> list[str]:
    """A pruner's stage is a training stage of this recipe that evaluates on the validation split every eval_steps:
    its evaluations are what the pruner judges a trial on."""
    pruner = recipe.sweep.pruner
    if pruner.kind == "none":
        return []
    ids = [s.id for s in recipe.stages]
    if pruner.stage not in ids:
        return [f"sweep.pruner.stage: no training stage '{pruner.stage}' (stages: {', '.join(ids) or 'none'})"]
    index = ids.index(pruner.stage)
    args = recipe.stages[index].args
    strategy = str(args.get("eval_strategy", "no"))
    if strategy == "no" or (strategy == "steps" and not args.get("eval_steps")):
        return [f"sweep.pruner.stage: '{pruner.stage}' does not evaluate while it trains (args.eval_strategy: "
                f"{strategy}, args.eval_steps: {args.get('eval_steps')}), so the pruner would have nothing to judge; "
                f"set stages[{pruner.stage}].args.eval_strategy: steps and eval_steps: N"]
    return []


def load_recipe(path: str | Path, check_trainer: bool = True) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(path, [f"<file>: no such file: {path}"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<file>"
        raise RecipeError(path, [f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    return parse_recipe(raw, path, check_trainer=check_trainer)


def recipe_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
