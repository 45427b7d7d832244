"""The stage kinds: ONE entry per kind, everything the rest of llmstack needs to know about it.

Adding a stage kind is a module under llmstack/stages/ with `run(ctx) -> StageResult`, plus one `StageKind` below.
The pipeline finds the function here (`run`), the recipe schema accepts a training kind here (`StageSpec.type`), the
recipe check asks here which dataset schema the kind trains on and which of a stage's optional blocks (`rewards`,
`teacher`) the kind takes, and the trainer-argument check asks here which TRL config class validates its `args`.

Everything is named by import string or class name, never imported: this is the bottom layer (config), and planning
or validating a recipe must not import torch or trl.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageKind:
    name: str  # `type:` in a recipe's stages (training kinds), or the fixed name of a pipeline step
    run: str  # "package.module:function" taking a StageContext and returning a StageResult
    spec: str  # "package.module:Class": the recipe block the stage receives as ctx.spec ("" for none)
    dataset_schema: str | None = None  # training kinds: the schema of the data.datasets entry it trains on
    # training kinds: the TRL config class its `args` are passed to: a name in `trl`, or "module:Class" for a class
    # outside trl's top level (trl.experimental: upstream may change or remove it in any release)
    trl_config: str | None = None
    rewards: bool = False  # the stage takes `rewards:` (RewardSpec: reward functions scoring its own samples)
    teacher: bool = False  # the stage takes `teacher:` (an earlier stage or a model folder it learns from)
    tools: bool = False  # the stage takes `tools:` / `environment:` / `tool_limits:` (TRL's multi-turn tool rollouts)

    @property
    def trl_config_name(self) -> str:
        """The config class as a user imports it: trl.DPOConfig, trl.experimental.orpo.ORPOConfig."""
        name = self.trl_config or ""
        return name.replace(":", ".") if ":" in name else f"trl.{name}"

    @property
    def experimental(self) -> bool:
        """Its trainer lives in trl.experimental (the docs' method table says so)."""
        return ".experimental" in (self.trl_config or "")

    @property
    def training(self) -> bool:
        """A kind a recipe lists under `stages:` (the rest are the pipeline's fixed steps: model, curate, ...)."""
        return self.dataset_schema is not None


def _stage(name: str, spec: str, **training) -> StageKind:
    return StageKind(name, f"llmstack.stages.{name}:run", spec, **training)


_TRAIN = "llmstack.config.train:StageSpec"

# In pipeline order for the fixed steps; the training kinds run in the order a recipe lists them. The online kinds
# (grpo, rloo, online_dpo, distill) take `messages` rows: the turns before the last assistant turn are the prompt,
# that turn's text is the reference answer (read by reward functions; distill ignores it). kto trains on `unpaired`
# rows (a prompt, one completion, a desirable/undesirable label).
STAGE_KINDS: dict[str, StageKind] = {k.name: k for k in (
    _stage("model", "llmstack.config.recipe:ModelSpec"),
    _stage("curate", "llmstack.config.data:DataConfig"),
    _stage("cpt", _TRAIN, dataset_schema="text", trl_config="SFTConfig"),
    _stage("sft", _TRAIN, dataset_schema="messages", trl_config="SFTConfig"),
    _stage("dpo", _TRAIN, dataset_schema="preference", trl_config="DPOConfig"),
    _stage("reward", _TRAIN, dataset_schema="preference", trl_config="RewardConfig"),
    _stage("grpo", _TRAIN, dataset_schema="messages", trl_config="GRPOConfig", rewards=True,
           tools=True),
    _stage("kto", _TRAIN, dataset_schema="unpaired", trl_config="KTOConfig"),
    _stage("orpo", _TRAIN, dataset_schema="preference", trl_config="trl.experimental.orpo:ORPOConfig"),
    _stage("rloo", _TRAIN, dataset_schema="messages", trl_config="RLOOConfig", rewards=True),
    _stage("online_dpo", _TRAIN, dataset_schema="messages",
           trl_config="trl.experimental.online_dpo:OnlineDPOConfig", rewards=True),
    _stage("distill", _TRAIN, dataset_schema="messages", trl_config="DistillationConfig", teacher=True),
    _stage("quantize", "llmstack.config.quant:QuantizeSpec"),
    _stage("eval", "llmstack.config.eval:EvalSpec"),
    _stage("serve", "llmstack.config.serve:ServeSpec"),
    _stage("report", ""),
)}


def training_kinds() -> list[str]:
    """The `type:` values a recipe's `stages:` accept, in registry order."""
    return [k.name for k in STAGE_KINDS.values() if k.training]


def stage_kind(name: str) -> StageKind:
    try:
        return STAGE_KINDS[name]
    except KeyError:
        raise ValueError(f"no stage kind '{name}' (known: {', '.join(STAGE_KINDS)})") from None
