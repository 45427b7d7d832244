"""Recipe schema for `eval:` — which suite to run on which stages' models, and the gates that fail a run."""

from __future__ import annotations

from pydantic import Field

from llmstack.schema import Strict


class GateSpec(Strict):
    min: dict[str, float] = Field(default_factory=dict, description="task -> lowest acceptable score")
    max_regression: float | None = Field(None, ge=0, description="largest allowed drop vs the base model, any task")


class EvalSpec(Strict):
    suite: str = Field("smoke", description="a suite under eval_suites/")
    stages: list[str] = Field(default_factory=lambda: ["base"], description="'base', stage names, or 'int4'")
    limit: int | None = Field(None, gt=0, description="items per task (None: the suite's own size)")
    gates: GateSpec = Field(default_factory=GateSpec)
