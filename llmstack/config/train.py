"""Recipe schema for `stages:` — the ordered training stages, each a thin layer over a TRL trainer.

    stages:
      - type: sft
        dataset: sft            # a key of data.datasets, with the schema this stage type needs
        lora: {r: 16, alpha: 32}
        args:                   # passed to TRL's own config class (SFTConfig here) and validated by it
          learning_rate: 2.0e-4
          max_steps: 30

`args` is checked against TRL's config class before any model loads (llmstack/config/trainer_args.py: names with a
did-you-mean, types, then TRL's own __post_init__ checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainValidator,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from llmstack.config.agents import ToolLimits, check_environment, check_tools
from llmstack.config.base import Strict
from llmstack.config.kinds import stage_kind, training_kinds
from llmstack.paths import ACCELERATE_DIR


def _training_kind(value: Any) -> str:
    """A training kind of the registry (config/kinds.py), looked up when a recipe is validated so that a kind added
    there is accepted here with no second list; the error reads as pydantic's own for a Literal."""
    kinds = training_kinds()
    if value not in kinds:
        quoted = [repr(k) for k in kinds]
        expected = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
    return value


# `type:` of a training stage: a training kind of the registry (cpt, sft, dpo, reward, grpo, ...). The JSON schema
# (the generated recipe reference) lists the kinds registered when this module is imported.
StageType = Annotated[str, PlainValidator(_training_kind),
                      WithJsonSchema({"enum": training_kinds(), "type": "string"})]


def _yaml_switch(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads a bare `on` / `off` as true / false: take them back as the words the user wrote."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


# `thinking:` of an sft stage (llmstack/train/thinking.py)
ThinkingSetting = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_switch)]


class LoraSpec(Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    merge: bool = Field(
        True,
        description="true: the stage outputs a plain HF folder with the adapter merged in. false: it outputs the "
                    "adapter alone (a PEFT folder whose base_model_name_or_path is the stage's input model, with the "
                    "tokenizer beside it); the next stage loads base + adapter and merges them before it trains")


class QloraSpec(LoraSpec):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class RewardSpec(Strict):
    """One reward function of an online stage (grpo, rloo, online_dpo). TRL sums them with their weights."""

    type: Literal["gsm8k_answer", "format", "reward_model", "python"] = Field(
        description="gsm8k_answer: 1 if the completion's final number equals the reference answer's (GSM8K '#### N' "
                    "or its last number), else 0. format: 1 if `pattern` (a Python regex) matches the completion. "
                    "reward_model: the score of the sequence-classification model a `reward` stage of this recipe "
                    "trained (`stage`). python: a function 'module:name' with TRL's reward signature "
                    "(prompts, completions, **columns) -> list[float]")
    weight: float = Field(1.0, description="this reward's weight in the sum (TRL's reward_weights)")
    pattern: str | None = Field(None, description="format: the regex; re.search unless `full: true`")
    full: bool = Field(False, description="format: the whole completion must match the pattern (re.fullmatch)")
    stage: str | None = Field(None, description="reward_model: the name of the reward stage that trained it")
    function: str | None = Field(None, description="python: the import string 'package.module:function'")

    @model_validator(mode="after")
    def _fields_for_type(self):
        import re

        needs = {"format": "pattern", "reward_model": "stage", "python": "function"}
        if self.type in needs and getattr(self, needs[self.type]) is None:
            raise ValueError(f"a `{self.type}` reward needs `{needs[self.type]}`")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern: not a valid regular expression ({exc})") from None
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function: '{self.function}' is not an import string 'package.module:function'")
        return self


class StageSpec(Strict):
    type: StageType = Field(description="the stage kind; the [stage kinds](#stage-kinds) at the end of this page "
                                        "say what each trains on and which TRL class checks its `args`")
    name: str | None = Field(None, description="unique stage name; defaults to the type")
    dataset: str = Field(description="key of data.datasets this stage trains on")
    lora: LoraSpec | None = None
    qlora: QloraSpec | None = None
    args: dict[str, Any] = Field(default_factory=dict, description="TRL config arguments, passed through")
    launch: str | None = Field(
        None,
        description="accelerate config for this stage: a name in recipes/accelerate/ (cpu, cpu-ddp, cpu-zero3, ddp, "
                    "fsdp2, zero3) or a YAML path; the pipeline then runs it under `accelerate launch`. "
                    "None: in-process")
    probe: list[str] = Field(
        default_factory=list,
        description="user prompts answered greedily by the trained model; answers go into the report and metrics")
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="grpo, rloo and online_dpo: the reward functions scoring each sampled completion (at least one; "
                    "online_dpo prefers the higher-scored of its two samples)")
    teacher: str | None = Field(
        None,
        description="distill only: the model the student learns from on its own samples: the name of an earlier "
                    "stage of this recipe (its output model) or a local model folder. It must share the student's "
                    "tokenizer (the distillation loss compares next-token distributions over one vocabulary)")
    tools: Annotated[list[str], AfterValidator(check_tools)] = Field(
        default_factory=list,
        description="grpo only: tool functions 'package.module:function' the model may call during its rollouts "
                    "(TRL's `tools`); each needs type hints and a docstring with an `Args:` entry per argument")
    environment: Annotated[str | None, AfterValidator(check_environment)] = Field(
        None,
        description="grpo only: an environment class 'package.module:Class' (TRL's `environment_factory`): one "
                    "instance per rollout, `reset(**row)` before each episode, its public methods are tools, and an "
                    "optional `get_reward()` scores the episode. Shipped: llmstack.eval.environments")
    tool_limits: ToolLimits = Field(
        default_factory=ToolLimits,
        description="grpo with tools or an environment: per-episode limits; a tool that raises, hangs, prints, "
                    "returns a non-JSON value or too much text ends its episode with a counted reason")
    thinking: ThinkingSetting = Field(
        "auto",
        description="sft only: train on the assistant turns' thinking (`reasoning_content`). on: with llmstack's "
                    "reasoning chat template (Qwen3's, with the model's own system line; saved with the model): the "
                    "last answer's `<think>` block, answer and end token are trained, earlier turns render without "
                    "their thinking and are not trained, and the generation prompt opens `<think>` (chat-template "
                    "kwarg `enable_thinking: false` gives the empty block). off: the template the stage uses without "
                    "thinking (the model's own, or the tool template for a tool dataset), which leaves the thinking "
                    "out. auto: on when the dataset has thinking")

    @property
    def id(self) -> str:
        return self.name or self.type

    @model_validator(mode="after")
    def _one_adapter(self):
        if self.lora and self.qlora:
            raise ValueError("set either `lora` or `qlora`, not both (qlora is LoRA on a 4-bit base)")
        return self

    @model_validator(mode="after")
    def _rewards_for_online_kinds(self):
        takes = [k for k in training_kinds() if stage_kind(k).rewards]
        if stage_kind(self.type).rewards and not self.rewards and not _scores_itself(self.environment):
            raise ValueError(f"a {self.type} stage needs `rewards` (e.g. [{{type: gsm8k_answer}}, "
                             f"{{type: reward_model, stage: reward}}]), or an `environment` "
                             f"whose class scores its episodes (`get_reward`)")
        if not stage_kind(self.type).rewards and self.rewards:
            raise ValueError(f"`rewards` belongs to {', '.join(takes)} stages; a {self.type} stage does not use it")
        if self.rewards and "reward_weights" in self.args:
            raise ValueError("set each reward's `weight` instead of args.reward_weights")
        return self

    @model_validator(mode="after")
    def _teacher_for_distill(self):
        if stage_kind(self.type).teacher and not self.teacher:
            raise ValueError(f"a {self.type} stage needs `teacher`: an earlier stage's name or a model folder")
        if not stage_kind(self.type).teacher and self.teacher:
            raise ValueError(f"`teacher` belongs to distill stages; remove it from this {self.type} stage")
        if self.teacher and "teacher_model_name_or_path" in self.args:
            raise ValueError("set `teacher` instead of args.teacher_model_name_or_path")
        return self

    @model_validator(mode="after")
    def _tools_for_agent_kinds(self):
        if (self.tools or self.environment) and not stage_kind(self.type).tools:
            takes = [k for k in training_kinds() if stage_kind(k).tools]
            raise ValueError(f"`tools` and `environment` belong to {', '.join(takes)} stages; a {self.type} stage "
                             f"does not call tools")
        if "tool_limits" in self.model_fields_set and not (self.tools or self.environment):
            raise ValueError("`tool_limits` applies to a stage with `tools` or an `environment`; add one or remove it")
        if "max_tool_calling_iterations" in self.args:
            raise ValueError("set tool_limits.max_turns instead of args.max_tool_calling_iterations")
        return self

    @model_validator(mode="after")
    def _thinking_for_sft(self):
        if self.thinking != "auto" and self.type != "sft":
            raise ValueError(f"`thinking` belongs to sft stages; remove it from this {self.type} stage")
        return self

    @model_validator(mode="after")
    def _launch_exists(self):
        if self.launch is not None:
            path = launch_config_path(self.launch)  # raises with the list of shipped names
            check_accumulation(path, self.args.get("gradient_accumulation_steps", 1))
        return self


def _scores_itself(environment: str | None) -> bool:
    """An environment class (already checked importable) with a `get_reward` is a reward source of its own."""
    from llmstack.config.agents import import_object

    return environment is not None and callable(getattr(import_object(environment, "Class"), "get_reward", None))


def launch_config_path(launch: str) -> Path:
    """`cpu-ddp` -> recipes/accelerate/cpu-ddp.yaml; a path to a YAML file is taken as is."""
    path = Path(launch).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = ACCELERATE_DIR / f"{launch}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))
    raise ValueError(f"launch: '{launch}' is neither an accelerate config file nor one of {names}")


def check_accumulation(config: Path, recipe_steps) -> None:
    """DeepSpeed takes gradient accumulation from its own config, and accelerate silently prefers that value over the
    trainer's: a launch config that pins a number different from the stage's `args.gradient_accumulation_steps` would
    train with other batches than the recipe says. Left out of the config (as in the shipped zero3.yaml), the recipe's
    value is used."""
    import yaml

    try:
        pinned = (yaml.safe_load(Path(config).read_text()) or {}).get("deepspeed_config", {}).get(
            "gradient_accumulation_steps")
    except (OSError, yaml.YAMLError, AttributeError):
        return  # accelerate reports an unreadable config itself
    if isinstance(pinned, int) and isinstance(recipe_steps, int) and pinned != recipe_steps:
        raise ValueError(
            f"{config} sets deepspeed_config.gradient_accumulation_steps: {pinned}, but this stage's "
            f"args.gradient_accumulation_steps is {recipe_steps}; DeepSpeed would train with {pinned}. Remove the key "
            f"from {config} (the recipe's value is then used) or set the two to the same number")
